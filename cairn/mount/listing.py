"""What the mount lists: the snapshot layout (reloaded as snapshots come and go) and
the snapshots' decoded trees (kept in a bounded LRU)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import structlog

from cairn.mount.layout import Link, MetaDir, SnapshotDir, build_layout
from cairn.repo.errors import CorruptedObject, ObjectNotFound
from cairn.repo.tree import Node

if TYPE_CHECKING:
    from cairn.repo.repository import Repository
    from cairn.repo.snapshot import Snapshot
    from cairn.stages.snapshots import SnapshotFilter

log = structlog.get_logger("cairn.mount")


class SnapshotLayout:
    """The layout of the snapshots matching a filter; :meth:`refresh` reloads the
    snapshot list (new snapshots only are read) and, when new index files appeared,
    the index."""

    def __init__(
        self,
        repo: Repository,
        snapshot_filter: SnapshotFilter,
        refresh_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repo = repo
        self._filter = snapshot_filter
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._snapshots: dict[str, Snapshot] = {}
        self._index_ids: list[str] = []
        self._refreshed_at = -float("inf")
        self._refresh_lock = anyio.Lock()
        self.layout = MetaDir()
        self.shown = 0  # snapshots in the layout

    async def refresh(self, force: bool = False) -> None:
        """Reload the snapshot list (and the index, if it grew) unless that was done
        less than ``refresh_seconds`` ago."""
        async with self._refresh_lock:
            if not force and self._clock() - self._refreshed_at < self._refresh_seconds:
                return
            ids = await self._repo.list_ids("snapshots")
            known = self._snapshots
            loaded: dict[str, Snapshot] = {}
            limiter = anyio.CapacityLimiter(max(1, self._repo.backend.connections))

            async def load(sid: str) -> None:
                async with limiter:
                    try:
                        loaded[sid] = await self._repo.load_snapshot(sid)
                    except CorruptedObject as exc:
                        log.warning("snapshot.damaged", file=f"snapshots/{sid}", error=exc.problem)
                    except ObjectNotFound:
                        pass  # forgotten while we listed

            async with anyio.create_task_group() as tg:
                for sid in ids:
                    if sid not in known:
                        tg.start_soon(load, sid)
            self._snapshots = {
                sid: snap for sid in ids if (snap := known.get(sid) or loaded.get(sid)) is not None
            }
            index_ids = await self._repo.list_ids("index")
            if index_ids != self._index_ids:
                # New snapshots bring new blobs; the index is reloaded when it changed.
                if self._index_ids:
                    await self._repo.load_index()
                self._index_ids = index_ids
            shown = [(sid, s) for sid, s in self._snapshots.items() if self._filter.matches(s)]
            self.layout = build_layout(shown)
            self.shown = len(shown)
            self._refreshed_at = self._clock()
            log.debug("mount.snapshots_refreshed", snapshots=len(shown))

    async def refresh_listed(self) -> None:
        """The layout is being listed: refresh, but a failure (the backend unreachable
        for a while) only logs and keeps showing the snapshots known so far."""
        try:
            await self.refresh()
        except Exception as exc:
            self._refreshed_at = self._clock()  # not again at once
            log.warning("mount.refresh_failed", error=f"{type(exc).__name__}: {exc}")

    def resolve(self, path: tuple[bytes, ...]) -> MetaDir | SnapshotDir | Link | None:
        here: MetaDir | SnapshotDir | Link | None = self.layout
        for name in path:
            if not isinstance(here, MetaDir):
                return None
            here = here.entries.get(name)
        return here


class DecodedTrees:
    """Directory entries by tree, decoded once; at most ``max_nodes`` entries kept
    (least recently used trees dropped first; a larger tree alone is kept)."""

    def __init__(self, repo: Repository, max_nodes: int) -> None:
        self._repo = repo
        self._max_nodes = max_nodes
        self._cache: OrderedDict[bytes, list[Node]] = OrderedDict()
        self._count = 0
        self._loading: dict[bytes, anyio.Event] = {}

    async def nodes(self, node: Node) -> list[Node]:
        """The entries of a directory node, decoded once and kept (LRU, bounded)."""
        tree_id = node.subtree
        if tree_id is None:
            return []
        while True:
            nodes = self._cache.get(tree_id)
            if nodes is not None:
                self._cache.move_to_end(tree_id)
                return nodes
            loading = self._loading.get(tree_id)
            if loading is None:
                break
            await loading.wait()  # another request is loading it (and may have failed)
            if tree_id not in self._cache:
                break
        done = self._loading[tree_id] = anyio.Event()
        try:
            nodes = (await self._repo.load_tree(tree_id)).nodes
        finally:
            del self._loading[tree_id]
            done.set()
        self._cache[tree_id] = nodes
        self._count += len(nodes)
        while self._count > self._max_nodes and len(self._cache) > 1:
            _old, dropped = self._cache.popitem(last=False)
            self._count -= len(dropped)
        return nodes
