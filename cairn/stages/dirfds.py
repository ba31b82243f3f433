"""Directories below a restore target, reached through open file descriptors.

Restore never hands the kernel a path longer than one component: every file is
opened, created, linked or changed relative to its directory's descriptor
(``dir_fd=``), and each directory is opened relative to its parent with
``O_NOFOLLOW``. So a tree deeper than ``PATH_MAX`` restores into any target, and a
symlink planted in the target is never followed. The parent process and every
worker keep their own small cache of open directories.
"""

from __future__ import annotations

import os
from collections import OrderedDict

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Open directory descriptors kept per process. Restore visits a directory's files
# together (the plan groups them, packs mostly follow the backup's order), so a few
# dozen cover the working set; each miss costs one openat per missing component.
CACHE_SIZE = 64


def open_dir_path(path: bytes, *, create: bool = False) -> int:
    """Open the directory at absolute ``path`` one component at a time (following
    symlinks: the user may name the target through one), creating missing
    components when ``create``. Works for paths longer than ``PATH_MAX``."""
    fd = os.open(b"/", DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        for name in (p for p in path.split(b"/") if p):
            if create:
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
            child = os.open(name, DIR_FLAGS & ~os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class DirFds:
    """Descriptors of directories below ``root_fd``, by relative path (``b""`` is the
    root, ``b"/a/b"`` below it), opened component by component with ``O_NOFOLLOW``
    and kept in a small LRU. A descriptor stays valid until the next ``get``."""

    def __init__(self, root_fd: int, size: int = CACHE_SIZE) -> None:
        self.root = root_fd
        self._size = max(2, size)
        self._open: OrderedDict[bytes, int] = OrderedDict()

    def get(self, rel: bytes) -> int:
        if not rel:
            return self.root
        fd = self._open.get(rel)
        if fd is not None:
            self._open.move_to_end(rel)
            return fd
        # Walk up to the nearest open ancestor, then open down from it.
        missing: list[bytes] = []
        cur = rel
        base = self.root
        while cur:
            cached = self._open.get(cur)
            if cached is not None:
                self._open.move_to_end(cur)
                base = cached
                break
            cur, _, name = cur.rpartition(b"/")
            missing.append(name)
        for name in reversed(missing):
            cur = cur + b"/" + name
            base = os.open(name, DIR_FLAGS, dir_fd=base)
            self._put(cur, base)
        return base

    def _put(self, rel: bytes, fd: int) -> None:
        self._open[rel] = fd
        while len(self._open) > self._size:
            _, old = self._open.popitem(last=False)
            os.close(old)

    def forget(self, rel: bytes) -> None:
        """Close ``rel`` and everything cached below it (it is being replaced)."""
        for key in [k for k in self._open if k == rel or k.startswith(rel + b"/")]:
            os.close(self._open.pop(key))

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
        os.close(self.root)


def split(rel: bytes) -> tuple[bytes, bytes]:
    """``(directory, name)`` of a relative path such as ``b"/a/b/name"``."""
    parent, _, name = rel.rpartition(b"/")
    return parent, name
