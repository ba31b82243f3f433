"""Pack files: encoded blobs, then a sealed header listing them, then its length.

Layout (``docs/format.md``)::

    blob_0 | blob_1 | ... | blob_n-1 | sealed header | header length (u32 LE)

The header is ``seal(crypto, "packheader", msgpack([[type, id, offset, length,
raw_length], ...]))``. Blobs are contiguous from offset 0 and end where the header
starts. A pack holds blobs of one type only (data or tree), so tree packs can be cached
without data.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import tempfile
from typing import NamedTuple

import blake3

from cairn.backends.base import SpoolMap
from cairn.repo import schema
from cairn.repo.codec import seal, unseal
from cairn.repo.crypto import OVERHEAD, Crypto, storage_id
from cairn.repo.errors import CorruptedObject

DATA = 0
TREE = 1
BLOB_TYPES = (DATA, TREE)

_LENGTH = struct.Struct("<I")
# First guess of how much of a pack's tail to load: a 16 MiB pack of 1 MiB blobs has a
# header of a few hundred bytes; 64 KiB covers ~900 entries even uncompressed.
TAIL_GUESS = 64 * 1024
# A spooled pack is hashed in pieces of this size.
_HASH_PIECE = 1024 * 1024
# Bounds of the in-memory index encoding (u64 offsets, u32 lengths).
_MAX_OFFSET = 1 << 63
_MAX_LENGTH = 1 << 32


class PackEntry(NamedTuple):
    """One blob in a pack: where its encoded bytes are and how long it is decoded."""

    type: int
    id: bytes
    offset: int
    length: int
    raw_length: int


class SpooledPack:
    """A finished pack in an unlinked temporary file: hand ``view`` to the backend,
    then ``close``. The file's pages are page cache, not the process's memory, until
    ``view`` is read (a map of the file, made on first use)."""

    def __init__(
        self, fd: int, size: int, pack_id: str, entries: list[PackEntry], linkable: bool = False
    ):
        self._fd = fd
        self._map: SpoolMap | None = None
        self._linkable = linkable
        self.size = size
        self.pack_id = pack_id
        self.entries = entries

    @property
    def view(self) -> memoryview:
        if self._fd < 0:
            raise ValueError("the pack is closed")
        if self._map is None:
            self._map = SpoolMap(self._fd, self.size, access=mmap.ACCESS_READ)
            if self._linkable:
                self._map.fd = self._fd
        return memoryview(self._map)

    def close(self) -> None:
        if self._map is not None:
            self._map.fd = -1
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still referenced: the map goes when it does
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SpooledPack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PackWriter:
    """Accumulates already-encoded blobs of one type into a pack.

    In memory by default; with ``spool_dir``, in an unlinked temporary file there
    (as restic does), so a pack waiting for an upload holds no memory — see
    :meth:`finish_spooled`. A local repository spools in its own directory, where
    the finished file becomes the pack without a copy (``LocalBackend``).
    """

    def __init__(self, blob_type: int, spool_dir: str | None = None) -> None:
        self._fd = -1
        if blob_type not in BLOB_TYPES:
            raise ValueError(f"unknown blob type {blob_type}")
        self.blob_type = blob_type
        self._parts: list[bytes] = []
        self._entries: list[PackEntry] = []
        self._size = 0
        self._spool_dir = spool_dir
        self._linkable = False

    @property
    def size(self) -> int:
        """Bytes of blobs so far (the header adds ~60 bytes per blob when finished)."""
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self, blob_type: int, blob_id: bytes, stored: bytes | memoryview, raw_length: int
    ) -> None:
        """Append one encoded blob (output of ``encode_blob``)."""
        self.add_many([(blob_type, blob_id, stored, raw_length)])

    def add_many(self, blobs: list[tuple[int, bytes, bytes | memoryview, int]]) -> None:
        """Append encoded blobs ``(type, ID, stored bytes, raw length)``; spooled, in
        one ``writev`` (blocking: a caller on the event loop runs it in a thread)."""
        for blob_type, blob_id, _, _ in blobs:
            if blob_type != self.blob_type:
                raise ValueError("data and tree blobs never share a pack")
            if len(blob_id) != 32:
                raise ValueError("a blob ID is 32 bytes")
        parts: list[bytes | memoryview] = []
        for blob_type, blob_id, stored, raw_length in blobs:
            self._entries.append(PackEntry(blob_type, blob_id, self._size, len(stored), raw_length))
            self._size += len(stored)
            parts.append(stored)
        if self._spool_dir is None:  # a view (of a slot) is copied: it will be reused
            self._parts.extend(bytes(p) if isinstance(p, memoryview) else p for p in parts)
        else:
            self._spool(parts)

    def _spool(self, parts: list[bytes | memoryview]) -> None:
        try:
            if self._fd < 0:
                self._fd, self._linkable = _temporary_file(self._spool_dir)
            _write_all(self._fd, parts)
        except OSError as exc:
            raise _spool_error(exc, self._spool_dir) from exc

    def _header(self, crypto: Crypto) -> list[bytes]:
        if not self._entries:
            raise ValueError("an empty pack is never written")
        header = seal(crypto, "packheader", schema.pack(self._entries))
        return [header, _LENGTH.pack(len(header))]

    def finish(self, crypto: Crypto) -> tuple[bytes, str, list[PackEntry]]:
        """The pack bytes, its ID (hex storage ID) and its entries (an in-memory
        writer; a spooling one finishes with :meth:`finish_spooled`)."""
        if self._spool_dir is not None:
            raise ValueError("a spooling writer finishes with finish_spooled")
        self._parts.extend(self._header(crypto))
        data = b"".join(self._parts)
        self._parts = []
        return data, storage_id(data), self._entries

    def finish_spooled(self, crypto: Crypto) -> SpooledPack:
        """The finished pack in its temporary file (a spooling writer only).

        Its ID is the BLAKE3 of the file read back piece by piece (no second copy
        in memory). Blocking: run it in a thread.
        """
        if self._spool_dir is None:
            raise ValueError("finish_spooled needs a writer made with spool_dir")
        self._spool(list(self._header(crypto)))
        fd, self._fd = self._fd, -1
        try:
            size = os.lseek(fd, 0, os.SEEK_CUR)
            pack_id = _file_storage_id(fd, size)
        except OSError as exc:
            os.close(fd)
            raise _spool_error(exc, self._spool_dir) from exc
        return SpooledPack(fd, size, pack_id, self._entries, self._linkable)

    def discard(self) -> None:
        """Close an unfinished spool file (its bytes vanish with it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    __del__ = discard  # a writer abandoned by a failed run closes its file


# At most this many buffers per writev (Linux's IOV_MAX).
_IOV_MAX = 1024


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        batch = views[:_IOV_MAX]
        written = os.writev(fd, batch)
        # Drop what was written; a short write leaves the rest of a buffer.
        while batch and written >= batch[0].nbytes:
            written -= batch[0].nbytes
            batch.pop(0)
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _file_storage_id(fd: int, size: int) -> str:
    hasher = blake3.blake3()
    for offset in range(0, size, _HASH_PIECE):
        hasher.update(os.pread(fd, min(_HASH_PIECE, size - offset), offset))
    return hasher.hexdigest()


def _temporary_file(directory: str | None) -> tuple[int, bool]:
    """An unnamed file in ``directory``: (descriptor, whether it can be linked).

    ``O_TMPFILE`` without ``O_EXCL`` can later be given a name (``linkat``), so a
    backend on the same filesystem adopts the finished pack instead of copying it;
    where the filesystem has no ``O_TMPFILE``, an unlinked ``tempfile`` serves.
    """
    where = directory or tempfile.gettempdir()
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(where, tmpfile | os.O_RDWR | os.O_CLOEXEC, 0o600), True
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    # Dot-named for the instant it has a name: never listed as an object.
    with tempfile.TemporaryFile(dir=where, prefix=".cairn-pack-") as file:
        return os.dup(file.fileno()), False


def _spool_error(exc: OSError, directory: str | None) -> OSError:
    """The error names the directory (a full $TMPDIR must say where it is)."""
    where = directory or tempfile.gettempdir()
    return OSError(exc.errno, f"temporary pack file in {where}: {exc.strerror}")


def initial_tail_length(pack_size: int) -> int:
    """How many bytes from the end of a pack to load first."""
    return min(pack_size, TAIL_GUESS)


def required_tail_length(tail: bytes, pack_size: int, pack_id: str = "") -> int:
    """How many tail bytes hold the header and its length; load more if above len(tail)."""
    if len(tail) < _LENGTH.size or pack_size < _LENGTH.size:
        raise CorruptedObject("pack", pack_id, f"too short ({pack_size} bytes)")
    (header_len,) = _LENGTH.unpack_from(tail, len(tail) - _LENGTH.size)
    needed = header_len + _LENGTH.size
    if header_len < OVERHEAD or needed > pack_size:
        raise CorruptedObject("pack", pack_id, f"header length {header_len} out of range")
    return needed


def parse_pack_header(
    crypto: Crypto, tail: bytes, pack_size: int, pack_id: str = ""
) -> list[PackEntry]:
    """Decode and validate the entries from the last bytes of a pack.

    ``tail`` must be at least ``required_tail_length`` bytes (the whole pack works).
    """
    needed = required_tail_length(tail, pack_size, pack_id)
    if len(tail) < needed:
        raise ValueError(f"need the last {needed} bytes of the pack, got {len(tail)}")
    header = tail[len(tail) - needed : len(tail) - _LENGTH.size]
    try:
        payload = unseal(crypto, "packheader", header)
    except CorruptedObject as exc:
        raise exc.naming("pack header", pack_id) from None
    raw = schema.unpack(payload, "pack header", pack_id)
    blobs_end = pack_size - needed
    entries = parse_entries(raw, "pack header", pack_id)
    _check_layout(entries, blobs_end, pack_id)
    return entries


def parse_entries(raw: object, kind: str, name: str) -> list[PackEntry]:
    """Validate a msgpack list of ``[type, id, offset, length, raw_length]``."""
    if not isinstance(raw, list):
        raise CorruptedObject(kind, name, "entry list is not an array")
    entries = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 5
            or type(item[0]) is not int
            or item[0] not in BLOB_TYPES
            or not isinstance(item[1], bytes)
            or len(item[1]) != 32
            or not all(type(v) is int and v >= 0 for v in item[2:])
            or item[2] >= _MAX_OFFSET
            or item[3] >= _MAX_LENGTH
            or item[4] >= _MAX_LENGTH
        ):
            raise CorruptedObject(kind, name, "malformed blob entry")
        if item[3] < OVERHEAD + 1:  # envelope + compression flag
            raise CorruptedObject(kind, name, "blob entry shorter than the encryption overhead")
        entries.append(PackEntry(*item))
    return entries


def _check_layout(entries: list[PackEntry], blobs_end: int, pack_id: str) -> None:
    if not entries:
        raise CorruptedObject("pack header", pack_id, "lists no blobs")
    offset = 0
    for entry in entries:
        if entry.offset != offset:
            raise CorruptedObject("pack header", pack_id, "blobs are not contiguous")
        if entry.type != entries[0].type:
            raise CorruptedObject("pack header", pack_id, "mixes data and tree blobs")
        offset += entry.length
    if offset != blobs_end:
        raise CorruptedObject("pack header", pack_id, "blobs do not end where the header starts")
