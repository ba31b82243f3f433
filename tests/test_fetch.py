"""The shared plan and download stages of restore and check --read-data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from cairn.backends.base import NotFound, ObjectTruncated
from cairn.backends.local import LocalBackend
from cairn.pipeline import Pipeline, PipelineOptions, SlotPool
from cairn.stages.fetch import (
    Batch,
    Fetched,
    PackSizeChanged,
    download,
    plan_ranges,
    whole_pack,
)

pytestmark = pytest.mark.anyio

A, B = b"\xaa" * 32, b"\xbb" * 32


def test_plan_ranges_reads_each_pack_front_to_back_in_slot_sized_ranges() -> None:
    blobs = [
        (A, 300, 100, "a3"),  # out of order: sorted by offset
        (A, 0, 100, "a0"),
        (A, 100, 100, "a1"),  # adjacent: same range
        (A, 250, 40, "a2"),  # a gap of 50 <= merge_gap: read through
        (A, 1000, 100, "a4"),  # a gap of 600: a new range
        (A, 1100, 500, "a5"),  # would make the range 600 > max_span: a new range
        (B, 7, 3, "b0"),
    ]
    batches = plan_ranges(blobs, max_span=550, merge_gap=500)
    assert batches == [
        Batch(A, 0, 400, ["a0", "a1", "a2", "a3"]),
        Batch(A, 1000, 100, ["a4"]),
        Batch(A, 1100, 500, ["a5"]),
        Batch(B, 7, 3, ["b0"]),
    ]
    assert not any(b.whole for b in batches)
    # At most max_blobs per range: one range is one worker job.
    small = [(A, 10 * i, 10, i) for i in range(7)]
    assert [b.blobs for b in plan_ranges(small, max_blobs=3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_ranges(small, max_blobs=3)[1] == Batch(A, 30, 30, [3, 4, 5])


async def _backend(tmp_path: Path) -> LocalBackend:
    backend = LocalBackend(tmp_path / "repo")
    await backend.create_layout()
    for pack_id in (A, B):
        await backend.save(f"data/{pack_id.hex()[:2]}/{pack_id.hex()}", pack_id[:1] * 1000)
    return backend


async def test_downloads_run_ahead_of_a_stuck_consumer_up_to_the_free_slots(
    tmp_path: Path,
) -> None:
    # The consumer holds its first item until four have been downloaded: with a
    # downloader that waited for its item to be consumed (restore and check
    # before they were pipelines) this would hang, and fail_after fails it.
    backend = await _backend(tmp_path)
    slots = SlotPool(1000, 5)
    batches = [Batch(A, i * 100, 100, [i]) for i in range(10)]
    downloaded = 0
    four_down = anyio.Event()
    seen: list[bytes] = []

    fetch = download(backend, slots)

    async def counting_fetch(batch: Batch) -> Fetched:
        nonlocal downloaded
        fetched = await fetch(batch)
        downloaded += 1
        if downloaded == 4:
            four_down.set()
        return fetched

    async def consume(fetched: Fetched) -> None:
        await four_down.wait()
        assert fetched.slot is not None
        seen.append(bytes(fetched.slot.view[: fetched.batch.length]))

    pipe = (
        Pipeline("t", options=PipelineOptions(channel_capacity=1))
        .source("plan", batches)
        .map("download", counting_fetch, concurrency=2)
        .sink("consume", consume, release=Fetched.release)
    )
    try:
        with anyio.fail_after(10):
            await pipe.run()
        assert seen == [b"\xaa" * 100] * 10
        assert slots.in_use == 0
    finally:
        slots.close()


@pytest.mark.parametrize(
    ("batch", "error"),
    [
        (Batch(b"\xcc" * 32, 0, 10, []), NotFound),  # the pack is gone
        (whole_pack(A, 1200, []), PackSizeChanged),  # shorter than the listing said
        (whole_pack(A, 900, []), PackSizeChanged),  # longer (never written past the slot)
        (Batch(A, 950, 100, []), ObjectTruncated),  # a range past the end
    ],
)
async def test_a_failed_download_carries_its_error_and_holds_no_slot(
    tmp_path: Path, batch: Batch, error: type[Exception]
) -> None:
    backend = await _backend(tmp_path)
    slots = SlotPool(1000, 1)
    try:
        fetched = await download(backend, slots)(batch)
        assert isinstance(fetched.error, error)
        assert fetched.slot is None and slots.in_use == 0
        ok: Any = await download(backend, slots)(whole_pack(B, 1000, []))
        assert ok.error is None and bytes(ok.slot.view[:3]) == b"\xbb" * 3
        ok.release()
        ok.release()  # idempotent
        assert slots.in_use == 0
    finally:
        slots.close()
