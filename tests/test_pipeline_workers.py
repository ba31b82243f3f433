"""Process pool and shared-memory slots: results, errors, crashes, cleanup."""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from cairn.pipeline import (
    PipelineOptions,
    SlotPool,
    SlotRef,
    SlotWriter,
    StageError,
    WorkerCrashed,
    WorkerPool,
    open_engine,
    shm,
    workers,
)

pytestmark = pytest.mark.anyio

OPTIONS = PipelineOptions(cpu_workers=2, slot_size=64 * 1024, slot_count=4)


# --- functions run inside worker processes (module level, so they pickle) ---


def add(a: int, b: int) -> int:
    return a + b


def sha256_of(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def upper_into(data: memoryview, out: memoryview) -> list[tuple[int, int]]:
    # Variable-size output: several pieces written into an output slot.
    writer = SlotWriter(out)
    placed = []
    for part in bytes(data).split(b" "):
        where = writer.write(part.upper())
        if where is None:
            raise ValueError("output slot full")
        placed.append(where)
    return placed


def fail(message: str) -> None:
    raise KeyError(message)


def die(code: int) -> None:
    os._exit(code)


def unpicklable_result() -> Any:
    return lambda: None


def worker_pid() -> int:
    return os.getpid()


def block() -> None:
    signal.pause()


_setting = ""


def pid_once_two_run(folder: str) -> int:
    """Check in, then wait until a second job has checked in too; the worker's pid."""
    os.close(os.open(os.path.join(folder, str(os.getpid())), os.O_CREAT | os.O_WRONLY))
    while len(os.listdir(folder)) < 2:
        time.sleep(0.005)
    return os.getpid()


def remember(value: str) -> None:
    global _setting
    _setting = value


def recall() -> str:
    return _setting


# --- helpers ---


def shm_segments(pid: int | None = None) -> set[str]:
    """The slot memory a process holds open (memfds named cairn_*)."""
    # A mapping keeps its own descriptor until its last view is collected.
    gc.collect()
    fds = f"/proc/{pid or os.getpid()}/fd"
    found = set()
    for fd in os.listdir(fds):
        try:
            target = os.readlink(f"{fds}/{fd}")
        except OSError:
            continue  # closed meanwhile (listdir's own fd)
        if target.startswith("/memfd:cairn_"):
            found.add(target)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves worker processes or shared memory behind."""
    before = shm_segments()
    yield
    assert shm_segments() == before
    assert multiprocessing.active_children() == []


# --- tests ---


async def test_slots_used_one_at_a_time_allocate_one_slot_of_memory() -> None:
    """The slot released last is used next, so a run needing one slot at a time
    never allocates the pages of the others (memfd pages exist once written)."""
    slots = SlotPool(64 * 1024, 4)
    try:
        for i in range(10):
            slot = await slots.acquire()
            slot.view[:] = bytes([i]) * slot.size
            slot.release()
        fd = shm.owned_fd(slots.name)
        assert fd is not None
        assert os.fstat(fd).st_blocks * 512 == slots.slot_size
        held = [await slots.acquire() for _ in range(4)]  # all four still available
        assert sorted(s.index for s in held) == [0, 1, 2, 3]
    finally:
        slots.close()


async def test_run_returns_results_and_slots_cross_as_memoryviews(no_leaks: None) -> None:
    async with WorkerPool(2) as pool:
        assert await pool.run(add, 2, 3) == 5
        slots = SlotPool(1024, 2)
        try:
            slot = await slots.acquire()
            slot.view[:5] = b"hello"
            digest = await pool.run(sha256_of, slot.ref(5))
            assert digest == hashlib.sha256(b"hello").hexdigest()
            assert slots.in_use == 1
            slot.release()
            slot.release()  # idempotent
            assert slots.in_use == 0
        finally:
            slots.close()


async def test_worker_writes_variable_size_output_into_a_slot(no_leaks: None) -> None:
    async with open_engine(OPTIONS) as engine:
        out_slots = engine.slot_pool(slot_count=2)
        src, out = await engine.slots.acquire(), await out_slots.acquire()
        text = b"many small blobs"
        src.view[: len(text)] = text
        placed = await engine.pool.run(upper_into, src.ref(len(text)), out.ref())
        assert [bytes(out.view[o : o + n]) for o, n in placed] == [b"MANY", b"SMALL", b"BLOBS"]
        assert SlotRef(*src.ref(3)) == src.ref(3)  # descriptors are plain tuples


async def test_worker_exception_is_raised_with_remote_traceback(no_leaks: None) -> None:
    async with WorkerPool(1) as pool:
        with pytest.raises(KeyError, match="nope") as info:
            await pool.run(fail, "nope")
        assert any("in worker" in note for note in info.value.__notes__)
        with pytest.raises(Exception, match="unpicklable result"):
            await pool.run(unpicklable_result)
        assert await pool.run(add, 1, 1) == 2  # the worker survived both


async def test_crashed_worker_raises_and_is_replaced(no_leaks: None) -> None:
    async with WorkerPool(1) as pool:
        first = await pool.run(worker_pid)
        with pytest.raises(WorkerCrashed, match="exit code 3"):
            await pool.run(die, 3)
        second = await pool.run(worker_pid)
        assert second != first
        assert not alive(first)


async def test_initializer_runs_once_per_worker(no_leaks: None) -> None:
    async with WorkerPool(2, initializer=remember, initargs=("key",)) as pool:
        assert [await pool.run(recall) for _ in range(4)] == ["key"] * 4


async def test_cancelling_a_job_kills_its_worker(no_leaks: None) -> None:
    async with WorkerPool(2) as pool:
        pids = pool.pids
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, block)
            await anyio.wait_all_tasks_blocked()  # the job is sent, awaiting a reply
            tg.cancel_scope.cancel()
        assert sum(alive(pid) for pid in pids) == 1
        assert await pool.run(add, 1, 2) == 3  # a fresh worker replaced it


async def test_growing_pool_adds_a_worker_only_when_a_job_waits(
    no_leaks: None, tmp_path: Any
) -> None:
    async with WorkerPool(3, grow_after=0.01) as pool:
        for i in range(5):  # one job at a time: each finds the worker idle
            assert await pool.run(add, i, 1) == i + 1
        assert len(pool.pids) == 1
        pids: list[int] = []

        async def job() -> None:
            pids.append(await pool.run(pid_once_two_run, str(tmp_path)))

        # Each job finishes only once both run at once: the second finds the first
        # worker busy, waits, and gets a worker of its own (else this times out).
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(job)
                tg.start_soon(job)
        assert len(set(pids)) == 2 and len(pool.pids) == 2


async def test_pool_exit_stops_workers(no_leaks: None) -> None:
    async with WorkerPool(2) as pool:
        pids = pool.pids
        assert all(alive(pid) for pid in pids)
    assert not any(alive(pid) for pid in pids)


async def test_cpu_stage_error_cancels_run_and_cleans_up(no_leaks: None) -> None:
    async def numbers() -> AsyncIterator[int]:
        for n in range(1000):
            yield n

    async with open_engine(OPTIONS) as engine:
        pids = engine.pool.pids
        pipe = engine.pipeline("t").source("src", numbers())
        pipe.cpu("fail", fail, engine.pool, args=lambda n: (f"item {n}",) if n == 5 else ("",))
        with pytest.raises(StageError) as info:
            await pipe.run()
        assert info.value.stage == "fail"
        assert isinstance(info.value.__cause__, KeyError)
    assert not any(alive(pid) for pid in pids)


async def test_cancelled_engine_leaves_no_processes_or_shm(no_leaks: None) -> None:
    before = shm_segments()

    async def pieces(slots: SlotPool) -> AsyncIterator[Any]:
        while True:
            slot = await slots.acquire()
            slot.view[:4] = b"data"
            yield slot

    async def digest(slot: Any) -> None:
        try:
            await engine.pool.run(block)  # never returns: cancelled mid-job
        finally:
            slot.release()

    async with anyio.create_task_group() as tg, open_engine(OPTIONS) as engine:
        pids = engine.pool.pids
        assert len(shm_segments() - before) == 1
        pipe = engine.pipeline("t").source("src", pieces(engine.slots))
        tg.start_soon(pipe.map("block", digest, concurrency=2).run)
        await anyio.wait_all_tasks_blocked()  # both jobs stuck, slots full
        tg.cancel_scope.cancel()
    assert not any(alive(pid) for pid in pids)


async def test_cpu_stage_ordered_results_through_shared_memory(no_leaks: None) -> None:
    async with open_engine(OPTIONS) as engine:
        slots = engine.slots

        async def pieces() -> AsyncIterator[Any]:
            for n in range(40):
                slot = await slots.acquire()  # waits while 4 slots are in use
                data = f"piece {n}".encode()
                slot.view[: len(data)] = data
                yield slot, len(data)

        async def digest(piece: tuple[Any, int]) -> str:
            slot, length = piece
            try:
                return await engine.pool.run(sha256_of, slot.ref(length))
            finally:
                slot.release()

        seen: list[str] = []

        async def sink(d: str) -> None:
            seen.append(d)
            assert slots.in_use <= slots.slot_count

        pipe = engine.pipeline("t").source("read", pieces())
        await pipe.map("hash", digest, concurrency=4, ordered=True).sink("out", sink).run()
        assert seen == [hashlib.sha256(f"piece {n}".encode()).hexdigest() for n in range(40)]


def test_slot_memory_has_no_name_and_old_segments_of_dead_runs_go() -> None:
    # A named segment survives a SIGKILLed run until reboot; slot memory has
    # no name, so the kernel frees it with its last holder.
    ctx = multiprocessing.get_context("fork")
    gone = ctx.Process(target=os.getpid)
    gone.start()
    gone.join()
    stale = f"/dev/shm/cairn_{gone.pid}_deadbeef"  # what older versions leaked
    live = f"/dev/shm/cairn_{os.getpid()}_cafef00d"
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        removed = shm.sweep_stale_segments()
        assert os.path.basename(stale) in removed
        assert not os.path.exists(stale)
        assert os.path.exists(live)  # its process is still running
        named = set(os.listdir("/dev/shm"))
        slots = SlotPool(4096, 2)
        try:
            assert set(os.listdir("/dev/shm")) - named == set()
            assert shm_segments(), "the pool's memory is not a memfd"
        finally:
            slots.close()
    finally:
        for path in (stale, live):
            if os.path.exists(path):
                os.unlink(path)


def wait_for(path: str) -> str:
    while not os.path.exists(path):
        signal.sigtimedwait([], 0.01)  # a short nap that is not time.sleep's lint
    return path


def test_worker_whose_parent_hung_up_mid_job_exits_quietly(tmp_path: Any) -> None:
    # On Ctrl-C the parent closes the sockets of workers still running jobs; their
    # replies then hit a broken pipe, which must not print a traceback (exit 1).
    ctx = multiprocessing.get_context("forkserver")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=workers._worker_main, args=(child, None, ()))
    process.start()
    child.close()
    assert pickle.loads(parent.recv_bytes())[0]  # ready
    flag = str(tmp_path / "go")
    parent.send_bytes(pickle.dumps((wait_for, (flag,))))
    parent.close()
    open(flag, "w").close()
    process.join(30)
    assert process.exitcode == 0


async def test_slot_memory_is_handed_to_workers_and_a_reused_descriptor_is_not_confused(
    no_leaks: None,
) -> None:
    names: list[str] = []
    async with WorkerPool(1) as pool:
        for data in (b"first pool", b"second pool"):
            # The second pool's memfd usually gets the first one's descriptor number.
            slots = SlotPool(1024, 1)
            try:
                slot = await slots.acquire()
                slot.view[: len(data)] = data
                digest = await pool.run(sha256_of, slot.ref(len(data)))
                assert digest == hashlib.sha256(data).hexdigest()
                # Handed over the worker's socket, not looked up in /proc.
                assert slots.name in pool._all[0].attached
                names.append(slots.name)
                slot.release()
            finally:
                slots.close()
    # Same descriptor number, different memory: the key's token tells them apart.
    assert names[0].split(":")[:2] == names[1].split(":")[:2]
    assert names[0] != names[1]


# The fork server started ahead of a pool (a command does it before it opens the
# repository) must be the one the pool forks from, with the job code preloaded;
# run in a fresh interpreter, where no earlier test started a server.
_AHEAD = """
import sys
from multiprocessing import forkserver

import anyio

from cairn.pipeline.workers import WorkerPool, start_fork_server
from cairn.stages import cpu


def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


async def pool_parents():
    async with WorkerPool(2, initializer=cpu.init_worker, initargs=(None,)) as pool:
        return sorted({parent(pid) for pid in pool.pids})


if __name__ == "__main__":
    server = forkserver._forkserver
    assert server._forkserver_pid is None
    start_fork_server([cpu.init_worker.__module__])
    started = server._forkserver_pid
    print(started, server._preload_modules, anyio.run(pool_parents), server._forkserver_pid)
"""


def test_fork_server_started_ahead_is_the_one_the_pool_forks_from(tmp_path: Path) -> None:
    script = tmp_path / "ahead.py"
    script.write_text(_AHEAD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    started, rest = out.stdout.split(maxsplit=1)
    assert rest.strip() == (f"['cairn.pipeline.workers', 'cairn.stages.cpu'] [{started}] {started}")


def test_workers_import_this_cairn_whatever_the_working_directory(tmp_path: Path) -> None:
    """Run from a directory holding another ``cairn/`` (a source checkout), the fork
    server must not import that one (Python 3.11 puts the directory first)."""
    decoy = tmp_path / "checkout"
    (decoy / "cairn").mkdir(parents=True)
    (decoy / "cairn" / "__init__.py").write_text("raise RuntimeError('the wrong cairn')\n")
    script = tmp_path / "bin" / "run_pool.py"
    script.parent.mkdir()
    script.write_text(
        "import math\n"
        "import anyio\n"
        "from cairn.pipeline.workers import WorkerPool\n"
        "async def main():\n"
        "    async with WorkerPool(1) as pool:\n"
        "        print(await pool.run(math.floor, 2.5))\n"
        "if __name__ == '__main__':\n"
        "    anyio.run(main)\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("PYTHONSAFEPATH", None)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=decoy, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"
    assert "PYTHONSAFEPATH" not in os.environ
