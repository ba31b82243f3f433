"""``check``: verify a repository's structure and, with ``--read-data``, every byte.

Structure (always):

* every index file decodes; the effective index is the union of those not superseded;
* every pack the index names exists, and every pack on the backend is indexed (an
  unindexed pack is only a warning, as in restic: interrupted backups and prunes leave
  them, and ``prune`` removes them);
* every pack header agrees with the index entries for that pack;
* every snapshot decodes, and each of its trees and data blobs is in the index with
  the right type; trees are read (a range of neighbouring tree blobs per backend
  call) and decoded;
* a blob stored in several packs is reported as info.

Snapshot filters (``--host/--path/--tag``, or snapshot IDs: restic 0.19 #3326) narrow
the trees walked to those of the selected snapshots, and ``--read-data`` to the packs
holding their trees and data blobs (the subset options then pick among those); the
index, pack presence and pack headers are always checked in full. Filtered, the
packs to read are known only once the trees are walked, so the read follows the walk.

``--read-data`` (or a subset) is a pipeline of the stages restore uses too
(:mod:`cairn.stages.fetch`): ``plan`` (whole packs) → ``download`` (``connections``
tasks, each pack into a shared-memory slot, as many loads in flight as keep the
workers busy: :class:`~cairn.stages.fetch.DownloadPace`) → ``verify`` (a worker job per pack,
:func:`cairn.stages.cpu.verify_pack`, two per worker at once; the slot is released
when the job is done) → ``report``. It needs only the index, so it runs while the
trees are walked. Downloads run ahead of verification by the slots free. The worker
hashes the pack (its name is its BLAKE3), parses its header and compares it with the
index, and decodes every blob: decrypt (the AEAD tag proves the ciphertext is what
was written), then decompress and check the blob ID. The ID is a keyed hash of the
plaintext, so it cannot be checked without decompressing; skipping that would
trust that the backup wrote the right bytes under the right ID and that the
compressed stream is sound — exactly what ``--read-data`` is run to find out, so
every blob is decoded in full (blobs stored uncompressed are not decompressed).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import anyio.lowlevel
import structlog

from cairn.backends.base import NotFound, ObjectTruncated, object_name
from cairn.pipeline import (
    PipelineOptions,
    PipelineSnapshot,
    SlotPool,
    WorkerPool,
)
from cairn.pipeline.options import DEFAULT_CONNECTIONS, cores
from cairn.repo.codec import decode_blob
from cairn.repo.errors import CorruptedObject, ObjectNotFound
from cairn.repo.index import BlobLocation, Index, IndexFile, decode_index
from cairn.repo.pack import (
    DATA,
    TREE,
    PackEntry,
    initial_tail_length,
    parse_pack_header,
    required_tail_length,
)
from cairn.repo.tree import Tree, decode_tree
from cairn.stages import cpu
from cairn.stages.cpu import compare_entries, verify_pack
from cairn.stages.fetch import (
    CPU_HINT,
    Batch,
    DownloadPace,
    Fetched,
    PackSizeChanged,
    download,
    plan_ranges,
    run_fetch_pipeline,
    whole_pack,
)
from cairn.stages.snapshots import SnapshotFilter, find_snapshot
from cairn.stages.units import parse_size

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.check")

ERROR, WARNING, INFO = "error", "warning", "info"
# Shared memory for --read-data: at most this much, whatever the pack size.
_SLOT_BUDGET = 512 * 1024 * 1024
# What the verify stage hands the sink: the batch, then the worker's findings and
# blobs decoded, or the error that kept the pack from being read.
_Verified = tuple[Batch, tuple[list[tuple[str, str, str]], int] | None, BaseException | None]
# Trees larger than this are decoded in a thread, off the event loop (as
# Repository.read_blob does).
_INLINE_DECODE = 64 * 1024
# Individual duplicate-blob lines shown before summarising the rest.
_MAX_DUPLICATE_LINES = 20


@dataclass(frozen=True)
class Problem:
    """One finding: what object, what is wrong, and where it was reached from."""

    severity: str  # error | warning | info
    kind: str  # snapshot | index | pack | tree | data blob | blob
    id: str
    message: str
    snapshot: str = ""
    path: str = ""

    def line(self) -> str:
        """The one-line form ``check`` prints."""
        where = ""
        if self.snapshot:
            where = (
                f" (snapshot {self.snapshot[:8]}" + (f", {self.path}" if self.path else "") + ")"
            )
        what = f"{self.kind} {self.id}" if self.id else self.kind
        return f"{self.severity}: {what}{where}: {self.message}"

    def as_json(self) -> dict[str, str]:
        """The ``--json`` form (one object per line)."""
        out = {"message_type": self.severity, "object": self.kind, "id": self.id}
        if self.snapshot:
            out["snapshot"] = self.snapshot
        if self.path:
            out["path"] = self.path
        out["message"] = self.message
        return out


class Subset(NamedTuple):
    """``--read-data-subset``: ``bucket`` n of t, ``percent`` of packs, or ``size`` bytes."""

    kind: str
    n: int = 0
    t: int = 0
    value: float = 0.0


def parse_subset(text: str) -> Subset:
    """Parse ``n/t``, ``x%`` or a size such as ``500M``; ``ValueError`` otherwise."""
    text = text.strip()
    if m := re.fullmatch(r"(\d+)/(\d+)", text):
        n, t = int(m[1]), int(m[2])
        if not 1 <= n <= t:
            raise ValueError(f"subset {text!r}: need 1 <= n <= t")
        return Subset("bucket", n=n, t=t)
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", text):
        pct = float(m[1])
        if not 0 < pct <= 100:
            raise ValueError(f"subset {text!r}: percentage must be in (0, 100]")
        return Subset("percent", value=pct)
    try:
        size = parse_size(text)
    except ValueError:
        pass
    else:
        if size <= 0:
            raise ValueError(f"subset {text!r}: size must be positive")
        return Subset("size", value=size)
    raise ValueError(f"invalid subset {text!r}: use n/t, x% or a size like 500M")


def select_packs(packs: dict[str, int], subset: Subset | None, rng: random.Random) -> list[str]:
    """Which packs ``--read-data[-subset]`` reads.

    ``n/t`` takes packs whose first ID byte modulo ``t`` is ``n-1`` (restic's rule, so
    ``1/t`` … ``t/t`` cover everything once); ``x%`` and sizes pick packs at random.
    """
    ids = sorted(packs)
    if subset is None:
        return ids
    if subset.kind == "bucket":
        return [i for i in ids if int(i[:2], 16) % subset.t == subset.n - 1]
    shuffled = ids[:]
    rng.shuffle(shuffled)
    if subset.kind == "percent":
        count = max(1, round(len(ids) * subset.value / 100)) if ids else 0
        return sorted(shuffled[:count])
    chosen, total = [], 0
    for pack_id in shuffled:
        if total >= subset.value:
            break
        chosen.append(pack_id)
        total += packs[pack_id]
    return sorted(chosen)


@dataclass(frozen=True)
class CheckOptions:
    """What to check and with how much concurrency."""

    read_data: bool = False
    subset: Subset | None = None
    cpu_workers: int = field(default_factory=cores)
    connections: int = DEFAULT_CONNECTIONS
    seed: int | None = None  # for random subsets; tests pin it
    # Which snapshots to check (restic's check filters): a SnapshotFilter, and IDs
    # (prefixes, or ``latest`` among those the filter matches). IDs given name the
    # snapshots; the filter then only chooses ``latest``.
    snapshot_filter: SnapshotFilter | None = None
    snapshot_ids: tuple[str, ...] = ()

    @property
    def filtered(self) -> bool:
        """Only some snapshots are checked."""
        flt = self.snapshot_filter
        return bool(self.snapshot_ids) or (
            flt is not None and bool(flt.hosts or flt.paths or flt.tags)
        )


@dataclass
class CheckResult:
    """Everything found, plus counters for the summary."""

    problems: list[Problem] = field(default_factory=list)
    snapshots: int = 0
    trees: int = 0
    data_blobs: int = 0
    packs: int = 0
    index_files: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    # The --read-data pipeline's final counters (None when no pack was read).
    pipeline: PipelineSnapshot | None = None

    @property
    def errors(self) -> list[Problem]:
        """Problems that make ``check`` fail."""
        return [p for p in self.problems if p.severity == ERROR]


async def read_pack_header(backend: Any, crypto: Any, pack_id: str, size: int) -> list[PackEntry]:
    """Load a pack's tail (twice if the first guess was short) and parse its header."""
    name = object_name("data", pack_id)
    want = initial_tail_length(size)
    tail = await backend.load(name, size - want, want)
    needed = required_tail_length(tail, size, pack_id)
    if needed > len(tail):
        tail = await backend.load(name, size - needed, needed)
    entries: list[PackEntry] = parse_pack_header(crypto, tail, size, pack_id)
    return entries


class Checker:
    """Runs one check; ``report`` is called for each problem as it is found."""

    def __init__(
        self,
        repo: Repository,
        options: CheckOptions,
        report: Callable[[Problem], None] | None = None,
    ) -> None:
        self.repo = repo
        self.backend = repo.backend
        self.opts = options
        self.result = CheckResult()
        self._report = report
        # pack id (hex) → (index file id, entries), from the effective index only
        self.pack_entries: dict[str, tuple[str, list[PackEntry]]] = {}
        self.index_damaged = False  # some index file could not be read
        self.packs_on_backend: dict[str, int] = {}
        self.index = Index()
        self._limiter = anyio.CapacityLimiter(max(1, options.connections))
        # Trees and data blobs reached from the snapshots checked.
        self.seen_trees: set[bytes] = set()
        self.seen_blobs: set[bytes] = set()

    def _add(self, problem: Problem) -> None:
        self.result.problems.append(problem)
        if self._report is not None:
            self._report(problem)

    def _error(self, kind: str, obj: str, message: str, snapshot: str = "", path: str = "") -> None:
        self._add(Problem(ERROR, kind, obj, message, snapshot, path))

    async def run(self) -> CheckResult:
        """Every check: index and packs first, then snapshots and trees and — with
        ``--read-data`` — the packs' contents."""
        if not self.opts.read_data:
            await self._check_index()
            await self._check_snapshots()
            await self._check_headers(sorted(self._present()))
            return self.result
        if self.opts.filtered:
            # Which packs to read follows from the trees of the selected snapshots.
            await self._check_index()
            await self._check_snapshots()
            async with WorkerPool(
                self.opts.cpu_workers, initializer=cpu.init_worker, initargs=(self.repo.crypto,)
            ) as pool:
                rng = random.Random(self.opts.seed)
                chosen = select_packs(self._packs_of_selection(), self.opts.subset, rng)
                await self._read_packs(pool, chosen)
            return self.result
        # Reading the packs needs only the index: it runs while the trees are walked
        # (which is I/O and the main process's CPU, while the workers verify), and the
        # workers start (~0.1 s) while the index loads. One after the other, the walk
        # and the worker start were a third of the default corpus's check.
        indexed = anyio.Event()

        async def structure() -> None:
            await self._check_index()
            indexed.set()
            await self._check_snapshots()

        async with anyio.create_task_group() as tg:
            tg.start_soon(structure)
            async with WorkerPool(
                self.opts.cpu_workers, initializer=cpu.init_worker, initargs=(self.repo.crypto,)
            ) as pool:
                await indexed.wait()
                rng = random.Random(self.opts.seed)
                await self._read_packs(pool, select_packs(self._present(), self.opts.subset, rng))
        return self.result

    async def _check_index(self) -> None:
        """The index files, which packs exist, and blobs stored twice."""
        self.packs_on_backend = await self._list_packs()
        await self._load_index()
        self._check_pack_presence()
        self._report_duplicates()

    def _present(self) -> dict[str, int]:
        """Packs both indexed and on the backend, with their sizes."""
        return {p: s for p, s in self.packs_on_backend.items() if p in self.pack_entries}

    def _packs_of_selection(self) -> dict[str, int]:
        """The present packs holding a tree or data blob of the snapshots checked."""
        present = self._present()
        packs: dict[str, int] = {}
        for blob_id in self.seen_trees | self.seen_blobs:
            loc = self.index.lookup(blob_id)
            if loc is not None and (pack_id := loc.pack_id.hex()) in present:
                packs[pack_id] = present[pack_id]
        return packs

    # -- index and packs ----------------------------------------------------------

    async def _list_packs(self) -> dict[str, int]:
        packs = {}
        async for name, size in self.backend.list("data/"):
            packs[name.rsplit("/", 1)[-1]] = size
        return packs

    async def _load_index(self) -> None:
        ids = await self.repo.list_ids("index")
        files: dict[str, IndexFile] = {}

        async def one(index_id: str) -> None:
            async with self._limiter:
                try:
                    payload = await self.repo.load_sealed("index", index_id)
                    files[index_id] = decode_index(payload, index_id)
                except CorruptedObject as exc:
                    self.index_damaged = True
                    self._error("index", index_id, exc.problem)
                except ObjectNotFound:
                    pass  # removed while we listed (a concurrent prune would hold a lock)

        async with anyio.create_task_group() as tg:
            for index_id in ids:
                tg.start_soon(one, index_id)
        self.result.index_files = len(files)
        superseded = {s.hex() for f in files.values() for s in f.supersedes}
        for index_id in sorted(files):
            if index_id in superseded:
                continue
            for raw_id, entries in files[index_id].packs:
                pack_id = raw_id.hex()
                known = self.pack_entries.get(pack_id)
                if known is None:
                    self.pack_entries[pack_id] = (index_id, entries)
                    self.index.add_pack(raw_id, entries)
                elif sorted(known[1]) != sorted(entries):
                    self._error(
                        "pack",
                        pack_id,
                        f"index files {known[0]} and {index_id} list it differently",
                    )
        self.result.packs = len(self.pack_entries)
        self.repo.index = self.index

    def _check_pack_presence(self) -> None:
        for pack_id, (index_id, _entries) in sorted(self.pack_entries.items()):
            if pack_id not in self.packs_on_backend:
                self._error("pack", pack_id, f"listed in index {index_id} but missing")
        # With a damaged index file, an unreferenced pack may be one it listed: then
        # the way out is `repair index`, not `prune` (which would refuse anyway, as
        # the snapshots need its blobs).
        why = (
            "a damaged index file may have listed it: `cairn repair index` indexes it again"
            if self.index_damaged
            else "left by an interrupted backup or prune; `cairn prune` removes it"
        )
        for pack_id in sorted(self.packs_on_backend.keys() - self.pack_entries.keys()):
            self._add(Problem(WARNING, "pack", pack_id, f"not referenced by any index ({why})"))

    def _report_duplicates(self) -> None:
        where: dict[bytes, list[str]] = defaultdict(list)
        for pack_id, (_index_id, entries) in self.pack_entries.items():
            for e in entries:
                where[e.id].append(pack_id)
        dups = sorted((b, p) for b, p in where.items() if len(p) > 1)
        for blob_id, packs in dups[:_MAX_DUPLICATE_LINES]:
            self._add(Problem(INFO, "blob", blob_id.hex(), f"stored in packs {', '.join(packs)}"))
        if len(dups) > _MAX_DUPLICATE_LINES:
            more = len(dups) - _MAX_DUPLICATE_LINES
            self._add(Problem(INFO, "blob", "", f"{more} more blobs are stored in several packs"))

    async def _check_headers(self, pack_ids: Iterable[str]) -> None:
        async with anyio.create_task_group() as tg:
            for pack_id in pack_ids:
                tg.start_soon(self._check_header, pack_id)

    async def _check_header(self, pack_id: str) -> None:
        size = self.packs_on_backend[pack_id]
        async with self._limiter:
            try:
                header = await read_pack_header(self.backend, self.repo.crypto, pack_id, size)
            except CorruptedObject as exc:
                self._error("pack", pack_id, f"unreadable header: {exc.problem}")
                return
            except (NotFound, ObjectTruncated) as exc:
                self._error("pack", pack_id, f"could not be read: {exc}")
                return
        for message in compare_entries(pack_id, self.pack_entries[pack_id][1], header):
            self._error("pack", pack_id, message)

    # -- snapshots and trees -------------------------------------------------------

    async def _selected_ids(self) -> list[str]:
        """The snapshot files to check: all, or those the IDs name (a prefix that
        matches none, or several, fails the command: ObjectNotFound, AmbiguousId)."""
        snapshot_ids = await self.repo.list_ids("snapshots")
        if not self.opts.snapshot_ids:
            return snapshot_ids
        wanted: set[str] = set()
        for ref in self.opts.snapshot_ids:
            if ref == "latest":
                wanted.add((await find_snapshot(self.repo, ref, self.opts.snapshot_filter))[0])
            else:
                wanted.add(await self.repo.find_id("snapshots", ref))
        return [sid for sid in snapshot_ids if sid in wanted]

    async def _check_snapshots(self) -> None:
        flt = None if self.opts.snapshot_ids else self.opts.snapshot_filter
        roots: list[tuple[bytes, str, str]] = []
        for sid in await self._selected_ids():
            try:
                snap = await self.repo.load_snapshot(sid)
            except CorruptedObject as exc:
                # Damaged, it cannot be matched against the filters: reported always.
                self._error("snapshot", sid, exc.problem)
                continue
            except ObjectNotFound:
                continue
            if flt is not None and not flt.matches(snap):
                continue
            self.result.snapshots += 1
            roots.append((snap.tree, sid, "/"))
        if self.opts.filtered and not roots:
            self._add(Problem(WARNING, "snapshot", "", "no snapshot matches the selection"))
        seen_trees = self.seen_trees
        seen_blobs = self.seen_blobs
        level = roots
        # Breadth first: each level's trees are loaded concurrently.
        while level:
            todo = []
            for item in level:
                if item[0] not in seen_trees:
                    seen_trees.add(item[0])
                    todo.append(item)
            children: list[tuple[bytes, str, str]] = []
            await self._check_level(todo, children, seen_blobs)
            level = children
        self.result.trees = len(seen_trees)
        self.result.data_blobs = len(seen_blobs)

    async def _check_level(
        self,
        todo: list[tuple[bytes, str, str]],
        children: list[tuple[bytes, str, str]],
        seen_blobs: set[bytes],
    ) -> None:
        """Load and check one level of trees: a ranged read per run of neighbouring
        tree blobs in a pack (as restore plans its reads), not one per tree — one
        backend call per tree was a third of the main process's CPU on the default
        corpus (1006 trees)."""
        wanted = []
        for tree_id, sid, path in todo:
            loc = self._tree_location(tree_id, sid, path)
            if loc is not None:
                wanted.append((loc.pack_id, loc.offset, loc.length, (tree_id, sid, path, loc)))
        async with anyio.create_task_group() as tg:
            for batch in plan_ranges(wanted):
                tg.start_soon(self._check_trees_in, batch, children, seen_blobs)

    def _tree_location(self, tree_id: bytes, sid: str, path: str) -> BlobLocation | None:
        """Where the index has the tree, or None (reported) when it is not a tree there."""
        loc = self.index.lookup(tree_id)
        if loc is None:
            self._error("tree", tree_id.hex(), "not in the index", sid, path)
            return None
        if loc.type != TREE:
            self._error("tree", tree_id.hex(), "the index lists it as a data blob", sid, path)
            return None
        return loc

    async def _check_trees_in(
        self, batch: Batch, children: list[tuple[bytes, str, str]], seen_blobs: set[bytes]
    ) -> None:
        name = object_name("data", batch.pack_id.hex())
        data = None
        async with self._limiter:
            try:
                data = await self.backend.load(name, batch.offset, batch.length)
            except (NotFound, ObjectTruncated):
                pass
        if data is None or len(data) != batch.length:
            # A missing or short pack: tree by tree, so each tree still readable is
            # checked and each one not gets its own error.
            for tree_id, sid, path, _loc in batch.blobs:
                await self._check_tree(tree_id, sid, path, children, seen_blobs)
            return
        view = memoryview(data)
        for tree_id, sid, path, loc in batch.blobs:
            start = loc.offset - batch.offset
            stored = view[start : start + loc.length]
            try:
                if loc.length <= _INLINE_DECODE:
                    plain = decode_blob(self.repo.crypto, TREE, tree_id, stored)
                else:
                    plain = await anyio.to_thread.run_sync(
                        decode_blob, self.repo.crypto, TREE, tree_id, stored
                    )
                tree = decode_tree(plain, tree_id.hex())
            except CorruptedObject as exc:
                self._error("tree", tree_id.hex(), f"cannot be read: {exc}", sid, path)
                continue
            self._check_nodes(tree, sid, path, children, seen_blobs)
            # Let the --read-data pipeline in between trees: a worker waits for the
            # event loop to hand it its next pack.
            await anyio.lowlevel.checkpoint()

    async def _check_tree(
        self,
        tree_id: bytes,
        sid: str,
        path: str,
        children: list[tuple[bytes, str, str]],
        seen_blobs: set[bytes],
    ) -> None:
        """Load (on its own) and check one tree."""
        if self._tree_location(tree_id, sid, path) is None:
            return
        async with self._limiter:
            try:
                tree = await self.repo.load_tree(tree_id)
            except CorruptedObject as exc:
                self._error("tree", tree_id.hex(), f"cannot be read: {exc}", sid, path)
                return
        self._check_nodes(tree, sid, path, children, seen_blobs)

    def _check_nodes(
        self,
        tree: Tree,
        sid: str,
        path: str,
        children: list[tuple[bytes, str, str]],
        seen_blobs: set[bytes],
    ) -> None:
        """Queue a tree's subtrees; check that its files' blobs are indexed as data."""
        base = path.rstrip("/")
        for node in tree.nodes:
            child = f"{base}/{node.name.decode('utf-8', 'backslashreplace')}"
            if node.type == "dir" and node.subtree is not None:
                children.append((node.subtree, sid, child))
            elif node.type == "file":
                for blob_id in node.content:
                    if blob_id in seen_blobs:
                        continue
                    seen_blobs.add(blob_id)
                    blob = self.index.lookup(blob_id)
                    if blob is None:
                        self._error("data blob", blob_id.hex(), "not in the index", sid, child)
                    elif blob.type != DATA:
                        self._error(
                            "data blob", blob_id.hex(), "the index lists it as a tree", sid, child
                        )

    # -- reading pack contents -------------------------------------------------------

    async def _read_packs(self, pool: WorkerPool, pack_ids: list[str]) -> None:
        """The pipeline: plan (whole packs) → download → verify (workers) → report.

        A pack is read whole (its name is the BLAKE3 of its bytes), so slots are as
        large as the largest pack, and as many as fit in ``_SLOT_BUDGET``.
        """
        if not pack_ids:
            return
        biggest = max(1, *(self.packs_on_backend[p] for p in pack_ids))
        workers, connections = self.opts.cpu_workers, self.opts.connections
        # Slots for what either bound needs, as many as the budget allows (packs are
        # large). Bound by the workers (a local disk), the pace keeps one download
        # under way and each worker has a pack in work and one queued: 2 x workers
        # + 1. Bound by the downloads (a remote store), every connection downloads
        # while a worker verifies: connections + 1. Never more than one per worker
        # and per connection (2 x workers + connections raised the peak by two packs
        # for no speed). Two verify jobs per worker, as every CPU stage: with one,
        # the wall time of 300 MB grew by ~20% (a worker waited for the loop to hand
        # it the next pack).
        needed = min(workers + connections, max(2 * workers + 1, connections + 1))
        count = max(1, min(needed, _SLOT_BUDGET // biggest))
        # Made as the plan stage reaches them: a copy of every index entry up front
        # would be a second index for the length of the run.
        batches = (
            whole_pack(
                bytes.fromhex(pack_id),
                self.packs_on_backend[pack_id],
                [tuple(e) for e in self.pack_entries[pack_id][1]],
            )
            for pack_id in pack_ids
        )
        slots = SlotPool(biggest, count)
        options = PipelineOptions(cpu_workers=workers, connections=connections)
        pace = DownloadPace(self.backend, workers, min(count, connections))

        async def verify(fetched: Fetched) -> _Verified:
            if fetched.error is not None:
                return fetched.batch, None, fetched.error
            pack_id = fetched.batch.pack_id.hex()
            started = anyio.current_time()
            result = await pool.run(verify_pack, fetched.ref(), pack_id, fetched.batch.blobs)
            pace.verified(anyio.current_time() - started)
            return fetched.batch, result, None

        try:
            await run_fetch_pipeline(
                "check",
                batches,
                pace.paced(download(pace, slots, (NotFound, ObjectTruncated))),
                downloads=min(count, connections),
                work=("verify", verify, 2 * workers, CPU_HINT),
                sink=("report", self._verified),
                options=options,
                record=self._record_metrics,
            )
        finally:
            slots.close()
            log.debug("check.download_pace", **pace.settled())

    def _record_metrics(self, snapshot: PipelineSnapshot) -> None:
        self.result.pipeline = snapshot

    async def _verified(self, outcome: _Verified) -> None:
        """The sink: report what the worker found, or why the pack was not read."""
        batch, result, error = outcome
        pack_id = batch.pack_id.hex()
        if error is not None or result is None:
            if isinstance(error, PackSizeChanged):
                self._error("pack", pack_id, str(error))
            else:
                self._error("pack", pack_id, f"could not be read: {error}")
            return
        found, decoded = result
        for kind, obj, message in found:
            self._error(kind, obj, message)
        self.result.packs_read += 1
        self.result.bytes_read += batch.length
        log.debug("check.pack_read", pack=pack_id, bytes=batch.length, blobs=decoded)
