"""Reading a file into content-defined chunks and their blob IDs.

Blocking code, run in reader threads: ``read``, pyfastcdc and BLAKE3 all release the
GIL, so two readers really do run in parallel with the event loop. The files are read
into shared-memory slots that the worker processes then encode from. Compression and
encryption of the *new* chunks happen later, in the worker processes — the dedupe
check sits between, so no compress or encrypt work is spent on known blobs.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pyfastcdc import FastCDC

from cairn.repo.crypto import Crypto
from cairn.stages.fsmeta import read_xattrs_fd

KiB = 1024
MiB = 1024 * KiB
MIN_SIZE = 512 * KiB
AVG_SIZE = 1 * MiB
MAX_SIZE = 8 * MiB


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC sizes (from the repository config) and the repository's secret seed."""

    min_size: int = MIN_SIZE
    avg_size: int = AVG_SIZE
    max_size: int = MAX_SIZE
    seed: int = 1


def make_chunker(params: ChunkerParams) -> FastCDC:
    return FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=1,
        seed=params.seed,
    )


def open_for_backup(dir_fd: int, name: bytes) -> int:
    """Open entry ``name`` of directory ``dir_fd`` without following a symlink
    swapped in since the walk, and without updating the access time where the
    kernel lets us."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        # O_NOATIME needs ownership or CAP_FOWNER
        return os.open(name, flags, dir_fd=dir_fd)


def fill_and_chunk(
    fd: int, view: memoryview, start: int, chunker: FastCDC, crypto: Crypto, max_size: int
) -> tuple[int, list[tuple[int, int, bytes]], bool]:
    """Fill a slot after ``start`` carried bytes, cut it and hash the pieces.

    Returns (bytes in slot, [(offset, length, blob id)], eof). When not at EOF the
    last span is an unfinished chunk the caller carries into the next slot: chunking
    it again together with the next read gives exactly a streaming chunker's cuts,
    because a cut depends only on the bytes since the previous cut.
    """
    filled = start
    eof = False
    while filled < len(view):
        n = os.readv(fd, [view[filled:]])
        if n == 0:
            eof = True
            break
        filled += n
    if filled == 0:
        return 0, [], True
    spans = [
        (piece.offset, piece.length, crypto.blob_id(piece.data))
        for piece in chunker.cut_buf(view[:filled])
    ]
    if not eof and spans and spans[-1][1] >= max_size:
        # A chunk cut at the maximum size is complete: nothing to carry.
        spans.append((filled, 0, b""))
    return filled, spans, eof


def finish_file(fd: int) -> tuple[os.stat_result, dict[bytes, bytes]]:
    """What a read file's descriptor says after the read: stat and xattrs."""
    return os.fstat(fd), read_xattrs_fd(fd)


def read_problem(exc: OSError) -> str:
    """The one-line reason a file could not be read."""
    if isinstance(exc, FileNotFoundError):
        return "vanished before it could be read"
    if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink where the walk saw a file
        return "replaced by a symlink during the backup; not followed"
    if exc.errno == errno.ENOTDIR:
        return "a directory on its path was replaced during the backup; not followed"
    return exc.strerror or str(exc)


class DirOpener(Protocol):
    """Pins and unpins directory descriptors (:class:`cairn.stages.sourcedirs.SourceDirs`)."""

    def acquire(self, d: Any) -> int: ...

    def release(self, d: Any) -> None: ...


class SmallFile(NamedTuple):
    """One small file read into a slot, with what its descriptor said after."""

    offset: int
    length: int
    blob_id: bytes
    after: os.stat_result
    xattrs: dict[bytes, bytes]


def read_small_files(
    files: list[tuple[Any, bytes]], dirs: DirOpener, view: memoryview, crypto: Any, limit: int
) -> list[SmallFile | OSError | None]:
    """Read whole small files one after another into a slot and hash them (thread
    side). ``files`` are (directory, name) pairs, opened relative to the directory's
    descriptor from ``dirs`` (held once for a run of files in one directory). Per
    file: a :class:`SmallFile`, the error, or None for a file that has grown to
    ``limit`` or more. Stops early when the slot is full; the
    caller passes the remaining files again."""
    out: list[SmallFile | OSError | None] = []
    pos = 0
    held: Any = None
    dir_fd = -1
    try:
        for d, name in files:
            if pos + limit > len(view):
                break
            try:
                if d is not held:
                    if held is not None:
                        dirs.release(held)
                        held = None
                    dir_fd = dirs.acquire(d)
                    held = d
                fd = open_for_backup(dir_fd, name)
            except OSError as exc:
                out.append(exc)
                continue
            try:
                n = os.readv(fd, [view[pos : pos + limit]])
                after = os.fstat(fd)
                xattrs = read_xattrs_fd(fd)
            except OSError as exc:
                out.append(exc)
                continue
            finally:
                os.close(fd)
            if n >= limit:
                out.append(None)
                continue
            out.append(SmallFile(pos, n, crypto.blob_id(view[pos : pos + n]), after, xattrs))
            pos += n
    finally:
        if held is not None:
            dirs.release(held)
    return out
