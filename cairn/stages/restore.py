"""The restore pipeline: plan → download packs → decode in workers → write → metadata.

* **plan** walks the snapshot's trees, decides per file whether it must be written
  (resume: a file whose content already matches is skipped), creates directories and
  empty, correctly sized files, and maps every needed blob to the places it goes;
* **download → decode + write → account** is a :class:`~cairn.pipeline.Pipeline`
  (``_write_batches``) of the stages shared with ``check --read-data``
  (:mod:`cairn.stages.fetch`): each pack is fetched once (ranged reads covering the
  blobs needed, each range one shared-memory slot), on ``connections`` tasks that
  do not wait for the decoding; the worker processes decode straight from the slot
  — decrypt, decompress, verify the blob ID, then ``pwrite`` into every file (and
  offset) that needs the blob, so plaintext never travels back through a pipe —
  and release it; the sink turns what went wrong into per-entry errors;
* **metadata** comes last: files, hardlinks, symlinks and special files, then
  directories deepest first (so a read-only directory is filled before it is locked).

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
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

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

log = structlog.get_logger("cairn.restore")


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


@dataclass
class _Entry:
    rel: bytes  # path below the target (b"/a/b"), also the one filters match
    node: Node


# Where a blob goes: (directory below the target, file name, offset, node when a
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


class Restorer:
    def __init__(self, repo: Any, index: Index, options: RestoreOptions):
        self.repo = repo
        self.index = index
        self.opts = options
        self.stats = RestoreStats()
        self._dirs: list[_Entry] = []
        self._files: list[_Entry] = []
        self._others: list[_Entry] = []
        self._links: list[tuple[bytes, bytes]] = []  # (existing, new) hardlinks
        # Directories the plan walked, with every name their tree holds (filtered or
        # not): ``--delete`` looks only inside these, at names the tree lacks.
        self._visited: list[tuple[bytes, frozenset[bytes]]] = []
        self._bad_dirs: set[bytes] = set()  # not restored: nothing below is tried
        self._failed: dict[bytes, str] = {}  # files whose data could not be restored
        self._errored: set[bytes] = set()  # entries with an error line already
        self._worker_done: set[bytes] = set()  # created and finished by a worker
        self._dirfds: DirFds | None = None
        inc = [p for p in options.includes if p]
        self._include = ExcludeRules(patterns=inc) if inc else None
        self._exclude = ExcludeRules(patterns=list(options.excludes))

    # -- planning -------------------------------------------------------------

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
        """Walk the snapshot below ``tree_id`` into directories, files and others.

        A subtree whose tree cannot be read is one error; the rest is planned."""
        if node is not None and node.type != "dir":
            self._add_leaf(b"/" + node.name, node)
            return
        assert tree_id is not None  # a directory always has a subtree
        stack: list[tuple[bytes, bytes]] = [(b"", tree_id)]
        while stack:
            rel, tid = stack.pop()
            try:
                tree: Tree = await self.repo.load_tree(tid)
            except (RepoError, BackendError) as exc:
                if not rel:
                    raise  # the top tree itself: there is nothing to restore
                self._bad_dirs.add(rel)
                self._error(rel, f"directory not restored, its tree is unreadable: {exc}")
                continue
            if self.opts.delete:
                self._visited.append((rel, frozenset(n.name for n in tree.nodes)))
            for child in tree.nodes:
                crel = rel + b"/" + child.name
                if not self._wanted(crel, child.type == "dir"):
                    continue
                if child.type == "dir":
                    assert child.subtree is not None
                    self._dirs.append(_Entry(crel, child))
                    stack.append((crel, child.subtree))
                else:
                    self._add_leaf(crel, child)

    def _add_leaf(self, rel: bytes, node: Node) -> None:
        if node.type == "file":
            self._files.append(_Entry(rel, node))
        else:
            self._others.append(_Entry(rel, node))

    # -- the run --------------------------------------------------------------

    async def run(self) -> RestoreStats:
        try:
            await anyio.to_thread.run_sync(self._open_target)
            if not self.opts.dry_run:
                await anyio.to_thread.run_sync(self._make_dirs)
            if self.opts.delete:
                # Before anything is written (space) and before directory times are set.
                await anyio.to_thread.run_sync(self._delete_extra)
            writes = await anyio.to_thread.run_sync(self._prepare_files)
            if self.opts.dry_run:
                return self.stats
            if writes:
                await self._write_blobs(writes)
            await anyio.to_thread.run_sync(self._finish_metadata)
            if self.opts.verify:
                await anyio.to_thread.run_sync(self._verify)
        finally:
            if self._dirfds is not None:
                self._dirfds.close()
                self._dirfds = None
        return self.stats

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

    def _in_bad_dir(self, rel: bytes) -> bool:
        """Whether ``rel`` is, or is below, a directory that was not restored."""
        if not self._bad_dirs:
            return False
        while rel:
            if rel in self._bad_dirs:
                return True
            rel = rel.rpartition(b"/")[0]
        return False

    def _make_dirs(self) -> None:
        # Parents come before children in self._dirs, so each component below the
        # target is checked (never followed if it is a symlink) before anything is
        # created inside it.
        for entry in self._dirs:
            if self._in_bad_dir(entry.rel):
                continue
            parent, name = split(entry.rel)
            try:
                parent_fd = self._dir_fd(parent)
                st = _lstat_at(parent_fd, name)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=parent_fd)  # a symlink above all: never followed
                    st = None
                if st is None:
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
                self.stats.dirs += 1
            except OSError as exc:
                self._bad_dirs.add(entry.rel)
                self._error(entry.rel, exc)

    def _prepare_files(self) -> _Writes:
        """Create files that must be written; return blob → where it goes."""
        writes: _Writes = defaultdict(list)
        seen_inodes: dict[tuple[int, int], bytes] = {}
        for entry in self._files:
            if self._in_bad_dir(entry.rel):
                continue
            node = entry.node
            self.stats.bytes_total += node.size
            key = (node.device, node.inode) if node.links > 1 else None
            if key is not None and key in seen_inodes:
                self._links.append((seen_inodes[key], entry.rel))
                continue
            try:
                self._prepare_file(entry, writes)
            except OSError as exc:
                self._error(entry.rel, exc)
            # The next path of a hardlinked file stands in for one that failed here.
            if key is not None and entry.rel not in self._errored:
                seen_inodes[key] = entry.rel
        return writes

    def _prepare_file(self, entry: _Entry, writes: _Writes) -> None:
        node = entry.node
        locations = self._locate(entry)
        if locations is None:
            return
        parent, name = split(entry.rel)
        try:
            parent_fd = self._dir_fd(parent)
            st = _lstat_at(parent_fd, name)
        except OSError:
            if not self.opts.dry_run:
                raise
            parent_fd, st = -1, None  # dry run: its directory does not exist yet
        if st is not None and self._keep_existing(parent_fd, name, st, node, locations):
            self.stats.files_skipped += 1
            return
        if self.opts.dry_run:
            self.stats.files += 1
            return
        if len(node.content) == 1 and st is None:
            # The common small file: the worker that writes its only blob creates
            # it (O_EXCL) and sets its metadata, so 20,000 file creations run in
            # the workers, in parallel, instead of one after another here.
            writes[node.content[0]].append((parent, name, 0, node))
            self._worker_done.add(entry.rel)
            self.stats.files += 1
            return
        _create_empty(parent_fd, name, node.size)
        self.stats.files += 1
        offset = 0
        for blob_id, loc in zip(node.content, locations, strict=True):
            writes[blob_id].append((parent, name, offset, None))
            offset += loc.raw_length

    def _locate(self, entry: _Entry) -> list[BlobLocation] | None:
        out = []
        for blob_id in entry.node.content:
            loc = self.index.lookup(blob_id)
            if loc is None:
                self._error(
                    entry.rel,
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

    # -- downloading and writing ----------------------------------------------

    async def _write_blobs(self, writes: _Writes) -> None:
        try:
            await self._write_batches(writes)
        finally:
            # A file some of whose data is lost is removed, not left zero-filled
            # with the snapshot's size and times (it would pass for restored).
            # (Files a worker created remove themselves when their write fails.)
            for rel in self._failed:
                if rel in self._worker_done:
                    continue
                parent, name = split(rel)
                try:
                    os.unlink(name, dir_fd=self._dir_fd(parent))
                except OSError:
                    pass

    async def _write_batches(self, writes: _Writes) -> None:
        """The pipeline: plan → download → decode + write (workers) → account.

        ``connections`` downloads run ahead of the ``2 x cpu_workers`` decode jobs
        by the slots free: each download holds a slot until its decode job is done,
        so memory is ``slots x SLOT_SIZE`` however large the restore.
        """
        locations = ((self.index.lookup(blob_id), blob_id) for blob_id in writes)
        batches = plan_ranges(
            (loc.pack_id, loc.offset, loc.length, (loc, blob_id))
            for loc, blob_id in locations
            if loc is not None
        )
        workers, connections = self.opts.cpu_workers, self.opts.connections
        slots = SlotPool(SLOT_SIZE, 2 * workers + connections)
        options = PipelineOptions(cpu_workers=workers, connections=connections)
        try:
            async with WorkerPool(
                workers, initializer=cpu.init_worker, initargs=(self.repo.crypto,)
            ) as pool:

                async def decode_and_write(fetched: Fetched) -> _Outcome:
                    return await self._decode_and_write(pool, fetched, writes)

                async def account(outcome: _Outcome) -> None:
                    self._account(outcome, writes)

                await run_fetch_pipeline(
                    "restore",
                    batches,
                    download(self.repo.backend, slots, _DOWNLOAD_ERRORS),
                    downloads=connections,
                    work=("decode", decode_and_write, 2 * workers, DECODE_WRITE_HINT),
                    sink=("account", account),
                    options=options,
                    record=self._record_metrics,
                )
        finally:
            slots.close()

    def _record_metrics(self, snapshot: PipelineSnapshot) -> None:
        self.stats.pipeline = snapshot

    async def _decode_and_write(
        self, pool: WorkerPool, fetched: Fetched, writes: _Writes
    ) -> _Outcome:
        """The decode stage: one job in the pool decodes the downloaded range straight
        from its slot and writes every blob where it goes."""
        batch = fetched.batch
        if fetched.error is not None:
            return batch, None, fetched.error
        spans = [
            (loc.offset - batch.offset, loc.length, loc.type, blob_id, writes[blob_id])
            for loc, blob_id in batch.blobs
        ]
        try:
            result = await pool.run(
                cpu.decode_and_write, fetched.ref(), self.opts.target, spans, self.opts.sparse
            )
        except _WORKER_ERRORS as exc:
            return batch, None, exc
        return batch, result, None

    def _account(self, outcome: _Outcome, writes: _Writes) -> None:
        """The sink: count what was written, turn problems into per-entry errors."""
        batch, result, error = outcome
        if error is not None or result is None:
            # This pack range is lost or damaged: fail the files that need it, go on
            # with the others.
            for _loc, blob_id in batch.blobs:
                self._lost(batch.pack_id, blob_id, writes, " ".join(str(error).split()))
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
            self._lost(batch.pack_id, blob_id, writes, problem)

    def _lost(self, pack_id: bytes, blob_id: bytes, writes: _Writes, problem: str) -> None:
        why = f"data blob {blob_id.hex()} in pack {pack_id.hex()} could not be restored: {problem}"
        for dir_rel, name, _offset, _node in writes[blob_id]:
            self._fail(dir_rel + b"/" + name, why)

    def _fail(self, rel: bytes, problem: str) -> None:
        """The file's content is not restored: one error, and it is removed later."""
        if rel in self._failed:
            return
        self._failed[rel] = problem
        self.stats.files -= 1
        self._error(rel, problem)

    # -- metadata, delete, verify -----------------------------------------------

    def _finish_metadata(self) -> None:
        for existing, new in self._links:
            if existing in self._failed:
                self._error(new, self._failed[existing])
                continue
            try:
                self._link(existing, new)
            except OSError as exc:
                self._error(new, exc)
        for entry in self._others:
            if self._in_bad_dir(entry.rel):
                continue
            parent, name = split(entry.rel)
            try:
                parent_fd = self._dir_fd(parent)
                _clear(parent_fd, name)
                create_special(parent_fd, name, entry.node)
                self.stats.others += 1
            except OSError as exc:
                self._error(entry.rel, exc)
                continue
            if entry.node.type != "socket":
                self._warn(entry.rel, apply_metadata_at(parent_fd, name, entry.node))
        for entry in self._files:
            rel = entry.rel
            if rel in self._worker_done or rel in self._errored or self._in_bad_dir(rel):
                continue
            parent, name = split(rel)
            try:
                parent_fd = self._dir_fd(parent)
            except OSError as exc:
                self._error(rel, exc)
                continue
            if _lstat_at(parent_fd, name) is not None:
                self._warn(rel, apply_metadata_at(parent_fd, name, entry.node))
        for entry in sorted(self._dirs, key=lambda e: e.rel.count(b"/"), reverse=True):
            if entry.rel in self._errored or self._in_bad_dir(entry.rel):
                continue
            try:
                fd = self._dir_fd(entry.rel)
            except OSError as exc:
                self._error(entry.rel, exc)
                continue
            self._warn(entry.rel, apply_metadata_fd(fd, entry.node))

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

    def _delete_extra(self) -> None:
        """``--delete``: remove what the filters select in the target but the snapshot
        lacks, as restic does — only inside directories the plan walked (below the
        target root that the snapshot or ``SNAPSHOT:PATH`` maps to), only names their
        tree does not hold, and only paths the filters select. ``--dry-run`` counts."""
        for rel, names in self._visited:
            if self._in_bad_dir(rel):
                continue
            try:
                dir_fd = self._dir_fd(rel)
                present = sorted(map(os.fsencode, os.listdir(dir_fd)))
            except OSError:
                continue  # not there (dry run) or not a directory: nothing to delete
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

    def _verify(self) -> None:
        for entry in self._files:
            if entry.rel in self._errored or self._in_bad_dir(entry.rel):
                continue
            locations = self._locate(entry)
            if locations is None:
                continue
            parent, name = split(entry.rel)
            try:
                parent_fd = self._dir_fd(parent)
            except OSError as exc:
                self._error(entry.rel, exc)
                continue
            if not _content_matches(
                parent_fd, name, entry.node.content, locations, self.repo.crypto
            ):
                self._error(entry.rel, "verification failed: content differs")
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
