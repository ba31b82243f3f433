"""The local backend: a repository in a directory on a mounted filesystem."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread

from cairn.backends.base import (
    KINDS,
    BackendError,
    NotFound,
    ObjectTruncated,
    PermissionDenied,
    QuotaExceeded,
    TransientError,
    spooled_descriptor,
    validate_name,
    validate_prefix,
)

T = TypeVar("T")

# Local disks serve a few parallel writers well; more only adds seek contention.
DEFAULT_CONNECTIONS = 4


def _translate(exc: OSError, name: str) -> BackendError:
    """Map an OSError onto the backend error hierarchy, naming the object."""
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{name}: not found")
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"{name}: permission denied")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return QuotaExceeded(f"{name}: no space left on device")
    if exc.errno in (errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT):
        return TransientError(f"{name}: {exc.strerror}")
    return BackendError(f"{name}: {exc.strerror or exc}")


class LocalBackend:
    """Objects as files under ``root``; atomic by temp file, fsync and rename."""

    def __init__(self, root: str | os.PathLike[str], connections: int = DEFAULT_CONNECTIONS):
        self._root = Path(root).absolute()
        self._connections = connections
        self._limiter = anyio.CapacityLimiter(connections)

    @property
    def location(self) -> str:
        return f"local:{self._root}"

    @property
    def root(self) -> Path:
        return self._root

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def atomic_replace(self) -> bool:
        return True

    @property
    def spool_dir(self) -> str:
        """Packs are assembled here, on the repository's own filesystem: a finished
        one is linked into place, not copied (``_write_atomic``)."""
        return str(self._root / "data")

    def _path(self, name: str) -> Path:
        return self._root / validate_name(name)

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        # Blocking file I/O runs in worker threads, as many as ``connections``.
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    async def save(self, name: str, data: bytes | memoryview) -> None:
        path = self._path(name)
        try:
            await self._run(_write_atomic, path, data)
        except OSError as exc:
            raise _translate(exc, name) from exc

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            data: bytes = await self._run(_read_range, path, offset, length)
        except OSError as exc:
            raise _translate(exc, name) from exc
        if length is not None and len(data) != length:
            raise ObjectTruncated(
                f"{name}: asked for {length} bytes at offset {offset}, object is shorter"
            )
        return data

    async def stat(self, name: str) -> int:
        path = self._path(name)
        try:
            st = await self._run(os.stat, path)
        except OSError as exc:
            raise _translate(exc, name) from exc
        return int(st.st_size)

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        validate_prefix(prefix)
        try:
            entries: list[tuple[str, int]] = await self._run(_walk, self._root, prefix)
        except OSError as exc:
            raise _translate(exc, prefix) from exc
        for entry in entries:
            yield entry

    async def remove(self, name: str) -> None:
        path = self._path(name)
        try:
            await self._run(os.unlink, path)
        except OSError as exc:
            raise _translate(exc, name) from exc

    async def create_layout(self) -> None:
        """Create the repository directories (idempotent; ``init`` checks for config)."""
        try:
            await self._run(_make_layout, self._root)
        except OSError as exc:
            raise _translate(exc, str(self._root)) from exc

    async def aclose(self) -> None:
        return None


def _make_layout(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for kind in ("keys", "snapshots", "index", "locks"):
        (root / kind).mkdir(exist_ok=True)
    data = root / "data"
    data.mkdir(exist_ok=True)
    for i in range(256):
        (data / f"{i:02x}").mkdir(exist_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory.

    A pack spooled in this repository's own directory (``spool_dir``) is not
    copied: its unnamed file is linked in as the temp file."""
    parent = path.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{path.name}-{secrets.token_hex(6)}"
    spooled = spooled_descriptor(data)
    try:
        if spooled is not None and _link_spooled(spooled, tmp):
            os.fsync(spooled)
        else:
            _write_new(tmp, data)
        # Objects are immutable once written: read-only like restic's.
        os.chmod(tmp, 0o400)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(parent)


def _write_new(path: Path, data: bytes | memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_spooled(fd: int, tmp: Path) -> bool:
    """Give the spooled pack file open as ``fd`` the name ``tmp`` (``linkat`` of an
    ``O_TMPFILE``); False where that cannot be done (another filesystem, no
    ``/proc``): the caller then writes the bytes."""
    # Only linkat() with AT_SYMLINK_FOLLOW resolves the /proc link to the file
    # (plain link() would try to link the symlink itself): Python calls linkat
    # when a directory descriptor is given.
    dir_fd = os.open(tmp.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", tmp.name, dst_dir_fd=dir_fd, follow_symlinks=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
        return False
    finally:
        os.close(dir_fd)
    return True


def _read_range(path: Path, offset: int, length: int | None) -> bytes:
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        return f.read() if length is None else f.read(length)


def _walk(root: Path, prefix: str) -> list[tuple[str, int]]:
    """Objects under ``prefix``; only layout names, never temporary files."""
    out: list[tuple[str, int]] = []
    if prefix == "":
        try:
            out.append(("config", os.stat(root / "config").st_size))
        except FileNotFoundError:
            pass
        for kind in KINDS:
            out.extend(_walk(root, f"{kind}/"))
        return out
    base = root / prefix.rstrip("/")
    if not base.is_dir():
        return out
    for dirpath, _dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for fname in filenames:
            if fname.startswith("."):
                continue
            try:
                size = os.stat(os.path.join(dirpath, fname)).st_size
            except FileNotFoundError:  # removed while we listed
                continue
            out.append((f"{rel}/{fname}", size))
    return out


# --- stale temporary files (used by prune; separate from the Backend protocol) ----


async def remove_stale_temporaries(backend: LocalBackend, max_age_seconds: float) -> list[str]:
    """Remove ``.tmp-*`` files older than ``max_age_seconds`` anywhere in the
    repository; return their paths relative to the root.

    A process killed between writing a temporary file and renaming it (SIGKILL,
    power loss) leaves one behind, and ``list`` never shows it. The caller holds
    the exclusive lock; the age keeps a file another (unlocked) writer is still
    filling safe, since writing updates its modification time.
    """
    return await backend._run(_remove_stale_temporaries, backend.root, max_age_seconds)


def _remove_stale_temporaries(root: Path, max_age_seconds: float) -> list[str]:
    import time

    cutoff = time.time() - max_age_seconds
    removed = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            if not fname.startswith(".tmp-"):
                continue
            path = os.path.join(dirpath, fname)
            try:
                if os.lstat(path).st_mtime >= cutoff:
                    continue
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(removed)
