"""The restore pipeline: plan → download packs → decode in workers → write → metadata.

* **plan** walks the snapshot's trees, decides per file whether it must be written
  (resume: a file whose content already matches is skipped), creates directories and
  empty, correctly sized files, and maps every needed blob to the places it goes;
* **download**: each pack is fetched once (ranged reads covering the blobs needed,
  split to fit a shared-memory slot), on ``connections`` tasks;
* **decode + write** happen in the worker processes straight from the slot: decrypt,
  decompress, verify the blob ID, then ``pwrite`` into every file (and offset) that
  needs the blob — plaintext never travels back through a pipe;
* **metadata** comes last: files, hardlinks, symlinks and special files, then
  directories deepest first (so a read-only directory is filled before it is locked).
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from cairn.backends.base import NotFound, ObjectTruncated, object_name
from cairn.pipeline.shm import SlotPool
from cairn.pipeline.workers import WorkerPool
from cairn.repo.errors import CorruptedObject, ObjectNotFound, RepoError
from cairn.repo.index import BlobLocation, Index
from cairn.repo.tree import Node, Tree
from cairn.stages import cpu
from cairn.stages.excludes import ExcludeRules
from cairn.stages.fsmeta import apply_metadata, create_special

log = structlog.get_logger("cairn.restore")

MiB = 1024 * 1024
# A download never spans more than this; it must hold the largest encoded blob
# (an incompressible 8 MiB chunk plus its envelope).
SLOT_SIZE = 8 * MiB + 64 * 1024
# Gaps between needed blobs smaller than this are downloaded rather than split
# into two requests (a request costs more than reading 1 MiB locally or remotely).
MERGE_GAP = 1 * MiB


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
    cpu_workers: int = 2
    connections: int = 4


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
    errors: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Entry:
    path: bytes  # target path
    rel: bytes  # path inside the snapshot (for filters and messages)
    node: Node


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
        self._visited: list[tuple[bytes, bytes, frozenset[bytes]]] = []
        self._failed: dict[bytes, str] = {}  # files whose data could not be restored
        self._worker_done: set[bytes] = set()  # created and finished by a worker
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
        """Walk the snapshot below ``tree_id`` into directories, files and others."""
        target = self.opts.target
        if node is not None and node.type != "dir":
            self._add_leaf(target.rstrip(b"/") + b"/" + node.name, b"/" + node.name, node)
            return
        assert tree_id is not None  # a directory always has a subtree
        stack: list[tuple[bytes, bytes, bytes]] = [(target, b"", tree_id)]
        while stack:
            path, rel, tid = stack.pop()
            tree: Tree = await self.repo.load_tree(tid)
            self._visited.append((path, rel, frozenset(n.name for n in tree.nodes)))
            for child in tree.nodes:
                cpath = path.rstrip(b"/") + b"/" + child.name
                crel = rel + b"/" + child.name
                if not self._wanted(crel, child.type == "dir"):
                    continue
                if child.type == "dir":
                    assert child.subtree is not None
                    self._dirs.append(_Entry(cpath, crel, child))
                    stack.append((cpath, crel, child.subtree))
                else:
                    self._add_leaf(cpath, crel, child)

    def _add_leaf(self, path: bytes, rel: bytes, node: Node) -> None:
        if node.type == "file":
            self._files.append(_Entry(path, rel, node))
        else:
            self._others.append(_Entry(path, rel, node))

    # -- the run --------------------------------------------------------------

    async def run(self) -> RestoreStats:
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
        return self.stats

    def _make_dirs(self) -> None:
        target = self.opts.target
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as exc:
            raise RestoreTargetError(
                f"cannot create target directory {os.fsdecode(target)}: {exc.strerror or exc}"
            ) from None
        if not os.access(target, os.W_OK | os.X_OK):
            why = (
                "read-only file system"
                if os.statvfs(target).f_flag & os.ST_RDONLY
                else "permission denied"
            )
            raise RestoreTargetError(
                f"cannot restore into {os.fsdecode(target)}: the directory is not writable ({why})"
            )
        # Parents come before children in self._dirs, so each component below the
        # target is checked (never followed if it is a symlink) before anything is
        # created inside it.
        for entry in self._dirs:
            try:
                _remove_non_dir(entry.path)
                os.makedirs(entry.path, mode=0o700, exist_ok=True)
                self.stats.dirs += 1
            except OSError as exc:
                self._error(entry.path, exc)

    def _prepare_files(self) -> dict[bytes, list[tuple[bytes, int, Node | None]]]:
        """Create files that must be written; return blob → [(path, offset)]."""
        writes: dict[bytes, list[tuple[bytes, int, Node | None]]] = defaultdict(list)
        seen_inodes: dict[tuple[int, int], bytes] = {}
        for entry in self._files:
            node = entry.node
            self.stats.bytes_total += node.size
            if node.links > 1:
                key = (node.device, node.inode)
                first = seen_inodes.get(key)
                if first is not None:
                    self._links.append((first, entry.path))
                    continue
                seen_inodes[key] = entry.path
            locations = self._locate(entry)
            if locations is None:
                continue
            if self._keep_existing(entry, locations):
                self.stats.files_skipped += 1
                continue
            self.stats.files += 1
            if self.opts.dry_run:
                continue
            if len(node.content) == 1 and not os.path.lexists(entry.path):
                # The common small file: the worker that writes its only blob creates
                # it (O_EXCL) and sets its metadata, so 20,000 file creations run in
                # the workers, in parallel, instead of one after another here.
                writes[node.content[0]].append((entry.path, 0, node))
                self._worker_done.add(entry.path)
                continue
            try:
                self._create_empty(entry.path, node.size)
            except OSError as exc:
                self._error(entry.path, exc)
                continue
            offset = 0
            for blob_id, loc in zip(node.content, locations, strict=True):
                writes[blob_id].append((entry.path, offset, None))
                offset += loc.raw_length
        return writes

    def _locate(self, entry: _Entry) -> list[BlobLocation] | None:
        out = []
        for blob_id in entry.node.content:
            loc = self.index.lookup(blob_id)
            if loc is None:
                self._error(
                    entry.path,
                    ObjectNotFound(f"data blob {blob_id.hex()} is missing from the repository"),
                )
                return None
            out.append(loc)
        return out

    def _keep_existing(self, entry: _Entry, locations: list[BlobLocation]) -> bool:
        """Whether an existing target file may stay as it is."""
        try:
            st = os.lstat(entry.path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        mode = self.opts.overwrite
        if mode == "never":
            return True
        if mode == "if-newer":
            return st.st_mtime_ns >= entry.node.mtime_ns
        if st.st_size != entry.node.size:
            return False
        if mode == "if-changed" and st.st_mtime_ns == entry.node.mtime_ns:
            return True
        return _content_matches(entry.path, entry.node.content, locations, self.repo.crypto)

    @staticmethod
    def _create_empty(path: bytes, size: int) -> None:
        # Whatever is in the way goes (never written through: it may be a symlink
        # or a hardlink to a file outside the target); a directory is an error.
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(21, "a directory is in the way", path)
            os.unlink(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            os.ftruncate(fd, size)  # holes until written: sparse for free
        finally:
            os.close(fd)

    # -- downloading and writing ----------------------------------------------

    def _batches(
        self, writes: dict[bytes, list[tuple[bytes, int, Node | None]]]
    ) -> list[tuple[bytes, list[Any]]]:
        """Group needed blobs per pack into downloads of at most one slot each."""
        per_pack: dict[bytes, list[tuple[BlobLocation, bytes]]] = defaultdict(list)
        for blob_id in writes:
            loc = self.index.lookup(blob_id)
            assert loc is not None
            per_pack[loc.pack_id].append((loc, blob_id))
        batches = []
        for pack_id, blobs in per_pack.items():
            blobs.sort(key=lambda b: b[0].offset)
            current: list[tuple[BlobLocation, bytes]] = []
            for loc, blob_id in blobs:
                if current:
                    start = current[0][0].offset
                    gap = loc.offset - (current[-1][0].offset + current[-1][0].length)
                    if loc.offset + loc.length - start > SLOT_SIZE or gap > MERGE_GAP:
                        batches.append((pack_id, current))
                        current = []
                current.append((loc, blob_id))
            if current:
                batches.append((pack_id, current))
        return batches

    async def _write_blobs(self, writes: dict[bytes, list[tuple[bytes, int, Node | None]]]) -> None:
        try:
            await self._write_batches(writes)
        finally:
            # A file some of whose data is lost is removed, not left zero-filled
            # with the snapshot's size and times (it would pass for restored).
            for path in self._failed:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    async def _write_batches(
        self, writes: dict[bytes, list[tuple[bytes, int, Node | None]]]
    ) -> None:
        batches = self._batches(writes)
        slots = SlotPool(SLOT_SIZE, 2 * self.opts.cpu_workers + self.opts.connections)
        tx, rx = anyio.create_memory_object_stream[tuple[bytes, list[Any]]](len(batches) or 1)
        for batch in batches:
            tx.send_nowait(batch)
        tx.close()
        try:
            async with (
                WorkerPool(
                    self.opts.cpu_workers,
                    initializer=cpu.init_worker,
                    initargs=(self.repo.crypto,),
                ) as pool,
                anyio.create_task_group() as tg,
            ):
                for _ in range(self.opts.connections):
                    tg.start_soon(self._downloader, rx.clone(), slots, pool, writes)
                rx.close()
        finally:
            slots.close()

    async def _downloader(
        self,
        rx: anyio.abc.ObjectReceiveStream[tuple[bytes, list[Any]]],
        slots: SlotPool,
        pool: WorkerPool,
        writes: dict[bytes, list[tuple[bytes, int, Node | None]]],
    ) -> None:
        async with rx:
            async for pack_id, blobs in rx:
                start = blobs[0][0].offset
                end = blobs[-1][0].offset + blobs[-1][0].length
                name = object_name("data", pack_id.hex())
                slot = await slots.acquire()
                try:
                    data = await self.repo.backend.load(name, start, end - start)
                    slot.view[: len(data)] = data
                    del data
                    spans = [
                        (loc.offset - start, loc.length, loc.type, blob_id, writes[blob_id])
                        for loc, blob_id in blobs
                    ]
                    written, problems = await pool.run(
                        cpu.decode_and_write, slot.ref(end - start), spans, self.opts.sparse
                    )
                    for path, problem in problems:
                        self.stats.errors.append((os.fsdecode(path), problem))
                except (NotFound, ObjectTruncated, ObjectNotFound, CorruptedObject) as exc:
                    # This pack range is lost or damaged: fail the files that need it,
                    # go on with the others.
                    self._lost(pack_id, blobs, writes, exc)
                    continue
                finally:
                    slot.release()
                self.stats.bytes_written += written

    def _lost(
        self,
        pack_id: bytes,
        blobs: list[tuple[BlobLocation, bytes]],
        writes: dict[bytes, list[tuple[bytes, int, Node | None]]],
        exc: Exception,
    ) -> None:
        problem = " ".join(str(exc).split())
        for _loc, blob_id in blobs:
            for path, _offset, _node in writes[blob_id]:
                if path in self._failed:
                    continue
                self._failed[path] = (
                    f"data blob {blob_id.hex()} in pack {pack_id.hex()} "
                    f"could not be restored: {problem}"
                )
                self.stats.files -= 1
                self._error(path, OSError(0, self._failed[path]))

    # -- metadata, delete, verify -----------------------------------------------

    def _finish_metadata(self) -> None:
        for existing, new in self._links:
            if existing in self._failed:
                self._error(new, OSError(0, self._failed[existing]))
                continue
            try:
                if os.path.lexists(new):
                    os.unlink(new)
                os.link(existing, new)
            except OSError as exc:
                self._error(new, exc)
        for entry in self._others:
            try:
                if os.path.lexists(entry.path):
                    if os.path.isdir(entry.path) and not os.path.islink(entry.path):
                        raise IsADirectoryError(21, "a directory is in the way", entry.path)
                    os.unlink(entry.path)
                create_special(entry.path, entry.node)
                self.stats.others += 1
            except OSError as exc:
                self._error(entry.path, exc)
                continue
            self._apply(entry)
        for entry in self._files:
            if entry.path not in self._worker_done and os.path.lexists(entry.path):
                self._apply(entry)
        for entry in sorted(self._dirs, key=lambda e: e.path.count(b"/"), reverse=True):
            self._apply(entry)

    def _apply(self, entry: _Entry) -> None:
        if entry.node.type == "socket":
            return
        for problem in apply_metadata(entry.path, entry.node):
            self.stats.errors.append((os.fsdecode(entry.path), problem))

    def _delete_extra(self) -> None:
        """``--delete``: remove what the filters select in the target but the snapshot
        lacks, as restic does — only inside directories the plan walked (below the
        target root that the snapshot or ``SNAPSHOT:PATH`` maps to), only names their
        tree does not hold, and only paths the filters select. ``--dry-run`` counts."""
        for path, rel, names in self._visited:
            # The target itself may be reached through a symlink the user gave.
            flags = _DIR_FLAGS if rel else _DIR_FLAGS & ~os.O_NOFOLLOW
            try:
                dir_fd = os.open(path, flags)
            except OSError:
                continue  # not there (dry run) or not a directory: nothing to delete
            try:
                for name in sorted(map(os.fsencode, os.listdir(dir_fd))):
                    if name in names or not self._selected(rel + b"/" + name):
                        continue
                    child = path.rstrip(b"/") + b"/" + name
                    try:
                        self._remove_all(dir_fd, name, child)
                    except OSError as exc:
                        self._error(child, exc)
            finally:
                os.close(dir_fd)

    def _remove_all(self, dir_fd: int, name: bytes, path: bytes) -> None:
        """Remove ``name`` (a whole directory tree, never following a symlink)."""
        st = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                for child in sorted(map(os.fsencode, os.listdir(fd))):
                    self._remove_all(fd, child, path + b"/" + child)
            finally:
                os.close(fd)
            if not self.opts.dry_run:
                os.rmdir(name, dir_fd=dir_fd)
        elif not self.opts.dry_run:
            os.unlink(name, dir_fd=dir_fd)
        self.stats.deleted += 1
        self.stats.deleted_paths.append(os.fsdecode(path))

    def _verify(self) -> None:
        for entry in self._files:
            locations = self._locate(entry)
            if locations is None:
                continue
            if not _content_matches(entry.path, entry.node.content, locations, self.repo.crypto):
                self.stats.errors.append(
                    (os.fsdecode(entry.path), "verification failed: content differs")
                )
            else:
                self.stats.verified += 1

    def _error(self, path: bytes, exc: BaseException) -> None:
        text = os.fsdecode(path)
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.stats.errors.append((text, problem))
        log.warning("restore.file_error", path=text, error=problem)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _remove_non_dir(path: bytes) -> None:
    """Unlink whatever non-directory (a symlink above all) is at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)


def _content_matches(
    path: bytes, content: list[bytes], locations: list[BlobLocation], crypto: Any
) -> bool:
    """Whether the file at ``path`` holds exactly the blobs of ``content``."""
    try:
        with open(path, "rb", buffering=0) as f:
            for blob_id, loc in zip(content, locations, strict=True):
                data = f.read(loc.raw_length)
                if len(data) != loc.raw_length or crypto.blob_id(data) != blob_id:
                    return False
            return f.read(1) == b""
    except OSError:
        return False
