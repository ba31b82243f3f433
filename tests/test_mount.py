"""``cairn mount`` against real FUSE: the mounted snapshots compared with their source
using ordinary tools (find, stat, cmp, diff, getfattr, tar, ls), concurrent readers,
a directory of 20,000 entries, new snapshots while mounted, a missing pack, and every
way of unmounting. Every mount is unmounted by a fixture finalizer, whatever happens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.servers")

from tests.cli_helpers import CAIRN, Cairn  # noqa: E402
from tests.maintenance_helpers import describe, new_cairn  # noqa: E402
from tests.servers import S3_KEY, S3_SECRET, location_for  # noqa: E402
from tests.treeutil import make_everything_tree  # noqa: E402

pytest_plugins = ["tests.servers"]

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(
        importlib.util.find_spec("pyfuse3") is None, reason="needs pyfuse3 (the mount extra)"
    ),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fuse3"),
]

MOUNT_TIMEOUT = 60


class Mounted:
    """A ``cairn mount`` process serving ``mountpoint``."""

    def __init__(self, c: Cairn, mountpoint: Path, logs: Path, *args: str) -> None:
        self.mountpoint = mountpoint
        self.stdout_path = logs / "mount.out"
        self.stderr_path = logs / "mount.err"
        mountpoint.mkdir(parents=True, exist_ok=True)
        cmd = [
            *CAIRN,
            "-r",
            str(c.repo),
            "--password-file",
            str(c.password_file),
            "--insecure-kdf",
            *c.global_args,
            "mount",
            str(mountpoint),
            *args,
        ]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=c.env, stdout=out, stderr=err)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"cairn mount did not mount: {self.stderr()}")
            time.sleep(0.05)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Signal the mount and wait for it to end; its exit code."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=MOUNT_TIMEOUT)

    def close(self) -> None:
        """End the process and remove the mount, whatever state they are in."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)


@pytest.fixture
def cairn(tmp_path: Path) -> Cairn:
    """A cairn command bound to an initialised local repository."""
    return new_cairn(tmp_path)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[object]:
    """``mount(cairn, *args) -> Mounted``; unmounted at the end in any case."""
    mounts: list[Mounted] = []

    def start(c: Cairn, *args: str) -> Mounted:
        n = len(mounts)
        logs = tmp_path / f"mount-logs-{n}"
        logs.mkdir()
        m = Mounted(c, tmp_path / f"mnt{n}", logs, *args)
        mounts.append(m)
        return m

    yield start
    for m in mounts:
        m.close()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cairn, Path, list[str]]:
    """A repository with two snapshots of a tree with every kind of entry (the first
    tagged), and the source tree as it was at the second."""
    base = tmp_path_factory.mktemp("mount-history")
    c = new_cairn(base)
    src = base / "src"
    make_everything_tree(src)
    ids = [c.run("backup", str(src), "--tag", "first", "--json", check=True).json_lines()[-1]]
    (src / "added-later.txt").write_text("second snapshot only\n")
    ids.append(c.run("backup", str(src), "--json", check=True).json_lines()[-1])
    return c, src, [i["snapshot_id"] for i in ids]


def in_snapshot(root: Path, src: Path) -> Path:
    """Where ``src`` appears inside a mounted snapshot directory."""
    return root / str(src).lstrip("/")


def find_listing(top: Path) -> list[str]:
    """``find`` of everything below ``top``: type, mode, owner, links, mtime, ctime,
    size (not for directories: the mount has no directory sizes), link target."""
    fmt = r"%P\0%y\0%m\0%U\0%G\0%n\0%T@\0%C@\0%s\0%l\n"
    out = subprocess.run(
        ["find", ".", "-printf", fmt], cwd=top, capture_output=True, check=True
    ).stdout
    lines = []
    for line in out.split(b"\n"):
        if not line:
            continue
        fields = line.split(b"\0")
        if fields[1] == b"d":
            fields[8] = b"-"
        lines.append(b" ".join(fields).decode("utf-8", "backslashreplace"))
    return sorted(lines)


def tar_bytes(top: Path) -> bytes:
    return subprocess.run(
        ["tar", "--sort=name", "--numeric-owner", "--format=gnu", "-cf", "-", "-C", str(top), "."],
        capture_output=True,
        check=True,
    ).stdout


def test_mounted_tree_matches_source(history, mount) -> None:
    c, src, _ids = history
    m = mount(c)
    tree = in_snapshot(m.mountpoint / "snapshots" / "latest", src)
    assert find_listing(tree) == find_listing(src)
    # Contents byte for byte, symlinks as links (diff calls two FIFOs different).
    specials = ["-x", "fifo", "-x", "chardev", "-x", "blockdev"]
    subprocess.run(["diff", "-r", "--no-dereference", *specials, str(src), str(tree)], check=True)
    for name in ("big.bin", "text.log", "sparse.img", "not-utf8-\udcff\udcfe.txt"):
        subprocess.run(["cmp", str(src / name), str(tree / name)], check=True)
    # xattrs through getxattr/listxattr.
    attrs = [
        sorted(
            subprocess.run(
                ["getfattr", "-R", "-d", "-h", "-m", "-", "."], cwd=top, capture_output=True
            ).stdout.split(b"\n\n")
        )
        for top in (src, tree)
    ]
    assert b'# file: small.txt\nuser.comment="an extended attribute"' in attrs[0]
    assert attrs[0] == attrs[1]
    # Devices and FIFOs with their numbers; hard links share an inode.
    fmt = "%n %F %t:%T %h"
    names = ["fifo", "hardlink.txt", "small.txt"]
    if os.geteuid() == 0:
        names += ["chardev", "blockdev"]
    stats = [
        subprocess.run(["stat", "-c", fmt, *names], cwd=top, capture_output=True, check=True).stdout
        for top in (src, tree)
    ]
    assert stats[0] == stats[1]
    assert os.stat(tree / "small.txt").st_ino == os.stat(tree / "hardlink.txt").st_ino
    # The same archive, hard links and all.
    assert tar_bytes(tree) == tar_bytes(src)


def test_layout_as_restic(history, mount) -> None:
    c, src, ids = history
    m = mount(c)
    top = m.mountpoint
    assert sorted(os.listdir(top)) == ["hosts", "ids", "snapshots", "tags"]
    listed = subprocess.run(["ls", "-a", str(top / "ids")], capture_output=True, check=True)
    assert listed.stdout.decode().split()[:2] == [".", ".."]
    times = sorted(n for n in os.listdir(top / "snapshots") if n != "latest")
    assert len(times) == 2
    assert os.readlink(top / "snapshots" / "latest") == times[-1]
    assert sorted(os.listdir(top / "ids")) == sorted(i[:8] for i in ids)
    newest = in_snapshot(top / "ids" / ids[1][:8], src)
    assert (newest / "added-later.txt").read_text() == "second snapshot only\n"
    assert not (in_snapshot(top / "ids" / ids[0][:8], src) / "added-later.txt").exists()
    hosts = os.listdir(top / "hosts")
    assert len(hosts) == 1
    assert sorted(os.listdir(top / "hosts" / hosts[0])) == sorted([*times, "latest"])
    assert sorted(os.listdir(top / "tags" / "first")) == [times[0], "latest"]
    assert os.readlink(top / "tags" / "first" / "latest") == times[0]
    # Read-only: nothing can be created or changed.
    with pytest.raises(OSError):
        (newest / "new-file").write_text("x")
    with pytest.raises(OSError), open(newest / "small.txt", "r+b"):
        pass


def test_snapshot_filters(history, mount) -> None:
    c, _src, ids = history
    m = mount(c, "--tag", "first")
    assert os.listdir(m.mountpoint / "ids") == [ids[0][:8]]
    assert os.listdir(m.mountpoint / "tags") == ["first"]


def test_several_readers_of_one_large_file(cairn: Cairn, tmp_path: Path, mount) -> None:
    src = tmp_path / "big"
    src.mkdir()
    data = os.urandom(48 * 1024 * 1024)
    (src / "large.bin").write_bytes(data)
    cairn.run("backup", str(src), check=True)
    m = mount(cairn, "--json")
    target = in_snapshot(m.mountpoint / "snapshots" / "latest", src) / "large.bin"

    def read(start: int) -> bool:
        # Each reader starts at a different place, then reads to the end and wraps.
        with open(target, "rb", buffering=0) as f:
            f.seek(start)
            tail = f.read()
            f.seek(0)
            head = f.read(start)
        return head + tail == data

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read, [0, 5_000_000, 17_000_000, 33_333_333]))
    assert results == [True] * 4
    subprocess.run(["cmp", str(src / "large.bin"), str(target)], check=True)
    assert m.stop(signal.SIGINT) == 0
    lines = [json.loads(line) for line in m.stdout().splitlines()]
    assert lines[0]["message_type"] == "mounted"
    summary = lines[-1]
    assert summary["message_type"] == "summary"
    assert 0 < summary["cache_hit_rate"] <= 1
    assert summary["prefetched_blobs"] > 0


def test_directory_of_20000_entries(cairn: Cairn, tmp_path: Path, mount) -> None:
    src = tmp_path / "many"
    src.mkdir()
    names = [f"entry-{i:05d}" for i in range(20_000)]
    for name in names:
        os.close(os.open(src / name, os.O_CREAT | os.O_WRONLY, 0o644))
    cairn.run("backup", str(src), check=True)
    m = mount(cairn)
    top = in_snapshot(m.mountpoint / "snapshots" / "latest", src)
    out = subprocess.run(
        ["ls", "-R", "-1", str(m.mountpoint / "snapshots")],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    listed = [line for line in out.splitlines() if line.startswith("entry-")]
    assert sorted(listed) == names
    # From inside the directory: each full path through snapshots/latest would cost one
    # more readlink request per entry.
    long = subprocess.run(["ls", "-l"], cwd=top, capture_output=True, check=True, text=True)
    assert len(long.stdout.splitlines()) == 20_001  # "total" and every entry


def test_new_snapshots_appear_without_remounting(cairn: Cairn, tmp_path: Path, mount) -> None:
    src = tmp_path / "grow"
    src.mkdir()
    (src / "one.txt").write_text("one\n")
    cairn.run("backup", str(src), check=True)
    # The hidden --refresh-interval (5 s by default) lets the test see at once.
    m = mount(cairn, "--refresh-interval", "0")
    assert len(os.listdir(m.mountpoint / "ids")) == 1
    # The mount holds a shared lock; a backup may run beside it.
    (src / "two.txt").write_text("two\n")
    cairn.run("backup", str(src), check=True)
    assert len(os.listdir(m.mountpoint / "ids")) == 2
    latest = in_snapshot(m.mountpoint / "snapshots" / "latest", src)
    assert (latest / "two.txt").read_text() == "two\n"


def test_shared_lock_while_mounted(cairn: Cairn, mount) -> None:
    locks = Path(cairn.repo) / "locks"
    m = mount(cairn)
    assert len(list(locks.iterdir())) == 1
    assert cairn.run("prune").code == 11  # an exclusive lock is refused
    assert m.stop(signal.SIGTERM) == 0
    assert list(locks.iterdir()) == []


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "fusermount3"])
def test_unmount(cairn: Cairn, tmp_path: Path, mount, how: str) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_text("x")
    cairn.run("backup", str(src), check=True)
    m = mount(cairn)
    assert (in_snapshot(m.mountpoint / "snapshots" / "latest", src) / "f").read_text() == "x"
    if how == "fusermount3":
        subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True)
        code = m.proc.wait(timeout=MOUNT_TIMEOUT)
    else:
        code = m.stop(getattr(signal, how))
    assert code == 0, m.stderr()
    assert not os.path.ismount(m.mountpoint)
    assert "unmounted" in m.stdout()
    assert "Traceback" not in m.stderr()


def test_missing_or_corrupt_pack_fails_only_the_files_needing_it(tmp_path: Path, mount) -> None:
    c = new_cairn(tmp_path)
    src = tmp_path / "src"
    src.mkdir()

    def data_packs() -> set[str]:
        return {p for p, t in describe(Path(c.repo))["pack_type"].items() if t == 0}

    lost = os.urandom(300_000)
    (src / "lost.bin").write_bytes(lost)
    c.run("backup", str(src), check=True)
    missing = data_packs()
    corrupt = os.urandom(300_000)
    (src / "corrupt.bin").write_bytes(corrupt)
    c.run("backup", str(src), check=True)
    damaged = data_packs() - missing
    kept = os.urandom(300_000)
    (src / "kept.bin").write_bytes(kept)
    c.run("backup", str(src), check=True)
    for pack in missing:
        (Path(c.repo) / "data" / pack[:2] / pack).unlink()
    for pack in damaged:
        path = Path(c.repo) / "data" / pack[:2] / pack
        raw = bytearray(path.read_bytes())
        raw[1000] ^= 0xFF  # inside corrupt.bin's blob
        path.write_bytes(bytes(raw))
    m = mount(c)
    tree = in_snapshot(m.mountpoint / "snapshots" / "latest", src)
    assert sorted(os.listdir(tree)) == ["corrupt.bin", "kept.bin", "lost.bin"]
    assert os.stat(tree / "lost.bin").st_size == len(lost)
    for _ in range(2):
        for name in ("lost.bin", "corrupt.bin"):
            with pytest.raises(OSError) as failed:
                (tree / name).read_bytes()
            assert failed.value.errno == 5  # EIO
    assert (tree / "kept.bin").read_bytes() == kept
    assert m.stop() == 0
    errors = [line for line in m.stderr().splitlines() if "mount.pack_unreadable" in line]
    assert len(errors) == 2, m.stderr()  # one line per pack, however many reads failed
    assert any(next(iter(missing)) in line for line in errors)
    assert any(next(iter(damaged)) in line for line in errors)


@pytest.mark.parametrize("kind", ["sftp", "s3"])
def test_mount_of_a_remote_repository(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, mount
) -> None:
    """The backends that need asyncio (asyncssh, aiobotocore) serve the mount's reads."""
    url, options = location_for(kind, request, tmp_path)
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}
    if kind == "s3":
        env |= {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        }
    password = tmp_path / "password"
    password.write_text("remote mount\n")
    flags = tuple(f"--option={key}={value}" for key, value in options.items())
    c = Cairn(url, password, extra_env=env, global_args=flags)
    c.run("init", check=True)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    data = os.urandom(3_000_000)
    (src / "d" / "big.bin").write_bytes(data)
    (src / "small.txt").write_text("small\n")
    c.run("backup", str(src), check=True)
    m = mount(c)
    tree = in_snapshot(m.mountpoint / "snapshots" / "latest", src)
    assert (tree / "d" / "big.bin").read_bytes() == data
    assert (tree / "small.txt").read_text() == "small\n"
    assert m.stop() == 0, m.stderr()


def test_mountpoint_must_be_a_directory(cairn: Cairn, tmp_path: Path) -> None:
    result = cairn.run("mount", str(tmp_path / "nowhere"))
    assert result.code == 1
    assert result.err.strip().splitlines() == [
        f"cairn: mountpoint {tmp_path / 'nowhere'} is not a directory"
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_stale_readiness_does_not_wake_the_next_fuse_reader(anyio_backend: str) -> None:
    """pyfuse3 reads the FUSE fd blocking once woken: a wake-up for a request the
    previous reader already took must not reach the next reader (it hung the loop)."""
    import asyncio

    from cairn.mount import aioloop

    r, w = os.pipe()
    try:
        os.write(w, b"1")
        await aioloop.wait_readable(r)
        os.read(r, 1)  # the previous reader took its request
        waiting = asyncio.ensure_future(aioloop.wait_readable(r))
        for _ in range(3):
            await asyncio.sleep(0)
        aioloop._ready(r)  # the readiness callback queued before that read
        for _ in range(3):
            await asyncio.sleep(0)
        assert not waiting.done()
        os.write(w, b"2")
        await asyncio.wait_for(waiting, 10)
        aioloop.notify_closing(r)
    finally:
        os.close(r)
        os.close(w)
