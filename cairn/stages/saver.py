"""Blobs into packs, packs onto the backend, and index files describing them.

Crash safety by ordering: a pack is uploaded before any index names it, and the
snapshot (written by the caller after ``finish``) comes after every index. An
interrupted run still writes the index of the packs it uploaded, so the next
backup finds and reuses them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
import anyio.abc
import structlog

from cairn.backends.base import object_name
from cairn.repo.index import Index, IndexFile, encode_index
from cairn.repo.pack import DATA, TREE, PackEntry, PackWriter

log = structlog.get_logger("cairn.saver")

# Packs per index file: restic writes an index about every 50 packs too; it bounds
# how much an interrupted run has to re-upload.
PACKS_PER_INDEX = 64


@dataclass
class SaverStats:
    data_blobs: int = 0
    tree_blobs: int = 0
    data_added: int = 0  # plaintext bytes of new data blobs
    data_added_packed: int = 0  # stored (compressed, encrypted) bytes of new blobs
    packs: int = 0
    index_files: list[str] = field(default_factory=list)


class BlobSaver:
    """Collects encoded blobs into data and tree packs and uploads them."""

    def __init__(
        self,
        repo: object,
        index: Index,
        *,
        pack_size: int,
        connections: int,
        dry_run: bool = False,
    ) -> None:
        self._repo = repo
        self._crypto = repo.crypto  # type: ignore[attr-defined]
        self._backend = repo.backend  # type: ignore[attr-defined]
        self.index = index
        self._pack_size = pack_size
        self._connections = connections
        self._dry_run = dry_run
        self._claimed: set[bytes] = set()
        self._writers = {DATA: PackWriter(DATA), TREE: PackWriter(TREE)}
        # One full pack waits while ``connections`` are being finished and uploaded:
        # each pack in flight is 16-32 MiB of memory, and a deeper queue only helps
        # if uploads stall in bursts (they don't: the pipeline feeds them evenly).
        self._tx, self._rx = anyio.create_memory_object_stream[PackWriter](1)
        self._unindexed: list[tuple[bytes, list[PackEntry]]] = []
        self._index_lock = anyio.Lock()
        self.stats = SaverStats()

    def known(self, blob_id: bytes) -> bool:
        return blob_id in self.index or blob_id in self._claimed

    def claim(self, blob_id: bytes) -> bool:
        """True exactly once per new blob: the caller must then encode and add it."""
        if blob_id in self._claimed or blob_id in self.index:
            return False
        self._claimed.add(blob_id)
        return True

    async def add(self, blob_type: int, blob_id: bytes, stored: bytes, raw_length: int) -> None:
        """Put one encoded blob into the current pack of its type."""
        writer = self._writers[blob_type]
        writer.add(blob_type, blob_id, stored, raw_length)
        if blob_type == DATA:
            self.stats.data_blobs += 1
            self.stats.data_added += raw_length
        else:
            self.stats.tree_blobs += 1
        self.stats.data_added_packed += len(stored)
        if writer.size >= self._pack_size:
            await self._flush(blob_type)

    async def _flush(self, blob_type: int) -> None:
        writer = self._writers[blob_type]
        if not len(writer):
            return
        self._writers[blob_type] = PackWriter(blob_type)
        await self._tx.send(writer)

    async def run_uploaders(self) -> None:
        """Upload packs with ``connections`` concurrent tasks until ``finish``."""
        async with anyio.create_task_group() as tg:
            for _ in range(self._connections):
                tg.start_soon(self._uploader, self._rx.clone())
        self._rx.close()

    async def _uploader(self, rx: anyio.abc.ObjectReceiveStream[PackWriter]) -> None:
        async with rx:
            async for writer in rx:
                started = time.monotonic()
                # Joining 16 MiB and hashing it is kept off the event loop.
                data, pack_id, entries = await anyio.to_thread.run_sync(writer.finish, self._crypto)
                if not self._dry_run:
                    await self._backend.save(object_name("data", pack_id), data)
                    cache = getattr(self._repo, "cache", None)
                    if cache is not None and writer.blob_type == TREE:
                        # The next backup's parent-tree load then needs no download.
                        await cache.save("data", pack_id, data)
                log.debug(
                    "pack.uploaded",
                    pack=pack_id,
                    bytes=len(data),
                    blobs=len(entries),
                    seconds=round(time.monotonic() - started, 4),
                )
                self.stats.packs += 1
                self._unindexed.append((bytes.fromhex(pack_id), entries))
                if len(self._unindexed) >= PACKS_PER_INDEX:
                    await self.write_index()

    async def close_packs(self) -> None:
        """Flush the last partial packs and let the uploaders drain and stop."""
        await self._flush(DATA)
        await self._flush(TREE)
        self._tx.close()

    async def write_index(self) -> None:
        """Write an index file for the packs uploaded since the last one."""
        async with self._index_lock:
            packs, self._unindexed = self._unindexed, []
            if not packs or self._dry_run:
                return
            payload = encode_index(IndexFile(packs=packs))
            index_id: str = await self._repo.save_sealed("index", payload)  # type: ignore[attr-defined]
            for pack_id, entries in packs:
                self.index.add_pack(pack_id, entries)
            self.stats.index_files.append(index_id)
            log.debug("index.saved", index=index_id, packs=len(packs))
