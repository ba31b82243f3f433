"""Backup and restore when things go wrong, and the backup options, through the real CLI.

Interrupts, files changing or vanishing under the reader, lost packs, hostile
restore targets; then ``--files-from``, ``--dry-run``, ``--one-file-system``,
excludes, tags/host/parent/force, a real system directory and deduplication.

Some tests need root (mounts, ``chattr``); CI runs the suite as root.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import CAIRN, Cairn, Result
from tests.conftest_cli import cairn  # noqa: F401 - fixture
from tests.treeutil import snapshot_of

MiB = 1024 * 1024
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (CI runs as root)")


# -- helpers --------------------------------------------------------------------------


def _summary(result: Result) -> dict[str, Any]:
    summary: dict[str, Any] = result.json_lines()[-1]
    assert summary["message_type"] == "summary", result.out
    return summary


def _backup(c: Cairn, *args: str, code: int = 0) -> dict[str, Any]:
    result = c.run("backup", *args, "--json")
    assert result.code == code, f"exit {result.code}: {result.err}"
    return _summary(result)


def _errors(result: Result) -> list[dict[str, Any]]:
    """The JSON error lines a ``--json`` backup or restore printed on stderr."""
    out = []
    for line in result.err.splitlines():
        if line.startswith("{"):
            msg = json.loads(line)
            if msg.get("message_type") == "error":
                out.append(msg)
    return out


def _under(target: Path, src: Path) -> Path:
    """Where ``src`` lands inside a restore target."""
    return target / str(src).lstrip("/")


def _restore(c: Cairn, target: Path, *args: str, snapshot: str = "latest") -> Result:
    return c.run("restore", snapshot, "--target", str(target), *args)


def _files(root: Path) -> dict[bytes, bytes]:
    """Relative path -> content of every regular file below ``root``."""
    base = os.fsencode(str(root))
    out = {}
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, base)] = f.read()
    return out


def _repo_state(repo: Path) -> dict[str, tuple[int, int]]:
    """Every file in the repository with its size and mtime."""
    out = {}
    for path in sorted(repo.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(repo))] = (st.st_size, st.st_mtime_ns)
    return out


def _repo(c: Cairn) -> Path:
    return Path(c.repo)


def _packs(repo: Path) -> list[Path]:
    return [p for p in (repo / "data").glob("*/*") if not p.name.startswith(".")]


def _popen(c: Cairn, args: list[str], out: Path) -> subprocess.Popen[bytes]:
    """Start ``cairn`` in its own session (so its process group is its PID)."""
    cmd = [
        *CAIRN,
        "-r",
        str(c.repo),
        "--password-file",
        str(c.password_file),
        "--insecure-kdf",
        *c.global_args,
        *args,
    ]
    with open(out.with_suffix(".out"), "wb") as o, open(out.with_suffix(".err"), "wb") as e:
        return subprocess.Popen(cmd, env=c.env, stdout=o, stderr=e, start_new_session=True)


def _finish(proc: subprocess.Popen[bytes], out: Path, timeout: float = 300) -> Result:
    code = proc.wait(timeout=timeout)
    return Result(
        code,
        out.with_suffix(".out").read_text(errors="replace"),
        out.with_suffix(".err").read_text(errors="replace"),
    )


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` (any of its threads) has ``path`` open."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    want = str(path)
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") == want:
                return True
        except OSError:
            continue
    return False


def _wait_until_open(proc: subprocess.Popen[bytes], path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not _has_open(proc.pid, path):
        if proc.poll() is not None:
            pytest.fail(f"cairn exited ({proc.returncode}) before it opened {path}")
        if time.monotonic() > deadline:
            pytest.fail(f"cairn never opened {path}")
        time.sleep(0.001)


def _group_members(pgid: int) -> list[str]:
    """``pid command`` of every live process in process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{entry} {cmdline}")
        except (OSError, IndexError, ValueError):
            continue
    return out


@contextmanager
def _mounted(fstype_args: list[str], where: Path) -> Iterator[None]:
    subprocess.run(["mount", *fstype_args, str(where)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _write_random_tree(root: Path, small: int, large: list[int], seed: int) -> int:
    """``small`` files of 1-120 KiB in 25 directories plus the ``large`` sizes; all
    random (incompressible, no duplicates). Returns the total size."""
    rng = random.Random(seed)
    total = 0
    for i in range(small):
        d = root / f"d{i % 25:02d}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 120 * 1024)
        (d / f"f{i:05d}").write_bytes(os.urandom(size))
        total += size
    for i, size in enumerate(large):
        (root / f"large{i}.bin").write_bytes(os.urandom(size))
        total += size
    return total


# -- interrupts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """About 300 MB: 2000 small files and four large ones, all random."""
    root = tmp_path_factory.mktemp("big") / "src"
    total = _write_random_tree(root, 2000, [45 * MiB] * 4, seed=1)
    return root, total


@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [
        pytest.param(signal.SIGINT, True, id="ctrl-c-to-the-process-group"),
        pytest.param(signal.SIGTERM, False, id="sigterm-to-cairn"),
        pytest.param(signal.SIGTERM, True, id="sigterm-to-the-process-group"),
    ],
)
def test_interrupted_backup_cleans_up_and_the_next_one_reuses_its_packs(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
    big_tree: tuple[Path, int],
    signum: signal.Signals,
    whole_group: bool,
) -> None:
    src, total = big_tree
    # Small packs and a bandwidth limit spread the upload over several seconds, so
    # the signal lands with some packs stored and most of the tree still to do.
    proc = _popen(
        cairn,
        ["--pack-size", "4", "--limit-upload", "40000", "backup", str(src), "--json"],
        tmp_path / "first",
    )
    deadline = time.monotonic() + 120
    while len(_packs(_repo(cairn))) < 3:
        assert proc.poll() is None, "backup ended before it could be interrupted"
        assert time.monotonic() < deadline, "no packs appeared"
        time.sleep(0.02)
    if whole_group:  # what a terminal's Ctrl-C and systemd's stop do
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    first = _finish(proc, tmp_path / "first", timeout=60)
    assert first.code == 130, first.err
    assert "interrupted" in first.err
    assert "Traceback" not in first.err

    # Nothing left behind: shared memory segments and processes of that run.
    assert not list(Path("/dev/shm").glob(f"cairn_{proc.pid}_*"))
    deadline = time.monotonic() + 10
    while (left := _group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes outlived cairn: {left}"

    # The packs it uploaded are indexed, so the repository checks clean...
    stored = sum(p.stat().st_size for p in _packs(_repo(cairn)))
    assert list((_repo(cairn) / "index").iterdir()), "the interrupted run wrote no index"
    assert not list((_repo(cairn) / "snapshots").iterdir())
    check = cairn.run("check")
    assert check.code == 0, check.out + check.err
    assert not list((_repo(cairn) / "locks").iterdir()), "stale lock after the interrupt"

    # ...and the next backup reuses them instead of uploading the data again.
    second = _backup(cairn, str(src))
    assert second["snapshot_id"] and second["errors"] == 0
    assert second["total_bytes_processed"] == total
    assert second["data_added"] < total - stored * 0.8, (second["data_added"], stored, total)
    assert cairn.run("check").code == 0


# -- files changing or vanishing under the reader -----------------------------------


def test_file_changing_while_it_is_read_is_warned_and_stored_as_read(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    busy = src / "busy.bin"
    size = 160 * MiB
    busy.write_bytes(os.urandom(size))
    os.utime(busy, ns=(10**18, 10**18))  # any write now changes the mtime
    (src / "quiet.txt").write_text("quiet")
    proc = _popen(cairn, ["--read-concurrency", "1", "backup", str(src), "--json"], tmp_path / "b")
    _wait_until_open(proc, busy)
    # Rewrite blocks in place (same size) for as long as cairn has the file open.
    writes = 0
    rng = random.Random(2)
    with open(busy, "r+b", buffering=0) as f:
        while _has_open(proc.pid, busy):
            f.seek(rng.randrange(0, size - 4096))
            f.write(os.urandom(4096))
            writes += 1
            time.sleep(0.002)
    result = _finish(proc, tmp_path / "b")
    assert writes >= 3, "the file was not written while it was read"

    # Exit 3 (restic's "incomplete snapshot"), one warning naming the file, and a
    # snapshot holding the file as read.
    assert result.code == 3, result.err
    errors = _errors(result)
    assert [(e["item"], e["error"]["message"]) for e in errors] == [
        (str(busy), "file changed while it was read; stored as read")
    ]
    summary = _summary(result)
    assert summary["snapshot_id"] and summary["errors"] == 1
    assert summary["files_new"] == 2
    target = tmp_path / "t"
    assert _restore(cairn, target).code == 0
    restored = _under(target, src)
    assert (restored / "quiet.txt").read_text() == "quiet"
    assert (restored / "busy.bin").stat().st_size == size


def test_files_vanishing_between_walk_and_read_are_warned_and_left_out(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Deterministic: with one reader of large files and one worker, the big file
    (first by name) is read while the rest of its directory is already walked and
    queued, and the second large file waits for that reader in the other read task
    (one per worker); the victims are deleted while cairn holds the big file open,
    so each is gone when its turn comes."""
    src = tmp_path / "src"
    src.mkdir()
    big = src / "a-big.bin"
    big.write_bytes(os.urandom(200 * MiB))
    (src / "a-second.bin").write_bytes(os.urandom(MiB))
    victims = [src / f"b-{i:03d}" for i in range(40)]
    for v in victims:
        v.write_bytes(os.urandom(5000))
    keepers = {f"c-{i:03d}": os.urandom(3000 + i) for i in range(10)}
    for name, data in keepers.items():
        (src / name).write_bytes(data)
    big_data = big.read_bytes()
    args = ["--read-concurrency", "1", "--cpu-workers", "1", "--limit-upload", "60000"]
    proc = _popen(cairn, [*args, "backup", str(src), "--json"], tmp_path / "b")
    _wait_until_open(proc, big)
    for v in victims:
        v.unlink()
    assert _has_open(proc.pid, big), "the big file was read before the victims were gone"
    result = _finish(proc, tmp_path / "b")

    assert result.code == 3, result.err
    errors = _errors(result)
    assert sorted(e["item"] for e in errors) == sorted(str(v) for v in victims)
    assert {e["error"]["message"] for e in errors} == {"vanished before it could be read"}
    summary = _summary(result)
    assert summary["errors"] == len(victims)
    assert summary["files_new"] == 2 + len(keepers)
    target = tmp_path / "t"
    assert _restore(cairn, target).code == 0
    got = _files(_under(target, src))
    assert got.keys() == {b"a-big.bin", b"a-second.bin", *(k.encode() for k in keepers)}
    assert got[b"a-big.bin"] == big_data
    for name, data in keepers.items():
        assert got[name.encode()] == data


def test_small_files_changing_before_a_worker_reads_them(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Small files are read, hashed and encoded in the worker processes once the
    pool is up (docs/architecture.md, "Small files"): what the walk saw and what the
    worker found must be told apart there as in a thread. As in the test above, the
    big file (first by name, which starts the pool) holds the read stage while the
    others are changed behind the walk's back."""
    src = tmp_path / "src"
    src.mkdir()
    big = src / "a-big.bin"
    big.write_bytes(os.urandom(200 * MiB))
    (src / "a-second.bin").write_bytes(os.urandom(MiB))
    kinds = ("vanish", "symlink", "dir", "rewrite", "grow")
    victims = {kind: [src / f"b-{kind}-{i}" for i in range(6)] for kind in kinds}
    for path in (p for paths in victims.values() for p in paths):
        path.write_bytes(os.urandom(5000))
    keepers = {f"c-{i:03d}": os.urandom(3000 + i) for i in range(20)}
    for name, data in keepers.items():
        (src / name).write_bytes(data)
    (tmp_path / "secret").write_text("not to be backed up")
    log = tmp_path / "debug.log"
    args = ["--read-concurrency", "1", "--cpu-workers", "1", "--limit-upload", "60000"]
    args += ["--log-level", "debug", "--log-format", "json", "--log-file", str(log)]
    proc = _popen(cairn, [*args, "backup", str(src), "--json"], tmp_path / "b")
    _wait_until_open(proc, big)
    changed: dict[bytes, bytes] = {}
    for path in victims["vanish"]:
        path.unlink()
    for path in victims["symlink"]:
        path.unlink()
        path.symlink_to(tmp_path / "secret")
    for path in victims["dir"]:
        path.unlink()
        path.mkdir()
    for path in victims["rewrite"]:
        changed[path.name.encode()] = os.urandom(4000)
        path.write_bytes(changed[path.name.encode()])
    for path in victims["grow"]:  # now read as a large file
        changed[path.name.encode()] = os.urandom(MiB)
        path.write_bytes(changed[path.name.encode()])
    assert _has_open(proc.pid, big), "the big file was read before the victims changed"
    result = _finish(proc, tmp_path / "b")

    assert result.code == 3, result.err
    expected = {
        "vanish": "vanished before it could be read",
        "symlink": "replaced by a symlink during the backup; not followed",
        "dir": "Is a directory",
        "rewrite": "file changed while it was read; stored as read",
        "grow": "file changed while it was read; stored as read",
    }
    want = sorted((str(p), expected[kind]) for kind, paths in victims.items() for p in paths)
    assert sorted((e["item"], e["error"]["message"]) for e in _errors(result)) == want
    summary = _summary(result)
    assert summary["errors"] == len(want)
    assert summary["files_new"] == 2 + len(keepers) + len(changed)
    (small,) = _events(log, "backup.small_files")
    assert (small["workers"], small["here"]) == (len(keepers) + 5 * 6, 0), small
    target = tmp_path / "t"
    assert _restore(cairn, target).code == 0
    got = _files(_under(target, src))
    assert got.keys() == {
        b"a-big.bin",
        b"a-second.bin",
        *(k.encode() for k in keepers),
        *changed,
    }
    for name, data in keepers.items():
        assert got[name.encode()] == data
    for name, data in changed.items():
        assert got[name] == data
    assert not (_under(target, src) / "b-symlink-0").exists()


def test_small_files_whose_metadata_alone_changed_are_not_encoded_again(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A chmod (or touch, or chown) changes a file's ctime: the next backup reads it
    again, finds the content it had, and neither encodes nor stores it again."""
    src = tmp_path / "src"
    for i in range(200):
        d = src / f"d{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(100 + i))
    (src / "same-twice").write_bytes(b"x" * 700)
    first = _backup(cairn, str(src))
    for path in src.rglob("f*"):
        path.chmod(0o600)
    (src / "d0" / "f0").write_bytes(os.urandom(100))  # one really changed
    log = tmp_path / "debug.log"
    debug = ("--log-level", "debug", "--log-format", "json", "--log-file", str(log))
    second = _backup(cairn, str(src), *debug)
    assert second["files_changed"] == 200 and second["files_unmodified"] == 1
    assert second["data_blobs"] == 1 and second["data_added"] == 100
    (small,) = _events(log, "backup.small_files")
    assert small["known"] == 199, small
    target = tmp_path / "t"
    assert _restore(cairn, target).code == 0
    assert _files(_under(target, src)) == _files(src)
    assert first["snapshot_id"] != second["snapshot_id"]


# -- choosing what to back up -----------------------------------------------------------


def test_files_from_and_files_from_raw(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    for d in ("a", "b", "c", "skip"):
        (src / d).mkdir(parents=True)
        (src / d / "f").write_text(d)
    odd = os.fsencode(str(src)) + b"/caf\xe9 \xff.txt"  # not UTF-8, with a space
    with open(odd, "wb") as f:
        f.write(b"latin-1 name")
    (src / "two words").write_text("spaces")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n\n{src}/a\n   {src}/c/f   \n{src}/two words\n")
    raw = tmp_path / "list.raw"
    raw.write_bytes(os.fsencode(f"{src}/b") + b"\0" + odd + b"\0")

    summary = _backup(cairn, "--files-from", str(listing), "--files-from-raw", str(raw))
    assert summary["errors"] == 0
    snaps = cairn.run("snapshots", "--json", check=True).json()
    assert sorted(snaps[0]["paths"]) == sorted(
        [f"{src}/a", f"{src}/c/f", f"{src}/two words", f"{src}/b", os.fsdecode(odd)]
    )
    target = tmp_path / "t"
    assert _restore(cairn, target).code == 0
    assert _files(_under(target, src)) == {
        b"a/f": b"a",
        b"b/f": b"b",
        b"c/f": b"c",
        b"two words": b"spaces",
        b"caf\xe9 \xff.txt": b"latin-1 name",
    }
    # A missing list file is a clear error before anything happens.
    bad = cairn.run("backup", "--files-from", str(tmp_path / "nope"))
    assert bad.code == 1 and "nope" in bad.err


def test_dry_run_writes_nothing(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    _write_random_tree(src, 50, [3 * MiB], seed=3)
    first = _backup(cairn, str(src))
    (src / "new.bin").write_bytes(os.urandom(2 * MiB))
    before = _repo_state(_repo(cairn))
    dry = _backup(cairn, "--dry-run", str(src))
    assert _repo_state(_repo(cairn)) == before
    assert dry["dry_run"] is True and dry["snapshot_id"] is None
    assert dry["parent"] == first["snapshot_id"]
    assert dry["files_new"] == 1 and dry["data_added"] == 2 * MiB
    text = cairn.run("backup", "--dry-run", str(src))
    assert text.code == 0 and "dry run: nothing was written" in text.out
    assert _repo_state(_repo(cairn)) == before
    # Into an empty repository too: no pack, index or snapshot appears.
    other = Cairn(tmp_path / "repo2", cairn.password_file)
    other.run("init", check=True)
    before = _repo_state(_repo(other))
    assert _backup(other, "-n", str(src))["data_added"] > 5 * MiB
    assert _repo_state(_repo(other)) == before


@needs_root
def test_one_file_system(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "here.txt").write_text("same filesystem")
    mnt = src / "sub" / "mnt"
    mnt.mkdir()
    with _mounted(["-t", "tmpfs", "-o", "size=16m", "tmpfs"], mnt):
        (mnt / "there.txt").write_text("other filesystem")
        (mnt / "deeper").mkdir()
        (mnt / "deeper" / "x").write_text("x")
        _backup(cairn, "-x", str(src))
        _backup(cairn, "--tag", "all", str(src))
        # Given explicitly, another filesystem is backed up even with -x.
        _backup(cairn, "--one-file-system", "--tag", "explicit", str(src), str(mnt))
    t1 = tmp_path / "t1"
    snaps = cairn.run("snapshots", "--json", check=True).json()
    assert _restore(cairn, t1, snapshot=snaps[0]["id"]).code == 0
    # As restic: the mount point is kept, as an empty directory.
    assert _files(_under(t1, src)) == {b"sub/here.txt": b"same filesystem"}
    assert _under(t1, mnt).is_dir() and list(_under(t1, mnt).iterdir()) == []
    t2 = tmp_path / "t2"
    assert _restore(cairn, t2, "--tag", "all").code == 0
    assert _files(_under(t2, src)) == {
        b"sub/here.txt": b"same filesystem",
        b"sub/mnt/there.txt": b"other filesystem",
        b"sub/mnt/deeper/x": b"x",
    }
    t3 = tmp_path / "t3"
    assert _restore(cairn, t3, "--tag", "explicit").code == 0
    assert _files(_under(t3, src)) == _files(_under(t2, src))


def test_exclude_patterns_follow_restic(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    files = [
        "keep.txt",
        "a.tmp",
        "dir.tmp/inside.txt",  # a matched directory goes with its contents
        "node_modules/pkg/index.js",
        "sub/node_modules/x.js",
        "my_node_modules/kept.js",  # a whole component must match
        "logs/2024/app.log",
        "logs/readme.txt",
        "ac/db",  # "a*b" must not match across "/"
        "axb",
        "build/out/bin",
        "other/build/out/bin",  # "/…/src/build" is anchored at the root
        "Photo.JPG",
        "photo2.jpg",
        "été/x",
        "deep/a/b/c/secret.key",
    ]
    for rel in files:
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    summary = _backup(
        cairn,
        str(src),
        "--exclude",
        "*.tmp",
        "--exclude",
        "node_modules",
        "--exclude",
        "logs/**/*.log",
        "--exclude",
        "a*b",
        "--exclude",
        f"{src}/build",
        "--exclude",
        "*.jpg",  # case-sensitive: Photo.JPG stays
        "--iexclude",
        "ÉTÉ",
        "--iexclude",
        "DEEP/**/*.KEY",
    )
    assert summary["errors"] == 0
    target = tmp_path / "t"
    assert _restore(cairn, target).code == 0
    assert sorted(_files(_under(target, src))) == sorted(
        os.fsencode(f)
        for f in [
            "keep.txt",
            "my_node_modules/kept.js",
            "logs/readme.txt",
            "ac/db",
            "other/build/out/bin",
            "Photo.JPG",
        ]
    )
    assert not _under(target, src / "dir.tmp").exists()
    assert (_under(target, src / "deep/a/b/c")).is_dir()  # only the matching file went
    # --iexclude ignores case; the patterns are kept in the snapshot.
    summary = _backup(cairn, str(src), "--iexclude", "*.JPG", "--iexclude", "KEEP.TXT")
    snap = cairn.run("snapshots", "--json", check=True).json()[-1]
    assert snap["id"] == summary["snapshot_id"]
    listing = cairn.run("ls", "latest", "--json", check=True).json_lines()
    names = {e.get("name") for e in listing}
    assert "Photo.JPG" not in names and "photo2.jpg" not in names and "keep.txt" not in names
    assert "axb" in names


def test_exclude_larger_than(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "at-limit").write_bytes(os.urandom(MiB))
    (src / "over-limit").write_bytes(os.urandom(MiB + 1))
    (src / "d" / "small").write_bytes(b"s")
    (src / "d" / "huge").write_bytes(os.urandom(3 * MiB))
    _backup(cairn, str(src), "--exclude-larger-than", "1M")
    target = tmp_path / "t"
    assert _restore(cairn, target).code == 0
    assert sorted(_files(_under(target, src))) == [b"at-limit", b"d/small"]
    # Other spellings of the size; a bad one is a usage error.
    for spelling in ("1024K", "1MiB", "1048576"):
        summary = _backup(cairn, str(src), "--exclude-larger-than", spelling, "--force")
        assert summary["total_files_processed"] == 2, spelling
    bad = cairn.run("backup", str(src), "--exclude-larger-than", "lots")
    assert bad.code == 1 and "lots" in bad.err


def test_tag_host_parent_and_force(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    total = _write_random_tree(src, 30, [2 * MiB], seed=4)
    first = _backup(cairn, str(src), "--tag", "daily,db", "--tag", "x", "--host", "alpha")
    assert first["parent"] is None and first["files_new"] == 31
    snaps = {s["id"]: s for s in cairn.run("snapshots", "--json", check=True).json()}
    assert snaps[first["snapshot_id"]]["tags"] == ["daily", "db", "x"]
    assert snaps[first["snapshot_id"]]["hostname"] == "alpha"

    # Same host and paths: the latest such snapshot is the parent, nothing is read.
    second = _backup(cairn, str(src), "--host", "alpha")
    assert second["parent"] == first["snapshot_id"]
    assert second["files_unmodified"] == 31 and second["bytes_read"] == 0
    # Another host: no parent, everything read (and deduplicated).
    other = _backup(cairn, str(src), "--host", "beta")
    assert other["parent"] is None
    assert other["files_new"] == 31 and other["bytes_read"] == total
    assert other["data_added"] == 0
    # Other paths: no parent either.
    sub = _backup(cairn, str(src / "d00"), "--host", "alpha")
    assert sub["parent"] is None
    # An explicit --parent wins over the host/path match.
    explicit = _backup(cairn, str(src), "--host", "beta", "--parent", first["snapshot_id"][:8])
    assert explicit["parent"] == first["snapshot_id"]
    assert explicit["files_unmodified"] == 31 and explicit["bytes_read"] == 0
    # --force re-reads everything and records no parent...
    forced = _backup(cairn, str(src), "--host", "alpha", "--force")
    assert forced["parent"] is None
    assert forced["bytes_read"] == total and forced["files_unmodified"] == 0
    assert forced["data_added"] == 0
    # ...and with --parent it still re-reads (the parent is only recorded).
    both = _backup(cairn, str(src), "--parent", second["snapshot_id"], "--force")
    assert both["parent"] == second["snapshot_id"] and both["bytes_read"] == total
    # A modified file is "changed" against the parent; only it is read.
    (src / "large0.bin").write_bytes(os.urandom(2 * MiB))
    changed = _backup(cairn, str(src), "--host", "alpha")
    assert changed["parent"] == forced["snapshot_id"]
    assert changed["files_changed"] == 1 and changed["bytes_read"] == 2 * MiB
    missing = cairn.run("backup", str(src), "--parent", "deadbeef")
    assert missing.code == 1 and "deadbeef" in missing.err
    tagged = cairn.run("snapshots", "--tag", "db", "--json", check=True).json()
    assert [s["id"] for s in tagged] == [first["snapshot_id"]]


# -- a real directory ----------------------------------------------------------------


REAL_TREE = Path("/usr/share/doc")  # a few thousand files on Debian 12


@pytest.mark.skipif(not REAL_TREE.is_dir(), reason=f"needs {REAL_TREE}")
@pytest.mark.skipif(not shutil.which("diff"), reason="needs diff")
def test_real_system_directory_round_trip(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    summary = _backup(cairn, str(REAL_TREE))
    assert summary["errors"] == 0 and summary["total_files_processed"] > 1000
    target = tmp_path / "t"
    result = _restore(cairn, target, "--json")
    assert result.code == 0, result.err
    restored = _under(target, REAL_TREE)
    diff = subprocess.run(
        ["diff", "-r", "--no-dereference", str(REAL_TREE), str(restored)],
        capture_output=True,
        text=True,
    )
    assert diff.returncode == 0, diff.stdout[-3000:] + diff.stderr[-3000:]
    before = snapshot_of(REAL_TREE)
    after = snapshot_of(restored)
    assert after.keys() == before.keys()
    for rel, meta in before.items():
        assert after[rel] == meta, rel
    # The top directory itself keeps its metadata too.
    assert os.stat(restored).st_mtime_ns == os.stat(REAL_TREE).st_mtime_ns
    assert stat.S_IMODE(os.stat(restored).st_mode) == stat.S_IMODE(os.stat(REAL_TREE).st_mode)


# -- restore trouble -----------------------------------------------------------------


def _cat(c: Cairn, *args: str) -> Any:
    return json.loads(c.run("cat", *args, check=True).out)


def _dir_nodes(c: Cairn, snapshot_id: str, path: Path) -> dict[str, Any]:
    """The tree nodes of directory ``path`` in a snapshot, by name."""
    tree = _cat(c, "snapshot", snapshot_id)["tree"]
    for part in path.parts[1:]:
        nodes = {n["name"]: n for n in _cat(c, "tree", tree)["nodes"]}
        tree = nodes[part]["subtree"]
    return {n["name"]: n for n in _cat(c, "tree", tree)["nodes"]}


def test_restore_with_a_lost_pack_restores_everything_else(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = {f"f{i:02d}": os.urandom(400 * 1024 + i) for i in range(30)}  # one blob each
    data["large"] = os.urandom(6 * MiB)  # several blobs, likely in several packs
    for name, content in data.items():
        (src / name).write_bytes(content)
    os.link(src / "f00", src / "f00-link")
    data["f00-link"] = data["f00"]
    summary = _backup(cairn, "--pack-size", "4", str(src))
    nodes = _dir_nodes(cairn, summary["snapshot_id"], src)
    (index_id,) = [p.name for p in (_repo(cairn) / "index").iterdir()]
    packs = {
        p["id"]: {b["id"] for b in p["blobs"] if b["type"] == "data"}
        for p in _cat(cairn, "index", index_id)["packs"]
    }
    data_packs = sorted(
        (pid for pid, blobs in packs.items() if blobs), key=lambda p: -len(packs[p])
    )
    assert len(data_packs) >= 3
    lost = data_packs[0]
    affected = {name for name, n in nodes.items() if set(n["content"]) & packs[lost]}
    assert affected and len(affected) < len(data)
    (_repo(cairn) / "data" / lost[:2] / lost).unlink()

    target = tmp_path / "t"
    result = _restore(cairn, target, "--json")
    assert result.code == 1, result.err
    errors = _errors(result)
    by_path = {e["item"]: e["error"]["message"] for e in errors}
    # One line per affected file (a hardlink to a lost file is one too), naming the
    # pack and the blob.
    expected = {str(_under(target, src / name)) for name in affected}
    assert by_path.keys() == expected
    assert len(errors) == len(expected)
    for name in affected:
        message = by_path[str(_under(target, src / name))]
        assert lost in message
        assert any(b in message for b in nodes[name]["content"]), message
        assert "\n" not in message
    # Everything else is there, intact; the broken files are not left half-written.
    got = _files(_under(target, src))
    assert {k.decode() for k in got} == set(data) - {Path(p).name for p in expected}
    for rel, content in got.items():
        assert content == data[rel.decode()], rel
    assert _summary(result)["errors"] == len(expected)
    # Plain text: the same, one "warning: PATH: ..." line each.
    text = _restore(cairn, tmp_path / "t2")
    assert text.code == 1
    lines = [line for line in text.err.splitlines() if line.startswith("warning: ")]
    assert len(lines) == len(expected) and all(lost in line for line in lines)


@needs_root
@pytest.mark.parametrize("how", ["read-only-bind-mount", "immutable"])
def test_restore_into_an_unwritable_target_fails_clearly(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
    how: str,
) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("f")
    _backup(cairn, str(src))
    target = tmp_path / "t"
    target.mkdir()
    if how == "immutable":
        subprocess.run(["chattr", "+i", str(target)], check=True)
        try:
            result = _restore(cairn, target)
        finally:
            subprocess.run(["chattr", "-i", str(target)], check=True)
        why = "permission denied"
    else:
        with _mounted(["--bind", str(target)], target):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
            result = _restore(cairn, target)
        why = "read-only file system"
    # Exit 1 (fatal: nothing restored), one line saying why, no per-file noise
    # (log lines, wherever the logging setup sends them, are not counted).
    assert result.code == 1
    said = [line for line in result.err.splitlines() if line.startswith(("cairn:", "warning:"))]
    assert said == [f"cairn: cannot restore into {target}: the directory is not writable ({why})"]
    assert "restore.file_error" not in result.err
    assert list(target.iterdir()) == []
    # A target that cannot be created is the same kind of error.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _restore(cairn, blocker / "sub")
    assert result.code == 1
    assert result.err.startswith(f"cairn: cannot create target directory {blocker}/sub:")


def test_restore_never_follows_symlinks_planted_in_the_target(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "secret.txt").write_text("from the snapshot")
    (src / "file.txt").write_text("file from the snapshot")
    (src / "empty").mkdir()
    _backup(cairn, str(src))
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.chmod(victim, 0o640)
    victim_before = victim.stat()

    # Symlinks where the snapshot has a directory, a file and an empty directory...
    target = tmp_path / "t"
    base = _under(target, src)
    base.mkdir(parents=True)
    (base / "sub").symlink_to(outside)
    (base / "file.txt").symlink_to(victim)
    (base / "empty").symlink_to(outside)
    # ...and in a second target, high up in the path above the restored tree.
    target2 = tmp_path / "t2"
    target2.mkdir()
    first = Path(str(src).lstrip("/")).parts[0]
    (target2 / first).symlink_to(outside)

    for t in (target, target2):
        result = _restore(cairn, t)
        assert result.code == 0, result.err
        restored = _under(t, src)
        assert not (restored / "sub").is_symlink() and (restored / "sub").is_dir()
        assert (restored / "sub" / "secret.txt").read_text() == "from the snapshot"
        assert not (restored / "file.txt").is_symlink()
        assert (restored / "file.txt").read_text() == "file from the snapshot"
        assert not (restored / "empty").is_symlink()
    assert list(outside.iterdir()) == [], "restore wrote outside the target"
    assert victim.read_text() == "precious"
    after = victim.stat()
    assert (after.st_mode, after.st_mtime_ns, after.st_ino) == (
        victim_before.st_mode,
        victim_before.st_mtime_ns,
        victim_before.st_ino,
    )

    # A hardlink to an outside file in the target is replaced, not written through.
    target3 = tmp_path / "t3"
    base3 = _under(target3, src)
    base3.mkdir(parents=True)
    os.link(victim, base3 / "file.txt")
    assert _restore(cairn, target3).code == 0
    assert (base3 / "file.txt").read_text() == "file from the snapshot"
    assert victim.read_text() == "precious"


# -- deduplication ---------------------------------------------------------------------


def test_same_data_under_two_paths_is_stored_once(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    one = tmp_path / "one"
    total = _write_random_tree(one, 40, [5 * MiB], seed=5)
    two = tmp_path / "elsewhere" / "two"
    shutil.copytree(one, two)
    (two / "renamed.bin").write_bytes((one / "large0.bin").read_bytes())
    summary = _backup(cairn, str(one), str(two))
    assert summary["total_bytes_processed"] == 2 * total + 5 * MiB
    assert summary["data_added"] == total
    assert summary["files_new"] == 2 * 41 + 1
    target = tmp_path / "t"
    assert _restore(cairn, target).code == 0
    assert _files(_under(target, two)) == _files(two)
    assert _files(_under(target, one)) == _files(one)


def test_unchanged_tree_ten_times_adds_no_data(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    _write_random_tree(src, 200, [3 * MiB], seed=6)
    first = _backup(cairn, str(src))
    assert first["data_added"] > 0
    data_bytes = sum(p.stat().st_size for p in _packs(_repo(cairn)))
    for _ in range(10):
        s = _backup(cairn, str(src))
        assert s["data_blobs"] == 0 and s["data_added"] == 0 and s["bytes_read"] == 0
        assert s["files_unmodified"] == 201
        # At most the directories on the way down from "/" can have changed.
        assert s["tree_blobs"] <= len(src.parts) + 1
    # Eleven snapshots, and the repository grew by tree packs only.
    assert len(cairn.run("snapshots", "--json", check=True).json()) == 11
    grown = sum(p.stat().st_size for p in _packs(_repo(cairn))) - data_bytes
    assert grown < 10 * 64 * 1024


def test_atime_changes_alone_store_no_new_trees(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    """A nightly backup reads files and lists directories, which (relatime) gives
    them new atimes: that alone must not store a new tree (docs/format.md)."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    for rel in ("top.txt", "a/one.txt", "a/b/two.txt"):
        (src / rel).write_text(f"content of {rel}")
    (src / "a" / "link").symlink_to("one.txt")
    entries = [src, *src.rglob("*")]
    old = 1_000_000_000 * 10**9
    for path in entries:
        # atime before mtime: the kernel updates it on the next read or listing.
        os.utime(path, ns=(old, path.lstat().st_mtime_ns), follow_symlinks=False)
    first = _backup(cairn, str(src))
    assert first["files_new"] == 3
    for path in entries:
        if path.is_symlink():
            os.readlink(path)
        elif path.is_dir():
            os.listdir(path)
        else:
            path.read_bytes()
    if all(p.lstat().st_atime_ns == old for p in entries if not p.is_symlink()):
        pytest.skip("this filesystem does not update atimes (noatime)")
    second = _backup(cairn, str(src))
    assert second["files_unmodified"] == 3 and second["bytes_read"] == 0

    def below_src(snapshot_id: str) -> list[dict[str, Any]]:
        lines = cairn.run("ls", "--json", snapshot_id, check=True).json_lines()[1:]
        return [n for n in lines if n["path"].startswith(str(src))]

    # Every entry at and below src is recorded as before, atimes included, so
    # its trees are the same blobs; only the directories above it (changed by
    # whatever else runs on this machine) may be stored anew.
    assert below_src(second["snapshot_id"]) == below_src(first["snapshot_id"])
    assert second["dirs_changed"] <= len(src.parts) - 1
    assert second["tree_blobs"] <= len(src.parts) - 1


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in events if e["event"] == name]


def test_small_backup_encodes_in_threads_and_a_large_one_starts_workers(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Under 32 MiB of new data no worker process starts (docs/architecture.md,
    "Encode"); above it the pool takes over. Both restore exactly."""
    src = tmp_path / "src"
    small = _write_random_tree(src, 60, [], seed=7)
    debug = ("--log-level", "debug", "--log-format", "json", "--log-file")
    first = _backup(cairn, str(src), *debug, str(tmp_path / "one.log"))
    assert first["data_added"] == small
    assert _events(tmp_path / "one.log", "backup.workers_started") == []
    small_files = _files(src)
    (src / "big").mkdir()
    for i in range(5):
        (src / "big" / f"{i}.bin").write_bytes(os.urandom(10 * MiB))
    second = _backup(cairn, str(src), *debug, str(tmp_path / "two.log"))
    assert second["data_added"] == 50 * MiB
    (started,) = _events(tmp_path / "two.log", "backup.workers_started")
    assert started["encoded_here"] > 32 * MiB
    for snap, files in ((first["snapshot_id"], small_files), (second["snapshot_id"], _files(src))):
        target = tmp_path / f"restored-{snap}"
        assert _restore(cairn, target, snapshot=snap).code == 0
        assert _files(_under(target, src)) == files
