"""Engine benchmark: file -> CPU stage (BLAKE3 + zstd-3 + AES-GCM) -> discard.

    python -m bench.engine --size 1GiB --cpu-workers 1,2

Reports MB/s for the pipeline with each worker count, the same work in a
plain single-core loop, a pass-through pipeline (no CPU stage), a
pass-through that still round-trips every piece through a worker, worker
start-up cost, and the per-job cost of two ways to await a worker.
Results are recorded in bench/ENGINE.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import blake3
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cairn.pipeline import PipelineOptions, Slot, SlotWriter, WorkerPool, open_engine

MiB = 1024 * 1024
OVERHEAD = 64 * 1024  # zstd frame + GCM tag headroom in an output slot

# --- the CPU work, run in workers (module-level, set up once per worker) ---

_compressor: Any = None
_cipher: Any = None


def setup(key: bytes) -> None:
    """Worker initializer: build the compressor and cipher once per process."""
    global _compressor, _cipher
    _compressor = zstandard.ZstdCompressor(level=3)
    _cipher = AESGCM(key)


def seal(piece: memoryview, out: memoryview) -> tuple[bytes, int]:
    """Hash, compress and encrypt one piece into ``out``; return (id, stored length)."""
    return _seal(piece, out)


def timed_seal(piece: memoryview, out: memoryview) -> tuple[float, float]:
    """``seal``, returning its wall and CPU seconds instead (to tell a starved
    worker from a descheduled one on a shared machine)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    _seal(piece, out)
    return time.perf_counter() - wall, time.thread_time() - cpu


def _seal(piece: memoryview, out: memoryview) -> tuple[bytes, int]:
    blob_id = blake3.blake3(piece, max_threads=1).digest()
    packed = _compressor.compress(piece)
    stored = _cipher.encrypt(blob_id[:12], packed, blob_id)
    where = SlotWriter(out).write(stored)
    if where is None:
        raise ValueError("output slot too small")
    return blob_id, len(stored)


def noop(*args: Any) -> None:
    """A job that does nothing: measures the bridge alone."""


# --- input ---


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_input(size: int) -> Path:
    """A compressible file: this Python's standard library sources, repeated.

    Source code is the "compressible text" case of DESIGN.md (zstd-3 packs
    it about 4.8:1); cached in the temp directory between runs.
    """
    path = Path(tempfile.gettempdir(), f"cairn-bench-engine-{size}.py.txt")
    if path.exists() and path.stat().st_size == size:
        return path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py")))
    with path.open("wb") as f:
        written = 0
        while written < size:
            n = min(len(corpus), size - written)
            f.write(corpus[:n])
            written += n
    return path


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by the given processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


# --- the runs ---


async def run_engine(
    path: Path, workers: int, cpu: bool, slot_size: int, jobs_per_worker: int = 2
) -> float:
    """Read ``path`` into slots, seal (or no-op) each piece in workers; seconds."""
    opts = PipelineOptions(cpu_workers=workers, slot_size=slot_size)
    async with open_engine(opts, initializer=setup, initargs=(os.urandom(32),)) as engine:
        out_slots = engine.slot_pool(slot_size + OVERHEAD)
        job: Callable[..., Any] = timed_seal if cpu else noop
        in_job = [0.0, 0.0]

        async def seal_piece(piece: tuple[Slot, int]) -> Any:
            slot, length = piece
            out = await out_slots.acquire()
            try:
                timing = await engine.pool.run(job, slot.ref(length), out.ref())
                if timing:
                    in_job[0] += timing[0]
                    in_job[1] += timing[1]
            finally:
                slot.release()
                out.release()

        pids = engine.pool.pids
        cpu_before, parent_before = cpu_seconds(pids), time.process_time()
        start = time.perf_counter()
        pipe = engine.pipeline("bench").source("read", read_pieces(path, engine.slots))
        # Two jobs per worker: one running, one ready the moment it finishes.
        width = jobs_per_worker * workers
        await pipe.map("seal", seal_piece, concurrency=width, ordered=True).run()
        elapsed = time.perf_counter() - start
        busy = (cpu_seconds(pids) - cpu_before) / (elapsed * workers)
        parent = (time.process_time() - parent_before) / elapsed
        fed = in_job[0] / (elapsed * workers)
        on_cpu = in_job[1] / in_job[0] if in_job[0] else 0.0
        print(
            f"  workers: CPU {busy:.0%} of {workers} cores, in a job {fed:.0%} of the time"
            f" (on CPU {on_cpu:.0%} of it); parent {parent:.0%} of a core"
        )
        return elapsed


async def run_passthrough(path: Path, slot_size: int) -> float:
    """Read into slots and release them in a second stage: the engine's own cost."""
    opts = PipelineOptions(cpu_workers=1, slot_size=slot_size)
    async with open_engine(opts) as engine:

        async def release(piece: tuple[Slot, int]) -> int:
            piece[0].release()
            return piece[1]

        start = time.perf_counter()
        pipe = engine.pipeline("pass").source("read", read_pieces(path, engine.slots))
        await pipe.map("release", release, concurrency=2, ordered=True).run()
        return time.perf_counter() - start


async def read_pieces(path: Path, slots: Any) -> AsyncIterator[tuple[Slot, int]]:
    """Fill slots from the file in order; waits when all slots are in flight."""
    with path.open("rb", buffering=0) as f:
        while True:
            slot = await slots.acquire()
            n = await anyio.to_thread.run_sync(f.readinto, slot.view)
            if not n:
                slot.release()
                return
            yield slot, n


def run_plain(path: Path, slot_size: int) -> float:
    """The same work in one process, one core, no engine."""
    setup(os.urandom(32))
    piece, out = bytearray(slot_size), bytearray(slot_size + OVERHEAD)
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(piece):
            seal(memoryview(piece)[:n], memoryview(out))
    return time.perf_counter() - start


# --- bridge and start-up measurements ---


async def bridge_costs(jobs: int) -> dict[str, float]:
    """Microseconds per no-op job: our socket bridge vs to_thread + futures."""
    results = {}
    async with WorkerPool(1) as pool:
        start = time.perf_counter()
        for _ in range(jobs):
            await pool.run(noop)
        results["socket + wait_readable"] = (time.perf_counter() - start) / jobs * 1e6
    ctx = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as executor:
        executor.submit(noop).result()
        start = time.perf_counter()
        for _ in range(jobs):
            await anyio.to_thread.run_sync(executor.submit(noop).result)
        results["ProcessPoolExecutor + to_thread"] = (time.perf_counter() - start) / jobs * 1e6
    return results


async def startup_costs(workers: int) -> dict[str, float]:
    """Milliseconds to start ``workers`` ready workers, per start method."""
    results = {}
    for label, method in (
        ("forkserver, first pool (starts the server)", "forkserver"),
        ("forkserver, server running", "forkserver"),
        ("spawn", "spawn"),
    ):
        start = time.perf_counter()
        async with WorkerPool(workers, start_method=method):
            results[label] = (time.perf_counter() - start) * 1e3
    return results


async def main(args: argparse.Namespace) -> None:
    size = parse_size(args.size)
    slot_size = parse_size(args.slot_size)
    mb = size / 1e6
    path = make_input(size)
    print(f"input: {path} ({size / MiB:.0f} MiB), slot size {slot_size // MiB} MiB")
    for label, ms in (await startup_costs(args.max_workers)).items():
        print(f"start-up of {args.max_workers} workers, {label}: {ms:.0f} ms")
    for label, us in (await bridge_costs(2000)).items():
        print(f"no-op job round trip, {label}: {us:.0f} us")
    # Warm the page cache so every run reads from memory alike.
    run_plain_read(path, slot_size)
    plain = mb / run_plain(path, slot_size)
    print(f"plain loop, 1 core:            {plain:7.0f} MB/s")
    rates = {}
    for workers in args.cpu_workers:
        rates[workers] = mb / await run_engine(path, workers, True, slot_size, args.jobs_per_worker)
        print(f"engine, cpu-workers={workers}:        {rates[workers]:7.0f} MB/s")
    passthrough = mb / await run_passthrough(path, slot_size)
    print(f"pass-through (no CPU stage):   {passthrough:7.0f} MB/s")
    via_workers = mb / await run_engine(path, args.max_workers, False, slot_size)
    print(f"pass-through via workers (no-op job): {via_workers:7.0f} MB/s")
    if 1 in rates and 2 in rates:
        print(f"workers=2 / workers=1: {rates[2] / rates[1]:.2f}x (target >= 1.8x)")
        print(f"workers=2 / (2 x plain): {rates[2] / (2 * plain):.0%} (target >= 85%)")


def run_plain_read(path: Path, slot_size: int) -> None:
    buf = bytearray(slot_size)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="input size (default 1GiB)")
    parser.add_argument("--slot-size", default="8MiB", help="piece size (default 8MiB)")
    parser.add_argument(
        "--cpu-workers", default="1,2", help="comma-separated worker counts (default 1,2)"
    )
    parser.add_argument(
        "--jobs-per-worker", type=int, default=2, help="CPU jobs in flight per worker"
    )
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    args.cpu_workers = [int(n) for n in args.cpu_workers.split(",")]
    args.max_workers = max(args.cpu_workers)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    anyio.run(main, arguments, backend=arguments.backend)
