"""``cairn rewrite`` through the real command line: excludes, sharing, --forget,
--dry-run, new metadata and wrong input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture
from tests.maintenance_helpers import describe


def _blob_counts(repo: Path) -> tuple[int, int]:
    """(data blobs, tree blobs) the index lists."""
    info = describe(repo)
    counts = [0, 0]
    for pack, blobs in info["blobs"].items():
        counts[info["pack_type"][pack]] += len(blobs)
    return counts[0], counts[1]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _listing(repo: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in repo.rglob("*")
        if p.is_file()
    }


def _two_backups(c: Cairn, src: Path) -> list[str]:
    """Two snapshots of ``src`` sharing ``secret/`` (which holds the file to remove)."""
    (src / "secret").mkdir(parents=True)
    (src / "secret" / "creds.txt").write_text("hunter2\n")
    (src / "secret" / "notes.txt").write_text("keep me\n")
    (src / "other").mkdir()
    (src / "other" / "data.bin").write_bytes(os.urandom(50_000))
    ids = [c.run("backup", str(src), "--json", check=True).json_lines()[-1]["snapshot_id"]]
    (src / "top.txt").write_text("changed between the backups\n")
    ids.append(c.run("backup", str(src), "--json", check=True).json_lines()[-1]["snapshot_id"])
    return ids


def _snapshots(c: Cairn) -> dict[str, dict[str, Any]]:
    """Every snapshot, as ``cat snapshot`` shows it (with ``original``)."""
    ids = [s["id"] for s in c.run("snapshots", "--json", check=True).json()]
    return {sid: c.run("cat", "snapshot", sid, check=True).json() for sid in ids}


def test_rewrite_excludes_a_file_from_every_snapshot_and_shares_the_rest(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    old_ids = _two_backups(cairn, src)
    data_before, trees_before = _blob_counts(cairn.repo)

    r = cairn.run("rewrite", "--exclude", "creds.txt", "-v", check=True)
    assert "modified 2 snapshots" in r.out
    assert f"excluding {src}/secret/creds.txt" in r.out

    # Only the trees on the way from / to secret/ are new: one chain per snapshot,
    # except secret/ itself, the same in both after the exclusion.
    chain = len((src / "secret").parts)
    data_after, trees_after = _blob_counts(cairn.repo)
    assert (data_after, trees_after) == (data_before, trees_before + 2 * chain - 1)

    snaps = _snapshots(cairn)
    new = {sid: s for sid, s in snaps.items() if sid not in old_ids}
    assert set(old_ids) <= set(snaps) and len(new) == 2
    assert sorted(str(s["original"]) for s in new.values()) == sorted(old_ids)
    for sid, snap in new.items():
        assert snap["tags"] == ["rewrite"] and snap["paths"] == [str(src)]
        old = snaps[str(snap["original"])]
        assert snap["time"] == old["time"] and snap["hostname"] == old["hostname"]
        target = tmp_path / f"restore-{sid[:8]}"
        cairn.run("restore", sid, "--target", str(target), check=True)
        restored = _files(target / str(src).lstrip("/"))
        assert "secret/creds.txt" not in restored
        assert restored["secret/notes.txt"] == b"keep me\n"
        assert restored["other/data.bin"] == (src / "other" / "data.bin").read_bytes()
    # The totals count what is left: other/data.bin, secret/notes.txt (+ top.txt).
    totals = sorted(s["summary"]["total_files_processed"] for s in new.values())
    assert totals == [2, 3]

    # Rewriting again changes nothing: the excluded file is gone from the new ones,
    # and the originals give the same trees (already stored).
    again = cairn.run("rewrite", "--exclude", "creds.txt", *new, check=True)
    assert "no snapshots were modified" in again.out
    assert cairn.run("check", "--read-data").code == 0


def test_rewrite_forget_replaces_the_originals(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    old_ids = _two_backups(cairn, tmp_path / "src")
    r = cairn.run("rewrite", "--iexclude", "CREDS.TXT", "--forget", old_ids[0], "--json")
    assert r.code == 0, r.err
    lines = r.json_lines()
    assert lines[-1] == {"message_type": "summary", "modified": 1, "dry_run": False}
    assert lines[0]["old_id"] == old_ids[0] and lines[0]["forgotten"] is True
    assert lines[0]["excluded"] == [f"{tmp_path}/src/secret/creds.txt"]
    snaps = _snapshots(cairn)
    assert set(snaps) == {old_ids[1], lines[0]["new_id"]}
    new = snaps[lines[0]["new_id"]]
    assert new.get("tags", []) == [] and new["original"] == old_ids[0]  # no `rewrite` tag
    assert cairn.run("check").code == 0


def test_rewrite_dry_run_writes_nothing(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    _two_backups(cairn, tmp_path / "src")
    before = _listing(Path(cairn.repo))
    r = cairn.run("rewrite", "-e", "creds.txt", "--forget", "--new-host", "h", "-n", check=True)
    assert r.out.count("would save new snapshot") == 2 and "would modify 2 snapshots" in r.out
    assert _listing(Path(cairn.repo)) == before


def test_rewrite_leaves_alone_a_snapshot_where_nothing_matches(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    ids = _two_backups(cairn, tmp_path / "src")
    exclude_file = tmp_path / "excludes"
    exclude_file.write_text("# nothing in the snapshots is called this\nno-such-name\n")
    r = cairn.run("rewrite", "--exclude-file", str(exclude_file), check=True)
    assert "no snapshots were modified" in r.out
    # top.txt is only in the second snapshot: the first is left alone.
    ifile = tmp_path / "iexcludes"
    ifile.write_text("TOP.TXT\n")
    r = cairn.run("rewrite", "--iexclude-file", str(ifile), "--json", check=True)
    (changed, summary) = r.json_lines()
    assert changed["old_id"] == ids[1] and summary["modified"] == 1


def test_rewrite_new_host_and_time_keep_the_tree(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    ids = _two_backups(cairn, tmp_path / "src")
    r = cairn.run(
        "rewrite", "--new-host", "elsewhere", "--new-time", "2020-02-03T04:05:06+00:00", ids[0]
    )
    assert r.code == 0, r.err
    snaps = _snapshots(cairn)
    (new,) = [s for sid, s in snaps.items() if sid not in ids]
    assert new["hostname"] == "elsewhere" and new["time"].startswith("2020-02-03T04:05:06")
    assert new["tree"] == snaps[ids[0]]["tree"] and new["tags"] == ["rewrite"]
    # The host filter selects what to rewrite.
    r = cairn.run("rewrite", "--host", "elsewhere", "--new-host", "again", "--forget", check=True)
    assert "modified 1 snapshots" in r.out
    assert sorted(str(s["hostname"]) for s in _snapshots(cairn).values()).count("again") == 1


def test_rewrite_include_keeps_only_what_matches(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    ids = _two_backups(cairn, src)
    r = cairn.run("rewrite", "--include", "nothing-is-called-this", check=True)
    assert "no snapshots were modified" in r.out  # nothing included: left alone
    r = cairn.run("rewrite", "--iinclude", "SECRET", "--forget", ids[1], "--json", check=True)
    (line, _summary) = r.json_lines()
    target = tmp_path / "t"
    cairn.run("restore", line["new_id"], "--target", str(target), check=True)
    assert _files(target / str(src).lstrip("/")) == {
        "secret/creds.txt": b"hunter2\n",
        "secret/notes.txt": b"keep me\n",
    }
    assert not (target / str(src).lstrip("/") / "other").exists()  # emptied: dropped
    summary = cairn.run("cat", "snapshot", line["new_id"], check=True).json()["summary"]
    assert summary["total_files_processed"] == 2


def test_rewrite_wrong_input_is_one_line_and_exit_1(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    _two_backups(cairn, tmp_path / "src")
    cases = [
        (("rewrite",), "nothing to do"),
        (("rewrite", "-e", "x", "deadbeef"), "deadbeef"),
        (("rewrite", "--new-time", "yesterday-ish"), "error in time option"),
        (("rewrite", "-e", "a", "-i", "b"), "mutually exclusive"),
        (("rewrite", "--exclude-file", str(tmp_path / "missing")), "cannot read exclude file"),
    ]
    before = _listing(Path(cairn.repo))
    for args, phrase in cases:
        r = cairn.run(*args)
        assert r.code == 1, (args, r.err)
        lines = [x for x in r.err.splitlines() if x.startswith("cairn: ")]
        assert len(lines) == 1 and phrase in lines[0], (args, r.err)
        assert "Traceback" not in r.err
    assert _listing(Path(cairn.repo)) == before


def test_rewrite_stops_before_writing_when_a_tree_is_unreadable(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    ids = _two_backups(cairn, tmp_path / "src")
    info = describe(cairn.repo)
    for pack, kind in info["pack_type"].items():
        if kind == 1:  # tree packs: both snapshots lose their trees
            (Path(cairn.repo) / "data" / pack[:2] / pack).unlink()
    before = _listing(Path(cairn.repo))
    r = cairn.run("--no-cache", "rewrite", "-e", "creds.txt", "--forget")
    assert r.code == 1 and "Traceback" not in r.err
    (line,) = [x for x in r.err.splitlines() if x.startswith("cairn: ")]
    assert line.startswith(f"cairn: unable to rewrite snapshot {ids[0][:8]}: ")
    assert "nothing was written" in line
    assert _listing(Path(cairn.repo)) == before


def test_rewrite_snapshot_summary_adds_missing_totals(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    """A `recover` snapshot has no summary; -s adds the file totals, and leaves
    snapshots that have them alone."""
    src = tmp_path / "src"
    ids = _two_backups(cairn, src)
    assert "no snapshots were modified" in cairn.run("rewrite", "-s", check=True).out
    objects = {p.name: p for p in (Path(cairn.repo) / "snapshots").iterdir()}
    objects[ids[0]].unlink()
    recovered = cairn.run("recover", "--json", check=True).json_lines()[-1]["snapshot_id"]
    r = cairn.run("rewrite", "-s", "--json", check=True)
    (line, summary) = r.json_lines()
    assert line["old_id"] == recovered and summary["modified"] == 1
    totals = cairn.run("cat", "snapshot", line["new_id"], check=True).json()["summary"]
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and p.name != "top.txt")
    assert totals == {"total_files_processed": 3, "total_bytes_processed": size}
