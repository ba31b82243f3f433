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

A load that fails with one of the errors the command names does not stop the
pipeline: the :class:`Fetched` carries the error instead of a slot, and the command
decides what it costs (restore fails the files needing those blobs; check reports
the pack).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

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
