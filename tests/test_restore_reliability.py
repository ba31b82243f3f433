"""Restore on a bad day, through the real CLI: filters with ``--delete``, corrupt data
and trees, entries that cannot be restored, trees deeper than PATH_MAX, a full disk.

The rule under test everywhere: one entry that cannot be restored is one line naming
its path and cause; everything else is restored; exit code 1 with a summary; nothing
is left looking restored that is not.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import Cairn, Result
from tests.conftest_cli import cairn  # noqa: F401 - fixture

MiB = 1024 * 1024


def _summary(result: Result) -> dict[str, Any]:
    summary: dict[str, Any] = result.json_lines()[-1]
    assert summary["message_type"] == "summary", result.out
    return summary


def _errors(result: Result) -> dict[str, str]:
    """path → message of the JSON error lines a ``--json`` restore printed."""
    out = {}
    for line in result.err.splitlines():
        if line.startswith("{"):
            msg = json.loads(line)
            if msg.get("message_type") == "error":
                out[msg["item"]] = msg["error"]["message"]
    return out


def _under(target: Path, src: Path) -> Path:
    return target / str(src).lstrip("/")


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


# -- --delete within the filters ---------------------------------------------------------


def test_delete_with_include_touches_only_what_the_filters_select(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "music").mkdir()
    (src / "docs" / "a.txt").write_text("a")
    (src / "music" / "song").write_text("la")
    cairn.run("backup", str(src), check=True)
    target = tmp_path / "t"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    base = _under(target, src)
    # Local changes: unrelated files beside and outside the restored subdirectory,
    # and stale files inside it.
    (base / "music" / "new-song").write_text("mine")
    (base / "unrelated.txt").write_text("mine")
    (target / "elsewhere").mkdir()
    (target / "elsewhere" / "x").write_text("mine")
    (base / "docs" / "stale.txt").write_text("old")
    (base / "docs" / "stale-dir" / "deeper").mkdir(parents=True)
    (base / "docs" / "stale-dir" / "deeper" / "f").write_text("old")

    args = ("restore", "latest", "--target", str(target), "--include", "*/docs", "--delete")
    dry = cairn.run(*args, "--dry-run", "-v")
    assert dry.code == 0, dry.err
    assert "would delete 4 entries" in dry.out
    would = sorted(
        line.split(" ", 2)[2] for line in dry.out.splitlines() if line.startswith("would delete /")
    )
    assert would == sorted(
        str(base / "docs" / p)
        for p in ("stale.txt", "stale-dir", "stale-dir/deeper", "stale-dir/deeper/f")
    )
    assert (base / "docs" / "stale.txt").exists(), "a dry run deleted something"

    real = cairn.run(*args, "--json")
    assert real.code == 0, real.err
    assert _summary(real)["deleted"] == 4
    assert not (base / "docs" / "stale.txt").exists()
    assert not (base / "docs" / "stale-dir").exists()
    assert (base / "docs" / "a.txt").read_text() == "a"
    # Outside what --include selects, nothing is deleted.
    assert (base / "music" / "new-song").read_text() == "mine"
    assert (base / "unrelated.txt").read_text() == "mine"
    assert (target / "elsewhere" / "x").read_text() == "mine"


def test_delete_with_exclude_and_subpath(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "a.txt").write_text("a")
    cairn.run("backup", str(src), check=True)
    target = tmp_path / "t"
    target.mkdir()
    (target / "extra.txt").write_text("x")
    (target / "notes.log").write_text("excluded: never deleted")
    # SNAPSHOT:PATH maps the subtree onto the target root: extras there are deleted,
    # excluded ones are not.
    result = cairn.run(
        "restore",
        f"latest:{src}",
        "--target",
        str(target),
        "--delete",
        "--exclude",
        "*.log",
        "--json",
    )
    assert result.code == 0, result.err
    assert _summary(result)["deleted"] == 1
    assert sorted(p.name for p in target.iterdir()) == ["keep", "notes.log"]


# -- a repository to damage ---------------------------------------------------------------


def _cat(c: Cairn, *args: str) -> Any:
    return json.loads(c.run("cat", *args, check=True).out)


def _blobs(c: Cairn) -> dict[str, tuple[str, int, int]]:
    """blob ID → (pack ID, offset, length), from every index file."""
    out = {}
    for index in (Path(str(c.repo)) / "index").iterdir():
        for pack in _cat(c, "index", index.name)["packs"]:
            for b in pack["blobs"]:
                out[b["id"]] = (pack["id"], b["offset"], b["length"])
    return out


def _flip(c: Cairn, blob: tuple[str, int, int]) -> None:
    """Flip one byte in the middle of a stored blob, in its pack file."""
    pack_id, offset, length = blob
    pack = Path(str(c.repo)) / "data" / pack_id[:2] / pack_id
    os.chmod(pack, 0o644)
    with open(pack, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([byte[0] ^ 0x55]))


def _nodes(c: Cairn, snapshot_id: str, path: Path) -> dict[str, Any]:
    """The tree nodes of directory ``path`` in a snapshot, by name."""
    tree = _cat(c, "snapshot", snapshot_id)["tree"]
    for part in path.parts[1:]:
        nodes = {n["name"]: n for n in _cat(c, "tree", tree)["nodes"]}
        tree = nodes[part]["subtree"]
    return {n["name"]: n for n in _cat(c, "tree", tree)["nodes"]}


def _backup(c: Cairn, *args: str) -> str:
    result = c.run("backup", "--json", *args)
    assert result.code == 0, result.err
    snapshot_id: str = _summary(result)["snapshot_id"]
    return snapshot_id


def test_a_corrupt_data_blob_fails_only_the_files_that_need_it(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = {f"f{i:02d}": os.urandom(3000 + i) for i in range(40)}  # one blob each
    data["large"] = os.urandom(5 * MiB)  # several blobs
    for name, content in data.items():
        (src / name).write_bytes(content)
    sid = _backup(cairn, str(src))
    nodes = _nodes(cairn, sid, src)
    blobs = _blobs(cairn)
    small_victim = blobs[nodes["f07"]["content"][0]]
    large_victim = blobs[nodes["large"]["content"][1]]
    # The small files share packs with each other: one bad blob among good ones.
    assert sum(1 for n in nodes.values() if blobs[n["content"][0]][0] == small_victim[0]) > 5
    _flip(cairn, small_victim)
    _flip(cairn, large_victim)

    target = tmp_path / "t"
    result = cairn.run("restore", "latest", "--target", str(target), "--json")
    assert result.code == 1, result.err
    assert "internal error" not in result.err
    errors = _errors(result)
    base = _under(target, src)
    assert set(errors) == {str(base / "f07"), str(base / "large")}
    for message in errors.values():
        assert "corrupted" in message and "\n" not in message
    assert _summary(result)["errors"] == 2
    # Everything else is restored intact; the two broken files are not there at all
    # (not full-size with holes, not mode 0600 pretending to be restored).
    got = _files(base)
    assert set(got) == set(data) - {"f07", "large"}
    for name, content in got.items():
        assert content == data[name], name
    # Plain text: one "warning: PATH: ..." line each and a summary that counts them.
    text = cairn.run("restore", "latest", "--target", str(tmp_path / "t2"))
    assert text.code == 1
    warnings = [line for line in text.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, text.err
    assert "2 entries could not be restored" in text.out
    # ... and nothing else names them: the console log does not repeat each one.
    assert sum("f07" in line for line in text.err.splitlines()) == 1, text.err
    # A log for machines keeps the events.
    t3 = str(tmp_path / "t3")
    logged = cairn.run("restore", "latest", "--target", t3, "--log-format", "json")
    events = [json.loads(line) for line in logged.err.splitlines() if line.startswith("{")]
    assert sum(e.get("event") == "restore.file_error" for e in events) == 2, logged.err


def test_entries_that_cannot_be_restored_are_reported_and_the_rest_restored(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"f{i}").write_text(f"file {i}")
    (src / "blocked-file").write_text("small file")
    (src / "blocked-large").write_bytes(os.urandom(3 * MiB))
    (src / "blocked-link").symlink_to("sub/f1")
    (src / "hard1").write_text("hardlinked")
    os.link(src / "hard1", src / "blocked-hard2")
    _backup(cairn, str(src))
    target = tmp_path / "t"
    base = _under(target, src)
    # Non-empty directories stand where the snapshot has a file, a large file, a
    # symlink and a hardlink.
    for name in ("blocked-file", "blocked-large", "blocked-link", "blocked-hard2"):
        (base / name / "inside").mkdir(parents=True)
        (base / name / "inside" / "keep").write_text("mine")

    result = cairn.run("restore", "latest", "--target", str(target), "--json")
    assert result.code == 1, result.err
    errors = _errors(result)
    assert set(errors) == {
        str(base / n) for n in ("blocked-file", "blocked-large", "blocked-link", "blocked-hard2")
    }
    assert all("directory" in m.lower() for m in errors.values()), errors
    assert _summary(result)["errors"] == 4
    for i in range(20):
        assert (base / "sub" / f"f{i}").read_text() == f"file {i}"
    assert (base / "hard1").read_text() == "hardlinked"
    assert (base / "blocked-file" / "inside" / "keep").read_text() == "mine"


def _make_deep(root: Path, depth: int, width: int) -> list[bytes]:
    """Create ``depth`` nested directories of ``width``-character names below
    ``root`` (deeper than PATH_MAX, so only relative to descriptors); returns the
    names from the top."""
    names = [(f"{i:03d}" + "d" * width)[:width].encode() for i in range(depth)]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level, name in enumerate(names):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            if level % 10 == 9 or level == depth - 1:
                _write_at(fd, b"file", f"level {level}".encode())
        _write_at(fd, b"large", _LARGE)
        os.symlink(b"file", b"link", dir_fd=fd)
        os.link(b"file", b"hard", src_dir_fd=fd, dst_dir_fd=fd)
        os.mkfifo(b"fifo", dir_fd=fd)
        here = f"/proc/self/fd/{fd}"
        os.setxattr(f"{here}/file", "user.deep", b"bottom file")
        os.setxattr(here, "user.deep", b"bottom dir")
    finally:
        os.close(fd)
    return names


_LARGE = os.urandom(3 * MiB)


def _write_at(dir_fd: int, name: bytes, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _xattrs(dir_fd: int, name: str) -> dict[str, bytes]:
    path = f"/proc/self/fd/{dir_fd}/{name}"
    return {k: os.getxattr(path, k) for k in os.listxattr(path)}


def _tree_at(path: Path) -> dict[str, Any]:
    """Everything below ``path`` (any depth): relative path → kind, content and
    metadata (mode, mtime, link count, xattrs)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(path):
        rel = os.path.relpath(dirpath, path)
        for name in dirnames:
            st = os.lstat(name, dir_fd=dir_fd)
            meta = (st.st_mode & 0o7777, st.st_mtime_ns, _xattrs(dir_fd, name))
            out[os.path.join(rel, name)] = ("dir", *meta)
        for name in filenames:
            st = os.lstat(name, dir_fd=dir_fd)
            key = os.path.join(rel, name)
            if stat.S_ISLNK(st.st_mode):
                out[key] = ("link", os.readlink(name, dir_fd=dir_fd))
            elif stat.S_ISFIFO(st.st_mode):
                out[key] = ("fifo", st.st_mode & 0o7777, st.st_mtime_ns)
            else:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
                with open(fd, "rb") as f:
                    meta = (st.st_mode & 0o7777, st.st_nlink, st.st_mtime_ns)
                    out[key] = ("file", f.read(), *meta, _xattrs(dir_fd, name))
    return out


def test_a_tree_deeper_than_path_max_restores_completely(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # 45 levels of 100-character names: the source itself is deeper than PATH_MAX
    # (4,096), and so is every path of the target it is restored into.
    depth = 45
    names = _make_deep(src, depth=depth, width=100)
    assert len(str(src)) + sum(len(n) + 1 for n in names) > 4096
    result = cairn.run("backup", "--json", str(src))
    assert result.code == 0, result.err
    # a file every 10 levels and at the bottom, plus "large" and "hard" there
    assert _summary(result)["total_files_processed"] == depth // 10 + 3
    expected = _tree_at(src)
    assert len(expected) >= depth + 5 + 4
    bottom = os.path.join(*(n.decode() for n in names))
    assert expected[f"{bottom}/file"][-1] == {"user.deep": b"bottom file"}
    assert expected[bottom][-1] == {"user.deep": b"bottom dir"}
    deep_target = tmp_path.joinpath(*(c * 250 for c in "xyz"))
    assert len(str(_under(deep_target, src))) + sum(len(n) + 1 for n in names) > 4096

    for args in ((), ("--verify",)):
        target = deep_target / f"t{len(args)}"
        result = cairn.run("restore", "latest", "--target", str(target), "--json", *args)
        assert result.code == 0, result.err
        assert _tree_at(_under(target, src)) == expected
        if args:
            assert _summary(result)["verified"] >= 5
    # Restoring again over the complete tree finds everything already in place.
    again = cairn.run("restore", "latest", "--target", str(deep_target / "t0"), "--json")
    assert again.code == 0, again.err
    assert _summary(again)["files_restored"] == 0


@pytest.mark.parametrize("cache", ["no-cache", "fresh-cache"])
def test_a_damaged_tree_fails_only_its_subtree(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
    cache: str,
) -> None:
    src = tmp_path / "src"
    for d in ("a", "b", "c"):
        (src / d / "deeper").mkdir(parents=True)
        for i in range(10):
            (src / d / f"f{i}").write_text(f"{d} {i}")
        (src / d / "deeper" / "g").write_text(f"{d} deeper")
    sid = _backup(cairn, str(src))
    bad_tree = _nodes(cairn, sid, src)["b"]["subtree"]
    _flip(cairn, _blobs(cairn)[bad_tree])

    target = tmp_path / "t"
    if cache == "no-cache":
        result = cairn.run("--no-cache", "restore", "latest", "--target", str(target), "--json")
    else:
        # A new machine: the cache fetches whole tree packs, and this one fails its
        # storage hash; the intact trees in it must still be read.
        shutil.rmtree(Path(cairn.password_file).parent / "xdg-cache", ignore_errors=True)
        result = cairn.run("restore", "latest", "--target", str(target), "--json")
    assert result.code == 1, result.err
    base = _under(target, src)
    errors = _errors(result)
    assert list(errors) == [str(base / "b")], errors
    assert "corrupted" in errors[str(base / "b")]
    assert _summary(result)["errors"] == 1
    assert not (base / "b").exists()
    for d in ("a", "c"):
        assert (base / d / "deeper" / "g").read_text() == f"{d} deeper"
        assert len(list((base / d).iterdir())) == 11


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs (CI runs as root)")
def test_a_full_target_disk_names_the_paths_and_leaves_nothing_half_restored(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    data = {f"d/f{i:02d}": os.urandom(50 * 1024 + i) for i in range(30)}
    data["large"] = os.urandom(3 * MiB)
    for name, content in data.items():
        (src / name).write_bytes(content)
    _backup(cairn, str(src))
    target = tmp_path / "small"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(target)], check=True)
    try:
        result = cairn.run("restore", "latest", "--target", str(target), "--json")
        got = _files(_under(target, src))
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert result.code == 1, result.err
    assert "internal error" not in result.err
    errors = _errors(result)
    assert errors, result.err
    assert all(m == "No space left on device" for m in errors.values()), errors
    base = _under(target, src)
    # Whatever is there is complete; whatever is missing has its line.
    for name, content in got.items():
        assert content == data[name], f"{name} is there but not restored"
    missing = set(data) - set(got)
    assert missing
    assert {str(base / name) for name in missing} <= set(errors)
    assert _summary(result)["errors"] == len(errors)


def test_directory_descriptors_stay_right_when_the_cache_evicts(tmp_path: Path) -> None:
    from cairn.stages.dirfds import DirFds, open_dir_path

    rels = []
    for a in range(3):
        for b in range(3):
            (tmp_path / f"a{a}" / f"b{b}" / "c").mkdir(parents=True)
            rels += [f"/a{a}", f"/a{a}/b{b}", f"/a{a}/b{b}/c"]
    (tmp_path / "link").symlink_to(tmp_path / "a0")
    open_before = len(os.listdir("/proc/self/fd"))
    dirs = DirFds(open_dir_path(os.fsencode(tmp_path)), size=2)
    try:
        for rel in rels + rels[::-1] + rels[::3]:
            fd = dirs.get(rel.encode())
            assert os.fstat(fd).st_ino == (tmp_path / rel.lstrip("/")).stat().st_ino, rel
        with pytest.raises(OSError):  # a symlink below the root is never followed
            dirs.get(b"/link/b0")
        dirs.forget(b"/a1")
        assert os.fstat(dirs.get(b"/a1/b2")).st_ino == (tmp_path / "a1" / "b2").stat().st_ino
    finally:
        dirs.close()
    assert len(os.listdir("/proc/self/fd")) == open_before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for chattr +i (CI runs as root)")
def test_metadata_that_cannot_be_set_is_one_line_per_entry(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / name).write_text(name)
        os.chmod(src / name, 0o640)
    _backup(cairn, str(src))
    target = tmp_path / "t"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    base = _under(target, src)
    os.chmod(base / "b", 0o600)
    subprocess.run(["chattr", "+i", str(base / "b")], check=True)
    try:
        result = cairn.run(
            "restore", "latest", "--target", str(target), "--overwrite", "never", "--json"
        )
    finally:
        subprocess.run(["chattr", "-i", str(base / "b")], check=True)
    assert result.code == 1, result.err
    errors = _errors(result)
    assert list(errors) == [str(base / "b")]
    assert "chmod: Operation not permitted" in errors[str(base / "b")]
    assert "utime: Operation not permitted" in errors[str(base / "b")]
    assert _summary(result)["errors"] == 1
    assert [(base / n).stat().st_mode & 0o777 for n in "ac"] == [0o640, 0o640]


def test_a_restore_does_not_download_what_lies_between_the_blobs_it_needs(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Blobs of files not restored that lie between needed ones in a pack are not
    downloaded when they are larger than restore's merge gap (256 KiB): with the
    1 MiB gap of ``check``, every other file of a pack cost the whole pack."""
    src = tmp_path / "src"
    src.mkdir()
    size = 300 * 1024  # one blob each (below the chunker's minimum), incompressible
    for i in range(12):
        # Names sort keep, skip, keep ...: the backup packs them in that order.
        (src / f"{i:02d}-{'keep' if i % 2 == 0 else 'skip'}").write_bytes(os.urandom(size))
    cairn.run("backup", str(src), check=True)
    target = tmp_path / "t"
    r = cairn.run(
        "--json", "restore", "latest", "--target", str(target), "--include", "*-keep", check=True
    )
    summary = r.json_lines()[-1]
    assert summary["files_restored"] == 6
    downloaded = next(s["bytes"] for s in summary["stages"] if s["stage"] == "download")
    assert 6 * size <= downloaded < 6 * (size + 1024)
