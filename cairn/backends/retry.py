"""Retry wrapper: exponential backoff with jitter, for ``TransientError`` only.

Permanent errors (not found, permission denied, quota, truncated object, invalid name)
fail at once: retrying them only delays the user's error message. Attempts are
bounded, so a server that stays down yields a clear error after a known time.

Fail fast: until the backend has answered once, a failure to connect at all
(``Unreachable``: refused, DNS, TLS, connect timeout) is not retried, because a
server that was never reached is far more often down or misconfigured than
blinking, and a nightly job should say so in seconds, not minutes. An HTTP 502, 503
or 504 (``ServerUnavailable``: a proxy or gateway whose server is down) does not
count as an answer either. Once the backend has answered, the same failures mean it
went away mid-run, and are retried like any transient error. A policy with
``max_time`` (``--retry-max-time``) retries even the first contact, for that long:
the user asked to wait for the server.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import structlog

from cairn.backends.base import (
    Backend,
    BackendError,
    NotFound,
    ServerUnavailable,
    TransientError,
    Unreachable,
)
from cairn.backends.forward import ForwardingBackend

T = TypeVar("T")
_log = structlog.get_logger("cairn.backends")
# Bounds the attempt count derived from a huge max_time (one try a minute for a week).
_MAX_ATTEMPTS = 10_000
# Failures that do not show the backend was ever reached (see the module doc).
_NOT_REACHED = (Unreachable, ServerUnavailable)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    The defaults follow restic's (10 attempts, 0.5 s doubling): the waits add up to
    about 3 minutes at most, long enough to ride out a server restart or a network
    blip, short enough that a nightly job with a dead server fails within minutes.
    ``max_time`` (seconds) replaces the attempt count by a time budget per operation:
    as many attempts as the un-jittered waits allow, and no wait that would end past
    the budget. It also makes a never-answering backend retried (see the module doc).
    """

    attempts: int = 10
    base_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 60.0
    # Each wait is shortened by up to this fraction, at random, so that many
    # clients hit by the same outage do not retry in lock-step.
    jitter: float = 0.5
    max_time: float | None = None

    def full_delay(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (1-based), before jitter."""
        return float(min(self.max_delay, self.base_delay * self.multiplier ** (attempt - 1)))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait after failed attempt number ``attempt`` (1-based)."""
        return self.full_delay(attempt) * (1.0 - self.jitter * rng.random())

    @property
    def max_attempts(self) -> int:
        """Attempts per operation: ``attempts``, or what ``max_time`` allows."""
        if self.max_time is None:
            return max(1, self.attempts)
        attempts, spent = 1, 0.0
        while attempts < _MAX_ATTEMPTS:
            spent += self.full_delay(attempts)
            if spent > self.max_time:
                break
            attempts += 1
        return attempts

    @property
    def retries_first_contact(self) -> bool:
        """Whether a backend that never answered is retried (only when asked to wait)."""
        return self.max_time is not None and self.max_time > 0


class RetryBackend(ForwardingBackend):
    """Retries transient failures of every call; see the module docstring."""

    def __init__(
        self,
        inner: Backend,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = anyio.current_time,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(inner)
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        # Whether the backend has ever answered (anything but "could not connect"
        # or a gateway's "the server behind me is not there").
        self._contacted = False

    def _wait_before_retry(
        self, op: str, name: str, exc: TransientError, attempt: int, started: float
    ) -> float:
        """The wait before the next attempt; raises the final error when giving up."""
        if isinstance(exc, _NOT_REACHED):
            if not self._contacted and not self.policy.retries_first_contact:
                raise exc  # fail fast: its message names the location and the cause
        else:
            self._contacted = True
        of = self.policy.max_attempts
        wait = self.policy.delay(attempt, self._rng)
        elapsed = self._clock() - started
        budget = self.policy.max_time
        if attempt >= of or (budget is not None and elapsed + wait > budget):
            raise type(exc)(f"{exc} (gave up after {attempt} attempts in {elapsed:.0f} s)") from exc
        _log.warning(
            "backend.retry",
            op=op,
            name=name,
            attempt=attempt,
            of=of,
            delay=round(wait, 3),
            error=str(exc),
        )
        return wait

    async def _retry(self, op: str, name: str, call: Callable[[], Awaitable[T]]) -> T:
        started = self._clock()
        attempt = 1
        while True:
            try:
                result = await call()
            except TransientError as exc:
                await self._sleep(self._wait_before_retry(op, name, exc, attempt, started))
                attempt += 1
            except BackendError:
                self._contacted = True  # a permanent answer is an answer
                raise
            else:
                self._contacted = True
                return result

    async def save(self, name: str, data: bytes | memoryview) -> None:
        # ``data`` is an immutable buffer, so every attempt sends it from the start:
        # there is no stream position to rewind.
        async def attempt() -> None:
            try:
                await self.inner.save(name, data)
            except Unreachable:
                raise  # no connection, so no byte of it reached the server
            except BackendError:
                await self._remove_partial(name)
                raise

        await self._retry("save", name, attempt)

    async def _remove_partial(self, name: str) -> None:
        """After a failed save, leave no partial object visible (as restic does).

        Backends with atomic replace never expose a partial object, and the next
        attempt replaces whatever is there, so only the others need the removal.
        """
        if self.inner.atomic_replace:
            return
        try:
            with anyio.CancelScope(shield=True):
                await self.inner.remove(name)
        except NotFound:
            pass
        except BackendError as exc:
            _log.warning("backend.partial_remove_failed", name=name, error=str(exc))

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self._retry("load", name, lambda: self.inner.load(name, offset, length))

    async def stat(self, name: str) -> int:
        return await self._retry("stat", name, lambda: self.inner.stat(name))

    async def remove(self, name: str) -> None:
        await self._retry("remove", name, lambda: self.inner.remove(name))

    async def create_layout(self) -> None:
        await self._retry("create_layout", "", self.inner.create_layout)

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        # A listing that breaks half-way is restarted; names already yielded are
        # skipped so the caller sees each object once.
        seen: set[str] = set()
        started = self._clock()
        attempt = 1
        while True:
            try:
                async for name, size in self.inner.list(prefix):
                    self._contacted = True
                    if name not in seen:
                        seen.add(name)
                        yield name, size
                self._contacted = True
                return
            except TransientError as exc:
                await self._sleep(self._wait_before_retry("list", prefix, exc, attempt, started))
                attempt += 1
            except BackendError:
                self._contacted = True
                raise
