"""Bandwidth schedules: the pure rate function and the updater on trio's virtual clock."""

from __future__ import annotations

from datetime import datetime, time

import pytest
import trio

from cairn.config.schedule import follow_schedule, next_boundary, parse_schedule, rate_at
from cairn.pipeline.throttle import Throttle

DAYTIME = ["08:00-19:00=512", "*=0"]


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (time(7, 59, 59), None),
        (time(8, 0), 512),
        (time(12, 30), 512),
        (time(18, 59, 59), 512),
        (time(19, 0), None),
        (time(23, 0), None),
    ],
)
def test_rate_at_daytime(when: time, expected: int | None) -> None:
    assert rate_at(DAYTIME, when) == expected


def test_rate_at_wraps_midnight_and_falls_back() -> None:
    night = ["22:00-06:00=100", "06:00-08:00=0"]
    assert rate_at(night, time(23, 30)) == 100
    assert rate_at(night, time(2, 0)) == 100
    assert rate_at(night, time(6, 0)) is None
    assert rate_at(night, time(12, 0), fallback=2048) == 2048  # no window: the static limit
    assert rate_at(["*=64"], time(3, 3)) == 64
    assert rate_at(["00:00-24:00=7"], time(23, 59, 59)) == 7


@pytest.mark.parametrize(
    "bad", ["8-19=5", "08:00-19:00", "25:00-26:00=1", "24:30-01:00=1", "08:00-19:00=-1"]
)
def test_parse_schedule_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="schedule entry"):
        parse_schedule([bad])


def test_next_boundary() -> None:
    assert next_boundary(DAYTIME, datetime(2024, 5, 1, 7, 0)) == datetime(2024, 5, 1, 8, 0)
    assert next_boundary(DAYTIME, datetime(2024, 5, 1, 8, 0)) == datetime(2024, 5, 1, 19, 0)
    assert next_boundary(DAYTIME, datetime(2024, 5, 1, 20, 0)) == datetime(2024, 5, 2, 8, 0)
    assert next_boundary(["*=5"], datetime(2024, 5, 1)) is None


@pytest.mark.trio
async def test_updater_changes_rate_at_boundaries(autojump_clock: trio.abc.Clock) -> None:
    throttle = Throttle(None)
    changes: list[int | None] = []
    start = datetime(2024, 5, 1, 7, 59, 0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: follow_schedule(throttle, DAYTIME, start=start, on_change=changes.append)
        )
        await trio.sleep(1)
        assert throttle.rate is None  # 07:59:01: unlimited
        await trio.sleep(60)
        assert throttle.rate == 512 * 1024  # 08:00:01
        await trio.sleep(11 * 3600 - 2)
        assert throttle.rate == 512 * 1024  # 18:59:59
        await trio.sleep(2)
        assert throttle.rate is None  # 19:00:01
        nursery.cancel_scope.cancel()
    assert changes == [None, 512, None]


@pytest.mark.trio
async def test_updater_paces_a_transfer_across_the_boundary(autojump_clock: trio.abc.Clock) -> None:
    """Unlimited until 08:00, then 512 KiB/s: 10 MiB after the edge take ~20 s."""
    throttle = Throttle(None)
    start = datetime(2024, 5, 1, 7, 59, 50)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: follow_schedule(throttle, DAYTIME, start=start))
        await trio.lowlevel.checkpoint()
        t0 = trio.current_time()
        await throttle.acquire(50 * 1024 * 1024)  # before 08:00: immediate
        assert trio.current_time() - t0 < 0.01
        await trio.sleep(11)
        t1 = trio.current_time()
        for _ in range(40):
            await throttle.acquire(256 * 1024)
        elapsed = trio.current_time() - t1
        assert 19 <= elapsed <= 21, elapsed
        nursery.cancel_scope.cancel()
