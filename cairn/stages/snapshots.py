"""Finding snapshots: load them all, filter by host/path/tag, resolve IDs and ``latest``.

One damaged snapshot file must not hide the others: listing commands skip it with a
``snapshot.damaged`` warning naming the file (see :func:`load_snapshots`); only
``prune`` and ``check`` insist on reading every one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import structlog

from cairn.repo.errors import CorruptedObject, ObjectNotFound
from cairn.repo.snapshot import Snapshot

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.snapshots")


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


class SnapshotList(list[tuple[str, Snapshot]]):
    """``(id, snapshot)`` pairs, oldest first, and the snapshots that could not be read.

    ``damaged`` holds ``(id, problem)`` for each snapshot file that failed its hash,
    authentication or schema; those are not in the list.
    """

    def __init__(self, items: list[tuple[str, Snapshot]], damaged: list[tuple[str, str]]):
        super().__init__(items)
        self.damaged = damaged


async def load_snapshots(repo: Repository, *, strict: bool = False) -> SnapshotList:
    """Every readable snapshot with its ID, oldest first.

    A damaged snapshot file is skipped with a ``snapshot.damaged`` warning and listed
    in the result's ``damaged``, so that ``snapshots``, ``backup`` (which only needs a
    parent), ``forget`` and ``repair`` keep working. ``strict=True`` raises instead:
    ``prune`` must know every snapshot's tree before it deletes anything. A snapshot
    removed while we list (a concurrent ``forget``) is left out silently.
    """
    ids = await repo.list_ids("snapshots")
    out: dict[str, Snapshot] = {}
    damaged: list[tuple[str, str]] = []
    limiter = anyio.CapacityLimiter(max(1, repo.backend.connections))

    async def one(snapshot_id: str) -> None:
        async with limiter:
            try:
                out[snapshot_id] = await repo.load_snapshot(snapshot_id)
            except CorruptedObject as exc:
                if strict:
                    raise
                damaged.append((snapshot_id, exc.problem))
            except ObjectNotFound:
                pass

    async with anyio.create_task_group() as tg:
        for snapshot_id in ids:
            tg.start_soon(one, snapshot_id)
    damaged.sort()
    for snapshot_id, problem in damaged:
        log.warning(
            "snapshot.damaged",
            file=f"snapshots/{snapshot_id}",
            error=problem,
            hint=f"skipped; `cairn forget {snapshot_id[:8]}` removes it",
        )
    items = sorted(out.items(), key=lambda item: (item[1].time_ns, item[0]))
    return SnapshotList(items, damaged)


async def find_snapshot(
    repo: Repository, ref: str, flt: SnapshotFilter | None = None
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
