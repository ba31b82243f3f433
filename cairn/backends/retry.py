"""Retry wrapper: exponential backoff with jitter, for ``TransientError`` only.

Permanent errors (not found, permission denied, quota, truncated object, invalid name)
fail at once: retrying them only delays the user's error message. Attempts are
bounded, so a server that stays down yields a clear error after a known time.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import structlog

from cairn.backends.base import Backend, BackendError, NotFound, TransientError
from cairn.backends.forward import ForwardingBackend

T = TypeVar("T")
_log = structlog.get_logger("cairn.backends")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    The defaults follow restic's (10 attempts, 0.5 s doubling): the waits add up to
    about 4 minutes, long enough to ride out a server restart or a network blip,
    short enough that a nightly job with a dead server fails within minutes.
    """

    attempts: int = 10
    base_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 60.0
    # Each wait is shortened by up to this fraction, at random, so that many
    # clients hit by the same outage do not retry in lock-step.
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait after failed attempt number ``attempt`` (1-based)."""
        raw = min(self.max_delay, self.base_delay * self.multiplier ** (attempt - 1))
        return raw * (1.0 - self.jitter * rng.random())


class RetryBackend(ForwardingBackend):
    """Retries transient failures of every call; see the module docstring."""

    def __init__(
        self,
        inner: Backend,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(inner)
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def _retry(self, op: str, name: str, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 1
        while True:
            try:
                return await call()
            except TransientError as exc:
                if attempt >= self.policy.attempts:
                    raise TransientError(
                        f"{self.location}: {op} {name} failed after {attempt} attempts: {exc}"
                    ) from exc
                wait = self.policy.delay(attempt, self._rng)
                _log.info(
                    "backend.retry",
                    op=op,
                    name=name,
                    attempt=attempt,
                    wait=round(wait, 3),
                    error=str(exc),
                )
                await self._sleep(wait)
                attempt += 1

    async def save(self, name: str, data: bytes | memoryview) -> None:
        # ``data`` is an immutable buffer, so every attempt sends it from the start:
        # there is no stream position to rewind.
        async def attempt() -> None:
            try:
                await self.inner.save(name, data)
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
        attempt = 1
        while True:
            try:
                async for name, size in self.inner.list(prefix):
                    if name not in seen:
                        seen.add(name)
                        yield name, size
                return
            except TransientError as exc:
                if attempt >= self.policy.attempts:
                    raise TransientError(
                        f"{self.location}: list {prefix} failed after {attempt} attempts: {exc}"
                    ) from exc
                await self._sleep(self.policy.delay(attempt, self._rng))
                attempt += 1
