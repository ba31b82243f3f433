"""Finding snapshots: load them all, filter by host/path/tag, resolve IDs and ``latest``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from cairn.repo.errors import ObjectNotFound
from cairn.repo.snapshot import Snapshot


@dataclass
class SnapshotFilter:
    """restic's ``--host``, ``--path`` and ``--tag`` filters.

    Each ``--tag`` value is a comma-separated set that must all be present; several
    ``--tag`` options are alternatives.
    """

    hosts: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def matches(self, snap: Snapshot) -> bool:
        if self.hosts and snap.hostname not in self.hosts:
            return False
        if self.paths and sorted(snap.paths) != sorted(self.paths):
            return False
        if self.tags:
            have = set(snap.tags)
            if not any(set(t.split(",")) - {""} <= have for t in self.tags):
                return False
        return True


async def load_snapshots(repo: Any) -> list[tuple[str, Snapshot]]:
    """Every snapshot with its ID, oldest first."""
    ids = await repo.list_ids("snapshots")
    out: dict[str, Snapshot] = {}
    limiter = anyio.CapacityLimiter(max(1, repo.backend.connections))

    async def one(snapshot_id: str) -> None:
        async with limiter:
            out[snapshot_id] = await repo.load_snapshot(snapshot_id)

    async with anyio.create_task_group() as tg:
        for snapshot_id in ids:
            tg.start_soon(one, snapshot_id)
    return sorted(out.items(), key=lambda item: (item[1].time_ns, item[0]))


async def find_snapshot(
    repo: Any, ref: str, flt: SnapshotFilter | None = None
) -> tuple[str, Snapshot]:
    """The snapshot named by ``latest`` or a unique ID prefix."""
    flt = flt or SnapshotFilter()
    if ref == "latest":
        candidates = [(i, s) for i, s in await load_snapshots(repo) if flt.matches(s)]
        if not candidates:
            raise ObjectNotFound(
                "no snapshot found"
                + (" matching the filters" if (flt.hosts or flt.paths or flt.tags) else "")
            )
        return candidates[-1]
    full = await repo.find_id("snapshots", ref)
    return full, await repo.load_snapshot(full)


def split_snapshot_ref(text: str) -> tuple[str, str]:
    """``ID[:SUBPATH]`` into the ID and the subpath (``""`` for the whole snapshot)."""
    ref, _, sub = text.partition(":")
    return ref, sub
