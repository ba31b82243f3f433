"""Token-bucket throttle, on trio's virtual clock (no real time passes)."""

from __future__ import annotations

import pytest
import trio

from cairn.pipeline import Pipeline, Throttle

MB = 1_000_000


@pytest.mark.trio
async def test_rate_is_kept_after_the_initial_burst(autojump_clock: trio.abc.Clock) -> None:
    throttle = Throttle(MB, burst=100_000)
    start = trio.current_time()
    for _ in range(100):
        await throttle.acquire(100_000)
    # 10 MB: the first 100 kB is the burst, the rest goes at 1 MB/s.
    assert trio.current_time() - start == pytest.approx(9.9)


@pytest.mark.trio
async def test_idle_time_banks_at_most_one_burst(autojump_clock: trio.abc.Clock) -> None:
    throttle = Throttle(MB, burst=200_000)
    await throttle.acquire(200_000)  # drain the initial burst
    await trio.sleep(3600)  # idle for an hour
    start = trio.current_time()
    await throttle.acquire(200_000)  # one burst passes at once ...
    assert trio.current_time() == start
    await throttle.acquire(100_000)  # ... and then the rate applies again
    assert trio.current_time() - start == pytest.approx(0.1)


@pytest.mark.trio
async def test_shared_by_many_tasks_never_exceeds_burst_plus_rate(
    autojump_clock: trio.abc.Clock,
) -> None:
    throttle = Throttle(2 * MB, burst=150_000)
    grants: list[tuple[float, int]] = []
    start = trio.current_time()

    async def sender(size: int) -> None:
        for _ in range(40):
            await throttle.acquire(size)
            grants.append((trio.current_time() - start, size))

    async with trio.open_nursery() as nursery:
        for size in (10_000, 50_000, 120_000):
            nursery.start_soon(sender, size)
    passed = 0
    for at, size in sorted(grants):
        passed += size
        assert passed <= 150_000 + 2 * MB * at + 1
    total = 40 * (10_000 + 50_000 + 120_000)
    assert grants[-1][0] == pytest.approx((total - 150_000) / (2 * MB))


@pytest.mark.trio
async def test_unlimited_never_waits_or_checkpoints(autojump_clock: trio.abc.Clock) -> None:
    for rate in (None, 0):
        throttle = Throttle(rate)
        assert throttle.unlimited
        start = trio.current_time()
        for _ in range(1000):
            await throttle.acquire(10**12)
        assert trio.current_time() == start


@pytest.mark.trio
async def test_rate_change_applies_to_tasks_already_waiting(
    autojump_clock: trio.abc.Clock,
) -> None:
    throttle = Throttle(MB, burst=100_000)
    await throttle.acquire(100_000)
    done_at: list[float] = []
    start = trio.current_time()

    async def big_send() -> None:
        await throttle.acquire(4 * MB)  # 4 s at 1 MB/s ...
        done_at.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(big_send)
        await trio.sleep(1)  # 1 MB paid at the old rate
        throttle.set_rate(3 * MB)  # ... the remaining 3 MB take 1 s more
    assert done_at == [pytest.approx(2.0)]

    throttle.set_rate(None)  # switching to unlimited releases at once
    now = trio.current_time()
    await throttle.acquire(100 * MB)
    assert trio.current_time() == now
    throttle.set_rate(MB, burst=100_000)  # and back, starting with a full burst
    await throttle.acquire(1_100_000)
    assert trio.current_time() - now == pytest.approx(1.0)


@pytest.mark.trio
async def test_rate_decrease_slows_waiting_tasks(autojump_clock: trio.abc.Clock) -> None:
    throttle = Throttle(2 * MB, burst=100_000)
    await throttle.acquire(100_000)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(throttle.acquire, 2 * MB)
        await trio.sleep(0.5)  # 1 MB paid at 2 MB/s
        throttle.set_rate(MB // 2)  # the other 1 MB takes 2 s
    assert trio.current_time() - start == pytest.approx(2.5)


@pytest.mark.trio
async def test_throttled_stages_share_one_bucket(autojump_clock: trio.abc.Clock) -> None:
    throttle = Throttle(MB, burst=64 * 1024)
    blob = bytes(100_000)

    async def same(item: bytes) -> bytes:
        return item

    async def sink(item: bytes) -> None:
        pass

    pipe = (
        Pipeline("t")
        .source("src", [blob] * 20)
        .map("upload", same, concurrency=4, throttle=throttle)
        .sink("download", sink, concurrency=2, throttle=throttle)
    )
    start = trio.current_time()
    snap = await pipe.run()
    # 2 MB up and 2 MB down through one 1 MB/s bucket, less the initial burst.
    assert trio.current_time() - start == pytest.approx((4 * MB - 64 * 1024) / MB)
    assert snap.stage("upload").bytes_in == snap.stage("download").bytes_in == 20 * 100_000


def test_bad_rate_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        Throttle(-1)
