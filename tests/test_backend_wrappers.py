"""The wrappers around a backend: retry, connection limit, throttle, logging, faults.

Timing logic runs on trio's virtual clock (``autojump_clock``): backoff waits of
minutes take no real time, and the test asserts on the virtual time that passed.
"""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest
import structlog
import trio
import trio.testing

from cairn.backends.base import (
    NotFound,
    ObjectTruncated,
    PermissionDenied,
    ServerUnavailable,
    TransientError,
    Unreachable,
    object_name,
)
from cairn.backends.faulty import Fault, FaultyBackend, parse_faults
from cairn.backends.limit import LimitedBackend
from cairn.backends.local import LocalBackend
from cairn.backends.logged import LoggedBackend
from cairn.backends.retry import RetryBackend, RetryPolicy
from cairn.backends.throttle import ThrottledBackend
from cairn.backends.wrap import wrap_backend

NAME = object_name("data", "ab" * 32)
DATA = bytes(range(256)) * 400


@pytest.fixture
def local(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "repo")


class NonAtomic(LocalBackend):
    """A local backend that claims no atomic replace (like REST), for partial cleanup."""

    @property
    def atomic_replace(self) -> bool:
        return False


# --- retry ------------------------------------------------------------------------


@pytest.mark.trio
async def test_retry_recovers_from_transient_save_failures(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = FaultyBackend(local, "save#1-2=transient")
    backend = RetryBackend(faulty, RetryPolicy(base_delay=1, jitter=0), rng=random.Random(1))
    start = trio.current_time()
    await backend.save(NAME, DATA)
    assert await local.load(NAME) == DATA
    assert faulty.calls["save"] == 3
    assert trio.current_time() - start == pytest.approx(1 + 2)  # 1 s, then 2 s


@pytest.mark.trio
async def test_retry_is_bounded_and_says_so(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = FaultyBackend(local, "load=transient")
    policy = RetryPolicy(attempts=5, base_delay=0.5, max_delay=2, jitter=0)
    backend = RetryBackend(faulty, policy)
    await local.save(NAME, DATA)
    start = trio.current_time()
    with pytest.raises(TransientError, match="after 5 attempts"):
        await backend.load(NAME)
    assert faulty.calls["load"] == 5
    assert trio.current_time() - start == pytest.approx(0.5 + 1 + 2 + 2)  # capped at 2


@pytest.mark.trio
@pytest.mark.parametrize("spec", ["save=denied", "save=quota", "save=notfound"])
async def test_permanent_errors_fail_at_once(
    local: LocalBackend, spec: str, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = FaultyBackend(local, spec)
    backend = RetryBackend(faulty)
    start = trio.current_time()
    with pytest.raises(Exception) as info:
        await backend.save(NAME, DATA)
    assert not isinstance(info.value, TransientError)
    assert faulty.calls["save"] == 1
    assert trio.current_time() == start


@pytest.mark.trio
async def test_jitter_shortens_waits_within_bounds(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    backend = RetryBackend(
        FaultyBackend(local, "stat#1-3=transient"), RetryPolicy(base_delay=1, jitter=0.5)
    )
    await local.save(NAME, DATA)
    start = trio.current_time()
    assert await backend.stat(NAME) == len(DATA)
    waited = trio.current_time() - start
    assert 0.5 * 7 <= waited <= 7  # 1 + 2 + 4, each cut by up to half


@pytest.mark.trio
async def test_dropped_upload_leaves_no_partial_and_completes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    inner = NonAtomic(tmp_path / "repo")
    # The first attempt stores 1000 bytes and "loses the connection".
    faulty = FaultyBackend(inner, "save#1=partial:1000")
    seen: list[int] = []

    async def sleep_and_look(seconds: float) -> None:
        # During the backoff wait the partial object must already be gone.
        seen.append(len([e async for e in inner.list("data/")]))
        await trio.sleep(seconds)

    backend = RetryBackend(faulty, sleep=sleep_and_look)
    await backend.save(NAME, DATA)
    assert seen == [0]
    assert await inner.load(NAME) == DATA


@pytest.mark.trio
async def test_retried_list_yields_each_name_once(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    names = [object_name("data", f"{i:02x}" * 32) for i in range(5)]
    for name in names:
        await local.save(name, b"x")

    class BreaksMidway(FaultyBackend):
        async def list(self, prefix: str):  # type: ignore[no-untyped-def]
            self.calls["list"] = self.calls.get("list", 0) + 1
            count = 0
            async for entry in self.inner.list(prefix):
                if self.calls["list"] == 1 and count == 2:
                    raise TransientError("connection reset during listing")
                count += 1
                yield entry

    backend = RetryBackend(BreaksMidway(local))
    listed = [name async for name, _ in backend.list("data/")]
    assert sorted(listed) == sorted(names)


# --- connection limit -------------------------------------------------------------


@pytest.mark.trio
async def test_connection_limit_bounds_concurrency(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    active = peak = 0

    class Slow(FaultyBackend):
        async def stat(self, name: str) -> int:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await trio.sleep(1)
            active -= 1
            return 0

    backend = LimitedBackend(Slow(local), connections=3)
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(backend.stat, NAME)
    assert peak == 3
    assert backend.connections == 3


def test_connection_limit_defaults_to_the_backend(local: LocalBackend) -> None:
    assert LimitedBackend(local).connections == local.connections
    with pytest.raises(ValueError):
        LimitedBackend(local, 0)


@pytest.mark.trio
async def test_lock_files_bypass_the_limit(local: LocalBackend) -> None:
    # Real time, not autojump: autojump also jumps while a thread does file I/O, so
    # on a loaded machine the delayed save could "finish" before the lock's.
    backend = LimitedBackend(FaultyBackend(local, "save:data/=delay:3600"), connections=1)
    lock = object_name("locks", "cd" * 32)
    done: list[str] = []

    async def save(name: str, data: bytes) -> None:
        await backend.save(name, data)
        done.append(name)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(save, NAME, DATA)  # holds the only slot for an hour
            await trio.sleep(0.1)
            await save(lock, b"lock")  # a lock refresh must not wait behind it
            nursery.cancel_scope.cancel()
    assert done == [lock]
    assert await local.load(lock) == b"lock"


# --- throttle ---------------------------------------------------------------------


class RecordingLimiter:
    """A stand-in for the pipeline's token bucket: 1000 bytes per virtual second."""

    def __init__(self) -> None:
        self.total = 0

    async def acquire(self, nbytes: int) -> None:
        self.total += nbytes
        await trio.sleep(nbytes / 1000)


@pytest.mark.trio
async def test_throttle_charges_saved_and_loaded_bytes(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    up, down = RecordingLimiter(), RecordingLimiter()
    backend = ThrottledBackend(local, upload=up, download=down)
    start = trio.current_time()
    await backend.save(NAME, DATA)
    assert up.total == len(DATA)
    assert trio.current_time() - start == pytest.approx(len(DATA) / 1000)
    assert await backend.load(NAME, 0, 500) == DATA[:500]
    assert down.total == 500


# --- logging ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_logged_events_and_counters(local: LocalBackend) -> None:
    backend = LoggedBackend(local, structlog.get_logger("test"))
    with structlog.testing.capture_logs() as events:
        await backend.save(NAME, DATA)
        await backend.load(NAME)
        with pytest.raises(NotFound):
            await backend.stat("config")
    assert [e["event"] for e in events] == ["backend.save", "backend.load", "backend.stat.failed"]
    assert events[0]["name"] == NAME and events[0]["bytes"] == len(DATA)
    assert events[0]["seconds"] >= 0
    assert events[2]["error_type"] == "NotFound"
    assert backend.counters.bytes_saved == backend.counters.bytes_loaded == len(DATA)
    assert backend.counters.errors == {"stat": 1}


# --- fault injection ----------------------------------------------------------------


def test_fault_spec_parsing() -> None:
    assert parse_faults("save#2=transient, load:data/=truncate:10") == [
        Fault("save", "fail", TransientError, 0, "", 2, 2),
        Fault("load", "truncate", TransientError, 10, "data/", 1, None),
    ]
    assert parse_faults("remove=denied")[0].error is PermissionDenied
    for bad in ("save", "frob=transient", "save=explode", "save#x=transient"):
        with pytest.raises(ValueError):
            parse_faults(bad)


@pytest.mark.anyio
async def test_faults_truncate_and_flip_loads(local: LocalBackend) -> None:
    await local.save(NAME, DATA)
    backend = FaultyBackend(local, "load#1=truncate:10,load#2=flip:5")
    assert await backend.load(NAME) == DATA[:-10]
    flipped = await backend.load(NAME)
    assert flipped[5] == DATA[5] ^ 0xFF and flipped[:5] == DATA[:5] and flipped[6:] == DATA[6:]
    assert await backend.load(NAME) == DATA  # later loads are untouched


@pytest.mark.trio
async def test_fault_delay(local: LocalBackend, autojump_clock: trio.testing.MockClock) -> None:
    backend = FaultyBackend(local, "save=delay:30")
    start = trio.current_time()
    await backend.save(NAME, DATA)
    assert trio.current_time() - start == pytest.approx(30)


# --- the composed stack -------------------------------------------------------------


@pytest.mark.trio
async def test_wrap_backend_composes_the_stack(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    up = RecordingLimiter()
    backend = wrap_backend(local, connections=2, upload_limiter=up, faults="save#1=transient")
    with structlog.testing.capture_logs() as events:
        await backend.save(NAME, DATA)
    assert await backend.load(NAME) == DATA
    assert backend.connections == 2
    assert backend.location == local.location
    names = [e["event"] for e in events]
    # The failed attempt is logged, retried, and both attempts were throttled.
    assert names == ["backend.save.failed", "backend.retry", "backend.save"]
    assert up.total == 2 * len(DATA)
    with pytest.raises(ObjectTruncated):
        await backend.load(NAME, len(DATA), 1)
    await backend.aclose()


@pytest.mark.anyio
async def test_wrap_backend_without_retries(local: LocalBackend) -> None:
    backend = wrap_backend(local, retries=1, faults="stat=transient")
    with pytest.raises(TransientError):
        await backend.stat(NAME)
    with anyio.fail_after(5):
        await backend.aclose()


# --- fail fast, --retry-max-time ------------------------------------------------------


@pytest.mark.trio
async def test_never_reached_backend_fails_at_once(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """A backend that has not answered once is not retried when it cannot be reached."""
    faulty = FaultyBackend(local, "stat=unreachable")
    backend = RetryBackend(faulty)
    start = trio.current_time()
    with structlog.testing.capture_logs() as events, pytest.raises(Unreachable):
        await backend.stat("config")
    assert faulty.calls["stat"] == 1
    assert [e for e in events if e["event"] == "backend.retry"] == []
    assert trio.current_time() == start


@pytest.mark.trio
async def test_unreachable_after_contact_is_retried(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """Once the backend has answered, losing it is transient: back off and retry."""
    await local.save("config", b"c")
    faulty = FaultyBackend(local, "load#2-3=unreachable")
    backend = RetryBackend(faulty, RetryPolicy(base_delay=1, jitter=0))
    assert await backend.load("config") == b"c"  # the first contact
    start = trio.current_time()
    with structlog.testing.capture_logs() as events:
        assert await backend.load("config") == b"c"
    assert faulty.calls["load"] == 4
    assert trio.current_time() - start == pytest.approx(1 + 2)
    retries = [e for e in events if e["event"] == "backend.retry"]
    assert [(e["attempt"], e["of"], e["delay"]) for e in retries] == [(1, 10, 1.0), (2, 10, 2.0)]
    assert all(e["log_level"] == "warning" and e["op"] == "load" for e in retries)


@pytest.mark.trio
async def test_gateway_error_before_contact_fails_at_once(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """HTTP 502/503/504 from a proxy whose server is down is no answer: fail fast;
    the same after the backend has answered is retried."""
    await local.save("config", b"c")
    faulty = FaultyBackend(local, "load#1=unavailable,load#3-4=unavailable")
    backend = RetryBackend(faulty, RetryPolicy(base_delay=1, jitter=0))
    start = trio.current_time()
    with structlog.testing.capture_logs() as events, pytest.raises(ServerUnavailable):
        await backend.load("config")
    assert faulty.calls["load"] == 1 and trio.current_time() == start
    assert [e for e in events if e["event"] == "backend.retry"] == []
    assert await backend.load("config") == b"c"  # the first contact
    assert await backend.load("config") == b"c"  # 3rd and 4th calls failed, 5th answered
    assert faulty.calls["load"] == 5
    assert trio.current_time() - start == pytest.approx(1 + 2)


@pytest.mark.trio
async def test_permanent_answer_counts_as_contact(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = FaultyBackend(local, "stat#2=unreachable")
    backend = RetryBackend(faulty, RetryPolicy(base_delay=1, jitter=0))
    with pytest.raises(NotFound):
        await backend.stat("config")  # "not found" is an answer
    with pytest.raises(NotFound):
        await backend.stat("config")  # so the unreachable 2nd call was retried
    assert faulty.calls["stat"] == 3


@pytest.mark.trio
async def test_retry_max_time_bounds_retries_and_waits_for_first_contact(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """With a time budget even the first contact is retried, for that long and no
    longer; the attempt count in the log follows from the budget."""
    faulty = FaultyBackend(local, "stat=unreachable")
    policy = RetryPolicy(base_delay=1, jitter=0, max_time=20)
    assert policy.max_attempts == 5  # waits 1 + 2 + 4 + 8 = 15 fit in 20, + 16 does not
    backend = RetryBackend(faulty, policy)
    start = trio.current_time()
    with (
        structlog.testing.capture_logs() as events,
        pytest.raises(Unreachable, match=r"gave up after 5 attempts in 15 s"),
    ):
        await backend.stat("config")
    assert faulty.calls["stat"] == 5
    assert trio.current_time() - start == pytest.approx(15)
    retries = [e for e in events if e["event"] == "backend.retry"]
    assert [(e["attempt"], e["of"]) for e in retries] == [(1, 5), (2, 5), (3, 5), (4, 5)]


@pytest.mark.trio
async def test_retry_max_time_counts_slow_attempts(
    local: LocalBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """The budget is wall time: attempts that hang until a timeout use it up too."""
    await local.save("config", b"c")
    faulty = FaultyBackend(local, "load=delay:7,load#2-99=transient")
    backend = RetryBackend(faulty, RetryPolicy(base_delay=1, jitter=0, max_time=30))
    assert await backend.load("config") == b"c"
    start = trio.current_time()
    with pytest.raises(TransientError, match="gave up after 4 attempts"):
        await backend.load("config")
    # Failures at 7, 15, 24 and 35 s; waiting 8 s more would overrun the 30 s budget.
    assert trio.current_time() - start == pytest.approx(7 + 1 + 7 + 2 + 7 + 4 + 7)
    assert faulty.calls["load"] == 5
