"""``prune``: remove what no snapshot references.

Plan: walk every snapshot's trees for the blobs in use; per pack, count used and
unused bytes; delete packs with nothing in use (and packs no index lists); repack
partly used packs, most wasteful first, until the unused space left is within
``--max-unused`` (and the bytes repacked within ``--max-repack-size``).

Execute, in an order that keeps the repository consistent if interrupted anywhere:

1. write the new packs (used blobs of repacked packs, copied verbatim after their
   IDs were verified) — an interruption leaves unindexed packs, harmless;
2. write the new index files; only the last one lists every old index file in
   ``supersedes``, so until it lands the old index stays in force;
3. delete the old index files (already superseded);
4. delete the old packs (no longer indexed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import structlog

from cairn.backends.base import NotFound, object_name
from cairn.repo.codec import decode_blob
from cairn.repo.errors import CorruptedObject, ObjectNotFound, RepoError
from cairn.repo.index import Index, IndexFile, decode_index, encode_index
from cairn.repo.pack import DATA, TREE, PackEntry, PackWriter
from cairn.repo.tree import Tree
from cairn.stages.snapshots import load_snapshots
from cairn.stages.units import parse_size

log = structlog.get_logger("cairn.prune")

# Packs per written index file, as the packing stages do.
PACKS_PER_INDEX = 64


class PruneRefused(RepoError):
    """Prune found damage it must not build on; nothing was changed."""

    exit_code = 1


def max_unused_limit(text: str) -> Callable[[int], float]:
    """``--max-unused``: ``x%`` (of the used size, as restic), a size, or ``unlimited``."""
    text = text.strip().lower()
    if text == "unlimited":
        return lambda _used: float("inf")
    if text.endswith("%"):
        pct = float(text[:-1])
        if not 0 <= pct < 100:
            raise ValueError(f"--max-unused {text!r}: percentage must be in [0, 100)")
        # unused / (used + unused) <= pct  ⇔  unused <= used * pct / (100 - pct)
        return lambda used: used * pct / (100 - pct)
    limit = parse_size(text)
    return lambda _used: float(limit)


@dataclass(frozen=True)
class PruneOptions:
    """How much waste to tolerate and how much to repack."""

    max_unused: str = "5%"
    max_repack_size: int | None = None
    dry_run: bool = False
    connections: int = 4
    pack_size: int = 16 * 1024 * 1024


@dataclass
class PackInfo:
    """One pack: its blobs in use and not, and what prune will do with it."""

    id: str
    size: int
    entries: list[PackEntry]
    used: list[PackEntry] = field(default_factory=list)
    unused_bytes: int = 0
    action: str = "keep"  # keep | delete | repack | missing


@dataclass
class PrunePlan:
    """What prune will do (``--dry-run`` shows it)."""

    packs: dict[str, PackInfo]
    unindexed: dict[str, int]  # on the backend, in no index
    index_ids: list[str]  # every index file, replaced by the new ones
    used_blobs: int = 0
    used_bytes: int = 0
    unused_bytes: int = 0

    def with_action(self, action: str) -> list[PackInfo]:
        return [p for p in self.packs.values() if p.action == action]

    @property
    def changes(self) -> bool:
        return bool(self.unindexed) or any(p.action != "keep" for p in self.packs.values())

    def summary(self) -> dict[str, int]:
        delete, repack = self.with_action("delete"), self.with_action("repack")
        unused_after = self.unused_bytes - sum(p.unused_bytes for p in delete + repack)
        return {
            "used_blobs": self.used_blobs,
            "used_bytes": self.used_bytes,
            "unused_bytes": self.unused_bytes,
            "packs_total": len(self.packs),
            "packs_delete": len(delete),
            "packs_repack": len(repack),
            "packs_unindexed": len(self.unindexed),
            "packs_missing": len(self.with_action("missing")),
            "bytes_delete": sum(p.size for p in delete) + sum(self.unindexed.values()),
            "bytes_repack": sum(p.size for p in repack),
            "unused_bytes_after": unused_after,
        }


@dataclass
class PruneResult:
    packs_written: int = 0
    bytes_written: int = 0
    packs_deleted: int = 0
    bytes_deleted: int = 0
    index_written: list[str] = field(default_factory=list)
    index_deleted: int = 0


async def used_blobs(repo: Any, index: Index, roots: Sequence[tuple[str, bytes]]) -> set[bytes]:
    """Every tree and data blob reachable from ``(snapshot id, root tree)``.

    Raises ``PruneRefused`` naming the first tree or blob that is missing or
    unreadable: pruning on top of damage could delete the only good copy.
    """
    used: set[bytes] = set()
    limiter = anyio.CapacityLimiter(max(1, repo.backend.connections))
    level = [(tree, sid) for sid, tree in roots]
    while level:
        todo = []
        for tree_id, sid in level:
            if tree_id not in used:
                used.add(tree_id)
                todo.append((tree_id, sid))
        nxt: list[tuple[bytes, str]] = []

        async def one(tree_id: bytes, sid: str, out: list[tuple[bytes, str]]) -> None:
            async with limiter:
                try:
                    tree: Tree = await repo.load_tree(tree_id)
                except (CorruptedObject, ObjectNotFound) as exc:
                    raise PruneRefused(
                        f"tree {tree_id.hex()} of snapshot {sid[:8]} cannot be read ({exc}); "
                        "run `cairn check`, then `cairn repair`"
                    ) from None
            for node in tree.nodes:
                if node.type == "dir" and node.subtree is not None:
                    out.append((node.subtree, sid))
                elif node.type == "file":
                    for blob_id in node.content:
                        if blob_id not in index:
                            raise PruneRefused(
                                f"data blob {blob_id.hex()} of snapshot {sid[:8]} is not in the "
                                "index; run `cairn check`, then `cairn repair`"
                            )
                        used.add(blob_id)

        async with anyio.create_task_group() as tg:
            for tree_id, sid in todo:
                tg.start_soon(one, tree_id, sid, nxt)
        level = nxt
    return used


async def _load_index_files(repo: Any) -> tuple[list[str], dict[str, IndexFile]]:
    ids = await repo.list_ids("index")
    files: dict[str, IndexFile] = {}
    for index_id in ids:
        try:
            files[index_id] = decode_index(await repo.load_sealed("index", index_id), index_id)
        except CorruptedObject as exc:
            raise PruneRefused(f"{exc}; run `cairn repair index` first") from None
    return ids, files


async def plan_prune(repo: Any, options: PruneOptions) -> PrunePlan:
    """Look at everything and decide; changes nothing."""
    ids, files = await _load_index_files(repo)
    superseded = {s.hex() for f in files.values() for s in f.supersedes}
    index = Index()
    packs: dict[str, PackInfo] = {}
    copies: dict[bytes, list[str]] = {}
    for index_id in ids:
        if index_id in superseded:
            continue
        for raw_id, entries in files[index_id].packs:
            pack_id = raw_id.hex()
            if pack_id in packs:
                continue
            index.add_pack(raw_id, entries)
            packs[pack_id] = PackInfo(pack_id, 0, entries)
            for e in entries:
                copies.setdefault(e.id, []).append(pack_id)
    repo.index = index
    on_backend = {n.rsplit("/", 1)[-1]: s async for n, s in repo.backend.list("data/")}
    for info in packs.values():
        if info.id in on_backend:
            info.size = on_backend[info.id]
        else:
            info.action = "missing"
    snapshots = await load_snapshots(repo, strict=True)
    used = await used_blobs(repo, index, [(sid, s.tree) for sid, s in snapshots])
    plan = PrunePlan(packs, {p: s for p, s in on_backend.items() if p not in packs}, ids)
    _assign_used(plan, used, copies)
    _choose_actions(plan, options)
    return plan


def _assign_used(plan: PrunePlan, used: set[bytes], copies: dict[bytes, list[str]]) -> None:
    """Count each used blob once, in the first present pack holding it."""
    chosen: dict[bytes, str] = {}
    for blob_id in used:
        present = [p for p in copies[blob_id] if plan.packs[p].action != "missing"]
        if not present:
            raise PruneRefused(
                f"blob {blob_id.hex()} is in use but its pack {copies[blob_id][0]} is missing; "
                "run `cairn check`, then `cairn repair`"
            )
        chosen[blob_id] = present[0]
    for info in plan.packs.values():
        for e in info.entries:
            if chosen.get(e.id) == info.id:
                info.used.append(e)
                plan.used_blobs += 1
                plan.used_bytes += e.length
            elif info.action != "missing":
                info.unused_bytes += e.length
                plan.unused_bytes += e.length


def _choose_actions(plan: PrunePlan, options: PruneOptions) -> None:
    limit = max_unused_limit(options.max_unused)(plan.used_bytes)
    remaining = plan.unused_bytes
    candidates = []
    for info in plan.packs.values():
        if info.action == "missing":
            continue
        if not info.used:
            info.action = "delete"
            remaining -= info.unused_bytes
        elif info.unused_bytes:
            candidates.append(info)
    # Most wasteful first: each repacked byte then frees the most space.
    candidates.sort(key=lambda p: (-p.unused_bytes / max(1, p.size), p.id))
    repacked = 0
    for info in candidates:
        if remaining <= limit:
            break
        if options.max_repack_size is not None and repacked + info.size > options.max_repack_size:
            break
        info.action = "repack"
        repacked += info.size
        remaining -= info.unused_bytes


class _Repacker:
    """Copies verified blobs into new packs of their type and uploads them."""

    def __init__(self, repo: Any, pack_size: int, result: PruneResult) -> None:
        self.repo = repo
        self.pack_size = pack_size
        self.result = result
        self.writers = {DATA: PackWriter(DATA), TREE: PackWriter(TREE)}
        self.written: set[bytes] = set()
        self.new_packs: list[tuple[bytes, list[PackEntry]]] = []
        self.lock = anyio.Lock()

    async def repack(self, info: PackInfo) -> None:
        data = await self.repo.backend.load(object_name("data", info.id))
        crypto = self.repo.crypto
        blobs = [(e, data[e.offset : e.offset + e.length]) for e in info.used]

        def verify() -> None:
            for e, stored in blobs:
                try:
                    decode_blob(crypto, e.type, e.id, stored)
                except CorruptedObject as exc:
                    raise PruneRefused(f"{exc} (in pack {info.id}); nothing was deleted") from None

        await anyio.to_thread.run_sync(verify)
        async with self.lock:
            for e, stored in blobs:
                if e.id in self.written:
                    continue
                self.written.add(e.id)
                writer = self.writers[e.type]
                writer.add(e.type, e.id, stored, e.raw_length)
                if writer.size >= self.pack_size:
                    await self.flush(e.type)

    async def flush(self, blob_type: int) -> None:
        writer = self.writers[blob_type]
        if not len(writer):
            return
        self.writers[blob_type] = PackWriter(blob_type)
        data, pack_id, entries = writer.finish(self.repo.crypto)
        await self.repo.backend.save(object_name("data", pack_id), data)
        self.new_packs.append((bytes.fromhex(pack_id), entries))
        self.result.packs_written += 1
        self.result.bytes_written += len(data)
        log.debug("prune.pack_written", pack=pack_id, bytes=len(data), blobs=len(entries))


async def execute_prune(repo: Any, plan: PrunePlan, options: PruneOptions) -> PruneResult:
    """Carry out ``plan`` in the crash-safe order of the module docstring."""
    result = PruneResult()
    if not plan.changes:
        return result
    repacker = _Repacker(repo, options.pack_size, result)
    limiter = anyio.CapacityLimiter(max(1, options.connections))

    async def repack_one(info: PackInfo) -> None:
        async with limiter:
            await repacker.repack(info)

    async with anyio.create_task_group() as tg:
        for info in plan.with_action("repack"):
            tg.start_soon(repack_one, info)
    await repacker.flush(DATA)
    await repacker.flush(TREE)
    kept = [(bytes.fromhex(p.id), p.entries) for p in plan.with_action("keep")]
    result.index_written = await write_index_files(repo, kept + repacker.new_packs, plan.index_ids)
    for index_id in plan.index_ids:
        await _remove(repo, object_name("index", index_id))
        result.index_deleted += 1
    doomed = [(p.id, p.size) for p in plan.with_action("delete") + plan.with_action("repack")]
    for pack_id, size in [*doomed, *plan.unindexed.items()]:
        await _remove(repo, object_name("data", pack_id))
        result.packs_deleted += 1
        result.bytes_deleted += size
    log.info(
        "prune.done",
        packs_written=result.packs_written,
        packs_deleted=result.packs_deleted,
        bytes_deleted=result.bytes_deleted,
    )
    return result


async def write_index_files(
    repo: Any, packs: list[tuple[bytes, list[PackEntry]]], old: Sequence[str]
) -> list[str]:
    """Index files for ``packs`` that together replace the ``old`` ones; their IDs.

    Only the last file lists ``old`` in ``supersedes``: until it is stored the old
    index stays in force, so stopping halfway loses nothing.
    """
    written = []
    chunks = [packs[i : i + PACKS_PER_INDEX] for i in range(0, len(packs), PACKS_PER_INDEX)]
    chunks = chunks or [[]]
    for n, chunk in enumerate(chunks):
        supersedes = [bytes.fromhex(i) for i in old] if n == len(chunks) - 1 else []
        payload = encode_index(IndexFile(packs=chunk, supersedes=supersedes))
        written.append(await repo.save_sealed("index", payload))
    index = Index()
    for pack_id, entries in packs:
        index.add_pack(pack_id, entries)
    repo.index = index
    return written


async def _remove(repo: Any, name: str) -> None:
    try:
        await repo.backend.remove(name)
    except NotFound:
        pass  # already gone: an earlier interrupted prune got this far
