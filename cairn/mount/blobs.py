"""File content for the mount: decoded blobs, cached, fetched ahead of the reader.

A read needs the plaintext of one or two blobs. :class:`BlobSource` serves them from
a bounded LRU (:class:`BlobCache`, ``--cache-size``); a miss is fetched through the
shared download stage (:func:`cairn.stages.fetch.download`: a ranged load into a
shared-memory slot, so the bytes in flight are bounded by the slot count) and
decoded (decrypt, decompress, verify) in a thread — AES-GCM, zstd and BLAKE3 release
the GIL, so readers of different files decode on both cores.

Read-ahead: :meth:`BlobSource.prefetch` fetches the next blobs of a file in the
background while the reader consumes the current one. They are grouped per pack
into contiguous ranges by :func:`cairn.stages.fetch.plan_ranges` (one request for
several consecutive blobs, as restore does). Several readers wanting one blob share
one fetch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import structlog

from cairn.backends.base import BackendError, rebuild_error
from cairn.repo.codec import decode_blob
from cairn.repo.errors import CorruptedObject
from cairn.stages.fetch import SLOT_SIZE, Batch, download, plan_ranges

if TYPE_CHECKING:
    from cairn.pipeline.shm import SlotPool
    from cairn.repo.index import BlobLocation
    from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.mount")

# A range this small decodes faster inline than the hop to a thread takes (~50 µs,
# and far more on a loaded machine): small files are read one after another.
INLINE_DECODE = 64 * 1024


class BlobUnavailable(Exception):
    """A blob could not be read (its pack missing, truncated or corrupt): EIO."""

    def __init__(self, pack: str, problem: str) -> None:
        super().__init__(f"pack {pack}: {problem}")
        self.pack = pack
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_error, (type(self), self.args, self.__dict__))


class BlobCache:
    """Decoded blobs by ID, least recently used dropped first, at most ``capacity``
    bytes. A blob larger than the whole cache is not kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._blobs: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, blob_id: bytes) -> bytes | None:
        data = self._blobs.get(blob_id)
        if data is not None:
            self._blobs.move_to_end(blob_id)
        return data

    def __contains__(self, blob_id: bytes) -> bool:
        return blob_id in self._blobs

    def put(self, blob_id: bytes, data: bytes) -> None:
        if len(data) > self.capacity or blob_id in self._blobs:
            return
        while self.used + len(data) > self.capacity:
            _old, dropped = self._blobs.popitem(last=False)
            self.used -= len(dropped)
        self._blobs[blob_id] = data
        self.used += len(data)


@dataclass
class _Pending:
    """One blob being fetched; waiters get its bytes from here, not from the cache
    (which may already have dropped them again)."""

    done: anyio.Event = field(default_factory=anyio.Event)
    data: bytes | None = None
    error: BlobUnavailable | None = None


@dataclass
class CacheStats:
    """How reads were served: from the cache, by joining a fetch already under way
    (mostly read-ahead arriving), or by a fetch of their own."""

    hits: int = 0
    joined: int = 0
    misses: int = 0
    prefetched: int = 0

    def as_fields(self) -> dict[str, Any]:
        total = self.hits + self.joined + self.misses
        rate = (self.hits + self.joined) / total if total else 0.0
        return {
            "cache_hits": self.hits,
            "cache_joined": self.joined,
            "cache_misses": self.misses,
            "prefetched_blobs": self.prefetched,
            "cache_hit_rate": round(rate, 4),
        }


class BlobSource:
    """Decoded data blobs for the mount's reads.

    ``spawn`` starts a background task (a task group's ``start_soon``): fetches run
    there, outliving the read that asked for them. Read-ahead is fetched in ranges
    of at most ``span`` bytes.
    """

    def __init__(
        self,
        repo: Repository,
        slots: SlotPool,
        cache: BlobCache,
        spawn: Callable[..., Any],
        span: int = SLOT_SIZE,
    ) -> None:
        self._repo = repo
        self._span = span
        self._fetch = download(repo.backend, slots)
        self.cache = cache
        self._spawn = spawn
        self._pending: dict[bytes, _Pending] = {}
        self._reported: set[str] = set()
        self.stats = CacheStats()

    def locate(self, blob_id: bytes) -> BlobLocation | None:
        """Where the index says the blob is (None: not indexed)."""
        index = self._repo.index
        return index.lookup(blob_id) if index is not None else None

    async def get(self, blob_id: bytes, ahead: Sequence[bytes] = ()) -> bytes:
        """The plaintext of ``blob_id``; :class:`BlobUnavailable` if it cannot be read.
        ``ahead``: blobs to fetch in the background after this one (read-ahead)."""
        data = self.cache.get(blob_id)
        if data is not None:
            self.stats.hits += 1
            self.prefetch(ahead)
            return data
        pending = self._pending.get(blob_id)
        if pending is not None:
            self.stats.joined += 1
        else:
            self.stats.misses += 1
            pending = self._start([blob_id], SLOT_SIZE)[0]
        self.prefetch(ahead)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        if pending.data is None:  # pragma: no cover - set together with done
            raise BlobUnavailable("?", "fetch ended without data")
        return pending.data

    def prefetch(self, blob_ids: Sequence[bytes]) -> None:
        """Fetch these blobs in the background unless cached or already coming."""
        wanted = list(
            dict.fromkeys(b for b in blob_ids if b not in self.cache and b not in self._pending)
        )
        if wanted:
            self.stats.prefetched += len(wanted)
            self._start(wanted, self._span)

    def _start(self, blob_ids: list[bytes], span: int) -> list[_Pending]:
        """Register the blobs as pending and start fetching them, one task per range
        of at most ``span`` bytes."""
        pendings = []
        located = []
        index = self._repo.index
        for blob_id in blob_ids:
            pending = self._pending[blob_id] = _Pending()
            pendings.append(pending)
            loc = index.lookup(blob_id) if index is not None else None
            if loc is None:
                error = BlobUnavailable("?", f"blob {blob_id.hex()} is not in the index")
                self._finish(blob_id, error=error)
                continue
            located.append((loc.pack_id, loc.offset, loc.length, (blob_id, loc)))
        for batch in plan_ranges(located, max_span=span):
            self._spawn(self._fetch_batch, batch)
        return pendings

    async def _fetch_batch(self, batch: Batch) -> None:
        pack = batch.pack_id.hex()
        try:
            fetched = await self._fetch(batch)
            if fetched.error is not None:
                raise BlobUnavailable(pack, _problem(fetched.error))
            try:
                view = fetched.slot.view if fetched.slot is not None else memoryview(b"")
                if batch.length <= INLINE_DECODE:
                    decoded = _decode_all(self._repo.crypto, batch, view)
                else:
                    decoded = await anyio.to_thread.run_sync(
                        _decode_all, self._repo.crypto, batch, view
                    )
            finally:
                fetched.release()
        except BlobUnavailable as exc:
            self._fail(batch, exc)
            return
        except BaseException as exc:
            # Cancelled (unmounting) or a bug: the waiters must not wait forever.
            self._fail(batch, BlobUnavailable(pack, f"not read: {exc!r}"))
            raise
        for (blob_id, _loc), result in zip(batch.blobs, decoded, strict=True):
            if isinstance(result, BlobUnavailable):
                self._report(result)
                self._finish(blob_id, error=result)
            else:
                self.cache.put(blob_id, result)
                self._finish(blob_id, data=result)

    def _fail(self, batch: Batch, error: BlobUnavailable) -> None:
        self._report(error)
        for blob_id, _loc in batch.blobs:
            self._finish(blob_id, error=error)

    def _finish(
        self, blob_id: bytes, data: bytes | None = None, error: BlobUnavailable | None = None
    ) -> None:
        pending = self._pending.pop(blob_id, None)
        if pending is not None:
            pending.data, pending.error = data, error
            pending.done.set()

    def _report(self, error: BlobUnavailable) -> None:
        """One log line per damaged pack (a file needing it reads EIO, repeatedly)."""
        if error.pack not in self._reported:
            self._reported.add(error.pack)
            log.error("mount.pack_unreadable", pack=error.pack, error=error.problem)


def _problem(exc: BaseException) -> str:
    if isinstance(exc, BackendError):
        return f"cannot be loaded ({type(exc).__name__}: {exc})"
    return str(exc)


def _decode_all(crypto: Any, batch: Batch, view: memoryview) -> list[bytes | BlobUnavailable]:
    """Decode every blob of a downloaded range (in a thread); a blob failing its
    authentication is reported as itself, the others still decode."""
    out: list[bytes | BlobUnavailable] = []
    for blob_id, loc in batch.blobs:
        start = loc.offset - batch.offset
        try:
            out.append(decode_blob(crypto, loc.type, blob_id, view[start : start + loc.length]))
        except CorruptedObject as exc:
            out.append(BlobUnavailable(batch.pack_id.hex(), str(exc)))
    return out
