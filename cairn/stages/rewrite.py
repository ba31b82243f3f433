"""``rewrite``: new snapshots without excluded paths, or with new metadata.

Each selected snapshot's trees are rewritten bottom-up by the shared
:class:`~cairn.stages.treerewrite.TreeRewriter`: an entry whose path matches an
exclude pattern (backup's rules, :mod:`cairn.stages.excludes`) is left out, and only
the trees above it change — every other subtree keeps its ID and is shared with the
original. A snapshot in which nothing matches (and no new metadata is asked for) is
left alone. With include patterns instead (restic 0.19), only the files they match
stay, with the directories above them and the directories they match; a snapshot in
which nothing is included is left alone.

The new snapshot keeps everything else (time, host, paths, tags, parent…), gets
``original`` (the ID it replaces), the tag ``rewrite`` unless the original is
forgotten, and — when files were excluded — the summary's
``total_files_processed``/``total_bytes_processed`` recounted, as restic does.

Order, as everywhere: new trees (packs, then index) before the new snapshot, the new
snapshot before the old one is removed (``--forget``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from cairn.backends.base import NotFound, object_name
from cairn.repo.errors import CorruptedObject, ObjectNotFound, RepoError
from cairn.repo.tree import Node
from cairn.stages.treerewrite import TreeRewriter, show_path

if TYPE_CHECKING:
    from cairn.repo.index import Index
    from cairn.repo.repository import Repository
    from cairn.repo.snapshot import Snapshot
    from cairn.stages.excludes import ExcludeRules

log = structlog.get_logger("cairn.rewrite")

REWRITE_TAG = "rewrite"
_TOTALS = ("total_files_processed", "total_bytes_processed")


class RewriteFailed(RepoError):
    """A selected snapshot's trees cannot be read; nothing was written."""


@dataclass(frozen=True)
class RewriteOptions:
    """What to change. ``rules``: the excludes; ``includes``: the include patterns
    (as exclude rules: a path they match is kept); at most one of them."""

    rules: ExcludeRules | None = None
    includes: ExcludeRules | None = None
    new_host: str | None = None
    new_time_ns: int | None = None
    snapshot_summary: bool = False  # add the file totals to summaries lacking them
    forget: bool = False
    dry_run: bool = False
    level: int = 3

    @property
    def new_metadata(self) -> bool:
        return self.new_host is not None or self.new_time_ns is not None


@dataclass
class Rewritten:
    """One snapshot rewritten (``new_id`` None on a dry run) and what it lost."""

    old_id: str
    new_id: str | None
    excluded: list[str] = field(default_factory=list)
    forgotten: bool = False


class _Filter(TreeRewriter):
    """Leaves out every entry whose path an exclude pattern matches (noting it) or,
    with includes, every file no include pattern matches and every directory left
    empty that none matches (restic's include filter)."""

    by_path = True

    def __init__(self, repo: Repository, index: Index, opts: RewriteOptions) -> None:
        super().__init__(repo, index, opts.level)
        self.rules = opts.rules
        self.includes = opts.includes
        self._totals: dict[bytes, tuple[int, int]] = {}

    async def edit_node(self, node: Node, path: bytes, notes: list[str]) -> Node | None:
        if self.rules is not None and self.rules.excluded_path(path):
            notes.append("/" + show_path(node.name))
            return None
        if self.includes is None or node.type == "dir":
            return node  # a directory may hold included entries: see keep_empty
        return node if self.includes.excluded_path(path) else None

    def keep_empty(self, path: bytes) -> bool:
        return self.includes is None or self.includes.excluded_path(path)

    async def totals(self, tree_id: bytes) -> tuple[int, int]:
        """Files and their bytes below a tree (new or stored), each tree counted once
        per run however many snapshots share it."""
        done = self._totals.get(tree_id)
        if done is not None:
            return done
        files = size = 0
        for node in (await self.read(tree_id)).nodes:
            if node.type == "file":
                files += 1
                size += node.size
            elif node.type == "dir" and node.subtree is not None:
                sub_files, sub_size = await self.totals(node.subtree)
                files += sub_files
                size += sub_size
        self._totals[tree_id] = (files, size)
        return files, size


async def rewrite_snapshots(
    repo: Repository, snapshots: list[tuple[str, Snapshot]], opts: RewriteOptions
) -> list[Rewritten]:
    """Rewrite ``snapshots`` as ``opts`` says; the ones changed (or that would be)."""
    index = repo.index if repo.index is not None else await repo.load_index()
    rewriter = _Filter(repo, index, opts)
    plans = []
    for sid, snap in snapshots:
        try:
            new_root, excluded = await rewriter.rewrite(snap.tree)
        except (CorruptedObject, ObjectNotFound) as exc:
            raise RewriteFailed(
                f"unable to rewrite snapshot {sid[:8]}: {exc}; nothing was written "
                "(`cairn check` tells more, `cairn repair snapshots` repairs it)"
            ) from None
        if opts.includes is not None and new_root in rewriter.empty:
            continue  # nothing included: left alone, as restic does
        summary = dict(snap.summary)
        if new_root != snap.tree or (
            opts.snapshot_summary and any(k not in summary for k in _TOTALS)
        ):
            summary.update(zip(_TOTALS, await rewriter.totals(new_root), strict=True))
        if new_root == snap.tree and summary == snap.summary and not opts.new_metadata:
            continue
        plans.append((sid, snap, new_root, summary, excluded))
    if opts.dry_run:
        return [Rewritten(sid, None, excluded, opts.forget) for sid, *_r, excluded in plans]
    await rewriter.flush()
    out = []
    for sid, snap, new_root, summary, excluded in plans:
        tags = list(snap.tags)
        if not opts.forget and REWRITE_TAG not in tags:
            tags.append(REWRITE_TAG)
        new = dataclasses.replace(
            snap,
            tree=new_root,
            tags=tags,
            summary=summary,
            original=sid,  # restic: the snapshot this one replaces, not the first
            hostname=opts.new_host if opts.new_host is not None else snap.hostname,
            time_ns=opts.new_time_ns if opts.new_time_ns is not None else snap.time_ns,
        )
        new_id = await repo.save_snapshot(new)
        if opts.forget:
            try:
                await repo.backend.remove(object_name("snapshots", sid))
            except NotFound:
                pass  # removed meanwhile (a concurrent forget): what we wanted
        log.info("rewrite.snapshot", old=sid, new=new_id, excluded=len(excluded))
        out.append(Rewritten(sid, new_id, excluded, opts.forget))
    return out
