"""``recover``: a snapshot of the trees no snapshot references (restic's).

After a snapshot file was lost or forgotten by mistake (and before a ``prune``), its
trees and data are still in the repository. ``recover``:

1. makes sure the index is complete: packs on the backend that no index lists (an
   interrupted backup's) get an index file from their headers, as restic ≥ 0.18 does;
2. reads every tree blob the index lists and marks the subtrees each refers to, and
   the root tree of every snapshot;
3. takes the trees nobody marked — the *roots*: unreferenced, and not below another
   unreferenced tree — and saves one snapshot (path ``/recover``, tag ``recovered``)
   whose root tree has a directory per root tree, named by its short ID.

Nothing found: no snapshot. A tree that cannot be read is reported and skipped (the
trees below it then count as roots).
"""

from __future__ import annotations

import getpass
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import structlog

from cairn import __version__
from cairn.backends.base import NotFound, ObjectTruncated, is_hex_id
from cairn.repo.errors import CorruptedObject, ObjectNotFound
from cairn.repo.pack import TREE, PackEntry
from cairn.repo.snapshot import Snapshot
from cairn.repo.tree import Node, Tree
from cairn.stages.check import read_pack_header
from cairn.stages.snapshots import load_snapshots
from cairn.stages.treerewrite import TreeRewriter

if TYPE_CHECKING:
    from cairn.repo.index import Index
    from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.recover")

RECOVERED_TAG = "recovered"
RECOVER_PATH = "/recover"


@dataclass
class RecoverResult:
    """What ``recover`` found and did."""

    packs_indexed: int = 0  # packs no index listed, indexed first
    trees: int = 0  # tree blobs in the index
    roots: list[str] = field(default_factory=list)  # hex IDs of the unreferenced roots
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (tree, problem)
    snapshot_id: str | None = None


async def index_unindexed_packs(repo: Repository, index: Index, connections: int) -> int:
    """Write one index file for the packs on the backend that no index lists (their
    headers read; an unreadable one is left for ``repair index``/``prune``)."""
    known = {p.hex() for p in index.packs()}
    sizes = {}
    async for name, size in repo.backend.list("data/"):
        pack_id = name.rsplit("/", 1)[-1]
        if is_hex_id(pack_id) and pack_id not in known:  # not a stray file
            sizes[pack_id] = size
    found: list[tuple[bytes, list[PackEntry]]] = []
    limiter = anyio.CapacityLimiter(max(1, connections))

    async def one(pack_id: str) -> None:
        async with limiter:
            try:
                entries = await read_pack_header(repo.backend, repo.crypto, pack_id, sizes[pack_id])
            except (CorruptedObject, NotFound, ObjectTruncated) as exc:
                log.warning("recover.pack_unreadable", pack=pack_id, error=str(exc))
                return
            found.append((bytes.fromhex(pack_id), entries))

    async with anyio.create_task_group() as tg:
        for pack_id in sorted(sizes):
            tg.start_soon(one, pack_id)
    if found:
        await repo.save_index(sorted(found))  # repo.index (this index) learns them
    return len(found)


async def find_roots(
    repo: Repository, index: Index, connections: int, result: RecoverResult
) -> list[bytes]:
    """The tree blobs neither a snapshot nor another tree refers to."""
    referenced: dict[bytes, bool] = {
        blob_id: False for blob_id, loc in index.blobs() if loc.type == TREE
    }
    result.trees = len(referenced)
    todo = iter(list(referenced))

    async def reader() -> None:
        # A few readers share one iterator: a repository holds millions of trees,
        # too many for a task each.
        for tree_id in todo:
            try:
                tree = await repo.load_tree(tree_id)
            except (CorruptedObject, ObjectNotFound) as exc:
                result.unreadable.append((tree_id.hex(), str(exc)))
                continue
            for node in tree.nodes:
                if node.type == "dir" and node.subtree is not None:
                    referenced[node.subtree] = True

    async with anyio.create_task_group() as tg:
        for _ in range(max(1, connections)):
            tg.start_soon(reader)
    for _sid, snap in await load_snapshots(repo):
        referenced[snap.tree] = True
    result.unreadable.sort()
    return sorted(tree_id for tree_id, seen in referenced.items() if not seen)


def recovered_tree(roots: list[bytes]) -> Tree:
    """One directory per root tree, named by its short ID (the full ID if two
    short IDs are the same)."""
    short = [r.hex()[:8] for r in roots]
    now = time.time_ns()
    nodes = [
        Node(
            type="dir",
            name=(name if short.count(name) == 1 else root.hex()).encode(),
            mode=0o755,
            mtime_ns=now,
            atime_ns=now,
            ctime_ns=now,
            uid=os.getuid(),
            gid=os.getgid(),
            subtree=root,
        )
        for name, root in zip(short, roots, strict=True)
    ]
    return Tree(nodes)


async def recover(
    repo: Repository, *, hostname: str, connections: int, level: int = 3
) -> RecoverResult:
    """See the module docstring."""
    result = RecoverResult()
    index = repo.index if repo.index is not None else await repo.load_index()
    result.packs_indexed = await index_unindexed_packs(repo, index, connections)
    roots = await find_roots(repo, index, connections, result)
    result.roots = [r.hex() for r in roots]
    log.info("recover.roots", trees=result.trees, roots=len(roots))
    if not roots:
        return result
    store = TreeRewriter(repo, index, level)
    tree_id = store.store(recovered_tree(roots))
    await store.flush()
    try:
        user = getpass.getuser()
    except Exception:  # no user name for this uid (a container): as backup does
        user = ""
    snap = Snapshot(
        time_ns=time.time_ns(),
        tree=tree_id,
        paths=[RECOVER_PATH],
        hostname=hostname,
        username=user,
        uid=os.getuid(),
        gid=os.getgid(),
        tags=[RECOVERED_TAG],
        program_version=f"cairn {__version__}",
    )
    result.snapshot_id = await repo.save_snapshot(snap)
    return result
