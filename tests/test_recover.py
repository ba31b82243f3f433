"""``cairn recover`` through the real command line."""

from __future__ import annotations

import os
from pathlib import Path

from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture
from tests.maintenance_helpers import objects


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _backup(c: Cairn, src: Path) -> str:
    return str(c.run("backup", str(src), "--json", check=True).json_lines()[-1]["snapshot_id"])


def test_recover_finds_the_tree_of_a_lost_snapshot(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "lost.bin").write_bytes(os.urandom(30_000))
    (src / "a.txt").write_text("first\n")
    first = _backup(cairn, src)
    lost_files = _files(src)
    tree = cairn.run("cat", "snapshot", first, check=True).json()["tree"]
    (src / "dir" / "lost.bin").unlink()
    (src / "a.txt").write_text("second\n")
    second = _backup(cairn, src)

    # Nothing is unreferenced yet.
    r = cairn.run("recover", check=True)
    assert "found 0 unreferenced roots" in r.out and "no snapshot to write." in r.out
    assert len(objects(cairn.repo, "snapshots")) == 2

    objects(cairn.repo, "snapshots")[first].unlink()
    r = cairn.run("recover", "--json")
    assert r.code == 0, r.err
    (summary,) = r.json_lines()
    assert summary["roots"] == [tree] and summary["unreadable"] == []
    assert summary["packs_indexed"] == 0 and summary["trees"] > 1
    new = summary["snapshot_id"]
    assert set(objects(cairn.repo, "snapshots")) == {second, new}
    snap = cairn.run("cat", "snapshot", new, check=True).json()
    assert snap["paths"] == ["/recover"] and snap["tags"] == ["recovered"]

    target = tmp_path / "t"
    cairn.run("restore", new, "--target", str(target), check=True)
    assert _files(target / tree[:8] / str(src).lstrip("/")) == lost_files
    assert cairn.run("check").code == 0
    # Recovered now: a second run finds nothing.
    assert "found 0 unreferenced roots" in cairn.run("recover", check=True).out


def test_recover_indexes_the_packs_of_an_interrupted_backup(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.txt").write_text("one\n")
    _backup(cairn, src)
    index_before = set(objects(cairn.repo, "index"))
    (src / "two.bin").write_bytes(os.urandom(20_000))
    second = _backup(cairn, src)
    # As if the backup had stopped after its packs: no index file, no snapshot.
    for index_id in set(objects(cairn.repo, "index")) - index_before:
        objects(cairn.repo, "index")[index_id].unlink()
    objects(cairn.repo, "snapshots")[second].unlink()

    r = cairn.run("recover", check=True)
    assert "indexed 2 packs that no index listed" in r.out
    assert "found 1 unreferenced roots" in r.out and "saved new snapshot" in r.out
    assert cairn.run("check").code == 0
    new = cairn.run("snapshots", "--tag", "recovered", "--json", check=True).json()[0]["id"]
    target = tmp_path / "t"
    cairn.run("restore", new, "--target", str(target), check=True)
    (restored,) = target.iterdir()
    assert _files(restored / str(src).lstrip("/")) == _files(src)


def test_recover_takes_no_arguments(cairn: Cairn) -> None:  # noqa: F811
    r = cairn.run("recover", "extra")
    assert r.code == 1 and "Traceback" not in r.err
    expected = "cairn: Got unexpected extra argument (extra) (see 'cairn recover --help')"
    assert r.err.strip() == expected
