"""``copy``: snapshots from one repository into another with different keys.

Blob IDs are keyed, so every blob gets a new ID in the destination and every tree
is rewritten bottom-up. Per snapshot (oldest first), two pipelines share one
worker pool, one pair of slot pools and one :class:`~cairn.stages.packing.Packer`::

    data:  plan ──▶ download ──▶ recode ──▶ pack ──▶ upload ──▶ index
           (ranges   (source     (workers:   (the shared packing stages,
            of the    backend,    decode,     over the destination's index)
            blobs     slot ←      new ID,
            needed)   load)       encode)
    trees: rewrite ──▶ pack ──▶ upload ──▶ index
           (source: the snapshot's trees, children before parents, each with
            its blobs' and subtrees' new IDs)

then :meth:`Packer.finish` (index files) and the snapshot — the format's crash-safe
order: packs, then index, then snapshot.

* **Deduplication**: a source blob is downloaded and decoded once per run (the
  mapping of source to destination IDs is kept); a blob the destination already
  has is not sent (``Packer.claim``). Before a snapshot is copied, the copy of an
  earlier snapshot (preferably of the same host and paths, found by its
  ``original``) seeds the mapping by walking both trees side by side, so an
  incremental snapshot downloads only what changed since — as a backup reads only
  what changed since its parent.
* **Skipping**: the copy records the source snapshot's ID in ``original`` (or keeps
  the source's own ``original``); a source snapshot whose ID matches one in the
  destination with the same time, host, user, paths, tags and excludes is skipped
  (restic's rule).
* **Resuming**: packs uploaded before an interruption are indexed (``finish`` runs
  also on failure), so the next run finds their blobs in the index and sends them
  no more.
* **Damage**: a blob that cannot be downloaded or decoded fails the snapshots that
  need it, each with one message; the others are copied.

The source is a :class:`~cairn.stages.copysource.CopySource` — a reader of
snapshots, trees and blobs — so another repository format can be copied from by
giving its own source.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import anyio
import structlog

from cairn.backends.base import NotFound, ObjectTruncated
from cairn.pipeline import (
    Pipeline,
    PipelineOptions,
    PipelineSnapshot,
    Slot,
    SlotPool,
    WorkerPool,
    raising_causes,
    waiting_on_output,
)
from cairn.repo.codec import DEFAULT_LEVEL, encode_blob
from cairn.repo.crypto import OVERHEAD
from cairn.repo.errors import RepoError
from cairn.repo.pack import DATA, TREE
from cairn.repo.repository import Repository
from cairn.repo.snapshot import Snapshot
from cairn.repo.tree import Node, Tree, encode_tree
from cairn.stages.copysource import (
    CopySource,
    earlier_copy,
    map_copied_trees,
    persistent_id,
)
from cairn.stages.fetch import (
    CPU_HINT,
    DOWNLOAD_HINT,
    SLOT_SIZE,
    THROTTLE_HINT,
    Batch,
    Fetched,
    batch_bytes,
    download,
    plan_ranges,
)
from cairn.stages.packing import EncodedBlob, Packer, blob_bytes
from cairn.stages.recode import preload, recode_spans

log = structlog.get_logger("cairn.copy")

# Bytes an encoded blob adds to its plaintext: the compression flag and the envelope.
_ENCODED_EXTRA = 1 + OVERHEAD
# A range's re-encoded blobs go into one output slot of this size.
OUT_SLOT_SIZE = SLOT_SIZE


@dataclass(frozen=True)
class CopyOptions:
    """How to write the destination and how wide to run."""

    level: int | None  # None: data blobs kept as the source compressed them
    pack_size: int
    cpu_workers: int
    connections: int  # of each side


@dataclass
class CopyStats:
    """What a copy did, for progress and the summary."""

    snapshots_total: int = 0
    snapshots_done: int = 0  # copied, failed or skipped
    blobs_recoded: int = 0  # source blobs downloaded, decoded and re-encoded
    blobs_present: int = 0  # of those, already in the destination (not sent)
    blobs_mapped: int = 0  # found through an earlier copy: not downloaded at all
    bytes_planned: int = 0  # stored bytes of the source ranges to download
    bytes_downloaded: int = 0


@dataclass
class CopyResult:
    copied: list[tuple[str, str]] = field(default_factory=list)  # (source, new ID)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, its copy)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source, why)
    stats: CopyStats = field(default_factory=CopyStats)
    # Added to the destination (the packing stages' counters).
    data_blobs: int = 0
    tree_blobs: int = 0
    data_added: int = 0
    data_added_packed: int = 0
    packs: int = 0
    # The data pipeline that moved the most bytes (for the stage table).
    pipeline: PipelineSnapshot | None = None


class _Want(NamedTuple):
    """A source data blob to copy: where it is stored and how long it is decoded."""

    blob_id: bytes
    offset: int
    length: int
    raw_length: int


def split_by_raw(batches: Iterable[Batch], limit: int) -> list[Batch]:
    """Cut each range so that its blobs, re-encoded, fit one output slot of
    ``limit`` bytes (compressed blobs can decode to far more than they store)."""
    out = []
    for batch in batches:
        current: list[_Want] = []
        used = 0
        for want in batch.blobs:
            need = want.raw_length + _ENCODED_EXTRA
            if current and used + need > limit:
                out.append(_sub_batch(batch.pack_id, current))
                current, used = [], 0
            current.append(want)
            used += need
        if current:
            out.append(_sub_batch(batch.pack_id, current))
    return out


def _sub_batch(pack_id: bytes, wants: list[_Want]) -> Batch:
    start = wants[0].offset
    end = max(w.offset + w.length for w in wants)
    return Batch(pack_id, start, end - start, wants)


class _Failed(Exception):
    """A snapshot cannot be copied (internal: recorded, never raised to the user)."""


@dataclass
class _Frame:
    """One tree of the bottom-up rewrite: its nodes and the rewritten ones so far."""

    tree_id: bytes
    path: bytes
    nodes: list[Node]
    done: list[Node] = field(default_factory=list)


class _SlotShare:
    """The re-encoded blobs of one job share an output slot: the last one packed
    frees it."""

    def __init__(self, slot: Slot, count: int) -> None:
        self.slot = slot
        self.count = count

    def release(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.slot.release()


def copy_workers(workers: int) -> WorkerPool:
    """The worker pool of a copy (enter it to start the workers): they need no
    keys up front, so it can start while the repositories are being opened."""
    return WorkerPool(workers, initializer=preload)


class Copier:
    """Copies snapshots from ``source`` into ``dest`` (its index loaded)."""

    def __init__(self, source: CopySource, dest: Repository, options: CopyOptions) -> None:
        if dest.index is None:
            raise ValueError("load the destination's index first")
        self.source = source
        self.dest = dest
        self.options = options
        self.packer = Packer(
            dest, dest.index, pack_size=options.pack_size, connections=options.connections
        )
        self.result = CopyResult()
        self.stats = self.result.stats
        # Source ID → destination ID, for blobs and trees already copied (or found
        # in an earlier copy); source blobs that cannot be copied, and why.
        self._blobs: dict[bytes, bytes] = {}
        self._trees: dict[bytes, bytes] = {}
        self._bad: dict[bytes, str] = {}
        self._seeded: set[str] = set()
        #: The source snapshot being copied (for progress).
        self.current = ""
        self._pipeline: Pipeline | None = None

    def snapshot(self) -> PipelineSnapshot | None:
        """The running data pipeline's counters (for progress), if one runs."""
        return self._pipeline.snapshot() if self._pipeline is not None else None

    async def run(
        self,
        todo: Sequence[tuple[str, Snapshot]],
        earlier: dict[str, tuple[str, Snapshot]],
        source_snapshots: Sequence[tuple[str, Snapshot]],
        pool: WorkerPool | None = None,
    ) -> CopyResult:
        """Copy ``todo`` (oldest first). ``earlier`` maps source snapshots already
        copied to their copies (to seed the ID mapping from). ``pool``: workers of
        :func:`copy_workers` started beforehand (else started here)."""
        self.stats.snapshots_total = len(todo)
        if not todo:
            return self.result
        workers, connections = self.options.cpu_workers, self.options.connections
        in_slots = SlotPool(SLOT_SIZE, 2 * workers + connections)
        out_slots = SlotPool(OUT_SLOT_SIZE, 2 * workers + 2)
        try:
            async with AsyncExitStack() as stack:
                if pool is None:
                    pool = await stack.enter_async_context(copy_workers(workers))
                for sid, snap in todo:
                    self.current = sid
                    await self._seed_from(sid, snap, earlier, source_snapshots)
                    await self._copy_one(sid, snap, pool, in_slots, out_slots)
                    self.stats.snapshots_done += 1
        finally:
            in_slots.close()
            out_slots.close()
        s = self.packer.stats
        self.result.data_blobs, self.result.tree_blobs = s.data_blobs, s.tree_blobs
        self.result.data_added, self.result.data_added_packed = s.data_added, s.data_added_packed
        self.result.packs = s.packs
        return self.result

    # -- one snapshot -------------------------------------------------------------

    async def _copy_one(
        self,
        sid: str,
        snap: Snapshot,
        pool: WorkerPool,
        in_slots: SlotPool,
        out_slots: SlotPool,
    ) -> None:
        started = time.monotonic()
        try:
            wanted = await self._blobs_to_copy(snap.tree)
            try:
                await self._copy_data(wanted, pool, in_slots, out_slots)
                root = await self._copy_trees(snap.tree)
            finally:
                # Also when the run fails: what reached the backend is indexed, so
                # a rerun does not send it again.
                await self.packer.finish()
        except _Failed as exc:
            self.result.failed.append((sid, str(exc)))
            log.error("copy.snapshot_failed", source=sid, error=str(exc))
            return
        copy = replace(snap, tree=root, parent=None, original=persistent_id(sid, snap))
        new_id = await self.dest.save_snapshot(copy)
        self.result.copied.append((sid, new_id))
        log.info(
            "copy.snapshot_copied",
            source=sid,
            snapshot=new_id,
            blobs=len(wanted),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _blobs_to_copy(self, root: bytes) -> list[bytes]:
        """The data blobs of the trees below ``root`` not copied yet, each once.
        Trees already copied (this run, or in an earlier copy) are not walked."""
        wanted: dict[bytes, None] = {}
        seen: set[bytes] = set()
        limiter = anyio.CapacityLimiter(self.options.connections)
        level = [(root, b"")]
        while level:
            todo = [(t, p) for t, p in level if t not in self._trees and t not in seen]
            seen.update(t for t, _ in todo)
            nxt: list[tuple[bytes, bytes]] = []

            async def one(tree_id: bytes, path: bytes, out: list[tuple[bytes, bytes]]) -> None:
                tree = await self._load_tree(tree_id, path, limiter)
                for node in tree.nodes:
                    if node.type == "dir" and node.subtree is not None:
                        out.append((node.subtree, path + b"/" + node.name))
                    elif node.type == "file":
                        for blob_id in node.content:
                            if blob_id not in self._blobs:
                                wanted[blob_id] = None

            async with anyio.create_task_group() as tg:
                for tree_id, path in todo:
                    tg.start_soon(one, tree_id, path, nxt)
            level = nxt
        return list(wanted)

    async def _load_tree(
        self, tree_id: bytes, path: bytes, limiter: anyio.CapacityLimiter | None = None
    ) -> Tree:
        try:
            if limiter is None:
                return await self.source.load_tree(tree_id)
            async with limiter:
                return await self.source.load_tree(tree_id)
        except (RepoError, NotFound) as exc:
            where = path.decode(errors="backslashreplace") or "/"
            raise _Failed(f"tree {tree_id.hex()[:16]} ({where}) cannot be read: {exc}") from None

    # -- data ---------------------------------------------------------------------

    def _plan(self, wanted: list[bytes]) -> list[Batch]:
        located = []
        for blob_id in wanted:
            loc = self.source.locate(blob_id)
            if loc is None:
                self._bad[blob_id] = "not in the source's index"
                continue
            pack_id, offset, length, raw = loc
            if length > SLOT_SIZE or raw + _ENCODED_EXTRA > OUT_SLOT_SIZE:
                self._bad[blob_id] = f"larger than {SLOT_SIZE} bytes, which copy cannot handle"
                continue
            located.append((pack_id, offset, length, _Want(blob_id, offset, length, raw)))
        return split_by_raw(plan_ranges(located), OUT_SLOT_SIZE)

    async def _copy_data(
        self, wanted: list[bytes], pool: WorkerPool, in_slots: SlotPool, out_slots: SlotPool
    ) -> None:
        batches = self._plan([b for b in wanted if b not in self._bad])
        if not batches:
            return
        self.stats.bytes_planned += sum(b.length for b in batches)
        workers, connections = self.options.cpu_workers, self.options.connections
        pipeline = self.packer.add_to(
            Pipeline("copy", options=PipelineOptions(cpu_workers=workers, connections=connections))
            .source("plan", batches, sizeof=batch_bytes)
            .map(
                "download",
                download(self.source.backend, in_slots, (NotFound, ObjectTruncated)),
                concurrency=connections,
                sizeof=batch_bytes,
                hint=DOWNLOAD_HINT,
                throttle_hint=THROTTLE_HINT,
            )
            .map(
                "recode",
                self._recode_stage(pool, out_slots),
                concurrency=2 * workers,
                sizeof=batch_bytes,
                release=Fetched.release,
                hint=CPU_HINT,
            )
        )
        self._pipeline = pipeline
        try:
            with raising_causes():
                await pipeline.run()
        finally:
            self._pipeline = None
            final = pipeline.snapshot(done=True)
            best = self.result.pipeline
            if best is None or _moved(final) >= _moved(best):
                self.result.pipeline = final

    def _recode_stage(self, pool: WorkerPool, out_slots: SlotPool) -> Any:
        level = self.options.level
        decoder, dest = self.source.decoder, self.dest.crypto

        async def recode(fetched: Fetched) -> AsyncIterator[list[EncodedBlob]]:
            batch = fetched.batch
            wants: list[_Want] = batch.blobs
            if fetched.error is not None:
                why = f"pack {batch.pack_id.hex()} cannot be read: {fetched.error}"
                for want in wants:
                    self._bad[want.blob_id] = why
                return
            spans = [(w.offset - batch.offset, w.length, DATA, w.blob_id) for w in wants]
            with waiting_on_output():  # a free output slot waits for "pack"
                out = await out_slots.acquire()
            try:
                placed, bad = await pool.run(
                    recode_spans, fetched.ref(), out.ref(), spans, level, decoder, dest
                )
            except BaseException:
                out.release()
                raise
            finally:
                fetched.release()
            self.stats.bytes_downloaded += batch.length
            for i, why in bad:
                where = f"pack {batch.pack_id.hex()}"
                self._bad[wants[i].blob_id] = f"corrupted in the source ({where}): {why}"
            blobs = []
            share = _SlotShare(out, 0)
            for i, new_id, pos, size, raw in placed:
                self._blobs[wants[i].blob_id] = new_id
                self.stats.blobs_recoded += 1
                if self.packer.claim(new_id):
                    data = out.view[pos : pos + size]
                    blobs.append(EncodedBlob(DATA, new_id, data, raw, share.release))
                else:
                    self.stats.blobs_present += 1
            share.count = len(blobs)
            if not blobs:
                out.release()
                return
            yield blobs

        return recode

    # -- trees --------------------------------------------------------------------

    async def _copy_trees(self, root: bytes) -> bytes:
        """Rewrite the trees below ``root`` bottom-up and store the new ones; the
        new root's ID. ``_Failed`` if a blob or tree of the snapshot was lost."""
        failure: list[str] = []
        pipeline = self.packer.add_to(
            Pipeline(
                "copy-trees",
                options=PipelineOptions(
                    cpu_workers=self.options.cpu_workers, connections=self.options.connections
                ),
            ).source("rewrite", self._rewrite(root, failure), sizeof=blob_bytes)
        )
        with raising_causes():
            await pipeline.run()
        if failure:
            raise _Failed(failure[0])
        return self._trees[root]

    async def _rewrite(self, root: bytes, failure: list[str]) -> AsyncIterator[EncodedBlob]:
        """The tree blobs of the copy, children before parents (an explicit stack:
        a tree may be deeper than Python's recursion limit). Stops at the first
        tree or blob that cannot be copied, noting why in ``failure``."""
        if root in self._trees:
            return
        try:
            stack = [_Frame(root, b"", (await self._load_tree(root, b"")).nodes)]
            while stack:
                frame = stack[-1]
                if len(frame.done) < len(frame.nodes):
                    node = frame.nodes[len(frame.done)]
                    path = frame.path + b"/" + node.name
                    if node.type == "dir" and node.subtree is not None:
                        new_subtree = self._trees.get(node.subtree)
                        if new_subtree is None:  # rewrite the child first
                            tree = await self._load_tree(node.subtree, path)
                            stack.append(_Frame(node.subtree, path, tree.nodes))
                            continue
                        frame.done.append(replace(node, subtree=new_subtree))
                    elif node.type == "file":
                        frame.done.append(replace(node, content=self._new_content(node, path)))
                    else:
                        frame.done.append(node)
                    continue
                stack.pop()
                blob = self._tree_blob(frame)
                if blob is not None:
                    yield blob
        except _Failed as exc:
            failure.append(str(exc))

    def _new_content(self, node: Node, path: bytes) -> list[bytes]:
        content = []
        for blob_id in node.content:
            new_id = self._blobs.get(blob_id)
            if new_id is None:
                why = self._bad.get(blob_id, "not copied")
                where = path.decode(errors="backslashreplace")
                raise _Failed(f"{where}: data blob {blob_id.hex()[:16]} cannot be copied: {why}")
            content.append(new_id)
        return content

    def _tree_blob(self, frame: _Frame) -> EncodedBlob | None:
        """The rewritten tree of ``frame`` to store (None: the destination has it)."""
        crypto = self.dest.crypto
        payload = encode_tree(Tree(frame.done))
        new_id = crypto.blob_id(payload)
        self._trees[frame.tree_id] = new_id
        if not self.packer.claim(new_id):
            return None
        level = DEFAULT_LEVEL if self.options.level is None else self.options.level
        stored = encode_blob(crypto, TREE, new_id, payload, level)
        return EncodedBlob(TREE, new_id, stored, len(payload))

    # -- what an earlier copy already maps ------------------------------------------

    async def _seed_from(
        self,
        sid: str,
        snap: Snapshot,
        earlier: dict[str, tuple[str, Snapshot]],
        source_snapshots: Sequence[tuple[str, Snapshot]],
    ) -> None:
        """Learn source → destination IDs from the copy of an earlier snapshot
        (:func:`~cairn.stages.copysource.earlier_copy`), once per earlier copy."""
        found = earlier_copy(snap, earlier, source_snapshots, self._seeded)
        if found is None:
            return
        parent, src_tree, dst_tree = found
        self._seeded.add(parent)
        before = len(self._blobs)
        await map_copied_trees(self.source, self.dest, src_tree, dst_tree, self._blobs, self._trees)
        self.stats.blobs_mapped += len(self._blobs) - before
        log.info("copy.seeded", source=sid, earlier=parent, blobs=len(self._blobs) - before)


def _moved(snapshot: PipelineSnapshot) -> int:
    return max((s.bytes_in for s in snapshot.stages), default=0)
