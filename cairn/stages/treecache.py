"""Loading many tree blobs cheaply: one read per tree pack instead of one per tree.

A backup with a parent snapshot and ``diff``/``ls`` walk thousands of trees that sit
together in a few tree packs. Reading each tree with its own ranged request costs a
request (and a thread hop) apiece; this cache fetches the span of a pack that holds
its tree blobs once and decodes trees from memory. With the local metadata cache
(``cairn/repo/cache.py``) it reads whole tree packs through it instead, so a second
backup loads its parent's trees without touching the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from cairn.backends.base import NotFound, ObjectTruncated, object_name
from cairn.repo.codec import decode_blob
from cairn.repo.errors import CorruptedObject, ObjectNotFound
from cairn.repo.index import Index
from cairn.repo.pack import TREE
from cairn.repo.tree import Tree, decode_tree

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

# Keep at most this many bytes of tree packs in memory; trees are small, and a
# backup's parent snapshot rarely has more than a few packs of them.
MAX_CACHED_BYTES = 256 * 1024 * 1024


class TreeCache:
    """Trees by blob ID, fetched a pack span at a time."""

    def __init__(self, repo: Repository, index: Index) -> None:
        self._repo = repo
        self._index = index
        self._spans: dict[bytes, tuple[int, bytes]] = {}  # pack -> (start offset, bytes)
        self._locks: dict[bytes, anyio.Lock] = {}
        self._cached = 0
        self._pack_ranges: dict[bytes, tuple[int, int]] | None = None

    def _tree_ranges(self) -> dict[bytes, tuple[int, int]]:
        """Per pack, the byte range covering all its tree blobs (built once)."""
        if self._pack_ranges is None:
            ranges: dict[bytes, tuple[int, int]] = {}
            for _blob_id, loc in self._index.blobs():
                if loc.type != TREE:
                    continue
                start, end = ranges.get(loc.pack_id, (loc.offset, loc.offset + loc.length))
                ranges[loc.pack_id] = (
                    min(start, loc.offset),
                    max(end, loc.offset + loc.length),
                )
            self._pack_ranges = ranges
        return self._pack_ranges

    async def get(self, tree_id: bytes) -> Tree:
        loc = self._index.lookup(tree_id)
        if loc is None:
            raise ObjectNotFound(f"tree {tree_id.hex()} is not in the index")
        if loc.type != TREE:
            raise CorruptedObject("tree", tree_id.hex(), "the index lists it as a data blob")
        span = self._spans.get(loc.pack_id)
        if span is None:
            lock = self._locks.setdefault(loc.pack_id, anyio.Lock())
            async with lock:
                span = self._spans.get(loc.pack_id)
                if span is None:
                    span = await self._fetch(loc.pack_id)
        start, data = span
        stored = data[loc.offset - start : loc.offset - start + loc.length]
        plain = decode_blob(self._repo.crypto, TREE, tree_id, stored)
        return decode_tree(plain, tree_id.hex())

    async def _fetch(self, pack_id: bytes) -> tuple[int, bytes]:
        if getattr(self._repo, "cache", None) is not None:
            # The whole pack, from the local metadata cache when it has it (and it
            # keeps the verified bytes in memory itself).
            return 0, await self._repo.load_tree_pack(pack_id.hex())
        start, end = self._tree_ranges()[pack_id]
        name = object_name("data", pack_id.hex())
        try:
            data = await self._repo.backend.load(name, start, end - start)
        except NotFound:
            raise CorruptedObject(
                "pack", pack_id.hex(), "listed in the index but missing"
            ) from None
        except ObjectTruncated:
            raise CorruptedObject("pack", pack_id.hex(), "shorter than the index says") from None
        if self._cached + len(data) > MAX_CACHED_BYTES:
            self._spans.clear()
            self._cached = 0
        self._spans[pack_id] = (start, data)
        self._cached += len(data)
        return start, data
