"""``stats``: sizes of snapshots, counted four ways (restic's modes).

* ``restore-size``: what restoring the snapshots would write: files and their sizes,
  counted once per snapshot (a file in two snapshots counts twice);
* ``files-by-contents``: distinct file contents (same blob list = same file);
* ``raw-data``: the distinct blobs the snapshots reference, uncompressed and stored;
* ``blobs-per-file``: distinct file contents, their blobs and the blobs' raw size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cairn.repo.errors import ObjectNotFound
from cairn.repo.index import Index
from cairn.repo.tree import Node

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

MODES = ("restore-size", "files-by-contents", "raw-data", "blobs-per-file")


@dataclass
class Stats:
    """The numbers one mode reports (restic's JSON field names)."""

    mode: str
    snapshots_count: int = 0
    total_size: int = 0
    total_file_count: int = 0
    total_blob_count: int = 0
    total_uncompressed_size: int = 0
    _contents: set[tuple[bytes, ...]] = field(default_factory=set, repr=False)
    _blobs: set[bytes] = field(default_factory=set, repr=False)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "total_size": self.total_size,
            "total_file_count": self.total_file_count,
            "snapshots_count": self.snapshots_count,
        }
        if self.mode in ("raw-data", "blobs-per-file"):
            out["total_blob_count"] = self.total_blob_count
        if self.mode == "raw-data":
            out["total_uncompressed_size"] = self.total_uncompressed_size
            ratio = self.total_uncompressed_size / self.total_size if self.total_size else 0
            out["compression_ratio"] = round(ratio, 3)
        return out


class _Counter:
    def __init__(self, repo: Repository, index: Index, stats: Stats) -> None:
        self.repo = repo
        self.index = index
        self.stats = stats
        self.seen_trees: set[bytes] = set()

    def _blob(self, blob_id: bytes) -> None:
        if blob_id in self.stats._blobs:
            return
        self.stats._blobs.add(blob_id)
        loc = self.index.lookup(blob_id)
        if loc is None:
            raise ObjectNotFound(f"blob {blob_id.hex()} is not in the index (run `cairn check`)")
        self.stats.total_blob_count += 1
        if self.stats.mode == "raw-data":
            self.stats.total_size += loc.length
            self.stats.total_uncompressed_size += loc.raw_length
        else:  # blobs-per-file
            self.stats.total_size += loc.raw_length

    def _file(self, node: Node) -> None:
        mode = self.stats.mode
        if mode == "restore-size":
            self.stats.total_file_count += 1
            self.stats.total_size += node.size
            return
        if mode == "raw-data":
            for blob_id in node.content:
                self._blob(blob_id)
            return
        key = tuple(node.content)
        if key in self.stats._contents:
            return
        self.stats._contents.add(key)
        self.stats.total_file_count += 1
        if mode == "files-by-contents":
            self.stats.total_size += node.size
        else:
            for blob_id in node.content:
                self._blob(blob_id)

    async def tree(self, tree_id: bytes) -> None:
        mode = self.stats.mode
        if mode != "restore-size":
            if tree_id in self.seen_trees:
                return  # deduplicated modes: a tree's contents count once
            self.seen_trees.add(tree_id)
        if mode == "raw-data":
            self._blob(tree_id)
        tree = await self.repo.load_tree(tree_id)
        for node in tree.nodes:
            if node.type == "dir" and node.subtree is not None:
                if mode == "restore-size":
                    self.stats.total_file_count += 1
                await self.tree(node.subtree)
            elif node.type == "file":
                self._file(node)
            elif mode == "restore-size":
                self.stats.total_file_count += 1


async def compute_stats(repo: Repository, trees: Sequence[bytes], mode: str) -> Stats:
    """Walk the given snapshot root trees and count in ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    index = repo.index if repo.index is not None else await repo.load_index()
    stats = Stats(mode, snapshots_count=len(trees))
    counter = _Counter(repo, index, stats)
    for tree_id in trees:
        await counter.tree(tree_id)
    return stats
