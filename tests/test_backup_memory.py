"""Memory a backup holds: nothing outlives a killed run, and a slow link does not
make it grow (the bound is docs/architecture.md's formula, asserted here)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from cairn.backends.forward import ForwardingBackend
from cairn.backends.local import LocalBackend
from cairn.backends.throttle import ThrottledBackend
from cairn.pipeline import Throttle
from cairn.repo.config import Config
from cairn.repo.index import Index
from cairn.repo.keyfile import KdfParams
from cairn.repo.repository import init_repository
from cairn.stages.backup import Archiver, BackupOptions, default_cpu_workers
from tests.cli_helpers import CAIRN, Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture

KiB = 1024
MiB = 1024 * KiB
CHEAP = KdfParams(memory_kib=64, iterations=1, lanes=1)


def _tree_pids(pid: int) -> set[int]:
    """``pid`` and every live process below it (workers hang under the forkserver)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found = {pid}
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _slot_memory(pids: set[int]) -> set[str]:
    """Slot memory (memfd or /dev/shm segment) any of ``pids`` holds or has mapped."""
    found = set()
    for pid in pids:
        try:
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            targets += Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue  # exited meanwhile
        found |= {t for t in targets if "cairn_" in t}
    return found


def test_sigkilled_backup_leaves_no_shared_memory(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"large{i}.bin").write_bytes(os.urandom(8 * MiB))
    # A bandwidth limit keeps the run going long enough to be killed in the middle.
    cmd = [
        *CAIRN,
        "-r",
        str(cairn.repo),
        "--password-file",
        str(cairn.password_file),
        "--insecure-kdf",
        "--pack-size",
        "4",
        "--limit-upload",
        "2000",
        "backup",
        str(src),
    ]
    err = tmp_path / "backup.err"
    with open(err, "wb") as e:
        proc = subprocess.Popen(
            cmd, env=cairn.env, stdout=subprocess.DEVNULL, stderr=e, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        # Mid-run: the workers have the slot memory mapped and packs are going up.
        while not (
            len(_tree_pids(proc.pid)) >= 3
            and _slot_memory(_tree_pids(proc.pid) - {proc.pid})
            and list(Path(cairn.repo, "data").glob("*/*"))
        ):
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the backup never got going"
            time.sleep(0.02)
        pids = _tree_pids(proc.pid)
        # What systemd does to a unit whose stop times out: SIGKILL to everyone.
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # polls for the processes' exit; nothing is timed
    assert not _alive(pids)
    # No process of the run holds slot memory any more, and none of it has a
    # name that would keep it until reboot.
    assert not _slot_memory(pids)
    assert not [name for pid in pids for name in Path("/dev/shm").glob(f"cairn_{pid}_*")]


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(pid)
        except OSError:
            continue
    return out


class _SlowLink(ForwardingBackend):
    """A link of ``rate`` bytes per second for packs: each save sleeps for its size."""

    def __init__(self, inner: LocalBackend, rate: float) -> None:
        super().__init__(inner)
        self.rate = rate
        self.saved = 0

    async def save(self, name: str, data: bytes | memoryview) -> None:
        if name.startswith("data/"):
            await anyio.sleep(len(data) / self.rate)
            self.saved += len(data)
        await self.inner.save(name, data)


@pytest.mark.anyio
@pytest.mark.parametrize("link", ["slow", "limited"])
async def test_backup_memory_stays_within_the_bound_on_a_slow_link(
    tmp_path: Path, link: str
) -> None:
    # Small chunks, slots and packs so the bound is small and the backup is many
    # times larger; the link is several times slower than reading and encoding:
    # a slow backend, or an upload limit (the token bucket the CLI sets up).
    config = Config(chunk_min=64 * KiB, chunk_avg=128 * KiB, chunk_max=256 * KiB)
    local = LocalBackend(tmp_path / "repo")
    rate = 24 * MiB
    backend: ForwardingBackend = (
        _SlowLink(local, rate) if link == "slow" else ThrottledBackend(local, Throttle(rate))
    )
    repo = await init_repository(
        backend, "pw", kdf_params=CHEAP, hostname="h", username="u", config=config
    )
    src = tmp_path / "src"
    src.mkdir()
    total = 0
    for i in range(16):
        size = 4 * MiB + i * 4099  # random: incompressible, nothing deduplicates
        (src / f"f{i:02d}").write_bytes(os.urandom(size))
        total += size
    options = BackupOptions(
        paths=[os.fsencode(src)],
        host="h",
        pack_size=1 * MiB,
        cpu_workers=2,
        read_concurrency=2,
        connections=2,
        slot_size=512 * KiB,
    )
    archiver = Archiver(repo, Index(), options, None)
    slots, bound = archiver.memory_bound()
    assert slots + bound < total / 3, "the backup must dwarf the bound to test it"
    if link == "limited":
        # The link sets the pace: one input slot per reader and worker, one
        # output slot per worker.
        assert (archiver.in_slots, archiver.out_slots) == (4, 2)

    await archiver.run()

    assert archiver.packer.stats.data_added == total  # all of it went through
    saved = sum(p.stat().st_size for p in (tmp_path / "repo" / "data").glob("*/*"))
    assert saved >= total
    assert archiver.held.current == 0, "bytes counted as held were never released"
    assert 0 < archiver.held.peak <= bound, (archiver.held.peak, bound)


def test_one_worker_behind_a_fixed_upload_limit() -> None:
    assert default_cpu_workers(4, None, False) == 4
    assert default_cpu_workers(4, 5000 * KiB, False) == 1
    # A schedule may lift the limit mid-run; a fast limit needs the cores.
    assert default_cpu_workers(4, 5000 * KiB, True) == 4
    assert default_cpu_workers(4, 200 * MiB, False) == 4
