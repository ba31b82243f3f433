"""The local metadata cache: index files, snapshots and tree packs kept on disk.

Browsing commands and a backup's index and parent-tree loads read the same few
objects again and again; over a remote backend each read is a round trip. Those
objects are immutable and named by the hash of their stored (encrypted) bytes, so a
copy on disk is as good as the original once its hash is checked::

    $XDG_CACHE_HOME/cairn/<repository id>/     (default ~/.cache/cairn/..., --cache-dir)
        index/<xx>/<id>        sealed index files, by storage ID
        snapshots/<xx>/<id>    sealed snapshots, by storage ID
        data/<xx>/<pack id>    whole tree packs (packs hold one blob type only)

Every entry is verified when read (the BLAKE3 storage ID of its bytes against its
name); a mismatch drops the entry and the caller fetches it from the backend again.
Entries whose object is no longer on the backend are dropped when the repository lists that
kind (``drop_stale``). Entries are written to a temporary name and renamed, so a
crashed or concurrent process never leaves a partial entry under a real name.

Tree packs verified once are also kept in memory for the rest of the run, so that
walking thousands of trees of one pack hashes it once, not once per tree.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import structlog

from cairn.backends.base import is_hex_id
from cairn.repo.crypto import storage_id

#: The object kinds the cache holds (backend directory names).
CACHED_KINDS = ("index", "snapshots", "data")
#: Verified tree packs kept in memory for the rest of the run.
MAX_MEMORY_BYTES = 256 * 1024 * 1024

_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by cairn.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)

log = structlog.get_logger("cairn.cache")


def default_cache_root(env: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/cairn``, else ``~/.cache/cairn`` (per the XDG base dir spec)."""
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "cairn"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".cache" / "cairn"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # entries whose bytes did not match their name (dropped)
    stored: int = 0
    dropped: int = 0  # stale entries removed by drop_stale


class MetadataCache:
    """One repository's cache directory; see the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stats = CacheStats()
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_bytes = 0

    @classmethod
    def open(cls, root: Path, repo_id: str) -> MetadataCache:
        """The cache of repository ``repo_id`` under ``root``; created if missing."""
        if not is_hex_id(repo_id):
            raise ValueError(f"not a repository ID: {repo_id!r}")
        root.mkdir(parents=True, exist_ok=True)
        tag = root / "CACHEDIR.TAG"
        if not tag.exists():
            _write_atomic(tag, _TAG.encode())
        directory = root / repo_id
        for kind in CACHED_KINDS:
            (directory / kind).mkdir(parents=True, exist_ok=True)
        # The directory's mtime says when the repository was last used from this
        # machine: ``cairn cache`` and --cleanup-cache go by it (as restic's do).
        os.utime(directory)
        return cls(directory)

    def path(self, kind: str, object_id: str) -> Path:
        if kind not in CACHED_KINDS or not is_hex_id(object_id):
            raise ValueError(f"not a cacheable object: {kind}/{object_id}")
        return self.directory / kind / object_id[:2] / object_id

    # --- reading and writing ---------------------------------------------------------

    async def load(self, kind: str, object_id: str) -> bytes | None:
        """The verified cached bytes of ``kind/object_id``, or None (miss or corrupt)."""
        if kind == "data":
            held = self._memory.get(object_id)
            if held is not None:
                self._memory.move_to_end(object_id)
                self.stats.hits += 1
                return held
        data = await anyio.to_thread.run_sync(self._read_verified, kind, object_id)
        if data is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        if kind == "data":
            self._remember(object_id, data)
        return data

    def _read_verified(self, kind: str, object_id: str) -> bytes | None:
        path = self.path(kind, object_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache.unreadable", path=str(path), error=str(exc))
            return None
        if storage_id(data) != object_id:
            self.stats.corrupt += 1
            log.warning("cache.corrupt_entry", kind=kind, id=object_id, bytes=len(data))
            _unlink(path)
            return None
        return data

    async def save(self, kind: str, object_id: str, data: bytes | memoryview) -> None:
        """Keep ``data`` (already verified by the caller) as ``kind/object_id``.

        A cache that cannot be written is not an error: the run goes on without it.
        """
        path = self.path(kind, object_id)
        try:
            await anyio.to_thread.run_sync(_write_atomic, path, data)
        except OSError as exc:
            log.warning("cache.write_failed", path=str(path), error=str(exc))
            return
        self.stats.stored += 1

    def remember(self, pack_id: str, data: bytes) -> None:
        """Hold a verified tree pack in memory for the rest of the run (bounded)."""
        self._remember(pack_id, data)

    def _remember(self, pack_id: str, data: bytes) -> None:
        if pack_id in self._memory or len(data) > MAX_MEMORY_BYTES:
            return
        self._memory[pack_id] = data
        self._memory_bytes += len(data)
        while self._memory_bytes > MAX_MEMORY_BYTES:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)

    # --- housekeeping ----------------------------------------------------------------

    def cached_ids(self, kind: str) -> set[str]:
        """IDs with an entry on disk for ``kind``."""
        base = self.directory / kind
        out: set[str] = set()
        try:
            subdirs = list(os.scandir(base))
        except FileNotFoundError:
            return out
        for sub in subdirs:
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if is_hex_id(entry.name):
                    out.add(entry.name)
        return out

    def drop_stale(self, kind: str, valid: Iterable[str]) -> int:
        """Remove entries of ``kind`` not in ``valid`` (what the backend still has)."""
        keep = set(valid)
        stale = self.cached_ids(kind) - keep
        for object_id in stale:
            _unlink(self.path(kind, object_id))
            if kind == "data" and object_id in self._memory:
                self._memory_bytes -= len(self._memory.pop(object_id))
        if stale:
            self.stats.dropped += len(stale)
            log.debug("cache.dropped_stale", kind=kind, entries=len(stale))
        return len(stale)


def open_cache(
    repo_id: str, *, cache_dir: str | None, no_cache: bool, env: Mapping[str, str]
) -> MetadataCache | None:
    """The cache the settings ask for: None with ``--no-cache`` or when it cannot be
    created (a warning is logged; the command then reads everything from the backend).
    """
    if no_cache:
        return None
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root(env)
    try:
        return MetadataCache.open(root, repo_id)
    except OSError as exc:
        log.warning("cache.unavailable", path=str(root), error=str(exc))
        return None


@dataclass
class CacheDir:
    """One repository's cache directory under a cache root."""

    repo_id: str
    path: Path
    last_used: float  # seconds since the epoch (the directory's mtime)

    def age_days(self, now: float) -> float:
        return max(0.0, now - self.last_used) / 86400

    def size(self) -> int:
        """Bytes of the files below it (a walk: as slow as the cache is large)."""
        total = 0
        for top, _dirs, files in os.walk(self.path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(top, name)).st_size
                except OSError:
                    pass
        return total


def list_caches(root: Path) -> list[CacheDir]:
    """The repository caches under ``root``, oldest first (none if it is missing)."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and is_hex_id(entry.name):
            out.append(CacheDir(entry.name, Path(entry.path), entry.stat().st_mtime))
    return sorted(out, key=lambda c: c.last_used)


def remove_old_caches(root: Path, max_age_days: float, now: float) -> list[CacheDir]:
    """Remove the caches not used for more than ``max_age_days``; return them."""
    import shutil

    removed = []
    for cache in list_caches(root):
        if cache.age_days(now) > max_age_days:
            shutil.rmtree(cache.path, ignore_errors=True)
            removed.append(cache)
            log.info("cache.removed", repository=cache.repo_id, path=str(cache.path))
    return removed


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cache.remove_failed", path=str(path), error=str(exc))
