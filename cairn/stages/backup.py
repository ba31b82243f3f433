"""The backup pipeline: walk → read/chunk/hash → dedupe → encode → pack → upload,
then trees bottom-up, index, snapshot.

Shape of the run (all inside one task group, so the first error cancels all):

* the walker scans directories in threads (one call per directory), reuses the
  content of files unchanged since the parent snapshot, and queues the rest;
* ``read_concurrency`` readers read files into shared-memory slots in threads,
  cut them into content-defined chunks and hash them there (pyfastcdc and BLAKE3
  release the GIL); only chunks the repository lacks go on;
* new chunks are compressed and encrypted in the worker processes, straight from
  the slot (large files) or in batches (small files);
* the ``BlobSaver`` packs them and uploads packs on ``connections`` tasks;
* a directory's tree blob is made once its last entry is complete, so trees are
  built bottom-up while the walk goes on.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from cairn.pipeline.memory import HeldBytes
from cairn.pipeline.shm import Slot, SlotPool
from cairn.pipeline.workers import WorkerPool
from cairn.repo.codec import encode_blob
from cairn.repo.index import Index
from cairn.repo.pack import DATA, TREE
from cairn.repo.tree import Node, Tree, encode_tree
from cairn.stages import cpu
from cairn.stages.chunker import (
    ChunkerParams,
    fill_and_chunk,
    finish_file,
    make_chunker,
    open_for_backup,
    read_problem,
    read_small_files,
)
from cairn.stages.excludes import ExcludeRules
from cairn.stages.saver import BlobSaver
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
# Small files read per thread hop.
SMALL_READ_FILES = 64


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
    cpu_workers: int = 2
    read_concurrency: int = 2
    connections: int = 4
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


class _Dir:
    """A directory whose tree blob is pending until all its entries are complete."""

    __slots__ = (
        "dev",
        "follow",
        "node",
        "nodes",
        "old",
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
        old_tree: bytes | None = None,
    ):
        self.path = path
        self.node = node
        self.parent = parent
        self.old = old  # the same directory's entries in the parent snapshot
        self.old_tree = old_tree
        self.nodes: list[Node] = []
        self.pending = 0
        self.walked = False
        self.dev: int | None = None  # --one-file-system: the device to stay on
        # Reached through a symlink above a given path (opened following it).
        self.follow = False


@dataclass
class _FileJob:
    dir: _Dir
    node: Node
    path: bytes
    old: Node | None


class Archiver:
    """Runs one backup; ``run`` returns the root tree ID."""

    def __init__(self, repo: Any, index: Index, options: BackupOptions, parent_tree: bytes | None):
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
        self.saver = BlobSaver(
            repo,
            index,
            pack_size=options.pack_size,
            connections=options.connections,
            dry_run=options.dry_run,
            held=self.held,
        )
        self.root_tree: bytes | None = None
        self._trees = TreeCache(repo, index)
        self._pool: WorkerPool | None = None
        # The worker pool starts on the first blob that needs encoding: a backup
        # with nothing new (the nightly norm) never pays the ~100-200 ms start.
        self._pool_tg: anyio.abc.TaskGroup | None = None
        self._pool_ready = anyio.Event()
        self._pool_done = anyio.Event()
        self._pool_started = False
        self._slots: SlotPool | None = None
        self._out_slots: SlotPool | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._devices: dict[bytes, int] | None = None
        # Every file and directory is reached relative to its directory's
        # descriptor, never by its full path (sourcedirs.py: any depth, no symlink
        # swapped in during the walk is followed).
        self._dirs = SourceDirs()

    # -- memory ------------------------------------------------------------------

    @property
    def in_slots(self) -> int:
        """Input slots: one being filled per reader, two queued per worker, and some
        slack so a reader never waits while a worker finishes."""
        return 2 * self.opts.cpu_workers + self.opts.read_concurrency + 2

    @property
    def out_slots(self) -> int:
        """Output slots: one per job in flight and one per job whose blobs are
        being handed to the packer."""
        return 2 * self.opts.cpu_workers

    def memory_bound(self) -> tuple[int, int]:
        """The most bytes this run holds: (slot pools, everything else counted by
        ``held``), whatever the size of the backup and the speed of the link.

        Formula and reasoning: docs/architecture.md, "Memory bound".
        """
        slots = self.in_slots * self.opts.slot_size
        slots += self.out_slots * (self.opts.slot_size + OUT_SLACK)
        # A pack ends with the blob that took it past pack_size; a blob is at most
        # one chunk plus its envelope.
        pack = self.opts.pack_size + self.chunker_params.max_size + OUT_SLACK
        # connections uploading, one being joined (blobs and joined copy), one full
        # pack waiting to be handed over, one data and one tree pack filling.
        packs = (self.opts.connections + 4) * pack
        carries = self.opts.read_concurrency * self.chunker_params.max_size
        return slots, packs + carries

    # -- the run ---------------------------------------------------------------

    async def run(self) -> bytes:
        self._slots = SlotPool(self.opts.slot_size, self.in_slots)
        self._out_slots = SlotPool(self.opts.slot_size + OUT_SLACK, self.out_slots)
        try:
            async with anyio.create_task_group() as pool_tg:
                self._pool_tg = pool_tg
                try:
                    await self._run_stages()
                finally:
                    # Only now, with every stage task finished (also when cancelled),
                    # may the pool close: an encode task still unwinding must not
                    # find it closed (a RuntimeError instead of the interrupt).
                    self._pool_done.set()
        finally:
            self._slots.close()
            self._out_slots.close()
            self._dirs.close()
        slots, bound = self.memory_bound()
        log.debug("backup.memory", held_peak=self.held.peak, held_bound=bound, slots=slots)
        assert self.root_tree is not None
        return self.root_tree

    async def _run_stages(self) -> None:
        file_tx, file_rx = anyio.create_memory_object_stream[_FileJob](64)
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self.saver.run_uploaders)
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    async with anyio.create_task_group() as readers:
                        readers.start_soon(self._walk_all, file_tx)
                        for _ in range(self.opts.read_concurrency):
                            readers.start_soon(self._reader, file_rx.clone())
                        file_rx.close()
                await self.saver.close_packs()
        finally:
            # Whatever happened, index what reached the backend so a rerun reuses it.
            with anyio.CancelScope(shield=True):
                await self.saver.write_index()

    async def _get_pool(self) -> WorkerPool:
        if not self._pool_started:
            self._pool_started = True
            assert self._pool_tg is not None
            self._pool_tg.start_soon(self._hold_pool)
        await self._pool_ready.wait()
        if self._pool is None:
            raise RuntimeError("the worker pool failed to start")
        return self._pool

    async def _hold_pool(self) -> None:
        """Own the pool's lifetime in one task (it is entered and left here)."""
        try:
            async with WorkerPool(
                self.opts.cpu_workers, initializer=cpu.init_worker, initargs=(self.crypto,)
            ) as pool:
                self._pool = pool
                self._pool_ready.set()
                with anyio.CancelScope(shield=True):
                    await self._pool_done.wait()
        finally:
            self._pool_ready.set()

    # -- walking ------------------------------------------------------------------

    async def _walk_all(self, file_tx: anyio.abc.ObjectSendStream[_FileJob]) -> None:
        async with file_tx:
            if self.opts.stdin_name is not None:
                await self._walk_stdin(file_tx)
                return
            old = await self._old_entries(self.parent_tree)
            root = _Dir(b"/", None, None, old, self.parent_tree)
            trie = self._path_trie()
            if trie is None:  # "/" itself was given
                await self._walk_tree(root, file_tx)
            else:
                await self._walk_virtual(root, trie, file_tx)

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
        self, d: _Dir, trie: dict[bytes, Any], file_tx: anyio.abc.ObjectSendStream[_FileJob]
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
            old_tree = old.subtree if old and old.type == "dir" else None
            child = _Dir(path, node, d, await self._old_entries(old_tree), old_tree)
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
        file_tx: anyio.abc.ObjectSendStream[_FileJob],
    ) -> None:
        d.nodes.append(node)
        if node.type == "dir":
            d.pending += 1
            old_tree = old.subtree if old and old.type == "dir" else None
            # Its parent-snapshot entries are loaded by the scan (_scan_one).
            await self._walk_tree(_Dir(path, node, d, None, old_tree), file_tx)
        elif node.type == "file":
            self.stats.bytes_processed += node.size
            self.stats.files_seen += 1
            if self._unchanged(node, old):
                assert old is not None
                node.content = list(old.content)
                node.xattrs = dict(old.xattrs)  # the same ctime: the same xattrs
                self.stats.files_unmodified += 1
                self.stats.bytes_unmodified += node.size
                return
            d.pending += 1
            await file_tx.send(_FileJob(d, node, path, old))

    async def _walk_tree(self, top: _Dir, file_tx: anyio.abc.ObjectSendStream[_FileJob]) -> None:
        """Depth-first walk below one directory given on the command line."""
        if self.opts.rules.one_file_system:
            top.dev = top.node.device if top.node else os.lstat(top.path).st_dev
        # Directories are scanned by a few tasks at once: a scan is a thread hop of
        # mostly syscalls, so two or three overlap well. Order does not matter —
        # a directory's tree is stored when its last entry completes, whenever.
        queue_tx, queue_rx = anyio.create_memory_object_stream[_Dir](math.inf)
        outstanding = 1
        queue_tx.send_nowait(top)

        async def scanner() -> None:
            nonlocal outstanding
            async for d in queue_rx:
                for sub in await self._scan_one(d, file_tx):
                    outstanding += 1
                    queue_tx.send_nowait(sub)
                outstanding -= 1
                if outstanding == 0:
                    queue_tx.close()

        async with anyio.create_task_group() as tg:
            for _ in range(WALK_CONCURRENCY):
                tg.start_soon(scanner)

    async def _scan_one(self, d: _Dir, file_tx: anyio.abc.ObjectSendStream[_FileJob]) -> list[_Dir]:
        """Scan one directory, queue its changed files, return its subdirectories."""
        if d.old is None and d.old_tree is not None:
            d.old = await self._old_entries(d.old_tree)
        try:
            scan = await anyio.to_thread.run_sync(
                self._dirs.run_at, d, scan_dir, d.path, self.opts.rules, d.dev
            )
        except OSError as exc:  # the directory itself could not be opened
            self._warn(d.path, dir_problem(exc))
            scan = ScanResult()
        for wpath, problem in scan.warnings:
            self._warn(wpath, problem)
        subdirs: list[_Dir] = []
        for child in scan.nodes:
            cpath = d.path.rstrip(b"/") + b"/" + child.name
            cold = d.old.get(child.name) if d.old else None
            d.nodes.append(child)
            if child.type == "dir":
                d.pending += 1
                sub_old = cold.subtree if cold and cold.type == "dir" else None
                sub = _Dir(cpath, child, d, None, sub_old)
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
                self.stats.bytes_processed += child.size
                self.stats.files_seen += 1
                if self._unchanged(child, cold):
                    assert cold is not None
                    child.content = list(cold.content)
                    child.xattrs = dict(cold.xattrs)  # the same ctime: the same xattrs
                    self.stats.files_unmodified += 1
                    self.stats.bytes_unmodified += child.size
                else:
                    d.pending += 1
                    await file_tx.send(_FileJob(d, child, cpath, cold))
        d.walked = True
        await self._maybe_finish(d)
        return subdirs

    async def _walk_stdin(self, file_tx: anyio.abc.ObjectSendStream[_FileJob]) -> None:
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
        """Store the tree of a fully processed directory, then look at its parent."""
        while d.walked and d.pending == 0:
            payload = encode_tree(Tree(d.nodes))
            tree_id = self.crypto.blob_id(payload)
            if self.saver.claim(tree_id):
                stored = encode_blob(self.crypto, TREE, tree_id, payload, self.opts.level)
                await self.saver.add(TREE, tree_id, stored, len(payload))
            if d.node is not None:
                d.node.subtree = tree_id
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

    async def _reader(self, rx: MemoryObjectReceiveStream[_FileJob]) -> None:
        """Read files; small ones in batches into one slot, one thread hop per batch
        (a hop costs ~50 µs, about as much as reading a 64 KiB file)."""
        async with rx:
            async for job in rx:
                if not self._is_small(job):
                    await self._job_done(job, await self._read_file(job))
                    continue
                batch = [job]
                size = job.node.size
                while len(batch) < SMALL_READ_FILES and size < SMALL_BATCH_BYTES:
                    try:
                        job = rx.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    if not self._is_small(job):
                        await self._job_done(job, await self._read_file(job))
                        continue
                    batch.append(job)
                    size += job.node.size
                while batch:
                    batch = await self._read_small_batch(batch)

    async def _read_small_batch(self, batch: list[_FileJob]) -> list[_FileJob]:
        """Read as many of ``batch`` as fit into one slot; return the rest."""
        assert self._slots is not None and self._tg is not None
        slot = await self._slots.acquire()
        try:
            results = await anyio.to_thread.run_sync(
                read_small_files,
                [(j.dir, j.node.name) for j in batch],
                self._dirs,
                slot.view,
                self.crypto,
                self.chunker_params.min_size,
            )
        except BaseException:
            slot.release()
            raise
        new: list[tuple[int, int, bytes]] = []
        for j, result in zip(batch, results, strict=False):
            if result is None:  # grew past the small-file size since the walk
                await self._job_done(j, await self._read_file(j))
            elif isinstance(result, OSError):
                self._warn(j.path, read_problem(result))
                await self._job_done(j, False)
            else:
                offset, length, blob_id, after, xattrs = result
                self._check_unchanged(j, after, length)
                if length and self.saver.claim(blob_id):
                    new.append((offset, length, blob_id))
                self.stats.bytes_read += length
                j.node.xattrs = xattrs
                self._file_done(j, [blob_id] if length else [], length)
                await self._job_done(j, True)
        if new:
            self._tg.start_soon(self._encode_slot, slot, new)
        else:
            slot.release()
        return batch[len(results) :]

    async def _job_done(self, job: _FileJob, ok: bool) -> None:
        if not ok:
            job.dir.nodes = [n for n in job.dir.nodes if n is not job.node]
        job.dir.pending -= 1
        await self._maybe_finish(job.dir)

    def _check_unchanged(self, job: _FileJob, after: os.stat_result, size: int) -> None:
        if after.st_mtime_ns != job.node.mtime_ns or after.st_size != size:
            self.stats.files_changed_during_read += 1
            self._warn(job.path, "file changed while it was read; stored as read")

    async def _read_file(self, job: _FileJob) -> bool:
        """Read, chunk and queue one large file (or stdin); False if unreadable."""
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
            return False
        try:
            content, size = await self._read_large(fd)
            if not stdin:
                after, job.node.xattrs = await anyio.to_thread.run_sync(finish_file, fd)
        except OSError as exc:
            self._warn(job.path, read_problem(exc))
            return False
        finally:
            if not stdin:
                os.close(fd)
        if not stdin:
            self._check_unchanged(job, after, size)
        self.stats.bytes_read += size
        self._file_done(job, content, size)
        return True

    async def _read_large(self, fd: int) -> tuple[list[bytes], int]:
        """Read a file slot by slot; encode the new chunks of each slot concurrently."""
        assert self._slots is not None and self._tg is not None
        chunker = make_chunker(self.chunker_params)
        content: list[bytes] = []
        total = 0
        carry = b""
        eof = False
        while not eof:
            slot = await self._slots.acquire()
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
            total += filled - len(carry)
            complete = spans if eof else spans[:-1]
            self.held.sub(len(carry))
            if not eof and spans:
                off, length, _ = spans[-1]
                carry = bytes(slot.view[off : off + length])
            else:
                carry = b""
            self.held.add(len(carry))
            content.extend(blob_id for _, _, blob_id in complete)
            new = [s for s in complete if self.saver.claim(s[2])]
            if new:
                self._tg.start_soon(self._encode_slot, slot, new)
            else:
                slot.release()
        return content, total

    async def _encode_slot(self, slot: Slot, spans: list[tuple[int, int, bytes]]) -> None:
        """Compress and encrypt new chunks in a worker, slot to slot; then pack them.

        The output slot is held until the packer has taken every blob: when the
        uploads fall behind, encode waits here, the workers and then the readers
        run out of slots, and nothing piles up in memory (docs/architecture.md).
        """
        assert self._out_slots is not None
        pool = await self._get_pool()
        try:
            out = await self._out_slots.acquire()
            try:
                end = max(off + length for off, length, _ in spans)
                placed = await pool.run(
                    cpu.encode_into, slot.ref(end), out.ref(), spans, self.opts.level
                )
            except BaseException:
                out.release()
                raise
        finally:
            slot.release()  # the input is encoded: readers may refill it now
        try:
            for (_, length, blob_id), (offset, size) in zip(spans, placed, strict=True):
                await self.saver.add(DATA, blob_id, out.view[offset : offset + size], length)
        finally:
            out.release()

    def _warn(self, path: bytes, problem: str) -> None:
        text = os.fsdecode(path)
        self.stats.errors.append((text, problem))
        log.warning("backup.file_error", path=text, error=problem)
