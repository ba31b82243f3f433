"""``cairn restore SNAPSHOT[:SUBPATH] --target DIR``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

import click
import structlog

from cairn.cli.common import (
    concurrency,
    open_repo,
    report_item_errors,
    run_async,
    snapshot_filter_options,
)
from cairn.cli.errors import EXIT_FATAL, EXIT_OK
from cairn.cli.progress import restore_status, track
from cairn.cli.stagetable import echo_table, summary_fields
from cairn.config.settings import Settings

log = structlog.get_logger("cairn.restore")


@click.command("restore")
@click.argument("snapshot")
@click.option("-t", "--target", required=True, help="Directory to restore into.")
@click.option("-i", "--include", "includes", multiple=True, help="Only restore matching paths.")
@click.option("-e", "--exclude", "excludes", multiple=True, help="Skip matching paths.")
@snapshot_filter_options
@click.option(
    "--overwrite",
    type=click.Choice(["always", "if-changed", "if-newer", "never"]),
    default="always",
    show_default=True,
    help="What to do with existing files (identical ones are never rewritten).",
)
@click.option("--delete", is_flag=True, help="Remove target files not in the snapshot.")
@click.option("--sparse", is_flag=True, help="Leave all-zero blocks as holes.")
@click.option("--verify", is_flag=True, help="Re-read restored files and check them.")
@click.option("-n", "--dry-run", is_flag=True, help="Only say what would be restored.")
@click.pass_obj
def command(settings: Settings, snapshot: str, target: str, **opts: Any) -> int:
    """Restore a snapshot (or SNAPSHOT:SUBPATH) into --target."""
    from cairn.stages.restore import RestoreOptions

    options = RestoreOptions(
        target=os.fsencode(os.path.abspath(target)),
        includes=list(opts["includes"]),
        excludes=list(opts["excludes"]),
        overwrite=opts["overwrite"],
        delete=opts["delete"],
        sparse=opts["sparse"],
        verify=opts["verify"],
        dry_run=opts["dry_run"],
    )
    started = time.time()
    log.info("restore.started", snapshot=snapshot, target=target, dry_run=options.dry_run)
    sid, stats = run_async(lambda: _restore(settings, snapshot, options, opts))
    duration = time.time() - started
    log.info(
        "restore.finished",
        snapshot_id=sid,
        files=stats.files,
        files_skipped=stats.files_skipped,
        bytes=stats.bytes_written,
        errors=len(stats.errors),
        duration=round(duration, 3),
    )
    if settings.verbosity > 0 and not settings.json:
        verb = "would delete" if options.dry_run else "deleted"
        for path in stats.deleted_paths:
            click.echo(f"{verb} {path}")
    report_item_errors(settings, stats.errors, "restore")
    summary = {
        "message_type": "summary",
        "snapshot_id": sid,
        "files_restored": stats.files,
        "files_skipped": stats.files_skipped,
        "dirs": stats.dirs,
        "other": stats.others,
        "total_bytes": stats.bytes_total,
        "bytes_restored": stats.bytes_written,
        "deleted": stats.deleted,
        "verified": stats.verified,
        "errors": len(stats.errors),
        "dry_run": options.dry_run,
        "seconds_elapsed": round(duration, 3),
        **summary_fields(stats.pipeline),
    }
    echo_table(settings, stats.pipeline)
    if settings.json:
        click.echo(json.dumps(summary))
    elif not settings.quiet:
        verb = "would restore" if options.dry_run else "restored"
        click.echo(
            f"{verb} snapshot {sid[:8]}: {stats.files} files written, "
            f"{stats.files_skipped} already correct, {stats.dirs} dirs, "
            f"{stats.bytes_written} bytes in {duration:.2f}s"
        )
        if options.delete:
            click.echo(
                f"{'would delete' if options.dry_run else 'deleted'} {stats.deleted} entries"
            )
        if options.verify:
            click.echo(f"verified {stats.verified} files")
        if stats.errors:
            n = len(stats.errors)
            noun = "entry" if n == 1 else "entries"
            click.echo(f"{n} {noun} could not be restored (see the warnings)")
    return EXIT_FATAL if stats.errors else EXIT_OK


async def _restore(settings: Settings, ref: str, options: Any, opts: dict[str, Any]) -> Any:
    from cairn.repo.errors import ObjectNotFound
    from cairn.stages.browse import find_node
    from cairn.stages.locking import repository_lock
    from cairn.stages.restore import Restorer
    from cairn.stages.snapshots import find_snapshot, split_snapshot_ref

    snap_ref, subpath = split_snapshot_ref(ref)
    flt = opts["flt"]
    async with (
        open_repo(settings, workers=not options.dry_run) as repo,
        repository_lock(repo, exclusive=False, retry_seconds=settings.retry_lock),
    ):
        sid, snap = await find_snapshot(repo, snap_ref, flt)
        index = await repo.load_index()
        tree_id, node = await find_node(repo, snap.tree, os.fsencode(subpath))
        if tree_id is None and node is None:
            raise ObjectNotFound(f"path {subpath!r} not found in the snapshot")
        widths = concurrency(settings, repo.backend)
        options = replace(options, cpu_workers=widths.cpu_workers, connections=widths.connections)
        restorer = Restorer(repo, index, options)
        await restorer.plan(tree_id, node)
        async with track(settings, "restore", lambda: restore_status(restorer)):
            stats = await restorer.run()
    return sid, stats
