"""``repair index`` and ``repair snapshots``.

* **index**: read every pack's header and write a new index from them, superseding
  (then deleting) every old index file. Packs whose header cannot be read are left
  unindexed and reported; ``prune`` removes them.
* **snapshots**: rewrite each snapshot that references data the index does not
  have. A file losing data blobs keeps the blobs that remain (its size shrinks to
  match); a directory whose tree is lost or unreadable becomes empty. The new
  snapshot carries ``original`` (the old ID) and the tag ``repaired``; what was lost
  is returned path by path. New trees go into new packs and an index before the
  snapshot is written; the old snapshot is deleted only with ``--forget``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import structlog

from cairn.backends.base import NotFound, ObjectTruncated, object_name
from cairn.pipeline.options import DEFAULT_CONNECTIONS
from cairn.repo.errors import CorruptedObject, ObjectNotFound
from cairn.repo.pack import PackEntry
from cairn.repo.tree import Node, Tree
from cairn.stages.check import read_pack_header
from cairn.stages.prune import write_index_files
from cairn.stages.snapshots import load_snapshots
from cairn.stages.treerewrite import TreeRewriter, show_path

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.repair")

REPAIRED_TAG = "repaired"


@dataclass
class IndexRepair:
    """What ``repair index`` did."""

    packs_indexed: int = 0
    blobs: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (pack, problem)
    old_index_files: int = 0
    new_index_files: int = 0


async def repair_index(repo: Repository, connections: int = DEFAULT_CONNECTIONS) -> IndexRepair:
    """Rebuild the index from the pack headers."""
    result = IndexRepair()
    old = await repo.list_ids("index")
    sizes = {n.rsplit("/", 1)[-1]: s async for n, s in repo.backend.list("data/")}
    found: dict[str, list[PackEntry]] = {}
    limiter = anyio.CapacityLimiter(max(1, connections))

    async def one(pack_id: str) -> None:
        async with limiter:
            try:
                found[pack_id] = await read_pack_header(
                    repo.backend, repo.crypto, pack_id, sizes[pack_id]
                )
            except CorruptedObject as exc:
                result.unreadable.append((pack_id, exc.problem))
            except (NotFound, ObjectTruncated) as exc:
                result.unreadable.append((pack_id, str(exc)))

    async with anyio.create_task_group() as tg:
        for pack_id in sorted(sizes):
            tg.start_soon(one, pack_id)
    packs = [(bytes.fromhex(p), found[p]) for p in sorted(found)]
    written = await write_index_files(repo, packs, old)
    for index_id in old:
        try:
            await repo.backend.remove(object_name("index", index_id))
        except NotFound:
            pass
    result.packs_indexed = len(packs)
    result.blobs = sum(len(e) for _p, e in packs)
    result.old_index_files = len(old)
    result.new_index_files = len(written)
    result.unreadable.sort()
    return result


@dataclass
class SnapshotRepair:
    """One rewritten snapshot: old and new ID and what was lost."""

    old_id: str
    new_id: str | None
    lost: list[str]


class _LossRewriter(TreeRewriter):
    """Keeps what the index still has: a file keeps the data blobs that remain, a
    directory whose tree is lost or unreadable becomes empty; notes say what was lost."""

    async def load(self, tree_id: bytes, notes: list[str]) -> Tree:
        try:
            if tree_id in self.index:
                return await self.repo.load_tree(tree_id)
        except (CorruptedObject, ObjectNotFound):
            pass
        notes.append(f": directory contents lost (tree {tree_id.hex()})")
        return Tree()

    async def edit_node(self, node: Node, path: bytes, notes: list[str]) -> Node | None:
        if node.type != "file":
            return node
        kept = [b for b in node.content if b in self.index]
        if len(kept) == len(node.content):
            return node
        missing = len(node.content) - len(kept)
        name = "/" + show_path(node.name)
        notes.append(f"{name}: {missing} of {len(node.content)} data blobs lost")
        size = 0
        for blob_id in kept:
            loc = self.index.lookup(blob_id)
            size += loc.raw_length if loc is not None else 0
        return dataclasses.replace(node, content=kept, size=size)


@dataclass
class SnapshotsRepair:
    """What ``repair snapshots`` did: rewritten snapshots, and snapshot files that
    cannot be read at all (``(id, problem)``; nothing to rewrite them from — ``forget``
    removes them)."""

    repaired: list[SnapshotRepair]
    damaged: list[tuple[str, str]]


async def repair_snapshots(
    repo: Repository, *, forget: bool = False, dry_run: bool = False, level: int = 3
) -> SnapshotsRepair:
    """Rewrite every snapshot that references missing data; see the module docstring."""
    index = repo.index if repo.index is not None else await repo.load_index()
    rewriter = _LossRewriter(repo, index, level)
    plans = []
    snapshots = await load_snapshots(repo)
    for sid, snap in snapshots:
        new_root, lost = await rewriter.rewrite(snap.tree)
        if lost:
            plans.append((sid, snap, new_root, lost))
    if dry_run:
        dry = [SnapshotRepair(sid, None, lost) for sid, _s, _r, lost in plans]
        return SnapshotsRepair(dry, snapshots.damaged)
    await rewriter.flush()
    out = []
    for sid, snap, new_root, lost in plans:
        tags = snap.tags + ([REPAIRED_TAG] if REPAIRED_TAG not in snap.tags else [])
        summary = {**snap.summary, "repair_lost_items": len(lost)}
        new = dataclasses.replace(
            snap, tree=new_root, tags=tags, original=snap.original or sid, summary=summary
        )
        new_id = await repo.save_snapshot(new)
        if forget:
            await repo.backend.remove(object_name("snapshots", sid))
        log.info("repair.snapshot", old=sid, new=new_id, lost=len(lost))
        out.append(SnapshotRepair(sid, new_id, lost))
    return SnapshotsRepair(out, snapshots.damaged)
