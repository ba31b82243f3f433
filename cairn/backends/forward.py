"""A backend that forwards every call to another: the base class of the wrappers.

Each wrapper overrides only the calls it changes, so a wrapper module reads as the
behaviour it adds and nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from cairn.backends.base import Backend


class ForwardingBackend:
    """Forwards the whole ``Backend`` protocol to ``inner``."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property
    def location(self) -> str:
        return self.inner.location

    @property
    def connections(self) -> int:
        return self.inner.connections

    @property
    def atomic_replace(self) -> bool:
        return self.inner.atomic_replace

    @property
    def paces_uploads(self) -> bool:
        """Whether the backend underneath sends ``save`` bodies at UPLOAD_PACER's rate."""
        return bool(getattr(self.inner, "paces_uploads", False))

    @property
    def spool_dir(self) -> str | None:
        """Where the backend underneath wants packs assembled (None: anywhere)."""
        return getattr(self.inner, "spool_dir", None)

    async def save(self, name: str, data: bytes | memoryview) -> None:
        await self.inner.save(name, data)

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self.inner.load(name, offset, length)

    async def stat(self, name: str) -> int:
        return await self.inner.stat(name)

    def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        return self.inner.list(prefix)

    async def remove(self, name: str) -> None:
        await self.inner.remove(name)

    async def create_layout(self) -> None:
        await self.inner.create_layout()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"
