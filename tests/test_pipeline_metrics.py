"""Progress snapshots and the stats table, timed on trio's virtual clock."""

from __future__ import annotations

import json

import pytest
import trio

from cairn.pipeline import Pipeline, PipelineOptions, PipelineSnapshot, format_stats, stats_rows


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
    assert rows[1]["busy %"] == pytest.approx(100 * 10 / 11.6)
    table = format_stats(snap)
    lines = table.splitlines()
    assert lines[0] == "demo: 5.80 s"
    headers = ["stage", "tasks", "items", "out", "bytes", "MB/s", "busy", "%", "queue"]
    assert lines[1].split() == headers
    assert lines[3].split()[:5] == ["double", "2", "10", "10", "10000"]
