"""Stages and channels: ordering, fan-out, backpressure, errors (asyncio and trio)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from cairn.pipeline import Pipeline, PipelineOptions, Slot, SlotPool, StageError

pytestmark = pytest.mark.anyio


async def scramble(rng: random.Random) -> None:
    # Random numbers of checkpoints reorder task completion without real time.
    for _ in range(rng.randrange(20)):
        await anyio.lowlevel.checkpoint()


def collector() -> tuple[list[Any], Any]:
    seen: list[Any] = []

    async def sink(item: Any) -> None:
        seen.append(item)

    return seen, sink


async def test_ordered_map_keeps_input_order_under_fan_out() -> None:
    rng = random.Random(1)
    running = 0
    peak = 0

    async def work(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await scramble(rng)
        running -= 1
        return n * 10

    seen, sink = collector()
    pipe = Pipeline("t").source("src", range(200)).map("work", work, concurrency=8, ordered=True)
    await pipe.sink("out", sink).run()
    assert seen == [n * 10 for n in range(200)]
    assert peak > 1


@pytest.mark.parametrize("ordered", [False, True])
async def test_fan_out_runs_all_tasks_at_once(ordered: bool) -> None:
    # Every item waits until 6 are running: this only finishes if the stage
    # really has 6 tasks in flight (fail_after turns a hang into a failure).
    running = 0
    all_in = anyio.Event()

    async def work(n: int) -> int:
        nonlocal running
        running += 1
        if running == 6:
            all_in.set()
        await all_in.wait()
        return n

    seen, sink = collector()
    pipe = Pipeline("t").source("src", range(6)).map("w", work, concurrency=6, ordered=ordered)
    with anyio.fail_after(10):
        await pipe.sink("out", sink).run()
    assert sorted(seen) == list(range(6))


async def test_unordered_map_delivers_everything_out_of_order() -> None:
    rng = random.Random(2)

    async def work(n: int) -> int:
        await scramble(rng)
        return n

    seen, sink = collector()
    pipe = Pipeline("t").source("src", range(200)).map("work", work, concurrency=8)
    await pipe.sink("out", sink).run()
    assert sorted(seen) == list(range(200))
    assert seen != list(range(200))


async def test_ordered_generator_stage_streams_many_outputs_per_item_in_order() -> None:
    rng = random.Random(3)

    async def pieces(n: int) -> AsyncIterator[tuple[int, int]]:
        for i in range(n % 5):  # zero outputs for some items
            await scramble(rng)
            yield (n, i)

    seen, sink = collector()
    pipe = Pipeline("t").source("src", range(50)).map("split", pieces, concurrency=4, ordered=True)
    await pipe.sink("out", sink).run()
    assert seen == [(n, i) for n in range(50) for i in range(n % 5)]


async def test_async_source_and_raw_stage() -> None:
    async def numbers() -> AsyncIterator[int]:
        for n in range(10):
            yield n

    async def triples(receive: Any, send: Any) -> None:
        # Stateful: group items in threes, flush the remainder at end of input.
        batch: list[int] = []
        async for n in receive:
            batch.append(n)
            if len(batch) == 3:
                await send.send(tuple(batch))
                batch = []
        if batch:
            await send.send(tuple(batch))

    seen, sink = collector()
    pipe = Pipeline("t").source("src", numbers()).stage("group", triples).sink("out", sink)
    snap = await pipe.run()
    assert seen == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9,)]
    assert snap.stage("group").items_in == 10
    assert snap.stage("group").items_out == 4


@pytest.mark.parametrize("ordered", [False, True])
async def test_backpressure_bounds_items_in_flight(ordered: bool) -> None:
    produced = 0
    release = anyio.Event()
    opts = PipelineOptions(channel_capacity=2)

    def source() -> Any:
        nonlocal produced
        for n in range(10_000):
            produced += 1
            yield n

    async def passthrough(n: int) -> int:
        return n

    async def stuck(n: int) -> None:
        await release.wait()

    pipe = (
        Pipeline("t", options=opts)
        .source("src", source())
        .map("a", passthrough, concurrency=3, ordered=ordered)
        .map("b", passthrough)
        .sink("slow", stuck)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(pipe.run)
        await anyio.wait_all_tasks_blocked()
        in_flight = produced
        release.set()
        tg.cancel_scope.cancel()
    # 1 in the sink + 3 channels x 2 + 1 in "b" + 1 the source holds while
    # blocked + stage "a": its 3 tasks, or when ordered its 2 x 3 reorder
    # queue + the collector's and the dispatcher's item.
    held_by_a = 2 * 3 + 2 if ordered else 3
    assert in_flight == 1 + 3 * 2 + 1 + 1 + held_by_a


async def test_first_error_cancels_pipeline_and_names_stage_and_item() -> None:
    cancelled = 0
    sleeping = 0
    three_asleep = anyio.Event()

    async def work(n: int) -> int:
        nonlocal cancelled, sleeping
        if n == 7:
            await three_asleep.wait()  # fail only once items 8-10 are stuck
            raise ValueError("bad item")
        if n > 7:
            sleeping += 1
            if sleeping == 3:
                three_asleep.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled += 1
                raise
        return n

    pipe = Pipeline("t").source("src", range(100)).map("work", work, concurrency=4)
    with pytest.raises(StageError) as info:
        await pipe.run()
    assert info.value.stage == "work"
    assert info.value.item == 7
    assert isinstance(info.value.__cause__, ValueError)
    assert cancelled == 3  # the siblings stuck on items 8-10 were cancelled


@pytest.mark.parametrize("where", ["source", "generator", "sink", "raw"])
async def test_errors_from_every_kind_of_stage(where: str) -> None:
    def source() -> Any:
        yield 1
        if where == "source":
            raise KeyError("gone")
        yield 2

    async def agen_source() -> AsyncIterator[int]:
        for n in source():
            yield n

    async def gen(n: int) -> AsyncIterator[int]:
        if where == "generator":
            raise OSError("read failed")
        yield n

    async def raw(receive: Any, send: Any) -> None:
        async for n in receive:
            if where == "raw":
                raise RuntimeError("pack failed")
            await send.send(n)

    async def sink(n: int) -> None:
        if where == "sink":
            raise RuntimeError("write failed")

    pipe = (
        Pipeline("t")
        .source("src", agen_source())
        .map("gen", gen)
        .stage("raw", raw)
        .sink("out", sink)
    )
    with pytest.raises(StageError) as info:
        await pipe.run()
    expected = {"source": "src", "generator": "gen", "sink": "out", "raw": "raw"}[where]
    assert info.value.stage == expected
    assert info.value.item == (1 if where in ("generator", "sink") else None)


async def test_outside_cancellation_stops_all_stages() -> None:
    started = anyio.Event()

    async def forever() -> AsyncIterator[int]:
        n = 0
        while True:
            n += 1
            yield n

    async def sink(n: int) -> None:
        started.set()

    pipe = Pipeline("t").source("src", forever()).sink("out", sink)
    with anyio.move_on_after(5) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipe.run)
            await started.wait()
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught


async def test_pipeline_validation() -> None:
    async def f(x: Any) -> Any:
        return x

    with pytest.raises(ValueError, match="source"):
        Pipeline().map("a", f)
    with pytest.raises(ValueError, match="duplicate"):
        Pipeline().source("a", []).map("a", f)
    with pytest.raises(ValueError, match="sink"):
        Pipeline().source("a", []).sink("b", f).map("c", f)


@pytest.mark.parametrize("ordered", [False, True])
async def test_items_owning_slots_are_released_by_the_stage_that_finishes_them(
    ordered: bool,
) -> None:
    # The source takes a slot per item from a pool of 3: 40 items get through only
    # if the stage that finishes with each item gives its slot back, before its
    # output waits in a channel (else this hangs and fail_after fails it).
    slots = SlotPool(16, 3)

    async def source() -> AsyncIterator[Slot]:
        for n in range(40):
            slot = await slots.acquire()
            slot.view[0] = n
            yield slot

    async def read(slot: Slot) -> int:
        return int(slot.view[0])

    async def stuck_until_all_read(n: int) -> int:
        return n

    seen, sink = collector()
    pipe = (
        Pipeline("t", options=PipelineOptions(channel_capacity=4))
        .source("src", source())
        .map("read", read, concurrency=2, ordered=ordered, release=Slot.release)
        .map("later", stuck_until_all_read)
        .sink("out", sink)
    )
    try:
        with anyio.fail_after(10):
            await pipe.run()
        assert sorted(seen) == list(range(40))
        assert slots.in_use == 0
    finally:
        slots.close()


@pytest.mark.parametrize("kind", ["map", "sink"])
async def test_release_runs_when_the_stage_function_fails(kind: str) -> None:
    slots = SlotPool(16, 1)

    async def source() -> AsyncIterator[Slot]:
        yield await slots.acquire()

    async def fail(slot: Slot) -> None:
        raise ValueError("damaged")

    pipe = Pipeline("t").source("src", source())
    if kind == "map":
        pipe.map("read", fail, release=Slot.release)
    else:
        pipe.sink("read", fail, release=Slot.release)
    try:
        with pytest.raises(StageError, match="damaged"):
            await pipe.run()
        assert slots.in_use == 0
    finally:
        slots.close()
