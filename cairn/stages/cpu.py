"""CPU work that runs in the worker processes: encoding and decoding blobs.

Module-level functions on plain data so the engine's process pool can run them.
The repository's ``Crypto`` is installed once per worker by ``init_worker``; jobs
carry only slot references or small byte strings.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import cast

from cairn.repo.codec import BLOB_TYPE_NAMES, decode_blob, encode_blob_into
from cairn.repo.crypto import Crypto, storage_id
from cairn.repo.errors import CorruptedObject
from cairn.repo.pack import DATA, PackEntry, parse_pack_header
from cairn.repo.tree import Node
from cairn.stages.chunker import SmallOut, read_encode_small
from cairn.stages.dirfds import DirFds, open_dir_path
from cairn.stages.fsmeta import apply_metadata_fd

_crypto: Crypto | None = None


def init_worker(crypto: Crypto) -> None:
    """Runs once in each worker: keep the repository's sub-keys for later jobs."""
    global _crypto
    _crypto = crypto


def _worker_crypto() -> Crypto:
    if _crypto is None:  # pragma: no cover - a pool started without init_worker
        raise RuntimeError("worker started without repository keys")
    return _crypto


def verify_spans(
    view: memoryview, spans: list[tuple[int, int, int, bytes]]
) -> list[tuple[bytes, str]]:
    """Decode (decrypt, decompress, check the ID of) the blobs at ``(offset, length,
    type, id)`` in a slot; return the ones that fail as ``(blob ID, why)``. Nothing
    bulky travels back: the caller keeps using the stored bytes in the slot."""
    crypto = _worker_crypto()
    bad = []
    for offset, length, blob_type, blob_id in spans:
        try:
            decode_blob(crypto, blob_type, blob_id, view[offset : offset + length])
        except CorruptedObject as exc:
            bad.append((blob_id, str(exc)))
    return bad


def compare_entries(
    pack_id: str, index_entries: Sequence[PackEntry], header_entries: Sequence[PackEntry]
) -> list[str]:
    """Ways the index and a pack header disagree about one pack (empty: they agree)."""
    by_index = {e.id: e for e in index_entries}
    by_header = {e.id: e for e in header_entries}
    out = []
    for blob_id, entry in by_index.items():
        other = by_header.get(blob_id)
        if other is None:
            out.append(f"the index lists blob {blob_id.hex()} but the pack header does not")
        elif other != entry:
            out.append(
                f"blob {blob_id.hex()}: index says {_describe(entry)}, "
                f"pack header says {_describe(other)}"
            )
    for blob_id in by_header.keys() - by_index.keys():
        out.append(f"the pack header lists blob {blob_id.hex()} but the index does not")
    return out


def _describe(e: PackEntry) -> str:
    kind = BLOB_TYPE_NAMES.get(e.type, str(e.type))
    return f"{kind} at offset {e.offset}, length {e.length}, raw length {e.raw_length}"


def verify_pack(
    view: memoryview, pack_id: str, entries: list[tuple[int, bytes, int, int, int]]
) -> tuple[list[tuple[str, str, str]], int]:
    """Worker job of ``check --read-data``: the hash, header and every blob of one
    whole pack. Returns ``([(kind, id, message), ...], blobs verified)``.

    The pack's name is the BLAKE3 of its bytes; its header must list what the index
    lists; each blob must authenticate, decompress and hash to its ID (the ID is a
    keyed hash of the plaintext, so there is no checking it without decoding).
    """
    crypto = _worker_crypto()
    problems: list[tuple[str, str, str]] = []
    if storage_id(view) != pack_id:
        problems.append(("pack", pack_id, "content does not match its name (hash mismatch)"))
    index_entries = [PackEntry(*e) for e in entries]
    try:
        # parse_pack_header only slices and unpacks: a memoryview serves as well as bytes.
        header = parse_pack_header(crypto, cast(bytes, view), len(view), pack_id)
    except CorruptedObject as exc:
        problems.append(("pack", pack_id, f"unreadable header: {exc.problem}"))
    else:
        problems.extend(
            ("pack", pack_id, m) for m in compare_entries(pack_id, index_entries, header)
        )
    verified = 0
    for e in index_entries:
        kind = f"{BLOB_TYPE_NAMES[e.type]} blob"
        if e.offset + e.length > len(view):
            problems.append((kind, e.id.hex(), f"in pack {pack_id}: extends past the pack's end"))
            continue
        try:
            decode_blob(crypto, e.type, e.id, view[e.offset : e.offset + e.length])
        except CorruptedObject as exc:
            problems.append((kind, e.id.hex(), f"in pack {pack_id}: {exc.problem}"))
        else:
            verified += 1
    return problems, verified


# What a worker needs to finish a file it creates: (mode, uid, gid, user, group,
# atime_ns, mtime_ns, xattrs). Not the whole tree node: a job carries one per small
# file, and pickling whole nodes (blob ID lists, inode, ctime ...) was the largest
# cost of the main process on 200,000 small files (py-spy), unpickling them a tenth
# of the workers'. Names are interned so that a job pickles each once.
FileMeta = tuple[int, int, int, str, str, int, int, dict[bytes, bytes]]


# A place a decoded blob goes: (directory below the target, file name, offset in the
# file, metadata when the worker creates and finishes the file itself, else None).
Target = tuple[bytes, bytes, int, FileMeta | None]


def file_meta(node: Node) -> FileMeta:
    """The part of a file's node a worker applies (see :data:`FileMeta`)."""
    return (
        node.mode,
        node.uid,
        node.gid,
        sys.intern(node.user),
        sys.intern(node.group),
        node.atime_ns,
        node.mtime_ns,
        node.xattrs,
    )


def _meta_node(name: bytes, meta: FileMeta) -> Node:
    mode, uid, gid, user, group, atime_ns, mtime_ns, xattrs = meta
    return Node(
        type="file",
        name=name,
        mode=mode,
        uid=uid,
        gid=gid,
        user=user,
        group=group,
        atime_ns=atime_ns,
        mtime_ns=mtime_ns,
        xattrs=xattrs,
    )


# (offset and length in the slot, blob type, blob ID, where it goes)
WriteSpan = tuple[int, int, int, bytes, list[Target]]
# (directory, name, problem, whether the file's content is lost)
Problem = tuple[bytes, bytes, str, bool]


def decode_and_write(
    view: memoryview, root: bytes, spans: list[WriteSpan], sparse: bool
) -> tuple[int, list[Problem], list[tuple[bytes, str]]]:
    """Decode blobs from a downloaded pack range and write each into every file
    position that needs it, relative to the restore target ``root``.

    Returns the bytes written, the per-file problems, and the blobs that could not
    be decoded (``(blob ID, why)``: corrupt; the caller fails the files needing them).
    One bad blob or one file that cannot be written never stops the others.

    A target carrying its metadata is a one-blob file this worker creates (never
    through an existing path: O_EXCL, O_NOFOLLOW, relative to its directory's
    descriptor) and finishes, metadata included; if writing it fails, it is
    removed. Other targets were created by the planner at their full size. With
    ``sparse``, all-zero 64 KiB blocks are not written and stay holes.
    """
    crypto = _worker_crypto()
    written = 0
    problems: list[Problem] = []
    bad_blobs: list[tuple[bytes, str]] = []
    for offset, length, blob_type, blob_id, targets in spans:
        try:
            data = decode_blob(crypto, blob_type, blob_id, view[offset : offset + length])
        except Exception as exc:  # corrupt: fail only the files that need this blob
            bad_blobs.append((blob_id, " ".join(str(exc).split())))
            continue
        pieces = _nonzero_blocks(data) if sparse else [(0, len(data))]
        for dir_rel, name, file_offset, meta in targets:
            try:
                dirs = _target_dirs(root)
                warnings = _write_one(dirs, dir_rel, name, data, pieces, file_offset, meta, sparse)
            except OSError as exc:
                problems.append((dir_rel, name, exc.strerror or str(exc), True))
                continue
            written += len(data)
            if warnings:
                problems.append((dir_rel, name, "; ".join(warnings), False))
    return written, problems, bad_blobs


def _write_one(
    dirs: DirFds,
    dir_rel: bytes,
    name: bytes,
    data: bytes,
    pieces: list[tuple[int, int]],
    file_offset: int,
    meta: FileMeta | None,
    sparse: bool,
) -> list[str]:
    dir_fd = dirs.get(dir_rel)
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    if meta is not None:
        flags |= os.O_CREAT | os.O_EXCL
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        for start, end in pieces:
            _pwrite_all(fd, memoryview(data)[start:end], file_offset + start)
        if meta is None:
            return []
        if sparse:
            os.ftruncate(fd, len(data))  # a trailing hole still counts in the size
        return apply_metadata_fd(fd, _meta_node(name, meta))
    except BaseException:
        if meta is not None:  # ours alone: do not leave it half-written
            os.close(fd)
            fd = -1
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass
        raise
    finally:
        if fd >= 0:
            os.close(fd)


# The restore target's directories, per worker process: (root path, descriptors).
_dirs: tuple[bytes, DirFds] | None = None


def _target_dirs(root: bytes) -> DirFds:
    global _dirs
    if _dirs is None or _dirs[0] != root:
        if _dirs is not None:
            _dirs[1].close()
        _dirs = (root, DirFds(open_dir_path(root)))
    return _dirs[1]


# Holes are made in units of this many bytes (a multiple of every common fs block).
_SPARSE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(_SPARSE_BLOCK)


def _nonzero_blocks(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of ``data`` that are not all-zero blocks, merged."""
    ranges: list[tuple[int, int]] = []
    view = memoryview(data)
    for start in range(0, len(data), _SPARSE_BLOCK):
        block = view[start : start + _SPARSE_BLOCK]
        if block == _ZERO_BLOCK[: len(block)]:
            continue
        end = start + len(block)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def encode_into(
    src: memoryview, dst: memoryview, spans: list[tuple[int, int, bytes]], level: int
) -> list[tuple[int, int]]:
    """Compress and encrypt the blobs at ``(offset, length, id)`` of ``src`` into
    ``dst`` one after another; returns where each landed. Nothing bulky is pickled."""
    return encode_spans(_worker_crypto(), src, dst, spans, level)


def encode_spans(
    crypto: Crypto,
    src: memoryview,
    dst: memoryview,
    spans: list[tuple[int, int, bytes]],
    level: int,
) -> list[tuple[int, int]]:
    """:func:`encode_into` with the keys given (for a thread of the main process)."""
    pos = 0
    placed = []
    for offset, length, blob_id in spans:
        size = encode_blob_into(
            crypto, DATA, blob_id, src[offset : offset + length], dst[pos:], level
        )
        placed.append((pos, size))
        pos += size
    return placed


class DirsUnreachable(Exception):
    """A worker could not reach the parent's directory descriptors through /proc
    (a hardened /proc, a non-dumpable parent): the parent reads in threads instead."""


def backup_small_files(
    owner: int,
    dir_fds: list[int | str],
    files: list[tuple[int, bytes, bytes]],
    dst: memoryview,
    limit: int,
    level: int,
) -> list[SmallOut | str | None]:
    """Worker job of backup: read, hash, compress and encrypt a batch of small files
    into the slot ``dst`` (:func:`cairn.stages.chunker.read_encode_small`).

    The files are opened relative to the directories the walk holds open in process
    ``owner`` (``dir_fds``, its descriptor numbers, pinned for the job), reached as
    ``/proc/<owner>/fd/<n>``: the very directories the walk checked, with no path
    resolved again (so no symlink swapped in since is followed, at any depth). A
    directory the parent could not open comes as its problem (a string).
    """
    opened: list[int] = []
    fds: list[int | str] = []
    try:
        for fd in dir_fds:
            if isinstance(fd, str):
                fds.append(fd)
                continue
            try:
                opened.append(os.open(f"/proc/{owner}/fd/{fd}", _REOPEN_DIR))
            except OSError as exc:
                raise DirsUnreachable(f"/proc/{owner}/fd/{fd}: {exc.strerror}") from None
            fds.append(opened[-1])
        return read_encode_small(_worker_crypto(), fds, files, dst, limit, level)
    finally:
        for fd in opened:
            os.close(fd)


_REOPEN_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
