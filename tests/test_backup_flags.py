"""restic 0.19's backup flags through the real command line: --skip-if-unchanged,
--stdin-from-command, --exclude-caches, --group-by, --no-scan."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture

SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"


def _snapshot_ids(c: Cairn) -> list[str]:
    return [s["id"] for s in c.run("snapshots", "--json", check=True).json()]


def _summary(c: Cairn, *args: str) -> dict:  # type: ignore[type-arg]
    result = c.run("--json", "backup", *args, check=True)
    (summary,) = [x for x in result.json_lines() if x.get("message_type") == "summary"]
    return summary  # type: ignore[no-any-return]


@pytest.fixture
def quiet_dir() -> Iterator[Path]:
    """A directory whose ancestors nothing else writes to. A snapshot of an absolute
    path holds its ancestors' metadata too (as restic's does), and /tmp changes all
    the time (pytest's and the worker pools' own temporary directories)."""
    path = Path(tempfile.mkdtemp(prefix="cairn-test-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_skip_if_unchanged_saves_no_snapshot_until_something_changes(
    cairn: Cairn,  # noqa: F811
    quiet_dir: Path,
) -> None:
    src = quiet_dir / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("one\n")
    first = _summary(cairn, "--skip-if-unchanged", str(src))  # no parent: saved
    assert first["snapshot_id"] and first["skipped"] is False

    again = cairn.run("backup", "--skip-if-unchanged", str(src), check=True)
    assert "skipped creating snapshot" in again.out
    assert _snapshot_ids(cairn) == [first["snapshot_id"]]
    assert _summary(cairn, "--skip-if-unchanged", str(src))["skipped"] is True

    # Without the flag an unchanged backup still makes a snapshot (restic's default).
    cairn.run("backup", str(src), check=True)
    assert len(_snapshot_ids(cairn)) == 2

    (src / "d" / "f").write_text("two\n")
    changed = _summary(cairn, "--skip-if-unchanged", str(src))
    assert changed["snapshot_id"] and not changed["skipped"]
    assert len(_snapshot_ids(cairn)) == 3


def test_stdin_from_command_stores_its_output(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    script = "for i in $(seq 1 20000); do echo row $i; done; echo note >&2"
    result = cairn.run(
        "backup",
        "--stdin-from-command",
        "--stdin-filename",
        "dump.sql",
        "--tag",
        "db",
        "--",
        "sh",
        "-c",
        script,
        check=True,
    )
    assert "note" in result.err  # the command's stderr reaches the user
    target = tmp_path / "t"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    expected = "".join(f"row {i}\n" for i in range(1, 20001))
    assert (target / "dump.sql").read_text() == expected


def test_stdin_from_command_that_fails_saves_no_snapshot(cairn: Cairn) -> None:  # noqa: F811
    result = cairn.run("backup", "--stdin-from-command", "--", "sh", "-c", "echo partial; exit 3")
    assert result.code == 1, result.err
    assert "exited with code 3" in result.err and "no snapshot saved" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert _snapshot_ids(cairn) == []

    missing = cairn.run("backup", "--stdin-from-command", "--", "/nonexistent/dumper")
    assert missing.code == 1 and "cannot run '/nonexistent/dumper'" in missing.err
    assert len(missing.err.strip().splitlines()) == 1

    for args in (("--stdin-from-command",), ("--stdin", "--stdin-from-command", "--", "true")):
        wrong = cairn.run("backup", *args)
        assert wrong.code == 1 and wrong.err.startswith("cairn: "), wrong.err
    assert _snapshot_ids(cairn) == []


def test_exclude_caches_needs_the_signature_and_keeps_the_tag(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    for name in ("cache", "fake", "plain"):
        (src / name).mkdir(parents=True)
        (src / name / "data").write_text(name)
    (src / "cache" / "CACHEDIR.TAG").write_text(SIGNATURE + "\n# a cache\n")
    (src / "fake" / "CACHEDIR.TAG").write_text("not a cache tag\n")
    cairn.run("backup", "--exclude-caches", "--no-scan", str(src), check=True)
    target = tmp_path / "t"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    base = target / str(src).lstrip("/")
    assert sorted(p.name for p in (base / "cache").iterdir()) == ["CACHEDIR.TAG"]
    assert sorted(p.name for p in (base / "fake").iterdir()) == ["CACHEDIR.TAG", "data"]
    assert (base / "plain" / "data").read_text() == "plain"


def test_exclude_if_present_with_a_header(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        (src / name / "data").write_text(name)
    (src / "a" / ".nobackup").write_text("SKIP me")
    (src / "b" / ".nobackup").write_text("keep me")
    cairn.run("backup", "--exclude-if-present", ".nobackup:SKIP", str(src), check=True)
    target = tmp_path / "t"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    base = target / str(src).lstrip("/")
    assert not (base / "a" / "data").exists() and (base / "b" / "data").exists()


def test_group_by_chooses_the_parent(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    tagged_x = _summary(cairn, "--tag", "x", str(src))["snapshot_id"]
    tagged_y = _summary(cairn, "--tag", "y", str(src))["snapshot_id"]
    # Default host,paths: the latest of the same host and paths, whatever its tags.
    assert _summary(cairn, "--tag", "x", "--dry-run", str(src))["parent"] == tagged_y
    by_tags = _summary(cairn, "--tag", "x", "--group-by", "host,paths,tags", str(src))
    assert by_tags["parent"] == tagged_x
    # Paths left out: a snapshot of other paths can be the parent.
    other = tmp_path / "other"
    other.mkdir()
    assert (
        _summary(cairn, "--group-by", "host", "--dry-run", str(other))["parent"]
        == (by_tags["snapshot_id"])
    )
    assert _summary(cairn, "--dry-run", str(other))["parent"] is None

    bad = cairn.run("backup", "--group-by", "host,color", str(src))
    assert bad.code == 1 and "unknown field 'color'" in bad.err
