"""The builder's fan-in (inlets), per-link capacities and producer sources
(asyncio and trio)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from anyio.abc import ObjectSendStream

from cairn.pipeline import Pipeline, PipelineOptions

pytestmark = pytest.mark.anyio


async def gather(receive: Any, send: Any) -> None:
    """A raw stage that passes on, at end of input, everything it received."""
    got = [item async for item in receive]
    await send.send(sorted(got))


async def test_inlet_items_reach_the_stage_and_end_of_input_waits_for_the_until_stage() -> None:
    # "work" feeds a second item per input into "gather" through the inlet, the
    # last ones after its own outputs went on: "gather" must still see them all,
    # so its input ends only once "work" has finished, not when its upstream does.
    pipe = Pipeline("t", options=PipelineOptions(channel_capacity=1))
    inlet = pipe.inlet("gather", until="work")

    async def work(n: int) -> int:
        for _ in range(n % 5):
            await anyio.lowlevel.checkpoint()
        await inlet.send(100 + n)
        return n

    out: list[Any] = []

    async def sink(items: list[int]) -> None:
        out.append(items)

    pipe.source("src", range(20)).map("work", work, concurrency=3).stage("pass", _passthrough)
    pipe.stage("gather", gather).sink("out", sink)
    with anyio.fail_after(10):  # a never-closed inlet would hang here
        snap = await pipe.run()
    assert out == [sorted([*range(20), *range(100, 120)])]
    assert snap.stage("gather").items_in == 40


async def _passthrough(receive: Any, send: Any) -> None:
    async for item in receive:
        await send.send(item)


async def test_inlet_fed_by_the_source_closes_when_the_source_ends() -> None:
    pipe = Pipeline("t")
    inlet = pipe.inlet("gather", until="src")

    async def produce(send: ObjectSendStream[Any]) -> None:
        for n in range(5):
            await send.send(n)
            await inlet.send(-n - 1)

    out: list[Any] = []

    async def sink(items: list[int]) -> None:
        out.append(items)

    pipe.source("src", produce).stage("gather", gather).sink("out", sink)
    with anyio.fail_after(10):
        await pipe.run()
    assert out == [[-5, -4, -3, -2, -1, 0, 1, 2, 3, 4]]


async def test_inlet_is_closed_when_the_until_stage_fails() -> None:
    pipe = Pipeline("t")
    inlet = pipe.inlet("gather", until="work")

    async def work(n: int) -> int:
        await inlet.send(n)
        if n == 3:
            raise ValueError("broken")
        return n

    pipe.source("src", range(10)).map("work", work).stage("gather", gather)
    with anyio.fail_after(10), pytest.raises(Exception, match="broken"):
        await pipe.run()


async def test_inlet_validation_and_use_outside_a_run() -> None:
    async def f(x: Any) -> Any:
        return x

    pipe = Pipeline("t").source("src", range(3)).map("a", f)
    inlet = pipe.inlet("nowhere", until="a")
    with pytest.raises(RuntimeError, match="not running"):
        await inlet.send(1)
    with pytest.raises(ValueError, match="nowhere"):
        await pipe.run()
    pipe = Pipeline("t").source("src", range(3)).map("a", f)
    pipe.inlet("src", until="a")
    with pytest.raises(ValueError, match="src"):
        await pipe.run()
    pipe = Pipeline("t").source("src", range(3)).map("a", f)
    pipe.inlet("a", until="later")
    with pytest.raises(ValueError, match="later"):
        await pipe.run()


@pytest.mark.parametrize("capacity", [0, 1, 3])
async def test_stage_capacity_sizes_its_input_channel(capacity: int) -> None:
    produced = 0
    release = anyio.Event()

    def source() -> Any:
        nonlocal produced
        for n in range(1000):
            produced += 1
            yield n

    async def passthrough(n: int) -> int:
        return n

    async def stuck(n: int) -> None:
        await release.wait()

    pipe = (
        Pipeline("t", options=PipelineOptions(channel_capacity=2))
        .source("src", source())
        .map("a", passthrough)
        .sink("slow", stuck, capacity=capacity)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(pipe.run)
        await anyio.wait_all_tasks_blocked()
        in_flight = produced
        snap = pipe.snapshot()
        release.set()
        tg.cancel_scope.cancel()
    # 1 in the sink + `capacity` queued for it + 1 in "a" waiting to hand on +
    # 2 in the default channel + 1 the source holds while blocked.
    assert in_flight == 1 + capacity + 1 + 2 + 1
    assert snap.stage("slow").queue_capacity == capacity
    assert snap.stage("a").queue_capacity == 2


async def test_producer_source_sends_from_its_own_tasks_and_is_counted() -> None:
    async def produce(send: ObjectSendStream[Any]) -> None:
        async def part(base: int) -> None:
            for n in range(10):
                await send.send(base + n)

        async with anyio.create_task_group() as tg:
            for base in (0, 100, 200):
                tg.start_soon(part, base)

    seen: list[int] = []

    async def sink(n: int) -> None:
        seen.append(n)

    snap = await Pipeline("t").source("src", produce).sink("out", sink).run()
    assert sorted(seen) == sorted(b + n for b in (0, 100, 200) for n in range(10))
    assert snap.stage("src").items_out == 30
    assert snap.stage("out").items_in == 30


async def test_producer_source_error_names_the_source() -> None:
    async def produce(send: ObjectSendStream[Any]) -> None:
        await send.send(1)
        raise OSError("walk failed")

    async def sink(n: int) -> None:
        pass

    with pytest.raises(Exception, match="walk failed") as info:
        await Pipeline("t").source("walk", produce).sink("out", sink).run()
    assert getattr(info.value, "stage", None) == "walk"
