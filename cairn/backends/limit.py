"""Connection-limit wrapper: at most N calls in flight against one backend.

Each backend states how many concurrent operations it handles well (its
``connections`` property); the user may override that with ``--connections``.
Lock files bypass the limit: a lock refresh stuck behind a queue of 16 MiB pack
uploads could let the lock go stale while we still hold it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from cairn.backends.base import Backend
from cairn.backends.forward import ForwardingBackend


def _bypass(name: str) -> bool:
    return name.startswith("locks/")


class LimitedBackend(ForwardingBackend):
    """Holds a slot of a ``CapacityLimiter`` for the duration of each call."""

    def __init__(self, inner: Backend, connections: int | None = None) -> None:
        super().__init__(inner)
        limit = connections if connections is not None else inner.connections
        if limit < 1:
            raise ValueError(f"connections must be at least 1, got {limit}")
        self._limit = limit
        self._limiter = anyio.CapacityLimiter(limit)

    @property
    def connections(self) -> int:
        return self._limit

    async def save(self, name: str, data: bytes | memoryview) -> None:
        if _bypass(name):
            return await self.inner.save(name, data)
        async with self._limiter:
            await self.inner.save(name, data)

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if _bypass(name):
            return await self.inner.load(name, offset, length)
        async with self._limiter:
            return await self.inner.load(name, offset, length)

    async def stat(self, name: str) -> int:
        if _bypass(name):
            return await self.inner.stat(name)
        async with self._limiter:
            return await self.inner.stat(name)

    async def remove(self, name: str) -> None:
        if _bypass(name):
            return await self.inner.remove(name)
        async with self._limiter:
            await self.inner.remove(name)

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        # The listing is collected under the slot and yielded after releasing it, so
        # a slow consumer does not hold a connection.
        async with self._limiter:
            entries = [entry async for entry in self.inner.list(prefix)]
        for entry in entries:
            yield entry
