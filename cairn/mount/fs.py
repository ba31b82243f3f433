"""The FUSE operations of ``cairn mount``: a read-only view of the layout and trees.

Inodes are handed out as the kernel meets entries (lookup, readdirplus) and dropped
when it forgets them, so memory follows what is being browsed, not the repository.
An entry's inode is keyed by where it is: the layout directories by path, snapshot
contents by (parent inode, name) — except files with several hard links, keyed by
(snapshot, device, inode) as restic does, so that ``tar``/``cp -a``/``find -samefile``
see the links as links.

Snapshot contents never change: their attributes and names are cached by the kernel
for a long time and opened files keep the page cache. The layout changes when
snapshots are added or forgotten: its entries are cached for a second, and the
snapshot list is reloaded when a layout directory is opened (at most every
``refresh_seconds``).

Every request's failure becomes an errno: a blob that cannot be read is ``EIO`` (and
one log line per pack, :mod:`cairn.mount.blobs`); anything unexpected is ``EIO`` and
a ``mount.request_failed`` line. The mount keeps serving.
"""

from __future__ import annotations

import bisect
import errno
import functools
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import pyfuse3
import structlog

from cairn.mount.blobs import BlobSource, BlobUnavailable
from cairn.mount.layout import Link, MetaDir, SnapshotDir
from cairn.mount.listing import DecodedTrees, SnapshotLayout
from cairn.repo.errors import CorruptedObject, ObjectNotFound
from cairn.repo.tree import Node

if TYPE_CHECKING:
    from cairn.repo.repository import Repository
    from cairn.stages.snapshots import SnapshotFilter

log = structlog.get_logger("cairn.mount")

T = TypeVar("T")
P = ParamSpec("P")

_TYPE_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
    "socket": stat.S_IFSOCK,
}
# Snapshot contents are immutable: let the kernel keep names and attributes.
CONTENT_TIMEOUT = 300.0
# The layout changes when snapshots come and go.
LAYOUT_TIMEOUT = 1.0
# Decoded trees kept, counted in entries (a node is a few hundred bytes).
TREE_CACHE_NODES = 200_000
# Read ahead only this far (bytes) past the read, in ranges of at most this size:
# smaller ranges decode in parallel threads and the first arrives sooner.
READ_AHEAD_SPAN = 4 * 1024 * 1024
# Files opened one after another in name order (cp -r, tar, find -exec cat, rsync)
# get the content of at most this many following files fetched ahead.
READ_AHEAD_FILES = 64


@dataclass(slots=True, eq=False)
class Entry:
    """What an inode shows: a layout directory or link (by ``path``), or a node."""

    key: tuple[Any, ...]
    parent: int
    path: tuple[bytes, ...] = ()  # layout entries: their path from the root
    node: Node | None = None  # snapshot contents and snapshot directories
    root: int = 0  # the inode of the snapshot directory this node is in
    lookups: int = 0


@dataclass(slots=True, eq=False)
class OpenFile:
    """An open file: where each blob starts, and where the last read ended."""

    ids: list[bytes]
    starts: list[int]
    size: int
    expected: int = 0  # offset of a sequential next read


@dataclass(slots=True, eq=False)
class OpenDir:
    """An open directory: its entries as they were when it was opened."""

    ino: int
    names: list[bytes]
    nodes: list[Node] | None = None  # snapshot contents
    meta: MetaDir | None = None  # layout
    entries: list[Any] = field(default_factory=list)


def _fuse_errors(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn any failure into an errno: pyfuse3 answers only ``FUSEError`` (anything
    else would leave the kernel's request unanswered)."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except BlobUnavailable:
            raise pyfuse3.FUSEError(errno.EIO) from None  # logged once per pack
        except (CorruptedObject, ObjectNotFound) as exc:
            log.error("mount.request_failed", request=method.__name__, error=str(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            log.error("mount.request_failed", request=method.__name__, error=problem)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class MountFS(pyfuse3.Operations):
    """A read-only filesystem of a repository's snapshots."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        repo: Repository,
        blobs: BlobSource,
        snapshot_filter: SnapshotFilter,
        *,
        read_ahead: int,
        refresh_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._repo = repo
        self._blobs = blobs
        self._read_ahead = read_ahead
        self._uid, self._gid = os.getuid(), os.getgid()
        self.snapshots = SnapshotLayout(repo, snapshot_filter, refresh_seconds, clock)
        root = Entry(("meta", ()), pyfuse3.ROOT_INODE, lookups=1)
        self._entries: dict[int, Entry] = {pyfuse3.ROOT_INODE: root}
        self._by_key: dict[tuple[Any, ...], int] = {root.key: pyfuse3.ROOT_INODE}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._trees = DecodedTrees(repo, TREE_CACHE_NODES)
        self._files: dict[int, OpenFile] = {}
        self._opened_in: dict[int, int] = {}  # directory inode -> index of last file opened
        self.reads = 0  # read requests answered, and their bytes
        self.read_bytes = 0
        self._dirs: dict[int, OpenDir] = {}
        self._next_fh = 1

    # --- inodes ----------------------------------------------------------------------

    def _entry(self, ino: int) -> Entry:
        entry = self._entries.get(ino)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return entry

    def _intern(self, key: tuple[Any, ...], make: Callable[[], Entry]) -> int:
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._entries[ino] = make()
            self._by_key[key] = ino
        return ino

    def _child(self, parent_ino: int, parent: Entry, name: bytes, what: Any) -> int:
        """The inode of ``name`` in ``parent``: ``what`` is a layout entry or a Node."""
        if isinstance(what, Node):
            root = parent.root
            if what.type == "file" and what.links > 1:
                key: tuple[Any, ...] = ("hard", root, what.device, what.inode)
            else:
                key = ("node", parent_ino, name)
            return self._intern(key, lambda: Entry(key, parent_ino, node=what, root=root))
        path = (*parent.path, name)
        if isinstance(what, SnapshotDir):
            key = ("snap", path, what.id)
            ino = self._by_key.get(key)
            if ino is None:
                ino = self._intern(key, lambda: Entry(key, parent_ino, path, self._root_node(what)))
                self._entries[ino].root = ino  # the scope of its hard links
            return ino
        key = ("link" if isinstance(what, Link) else "meta", path)
        return self._intern(key, lambda: Entry(key, parent_ino, path))

    def _root_node(self, where: SnapshotDir) -> Node:
        """A snapshot's directory: its tree, read-only, owned by whoever mounted,
        dated with the snapshot (restic shows it so)."""
        snap = where.snapshot
        return Node(
            "dir",
            b"",
            mode=0o555,
            uid=self._uid,
            gid=self._gid,
            mtime_ns=snap.time_ns,
            atime_ns=snap.time_ns,
            ctime_ns=snap.time_ns,
            links=2,
            subtree=snap.tree,
        )

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            entry = self._entries.get(ino)
            if entry is None or ino == pyfuse3.ROOT_INODE:
                continue
            entry.lookups -= count
            if entry.lookups <= 0:
                del self._entries[ino]
                self._by_key.pop(entry.key, None)
                self._opened_in.pop(ino, None)

    # --- attributes ------------------------------------------------------------------

    def _attributes(self, ino: int, entry: Entry) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_blksize = 128 * 1024
        node = entry.node
        if node is not None:
            attr.st_mode = _TYPE_BITS[node.type] | node.mode
            attr.st_nlink = max(1, node.links)
            attr.st_uid, attr.st_gid = node.uid, node.gid
            attr.st_rdev = node.rdev
            size = len(node.link_target) if node.type == "symlink" else node.size
            attr.st_size = size
            attr.st_blocks = (size + 511) // 512
            attr.st_mtime_ns, attr.st_atime_ns = node.mtime_ns, node.atime_ns
            attr.st_ctime_ns = node.ctime_ns
            timeout = LAYOUT_TIMEOUT if entry.key[0] == "snap" else CONTENT_TIMEOUT
        else:
            what = self.snapshots.resolve(entry.path)
            if what is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_uid, attr.st_gid = self._uid, self._gid
            if isinstance(what, Link):
                attr.st_mode = stat.S_IFLNK | 0o777
                attr.st_size = len(what.target)
                stamp = what.time_ns
            else:
                attr.st_mode = stat.S_IFDIR | 0o555
                stamp = what.time_ns if isinstance(what, MetaDir) else 0
            attr.st_nlink = 1 if isinstance(what, Link) else 2
            attr.st_mtime_ns = attr.st_atime_ns = attr.st_ctime_ns = stamp
            timeout = LAYOUT_TIMEOUT
        attr.attr_timeout = attr.entry_timeout = timeout
        return attr

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode, self._entry(inode))

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._entry(parent_inode)
        what: Any
        if parent.node is not None:
            if parent.node.type != "dir":
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            nodes = await self._trees.nodes(parent.node)
            i = bisect.bisect_left(nodes, name, key=lambda n: n.name)
            if i == len(nodes) or nodes[i].name != name:
                raise pyfuse3.FUSEError(errno.ENOENT)
            what = nodes[i]
        else:
            meta = self.snapshots.resolve(parent.path)
            if not isinstance(meta, MetaDir):
                raise pyfuse3.FUSEError(errno.ENOENT)
            if parent_inode == pyfuse3.ROOT_INODE or not meta.entries:
                await self.snapshots.refresh_listed()
                meta = self.snapshots.resolve(parent.path)
            what = meta.entries.get(name) if isinstance(meta, MetaDir) else None
            if what is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self._child(parent_inode, parent, name, what)
        entry = self._entries[ino]
        entry.lookups += 1
        return self._attributes(ino, entry)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        entry = self._entry(inode)
        if entry.node is not None:
            if entry.node.type != "symlink":
                raise pyfuse3.FUSEError(errno.EINVAL)
            return entry.node.link_target
        what = self.snapshots.resolve(entry.path)
        if not isinstance(what, Link):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return what.target

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        node = self._entry(inode).node
        value = node.xattrs.get(name) if node is not None else None
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: Any = None) -> Sequence[bytes]:
        node = self._entry(inode).node
        return list(node.xattrs) if node is not None else []

    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # --- directories -----------------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        entry = self._entry(inode)
        handle: OpenDir
        if entry.node is not None:
            if entry.node.type != "dir":
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            nodes = await self._trees.nodes(entry.node)
            handle = OpenDir(inode, [n.name for n in nodes], nodes=nodes)
        else:
            await self.snapshots.refresh_listed()  # listing the layout shows new snapshots
            meta = self.snapshots.resolve(entry.path)
            if not isinstance(meta, MetaDir):
                raise pyfuse3.FUSEError(errno.ENOENT)
            names = sorted(meta.entries)
            handle = OpenDir(inode, names, meta=meta, entries=[meta.entries[n] for n in names])
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = handle
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        parent = self._entry(handle.ino)
        # "." and ".." first (offsets 1 and 2); the kernel counts no lookup for them.
        for offset, (name, ino) in enumerate(((b".", handle.ino), (b"..", parent.parent)), 1):
            if start_id < offset:
                up = self._entries.get(ino, parent)
                if not pyfuse3.readdir_reply(token, name, self._attributes(ino, up), offset):
                    return
        items = handle.nodes if handle.nodes is not None else handle.entries
        for i in range(max(0, start_id - 2), len(items)):
            name = handle.names[i]
            ino = self._child(handle.ino, parent, name, items[i])
            entry = self._entries[ino]
            if not pyfuse3.readdir_reply(token, name, self._attributes(ino, entry), i + 3):
                if entry.lookups == 0:  # not handed out after all
                    del self._entries[ino]
                    self._by_key.pop(entry.key, None)
                return
            entry.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- files -----------------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._entry(inode).node
        if node is None or node.type != "file":
            raise pyfuse3.FUSEError(errno.EISDIR if node is None else errno.EINVAL)
        starts = []
        pos = 0
        for blob_id in node.content:
            loc = self._blobs.locate(blob_id)
            if loc is None:
                log.error(
                    "mount.blob_missing",
                    blob=blob_id.hex(),
                    file=node.name.decode("utf-8", "backslashreplace"),
                )
                raise pyfuse3.FUSEError(errno.EIO)
            starts.append(pos)
            pos += loc.raw_length
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = OpenFile(list(node.content), starts, pos)
        await self._ahead_in_directory(self._entry(inode).parent, node)
        # The content never changes: the kernel may keep its pages across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files[fh]
        end = min(off + size, handle.size)
        if off >= end:
            return b""
        first = bisect.bisect_right(handle.starts, off) - 1
        ahead: list[bytes] = []
        if off == handle.expected:
            ahead = self._ahead(handle, first, end)
        handle.expected = end
        parts = []
        pos, i = off, first
        while pos < end:
            data = await self._blobs.get(handle.ids[i], ahead if i == first else ())
            start = pos - handle.starts[i]
            take = min(end - pos, len(data) - start)
            if take <= 0:
                raise BlobUnavailable("?", f"blob {handle.ids[i].hex()} is shorter than indexed")
            parts.append(memoryview(data)[start : start + take])
            pos += take
            i += 1
        self.reads += 1
        self.read_bytes += end - off
        if len(parts) == 1:
            # pyfuse3 replies from any contiguous buffer: a read inside one blob (most
            # are) is sent from the cached blob without a copy.
            return cast(bytes, parts[0])
        return b"".join(parts)

    def _ahead(self, handle: OpenFile, first: int, end: int) -> list[bytes]:
        """The blobs after the one being read, up to ``read_ahead`` bytes past ``end``."""
        limit = end + self._read_ahead
        last = bisect.bisect_left(handle.starts, limit)
        return handle.ids[first + 1 : max(first + 1, last)]

    async def _ahead_in_directory(self, parent_ino: int, node: Node) -> None:
        """Files opened in name order: fetch the next files' content ahead (up to
        ``read_ahead`` bytes, ``READ_AHEAD_FILES`` files) — one ranged read fetches many
        small files that sit together in a pack."""
        parent = self._entries.get(parent_ino)
        if self._read_ahead <= 0 or parent is None or parent.node is None:
            return
        nodes = await self._trees.nodes(parent.node)
        i = bisect.bisect_left(nodes, node.name, key=lambda n: n.name)
        if i == len(nodes) or nodes[i].name != node.name:
            return
        last = self._opened_in.get(parent_ino)
        self._opened_in[parent_ino] = i
        if last is not None and last != i - 1:
            return  # not in order: no guessing
        wanted: list[bytes] = []
        budget = self._read_ahead
        for following in nodes[i + 1 : i + 1 + READ_AHEAD_FILES]:
            if following.type != "file":
                continue
            if following.size > budget:
                break
            budget -= following.size
            wanted += following.content
        self._blobs.prefetch(wanted)

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)
