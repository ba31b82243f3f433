"""The shared stages that store blobs: ``pack`` → ``upload`` → ``index``.

Every command that writes blobs (backup; prune's repack and repair next) appends
these three stages to its pipeline with :meth:`Packer.add_to`::

    ... ──▶ pack ──ch(0)──▶ upload ──ch(4)──▶ index
            (raw: blobs →    (map, connections   (sink: an index file
             full packs)      tasks: join, save)   every PACKS_PER_INDEX packs)

* ``pack`` receives :class:`EncodedBlob` items — or a sequence of them, e.g. the
  blobs of one worker job sharing an output slot — copies each into the current
  data or tree pack (data and tree blobs never share a pack), then calls the
  blob's ``release`` (e.g. to free that output slot), and hands a full pack on.
  Its link to ``upload`` holds no item: a full pack waits in ``pack``'s hand until
  an uploader is free, so packs never queue up in memory on a slow link.
* ``upload`` joins a pack (in a thread, one at a time) and saves it; tree packs
  also go into the metadata cache (the next backup's parent trees need no
  download). With ``dry_run`` nothing is saved.
* ``index`` writes an index file every :data:`PACKS_PER_INDEX` uploaded packs.

Behind an upload limit charged per whole object (every backend but REST and rclone,
which pace the wire), ``pack`` pays the token bucket for each blob before adding
it and the save is marked prepaid: the limit then holds blobs back before they
are packed, not full packs in the upload tasks (one per connection), and shows
as ``pack``'s throttled time.

Crash safety by ordering: a pack is uploaded before any index names it, and the
caller writes its snapshot only after :meth:`Packer.finish`, which — after the
pipeline ended, *also when it failed* (shielded from cancellation) — writes the
index of every uploaded pack not yet indexed, so a rerun reuses them.

Usage::

    packer = Packer(repo, index, pack_size=..., connections=...)
    pipeline = packer.add_to(Pipeline(...).source(...).map(...))
    trees = pipeline.inlet("pack", until="read")   # blobs from outside the chain
    try:
        await pipeline.run()
    finally:
        await packer.finish()

``Packer.claim(blob_id)`` is True once per blob the repository lacks: the caller
must then encode the blob and send it to ``pack``. ``held`` counts the bytes of
blobs and packs held (see docs/architecture.md, "Memory bound").
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from cairn.backends.base import object_name
from cairn.backends.throttle import UPLOAD_PREPAID, charge, prepaid_upload_limiter
from cairn.pipeline import Pipeline, raising_causes
from cairn.pipeline.memory import HeldBytes
from cairn.repo.index import Index, IndexFile, encode_index
from cairn.repo.pack import DATA, TREE, PackEntry, PackWriter
from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.packing")

# Packs per index file: restic writes an index about every 50 packs too; it bounds
# how much an interrupted run has to re-upload.
PACKS_PER_INDEX = 64
# Bytes a pack's header adds per blob (charged with each blob when prepaying).
PACK_OVERHEAD = 64
# A lone blob (a tree) smaller than this is spooled on the event loop: a thread hop
# costs more than its write.
SMALL_WRITE = 64 * 1024

# What to tune when a stage of the packing limits the run (the bottleneck line).
PACK_HINT = "none: packing runs in the main process (report it)"
UPLOAD_HINT = "--connections (the backend is slow to answer)"
UPLOAD_THROTTLE_HINT = "--limit-upload (the upload limit holds it)"
INDEX_HINT = "none: index files are small (report it)"


@dataclass(frozen=True)
class EncodedBlob:
    """One blob for the ``pack`` stage: its stored (compressed, encrypted) bytes.

    A memoryview (of a shared-memory slot) is copied by ``pack``, which then
    calls ``release``: the owner of the view may reuse it from then on.
    """

    blob_type: int  # DATA or TREE
    blob_id: bytes
    data: bytes | memoryview
    raw_length: int
    release: Callable[[], None] | None = None


@dataclass
class SaverStats:
    """What the packing stages added to the repository."""

    data_blobs: int = 0
    tree_blobs: int = 0
    data_added: int = 0  # plaintext bytes of new data blobs
    data_added_packed: int = 0  # stored (compressed, encrypted) bytes of new blobs
    packs: int = 0
    pack_bytes: int = 0  # bytes of the packs uploaded (blobs, headers)
    index_files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Uploaded:
    pack_id: str
    size: int


def blob_bytes(item: EncodedBlob | Sequence[EncodedBlob]) -> int:
    """Stored bytes of a blob or a batch of blobs (``sizeof`` of the ``pack`` stage)."""
    if isinstance(item, EncodedBlob):
        return len(item.data)
    return sum(len(blob.data) for blob in item)


class Packer:
    """Blobs into packs, packs onto the backend, index files describing them."""

    def __init__(
        self,
        repo: Repository,
        index: Index,
        *,
        pack_size: int,
        connections: int,
        dry_run: bool = False,
        held: HeldBytes | None = None,
        upload_capacity: int = 0,
        throttle_hint: str = UPLOAD_THROTTLE_HINT,
        spool_dir: str | None = None,
    ) -> None:
        self._repo = repo
        self._backend = repo.backend
        self.index = index
        self._pack_size = pack_size
        self._connections = connections
        self._dry_run = dry_run
        # 0: a full pack is handed to an uploader directly (see the module doc).
        self._upload_capacity = upload_capacity
        self._throttle_hint = throttle_hint
        # With an upload limit charged per whole object (backends that do not pace
        # their uploads), "pack" pays for each blob as it adds it: a full pack is
        # paid for and goes straight up, instead of waiting for the limit in one
        # upload task per connection, and the bucket is used while the next pack
        # fills (the wire sees the same bytes at the same rate, each pack in one
        # burst as before; see backends/throttle.py).
        self._prepay = None if dry_run else prepaid_upload_limiter(repo.backend)
        # Packs are assembled in unlinked temporary files (as restic does): a pack
        # filling or waiting for a connection holds page cache, not memory. A local
        # repository has them made in its own directory and links each finished one
        # into place (one write of the bytes, not two). A dry run uploads nothing and
        # keeps its packs in memory.
        backend_dir = getattr(repo.backend, "spool_dir", None)
        self._spool = None if dry_run else (spool_dir or backend_dir or tempfile.gettempdir())
        self._claimed: set[bytes] = set()
        # Joining a pack briefly needs its bytes twice: one join at a time.
        self._join_lock = anyio.Lock()
        self._unindexed: list[tuple[bytes, list[PackEntry]]] = []
        self._index_lock = anyio.Lock()
        #: Bytes of blobs and packs held (see docs/architecture.md, "Memory bound").
        self.held = held if held is not None else HeldBytes()
        self.stats = SaverStats()

    def claim(self, blob_id: bytes) -> bool:
        """True exactly once per blob the repository lacks: the caller must then
        encode it and send it to ``pack``."""
        if blob_id in self._claimed or blob_id in self.index:
            return False
        self._claimed.add(blob_id)
        return True

    def held_bound(self, blob_max: int) -> int:
        """The most bytes of blobs and packs these stages hold (``held``), when no
        blob is over ``blob_max`` stored bytes: each pack ends at most one blob past
        ``pack_size``. Spooled (the default), only the packs being saved are mapped:
        ``connections`` of them. In memory (a dry run): those, one more being joined,
        one full pack waiting in ``pack``'s hand, and one data and one tree pack
        filling. Reasoning: docs/architecture.md, "Memory bound"."""
        pack = self._pack_size + blob_max
        if self._spool is not None:
            return self._connections * pack
        return (self._connections + 4) * pack

    def add_to(self, pipeline: Pipeline) -> Pipeline:
        """Append the stages ``pack``, ``upload`` and ``index`` to ``pipeline``."""
        return (
            pipeline.stage("pack", self._pack, hint=PACK_HINT, throttle_hint=self._throttle_hint)
            .map(
                "upload",
                self._upload,
                concurrency=self._connections,
                sizeof=_pack_bytes,
                capacity=self._upload_capacity,
                hint=UPLOAD_HINT,
                throttle_hint=self._throttle_hint,
            )
            .sink("index", self._index, hint=INDEX_HINT)
        )

    # -- pack -------------------------------------------------------------------

    async def _pack(self, receive: Any, send: Any) -> None:
        writers = {DATA: self._writer(DATA), TREE: self._writer(TREE)}
        try:
            async for item in receive:
                blobs = [item] if isinstance(item, EncodedBlob) else list(item)
                try:
                    if self._prepay is not None:
                        await charge(self._prepay, sum(len(b.data) + PACK_OVERHEAD for b in blobs))
                    # Blobs of one type (an encode job's, or one tree), cut where a
                    # pack fills: each run is one write, off the event loop.
                    run: list[EncodedBlob] = []
                    run_bytes = 0
                    for blob in blobs:
                        writer = writers[blob.blob_type]
                        run.append(blob)
                        run_bytes += len(blob.data)
                        if writer.size + run_bytes >= self._pack_size:
                            await self._add(writer, run)
                            run, run_bytes = [], 0
                            writers[blob.blob_type] = self._writer(blob.blob_type)
                            await self._hand_over(writer, send)
                    if run:
                        await self._add(writers[run[0].blob_type], run)
                finally:
                    # Copied (or the run is ending): the owner may reuse the bytes.
                    for blob in blobs:
                        if blob.release is not None:
                            blob.release()
            for blob_type, writer in list(writers.items()):
                if len(writer):
                    writers[blob_type] = self._writer(blob_type)
                    await self._hand_over(writer, send)
        finally:
            # Not handed over (the run failed): their files go now.
            for writer in writers.values():
                writer.discard()

    def _writer(self, blob_type: int) -> PackWriter:
        return PackWriter(blob_type, self._spool)

    async def _hand_over(self, writer: PackWriter, send: Any) -> None:
        await send.send(writer)

    async def _add(self, writer: PackWriter, blobs: list[EncodedBlob]) -> None:
        entries = [(b.blob_type, b.blob_id, b.data, b.raw_length) for b in blobs]
        if self._spool is None:  # in memory: a view of a slot is copied
            writer.add_many(entries)
            self.held.add(sum(len(b.data) for b in blobs))
        elif len(blobs) == 1 and len(blobs[0].data) < SMALL_WRITE:
            writer.add_many(entries)  # a tree: a thread hop would cost more
        else:
            await anyio.to_thread.run_sync(writer.add_many, entries)
        for blob in blobs:
            if blob.blob_type == DATA:
                self.stats.data_blobs += 1
                self.stats.data_added += blob.raw_length
            else:
                self.stats.tree_blobs += 1
            self.stats.data_added_packed += len(blob.data)

    # -- upload -----------------------------------------------------------------

    async def _upload(self, writer: PackWriter) -> _Uploaded:
        started = time.monotonic()
        if self._spool is not None:
            # Header, flush and hash in a thread; the backend reads the file through
            # a map (page cache), counted as held while it is being saved.
            pack = await anyio.to_thread.run_sync(writer.finish_spooled, self._repo.crypto)
            with pack, self.held.holding(pack.size):
                await self._save(writer.blob_type, pack.pack_id, pack.view)
            pack_id, size, entries = pack.pack_id, pack.size, pack.entries
        else:
            pack_id, size, entries = await self._upload_joined(writer)
        log.debug(
            "pack.uploaded",
            pack=pack_id,
            bytes=size,
            blobs=len(entries),
            seconds=round(time.monotonic() - started, 4),
        )
        self.stats.packs += 1
        self.stats.pack_bytes += size
        # Noted here, not in the index stage: a pack that reached the backend is
        # indexed by finish() even if the run fails before "index" sees it.
        self._unindexed.append((bytes.fromhex(pack_id), entries))
        return _Uploaded(pack_id, size)

    async def _upload_joined(self, writer: PackWriter) -> tuple[str, int, list[PackEntry]]:
        """A pack kept in memory (a dry run): join it, then "save" it."""
        blobs = writer.size
        try:
            async with self._join_lock:
                # Joining 16 MiB and hashing it is kept off the event loop. For a
                # moment the blobs and the joined pack are both held.
                with self.held.holding(blobs):
                    data, pack_id, entries = await anyio.to_thread.run_sync(
                        writer.finish, self._repo.crypto
                    )
        finally:
            self.held.sub(blobs)
        with self.held.holding(len(data)):
            await self._save(writer.blob_type, pack_id, data)
        return pack_id, len(data), entries

    async def _save(self, blob_type: int, pack_id: str, data: bytes | memoryview) -> None:
        if self._dry_run:
            return
        token = UPLOAD_PREPAID.set(self._prepay is not None)
        try:
            await self._backend.save(object_name("data", pack_id), data)
        finally:
            UPLOAD_PREPAID.reset(token)
        cache = self._repo.cache
        if cache is not None and blob_type == TREE:
            # The next backup's parent-tree load then needs no download.
            await cache.save("data", pack_id, data)

    # -- index ------------------------------------------------------------------

    async def _index(self, uploaded: _Uploaded) -> None:
        if len(self._unindexed) >= PACKS_PER_INDEX:
            await self._write_index()

    async def finish(self) -> None:
        """Write the index of every uploaded pack not yet indexed. Call it after
        the pipeline ended, also when it failed: it is shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            await self._write_index()

    async def _write_index(self) -> None:
        async with self._index_lock:
            packs, self._unindexed = self._unindexed, []
            if not packs or self._dry_run:
                return
            payload = encode_index(IndexFile(packs=packs))
            index_id = await self._repo.save_sealed("index", payload)
            for pack_id, entries in packs:
                self.index.add_pack(pack_id, entries)
            self.stats.index_files.append(index_id)
            log.debug("index.saved", index=index_id, packs=len(packs))


def _pack_bytes(item: PackWriter) -> int:
    return item.size


async def store_blobs(
    repo: Repository,
    blobs: Iterable[EncodedBlob],
    *,
    pack_size: int | None = None,
    connections: int = 1,
) -> tuple[list[tuple[bytes, list[PackEntry]]], list[str]]:
    """Pack, upload and index ``blobs`` (already encoded) with the same stages as
    every pipeline (``pack`` → ``upload`` → ``index``, then :meth:`Packer.finish`):
    for small writes such as the trees ``repair snapshots`` rewrites. Packs are of
    the repository's pack size unless ``pack_size`` says otherwise; the repository's
    loaded index (if any) learns them. Returns the new packs with their entries and
    the IDs of the index files written."""
    size = pack_size or repo.config.pack_size
    packer = Packer(repo, Index(), pack_size=size, connections=connections)
    pipeline = packer.add_to(Pipeline("store").source("blobs", blobs, sizeof=blob_bytes))
    try:
        with raising_causes():
            await pipeline.run()
    finally:
        await packer.finish()
    packs = packer.index.pack_entries()
    if repo.index is not None:
        for pack_id, entries in packs:
            repo.index.add_pack(pack_id, entries)
    return packs, packer.stats.index_files
