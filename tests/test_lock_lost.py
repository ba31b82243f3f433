"""A held lock that cannot be refreshed in time stops its command (trio's virtual
clock: the half hour passes instantly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from cairn.backends.base import TransientError
from cairn.backends.faulty import Fault, FaultyBackend
from cairn.backends.local import LocalBackend
from cairn.cli.errors import describe
from cairn.repo.keyfile import KdfParams
from cairn.repo.repository import init_repository
from cairn.stages.locking import GIVE_UP_SECONDS, REFRESH_SECONDS, repository_lock


@pytest.fixture
def lazy_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 50 ms of real idleness. A threshold of 0
    also jumps while the local backend's thread runs, so on a loaded machine the
    command's sleep could pass far beyond the refresher's schedule."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def _work(seconds: float) -> None:
    """The command's work: the clock only jumps to the next deadline (the refresher's)."""
    await trio.sleep(seconds)


async def _repo(tmp_path: Path) -> tuple[object, FaultyBackend]:
    backend = FaultyBackend(LocalBackend(tmp_path / "repo"))
    repo = await init_repository(
        backend, "pw", hostname="h", username="u", kdf_params=KdfParams(64, 1, 1)
    )
    return repo, backend


@pytest.mark.trio
async def test_a_lock_that_cannot_be_refreshed_stops_the_command(
    tmp_path: Path, lazy_clock: trio.testing.MockClock
) -> None:
    repo, backend = await _repo(tmp_path)
    started = trio.current_time()
    with structlog.testing.capture_logs() as logs, pytest.raises(BaseException) as caught:
        async with repository_lock(repo, exclusive=False, clock=trio.current_time):
            backend.faults = [Fault("save", "fail", TransientError, match="locks/")]
            await _work(10 * GIVE_UP_SECONDS)
    code, message = describe(caught.value)
    assert code == 11 and "could not be refreshed" in message, message
    stopped_after = trio.current_time() - started
    assert GIVE_UP_SECONDS < stopped_after < GIVE_UP_SECONDS + REFRESH_SECONDS
    events = [e["event"] for e in logs]
    assert "lock.refresh_failed" in events and "lock.lost" in events


@pytest.mark.trio
async def test_refreshes_that_fail_for_a_while_are_tolerated(
    tmp_path: Path, lazy_clock: trio.testing.MockClock
) -> None:
    repo, backend = await _repo(tmp_path)
    async with repository_lock(repo, exclusive=False, clock=trio.current_time) as held:
        backend.faults = [Fault("save", "fail", TransientError, match="locks/")]
        await _work(GIVE_UP_SECONDS / 2)
        backend.faults = []
        await _work(2 * GIVE_UP_SECONDS)
        await held.check()  # refreshed again in time: still valid
        assert repo.lock_check is not None  # type: ignore[attr-defined]
    assert repo.lock_check is None  # type: ignore[attr-defined]
