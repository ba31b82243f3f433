"""Repository-level trouble seen from the command line: damaged snapshot files, a
cache that must not hide damage, missing backup paths, lost locks, ``--json`` output,
and small CLI defects (issue 20)."""

from __future__ import annotations

from pathlib import Path

from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture
from tests.maintenance_helpers import flip_byte, make_history, objects


def test_one_damaged_snapshot_file_does_not_block_the_others(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    ids = make_history(cairn, src)
    damaged = ids[1]
    flip_byte(objects(cairn.repo, "snapshots")[damaged], 40)
    nc = ("--no-cache",)  # a new machine: nothing cached to fall back on

    listed = cairn.run(*nc, "snapshots", "--json")
    assert listed.code == 0, listed.err
    assert {s["id"] for s in listed.json()} == {ids[0], ids[2]}
    warnings = [line for line in listed.err.splitlines() if damaged in line]
    assert len(warnings) == 1 and f"snapshots/{damaged}" in warnings[0], listed.err

    repaired = cairn.run(*nc, "repair", "snapshots")
    assert repaired.code == 0, repaired.err
    assert f"file snapshots/{damaged} is damaged" in repaired.out

    (src / "new.txt").write_text("new")
    backup = cairn.run(*nc, "backup", str(src), "--json")
    assert backup.code == 0, backup.err
    assert backup.json_lines()[-1]["parent"] == ids[2]

    # prune must know every snapshot's tree before deleting anything: it refuses.
    refused = cairn.run(*nc, "prune")
    assert refused.code == 1 and damaged in refused.err, refused.err

    forgot = cairn.run(*nc, "forget", damaged[:8])
    assert forgot.code == 0, forgot.err
    assert damaged not in objects(cairn.repo, "snapshots")
    assert len(cairn.run(*nc, "snapshots", "--json", check=True).json()) == 3
    assert cairn.run(*nc, "prune").code == 0
    assert cairn.run(*nc, "check").code == 0
