"""Index files (which pack holds which blob) and the in-memory ``Index``.

An index file is ``seal(crypto, "index", msgpack(map))`` with the map::

    {"v": 1, "supersedes": [bin32, ...],
     "packs": [{"id": bin32, "blobs": [[type, id, offset, length, raw_length], ...]}, ...]}

The in-memory index holds millions of blobs, so it stores one ``bytes`` key and one
packed 21-byte ``bytes`` value per blob — measured ~165 bytes per blob all told (dict
slot, 32-byte key, value), against ~270 for a tuple of five ints and more for a dataclass —
and builds ``BlobLocation`` tuples only on lookup (~2.6 µs).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from cairn.repo import schema
from cairn.repo.errors import UnsupportedVersion
from cairn.repo.pack import PackEntry, parse_entries

INDEX_VERSION = 1

# pack number (u32), type (u8), offset (u64), length (u32), raw length (u32)
_VALUE = struct.Struct("<IBQII")


class BlobLocation(NamedTuple):
    """Where a blob lives: pack (32-byte ID), type, byte range and decoded length."""

    pack_id: bytes
    type: int
    offset: int
    length: int
    raw_length: int


@dataclass
class IndexFile:
    """The decoded contents of one index file."""

    packs: list[tuple[bytes, list[PackEntry]]] = field(default_factory=list)
    supersedes: list[bytes] = field(default_factory=list)


def encode_index(index_file: IndexFile) -> bytes:
    """msgpack payload of an index file (seal it with kind ``"index"``)."""
    return schema.pack(
        {
            "v": INDEX_VERSION,
            "supersedes": list(index_file.supersedes),
            # PackEntry is a tuple: msgpack writes it as the array it is (5x faster
            # than converting each to a list first, the same bytes).
            "packs": [{"id": pack_id, "blobs": entries} for pack_id, entries in index_file.packs],
        }
    )


def decode_index(payload: bytes, name: str = "") -> IndexFile:
    """Parse and validate an index payload; ``CorruptedObject`` on any deviation."""
    reader = schema.Reader(schema.unpack(payload, "index", name), "index", name)
    version = reader.get_int("v")
    if version != INDEX_VERSION:
        raise UnsupportedVersion("index", name, f"index version {version} is not supported")
    supersedes = reader.get_bytes_list("supersedes", [], size=32)
    packs = []
    for raw_pack in reader.get_list("packs"):
        pack = schema.Reader(raw_pack, "index", name, "pack entry")
        pack_id = pack.get_bytes("id", size=32)
        packs.append((pack_id, parse_entries(pack.get_list("blobs"), "index", name)))
    return IndexFile(packs, supersedes)


class Index:
    """Blob ID → location, for every blob of every loaded index file."""

    def __init__(self) -> None:
        self._pack_ids: list[bytes] = []
        self._pack_numbers: dict[bytes, int] = {}
        self._blobs: dict[bytes, bytes] = {}

    def add_pack(self, pack_id: bytes, entries: Iterable[PackEntry]) -> None:
        """Record a pack's blobs. A blob already indexed keeps its first location."""
        number = self._pack_numbers.get(pack_id)
        if number is None:
            number = self._pack_numbers[pack_id] = len(self._pack_ids)
            self._pack_ids.append(pack_id)
        pack_value = _VALUE.pack
        blobs = self._blobs
        for type_, blob_id, offset, length, raw_length in entries:
            if blob_id not in blobs:
                blobs[blob_id] = pack_value(number, type_, offset, length, raw_length)

    def add_file(self, index_file: IndexFile) -> None:
        """Record every pack of a decoded index file."""
        for pack_id, entries in index_file.packs:
            self.add_pack(pack_id, entries)

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        """The location of a blob, or None when no index lists it."""
        value = self._blobs.get(blob_id)
        if value is None:
            return None
        number, type_, offset, length, raw_length = _VALUE.unpack(value)
        return BlobLocation(self._pack_ids[number], type_, offset, length, raw_length)

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    @property
    def blob_count(self) -> int:
        """Number of distinct blobs."""
        return len(self._blobs)

    @property
    def pack_count(self) -> int:
        """Number of packs that contributed at least one entry."""
        return len(self._pack_ids)

    def packs(self) -> list[bytes]:
        """IDs of all indexed packs."""
        return list(self._pack_ids)

    def pack_entries(self) -> list[tuple[bytes, list[PackEntry]]]:
        """Every pack with its entries (in offset order), as an index file lists them."""
        packs: dict[bytes, list[PackEntry]] = {p: [] for p in self._pack_ids}
        for blob_id, loc in self.blobs():
            packs[loc.pack_id].append(
                PackEntry(loc.type, blob_id, loc.offset, loc.length, loc.raw_length)
            )
        return [(p, sorted(e, key=lambda e: e.offset)) for p, e in packs.items() if e]

    def blobs(self) -> Iterator[tuple[bytes, BlobLocation]]:
        """Every (blob ID, location) pair; order unspecified."""
        pack_ids = self._pack_ids
        for blob_id, value in self._blobs.items():
            number, type_, offset, length, raw_length = _VALUE.unpack(value)
            yield blob_id, BlobLocation(pack_ids[number], type_, offset, length, raw_length)
