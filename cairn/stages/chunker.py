"""Reading a file into content-defined chunks and their blob IDs.

Blocking code, run in reader threads: ``read``, pyfastcdc and BLAKE3 all release the
GIL, so two readers really do run in parallel with the event loop. Large files are
read into shared-memory slots that the worker processes then encode from.
Compression and encryption of the *new* chunks happen later, in the worker
processes — the dedupe check sits between, so no compress or encrypt work is spent
on known blobs. Small files (one blob each) are read, hashed and encoded in one go
by :func:`read_encode_small`, in a worker: their per-file cost is system calls and
Python, which the main process's GIL cannot afford (docs/architecture.md, "Small
files").
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pyfastcdc import FastCDC

from cairn.repo.codec import encode_blob_into
from cairn.repo.crypto import OVERHEAD as CRYPTO_OVERHEAD
from cairn.repo.crypto import Crypto
from cairn.repo.pack import DATA
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


# What reading one small file gives (:func:`read_encode_small`):
# (offset and length of its stored blob in the slot, plaintext length, blob ID,
#  mtime_ns and size after the read, xattrs). A plain tuple: a worker pickles one
# per file, and a class reference per item would cost more than its fields.
SmallOut = tuple[int, int, int, bytes, int, int, dict[bytes, bytes]]

# The most a stored blob adds to its plaintext: a flag byte and the encryption
# envelope (cairn.repo.codec, cairn.repo.crypto).
BLOB_OVERHEAD = 1 + CRYPTO_OVERHEAD


def read_encode_small(
    crypto: Crypto,
    dir_fds: Sequence[int | str],
    files: Sequence[tuple[int, bytes, bytes]],
    dst: memoryview,
    limit: int,
    level: int,
) -> list[SmallOut | str | None]:
    """Read whole small files, hash, compress and encrypt each into ``dst``.

    ``files`` are ``(index into dir_fds, name, known blob ID or b"")``; each is
    opened relative to its directory's descriptor (:func:`open_for_backup`) — a
    directory that could not be opened is its problem instead, given for each of
    its files — read into the last ``limit`` bytes of ``dst`` (scratch space, so
    no other buffer is needed), and its blob stored after the previous one from
    the start of ``dst``. Runs in a worker process
    (:func:`cairn.stages.cpu.backup_small_files`) or, until the pool is up, in a
    thread. Per file: a :data:`SmallOut`, the one-line problem that kept it out
    (:func:`read_problem`), or None for a file that has grown to ``limit`` bytes
    or more (the caller reads it as a large file). A blob seen earlier in the same
    call is stored once; one whose ID is the known one given (the parent
    snapshot's content, in the repository) is not stored at all (its stored
    length is 0): a file whose metadata alone changed costs no compression.
    Stops early when ``dst`` is full: the result is then shorter than ``files``
    and the caller passes the rest again.
    """
    scratch_at = len(dst) - limit
    scratch = dst[scratch_at:]
    last_start = scratch_at - limit - BLOB_OVERHEAD  # a whole blob still fits
    out: list[SmallOut | str | None] = []
    placed: dict[bytes, tuple[int, int]] = {}
    pos = 0
    for dir_index, name, known in files:
        if pos > last_start:
            break
        dir_fd = dir_fds[dir_index]
        if isinstance(dir_fd, str):
            out.append(dir_fd)
            continue
        try:
            fd = open_for_backup(dir_fd, name)
        except OSError as exc:
            out.append(read_problem(exc))
            continue
        try:
            n = os.readv(fd, [scratch])
            after = os.fstat(fd)
            while 0 < n < min(after.st_size, limit):  # a short read (network fs)
                more = os.readv(fd, [scratch[n:]])
                if not more:
                    break
                n += more
            xattrs = read_xattrs_fd(fd)
        except OSError as exc:
            out.append(read_problem(exc))
            continue
        finally:
            os.close(fd)
        if n >= limit:
            out.append(None)
            continue
        if not n:
            out.append((0, 0, 0, b"", after.st_mtime_ns, after.st_size, xattrs))
            continue
        data = scratch[:n]
        blob_id = crypto.blob_id(data)
        where = placed.get(blob_id)
        if blob_id == known:
            where = (0, 0)
        elif where is None:
            size = encode_blob_into(crypto, DATA, blob_id, data, dst[pos:scratch_at], level)
            where = placed[blob_id] = (pos, size)
            pos += size
        out.append((where[0], where[1], n, blob_id, after.st_mtime_ns, after.st_size, xattrs))
    return out
