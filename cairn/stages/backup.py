"""Backup as one :class:`~cairn.pipeline.Pipeline` of shared stages::

    walk ──ch(4)──▶ read ──ch(4)──▶ encode ──ch(4)──▶ pack ──ch(0)──▶ upload ──ch(4)──▶ index
                     │                                  ▲
                     └──── tree blobs (inlet) ──────────┘

* ``walk`` (source) scans directories in threads (a few at once), reuses the
  content of files unchanged since the parent snapshot, and sends the rest on:
  a large file as one item, small files batched (it knows their sizes);
* ``read`` (``read_concurrency`` tasks) reads large files into shared-memory
  input slots in threads, cuts them into content-defined chunks and hashes them
  there (pyfastcdc and BLAKE3 release the GIL); only chunks the repository lacks
  (``Packer.claim``) go on, as one item per slot that owns the slot. A batch of
  small files is one worker job per slot, which reads, hashes, compresses and
  encrypts them into it (``cpu.backup_small_files``): per-file work stays off
  this process's GIL; the new blobs go on encoded, with the slot;
* ``encode`` compresses and encrypts new chunks in the worker processes (in
  threads until the pool is up: a small incremental run never starts it), slot
  to slot; it releases the input slot, and its output slot goes with the blobs
  until ``pack`` has copied them. Small files' blobs pass through;
* ``pack``, ``upload``, ``index``: the shared stages of ``stages/packing.py``;
* a directory's tree blob is made once its last entry is complete (in ``walk``
  or ``read``) and enters ``pack`` through an inlet, so trees are built
  bottom-up while the walk goes on.

Whatever the link speed, the bytes held stay within :meth:`Archiver.memory_bound`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog
from anyio.abc import ObjectSendStream

from cairn.backends.throttle import upload_limiter
from cairn.pipeline import (
    Inlet,
    Pipeline,
    PipelineOptions,
    PipelineSnapshot,
    raising_causes,
)
from cairn.pipeline.memory import HeldBytes, trim_heap
from cairn.pipeline.metrics import waiting_on_output
from cairn.pipeline.options import DEFAULT_CONNECTIONS, DEFAULT_READ_CONCURRENCY, cores
from cairn.pipeline.shm import Slot, SlotPool
from cairn.pipeline.workers import WorkerPool
from cairn.repo.codec import encode_blob
from cairn.repo.index import Index
from cairn.repo.pack import DATA, TREE
from cairn.repo.repository import Repository
from cairn.repo.tree import Node, Tree, encode_tree
from cairn.stages import cpu
from cairn.stages.chunker import (
    ChunkerParams,
    SmallOut,
    fill_and_chunk,
    finish_file,
    make_chunker,
    open_for_backup,
    read_encode_small,
    read_problem,
)
from cairn.stages.excludes import ExcludeRules
from cairn.stages.packing import EncodedBlob, Packer
from cairn.stages.sourcedirs import SourceDirs, dir_problem
from cairn.stages.treecache import TreeCache
from cairn.stages.walk import ScanResult, scan_dir, stat_at, stat_at_following

log = structlog.get_logger("cairn.backup")

MiB = 1024 * 1024
# Files below the chunker's minimum are one blob: read whole, encoded in batches of
# up to this many bytes per worker job, so small files don't pay a job round trip each.
SMALL_BATCH_BYTES = 4 * MiB
# Room for the encryption envelope and flag of every blob in an output slot.
OUT_SLACK = 256 * 1024
# Directories scanned at once (each scan is one thread hop of syscalls).
WALK_CONCURRENCY = 3
# Directories a scanner takes from the queue per thread hop when more are waiting.
# A hop costs ~50 us of CPU and, on a loaded machine, a wait for a time slice: a
# no-change backup of 1,000 directories made 1,000 of them.
SCAN_BATCH = 8
# Small files read per thread hop.
SMALL_READ_FILES = 256

# A second worker starts once an encode job has waited this long for an idle one.
# A job (at most one 8 MiB slot) takes 10-50 ms to compress and encrypt, so an
# initial backup grows the pool within its first tenth of a second, while a small
# incremental one, with a few jobs now and then, keeps one worker (~30 MiB less).
GROW_WORKERS_AFTER = 0.05

# Until the worker pool is up, blobs are encoded in threads of this process (zstd
# and AES-GCM release the GIL); the pool starts once this many bytes have been,
# so an incremental backup that adds a few MiB never starts it: no forkserver,
# resource tracker and worker (~50 MiB) and no ~150 ms start. An initial backup
# starts it within its first few hundred milliseconds and encodes here meanwhile.
ENCODE_HERE_BYTES = 32 * MiB

# Behind an upload limit below this (bytes/s), one worker encodes faster than the
# link takes the data (source text at ~230 MB/s, incompressible data far faster:
# bench/ENGINE.md), so a second one would only add a process (~25 MiB) and its
# slots (~16 MiB) to what a throttled backup holds.
ONE_WORKER_BELOW = 64 * MiB


def default_cpu_workers(cores: int, upload_limit: int | None, scheduled: bool) -> int:
    """Workers when ``--cpu-workers`` is not given: one per core, or one behind a
    fixed upload limit (bytes/s) below :data:`ONE_WORKER_BELOW` (not with a
    bandwidth schedule, which may lift the limit during the run)."""
    if upload_limit and upload_limit < ONE_WORKER_BELOW and not scheduled:
        return 1
    return cores


# What to tune when a stage limits a backup (the bottleneck line).
WALK_HINT = "none: scanning directories (a slow or remote filesystem?)"
READ_HINT = "--read-concurrency"
ENCODE_HINT = "--cpu-workers"


@dataclass(frozen=True)
class BackupOptions:
    """What to back up and how; concurrency defaults come from PipelineOptions."""

    paths: list[bytes]
    rules: ExcludeRules = field(default_factory=ExcludeRules)
    tags: list[str] = field(default_factory=list)
    host: str = ""
    force: bool = False
    dry_run: bool = False
    level: int = 3
    pack_size: int = 16 * MiB
    cpu_workers: int = field(default_factory=cores)
    read_concurrency: int = DEFAULT_READ_CONCURRENCY
    connections: int = DEFAULT_CONNECTIONS
    # One read piece. 8 MiB (the largest chunk) keeps shared memory — which counts
    # towards the process tree's footprint — near restic's; 8 and 16 MiB measured the
    # same throughput (bench/ENGINE.md: 1-16 MiB pieces within noise).
    slot_size: int = 8 * MiB
    stdin_name: bytes | None = None


@dataclass
class BackupStats:
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs_new: int = 0
    dirs_changed: int = 0
    dirs_unmodified: int = 0
    files_changed_during_read: int = 0
    bytes_processed: int = 0
    bytes_read: int = 0
    # For progress (polled by the CLI): files the walk found, bytes of unchanged files.
    files_seen: int = 0
    bytes_unmodified: int = 0
    current: bytes = b""  # the large file being read
    errors: list[tuple[str, str]] = field(default_factory=list)


def keep_parent_atime(node: Node, old: Node | None) -> None:
    """Give ``node`` the atime of its parent-snapshot node ``old`` when that is all
    that differs between them (docs/format.md, "Access times").

    Reading a file or listing a directory updates its atime (with ``relatime``:
    the first time after a change, then at most once a day), and a nightly backup
    does both; recording each new atime would store a new tree for every
    directory on every run. The atime kept is the one seen when the entry was
    first stored in its current state.
    """
    if old is None or old.atime_ns == node.atime_ns or old.type != node.type:
        return
    atime, node.atime_ns = node.atime_ns, old.atime_ns
    if node != old:
        node.atime_ns = atime


class _Dir:
    """A directory whose tree blob is pending until all its entries are complete."""

    __slots__ = (
        "dev",
        "done",
        "follow",
        "node",
        "nodes",
        "old",
        "old_node",
        "old_tree",
        "parent",
        "path",
        "pending",
        "walked",
    )

    def __init__(
        self,
        path: bytes,
        node: Node | None,
        parent: _Dir | None,
        old: dict[bytes, Node] | None,
        old_node: Node | None = None,
    ):
        self.path = path
        self.node = node
        self.parent = parent
        self.old = old  # the same directory's entries in the parent snapshot
        # Its own node in the parent snapshot (a directory's), and that node's tree.
        self.old_node = old_node if old_node is not None and old_node.type == "dir" else None
        self.old_tree = self.old_node.subtree if self.old_node is not None else None
        self.nodes: list[Node] = []
        self.pending = 0
        self.walked = False
        self.done = False  # its tree is stored (or being stored)
        self.dev: int | None = None  # --one-file-system: the device to stay on
        # Reached through a symlink above a given path (opened following it).
        self.follow = False


@dataclass
class _FileJob:
    dir: _Dir
    node: Node
    path: bytes
    old: Node | None


class _SmallBatch:
    """Small files for one ``read`` item: their jobs, the directories they are in,
    and ``(index into dirs, name)`` per file, as the worker job takes them. The
    walk pins each directory's descriptor as it adds the first file of it (it is
    open then: the scan has just used it), so no system call is needed to hand
    the batch to a worker; ``fds[i]`` is None where it was not open."""

    __slots__ = ("dirs", "fds", "files", "jobs", "nbytes")

    def __init__(self) -> None:
        self.jobs: list[_FileJob] = []
        self.dirs: list[_Dir] = []
        self.fds: list[int | str | None] = []
        self.files: list[tuple[int, bytes, bytes]] = []
        self.nbytes = 0

    def add(self, job: _FileJob, dirs: SourceDirs, index: Index) -> None:
        d = job.dir
        if not self.dirs or self.dirs[-1] is not d:
            self.dirs.append(d)
            self.fds.append(dirs.acquire_open(d))
        self.jobs.append(job)
        # A changed file of the same size probably has the same content (a chmod,
        # a touch, a checkout that rewrote it): its blob is not encoded again if
        # the reader finds that ID (which the index has, so it is never claimed).
        old = job.old
        known = b""
        if (
            old is not None
            and old.size == job.node.size
            and len(old.content) == 1
            and old.content[0] in index
        ):
            known = old.content[0]
        self.files.append((len(self.dirs) - 1, job.node.name, known))
        self.nbytes += job.node.size

    def unpin(self, dirs: SourceDirs) -> None:
        """Release the descriptors pinned for the batch (once it is read)."""
        for d, fd in zip(self.dirs, self.fds, strict=True):
            if isinstance(fd, int):
                dirs.release(d)
        self.fds = [None] * len(self.dirs)


# What ``walk`` sends to ``read``: one file, or a batch of small files.
_ReadItem = _FileJob | _SmallBatch


def _read_bytes(item: _ReadItem) -> int:
    return item.nbytes if isinstance(item, _SmallBatch) else item.node.size


@dataclass
class _EncodeJob:
    """New chunks at ``(offset, length, blob ID)`` in an input slot it owns."""

    slot: Slot
    spans: list[tuple[int, int, bytes]]

    def release(self) -> None:
        self.slot.release()

    def nbytes(self) -> int:
        return sum(length for _, length, _ in self.spans)


@dataclass
class _Encoded:
    """New blobs of small files, already encoded into an input slot it owns (by
    the small-file job that read them): ``encode`` hands them on to ``pack``."""

    slot: Slot | None
    blobs: list[EncodedBlob]
    raw: int  # their plaintext bytes

    def release(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    def nbytes(self) -> int:
        return self.raw


# What ``read`` sends to ``encode``.
_ReadOut = _EncodeJob | _Encoded


def _read_out_bytes(item: _ReadOut) -> int:
    return item.nbytes()


def _release_read_out(item: _ReadOut) -> None:
    item.release()


class Archiver:
    """Runs one backup as a Pipeline (see the module docstring); ``run`` returns
    the root tree ID. ``stats``, ``packer.stats``, ``held`` and :meth:`snapshot`
    are its public counters."""

    def __init__(
        self,
        repo: Repository,
        index: Index,
        options: BackupOptions,
        parent_tree: bytes | None,
    ) -> None:
        self.repo = repo
        self.crypto = repo.crypto
        self.index = index
        self.opts = options
        self.parent_tree = parent_tree
        self.stats = BackupStats()
        #: Bytes held outside the slot pools; its peak stays within memory_bound().
        self.held = HeldBytes()
        cfg = repo.config
        self.chunker_params = ChunkerParams(
            min_size=getattr(cfg, "chunk_min", 512 * 1024),
            avg_size=getattr(cfg, "chunk_avg", 1024 * 1024),
            max_size=getattr(cfg, "chunk_max", 8 * 1024 * 1024),
            seed=self.crypto.chunker_seed,
        )
        self.packer = Packer(
            repo,
            index,
            pack_size=options.pack_size,
            connections=options.connections,
            dry_run=options.dry_run,
            held=self.held,
        )
        self.root_tree: bytes | None = None
        # An upload limit set when the run starts (a schedule may lift it later:
        # the run then goes on with the smaller slot pools).
        limiter = upload_limiter(repo.backend)
        self._upload_limited = bool(getattr(limiter, "rate", None))
        self._trees = TreeCache(repo, index)
        self._pool: WorkerPool | None = None
        # The worker pool starts once ENCODE_HERE_BYTES have been encoded in
        # threads: a backup with little or nothing new (the nightly norm) never
        # pays its ~100-200 ms start and ~50 MiB.
        self._pool_tg: anyio.abc.TaskGroup | None = None
        self._pool_done = anyio.Event()
        self._pool_started = False
        # Bytes encoded in threads of this process while there is no pool yet.
        self._encoded_here = 0
        # Small files are read in the workers, through /proc/<pid>/fd (cpu.py);
        # where that is refused, in threads of this process.
        self._worker_reads = True
        # Small files read (or tried) in workers and in threads here (logged).
        self._small_in_workers = 0
        self._small_here = 0
        self._small_known = 0  # ... and found to hold the content they held before
        self._slots: SlotPool | None = None
        self._large_reads: anyio.CapacityLimiter | None = None
        self._out_slots: SlotPool | None = None
        self._pipeline: Pipeline | None = None
        self._tree_inlet: Inlet | None = None
        # Small files the walk has not sent on yet (one batch, shared by its tasks).
        self._batch = _SmallBatch()
        self._devices: dict[bytes, int] | None = None
        # Every file and directory is reached relative to its directory's
        # descriptor, never by its full path (sourcedirs.py: any depth, no symlink
        # swapped in during the walk is followed).
        self._dirs = SourceDirs()
        # A batch's directories are all held open while it is read: a quarter of
        # the descriptor cache, so a low ``ulimit -n`` is respected (sourcedirs.py).
        self._batch_dirs_max = max(1, self._dirs.size // 4)

    # -- memory ------------------------------------------------------------------

    @property
    def in_slots(self) -> int:
        """Input slots: one being filled per reader and two per worker — one being
        encoded, one queued, so a worker that finishes starts the next job at once
        while the slot it freed goes to a reader. Behind an upload
        limit the link sets the pace, not the disk or the CPU: one per reader and
        one per worker keep it busy, and a slow link holds no more memory than that."""
        if self._upload_limited:
            return self.opts.cpu_workers + self.opts.read_concurrency
        return 2 * self.opts.cpu_workers + self.opts.read_concurrency

    @property
    def out_slots(self) -> int:
        """Output slots: one per job in flight and one per job whose blobs are
        being handed to the packer (behind an upload limit, one per worker)."""
        if self._upload_limited:
            return self.opts.cpu_workers
        return 2 * self.opts.cpu_workers

    @property
    def read_tasks(self) -> int:
        """Tasks of the ``read`` stage: ``read_concurrency`` of them read large files
        (``_large_reads``), and one more per worker takes batches of small files,
        which are worker jobs: with only ``read_concurrency`` jobs in flight, each
        waited while this process took in the other's results, and on a busy
        machine one worker did it all (many-small: 14.3 -> 12.3 s, same CPU)."""
        return self.opts.read_concurrency + self.opts.cpu_workers

    def memory_bound(self) -> tuple[int, int]:
        """The most bytes this run holds: (slot pools, everything else counted by
        ``held``), whatever the size of the backup and the speed of the link.

        Formula and reasoning: docs/architecture.md, "Memory bound".
        """
        slots = self.in_slots * self.opts.slot_size
        slots += self.out_slots * (self.opts.slot_size + OUT_SLACK)
        # A blob is at most one chunk plus its envelope.
        packs = self.packer.held_bound(self.chunker_params.max_size + OUT_SLACK)
        carries = self.opts.read_concurrency * self.chunker_params.max_size
        return slots, packs + carries

    # -- the run ---------------------------------------------------------------

    async def run(self) -> bytes:
        """Back up; return the root tree ID. What failed is raised as itself."""
        self._large_reads = anyio.CapacityLimiter(self.opts.read_concurrency)
        self._slots = SlotPool(self.opts.slot_size, self.in_slots)
        self._out_slots = SlotPool(self.opts.slot_size + OUT_SLACK, self.out_slots)
        pipeline = self._pipeline = self._build()
        try:
            with raising_causes():
                async with anyio.create_task_group() as pool_tg:
                    self._pool_tg = pool_tg
                    try:
                        try:
                            await pipeline.run()
                        finally:
                            # Whatever happened, index what reached the backend so a
                            # rerun reuses it (shielded).
                            await self.packer.finish()
                    finally:
                        # Only now, with every stage task finished (also when
                        # cancelled), may the pool close: an encode task still
                        # unwinding must not find it closed (a RuntimeError instead
                        # of the interrupt).
                        self._pool_done.set()
        finally:
            self._slots.close()
            self._out_slots.close()
            self._dirs.close()
        slots, bound = self.memory_bound()
        log.debug("backup.memory", held_peak=self.held.peak, held_bound=bound, slots=slots)
        log.debug(
            "backup.small_files",
            workers=self._small_in_workers,
            here=self._small_here,
            known=self._small_known,
        )
        assert self.root_tree is not None
        return self.root_tree

    def _build(self) -> Pipeline:
        """walk → read → encode → pack (+ tree inlet) → upload → index."""
        opts = self.opts
        options = PipelineOptions(
            cpu_workers=opts.cpu_workers,
            read_concurrency=opts.read_concurrency,
            connections=opts.connections,
        )
        pipeline = (
            Pipeline("backup", options=options)
            .source("walk", self._walk_all, sizeof=_read_bytes, hint=WALK_HINT)
            .map(
                "read",
                self._read,
                concurrency=self.read_tasks,
                sizeof=_read_bytes,
                hint=READ_HINT,
            )
            .map(
                "encode",
                self._encode,
                concurrency=self.out_slots,
                sizeof=_read_out_bytes,
                release=_release_read_out,
                hint=ENCODE_HINT,
            )
        )
        self.packer.add_to(pipeline)
        # Trees are made in walk and read (when a directory's last entry completes).
        self._tree_inlet = pipeline.inlet("pack", until="read")
        return pipeline

    def snapshot(self) -> PipelineSnapshot | None:
        """The counters of every stage now (during and after :meth:`run`)."""
        if self._pipeline is None:
            return None
        return self._pipeline.snapshot()

    def _start_pool(self) -> None:
        """Start the worker pool in the background (once); ``_pool`` is set when
        it is ready, and encoding moves there."""
        if not self._pool_started:
            self._pool_started = True
            assert self._pool_tg is not None
            self._pool_tg.start_soon(self._hold_pool)

    async def _hold_pool(self) -> None:
        """Own the pool's lifetime in one task (it is entered and left here); a
        pool that fails to start fails the run."""
        async with WorkerPool(
            self.opts.cpu_workers,
            initializer=cpu.init_worker,
            initargs=(self.crypto,),
            grow_after=GROW_WORKERS_AFTER,
        ) as pool:
            self._pool = pool
            log.debug(
                "backup.workers_started", workers=len(pool.pids), encoded_here=self._encoded_here
            )
            with anyio.CancelScope(shield=True):
                await self._pool_done.wait()

    # -- walking ------------------------------------------------------------------

    async def _walk_all(self, file_tx: ObjectSendStream[_ReadItem]) -> None:
        """The ``walk`` stage: send every file to read (small ones in batches)."""
        if self.opts.stdin_name is not None:
            await self._walk_stdin(file_tx)
            return
        old = await self._old_entries(self.parent_tree)
        root = _Dir(b"/", None, None, old)
        root.old_tree = self.parent_tree
        trie = self._path_trie()
        if trie is None:  # "/" itself was given
            await self._walk_tree(root, file_tx)
        else:
            await self._walk_virtual(root, trie, file_tx)
        await self._flush_batch(file_tx)

    async def _queue_file(self, job: _FileJob, file_tx: ObjectSendStream[_ReadItem]) -> None:
        """Send a file to read; small ones go in batches of up to SMALL_READ_FILES
        files or SMALL_BATCH_BYTES, one thread hop each (a hop costs ~50 µs, about
        as much as reading a 64 KiB file)."""
        if not self._is_small(job):
            await file_tx.send(job)
            return
        batch = self._batch
        if (
            batch.dirs
            and batch.dirs[-1] is not job.dir
            and len(batch.dirs) >= self._batch_dirs_max
        ):
            await self._flush_batch(file_tx)
            batch = self._batch
        batch.add(job, self._dirs, self.index)
        if len(batch.jobs) >= SMALL_READ_FILES or batch.nbytes >= SMALL_BATCH_BYTES:
            await self._flush_batch(file_tx)

    async def _flush_batch(self, file_tx: ObjectSendStream[_ReadItem]) -> None:
        batch, self._batch = self._batch, _SmallBatch()
        if batch.jobs:
            await file_tx.send(batch)

    def _path_trie(self) -> dict[bytes, Any] | None:
        """Absolute paths as nested dicts of components; ``None`` marks a path to walk
        whole (and a ``None`` trie means ``/`` itself was given)."""
        trie: dict[bytes, Any] = {}
        for path in self.opts.paths:
            parts = [p for p in os.path.abspath(path).split(b"/") if p]
            if not parts:
                return None
            node = trie
            for part in parts[:-1]:
                nxt = node.get(part, {})
                if nxt is None:  # an ancestor is already walked whole
                    break
                node[part] = nxt
                node = nxt
            else:
                node[parts[-1]] = None
        return trie

    async def _walk_virtual(
        self, d: _Dir, trie: dict[bytes, Any], file_tx: ObjectSendStream[_ReadItem]
    ) -> None:
        """Directories above the given paths: only the components on the way down."""
        for name in sorted(trie):
            path = d.path.rstrip(b"/") + b"/" + name
            try:
                node = await anyio.to_thread.run_sync(self._dirs.run_at, d, stat_at, name)
            except OSError as exc:
                self._warn(path, dir_problem(exc))
                continue
            old = d.old.get(name) if d.old else None
            if trie[name] is None:
                await self._add_entry(d, node, path, old, file_tx)
                continue
            follow = node.type == "symlink"
            if follow:
                try:
                    node = await anyio.to_thread.run_sync(
                        self._dirs.run_at, d, stat_at_following, name
                    )
                except OSError as exc:
                    self._warn(path, dir_problem(exc))
                    continue
            if node.type != "dir":
                # Never silently: the paths below it would be missing from the snapshot.
                self._warn(path, "not a directory, but a path to back up lies below it")
                continue
            child = _Dir(path, node, d, None, old)
            child.old = await self._old_entries(child.old_tree)
            child.follow = follow
            d.nodes.append(node)
            d.pending += 1
            await self._walk_virtual(child, trie[name], file_tx)
        d.walked = True
        await self._maybe_finish(d)

    async def _add_entry(
        self,
        d: _Dir,
        node: Node,
        path: bytes,
        old: Node | None,
        file_tx: ObjectSendStream[_ReadItem],
    ) -> None:
        d.nodes.append(node)
        if node.type == "dir":
            d.pending += 1
            # Its parent-snapshot entries are loaded by the scan (_scan_batch).
            await self._walk_tree(_Dir(path, node, d, None, old), file_tx)
        elif node.type == "file":
            if not self._reuse_unchanged(node, old):
                d.pending += 1
                await self._queue_file(_FileJob(d, node, path, old), file_tx)
        else:
            keep_parent_atime(node, old)

    async def _walk_tree(self, top: _Dir, file_tx: ObjectSendStream[_ReadItem]) -> None:
        """Depth-first walk below one directory given on the command line."""
        if self.opts.rules.one_file_system:
            top.dev = top.node.device if top.node else os.lstat(top.path).st_dev
        # Directories are scanned by a few tasks at once: a scan is a thread hop of
        # mostly syscalls, so two or three overlap well. Any order is correct —
        # a directory's tree is stored when its last entry completes, whenever.
        # Depth first (a stack) keeps few directories pending at once, hence few
        # nodes in memory; breadth first held a node for nearly every entry of the
        # tree (200,000 files: ~70 MiB more). The stream carries one token per
        # directory on the stack, so a scanner waits on it for work.
        stack = [top]
        queue_tx, queue_rx = anyio.create_memory_object_stream[None](math.inf)
        outstanding = 1
        queue_tx.send_nowait(None)

        async def scanner() -> None:
            nonlocal outstanding
            async for _ in queue_rx:
                batch = [stack.pop()]
                while len(batch) < SCAN_BATCH:
                    try:
                        queue_rx.receive_nowait()
                    except anyio.WouldBlock:
                        break  # (not closed: this task holds outstanding dirs)
                    batch.append(stack.pop())
                subdirs = await self._scan_batch(batch, file_tx)
                stack.extend(reversed(subdirs))  # popped in name order
                for _ in subdirs:
                    queue_tx.send_nowait(None)
                outstanding += len(subdirs) - len(batch)
                if outstanding == 0:
                    queue_tx.close()

        async with anyio.create_task_group() as tg:
            for _ in range(WALK_CONCURRENCY):
                tg.start_soon(scanner)

    async def _scan_batch(
        self, batch: list[_Dir], file_tx: ObjectSendStream[_ReadItem]
    ) -> list[_Dir]:
        """Scan directories in one thread hop, queue their changed files, return
        their subdirectories."""
        for d in batch:
            if d.old is None and d.old_tree is not None:
                d.old = await self._old_entries(d.old_tree)
        scans = await anyio.to_thread.run_sync(self._scan_dirs, batch)
        subdirs: list[_Dir] = []
        for d, scan in zip(batch, scans, strict=True):
            if isinstance(scan, OSError):  # the directory itself could not be opened
                self._warn(d.path, dir_problem(scan))
                scan = ScanResult()
            subdirs += await self._take_scan(d, scan, file_tx)
        return subdirs

    def _scan_dirs(self, batch: list[_Dir]) -> list[ScanResult | OSError]:
        """Thread side of :meth:`_scan_batch`."""
        out: list[ScanResult | OSError] = []
        for d in batch:
            try:
                out.append(self._dirs.run_at(d, scan_dir, d.path, self.opts.rules, d.dev))
            except OSError as exc:
                out.append(exc)
        return out

    async def _take_scan(
        self, d: _Dir, scan: ScanResult, file_tx: ObjectSendStream[_ReadItem]
    ) -> list[_Dir]:
        """Add one scanned directory's entries: queue its changed files, return
        its subdirectories."""
        for wpath, problem in scan.warnings:
            self._warn(wpath, problem)
        subdirs: list[_Dir] = []
        for child in scan.nodes:
            cpath = d.path.rstrip(b"/") + b"/" + child.name
            cold = d.old.get(child.name) if d.old else None
            d.nodes.append(child)
            if child.type == "dir":
                d.pending += 1
                sub = _Dir(cpath, child, d, None, cold)
                sub.dev = d.dev
                if child.name in scan.mountpoints:
                    # --one-file-system, as restic: a path given on the command line
                    # is walked on its own device; any other mount point is kept as
                    # an empty directory.
                    sub.dev = self._target_devices().get(cpath)
                    if sub.dev is None:
                        sub.walked = True
                        await self._maybe_finish(sub)
                        continue
                subdirs.append(sub)
            elif child.type == "file":
                if not self._reuse_unchanged(child, cold):
                    d.pending += 1
                    await self._queue_file(_FileJob(d, child, cpath, cold), file_tx)
            else:
                keep_parent_atime(child, cold)
        d.walked = True
        d.old = None  # every entry has taken what it needs from it
        await self._maybe_finish(d)
        return subdirs

    async def _walk_stdin(self, file_tx: ObjectSendStream[_ReadItem]) -> None:
        assert self.opts.stdin_name is not None
        now = time.time_ns()
        root = _Dir(b"/", None, None, None)
        node = Node(
            type="file",
            name=self.opts.stdin_name,
            mode=0o644,
            mtime_ns=now,
            atime_ns=now,
            ctime_ns=now,
            uid=os.getuid(),
            gid=os.getgid(),
        )
        root.nodes.append(node)
        root.pending += 1
        root.walked = True
        await file_tx.send(_FileJob(root, node, b"/dev/stdin", None))

    def _target_devices(self) -> dict[bytes, int]:
        """The device of each path given on the command line (for -x)."""
        if self._devices is None:
            self._devices = {}
            for path in self.opts.paths:
                try:
                    self._devices[os.path.abspath(path)] = os.lstat(path).st_dev
                except OSError:
                    pass  # warned about by the walk
        return self._devices

    def _reuse_unchanged(self, node: Node, old: Node | None) -> bool:
        """Count a file the walk found; if it is unchanged since the parent
        snapshot, complete its node from there (content, xattrs, atime) and
        return True."""
        self.stats.bytes_processed += node.size
        self.stats.files_seen += 1
        if not self._unchanged(node, old):
            return False
        assert old is not None
        node.content = old.content  # the parent's nodes are not used elsewhere
        node.xattrs = old.xattrs  # the same ctime: the same xattrs
        keep_parent_atime(node, old)
        self.stats.files_unmodified += 1
        self.stats.bytes_unmodified += node.size
        return True

    def _unchanged(self, node: Node, old: Node | None) -> bool:
        if self.opts.force or old is None or old.type != "file":
            return False
        return (
            old.size == node.size
            and old.mtime_ns == node.mtime_ns
            and old.ctime_ns == node.ctime_ns
            and old.inode == node.inode
            and all(blob in self.index for blob in old.content)
        )

    async def _old_entries(self, tree_id: bytes | None) -> dict[bytes, Node] | None:
        if tree_id is None:
            return None
        try:
            tree: Tree = await self._trees.get(tree_id)
        except Exception as exc:  # a damaged parent only costs re-reading
            log.warning("backup.parent_tree_unreadable", tree=tree_id.hex(), error=str(exc))
            return None
        return {n.name: n for n in tree.nodes}

    # -- trees ---------------------------------------------------------------------

    async def _maybe_finish(self, d: _Dir) -> None:
        """Store the tree of a fully processed directory, then look at its parent.
        Once per directory, whoever calls it first (the walk, or a reader)."""
        while d.walked and d.pending == 0 and not d.done:
            d.done = True
            payload = encode_tree(Tree(d.nodes))
            tree_id = self.crypto.blob_id(payload)
            if self.packer.claim(tree_id):
                stored = encode_blob(self.crypto, TREE, tree_id, payload, self.opts.level)
                assert self._tree_inlet is not None
                await self._tree_inlet.send(EncodedBlob(TREE, tree_id, stored, len(payload)))
            if d.node is not None:
                d.node.subtree = tree_id
                keep_parent_atime(d.node, d.old_node)
            self._dirs.forget(d)  # nothing below it is read any more
            if d.old_tree is None:
                self.stats.dirs_new += 1
            elif d.old_tree == tree_id:
                self.stats.dirs_unmodified += 1
            else:
                self.stats.dirs_changed += 1
            parent = d.parent
            if parent is None:
                self.root_tree = tree_id
                return
            parent.pending -= 1
            d = parent

    def _file_done(self, job: _FileJob, content: list[bytes], size: int) -> None:
        job.node.content = content
        job.node.size = size
        if job.old is None:
            self.stats.files_new += 1
        else:
            self.stats.files_changed += 1

    # -- reading ---------------------------------------------------------------------

    def _is_small(self, job: _FileJob) -> bool:
        return job.node.size < self.chunker_params.min_size and job.path != b"/dev/stdin"

    async def _read(self, item: _ReadItem) -> AsyncIterator[_ReadOut]:
        """The ``read`` stage: read, chunk and hash a large file, yielding the new
        chunks of each slot; or read and encode a batch of small files."""
        if isinstance(item, _SmallBatch):
            async for job in self._read_small_batch(item):
                yield job
        else:
            async for job in self._read_large_file(item):
                yield job

    async def _read_large_file(self, job: _FileJob) -> AsyncIterator[_EncodeJob]:
        """:meth:`_read_file`, at most ``read_concurrency`` at once."""
        assert self._large_reads is not None
        async with self._large_reads:
            async for encode in self._read_file(job):
                yield encode

    async def _acquire_slot(self) -> Slot:
        assert self._slots is not None
        # Slots come back when encode is done with them: a wait on output.
        with waiting_on_output():
            return await self._slots.acquire()

    async def _read_small_batch(self, batch: _SmallBatch) -> AsyncIterator[_ReadOut]:
        """Read, hash, compress and encrypt small files into one input slot after
        another, one job per slot (in a worker; in a thread until the pool is up),
        and hand the new blobs on already encoded. The main process only claims
        their IDs and completes the nodes: per-file work stays off its GIL."""
        try:
            start = 0
            while start < len(batch.jobs):
                slot = await self._acquire_slot()
                try:
                    results = await self._backup_small(batch, start, slot)
                except BaseException:
                    slot.release()
                    raise
                done = batch.jobs[start : start + len(results)]
                start += len(results)
                encoded, grown = await self._small_done(done, results, slot)
                if encoded is not None:
                    yield encoded
                for j in grown:
                    async for job in self._read_large_file(j):
                        yield job
        finally:
            batch.unpin(self._dirs)

    async def _small_done(
        self, jobs: list[_FileJob], results: list[SmallOut | str | None], slot: Slot
    ) -> tuple[_Encoded | None, list[_FileJob]]:
        """Complete the nodes of small files read into ``slot``: the new blobs
        (which own the slot; None and the slot released if there are none), and
        the files that have grown past the small-file size since the walk."""
        blobs: list[EncodedBlob] = []
        grown: list[_FileJob] = []
        # Directories whose last pending entry completed here, in that order: a
        # tree is stored once, after all of its entries (as _job_done does).
        complete: list[_Dir] = []
        raw = 0
        view = slot.view
        claim = self.packer.claim
        stats = self.stats
        for j, result in zip(jobs, results, strict=True):
            if result is None:
                grown.append(j)
                continue
            d = j.dir
            d.pending -= 1
            if not d.pending:
                complete.append(d)
            if isinstance(result, str):
                self._warn(j.path, result)
                d.nodes = [n for n in d.nodes if n is not j.node]
                continue
            offset, stored, length, blob_id, mtime_ns, size_after, xattrs = result
            node = j.node
            if mtime_ns != node.mtime_ns or size_after != length:
                self._changed_during_read(j)
            if length:
                if claim(blob_id):
                    if not stored:  # the known blob: in the index, never claimed
                        raise RuntimeError(f"blob {blob_id.hex()} claimed but not stored")
                    blobs.append(EncodedBlob(DATA, blob_id, view[offset : offset + stored], length))
                    raw += length
                elif not stored:
                    self._small_known += 1
                node.content = [blob_id]
            else:
                node.content = []
            node.size = length
            node.xattrs = xattrs
            stats.bytes_read += length
            if j.old is None:
                stats.files_new += 1
            else:
                stats.files_changed += 1
        for d in complete:
            await self._maybe_finish(d)
        if not blobs:
            slot.release()
            return None, grown
        return _Encoded(slot, blobs, raw), grown

    async def _backup_small(
        self, batch: _SmallBatch, start: int, slot: Slot
    ) -> list[SmallOut | str | None]:
        """Run :func:`~cairn.stages.chunker.read_encode_small` over (a first part
        of) the batch's files from ``start`` into ``slot``: in a worker once the
        pool is up, else in a thread (counted towards ENCODE_HERE_BYTES, which
        then starts the pool)."""
        files = batch.files[start:] if start else batch.files
        pool = self._pool
        if pool is None or not self._worker_reads:
            if pool is None:
                self._encoded_here += batch.nbytes
                if self._encoded_here > ENCODE_HERE_BYTES:
                    self._start_pool()
            # Not abandoned on cancel: the slot is released only when the thread
            # is done writing into it.
            results = await anyio.to_thread.run_sync(
                self._read_small_here, batch, files, slot.view
            )
            self._small_here += len(results)
            if self._pool_started:
                await anyio.to_thread.run_sync(trim_heap)  # see _encode
            return results
        if None in batch.fds:
            await anyio.to_thread.run_sync(self._pin_missing, batch)
        try:
            results = await pool.run(
                cpu.backup_small_files,
                os.getpid(),
                batch.fds,
                files,
                slot.ref(),
                self.chunker_params.min_size,
                self.opts.level,
            )
        except cpu.DirsUnreachable as exc:
            # Reads go on in threads, as before the pool was up.
            log.warning("backup.worker_reads_off", error=str(exc))
            self._worker_reads = False
            return await anyio.to_thread.run_sync(
                self._read_small_here, batch, files, slot.view
            )
        self._small_in_workers += len(results)
        return results

    def _pin_missing(self, batch: _SmallBatch) -> None:
        """Pin the batch's directories the walk could not (thread side: it may
        open them); one that cannot be opened gives its problem instead."""
        for i, (d, fd) in enumerate(zip(batch.dirs, batch.fds, strict=True)):
            if fd is None:
                try:
                    batch.fds[i] = self._dirs.acquire(d)
                except OSError as exc:
                    batch.fds[i] = read_problem(exc)

    def _read_small_here(
        self, batch: _SmallBatch, files: list[tuple[int, bytes, bytes]], view: memoryview
    ) -> list[SmallOut | str | None]:
        """:func:`~cairn.stages.chunker.read_encode_small` in a thread of this process."""
        self._pin_missing(batch)
        fds = [fd for fd in batch.fds if fd is not None]
        return read_encode_small(
            self.crypto, fds, files, view, self.chunker_params.min_size, self.opts.level
        )

    async def _job_done(self, job: _FileJob, ok: bool) -> None:
        if not ok:
            job.dir.nodes = [n for n in job.dir.nodes if n is not job.node]
        job.dir.pending -= 1
        await self._maybe_finish(job.dir)

    def _check_unchanged(self, job: _FileJob, after: os.stat_result, size: int) -> None:
        if after.st_mtime_ns != job.node.mtime_ns or after.st_size != size:
            self._changed_during_read(job)

    def _changed_during_read(self, job: _FileJob) -> None:
        self.stats.files_changed_during_read += 1
        self._warn(job.path, "file changed while it was read; stored as read")

    async def _read_file(self, job: _FileJob) -> AsyncIterator[_EncodeJob]:
        """Read and chunk one large file (or stdin) slot by slot, yielding the new
        chunks of each; an unreadable file is warned about and left out."""
        stdin = job.path == b"/dev/stdin"
        self.stats.current = job.path
        try:
            fd = (
                0
                if stdin
                else await anyio.to_thread.run_sync(
                    self._dirs.run_at, job.dir, open_for_backup, job.node.name
                )
            )
        except OSError as exc:
            self._warn(job.path, read_problem(exc))
            await self._job_done(job, False)
            return
        content: list[bytes] = []
        try:
            size = 0
            async for encode, filled in self._read_large(fd, content):
                size += filled
                if encode is not None:
                    yield encode
            if not stdin:
                after, job.node.xattrs = await anyio.to_thread.run_sync(finish_file, fd)
        except OSError as exc:
            self._warn(job.path, read_problem(exc))
            await self._job_done(job, False)
            return
        finally:
            if not stdin:
                os.close(fd)
        if not stdin:
            self._check_unchanged(job, after, size)
        self.stats.bytes_read += size
        self._file_done(job, content, size)
        await self._job_done(job, True)

    async def _read_large(
        self, fd: int, content: list[bytes]
    ) -> AsyncIterator[tuple[_EncodeJob | None, int]]:
        """Read a file slot by slot; per slot, its new chunks (or None) and the bytes
        read. The blob IDs of the file's chunks are appended to ``content``."""
        chunker = make_chunker(self.chunker_params)
        carry = b""
        eof = False
        try:
            while not eof:
                slot = await self._acquire_slot()
                try:
                    slot.view[: len(carry)] = carry
                    filled, spans, eof = await anyio.to_thread.run_sync(
                        fill_and_chunk,
                        fd,
                        slot.view,
                        len(carry),
                        chunker,
                        self.crypto,
                        self.chunker_params.max_size,
                    )
                except BaseException:
                    slot.release()
                    raise
                read = filled - len(carry)
                complete = spans if eof else spans[:-1]
                self.held.sub(len(carry))
                if not eof and spans:
                    off, length, _ = spans[-1]
                    carry = bytes(slot.view[off : off + length])
                else:
                    carry = b""
                self.held.add(len(carry))
                content.extend(blob_id for _, _, blob_id in complete)
                new = [s for s in complete if self.packer.claim(s[2])]
                if new:
                    yield _EncodeJob(slot, new), read
                else:
                    slot.release()
                    yield None, read
        finally:
            self.held.sub(len(carry))

    # -- encoding --------------------------------------------------------------------

    async def _encode(self, job: _ReadOut) -> list[EncodedBlob]:
        """The ``encode`` stage: compress and encrypt new chunks in a worker, from
        the input slot (released by the stage) into an output slot that goes on
        with the blobs until ``pack`` has copied them. When the uploads fall
        behind, output slots run out, encode waits, then read: nothing piles up
        in memory (docs/architecture.md, "Memory bound"). Small files' blobs come
        encoded already: their input slot goes on with them instead."""
        if isinstance(job, _Encoded):
            slot, job.slot = job.slot, None  # ours now: the stage's release is a no-op
            assert slot is not None
            return _with_release(job.blobs, slot.release)
        assert self._out_slots is not None
        pool = self._pool
        if pool is None:
            self._encoded_here += job.nbytes()
            if self._encoded_here > ENCODE_HERE_BYTES:
                self._start_pool()
        with waiting_on_output():
            out = await self._out_slots.acquire()
        try:
            end = max(off + length for off, length, _ in job.spans)
            if pool is None:
                # Not abandoned on cancel: the slots are released only when the
                # thread is done writing into them.
                placed = await anyio.to_thread.run_sync(
                    cpu.encode_spans,
                    self.crypto,
                    job.slot.view[:end],
                    out.view,
                    job.spans,
                    self.opts.level,
                )
                if self._pool_started:
                    # The workers encode from now on: the threads' freed
                    # compression buffers (up to 8 MiB each, in two arenas)
                    # would otherwise stay on this process's heap.
                    await anyio.to_thread.run_sync(trim_heap)
            else:
                placed = await pool.run(
                    cpu.encode_into, job.slot.ref(end), out.ref(), job.spans, self.opts.level
                )
        except BaseException:
            out.release()
            raise
        blobs = [
            EncodedBlob(DATA, blob_id, out.view[offset : offset + size], length)
            for (_, length, blob_id), (offset, size) in zip(job.spans, placed, strict=True)
        ]
        return _with_release(blobs, out.release)

    def _warn(self, path: bytes, problem: str) -> None:
        text = os.fsdecode(path)
        self.stats.errors.append((text, problem))
        log.warning("backup.file_error", path=text, error=problem)


def _with_release(blobs: list[EncodedBlob], release: Callable[[], None]) -> list[EncodedBlob]:
    """``blobs`` with one ``release`` of the slot they are in, on the last one
    (``pack`` calls it once it has copied the whole batch)."""
    last = blobs[-1]
    blobs[-1] = EncodedBlob(last.blob_type, last.blob_id, last.data, last.raw_length, release)
    return blobs
