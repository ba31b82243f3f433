"""The restore pipeline: plan (a streaming walk) → download packs → decode in workers →
write → metadata.

* **plan** is the pipeline's source: it walks the snapshot's trees depth first,
  creating each directory when it enters it (and clearing it of extra entries with
  ``--delete``), decides per file whether it must be written (resume: a file whose
  content already matches is skipped), creates empty, correctly sized multi-blob
  files, and gathers files in groups of a few thousand; each full group's blobs
  become download ranges. Only the groups in flight are held, never the snapshot;
* **download → decode + write → account** is a :class:`~cairn.pipeline.Pipeline`
  (``_write_batches``) of the stages shared with ``check --read-data``
  (:mod:`cairn.stages.fetch`): each range is fetched once (one shared-memory slot),
  on ``connections`` tasks that do not wait for the decoding; the worker processes
  decode straight from the slot — decrypt, decompress, verify the blob ID, then
  ``pwrite`` into every file (and offset) that needs the blob, so plaintext never
  travels back through a pipe — and release it; the sink turns what went wrong into
  per-entry errors;
* **metadata** follows the contents: when a group's last range is accounted, its
  hardlinks, symlinks and special files are made and its files' metadata set
  (groups in walk order); a directory's once the walk has left it and its last
  group is done — children before parents, so a read-only directory is filled
  before it is locked.

Every filesystem call is made relative to an open directory descriptor
(:mod:`cairn.stages.dirfds`), so any depth restores and no symlink in the target is
followed. An entry that cannot be restored (its data or tree is damaged, a name is
too long, a directory is in the way, the disk is full) is one error naming its path
and cause; the restore goes on with the others and nothing is left behind looking
restored (a file whose content is incomplete is removed).
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import structlog

from cairn.backends.base import BackendError
from cairn.pipeline import (
    PipelineOptions,
    PipelineSnapshot,
    SlotPool,
    WorkerPool,
)
from cairn.pipeline.errors import RemoteError, WorkerCrashed
from cairn.pipeline.options import DEFAULT_CONNECTIONS, cores
from cairn.repo.errors import ObjectNotFound, RepoError
from cairn.repo.index import BlobLocation, Index
from cairn.repo.tree import Node, Tree
from cairn.stages import cpu
from cairn.stages.dirfds import DIR_FLAGS, DirFds, open_dir_path, split
from cairn.stages.excludes import ExcludeRules
from cairn.stages.fetch import (
    SLOT_SIZE,
    Batch,
    Fetched,
    download,
    plan_ranges,
    run_fetch_pipeline,
)
from cairn.stages.fsmeta import apply_metadata_at, apply_metadata_fd, create_special

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.restore")
T = TypeVar("T")


class RestoreTargetError(RepoError):
    """The target directory cannot be created or written to (exit 1)."""


@dataclass(frozen=True)
class RestoreOptions:
    target: bytes
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    overwrite: str = "always"  # always | if-changed | if-newer | never
    delete: bool = False
    sparse: bool = False
    verify: bool = False
    dry_run: bool = False
    cpu_workers: int = field(default_factory=cores)
    connections: int = DEFAULT_CONNECTIONS


@dataclass
class RestoreStats:
    files: int = 0
    files_skipped: int = 0
    dirs: int = 0
    others: int = 0
    bytes_written: int = 0
    bytes_total: int = 0
    deleted: int = 0
    deleted_paths: list[str] = field(default_factory=list)  # for -v and --dry-run
    verified: int = 0
    # One (path, cause) per entry that could not be restored (or fully restored).
    errors: list[tuple[str, str]] = field(default_factory=list)
    # The download pipeline's final counters (None when nothing was downloaded).
    pipeline: PipelineSnapshot | None = None


# Where a blob goes: (directory below the target, file name, offset, metadata when a
# worker creates the file) — see cpu.Target.
_Writes = dict[bytes, list[cpu.Target]]
# Failures of the storage or of a worker that cost one download, not the restore.
_DOWNLOAD_ERRORS = (BackendError,)
# The decode stage's jobs also write the files: busy workers may be waiting on the
# target's disk, which more workers do not speed up.
DECODE_WRITE_HINT = "--cpu-workers (decode and write; a slow target disk shows here too)"
_WORKER_ERRORS = (RepoError, WorkerCrashed, RemoteError)
# What the decode stage hands the sink: the batch, then the worker's result
# (bytes written, per-file problems, undecodable blobs) or the error that lost it.
_Outcome = tuple[
    Batch, tuple[int, list[cpu.Problem], list[tuple[bytes, str]]] | None, BaseException | None
]
# A range's blobs, as the plan describes them to the later stages.
_BlobRef = tuple[BlobLocation, bytes, "_Group"]

# The walk closes a group of files when it holds this many entries, or when its
# files need this many blob writes (large files). A group is what the plan holds
# in memory beyond the directories being walked (~1 KB per file: its node, where
# its blobs go): its ranges are planned together, and what follows the writes —
# metadata, hardlinks, --verify — runs when all of them are done. The backup
# interleaves directories in its packs, so a pack is read in part by each group
# whose files it holds, gaps included: on 30,000 files of 1-4 KiB, groups of 1,024
# files downloaded 32 % more bytes than one plan for the whole snapshot, groups of
# 4,096 10 %. A few groups are in flight (the pipeline holds ~20 ranges): a few MiB.
GROUP_ENTRIES = 4096
GROUP_WRITES = 4096
# Gaps between the blobs a group needs that are shorter than this are downloaded
# rather than split into two ranges. fetch.MERGE_GAP (1 MiB) read 2.9x the stored
# bytes on the bench's many-small corpus (a group's files are spread over many
# packs, between other groups' files) and 1.13x on the default one; 256 KiB reads
# 1.27x and 1.02x, for 27-32 % more (smaller) ranges; 64 KiB read 1.0x for 47 % more.
MERGE_GAP = 256 * 1024
# A directory's entries are planned this many at a time (one call in a thread
# each), so a directory of 100,000 files is cut into groups too.
SLICE = 256


class _Group:
    """Files planned together: their blobs go to the pipeline as one set of ranges;
    their metadata, hardlinks and --verify follow when every range is accounted."""

    __slots__ = (
        "entries",
        "links",
        "locs",
        "meta",
        "others",
        "pending",
        "seq",
        "targets",
        "verify",
        "writes",
    )

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.writes: _Writes = {}
        # Where each blob of ``writes`` is, found when planned (not looked up again).
        self.locs: list[tuple[BlobLocation, bytes]] = []
        # Files the planner created (multi-blob, empty) or kept: their metadata is
        # set after the writes (a worker sets that of the files it creates).
        self.meta: list[tuple[bytes, Node]] = []
        self.links: list[tuple[bytes, bytes]] = []  # (existing, new) hardlinks
        self.others: list[tuple[bytes, Node]] = []  # symlinks, FIFOs, devices, sockets
        self.verify: list[tuple[bytes, Node]] = []  # with --verify: every file
        self.entries = 0
        self.targets = 0
        self.pending = 0  # ranges not yet accounted (set when the group closes)

    def add(self, loc: BlobLocation, blob_id: bytes, target: cpu.Target) -> None:
        """Plan one write of blob ``blob_id`` (at ``loc``)."""
        targets = self.writes.get(blob_id)
        if targets is None:
            self.writes[blob_id] = targets = []
            self.locs.append((loc, blob_id))
        targets.append(target)
        self.targets += 1

    def full(self, entries: int) -> bool:
        return self.entries >= entries or self.targets >= GROUP_WRITES


class Restorer:
    """Restore one snapshot (or a subtree, or one file) into ``options.target``.

    Memory: the walk streams. Besides the index, the restore holds the directories on
    the walk's stack, the groups of files in flight, the directories waiting for
    their contents to be finished (for their metadata), one entry per hardlinked
    inode, and one per entry that failed — not one per file of the snapshot.
    """

    def __init__(
        self,
        repo: Repository,
        index: Index,
        options: RestoreOptions,
        group_entries: int = GROUP_ENTRIES,
    ):
        self.repo = repo
        self.index = index
        self.opts = options
        self.stats = RestoreStats()
        self._root_tree: Tree | None = None
        self._root_leaf: Node | None = None
        self._group = _Group(0)
        self._group_entries = max(1, group_entries)  # smaller in tests: many groups
        # Closed groups not finalized yet (their ranges are in the pipeline), by seq;
        # they are finalized in order: a hardlink's group follows its first path's.
        self._unfinished: dict[int, _Group] = {}
        self._next_final = 0
        # Directories whose subtree the walk has left, in that order (children
        # before parents), each with the last group holding anything below it:
        # their metadata is set once that group is finalized.
        self._dirs_done: deque[tuple[bytes, Node, int]] = deque()
        self._seen_inodes: dict[tuple[int, int], bytes] = {}  # hardlinked files only
        self._new_dir: bytes | None = None  # the directory being planned, if made now
        self._last_parent = b""  # the directory of the file planned last
        self._failed: dict[bytes, str] = {}  # files whose data could not be restored
        self._errored: set[bytes] = set()  # entries with an error line already
        # Every filesystem call of this process (and its bookkeeping) runs under this
        # lock: the walk and the sink share the directory descriptors and the stats.
        self._fs_lock = anyio.Lock()
        self._dirfds: DirFds | None = None
        inc = [p for p in options.includes if p]
        self._include = ExcludeRules(patterns=inc) if inc else None
        self._exclude = ExcludeRules(patterns=list(options.excludes))

    # -- filters ----------------------------------------------------------------

    def _selected(self, rel: bytes) -> bool:
        """Whether the filters select ``rel`` itself (an entry to restore or delete)."""
        if self._exclude.excluded_path(rel):
            return False
        return self._include is None or self._include.excluded_path(rel)

    def _wanted(self, rel: bytes, is_dir: bool) -> bool:
        if self._exclude.excluded_path(rel):
            return False
        if self._include is None:
            return True
        if self._include.excluded_path(rel):
            return True
        # A directory above an included path must be walked (and created).
        return is_dir

    async def plan(self, tree_id: bytes | None, node: Node | None) -> None:
        """Read the top of what is restored: the tree below ``tree_id``, or the one
        non-directory ``node``. An unreadable top tree fails here, before the target
        is touched; the rest is walked by :meth:`run`, a directory at a time."""
        if node is not None and node.type != "dir":
            self._root_leaf = node
            return
        assert tree_id is not None  # a directory always has a subtree
        self._root_tree = await self.repo.load_tree(tree_id)

    # -- the run --------------------------------------------------------------

    async def run(self) -> RestoreStats:
        try:
            await self._fs(self._open_target)
            ranges = self._walk()
            try:
                # No pipeline (nor worker pool) when nothing is to be downloaded.
                first = await anext(ranges, None)
                if first is not None:
                    await self._write_batches(_prepend(first, ranges))
            except BaseException:
                self._abandon()
                raise
            finally:
                await ranges.aclose()
            await self._fs(self._advance)  # every group is complete now
        finally:
            if self._dirfds is not None:
                self._dirfds.close()
                self._dirfds = None
        return self.stats

    async def _fs(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` (filesystem work) in a thread, one at a time."""
        async with self._fs_lock:
            return await anyio.to_thread.run_sync(fn, *args)

    def _open_target(self) -> None:
        target = self.opts.target
        if self.opts.dry_run:
            try:
                self._dirfds = DirFds(open_dir_path(target))
            except OSError:
                pass  # nothing there yet: everything would be new
            return
        try:
            fd = open_dir_path(target, create=True)
        except OSError as exc:
            raise RestoreTargetError(
                f"cannot create target directory {os.fsdecode(target)}: {exc.strerror or exc}"
            ) from None
        self._dirfds = DirFds(fd)
        if not os.access(".", os.W_OK | os.X_OK, dir_fd=fd):
            why = (
                "read-only file system"
                if os.statvfs(fd).f_flag & os.ST_RDONLY
                else ("permission denied")
            )
            raise RestoreTargetError(
                f"cannot restore into {os.fsdecode(target)}: the directory is not writable ({why})"
            )

    def _dir_fd(self, rel: bytes) -> int:
        if self._dirfds is None:
            raise FileNotFoundError(errno.ENOENT, "the target does not exist")
        return self._dirfds.get(rel)

    # -- the walk (the pipeline's source) ------------------------------------------

    async def _walk(self) -> AsyncGenerator[Batch, None]:
        """Walk the snapshot depth first, in tree order (the backup's, so mostly the
        packs' order), planning each directory's entries into groups; yield the
        download ranges of each group as it closes. A directory is created (and,
        with ``--delete``, cleared of extra entries) when the walk enters it — parents
        before children — and queued for its metadata when the walk leaves it."""
        if self._root_leaf is not None:
            leaf, self._root_leaf = self._root_leaf, None
            await self._fs(self._plan_leaf, b"/" + leaf.name, leaf)
            for batch in await self._close_group():
                yield batch
            return
        # (entering?, path below the target, its node: None for the top)
        stack: list[tuple[bool, bytes, Node | None]] = [(True, b"", None)]
        while stack:
            entering, rel, node = stack.pop()
            if not entering:
                assert node is not None
                if not self.opts.dry_run:
                    self._dirs_done.append((rel, node, self._group.seq))
                continue
            nodes = await self._load_dir(rel, node)
            if nodes is None:
                continue
            step = min(SLICE, self._group_entries)
            # Entering and the first slice in one thread call: most directories
            # hold less than a slice, and each call is a hand-off to a thread and
            # back (queue, wake-up, reply through the loop: with the local backend's
            # reads, ~10 % of the main process's samples on 200,000 small files).
            subdirs = await self._fs(self._enter_and_plan, rel, nodes, nodes[:step])
            if subdirs is None:
                continue
            if node is not None:
                stack.append((False, rel, node))
            start = step
            while True:
                if self._group.full(self._group_entries):
                    for batch in await self._close_group():
                        yield batch
                if start >= len(nodes):
                    break
                subdirs += await self._fs(self._plan_entries, rel, nodes[start : start + step])
                start += step
            del nodes
            stack.extend(reversed(subdirs))
        for batch in await self._close_group():
            yield batch

    async def _load_dir(self, rel: bytes, node: Node | None) -> list[Node] | None:
        """The entries of a directory's tree; None (and one error) if unreadable."""
        if node is None:
            tree, self._root_tree = self._root_tree, None
            assert tree is not None
            return tree.nodes
        assert node.subtree is not None
        try:
            tree = await self.repo.load_tree(node.subtree)
        except (RepoError, BackendError) as exc:
            async with self._fs_lock:
                self._error(rel, f"directory not restored, its tree is unreadable: {exc}")
            return None
        return tree.nodes

    def _enter_dir(self, rel: bytes, nodes: list[Node]) -> bool:
        """Create the directory ``rel`` (not the target itself) and delete what
        ``--delete`` selects in it. False when it cannot be created (one error;
        nothing below it is tried)."""
        self._new_dir = None
        if rel and not self.opts.dry_run:
            parent, name = split(rel)
            try:
                parent_fd = self._dir_fd(parent)
                st = _lstat_at(parent_fd, name)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=parent_fd)  # a symlink above all: never followed
                    st = None
                if st is None:
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
                    self._new_dir = rel
                self.stats.dirs += 1
            except OSError as exc:
                self._error(rel, exc)
                return False
        if self.opts.delete:
            # Before the directory's files are written (space), before its times are set.
            self._delete_extra(rel, frozenset(n.name for n in nodes))
        return True

    def _enter_and_plan(
        self, rel: bytes, nodes: list[Node], first: list[Node]
    ) -> list[tuple[bool, bytes, Node | None]] | None:
        """Enter the directory ``rel`` and plan its ``first`` entries; None when it
        cannot be entered."""
        if not self._enter_dir(rel, nodes):
            return None
        return self._plan_entries(rel, first)

    def _plan_entries(self, rel: bytes, nodes: list[Node]) -> list[tuple[bool, bytes, Node | None]]:
        """Plan the entries of one directory's slice; return its subdirectories."""
        subdirs: list[tuple[bool, bytes, Node | None]] = []
        filtered = self._include is not None or bool(self.opts.excludes)
        for child in nodes:
            crel = rel + b"/" + child.name
            if filtered and not self._wanted(crel, child.type == "dir"):
                continue
            if child.type == "dir":
                subdirs.append((True, crel, child))
            else:
                self._plan_leaf(crel, child)
        return subdirs

    def _plan_leaf(self, rel: bytes, node: Node) -> None:
        group = self._group
        group.entries += 1
        if node.type != "file":
            if not self.opts.dry_run:
                group.others.append((rel, node))
            return
        self.stats.bytes_total += node.size
        key = (node.device, node.inode) if node.links > 1 else None
        if key is not None and key in self._seen_inodes:
            if not self.opts.dry_run:
                group.links.append((self._seen_inodes[key], rel))
                if self.opts.verify:
                    group.verify.append((rel, node))
            return
        try:
            self._prepare_file(rel, node, group)
        except OSError as exc:
            self._error(rel, exc)
        # The next path of a hardlinked file stands in for one that failed here.
        if key is not None and rel not in self._errored:
            self._seen_inodes[key] = rel

    def _prepare_file(self, rel: bytes, node: Node, group: _Group) -> None:
        """Decide whether the file must be written; create it or plan its creation."""
        locations = self._locate(rel, node)
        if locations is None:
            return
        parent, name = split(rel)
        # One object for the directory of consecutive files: a job pickles it once.
        if parent == self._last_parent:
            parent = self._last_parent
        else:
            self._last_parent = parent
        try:
            parent_fd = self._dir_fd(parent)
            # Nothing to look at in a directory this run created (and only the walk
            # adds to it before its group is written): a lookup per file saved.
            st = None if parent == self._new_dir else _lstat_at(parent_fd, name)
        except OSError:
            if not self.opts.dry_run:
                raise
            parent_fd, st = -1, None  # dry run: its directory does not exist yet
        if st is not None and self._keep_existing(parent_fd, name, st, node, locations):
            self.stats.files_skipped += 1
            if not self.opts.dry_run:
                group.meta.append((rel, node))
                if self.opts.verify:
                    group.verify.append((rel, node))
            return
        if self.opts.dry_run:
            self.stats.files += 1
            return
        if self.opts.verify:
            group.verify.append((rel, node))
        if len(node.content) == 1 and st is None:
            # The common small file: the worker that writes its only blob creates
            # it (O_EXCL) and sets its metadata, so 20,000 file creations run in
            # the workers, in parallel, instead of one after another here.
            group.add(locations[0], node.content[0], (parent, name, 0, cpu.file_meta(node)))
            self.stats.files += 1
            return
        _create_empty(parent_fd, name, node.size)
        self.stats.files += 1
        group.meta.append((rel, node))
        offset = 0
        for blob_id, loc in zip(node.content, locations, strict=True):
            group.add(loc, blob_id, (parent, name, offset, None))
            offset += loc.raw_length

    def _locate(self, rel: bytes, node: Node) -> list[BlobLocation] | None:
        out = []
        for blob_id in node.content:
            loc = self.index.lookup(blob_id)
            if loc is None:
                self._error(
                    rel,
                    ObjectNotFound(f"data blob {blob_id.hex()} is missing from the repository"),
                )
                return None
            out.append(loc)
        return out

    def _keep_existing(
        self,
        dir_fd: int,
        name: bytes,
        st: os.stat_result,
        node: Node,
        locations: list[BlobLocation],
    ) -> bool:
        """Whether an existing target file may stay as it is."""
        if not stat.S_ISREG(st.st_mode):
            return False
        mode = self.opts.overwrite
        if mode == "never":
            return True
        if mode == "if-newer":
            return st.st_mtime_ns >= node.mtime_ns
        if st.st_size != node.size:
            return False
        if mode == "if-changed" and st.st_mtime_ns == node.mtime_ns:
            return True
        return _content_matches(dir_fd, name, node.content, locations, self.repo.crypto)

    async def _close_group(self) -> list[Batch]:
        """Close the current group: its download ranges (none: it is complete)."""
        group = self._group
        self._group = _Group(group.seq + 1)
        self._unfinished[group.seq] = group
        batches = plan_ranges(
            (
                (loc.pack_id, loc.offset, loc.length, (loc, blob_id, group))
                for loc, blob_id in group.locs
            ),
            merge_gap=MERGE_GAP,
        )
        group.locs = []
        group.pending = len(batches)
        if not batches:
            await self._fs(self._advance)
        return batches

    # -- downloading and writing ----------------------------------------------

    async def _write_batches(self, batches: AsyncIterator[Batch]) -> None:
        """The pipeline: plan → download → decode + write (workers) → account.

        ``connections`` downloads run ahead of the ``2 x cpu_workers`` decode jobs
        by the slots free: each download holds a slot until its decode job is done,
        so memory is ``slots x SLOT_SIZE`` however large the restore.

        ``cpu_workers + connections`` slots: a decode job queued behind a busy
        worker takes a slot a download could use rather than one of its own. A
        slot more per worker changed nothing measurable (the default bench corpus
        into tmpfs: 3.0-3.4 s either way) and cost its 8 MiB each (peak PSS
        211-225 MiB, 186-193 MiB without).
        """
        workers, connections = self.opts.cpu_workers, self.opts.connections
        slots = SlotPool(SLOT_SIZE, workers + connections)
        options = PipelineOptions(cpu_workers=workers, connections=connections)
        try:
            async with WorkerPool(
                workers, initializer=cpu.init_worker, initargs=(self.repo.crypto,)
            ) as pool:

                async def decode_and_write(fetched: Fetched) -> _Outcome:
                    return await self._decode_and_write(pool, fetched)

                await run_fetch_pipeline(
                    "restore",
                    batches,
                    download(self.repo.backend, slots, _DOWNLOAD_ERRORS),
                    downloads=connections,
                    work=("decode", decode_and_write, 2 * workers, DECODE_WRITE_HINT),
                    sink=("account", self._account),
                    options=options,
                    record=self._record_metrics,
                )
        finally:
            slots.close()

    def _record_metrics(self, snapshot: PipelineSnapshot) -> None:
        self.stats.pipeline = snapshot

    async def _decode_and_write(self, pool: WorkerPool, fetched: Fetched) -> _Outcome:
        """The decode stage: one job in the pool decodes the downloaded range straight
        from its slot and writes every blob where it goes."""
        batch = fetched.batch
        if fetched.error is not None:
            return batch, None, fetched.error
        blobs: list[_BlobRef] = batch.blobs
        spans = [
            (loc.offset - batch.offset, loc.length, loc.type, blob_id, group.writes[blob_id])
            for loc, blob_id, group in blobs
        ]
        try:
            result = await pool.run(
                cpu.decode_and_write, fetched.ref(), self.opts.target, spans, self.opts.sparse
            )
        except _WORKER_ERRORS as exc:
            return batch, None, exc
        return batch, result, None

    async def _account(self, outcome: _Outcome) -> None:
        """The sink: count what was written, turn problems into per-entry errors;
        finish what the range's group completes."""
        batch, result, error = outcome
        blobs: list[_BlobRef] = batch.blobs
        group = blobs[0][2]
        async with self._fs_lock:
            self._account_range(batch, group, result, error)
            group.pending -= 1
            if group.pending == 0:
                await anyio.to_thread.run_sync(self._advance)

    def _account_range(
        self,
        batch: Batch,
        group: _Group,
        result: tuple[int, list[cpu.Problem], list[tuple[bytes, str]]] | None,
        error: BaseException | None,
    ) -> None:
        if error is not None or result is None:
            # This pack range is lost or damaged: fail the files that need it, go on
            # with the others.
            for _loc, blob_id, _group in batch.blobs:
                self._lost(batch.pack_id, blob_id, group, " ".join(str(error).split()))
            return
        written, problems, bad_blobs = result
        self.stats.bytes_written += written
        for dir_rel, file_name, problem, lost in problems:
            rel = dir_rel + b"/" + file_name
            if lost:
                self._fail(rel, problem)
            else:
                self._error(rel, problem)
        for blob_id, problem in bad_blobs:
            self._lost(batch.pack_id, blob_id, group, problem)

    def _lost(self, pack_id: bytes, blob_id: bytes, group: _Group, problem: str) -> None:
        why = f"data blob {blob_id.hex()} in pack {pack_id.hex()} could not be restored: {problem}"
        for dir_rel, name, _offset, _node in group.writes[blob_id]:
            self._fail(dir_rel + b"/" + name, why)

    def _fail(self, rel: bytes, problem: str) -> None:
        """The file's content is not restored: one error, and it is removed later."""
        if rel in self._failed:
            return
        self._failed[rel] = problem
        self.stats.files -= 1
        self._error(rel, problem)

    # -- finishing: metadata, links, verify ------------------------------------------

    def _advance(self) -> None:
        """Finalize the complete groups in order, then every directory whose
        contents they finished (deepest first: children leave the walk first)."""
        while True:
            group = self._unfinished.get(self._next_final)
            if group is None or group.pending:
                break
            del self._unfinished[self._next_final]
            self._next_final += 1
            if not self.opts.dry_run:
                self._finalize(group)
        while self._dirs_done and self._dirs_done[0][2] < self._next_final:
            rel, node, _seq = self._dirs_done.popleft()
            self._finish_dir(rel, node)

    def _finalize(self, group: _Group) -> None:
        # A file some of whose data is lost is removed, not left zero-filled with
        # the snapshot's size and times (it would pass for restored). (Files a
        # worker created remove themselves when their write fails.)
        for rel, _node in group.meta:
            if rel in self._failed:
                self._unlink(rel)
        for existing, new in group.links:
            if existing in self._failed:
                self._error(new, self._failed[existing])
                continue
            try:
                self._link(existing, new)
            except OSError as exc:
                self._error(new, exc)
        for rel, node in group.others:
            self._make_other(rel, node)
        for rel, node in group.meta:
            if rel in self._errored:
                continue
            parent, name = split(rel)
            try:
                parent_fd = self._dir_fd(parent)
            except OSError as exc:
                self._error(rel, exc)
                continue
            if _lstat_at(parent_fd, name) is not None:
                self._warn(rel, apply_metadata_at(parent_fd, name, node))
        for rel, node in group.verify:
            if rel not in self._errored:
                self._verify(rel, node)

    def _abandon(self) -> None:
        """The restore stops (an error, an interrupt): remove what would look restored."""
        for group in self._unfinished.values():
            for rel, _node in group.meta:
                if rel in self._failed:
                    self._unlink(rel)

    def _unlink(self, rel: bytes) -> None:
        parent, name = split(rel)
        try:
            os.unlink(name, dir_fd=self._dir_fd(parent))
        except OSError:
            pass

    def _make_other(self, rel: bytes, node: Node) -> None:
        parent, name = split(rel)
        try:
            parent_fd = self._dir_fd(parent)
            _clear(parent_fd, name)
            create_special(parent_fd, name, node)
            self.stats.others += 1
        except OSError as exc:
            self._error(rel, exc)
            return
        if node.type != "socket":
            self._warn(rel, apply_metadata_at(parent_fd, name, node))

    def _finish_dir(self, rel: bytes, node: Node) -> None:
        if rel in self._errored:
            return
        try:
            fd = self._dir_fd(rel)
        except OSError as exc:
            self._error(rel, exc)
            return
        self._warn(rel, apply_metadata_fd(fd, node))

    def _link(self, existing: bytes, new: bytes) -> None:
        src_dir, src_name = split(existing)
        dst_dir, dst_name = split(new)
        # Two directories from one small cache: hold the first by a copy.
        src_fd = os.dup(self._dir_fd(src_dir))
        try:
            dst_fd = self._dir_fd(dst_dir)
            _clear(dst_fd, dst_name)
            os.link(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        finally:
            os.close(src_fd)

    def _delete_extra(self, rel: bytes, names: frozenset[bytes]) -> None:
        """``--delete`` in the directory ``rel`` the walk entered: remove what the
        filters select but its tree (``names``, filtered or not) lacks, as restic
        does — only inside directories the walk enters (below the target root that
        the snapshot or ``SNAPSHOT:PATH`` maps to), only names their tree does not
        hold, and only paths the filters select. ``--dry-run`` counts."""
        try:
            dir_fd = self._dir_fd(rel)
            present = sorted(map(os.fsencode, os.listdir(dir_fd)))
        except OSError:
            return  # not there (dry run) or not a directory: nothing to delete
        for name in present:
            child = rel + b"/" + name
            if name in names or not self._selected(child):
                continue
            try:
                self._remove_all(self._dir_fd(rel), name, child)
            except OSError as exc:
                self._error(child, exc)

    def _remove_all(self, dir_fd: int, name: bytes, rel: bytes) -> None:
        """Remove ``name`` (a whole directory tree, never following a symlink)."""
        st = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                for child in sorted(map(os.fsencode, os.listdir(fd))):
                    self._remove_all(fd, child, rel + b"/" + child)
            finally:
                os.close(fd)
            if not self.opts.dry_run:
                os.rmdir(name, dir_fd=dir_fd)
        elif not self.opts.dry_run:
            os.unlink(name, dir_fd=dir_fd)
        self.stats.deleted += 1
        self.stats.deleted_paths.append(self._display(rel))

    def _verify(self, rel: bytes, node: Node) -> None:
        locations = self._locate(rel, node)
        if locations is None:
            return
        parent, name = split(rel)
        try:
            parent_fd = self._dir_fd(parent)
        except OSError as exc:
            self._error(rel, exc)
            return
        if not _content_matches(parent_fd, name, node.content, locations, self.repo.crypto):
            self._error(rel, "verification failed: content differs")
        else:
            self.stats.verified += 1

    def _display(self, rel: bytes) -> str:
        return os.fsdecode(self.opts.target.rstrip(b"/") + rel)

    def _warn(self, rel: bytes, warnings: list[str]) -> None:
        """Metadata that could not be set: one error line for the entry."""
        if warnings:
            self._error(rel, "; ".join(warnings))

    def _error(self, rel: bytes, exc: BaseException | str) -> None:
        if isinstance(exc, OSError) and exc.strerror:
            problem = exc.strerror
        else:
            problem = " ".join(str(exc).split())
        text = self._display(rel)
        self._errored.add(rel)
        self.stats.errors.append((text, problem))
        log.warning("restore.file_error", path=text, error=problem)


async def _prepend(first: Batch, rest: AsyncIterator[Batch]) -> AsyncIterator[Batch]:
    yield first
    async for batch in rest:
        yield batch


def _lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _clear(dir_fd: int, name: bytes) -> None:
    """Unlink whatever non-directory is at ``name`` (never written through: it may be
    a symlink or a hardlink to a file outside the target); a directory is an error."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "a directory is in the way")
    os.unlink(name, dir_fd=dir_fd)


def _create_empty(dir_fd: int, name: bytes, size: int) -> None:
    _clear(dir_fd, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        os.ftruncate(fd, size)  # holes until written: sparse for free
    finally:
        os.close(fd)


def _content_matches(
    dir_fd: int, name: bytes, content: list[bytes], locations: list[BlobLocation], crypto: Any
) -> bool:
    """Whether the file ``name`` in ``dir_fd`` holds exactly the blobs of ``content``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        with open(fd, "rb", buffering=0, closefd=False) as f:
            for blob_id, loc in zip(content, locations, strict=True):
                data = f.read(loc.raw_length)
                if len(data) != loc.raw_length or crypto.blob_id(data) != blob_id:
                    return False
            return f.read(1) == b""
    except OSError:
        return False
    finally:
        os.close(fd)
