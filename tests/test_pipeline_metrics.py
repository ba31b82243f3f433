"""Progress snapshots and the stats table, timed on trio's virtual clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from cairn.pipeline import (
    Pipeline,
    PipelineOptions,
    PipelineSnapshot,
    StageSnapshot,
    Throttle,
    bottleneck,
    format_bottleneck,
    format_stats,
    stats_rows,
    waiting_on_output,
)


async def slow_double(item: bytes) -> bytes:
    await trio.sleep(1)
    return item * 2


async def sink(item: bytes) -> None:
    await trio.sleep(0.4)


def build(on_progress: object = None, interval: float = 1.0) -> Pipeline:
    # Timeline: "double" finishes two items at t = 1, 2, 3, 4, 5; the sink
    # takes 0.4 s each, so one item waits in its queue during [k, k + 0.4).
    opts = PipelineOptions(channel_capacity=2, progress_interval=interval)
    return (
        Pipeline("demo", options=opts, on_progress=on_progress)  # type: ignore[arg-type]
        .source("src", [b"x" * 1000] * 10)
        .map("double", slow_double, concurrency=2)
        .sink("sink", sink)
    )


@pytest.mark.trio
async def test_final_snapshot_counts_items_bytes_and_busy_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    snap = await build().run()
    assert snap.done
    # 10 items x 1 s over 2 tasks = 5 s, plus the sink's last 2 x 0.4 s.
    assert snap.elapsed == pytest.approx(5.8)
    double = snap.stage("double")
    assert (double.items_in, double.items_out, double.bytes_in) == (10, 10, 10_000)
    assert double.busy_seconds == pytest.approx(10.0)
    assert double.utilization(snap.elapsed) == pytest.approx(10 / 11.6)
    assert snap.stage("sink").bytes_in == 20_000
    assert snap.stage("sink").busy_seconds == pytest.approx(4.0)
    assert snap.stage("src").items_out == 10


@pytest.mark.trio
async def test_progress_events_every_interval_then_a_final_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    events: list[PipelineSnapshot] = []
    await build(events.append, interval=0.25).run()
    assert [round(e.elapsed, 3) for e in events] == [0.25 * k for k in range(1, 24)] + [5.8]
    assert [e.done for e in events] == [False] * 23 + [True]
    by_time = {round(e.elapsed, 3): e for e in events}
    assert by_time[1.25].stage("sink").queue_depth == 1  # second of a pair waits
    assert by_time[1.5].stage("sink").queue_depth == 0
    assert by_time[2.5].stage("sink").items_in == 4
    # Busy time is added when an item finishes: items 1-4, not 5-6 in progress.
    assert by_time[2.5].stage("double").busy_seconds == pytest.approx(4.0)
    assert all(e.stage("sink").queue_capacity == 2 for e in events)
    json.dumps(events[2].to_dict())  # JSON status lines need plain data


@pytest.mark.trio
async def test_stats_table(autojump_clock: trio.abc.Clock) -> None:
    snap = await build().run()
    rows = stats_rows(snap)
    assert [r["stage"] for r in rows] == ["src", "double", "sink"]
    assert rows[1]["busy_pct"] == pytest.approx(100 * 10 / 11.6, abs=0.05)
    json.dumps(rows)  # the --json summary carries them
    table = format_stats(snap)
    lines = table.splitlines()
    assert lines[0] == "demo: 5.80 s"
    headers = ["stage", "tasks", "items", "out", "bytes", "MB/s", "busy", "%"]
    headers += ["wait", "in", "%", "wait", "out", "%", "throttled", "%", "queue"]
    assert lines[1].split() == headers
    assert lines[3].split()[:5] == ["double", "2", "10", "10", "10000"]


@pytest.mark.trio
async def test_waits_on_input_and_output(autojump_clock: trio.abc.Clock) -> None:
    snap = await build().run()
    # The sink takes 0.4 s an item; pairs arrive at t = 1, 2, ..., 5: it waits
    # 1 s for the first pair and 0.2 s after each of the next four.
    sink_ = snap.stage("sink")
    assert sink_.wait_in_seconds == pytest.approx(1.0 + 4 * 0.2)
    assert sink_.wait_out_seconds == 0
    # The source has all 10 items at once; its channel of 2 is full until
    # "double" takes the 9th and 10th at t = 3.
    assert snap.stage("src").wait_out_seconds == pytest.approx(3.0)
    double = snap.stage("double")
    assert (double.wait_in_seconds, double.wait_out_seconds) == (0, 0)
    rows = {r["stage"]: r for r in stats_rows(snap)}
    assert rows["sink"]["wait_in_pct"] == pytest.approx(100 * 1.8 / 5.8, abs=0.05)


@pytest.mark.trio
async def test_waiting_on_output_inside_a_stage_is_not_busy(
    autojump_clock: trio.abc.Clock,
) -> None:
    # "take" needs one of 2 tokens that only the sink gives back (as a download
    # needs a slot the decode stage frees): its wait for them is output time.
    tokens = trio.Semaphore(2)

    async def take(item: int) -> int:
        with waiting_on_output():
            await tokens.acquire()
        await trio.sleep(0.1)
        return item

    async def give_back(item: int) -> None:
        await trio.sleep(1)
        tokens.release()

    snap = await (
        Pipeline("demo", options=PipelineOptions(channel_capacity=1))
        .source("src", range(6))
        .map("take", take, hint="--connections")
        .sink("give", give_back, hint="none")
        .run()
    )
    take_ = snap.stage("take")
    assert take_.busy_seconds == pytest.approx(0.6)
    assert take_.wait_out_seconds > 3.0
    assert bottleneck(snap) == ("give", "none")


@pytest.mark.trio
async def test_ordered_stage_splits_waits(autojump_clock: trio.abc.Clock) -> None:
    # An ordered stage of 2 tasks in front of a slow sink: once the reorder window
    # is full, its tasks wait on output; before the first item, on input.
    async def slow_source():  # type: ignore[no-untyped-def]
        await trio.sleep(1)
        for i in range(20):
            yield i

    async def quick(item: int) -> int:
        await trio.sleep(0.1)
        return item

    async def slow(item: int) -> None:
        await trio.sleep(2)

    snap = await (
        Pipeline("demo", options=PipelineOptions(channel_capacity=1))
        .source("src", slow_source())
        .map("quick", quick, concurrency=2, ordered=True)
        .sink("slow", slow)
        .run()
    )
    quick_ = snap.stage("quick")
    assert quick_.wait_in_seconds >= 2 * 1.0  # both tasks, until the source's first
    # The sink takes 40 s for 20 items; the last few fit in the window and channels.
    assert quick_.wait_out_seconds > 2 * 20.0
    assert quick_.busy_seconds == pytest.approx(2.0)
    assert bottleneck(snap) == ("slow", "none")


def stage(name: str, busy: float, hint: str = "", **extra: float | str) -> StageSnapshot:
    return StageSnapshot(
        name=name,
        concurrency=int(extra.pop("concurrency", 1)),
        items_in=1,
        items_out=1,
        bytes_in=0,
        busy_seconds=busy,
        queue_depth=0,
        queue_capacity=4,
        hint=hint,
        **extra,  # type: ignore[arg-type]
    )


def snapshot(*stages: StageSnapshot, elapsed: float = 10.0) -> PipelineSnapshot:
    return PipelineSnapshot("restore", elapsed, stages, done=True)


def test_bottleneck_is_the_busiest_stage_with_its_hint() -> None:
    snap = snapshot(
        stage("plan", 0.0),
        stage("download", 12.0, "--connections", concurrency=4),  # 30% of 40
        stage("decode", 36.0, "--cpu-workers", concurrency=4),  # 90% of 40
        stage("account", 1.0),
    )
    assert bottleneck(snap) == ("decode", "--cpu-workers")
    assert format_bottleneck(snap) == (
        "bottleneck: decode (busy 90% of 4 tasks' time); tune: --cpu-workers"
    )


def test_bottleneck_download_busy() -> None:
    snap = snapshot(
        stage("download", 38.0, "--connections", concurrency=4),
        stage("decode", 10.0, "--cpu-workers", concurrency=4),
    )
    assert bottleneck(snap) == ("download", "--connections")


def test_bottleneck_throttled_stage_names_the_throttle_hint() -> None:
    # Busy 2 s and held by the throttle 7 s of 10: the limit is what to raise.
    snap = snapshot(
        stage("download", 2.0, "--connections", throttled_seconds=7.0, throttle_hint="--limit-x"),
        stage("decode", 5.0, "--cpu-workers"),
    )
    assert bottleneck(snap) == ("download", "--limit-x")
    # One bucket serves every task: 4 tasks held 6 s in all of 10 is the limit
    # too, though it is 15% of their task-time.
    snap = snapshot(
        stage(
            "download",
            1.0,
            "--connections",
            throttled_seconds=6.0,
            throttle_hint="--limit-x",
            concurrency=4,
        ),
        stage("decode", 5.0, "--cpu-workers"),
    )
    assert bottleneck(snap) == ("download", "--limit-x")
    line = "bottleneck: download (held by a throttle 60% of the time); tune: --limit-x"
    assert format_bottleneck(snap) == line
    # Held briefly: the busy stage is what limits.
    snap = snapshot(
        stage("download", 1.0, "--connections", throttled_seconds=2.0, throttle_hint="--limit-x"),
        stage("decode", 9.0, "--cpu-workers"),
    )
    assert bottleneck(snap) == ("decode", "--cpu-workers")


def test_bottleneck_tie_goes_downstream() -> None:
    # Both saturated: the later stage holds the earlier one back.
    snap = snapshot(stage("download", 10.0, "--connections"), stage("decode", 10.0, "--cpu"))
    assert bottleneck(snap) == ("decode", "--cpu")


def test_bottleneck_when_nothing_is_saturated() -> None:
    snap = snapshot(stage("download", 2.0, "--connections"), stage("decode", 4.0, "--cpu"))
    stage_name, hint = bottleneck(snap)
    assert stage_name == "decode"
    assert hint.startswith("none")


def test_bottleneck_of_nothing() -> None:
    assert bottleneck(snapshot()) == ("", "")
    assert bottleneck(snapshot(stage("a", 0.0), elapsed=0.0)) == ("", "")


@pytest.mark.trio
async def test_raw_stage_and_producer_times(autojump_clock: trio.abc.Clock) -> None:
    # A producer works 1 s per item; a raw stage works 0.5 s per item and is held
    # 1.8 s by a throttle (10 bytes at 5 B/s, 1 of them the burst) and 1 s inside
    # waiting_on_output() per item: only its own work counts as busy.
    throttle = Throttle(5, burst=1)

    async def produce(send: Any) -> None:
        for n in range(3):
            await trio.sleep(1.0)
            await send.send(n)

    async def raw(receive: Any, send: Any) -> None:
        async for n in receive:
            await trio.sleep(0.5)
            await throttle.acquire(10)
            with waiting_on_output():
                await trio.sleep(1.0)
            await send.send(n)

    async def sink(n: int) -> None:
        pass

    snap = await Pipeline("t").source("src", produce).stage("raw", raw).sink("out", sink).run()
    src, stage = snap.stage("src"), snap.stage("raw")
    assert src.items_out == 3 and src.busy_seconds == pytest.approx(3.0, abs=0.01)
    assert stage.items_in == stage.items_out == 3
    assert stage.busy_seconds == pytest.approx(1.5, abs=0.05)
    assert stage.throttled_seconds == pytest.approx(3 * 1.8, abs=0.05)
    assert stage.wait_out_seconds == pytest.approx(3.0, abs=0.05)
