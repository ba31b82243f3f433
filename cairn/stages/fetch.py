"""Stages shared by every command that reads packs: plan the ranges, download them.

* :func:`plan_ranges` groups the blobs a command needs per pack into contiguous byte
  ranges (:class:`Batch`), each small enough for one shared-memory slot;
  :func:`whole_pack` is the batch for a command that must read a pack entire
  (``check --read-data`` hashes the stored bytes against the pack's name).
* :func:`download` is the download stage: it takes a slot, loads the batch's range
  into it and passes on a :class:`Fetched` that *owns* the slot. The stage that
  finishes with the bytes (a decode or verify job in the worker pool) releases it
  (``Pipeline.map(..., release=Fetched.release)``), so downloads run ahead of the
  CPU work by as many slots as are free — and no further: memory is bounded by the
  slot count times the slot size.
* :class:`DownloadPace` narrows that further to as many downloads at once as keep
  the workers busy (``check --read-data``: each whole-pack load is a pack-sized
  buffer until it is in its slot).

A load that fails with one of the errors the command names does not stop the
pipeline: the :class:`Fetched` carries the error instead of a slot, and the command
decides what it costs (restore fails the files needing those blobs; check reports
the pack).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import anyio

from cairn.backends.base import BackendError, ObjectTruncated, object_name
from cairn.pipeline import Pipeline, PipelineOptions, PipelineSnapshot, raising_causes
from cairn.pipeline.metrics import waiting_on_output
from cairn.pipeline.shm import Slot, SlotPool, SlotRef

T = TypeVar("T")

MiB = 1024 * 1024
# A ranged download never spans more than this; it must hold the largest encoded
# blob (an incompressible 8 MiB chunk plus its envelope).
SLOT_SIZE = 8 * MiB + 64 * 1024
# Gaps between needed blobs smaller than this are downloaded rather than split
# into two requests (a request costs more than reading 1 MiB locally or remotely).
MERGE_GAP = 1 * MiB
# A range holds at most this many blobs: it is one worker job, and a pack of small
# files cut into a handful of jobs of a thousand files each leaves a worker idle
# while the last one runs.
MAX_BLOBS = 256


class Batch(NamedTuple):
    """One download: ``length`` bytes at ``offset`` of pack ``pack_id``.

    ``blobs`` are the caller's descriptions of what the range holds, in pack order
    (restore: ``(location, blob ID)``; check: the index entries). ``whole``: load
    the entire object and require it to be exactly ``length`` bytes.
    """

    pack_id: bytes
    offset: int
    length: int
    blobs: list[Any]
    whole: bool = False


class PackSizeChanged(BackendError):
    """A pack read whole is not the size the listing gave for it."""


@dataclass
class Fetched:
    """A downloaded batch: its bytes in ``slot`` (which it owns), or the ``error``."""

    batch: Batch
    slot: Slot | None = None
    error: BaseException | None = None

    def ref(self) -> SlotRef:
        """The downloaded bytes, for a worker job."""
        if self.slot is None:
            raise RuntimeError(f"batch not downloaded: {self.error}")
        return self.slot.ref(self.batch.length)

    def release(self) -> None:
        """Give the slot back (idempotent); the stage done with the bytes calls it."""
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.release()


def plan_ranges(
    blobs: Iterable[tuple[bytes, int, int, Any]],
    max_span: int = SLOT_SIZE,
    merge_gap: int = MERGE_GAP,
    max_blobs: int = MAX_BLOBS,
) -> list[Batch]:
    """Group ``(pack ID, offset, length, what)`` per pack into ranges of at most
    ``max_span`` bytes and ``max_blobs`` blobs, split where the gap to the next
    needed blob exceeds ``merge_gap``. Each pack is read once, front to back."""
    per_pack: dict[bytes, list[tuple[int, int, Any]]] = defaultdict(list)
    for pack_id, offset, length, what in blobs:
        per_pack[pack_id].append((offset, length, what))
    batches = []
    for pack_id, entries in per_pack.items():
        entries.sort(key=lambda e: e[0])
        start = end = 0
        current: list[Any] = []
        for offset, length, what in entries:
            if current and (
                offset + length - start > max_span
                or offset - end > merge_gap
                or len(current) >= max_blobs
            ):
                batches.append(Batch(pack_id, start, end - start, current))
                current = []
            if not current:
                start = end = offset
            current.append(what)
            end = max(end, offset + length)
        if current:
            batches.append(Batch(pack_id, start, end - start, current))
    return batches


def whole_pack(pack_id: bytes, size: int, blobs: list[Any]) -> Batch:
    """A batch reading all ``size`` bytes of a pack (for its storage ID)."""
    return Batch(pack_id, 0, size, blobs, whole=True)


# What to tune when a stage limits a restore or check (the bottleneck line).
DOWNLOAD_HINT = "--connections (the backend is slow to answer)"
THROTTLE_HINT = "--limit-download (the download limit holds it)"
CPU_HINT = "--cpu-workers"
SINK_HINT = "none: the main process's bookkeeping (report it)"


def batch_bytes(item: Batch | Fetched) -> int:
    """Bytes a batch moves: the ``sizeof`` of the plan and download stages."""
    batch = item.batch if isinstance(item, Fetched) else item
    return batch.length


def download(
    backend: Any, slots: SlotPool, errors: tuple[type[BaseException], ...] = (BackendError,)
) -> Callable[[Batch], Awaitable[Fetched]]:
    """The download stage over ``backend`` into ``slots``: ``fetch(batch)``.

    Run it with as many tasks as backend connections. Its wait for a free slot
    counts as waiting on output in the stage's metrics. A load failing with one of
    ``errors`` yields a :class:`Fetched` carrying the error (and no slot).
    """

    async def fetch(batch: Batch) -> Fetched:
        # A free slot waits for a later stage to finish with one: not download time.
        with waiting_on_output():
            slot = await slots.acquire()
        try:
            name = object_name("data", batch.pack_id.hex())
            if batch.whole:
                data = await backend.load(name)
                if len(data) != batch.length:
                    raise PackSizeChanged(f"size changed from {batch.length} to {len(data)}")
            else:
                data = await backend.load(name, batch.offset, batch.length)
                if len(data) != batch.length:
                    raise ObjectTruncated(
                        f"{name}: {len(data)} of {batch.length} bytes at offset {batch.offset}"
                    )
            slot.view[: len(data)] = data
        except errors as exc:
            slot.release()
            return Fetched(batch, error=exc)
        except BaseException:
            slot.release()
            raise
        return Fetched(batch, slot)

    return fetch


async def run_fetch_pipeline(
    name: str,
    batches: Iterable[Batch] | AsyncIterable[Batch],
    fetch: Callable[[Batch], Awaitable[Fetched]],
    *,
    downloads: int,
    work: tuple[str, Callable[[Fetched], Awaitable[T]], int, str],
    sink: tuple[str, Callable[[T], Awaitable[None]]],
    options: PipelineOptions,
    record: Callable[[PipelineSnapshot], None],
) -> None:
    """plan → download (``downloads`` tasks) → ``work`` (name, function, concurrency,
    hint; it releases each item's slot) → ``sink``: the pipeline every pack reader
    runs. ``record`` receives the final metrics, also on failure. What failed is
    raised as itself (a target error, a bug), not as "a stage failed".
    """
    work_name, work_fn, work_tasks, work_hint = work
    sink_name, sink_fn = sink
    pipeline = (
        Pipeline(name, options=options)
        .source("plan", batches, sizeof=batch_bytes)
        .map(
            "download",
            fetch,
            concurrency=downloads,
            sizeof=batch_bytes,
            hint=DOWNLOAD_HINT,
            throttle_hint=THROTTLE_HINT,
        )
        .map(
            work_name,
            work_fn,
            concurrency=work_tasks,
            sizeof=batch_bytes,
            release=Fetched.release,
            hint=work_hint,
        )
        .sink(sink_name, sink_fn, hint=SINK_HINT)
    )
    try:
        with raising_causes():
            await pipeline.run()
    finally:
        record(pipeline.snapshot(done=True))


def downloads_needed(workers: int, download_s: float, verify_s: float, most: int) -> int:
    """Whole-pack downloads to keep in flight so ``workers`` never wait for one: a
    download takes ``download_s``, a worker verifies a pack in ``verify_s``."""
    if download_s <= 0 or verify_s <= 0:
        return most
    return max(1, min(most, math.ceil(workers * download_s / verify_s)))


class DownloadPace:
    """Paces the download stage of whole packs (``check --read-data``): as many
    downloads at once as keep the workers busy (at most ``most``), measured as the
    packs go. Pass it to :func:`download` as the backend (it times ``load``) and
    wrap that stage's function in :meth:`paced`.

    Each pack being downloaded is a pack-sized buffer in the main process before it
    is copied into its slot. A local disk hands over a 16 MiB pack in a few ms while
    a worker verifies one in ~25 ms: one load at a time keeps two workers busy, and
    four cost four buffers (64 MiB of the default corpus's peak) for no speed. A
    remote store, slower per load than a worker, gets every connection it has.
    It starts at one load and adjusts after each download and each verification.
    """

    # Weight of the newest measurement in the running averages.
    _ALPHA = 0.3

    def __init__(self, backend: Any, workers: int, most: int) -> None:
        self._backend = backend
        self._workers = workers
        self._most = max(1, most)
        self.limiter = anyio.CapacityLimiter(1)
        self._loads = 0
        self._download_s = 0.0
        self._verify_s = 0.0

    def paced(
        self, fetch: Callable[[Batch], Awaitable[Fetched]]
    ) -> Callable[[Batch], Awaitable[Fetched]]:
        """The download stage's ``fetch``, one turn per download: a turn is taken
        before the download's slot, so a download waiting for its turn holds none."""

        async def run(batch: Batch) -> Fetched:
            # Waiting for a turn is waiting for the workers, as waiting for a slot is.
            with waiting_on_output():
                await self.limiter.acquire()
            try:
                return await fetch(batch)
            finally:
                self.limiter.release()

        return run

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """``backend.load``, timed: its duration feeds the pace."""
        started = anyio.current_time()
        data: bytes = await self._backend.load(name, offset, length)
        if self._loads:  # the first one also faulted in its buffer's pages
            self._download_s = self._average(self._download_s, anyio.current_time() - started)
        self._loads += 1
        self._adjust()
        return data

    def verified(self, seconds: float) -> None:
        """A worker job took ``seconds`` (waiting for a free worker included)."""
        self._verify_s = self._average(self._verify_s, seconds)
        self._adjust()

    def settled(self) -> dict[str, float]:
        """Where the pace settled: downloads at once and the two running averages."""
        return {
            "downloads": self.limiter.total_tokens,
            "download_seconds": round(self._download_s, 4),
            "verify_seconds": round(self._verify_s, 4),
        }

    def _average(self, mean: float, sample: float) -> float:
        return sample if mean == 0 else mean + self._ALPHA * (sample - mean)

    def _adjust(self) -> None:
        if not (self._download_s and self._verify_s):
            return
        wanted = downloads_needed(self._workers, self._download_s, self._verify_s, self._most)
        # Down at once, up one at a time: the first packs' times are inflated
        # (first touch of slot memory in both processes, a cold disk), and every
        # extra download costs a pack-sized buffer for the rest of the run.
        current = int(self.limiter.total_tokens)
        self.limiter.total_tokens = wanted if wanted <= current else current + 1
