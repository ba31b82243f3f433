"""One whole backup: find the parent snapshot, run the pipeline, save the snapshot.

The CLI opens and locks the repository, then calls :func:`run_backup` and prints
what it returns; everything between — the parent, the :class:`Archiver` run, the
summary statistics and the snapshot written last (after the index of every pack,
so a snapshot never names what no index lists) — happens here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from cairn import __version__
from cairn.pipeline import PipelineSnapshot
from cairn.repo.repository import Repository
from cairn.repo.snapshot import Snapshot
from cairn.stages.backup import Archiver, BackupOptions
from cairn.stages.snapshots import SnapshotFilter, find_snapshot, load_snapshots

# Wraps the archiver's run, e.g. to poll it for progress.
Watch = Callable[[Archiver], AbstractAsyncContextManager[Any]]


@dataclass
class BackupResult:
    """What a backup did: restic's summary fields, the snapshot saved (None on a
    dry run), its parent, per-path problems and the pipeline's final counters."""

    summary: dict[str, Any]
    snapshot_id: str | None
    parent: str | None
    errors: list[tuple[str, str]] = field(default_factory=list)
    dry_run: bool = False
    skipped: bool = False  # --skip-if-unchanged, and nothing had changed
    pipeline: PipelineSnapshot | None = None


def snapshot_paths(options: BackupOptions) -> list[str]:
    """The ``paths`` a snapshot of ``options`` records (and its parent must match)."""
    return [os.fsdecode(p) for p in options.paths] or [
        "/" + os.fsdecode(options.stdin_name or b"stdin")
    ]


GROUP_FIELDS = ("host", "paths", "tags")


def parse_group_by(text: str) -> frozenset[str]:
    """``--group-by host,paths,tags`` (any of them; empty: every snapshot is a
    candidate parent). Raises ``ValueError`` naming an unknown field."""
    fields = frozenset(f.strip() for f in text.split(",") if f.strip())
    unknown = sorted(fields - set(GROUP_FIELDS))
    if unknown:
        raise ValueError(f"--group-by: unknown field {unknown[0]!r} (host, paths, tags)")
    return fields


async def find_parent(
    repo: Repository,
    options: BackupOptions,
    parent_ref: str | None,
    group_by: frozenset[str] = frozenset({"host", "paths"}),
) -> tuple[str | None, bytes | None]:
    """``(snapshot ID, tree)`` of the parent: ``parent_ref`` if given, else the
    latest snapshot of the same group (``--group-by``: by default the same host and
    paths; none with --force or --stdin)."""
    if parent_ref:
        parent_id, parent_snap = await find_snapshot(repo, parent_ref)
        return parent_id, parent_snap.tree
    if options.force or options.stdin_name is not None:
        return None, None
    flt = SnapshotFilter(
        hosts=[options.host] if "host" in group_by else [],
        paths=snapshot_paths(options) if "paths" in group_by else [],
    )
    tags = sorted(set(options.tags))
    matching = [
        (i, s)
        for i, s in await load_snapshots(repo)
        if flt.matches(s) and ("tags" not in group_by or sorted(set(s.tags)) == tags)
    ]
    if not matching:
        return None, None
    return matching[-1][0], matching[-1][1].tree


async def run_backup(
    repo: Repository,
    options: BackupOptions,
    *,
    parent_ref: str | None = None,
    missing: list[tuple[str, str]] | None = None,
    username: str = "",
    watch: Watch | None = None,
    group_by: frozenset[str] = frozenset({"host", "paths"}),
    skip_if_unchanged: bool = False,
    before_snapshot: Callable[[], Awaitable[None]] | None = None,
) -> BackupResult:
    """Back up ``options.paths`` into a new snapshot of the (locked) ``repo``.

    ``missing``: paths left out before the run (counted as errors, as restic).
    ``watch(archiver)`` wraps the run (progress). ``before_snapshot()`` runs once
    the data is stored and may raise to save no snapshot (``--stdin-from-command``:
    the command failed). With ``skip_if_unchanged``, no snapshot is saved when the
    root tree is the parent's. Errors are raised as themselves.
    """
    started = time.time()
    missing = list(missing or [])
    index = await repo.load_index()
    parent_id, parent_tree = await find_parent(repo, options, parent_ref, group_by)
    archiver = Archiver(repo, index, options, None if options.force else parent_tree)
    async with watch(archiver) if watch is not None else nullcontext():
        root = await archiver.run()
    stats = archiver.stats
    packed = archiver.packer.stats
    summary: dict[str, Any] = {
        "files_new": stats.files_new,
        "files_changed": stats.files_changed,
        "files_unmodified": stats.files_unmodified,
        "dirs_new": stats.dirs_new,
        "dirs_changed": stats.dirs_changed,
        "dirs_unmodified": stats.dirs_unmodified,
        "data_blobs": packed.data_blobs,
        "tree_blobs": packed.tree_blobs,
        "data_added": packed.data_added,
        "data_added_packed": packed.data_added_packed,
        "total_files_processed": stats.files_new + stats.files_changed + stats.files_unmodified,
        "total_bytes_processed": stats.bytes_processed,
        "bytes_read": stats.bytes_read,
        "errors": len(missing) + len(stats.errors),
        "duration_seconds": round(time.time() - started, 3),
    }
    if before_snapshot is not None:
        await before_snapshot()
    snapshot_id = None
    skipped = skip_if_unchanged and parent_tree is not None and root == parent_tree
    if not options.dry_run and not skipped:
        snap = Snapshot(
            time_ns=int(started * 1e9),
            tree=root,
            paths=snapshot_paths(options),
            hostname=options.host,
            username=username,
            uid=os.getuid(),
            gid=os.getgid(),
            tags=list(options.tags),
            parent=parent_id,
            excludes=options.rules.as_list(),
            program_version=f"cairn {__version__}",
            summary=summary,
        )
        snapshot_id = await repo.save_snapshot(snap)
    return BackupResult(
        summary=summary,
        snapshot_id=snapshot_id,
        parent=parent_id,
        errors=missing + list(stats.errors),
        dry_run=options.dry_run,
        skipped=skipped,
        pipeline=archiver.snapshot(),
    )
