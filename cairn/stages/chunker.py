"""Reading a file into content-defined chunks and their blob IDs.

Blocking code, run in reader threads: ``read``, pyfastcdc and BLAKE3 all release the
GIL, so two readers really do run in parallel with the event loop. Compression and
encryption of the *new* chunks happen later, in the worker processes — the dedupe
check sits between, so no compress or encrypt work is spent on known blobs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from pyfastcdc import FastCDC

from cairn.repo.crypto import Crypto

KiB = 1024
MiB = 1024 * KiB
MIN_SIZE = 512 * KiB
AVG_SIZE = 1 * MiB
MAX_SIZE = 8 * MiB
# Bytes read per read() call: big enough to amortise the syscall, small enough
# that the carry-over copy of the last, unfinished chunk stays cheap.
READ_SIZE = 8 * MiB


class FileChanged(Exception):
    """The file was modified while it was being read."""


@dataclass(frozen=True)
class ChunkerParams:
    min_size: int = MIN_SIZE
    avg_size: int = AVG_SIZE
    max_size: int = MAX_SIZE
    seed: int = 1


@dataclass
class Chunk:
    """One content-defined chunk: its blob ID and bytes (a view into the read buffer)."""

    blob_id: bytes
    data: memoryview


def make_chunker(params: ChunkerParams) -> FastCDC:
    return FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=1,
        seed=params.seed,
    )


def open_for_backup(path: bytes) -> int:
    """Open without following a symlink swapped in since the walk, and without
    updating the access time where the kernel lets us."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)  # O_NOATIME needs ownership or CAP_FOWNER


def chunk_fd(
    fd: int, chunker: FastCDC, crypto: Crypto, params: ChunkerParams
) -> Iterator[list[Chunk]]:
    """Yield lists of complete chunks of the open file, in order.

    Each yielded list's views are valid until the next iteration (the buffer is
    reused), so the consumer must copy out what it keeps before asking for more.
    """
    buf = bytearray(READ_SIZE + params.max_size)
    view = memoryview(buf)
    carry = 0
    eof = False
    while not eof:
        filled = carry
        while filled < len(buf):
            n = os.readv(fd, [view[filled:]])
            if n == 0:
                eof = True
                break
            filled += n
        if filled == 0:
            return
        pieces = list(chunker.cut_buf(view[:filled]))
        if not eof:
            # The last piece ends where the buffer ends, not at a content boundary:
            # keep it and chunk it again together with the next read.
            last = pieces.pop()
            out = [Chunk(crypto.blob_id(p.data), p.data) for p in pieces]
            yield out
            del out
            carry = last.length
            view[:carry] = bytes(view[last.offset : last.offset + carry])
        else:
            yield [Chunk(crypto.blob_id(p.data), p.data) for p in pieces]
            return


def same_file(before: os.stat_result, after: os.stat_result) -> bool:
    """True when nothing suggests the file changed between two stats."""
    return (
        before.st_size == after.st_size
        and before.st_mtime_ns == after.st_mtime_ns
        and before.st_ino == after.st_ino
        and stat.S_IFMT(before.st_mode) == stat.S_IFMT(after.st_mode)
    )
