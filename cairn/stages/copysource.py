"""The source side of ``copy``: what it reads, which snapshots it copies, and what
an earlier copy already maps.

* :class:`CopySource` is a repository to copy from — snapshots, trees, where each
  data blob is stored, a backend and a picklable decoder for the workers;
  :class:`CairnSource` is a cairn repository as one (another format plugs in here).
* :func:`select_snapshots` and :func:`copies_in` choose what to copy and what was
  copied before (restic's rule: the same ``original``, time, host, user, paths,
  tags and excludes).
* :func:`earlier_copy` and :func:`map_copied_trees` learn source → destination IDs
  from a snapshot copied before, without downloading any data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from cairn.backends.base import NotFound
from cairn.repo.errors import RepoError
from cairn.repo.pack import DATA
from cairn.repo.repository import Repository
from cairn.repo.snapshot import Snapshot
from cairn.repo.tree import Tree
from cairn.stages.recode import BlobDecoder, CairnDecoder
from cairn.stages.snapshots import SnapshotFilter, load_snapshots

log = structlog.get_logger("cairn.copy")


class CopySource(Protocol):
    """A repository to copy snapshots from: its snapshots, trees and blobs.

    ``backend`` serves the pack ranges; ``decoder`` (pickled to the workers) turns a
    stored blob back into its plaintext and verifies it.
    """

    backend: Any
    decoder: BlobDecoder

    async def snapshots(self) -> list[tuple[str, Snapshot]]:
        """Every readable snapshot with its ID, oldest first."""
        ...

    async def load_tree(self, tree_id: bytes) -> Tree:
        """One tree (``RepoError`` when it cannot be read)."""
        ...

    def locate(self, blob_id: bytes) -> tuple[bytes, int, int, int] | None:
        """Where a data blob is stored: ``(pack ID, offset, length, plaintext length)``."""
        ...


class CairnSource:
    """A cairn repository as a copy source (its index loaded)."""

    def __init__(self, repo: Repository) -> None:
        if repo.index is None:
            raise ValueError("load the source's index first")
        self.repo = repo
        self.backend = repo.backend
        self.decoder: BlobDecoder = CairnDecoder(repo.crypto)
        self._index = repo.index

    async def snapshots(self) -> list[tuple[str, Snapshot]]:
        return list(await load_snapshots(self.repo))

    async def load_tree(self, tree_id: bytes) -> Tree:
        return await self.repo.load_tree(tree_id)

    def locate(self, blob_id: bytes) -> tuple[bytes, int, int, int] | None:
        loc = self._index.lookup(blob_id)
        if loc is None or loc.type != DATA:
            return None
        return loc.pack_id, loc.offset, loc.length, loc.raw_length


class SnapshotRefError(RepoError):
    """A snapshot named on the command line is not in the source."""

    exit_code = 1


def similar(a: Snapshot, b: Snapshot) -> bool:
    """restic's test that ``b`` is a copy of ``a``: same time, host, user, paths,
    tags and excludes (the trees differ: blob IDs are keyed)."""
    return (
        a.time_ns == b.time_ns
        and a.hostname == b.hostname
        and a.username == b.username
        and sorted(a.paths) == sorted(b.paths)
        and sorted(a.tags) == sorted(b.tags)
        and sorted(a.excludes) == sorted(b.excludes)
    )


def persistent_id(snapshot_id: str, snap: Snapshot) -> str:
    """The ID a snapshot and all its copies share: the first one's."""
    return snap.original or snapshot_id


def select_snapshots(
    source: Sequence[tuple[str, Snapshot]], refs: Sequence[str], flt: SnapshotFilter
) -> list[tuple[str, Snapshot]]:
    """The source snapshots to copy, oldest first: those named (ID prefixes or
    ``latest``, which the filters narrow), else every one the filters match."""
    matching = [(i, s) for i, s in source if flt.matches(s)]
    if not refs:
        return matching
    chosen: dict[str, Snapshot] = {}
    for ref in refs:
        if ref == "latest":
            if not matching:
                raise SnapshotRefError("no snapshot in the source matches the filters")
            sid, snap = matching[-1]
        else:
            found = [(i, s) for i, s in source if i.startswith(ref.lower())]
            if not found:
                raise SnapshotRefError(f"no snapshot in the source matches ID {ref!r}")
            if len(found) > 1:
                raise SnapshotRefError(
                    f"ID {ref!r} matches {len(found)} snapshots of the source; give more characters"
                )
            sid, snap = found[0]
        chosen[sid] = snap
    return sorted(chosen.items(), key=lambda item: (item[1].time_ns, item[0]))


def copies_in(
    dest: Sequence[tuple[str, Snapshot]], source: Sequence[tuple[str, Snapshot]]
) -> dict[str, tuple[str, Snapshot]]:
    """Source snapshot ID → its copy already in the destination ``(ID, snapshot)``."""
    by_persistent: dict[str, list[tuple[str, Snapshot]]] = {}
    for did, dsnap in dest:
        by_persistent.setdefault(persistent_id(did, dsnap), []).append((did, dsnap))
    out = {}
    for sid, snap in source:
        for did, dsnap in by_persistent.get(persistent_id(sid, snap), []):
            if similar(snap, dsnap):
                out[sid] = (did, dsnap)
                break
    return out


def earlier_copy(
    snap: Snapshot,
    earlier: dict[str, tuple[str, Snapshot]],
    source_snapshots: Sequence[tuple[str, Snapshot]],
    used: set[str],
) -> tuple[str, bytes, bytes] | None:
    """The source snapshot copied before (not in ``used``) that best predicts
    ``snap``, as ``(its ID, its tree, its copy's tree)``: the same host and paths (as
    a backup's parent), else the same paths, else any; older before newer; the
    latest. None if nothing was copied before."""
    paths = sorted(snap.paths)
    candidates = [
        (
            s.hostname == snap.hostname and sorted(s.paths) == paths,
            sorted(s.paths) == paths,
            s.time_ns <= snap.time_ns,
            s.time_ns,
            i,
            s.tree,
        )
        for i, s in source_snapshots
        if i in earlier and i not in used
    ]
    if not candidates:
        return None
    best = max(candidates)
    sid, tree = best[-2], best[-1]
    return sid, tree, earlier[sid][1].tree


async def map_copied_trees(
    source: CopySource,
    dest: Repository,
    src_root: bytes,
    dst_root: bytes,
    blobs: dict[bytes, bytes],
    trees: dict[bytes, bytes],
) -> None:
    """Walk a source tree and its copy side by side, entry by entry (by name), and
    note in ``blobs`` and ``trees`` the destination ID of every data blob and tree
    found in both. Only what the destination's index holds is trusted; a tree that
    cannot be read only means less is known (its blobs are then copied again)."""
    index = dest.index
    if index is None:
        raise ValueError("load the destination's index first")
    pairs = [(src_root, dst_root)]
    while pairs:
        src_tree, dst_tree = pairs.pop()
        if src_tree in trees or dst_tree not in index:
            continue
        try:
            src_nodes = (await source.load_tree(src_tree)).nodes
            dst_nodes = (await dest.load_tree(dst_tree)).nodes
        except (RepoError, NotFound) as exc:
            log.info("copy.seed_skipped", tree=src_tree.hex(), error=str(exc))
            continue
        dst_by_name = {n.name: n for n in dst_nodes}
        for node in src_nodes:
            other = dst_by_name.get(node.name)
            if other is None or other.type != node.type:
                continue
            if node.type == "dir" and node.subtree and other.subtree:
                pairs.append((node.subtree, other.subtree))
            elif node.type == "file" and len(node.content) == len(other.content):
                for a, b in zip(node.content, other.content, strict=True):
                    if b in index:
                        blobs.setdefault(a, b)
        trees[src_tree] = dst_tree
