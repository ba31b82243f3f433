"""Logging and metrics wrapper: one structlog event and a counter update per call.

Events are ``backend.<op>`` at debug level with ``name``, ``bytes`` and ``seconds``;
failures are ``backend.<op>.failed`` with the error. Sitting inside the retry
wrapper, it sees every attempt, so the counters measure real traffic.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from cairn.backends.base import Backend, BackendError
from cairn.backends.forward import ForwardingBackend


@dataclass
class BackendCounters:
    """Totals since the backend was opened; read by progress and ``--json`` summaries."""

    calls: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    bytes_saved: int = 0
    bytes_loaded: int = 0

    def count(self, op: str, failed: bool = False) -> None:
        target = self.errors if failed else self.calls
        target[op] = target.get(op, 0) + 1


class LoggedBackend(ForwardingBackend):
    """Logs each call and keeps ``counters``."""

    def __init__(
        self,
        inner: Backend,
        log: Any = None,
        *,
        counters: BackendCounters | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(inner)
        self.log = log if log is not None else structlog.get_logger("cairn.backends")
        self.counters = counters if counters is not None else BackendCounters()
        self._clock = clock

    def _done(self, op: str, start: float, **fields: Any) -> None:
        self.counters.count(op)
        self.log.debug(f"backend.{op}", seconds=round(self._clock() - start, 6), **fields)

    def _failed(self, op: str, start: float, exc: BackendError, **fields: Any) -> None:
        self.counters.count(op, failed=True)
        self.log.debug(
            f"backend.{op}.failed",
            seconds=round(self._clock() - start, 6),
            error=str(exc),
            error_type=type(exc).__name__,
            **fields,
        )

    async def save(self, name: str, data: bytes | memoryview) -> None:
        start, size = self._clock(), memoryview(data).nbytes
        try:
            await self.inner.save(name, data)
        except BackendError as exc:
            self._failed("save", start, exc, name=name, bytes=size)
            raise
        self.counters.bytes_saved += size
        self._done("save", start, name=name, bytes=size)

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        start = self._clock()
        try:
            data = await self.inner.load(name, offset, length)
        except BackendError as exc:
            self._failed("load", start, exc, name=name, offset=offset, length=length)
            raise
        self.counters.bytes_loaded += len(data)
        self._done("load", start, name=name, offset=offset, bytes=len(data))
        return data

    async def stat(self, name: str) -> int:
        start = self._clock()
        try:
            size = await self.inner.stat(name)
        except BackendError as exc:
            self._failed("stat", start, exc, name=name)
            raise
        self._done("stat", start, name=name, bytes=size)
        return size

    async def remove(self, name: str) -> None:
        start = self._clock()
        try:
            await self.inner.remove(name)
        except BackendError as exc:
            self._failed("remove", start, exc, name=name)
            raise
        self._done("remove", start, name=name)

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        start, count = self._clock(), 0
        try:
            async for entry in self.inner.list(prefix):
                count += 1
                yield entry
        except BackendError as exc:
            self._failed("list", start, exc, prefix=prefix, entries=count)
            raise
        self._done("list", start, prefix=prefix, entries=count)
