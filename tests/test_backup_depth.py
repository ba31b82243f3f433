"""Backup and dump at any depth, and a walk that never follows a symlink swapped in.

The round trip of a source deeper than PATH_MAX through backup and restore is in
test_restore_reliability.py (test_a_tree_deeper_than_path_max_restores_completely).
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import tarfile
from pathlib import Path

import pytest

from cairn.repo.codec import decode_blob
from cairn.repo.crypto import Crypto
from cairn.repo.pack import DATA
from cairn.repo.tree import Node
from cairn.stages import cpu
from cairn.stages.backup import _Dir
from cairn.stages.chunker import open_for_backup, read_encode_small, read_problem
from cairn.stages.excludes import ExcludeRules
from cairn.stages.fsmeta import node_from_stat
from cairn.stages.sourcedirs import ReplacedError, SourceDirs, dir_problem
from cairn.stages.walk import scan_dir
from tests.cli_helpers import CAIRN, Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture

DEPTH = 45
WIDTH = 100
LARGE = os.urandom(700 * 1024)  # above the chunker's minimum: the large-file path


def _deep(root: Path) -> list[str]:
    """45 levels of 100-character directory names below ``root`` (made through
    descriptors: the bottom is deeper than PATH_MAX), with files on the way and a
    file, a large file, a symlink and xattrs at the bottom; returns the names."""
    names = [(f"{i:03d}" + "n" * WIDTH)[:WIDTH] for i in range(DEPTH)]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level, name in enumerate(names):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            if level % 15 == 14:
                _write(fd, "mid", f"level {level}".encode())
        _write(fd, "bottom.txt", b"at the bottom\n")
        _write(fd, "large.bin", LARGE)
        os.symlink("bottom.txt", "link", dir_fd=fd)
        os.setxattr(f"/proc/self/fd/{fd}/bottom.txt", "user.where", b"bottom")
    finally:
        os.close(fd)
    return names


def _write(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_dump_of_a_deep_tree_keeps_every_full_name(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    names = _deep(src)
    result = cairn.run("backup", str(src))
    assert result.code == 0, result.err

    stream = cairn.run_bytes("dump", "latest", str(src))
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r|") as tar:
        members = {}
        for info in tar:
            data = tar.extractfile(info).read() if info.isfile() else None  # type: ignore[union-attr]
            members[info.name] = (info, data)
    bottom = str(src).lstrip("/") + "/" + "/".join(names)
    assert len(bottom) > 4096
    info, data = members[bottom + "/bottom.txt"]
    assert data == b"at the bottom\n"
    assert info.mode == 0o644
    assert members[bottom + "/large.bin"][1] == LARGE
    link, _ = members[bottom + "/link"]
    assert link.issym() and link.linkname == "bottom.txt"
    assert members[bottom][0].isdir()
    middle = str(src).lstrip("/") + "/" + "/".join(names[:15]) + "/mid"
    assert members[middle][1] == b"level 14"
    # Every directory level and every file is there, nothing else.
    assert len(members) == DEPTH + DEPTH // 15 + 3

    # One deep file on its own goes to stdout as is.
    deep_file = str(src) + "/" + "/".join(names) + "/large.bin"
    assert cairn.run_bytes("dump", "latest", deep_file) == LARGE


# -- what the walk does when the source changes under it ---------------------------------


def _dir_chain(path: Path) -> _Dir:
    """The walk's directory objects from / down to ``path``, as the scan made them."""
    d = _Dir(b"/", None, None, None)
    cur = Path("/")
    for part in path.parts[1:]:
        parent_fd = os.open(cur, os.O_RDONLY | os.O_DIRECTORY)
        try:
            node = node_from_stat(part.encode(), os.lstat(part, dir_fd=parent_fd), parent_fd)
        finally:
            os.close(parent_fd)
        cur = cur / part
        d = _Dir(os.fsencode(cur), node, d, None)
    return d


def _child(parent: _Dir, name: bytes, dirs: SourceDirs) -> tuple[_Dir, Node]:
    scan = dirs.run_at(parent, scan_dir, parent.path, ExcludeRules(), None)
    node = next(n for n in scan.nodes if n.name == name)
    return _Dir(parent.path + b"/" + name, node, parent, None), node


def test_a_directory_swapped_for_a_symlink_during_the_walk_is_not_followed(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "mine").write_text("mine")
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret").write_text("not to be backed up")
    dirs = SourceDirs()
    try:
        top = _dir_chain(src)
        sub, _ = _child(top, b"sub", dirs)
        # The scan of src saw a directory "sub"; before it is scanned itself, it
        # becomes a symlink to a directory outside the source.
        (src / "sub").rename(src / "sub.old")
        (src / "sub").symlink_to(secret)
        with pytest.raises(OSError) as err:
            dirs.run_at(sub, scan_dir, sub.path, ExcludeRules(), None)
        assert "not followed" in dir_problem(err.value)
        # Swapped for another real directory: caught by its inode.
        (src / "sub").unlink()
        (src / "sub").mkdir()
        (src / "sub" / "other").write_text("other")
        with pytest.raises(ReplacedError):
            dirs.run_at(sub, scan_dir, sub.path, ExcludeRules(), None)
        # Put back (a rename keeps the inode): scanned as before.
        (src / "sub").rename(src / "sub.new")
        (src / "sub.old").rename(src / "sub")
        scan = dirs.run_at(sub, scan_dir, sub.path, ExcludeRules(), None)
        assert [n.name for n in scan.nodes] == [b"mine"]
    finally:
        dirs.close()


def test_a_file_swapped_for_a_symlink_before_it_is_read_is_not_followed(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    (src / "b").write_text("b")
    (tmp_path / "secret").write_text("not to be backed up")
    dirs = SourceDirs()
    crypto = Crypto(os.urandom(32), os.urandom(32), 7)
    try:
        top = _dir_chain(src)
        (src / "b").unlink()
        (src / "b").symlink_to(tmp_path / "secret")
        view = memoryview(bytearray(1 << 20))
        fd = dirs.acquire(top)
        try:
            # As a thread of the backup runs it, and as a worker does: through
            # /proc/<pid>/fd of the descriptor the walk holds.
            here = read_encode_small(crypto, [fd], [(0, b"a", b""), (0, b"b", b"")], view, 4096, 3)
            cpu.init_worker(crypto)
            there = cpu.backup_small_files(
                os.getpid(), [fd], [(0, b"a", b""), (0, b"b", b"")], view, 4096, 3
            )
        finally:
            dirs.release(top)
        for results in (here, there):
            first = results[0]
            assert isinstance(first, tuple)
            offset, stored, length, blob_id, _, size, _ = first
            assert (length, size) == (1, 1)
            assert blob_id == crypto.blob_id(b"a")
            assert decode_blob(crypto, DATA, blob_id, view[offset : offset + stored]) == b"a"
            assert results[1] == "replaced by a symlink during the backup; not followed"
        with pytest.raises(OSError) as err:
            dirs.run_at(top, open_for_backup, b"b")
        assert "not followed" in read_problem(err.value)
    finally:
        dirs.close()


def test_open_directory_descriptors_stay_bounded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        for j in range(10):
            (src / f"d{i}" / f"e{j}").mkdir(parents=True)
    dirs = SourceDirs(size=16)
    try:
        top = _dir_chain(src)
        seen = 0
        for i in range(30):
            d, _ = _child(top, f"d{i}".encode(), dirs)
            for j in range(10):
                e, _ = _child(d, f"e{j}".encode(), dirs)
                dirs.run_at(e, scan_dir, e.path, ExcludeRules(), None)
                seen += 1
                assert len(dirs) <= 16
            dirs.forget(d)
        assert seen == 300
        # Pinned descriptors are never closed under their user, however many.
        pinned = [_child(top, f"d{i}".encode(), dirs)[0] for i in range(30)]
        fds = [dirs.acquire(d) for d in pinned]
        assert len(set(fds)) == 30
        assert all(os.fstat(fd) for fd in fds)
        for d in pinned:
            dirs.release(d)
        assert len(dirs) <= 16
    finally:
        dirs.close()
    assert len(dirs) == 0


def test_a_wide_tree_backs_up_under_a_low_descriptor_limit(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Directory descriptors are cached, not kept: 320 directories back up with
    ``ulimit -n 48`` (the path-based walk needed about 24; the cache shrinks to a
    sixteenth of the limit and gives back idle descriptors on EMFILE)."""
    src = tmp_path / "src"
    for i in range(40):
        for j in range(8):
            d = src / f"d{i}" / f"e{j}"
            d.mkdir(parents=True)
            (d / "f").write_text(f"{i} {j}")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    argv = [*CAIRN, "-r", str(cairn.repo), "--password-file", str(cairn.password_file)]
    argv += ["--insecure-kdf", "backup", "--json", str(src)]
    proc = subprocess.run(
        argv, env=cairn.env, capture_output=True, preexec_fn=low_limit, timeout=600
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["total_files_processed"] == 320
    assert summary["dirs_new"] >= 1 + 40 + 320


def _all_xattrs(path: Path) -> dict[str, bytes]:
    return {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path)}


def test_xattrs_survive_incremental_backups(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A regular file's xattrs are read through the descriptor its content is read
    from, or taken from the parent snapshot when the file is unchanged; a change of
    xattrs alone (it changes the ctime) is picked up."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "small").write_bytes(b"small")
    (src / "large").write_bytes(LARGE)
    (src / "same").write_bytes(b"unchanged between the backups")
    os.mkfifo(src / "fifo")
    for name, value in (("small", b"s1"), ("large", b"l1"), ("same", b"k"), ("d", b"dir")):
        os.setxattr(src / name, "user.v", value)
    os.setxattr(src / "fifo", "trusted.v", b"fifo")  # user.* is refused on a FIFO
    cairn.run("backup", str(src), check=True)

    os.setxattr(src / "small", "user.v", b"s2")  # content and mtime unchanged
    os.setxattr(src / "large", "user.extra", b"l2")
    result = cairn.run("backup", "--json", str(src))
    assert result.code == 0, result.err
    summary = result.json_lines()[-1]
    assert summary["files_unmodified"] == 1 and summary["files_changed"] == 2, summary

    target = tmp_path / "t"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    out = target / str(src).lstrip("/")
    assert _all_xattrs(out / "small") == {"user.v": b"s2"}
    assert _all_xattrs(out / "large") == {"user.v": b"l1", "user.extra": b"l2"}
    assert _all_xattrs(out / "same") == {"user.v": b"k"}
    assert _all_xattrs(out / "d") == {"user.v": b"dir"}
    assert _all_xattrs(out / "fifo") == {"trusted.v": b"fifo"}
    assert (out / "large").read_bytes() == LARGE


def test_a_symlink_above_a_given_path_is_followed_not_dropped(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``/home -> /data/home`` and ``backup /home/me``: the kernel follows the symlink
    for the path, so must the backup (it used to save an empty snapshot, exit 0)."""
    real = tmp_path / "real" / "docs"
    real.mkdir(parents=True)
    (real / "f").write_bytes(b"data\n")
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "plain").write_bytes(b"not a directory\n")
    given = tmp_path / "link" / "docs"
    cairn.run("backup", str(given), check=True)
    listed = cairn.run("ls", "latest", check=True).out.splitlines()
    assert str(given / "f") in listed, listed
    target = tmp_path / "restored"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    assert (target / str(given / "f").lstrip("/")).read_bytes() == b"data\n"
    # A component that is no directory at all is a warning (exit 3), never silence.
    bad = cairn.run("backup", str(given), str(tmp_path / "plain" / "x"))
    assert bad.code in (1, 3), bad.err
    assert "plain" in bad.err, bad.err
