"""Repositories on disk: atomic, verified writes; append-only; a quota per repository.

An upload streams into a dot-named temporary file beside its final name (never
listed, never addressable: ``paths`` refuses dot-names), is fsynced, and only then
gets its name — by ``rename`` normally, by ``link`` in append-only mode, which fails
rather than replace an existing file, so no race can overwrite one. A request that
ends early (client killed, connection reset, wrong length) removes its temporary file:
no prefix of an object is ever visible.

Verification: restic names every file but ``config`` by the SHA-256 of its bytes,
cairn by their BLAKE3. The server does not know which client it serves, so an upload
under a 64-hex name must match one of the two (both hashes run as the body
streams in; together ~0.7 ms per MiB); names that are not hex ids carry nothing to
check. ``--no-verify-upload`` turns this off.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import blake3

from cairn.serve.paths import KINDS, Target, is_hex_id

# Bytes gathered before one writev. Hashing (SHA-256 ~1.7 GB/s, BLAKE3 ~6 GB/s) and
# writing to the page cache take ~0.8 ms per MiB, done on the event loop: handing each
# batch to a worker thread instead made a sequence of 4 MiB uploads 1.5-2x slower in
# wall time on this (busy, 2-core) machine, every hop waiting to be scheduled. Only
# what can block for long — fsync, rename — goes to a thread.
WRITE_BATCH = 1 << 20


class StoreError(Exception):
    """A refusal with the HTTP status that tells the client why."""

    status = 500


class NotFoundError(StoreError):
    status = 404


class Forbidden(StoreError):
    """Append-only refusals (delete, overwrite): rest-server's 403."""

    status = 403


class BadUpload(StoreError):
    """Wrong length, content that does not match its name, a body cut short."""

    status = 400


class OverQuota(StoreError):
    status = 413


class DiskFull(StoreError):
    status = 507


@dataclass(frozen=True)
class StoreOptions:
    append_only: bool = False
    verify: bool = True
    max_size: int | None = None  # bytes per repository


class Store:
    """All repositories below one directory, with usage tracked per repository."""

    def __init__(self, root: Path, options: StoreOptions) -> None:
        self.root = root
        self.options = options
        self._usage: dict[tuple[str, ...], int] = {}
        self._walking = anyio.Lock()

    def repo_dir(self, target: Target) -> Path:
        return self.root.joinpath(*target.repo)

    def file(self, target: Target) -> Path:
        return self.repo_dir(target) / target.relative()

    async def create(self, target: Target) -> None:
        """Make the repository's directories (idempotent), as rest-server does."""

        def make() -> None:
            base = self.repo_dir(target)
            for kind in KINDS:
                (base / kind).mkdir(parents=True, exist_ok=True, mode=0o700)
            for i in range(256):
                (base / "data" / f"{i:02x}").mkdir(exist_ok=True, mode=0o700)

        await anyio.to_thread.run_sync(make)

    async def size(self, target: Target) -> int:
        try:
            return (await anyio.Path(self.file(target)).stat()).st_size
        except FileNotFoundError:
            raise NotFoundError(f"{target.relative()}: not found") from None

    async def listing(self, target: Target) -> list[tuple[str, int]]:
        """(name, size) of every object of one kind; dot-names (uploads) left out."""
        assert target.kind is not None
        base = self.repo_dir(target) / target.kind
        fan_out = target.kind == "data"

        def scan() -> list[tuple[str, int]]:
            out: list[tuple[str, int]] = []
            dirs = [base]
            if fan_out:
                dirs = [Path(e.path) for e in os.scandir(base) if e.is_dir() and e.name[0] != "."]
            for directory in dirs:
                for entry in os.scandir(directory):
                    if entry.name[0] != "." and entry.is_file():
                        out.append((entry.name, entry.stat().st_size))
            return out

        try:
            return await anyio.to_thread.run_sync(scan)
        except FileNotFoundError:
            raise NotFoundError(f"{target.kind}/: no such repository") from None

    async def delete(self, target: Target) -> int:
        """Remove one object, answering 404 when it is not there; its size."""
        if self.options.append_only and target.kind != "locks":
            raise Forbidden("append-only: only locks can be deleted")
        path = self.file(target)

        def remove() -> int:
            size = path.stat().st_size
            path.unlink()
            return size

        try:
            size = await anyio.to_thread.run_sync(remove)
        except FileNotFoundError:
            raise NotFoundError(f"{target.relative()}: not found") from None
        await self._account(target, -size)
        return size

    async def save(self, target: Target, body: AsyncIterator[bytes], declared: int | None) -> int:
        """Stream ``body`` into place atomically; the number of bytes stored."""
        final = self.file(target)
        if not (self.repo_dir(target) / "keys").is_dir():
            raise NotFoundError(f"{target.repo_label}: no such repository (create it first)")
        reserved = 0
        if declared is not None:
            await self._reserve(target, declared)
            reserved = declared
        upload = _Upload(final)
        try:
            upload.open()
            count = pending = 0
            pieces: list[bytes] = []  # handed over as they came: no copy in Python
            async for piece in body:
                count += len(piece)
                if declared is not None and count > declared:
                    raise BadUpload("body longer than its Content-Length")
                if count > reserved:
                    await self._reserve(target, count - reserved)
                    reserved = count
                pieces.append(piece)
                pending += len(piece)
                if pending >= WRITE_BATCH:
                    upload.absorb(pieces)
                    pieces, pending = [], 0
            if pieces:
                upload.absorb(pieces)
            if declared is not None and count != declared:
                raise BadUpload(f"body of {count} bytes, Content-Length said {declared}")
            self._verify(target, upload)
            replaced = await anyio.to_thread.run_sync(self._commit, target, upload)
        except BaseException:
            await self._account(target, -reserved)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(upload.discard)
            raise
        await self._account(target, count - reserved - replaced)
        return count

    def _verify(self, target: Target, upload: _Upload) -> None:
        name = target.name
        if not self.options.verify or name is None or not is_hex_id(name):
            return
        if name not in (upload.sha256.hexdigest(), upload.blake3.hexdigest()):
            raise BadUpload(f"{target.relative()}: content does not match its name")

    def _commit(self, target: Target, upload: _Upload) -> int:
        """Give the upload its name; the size of what it replaced (0 if nothing)."""
        upload.finish()
        final = upload.final
        if self.options.append_only:
            try:
                os.link(upload.temp, final)
            except FileExistsError:
                # A retried upload of the same bytes is harmless; anything else would
                # overwrite history.
                if _blake3_of(final) != upload.blake3.digest():
                    raise Forbidden("append-only: exists with other content") from None
            os.unlink(upload.temp)
            _fsync_dir(final.parent)
            return 0
        try:
            replaced = final.stat().st_size
        except FileNotFoundError:
            replaced = 0
        os.replace(upload.temp, final)
        _fsync_dir(final.parent)
        return replaced

    async def sweep_stale(self, max_age: float) -> int:
        """Remove temporary files older than ``max_age`` seconds: uploads a killed or
        crashed server left (never visible, but they take space). The age keeps this
        from touching a live upload of another server on the same directory."""
        return await anyio.to_thread.run_sync(_sweep, self.root, max_age)

    # --- quota ----------------------------------------------------------------

    async def usage(self, target: Target) -> int:
        """Bytes stored in the repository (walked once, then tracked)."""
        async with self._walking:  # one walk; reservations wait for it
            if target.repo not in self._usage:
                base = self.repo_dir(target)
                self._usage[target.repo] = await anyio.to_thread.run_sync(_tree_size, base)
        return self._usage[target.repo]

    async def _reserve(self, target: Target, nbytes: int) -> None:
        limit = self.options.max_size
        if limit is None:
            return
        used = await self.usage(target)
        if used + nbytes > limit:
            raise OverQuota(
                f"{target.repo_label}: quota of {limit} bytes would be exceeded "
                f"({used} used, {nbytes} more)"
            )
        self._usage[target.repo] = used + nbytes

    async def _account(self, target: Target, delta: int) -> None:
        """Adjust the tracked usage (only tracked when a quota applies)."""
        if self.options.max_size is not None:
            self._usage[target.repo] = await self.usage(target) + delta


class _Upload:
    """One upload's temporary file and running hashes."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.temp = final.parent / f".tmp-{final.name}-{secrets.token_hex(6)}"
        self.sha256 = hashlib.sha256()
        self.blake3 = blake3.blake3()
        self._fd = -1

    def open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self._fd = os.open(self.temp, flags, 0o600)
        except FileNotFoundError:
            # A data/<xx>/ directory someone removed: make it (the repository exists).
            self.final.parent.mkdir(mode=0o700, exist_ok=True)
            self._fd = os.open(self.temp, flags, 0o600)

    def absorb(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.sha256.update(piece)
            self.blake3.update(piece)
        views = [memoryview(p) for p in pieces]
        try:
            while views:
                written = os.writev(self._fd, views)
                while views and written >= views[0].nbytes:
                    written -= views.pop(0).nbytes
                if views:
                    views[0] = views[0][written:]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull("no space left on the server's disk") from exc
            raise

    def finish(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.temp)
        except FileNotFoundError:
            pass


def _blake3_of(path: Path) -> bytes:
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while chunk := f.read(WRITE_BATCH):
            hasher.update(chunk)
    return hasher.digest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep(root: Path, max_age: float) -> int:
    cutoff = time.time() - max_age
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not name.startswith(".tmp-"):
                continue
            path = os.path.join(dirpath, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                pass
    return removed


def _tree_size(base: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total
