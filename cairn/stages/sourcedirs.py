"""Directories of a backup source, reached through open file descriptors.

Backup never hands the kernel a path longer than one component: every directory is
opened relative to its parent's descriptor (``O_NOFOLLOW``), and every entry is
listed, stat'ed, read and its link target and xattrs fetched relative to its
directory's descriptor. So a tree deeper than ``PATH_MAX`` backs up completely, and
a directory swapped for a symlink during the walk is never followed: the open fails
(``O_NOFOLLOW``), and a directory swapped for another one is caught by comparing
the inode and device with what the scan of its parent saw.

The descriptors are ``O_PATH``: opening one needs exactly the permissions a path
lookup needs (search permission on the way, nothing on the directory itself), as
the path-based walk did. Reading a directory's entries opens it once more for
reading (:func:`cairn.stages.walk.scan_dir`).

Reader and scanner threads share one cache. A descriptor in use is pinned and never
closed under its user; idle ones are kept in a small LRU, so the number open stays
bounded whatever the size and shape of the tree.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TypeVar

from cairn.repo.tree import Node
from cairn.stages.dirfds import open_dir_path

PATH_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Idle directory descriptors kept open. The walk scans breadth-first with a few
# tasks and the readers trail it by at most a few hundred files (the file queue
# and their batches), so the directories in use at any time are few; every miss
# costs one openat per missing ancestor. 64 is restore's choice too (dirfds.py).
# Under a low descriptor limit (``ulimit -n``) it shrinks to a sixteenth of it.
CACHE_SIZE = 64


def default_size() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return CACHE_SIZE
    return max(2, min(CACHE_SIZE, soft // 16))


T = TypeVar("T")


class SourceDir(Protocol):
    """What the cache needs of a directory of the walk (backup's ``_Dir``)."""

    @property
    def path(self) -> bytes: ...  # absolute, for messages (and the root's open)

    @property
    def node(self) -> Node | None: ...  # None for the root, opened by path

    @property
    def parent(self) -> SourceDir | None: ...


class ReplacedError(OSError):
    """A directory was replaced by something else after its parent was scanned."""


def dir_problem(exc: OSError) -> str:
    """The one-line reason a directory could not be opened or listed."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return "replaced by a non-directory during the backup; not followed"
    return exc.strerror or str(exc)


class SourceDirs:
    """Open ``O_PATH`` descriptors of walk directories, keyed by the directory
    object; thread-safe. ``acquire`` pins a descriptor until ``release``."""

    def __init__(self, size: int | None = None) -> None:
        self._size = max(2, default_size() if size is None else size)
        self._lock = threading.Lock()
        self._fds: dict[SourceDir, int] = {}
        self._pins: dict[SourceDir, int] = {}
        self._idle: OrderedDict[SourceDir, None] = OrderedDict()
        #: Directories opened (hits are not counted): for tests and tuning.
        self.opened = 0

    def acquire(self, d: SourceDir) -> int:
        with self._lock:
            return self._acquire(d)

    @property
    def size(self) -> int:
        """Idle descriptors kept (the cache size)."""
        return self._size

    def acquire_open(self, d: SourceDir) -> int | None:
        """Pin ``d``'s descriptor if it is open already (no system call: safe on the
        event loop); None if it would have to be opened."""
        with self._lock:
            if d not in self._fds:
                return None
            return self._acquire(d)

    def release(self, d: SourceDir) -> None:
        with self._lock:
            self._release(d)

    def run_at(self, d: SourceDir, fn: Callable[..., T], *args: object) -> T:
        """``fn(dir_fd, *args)`` with ``d``'s descriptor pinned (thread side)."""
        fd = self.acquire(d)
        try:
            return fn(fd, *args)
        finally:
            self.release(d)

    def forget(self, d: SourceDir) -> None:
        """Close ``d``'s descriptor if it is idle: the walk is done with it."""
        with self._lock:
            if d in self._idle:
                del self._idle[d]
                os.close(self._fds.pop(d))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._pins.clear()
            self._idle.clear()

    def __len__(self) -> int:
        return len(self._fds)

    # -- with the lock held ---------------------------------------------------------

    def _acquire(self, d: SourceDir) -> int:
        fd = self._fds.get(d)
        if fd is None:
            fd = self._open(d)
            self._fds[d] = fd
            self.opened += 1
        else:
            self._idle.pop(d, None)
        self._pins[d] = self._pins.get(d, 0) + 1
        return fd

    def _release(self, d: SourceDir) -> None:
        pins = self._pins.pop(d) - 1
        if pins:
            self._pins[d] = pins
            return
        self._idle[d] = None
        self._close_idle(keep=self._size)

    def _close_idle(self, keep: int) -> None:
        while len(self._idle) > keep:
            old, _ = self._idle.popitem(last=False)
            os.close(self._fds.pop(old))

    def _open(self, d: SourceDir) -> int:
        parent, node = d.parent, d.node
        if parent is None or node is None:
            return open_dir_path(d.path)
        # A symlink above a given path is followed (backup's _walk_virtual); nothing
        # below the given paths is.
        flags = PATH_DIR_FLAGS & ~os.O_NOFOLLOW if getattr(d, "follow", False) else PATH_DIR_FLAGS
        parent_fd = self._acquire(parent)
        try:
            try:
                fd = os.open(node.name, flags, dir_fd=parent_fd)
            except OSError as exc:
                if exc.errno != errno.EMFILE or not self._idle:
                    raise
                # Out of descriptors (other parts of the process hold some too):
                # give back the idle ones and try once more.
                self._close_idle(keep=0)
                fd = os.open(node.name, flags, dir_fd=parent_fd)
        finally:
            self._release(parent)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if (st.st_ino, st.st_dev) != (node.inode, node.device) or not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise ReplacedError(errno.ESTALE, "replaced by another directory during the backup")
        return fd
