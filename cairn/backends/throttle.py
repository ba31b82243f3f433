"""Bandwidth wrapper: saved and loaded bytes pass through a rate limiter.

The limiter is anything with ``async def acquire(nbytes)`` — in production the
pipeline engine's token bucket, handed in by the caller so that ``backends/`` does
not import ``pipeline/``.

Uploads are paced on the wire where the backend can stream a body (``paces_uploads``:
REST and rclone): the wrapper hands the limiter down in :data:`UPLOAD_PACER` and the
backend sends each piece only once the limiter admits it, so no second carries more
than the limit. Other backends are charged for the whole object before it is sent: the
average holds, but each object leaves in one burst.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Protocol

from cairn.backends.base import Backend
from cairn.backends.forward import ForwardingBackend

# Bytes are requested in pieces of at most this size, so a token bucket smaller than
# one 16 MiB pack still admits it, and waits spread over the transfer.
CHUNK = 256 * 1024


class RateLimiter(Protocol):
    """Admits ``nbytes`` once the configured rate allows it."""

    async def acquire(self, nbytes: int) -> None: ...


async def charge(limiter: RateLimiter, nbytes: int) -> None:
    """Wait until ``limiter`` admits ``nbytes``, asked for in pieces of CHUNK."""
    while nbytes > 0:
        piece = min(nbytes, CHUNK)
        await limiter.acquire(piece)
        nbytes -= piece


#: The upload limiter for the ``save`` running in this task, set by ThrottledBackend
#: for backends whose ``paces_uploads`` is true.
UPLOAD_PACER: ContextVar[RateLimiter | None] = ContextVar("cairn_upload_pacer", default=None)

#: Set (in its task) by a caller that charged the upload limiter for the object it
#: saves *before* it held it ready (see :func:`prepaid_upload_limiter`).
UPLOAD_PREPAID: ContextVar[bool] = ContextVar("cairn_upload_prepaid", default=False)


def _throttled(backend: Backend) -> ThrottledBackend | None:
    layer: object | None = backend
    while layer is not None:
        if isinstance(layer, ThrottledBackend):
            return layer
        layer = getattr(layer, "inner", None)
    return None


def upload_limiter(backend: Backend) -> RateLimiter | None:
    """The upload limiter of the ThrottledBackend in ``backend``'s wrapper stack."""
    layer = _throttled(backend)
    return layer.upload if layer is not None else None


def prepaid_upload_limiter(backend: Backend) -> RateLimiter | None:
    """The upload limiter of the ThrottledBackend in ``backend``'s wrapper stack, when
    it charges each object whole before sending it (the backend does not pace its
    uploads): a caller may then charge it earlier, while the object does not exist
    yet, and save with :data:`UPLOAD_PREPAID` set — the same bytes on the wire at the
    same rate, without objects held in memory while they wait for the limiter."""
    layer = _throttled(backend)
    if layer is None or getattr(layer.inner, "paces_uploads", False):
        return None
    return layer.upload


async def paced_pieces(data: bytes | memoryview, limiter: RateLimiter) -> AsyncIterator[bytes]:
    """``data`` in pieces of at most CHUNK bytes, each yielded once ``limiter`` admits it."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK):
        piece = view[start : start + CHUNK]
        await limiter.acquire(len(piece))
        yield bytes(piece)


class ThrottledBackend(ForwardingBackend):
    """Charges uploads before sending and downloads after receiving."""

    def __init__(
        self,
        inner: Backend,
        upload: RateLimiter | None = None,
        download: RateLimiter | None = None,
    ) -> None:
        super().__init__(inner)
        self.upload = upload
        self.download = download

    async def save(self, name: str, data: bytes | memoryview) -> None:
        if self.upload is None:
            await self.inner.save(name, data)
        elif getattr(self.inner, "paces_uploads", False):
            token = UPLOAD_PACER.set(self.upload)
            try:
                await self.inner.save(name, data)
            finally:
                UPLOAD_PACER.reset(token)
        else:
            if not UPLOAD_PREPAID.get():
                await charge(self.upload, len(memoryview(data).cast("B")))
            await self.inner.save(name, data)

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        # A download's size is known only when it arrives; charging afterwards still
        # holds the average rate, and the next load waits for the debt.
        data = await self.inner.load(name, offset, length)
        if self.download is not None:
            await charge(self.download, len(data))
        return data
