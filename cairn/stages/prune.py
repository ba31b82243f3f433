"""``prune``: remove what no snapshot references.

Plan: walk every snapshot's trees for the blobs in use; per pack, count used and
unused bytes; delete packs with nothing in use (and packs no index lists); repack
partly used packs, tree packs first then most wasteful first, until the unused space
left is within ``--max-unused``; and repack small packs (below ``--repack-smaller-than``,
by default 80% of the larger of 4 MiB and the 3rd percentile of pack sizes, as restic)
when there are at least ten of them, so that they merge (fewer are treated as any
pack: repacked only for their unused space). ``--max-repack-size`` bounds
the bytes repacked; ``--repack-cacheable-only`` repacks tree packs only.

Execute, in an order that keeps the repository consistent if interrupted anywhere:

1. repack (:func:`repack`, a pipeline ending in the shared packing stages): the
   used blobs of repacked packs, copied as stored after their IDs were verified,
   into new packs, each indexed after it is uploaded (an index file every
   ``PACKS_PER_INDEX`` packs, the rest at the end, also when the run fails). An
   interruption leaves new packs unindexed (harmless; the next prune deletes them)
   or indexed beside the old ones (the blobs are then stored twice, and the next
   prune keeps the new packs and deletes the old);
2. write index files for the packs kept as they are; only the last one lists every
   old index file in ``supersedes``, so until it lands the old index stays in force;
3. delete the old index files (already superseded);
4. delete the old packs (no longer indexed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from cairn.backends.base import NotFound, object_name
from cairn.pipeline import (
    Pipeline,
    PipelineOptions,
    PipelineSnapshot,
    SlotPool,
    WorkerPool,
    raising_causes,
)
from cairn.pipeline.options import DEFAULT_CONNECTIONS, cores
from cairn.repo.errors import CorruptedObject, ObjectNotFound, RepoError
from cairn.repo.index import Index, IndexFile, decode_index, encode_index
from cairn.repo.pack import DATA, PackEntry
from cairn.repo.tree import Tree
from cairn.stages import cpu
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
from cairn.stages.packing import PACKS_PER_INDEX, EncodedBlob, Packer
from cairn.stages.snapshots import load_snapshots
from cairn.stages.units import parse_size

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.prune")


class PruneRefused(RepoError):
    """Prune found damage it must not build on; nothing was changed."""

    exit_code = 1


#: restic's MinPackSize: packs below 80% of the larger of this and the 3rd percentile
#: of pack sizes are "small" (repacked when there are ``SMALL_PACKS_WORTH_IT``).
MIN_PACK_SIZE = 4 * 1024 * 1024
#: Fewer small packs than this are kept: merging two or three saves little, and one
#: small pack alone would be repacked by every prune (restic's rule).
SMALL_PACKS_WORTH_IT = 10


def max_unused_limit(text: str) -> Callable[[int], float]:
    """``--max-unused``: ``x%`` (of the used size, as restic), a size, or ``unlimited``."""
    text = text.strip().lower()
    if not text:
        raise ValueError("--max-unused needs a value: x%, a size, or 'unlimited'")
    if text == "unlimited":
        return lambda _used: float("inf")
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(f"invalid percentage {text!r} for --max-unused") from None
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
    # Packs smaller than this are small (None: restic's default, see MIN_PACK_SIZE).
    repack_smaller_than: int | None = None
    repack_cacheable_only: bool = False  # repack tree packs only
    dry_run: bool = False
    connections: int = DEFAULT_CONNECTIONS
    cpu_workers: int = field(default_factory=cores)
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

    @property
    def is_data(self) -> bool:
        """Holds data blobs (not cacheable): restic's "data pack"."""
        return any(e.type == DATA for e in self.entries)


@dataclass
class PrunePlan:
    """What prune will do (``--dry-run`` shows it)."""

    packs: dict[str, PackInfo]
    unindexed: dict[str, int]  # on the backend, in no index
    index_ids: list[str]  # every index file, replaced by the new ones
    used_blobs: int = 0
    used_bytes: int = 0
    unused_bytes: int = 0
    target_pack_size: int = 0  # packs below it are small (see _target_pack_size)

    def with_action(self, action: str) -> list[PackInfo]:
        return [p for p in self.packs.values() if p.action == action]

    @property
    def changes(self) -> bool:
        return bool(self.unindexed) or any(p.action != "keep" for p in self.packs.values())

    def summary(self) -> dict[str, Any]:
        delete, repack = self.with_action("delete"), self.with_action("repack")
        unused_after = self.unused_bytes - sum(p.unused_bytes for p in delete + repack)
        return {
            "target_pack_size": self.target_pack_size,
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
        } | self.restic_stats()

    def restic_stats(self) -> dict[str, Any]:
        """restic's ``PruneStats`` objects (``blobs``, ``bytes``, ``packfiles``), so a
        script written for ``restic prune --json`` finds its fields. Duplicates are
        counted as unused (restic lists them apart)."""
        present = [p for p in self.packs.values() if p.action != "missing"]
        delete, repack = self.with_action("delete"), self.with_action("repack")

        def unused(packs: list[PackInfo]) -> int:
            return sum(len(p.entries) - len(p.used) for p in packs)

        unref = sum(self.unindexed.values())
        total = self.used_bytes + self.unused_bytes + unref
        remove = sum(p.unused_bytes for p in delete)
        repack_rm = sum(p.unused_bytes for p in repack)
        n_unused = unused(present)
        return {
            "blobs": {
                "used": self.used_blobs,
                "unused": n_unused,
                "total": self.used_blobs + n_unused,
                "repack": sum(len(p.entries) for p in repack),
                "repack_remove": unused(repack),
                "remove": unused(delete),
                "remove_total": unused(delete) + unused(repack),
                "remaining": self.used_blobs + n_unused - unused(delete) - unused(repack),
            },
            "bytes": {
                "used": self.used_bytes,
                "unused": self.unused_bytes,
                "unreferenced": unref,
                "total": total,
                "repack": sum(p.size for p in repack),
                "repack_remove": repack_rm,
                "remove": remove,
                "remove_total": remove + repack_rm + unref,
                "remaining": total - remove - repack_rm - unref,
                "remaining_unused": self.unused_bytes - remove - repack_rm,
            },
            "packfiles": {
                "used": sum(1 for p in present if p.used and not p.unused_bytes),
                "unused": sum(1 for p in present if not p.used),
                "partly_used": sum(1 for p in present if p.used and p.unused_bytes),
                "unreferenced": len(self.unindexed),
                "total": len(present) + len(self.unindexed),
                "keep": len(self.with_action("keep")),
                "repack": len(repack),
                "remove": len(delete),
                "remove_total": len(delete) + len(self.unindexed),
            },
        }


@dataclass
class PruneResult:
    packs_written: int = 0
    bytes_written: int = 0
    packs_deleted: int = 0
    bytes_deleted: int = 0
    index_written: list[str] = field(default_factory=list)
    index_deleted: int = 0
    # The repack pipeline's final counters (None when nothing was repacked).
    pipeline: PipelineSnapshot | None = None
    # Bytes of blobs and packs the packing stages held at most, and the bound that
    # holds by construction (docs/architecture.md, "Prune").
    held_peak: int = 0
    held_bound: int = 0
    # Files storage would not delete yet (S3 Object Lock retention).
    retained: int = 0


async def used_blobs(
    repo: Repository, index: Index, roots: Sequence[tuple[str, bytes]]
) -> set[bytes]:
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


async def _load_index_files(repo: Repository) -> tuple[list[str], dict[str, IndexFile]]:
    ids = await repo.list_ids("index")
    files: dict[str, IndexFile] = {}
    for index_id in ids:
        try:
            files[index_id] = decode_index(await repo.load_sealed("index", index_id), index_id)
        except CorruptedObject as exc:
            raise PruneRefused(f"{exc}; run `cairn repair index` first") from None
    return ids, files


async def plan_prune(repo: Repository, options: PruneOptions) -> PrunePlan:
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
    """Count each used blob once, in one present pack holding it.

    Of several copies, one in a pack all of whose blobs are in use wins: after an
    interrupted prune, that is its new pack beside the partly used one it was to
    replace, so the rerun keeps the new pack and deletes the old one instead of
    repacking it again. Otherwise the first copy wins.
    """
    full = {
        p
        for p, info in plan.packs.items()
        if info.action != "missing" and all(e.id in used for e in info.entries)
    }
    chosen: dict[bytes, str] = {}
    for blob_id in used:
        present = [p for p in copies[blob_id] if plan.packs[p].action != "missing"]
        if not present:
            raise PruneRefused(
                f"blob {blob_id.hex()} is in use but its pack {copies[blob_id][0]} is missing; "
                "run `cairn check`, then `cairn repair`"
            )
        chosen[blob_id] = next((p for p in present if p in full), present[0])
    for info in plan.packs.values():
        for e in info.entries:
            if chosen.get(e.id) == info.id:
                info.used.append(e)
                plan.used_blobs += 1
                plan.used_bytes += e.length
            elif info.action != "missing":
                info.unused_bytes += e.length
                plan.unused_bytes += e.length


def _target_pack_size(plan: PrunePlan, options: PruneOptions) -> int:
    """restic's rule: ``--repack-smaller-than``, else 80% of the larger of 4 MiB and
    the 3rd percentile of the pack sizes (so a repository without small packs
    repacks none)."""
    if options.repack_smaller_than is not None:
        return options.repack_smaller_than
    sizes = sorted(p.size for p in plan.packs.values() if p.action != "missing")
    if not sizes:
        return 0
    return max(MIN_PACK_SIZE, sizes[len(sizes) * 3 // 100]) * 4 // 5


def _choose_actions(plan: PrunePlan, options: PruneOptions) -> None:
    """Delete what nothing uses; repack what wastes space or is small; keep the rest."""
    limit = max_unused_limit(options.max_unused)(plan.used_bytes)
    target = plan.target_pack_size = _target_pack_size(plan, options)
    remaining = plan.unused_bytes
    candidates, small = [], []
    for info in plan.packs.values():
        if info.action == "missing":
            continue
        if not info.used:
            info.action = "delete"
            remaining -= info.unused_bytes
        elif options.repack_cacheable_only and info.is_data:
            continue  # only tree packs (cached locally) may be rewritten
        elif info.size < target:
            small.append(info)
        elif info.unused_bytes:
            candidates.append(info)
    # Ten small packs or more merge, whatever --max-unused says; fewer are repacked
    # only for their unused space, as any pack. (restic repacks a partly used small
    # pack always; here --max-unused unlimited means what it says.)
    merge_small = len(small) >= SMALL_PACKS_WORTH_IT
    candidates += small if merge_small else [p for p in small if p.unused_bytes]
    # Tree packs first (small, and read by every command), then the small packs to
    # merge, then the most wasteful: each repacked byte then frees the most space.
    candidates.sort(
        key=lambda p: (
            p.is_data,
            not (merge_small and p.size < target),
            -p.unused_bytes / max(1, p.size),
            p.id,
        )
    )
    repacked = 0
    for info in candidates:
        if options.max_repack_size is not None and repacked + info.size > options.max_repack_size:
            continue  # a smaller pack may still fit
        if remaining <= limit and not (merge_small and info.size < target):
            continue
        info.action = "repack"
        repacked += info.size
        remaining -= info.unused_bytes


class _SlotShare:
    """The blobs of one downloaded range share its slot: the last one done frees it."""

    def __init__(self, fetched: Fetched, count: int) -> None:
        self.fetched = fetched
        self.count = count

    def release(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.fetched.release()


def _verify_stage(
    pool: WorkerPool, packer: Packer
) -> Callable[[Fetched], AsyncIterator[EncodedBlob]]:
    """The verify stage: a worker job decodes every kept blob of a range from its
    slot (decrypt, decompress, check the ID); the stored bytes then go on as they
    are, as views of the slot, which the last of them to be packed frees."""

    async def verify(fetched: Fetched) -> AsyncIterator[EncodedBlob]:
        batch = fetched.batch
        entries: list[PackEntry] = batch.blobs
        spans = [(e.offset - batch.offset, e.length, e.type, e.id) for e in entries]
        try:
            bad = await pool.run(cpu.verify_spans, fetched.ref(), spans)
        except BaseException:
            fetched.release()
            raise
        if bad:
            fetched.release()
            _blob_id, why = bad[0]
            raise PruneRefused(f"{why} (in pack {batch.pack_id.hex()}); nothing was deleted")
        # Each blob goes into one new pack (the plan counts each used blob once).
        todo = [(span, e) for span, e in zip(spans, entries, strict=True) if packer.claim(e.id)]
        share = _SlotShare(fetched, len(todo))
        if not todo:
            share.release()
        view = fetched.slot.view if fetched.slot is not None else memoryview(b"")
        for (offset, length, _type, _id), e in todo:
            data = view[offset : offset + length]
            yield EncodedBlob(e.type, e.id, data, e.raw_length, share.release)

    return verify


def repack_batches(plan: PrunePlan) -> list[Batch]:
    """The ranges of kept blobs in the packs to repack, each pack read front to back."""
    return plan_ranges(
        (bytes.fromhex(info.id), e.offset, e.length, e)
        for info in plan.with_action("repack")
        for e in info.used
    )


async def repack(
    repo: Repository, plan: PrunePlan, options: PruneOptions, result: PruneResult
) -> list[tuple[bytes, list[PackEntry]]]:
    """The repack pipeline; the new packs (already indexed, by index files that
    supersede nothing)::

        plan → download → verify (workers) → pack → upload → index

    Downloads run ahead of the verify jobs by the slots free; a slot is freed once
    every blob it holds has been copied into a pack, so memory is the slot pool
    plus the packs being filled and uploaded (see docs/architecture.md, "Prune").
    """
    batches = repack_batches(plan)
    if not batches:
        return []
    workers, connections = options.cpu_workers, options.connections
    slots = SlotPool(SLOT_SIZE, 2 * workers + connections)
    packer = Packer(repo, Index(), pack_size=options.pack_size, connections=connections)
    options_ = PipelineOptions(cpu_workers=workers, connections=connections)
    try:
        async with WorkerPool(
            workers, initializer=cpu.init_worker, initargs=(repo.crypto,)
        ) as pool:
            pipeline = packer.add_to(
                Pipeline("prune", options=options_)
                .source("plan", batches, sizeof=batch_bytes)
                .map(
                    "download",
                    download(repo.backend, slots, ()),
                    concurrency=connections,
                    sizeof=batch_bytes,
                    hint=DOWNLOAD_HINT,
                    throttle_hint=THROTTLE_HINT,
                )
                .map(
                    "verify",
                    _verify_stage(pool, packer),
                    concurrency=2 * workers,
                    sizeof=batch_bytes,
                    hint=CPU_HINT,
                )
            )
            try:
                with raising_causes():
                    await pipeline.run()
            finally:
                # The packs uploaded are indexed also when the run failed: a rerun
                # keeps them (see _assign_used) instead of repacking again.
                await packer.finish()
                result.pipeline = pipeline.snapshot(done=True)
                result.packs_written = packer.stats.packs
                result.bytes_written = packer.stats.pack_bytes
                result.index_written.extend(packer.stats.index_files)
                result.held_peak = packer.held.peak
                result.held_bound = packer.held_bound(_largest_blob(batches))
    finally:
        slots.close()
    return packer.index.pack_entries()


def _largest_blob(batches: list[Batch]) -> int:
    return max((e.length for b in batches for e in b.blobs), default=0)


async def execute_prune(repo: Repository, plan: PrunePlan, options: PruneOptions) -> PruneResult:
    """Carry out ``plan`` in the crash-safe order of the module docstring."""
    result = PruneResult()
    if not plan.changes:
        return result
    new_packs = await repack(repo, plan, options, result)
    kept = [(bytes.fromhex(p.id), p.entries) for p in plan.with_action("keep")]
    result.index_written += await write_index_files(repo, kept, plan.index_ids)
    if repo.index is not None:  # the loaded index learns the new packs
        for new_id, entries in new_packs:
            repo.index.add_pack(new_id, entries)
    for index_id in plan.index_ids:
        if await _remove(repo, object_name("index", index_id), result):
            result.index_deleted += 1
    doomed = [(p.id, p.size) for p in plan.with_action("delete") + plan.with_action("repack")]
    for pack_id, size in [*doomed, *plan.unindexed.items()]:
        if await _remove(repo, object_name("data", pack_id), result):
            result.packs_deleted += 1
            result.bytes_deleted += size
    log.info(
        "prune.done",
        packs_written=result.packs_written,
        packs_deleted=result.packs_deleted,
        bytes_deleted=result.bytes_deleted,
        held_peak=result.held_peak,
        held_bound=result.held_bound,
    )
    return result


async def write_index_files(
    repo: Repository, packs: list[tuple[bytes, list[PackEntry]]], old: Sequence[str]
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


async def _remove(repo: Repository, name: str, result: PruneResult) -> bool:
    """Delete one file; False when storage retains it (S3 Object Lock: skipped, and
    counted, see ``stages/retention.py``)."""
    from cairn.stages.retention import remove_unless_retained

    try:
        if await remove_unless_retained(repo.backend, name) is not None:
            result.retained += 1
            return False
    except NotFound:
        pass  # already gone: an earlier interrupted prune got this far
    return True
