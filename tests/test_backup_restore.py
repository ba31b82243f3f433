"""Backup and restore end to end through the real ``cairn`` command."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture
from tests.treeutil import make_everything_tree, snapshot_of


def _restore(c: Cairn, target: Path, *args: str) -> None:
    c.run("restore", "latest", "--target", str(target), *args, check=True)


def test_round_trip_every_kind_of_entry(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    make_everything_tree(src)
    before = snapshot_of(src)
    result = cairn.run("backup", str(src), "--json", check=True)
    summary = result.json_lines()[-1]
    assert summary["message_type"] == "summary"
    assert summary["files_new"] >= 10 and summary["errors"] == 0
    target = tmp_path / "restore"
    _restore(cairn, target)
    restored = target / str(src).lstrip("/")
    after = snapshot_of(restored)
    assert after.keys() == before.keys()
    for rel, meta in before.items():
        assert after[rel] == meta, rel
    # Sparse input restores with --sparse to a file that allocates (almost) nothing.
    target2 = tmp_path / "restore-sparse"
    _restore(cairn, target2, "--sparse")
    sparse = target2 / str(src).lstrip("/") / "sparse.img"
    assert sparse.stat().st_size == 20 * 1024 * 1024 + 3
    assert sparse.stat().st_blocks * 512 < 1024 * 1024


def test_second_backup_reads_nothing_and_adds_no_data(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    make_everything_tree(src)
    first = cairn.run("backup", str(src), "--json", check=True).json_lines()[-1]
    second = cairn.run("backup", str(src), "--json", check=True).json_lines()[-1]
    assert second["parent"] == first["snapshot_id"]
    assert second["bytes_read"] == 0
    assert second["files_new"] == 0 and second["files_changed"] == 0
    assert second["data_blobs"] == 0 and second["data_added"] == 0
    # --force reads everything again but still stores no new data.
    forced = cairn.run("backup", str(src), "--force", "--json", check=True).json_lines()[-1]
    assert forced["bytes_read"] > 20 * 1024 * 1024
    assert forced["data_blobs"] == 0


def test_dedup_insertion_adds_about_one_chunk(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(32 * 1024 * 1024)
    (src / "large").write_bytes(data)
    (src / "copy").write_bytes(data)
    first = cairn.run("backup", str(src), "--json", check=True).json_lines()[-1]
    assert first["data_added"] == len(data)  # the copy deduplicated within the run
    (src / "large").write_bytes(data[:10_000_000] + b"X" + data[10_000_000:])
    second = cairn.run("backup", str(src), "--json", check=True).json_lines()[-1]
    assert second["files_changed"] == 1
    assert 1 <= second["data_blobs"] <= 3
    assert second["data_added"] < 8 * 1024 * 1024 * 2


def test_unreadable_input_gives_exit_3_and_a_snapshot(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("fine")
    missing = tmp_path / "does-not-exist"
    paths = [str(src), str(missing)]
    locked = src / "locked.txt"
    locked.write_text("nope")
    os.chmod(locked, 0)
    try:
        result = cairn.run("backup", *paths, "--json")
    finally:
        os.chmod(locked, 0o600)
    assert result.code == 3, result.err
    assert "does-not-exist" in result.err
    if os.geteuid() != 0:  # root reads mode-000 files; only others get the warning
        assert "locked.txt" in result.err
    summary = result.json_lines()[-1]
    assert summary["snapshot_id"] and summary["errors"] >= 1
    target = tmp_path / "restore"
    _restore(cairn, target)
    assert (target / str(src).lstrip("/") / "ok.txt").read_text() == "fine"


def test_restore_resumes_and_overwrite_modes(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(100_000 + i))
    cairn.run("backup", str(src), check=True)
    target = tmp_path / "restore"
    _restore(cairn, target)
    restored = target / str(src).lstrip("/")
    # Damage one file and delete another: the rerun fixes exactly those.
    (restored / "f3").write_bytes(b"damaged")
    (restored / "f4").unlink()
    (restored / "extra").write_text("not in the snapshot")
    out = cairn.run("restore", "latest", "--target", str(target), "--json", check=True)
    summary = out.json_lines()[-1]
    assert summary["files_restored"] == 2
    assert summary["files_skipped"] == 18
    assert (restored / "f3").read_bytes() == (src / "f3").read_bytes()
    assert (restored / "extra").exists()
    out = cairn.run(
        "restore", "latest", "--target", str(target), "--delete", "--verify", "--json", check=True
    )
    summary = out.json_lines()[-1]
    assert summary["deleted"] == 1 and summary["verified"] == 20
    assert not (restored / "extra").exists()
    (restored / "f5").write_bytes(b"local change")
    cairn.run("restore", "latest", "--target", str(target), "--overwrite", "never", check=True)
    assert (restored / "f5").read_bytes() == b"local change"


def test_restore_subpath_include_exclude(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "skip").mkdir()
    (src / "keep" / "a.txt").write_text("a")
    (src / "keep" / "b.log").write_text("b")
    (src / "skip" / "c.txt").write_text("c")
    cairn.run("backup", str(src), check=True)
    t1 = tmp_path / "t1"
    cairn.run("restore", f"latest:{src}/keep", "--target", str(t1), check=True)
    assert sorted(p.name for p in t1.iterdir()) == ["a.txt", "b.log"]
    t2 = tmp_path / "t2"
    cairn.run("restore", "latest", "--target", str(t2), "--exclude", "*.log", check=True)
    base = t2 / str(src).lstrip("/")
    assert (base / "keep" / "a.txt").exists() and not (base / "keep" / "b.log").exists()
    t3 = tmp_path / "t3"
    cairn.run("restore", "latest", "--target", str(t3), "--include", "*/skip", check=True)
    base = t3 / str(src).lstrip("/")
    assert (base / "skip" / "c.txt").exists() and not (base / "keep" / "a.txt").exists()


def test_backup_excludes_and_stdin(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    (src / "cache").mkdir(parents=True)
    (src / "cache" / "CACHEDIR.TAG").write_text("x")
    (src / "cache" / "junk").write_text("junk")
    (src / "a.tmp").write_text("tmp")
    (src / "big").write_bytes(b"x" * 5000)
    (src / "keep").write_text("keep")
    excl = tmp_path / "excludes"
    excl.write_text("# comment\n*.tmp\n")
    cairn.run(
        "backup",
        str(src),
        "--exclude-file",
        str(excl),
        "--exclude-if-present",
        "CACHEDIR.TAG",
        "--exclude-larger-than",
        "4K",
        check=True,
    )
    target = tmp_path / "t"
    _restore(cairn, target)
    base = target / str(src).lstrip("/")
    assert sorted(p.name for p in base.iterdir()) == ["cache", "keep"]
    # As restic's: the tag file stays, the rest of the directory goes.
    assert [p.name for p in (base / "cache").iterdir()] == ["CACHEDIR.TAG"]
    payload = os.urandom(3_000_000)
    cairn.run(
        "backup",
        "--stdin",
        "--stdin-filename",
        "dump.sql",
        "--tag",
        "db",
        input=payload,
        check=True,
    )
    t2 = tmp_path / "t2"
    cairn.run("restore", "latest", "--tag", "db", "--target", str(t2), check=True)
    assert (t2 / "dump.sql").read_bytes() == payload


def test_global_flags_after_command_and_env(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    r = cairn.run(
        "backup",
        str(src),
        "-r",
        str(cairn.repo),
        "--password-file",
        str(cairn.password_file),
        base=False,
    )
    assert r.code == 0, r.err
    r = cairn.run(
        "snapshots",
        "--json",
        base=False,
        env={"CAIRN_REPOSITORY": str(cairn.repo), "CAIRN_PASSWORD": "correct horse battery staple"},
    )
    assert r.code == 0, r.err
    assert len(r.json()) == 1


@pytest.mark.skipif(not shutil.which("diff"), reason="needs diff")
def test_file_types_and_modes_survive(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    make_everything_tree(src)
    cairn.run("backup", str(src), check=True)
    target = tmp_path / "r"
    _restore(cairn, target)
    base = target / str(src).lstrip("/")
    assert stat.S_ISFIFO(os.lstat(base / "fifo").st_mode)
    assert os.lstat(base / "setuid").st_mode & stat.S_ISUID
    assert (base / "hardlink.txt").stat().st_ino == (base / "small.txt").stat().st_ino
    assert os.readlink(base / "link-abs") == "/nonexistent/target"
