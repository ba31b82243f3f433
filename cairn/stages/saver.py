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
from cairn.pipeline.memory import HeldBytes
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
        held: HeldBytes | None = None,
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
        # Backpressure: a full pack is handed to an uploader directly (a channel of
        # capacity 0), and adding waits (one adder at a time) while the handing-over
        # does. So at most ``connections`` packs are being uploaded, one waits in
        # the hand of the adder that filled it, and encode tasks wait on ``add``
        # holding their output slot — which stops the workers, then the readers.
        # Nothing queues up out of sight when the link is slow.
        self._tx, self._rx = anyio.create_memory_object_stream[PackWriter](0)
        self._add_lock = anyio.Lock()
        # Joining a pack briefly needs its bytes twice: one join at a time.
        self._finish_lock = anyio.Lock()
        self._unindexed: list[tuple[bytes, list[PackEntry]]] = []
        self._index_lock = anyio.Lock()
        #: Bytes of blobs and packs this saver holds (see docs/architecture.md).
        self.held = held if held is not None else HeldBytes()
        self.stats = SaverStats()

    def claim(self, blob_id: bytes) -> bool:
        """True exactly once per new blob: the caller must then encode and add it."""
        if blob_id in self._claimed or blob_id in self.index:
            return False
        self._claimed.add(blob_id)
        return True

    async def add(
        self, blob_type: int, blob_id: bytes, stored: bytes | memoryview, raw_length: int
    ) -> None:
        """Put one encoded blob into the current pack of its type.

        Waits while the pack it fills cannot be handed to an uploader; a
        memoryview (of an output slot) is copied, so the caller may reuse it
        once this returns.
        """
        async with self._add_lock:
            writer = self._writers[blob_type]
            blob = bytes(stored) if isinstance(stored, memoryview) else stored
            self.held.add(len(blob))
            writer.add(blob_type, blob_id, blob, raw_length)
            if blob_type == DATA:
                self.stats.data_blobs += 1
                self.stats.data_added += raw_length
            else:
                self.stats.tree_blobs += 1
            self.stats.data_added_packed += len(blob)
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
                blobs = writer.size
                async with self._finish_lock:
                    # Joining 16 MiB and hashing it is kept off the event loop. For a
                    # moment the blobs and the joined pack are both held.
                    with self.held.holding(blobs):
                        data, pack_id, entries = await anyio.to_thread.run_sync(
                            writer.finish, self._crypto
                        )
                    self.held.sub(blobs)
                    self.held.add(len(data))
                try:
                    await self._upload(writer.blob_type, pack_id, data)
                finally:
                    self.held.sub(len(data))
                log.debug(
                    "pack.uploaded",
                    pack=pack_id,
                    bytes=len(data),
                    blobs=len(entries),
                    seconds=round(time.monotonic() - started, 4),
                )
                del data
                self.stats.packs += 1
                self._unindexed.append((bytes.fromhex(pack_id), entries))
                if len(self._unindexed) >= PACKS_PER_INDEX:
                    await self.write_index()

    async def _upload(self, blob_type: int, pack_id: str, data: bytes) -> None:
        if self._dry_run:
            return
        await self._backend.save(object_name("data", pack_id), data)
        cache = getattr(self._repo, "cache", None)
        if cache is not None and blob_type == TREE:
            # The next backup's parent-tree load then needs no download.
            await cache.save("data", pack_id, data)

    async def close_packs(self) -> None:
        """Flush the last partial packs and let the uploaders drain and stop."""
        async with self._add_lock:
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
