"""A restic repository as a source of ``cairn copy`` (``--from-repo restic:LOCATION``).

restic's blobs are kept as they are — same boundaries, re-encoded with cairn's keys
and compression — and its trees are rewritten with the new IDs, as for a copy
between two cairn repositories (:mod:`cairn.stages.copy`). See docs/copy.md,
"From restic", for why the chunks are kept rather than re-cut.
"""

from __future__ import annotations

import structlog

from cairn.repo.restic.repository import DATA, ResticDecoder, ResticRepository
from cairn.repo.snapshot import Snapshot
from cairn.repo.tree import Tree

log = structlog.get_logger("cairn.restic")

#: The location prefix that names a restic repository.
PREFIX = "restic:"


class ResticSource:
    """A restic repository (its index loaded) as a copy source."""

    def __init__(self, repo: ResticRepository) -> None:
        if repo.index is None:
            raise ValueError("load the restic index first")
        self.repo = repo
        self.backend = repo.backend
        self.decoder = ResticDecoder(repo.key)
        self._index = repo.index
        self.damaged: list[tuple[str, str]] = []

    async def snapshots(self) -> list[tuple[str, Snapshot]]:
        snapshots, self.damaged = await self.repo.snapshots()
        for snapshot_id, problem in self.damaged:
            log.warning("restic.snapshot_unreadable", snapshot=snapshot_id, error=problem)
        return snapshots

    async def load_tree(self, tree_id: bytes) -> Tree:
        return await self.repo.load_tree(tree_id)

    def locate(self, blob_id: bytes) -> tuple[bytes, int, int, int] | None:
        loc = self._index.get(blob_id)
        if loc is None or loc.type != DATA:
            return None
        return loc.pack_id, loc.offset, loc.length, loc.raw_length
