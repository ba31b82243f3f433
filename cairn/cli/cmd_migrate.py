"""``cairn migrate --to LOCATION``: the same repository, copied to another backend.

The source is the global ``-r`` repository with every global flag; it is opened
(password needed: its config and locks are encrypted) to take a shared lock and to
know its ID and key, which are what tell the destination's config apart from another
repository's. See docs/migrate.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import anyio
import click

from cairn.backends.location import redact_location
from cairn.cli.common import (
    make_throttles,
    open_backend,
    open_repo,
    report_item_errors,
    run_async,
)
from cairn.cli.errors import EXIT_FATAL, EXIT_OK, print_error
from cairn.cli.memory import unmap_bulk_buffers
from cairn.cli.progress import Status, track
from cairn.config.settings import Settings

#: Tests only: a fault spec for the destination's backend (``CAIRN_TEST_FAULTS`` is
#: the source's, as for every command).
DEST_FAULTS_ENV_VAR = "CAIRN_TEST_DEST_FAULTS"


def _options(_ctx: click.Context, _param: click.Parameter, pairs: tuple[str, ...]) -> Any:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


def _percent(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    if not 0 <= value <= 100:
        raise click.BadParameter(f"expected a percentage from 0 to 100, got {value}")
    return value


@click.command("migrate")
@click.option("--to", "to", required=True, metavar="LOCATION", help="Destination location.")
@click.option(
    "--to-option",
    "to_options",
    multiple=True,
    callback=_options,
    metavar="KEY=VALUE",
    help="A backend option for the destination (as -o is for the source); repeatable.",
)
@click.option(
    "--verify-sample",
    type=float,
    default=1.0,
    show_default=True,
    callback=_percent,
    metavar="PERCENT",
    help="Re-read this share of the objects written and of those already present.",
)
@click.option(
    "--verify-existing",
    is_flag=True,
    help="Hash-check every object already at the destination (reads all of it).",
)
@click.option("--delete", is_flag=True, help="Remove what the source no longer has, last.")
@click.option("--dry-run", "-n", is_flag=True, help="Only say what would be transferred.")
@click.option("--seed", type=int, hidden=True, help="Seed of the verify sample (tests).")
@click.option(
    "--whole-listing",
    type=click.IntRange(min=0),
    hidden=True,
    help="List data/ shard by shard beyond this many packs at the destination (tests).",
)
@click.pass_obj
def command(
    settings: Settings,
    to: str,
    to_options: dict[str, str],
    verify_sample: float,
    verify_existing: bool,
    delete: bool,
    dry_run: bool,
    seed: int | None,
    whole_listing: int | None,
) -> int:
    """Copy the repository, as it is, to another backend (or keep a replica current)."""
    from cairn.stages.migrate import MigrateOptions

    options = MigrateOptions(
        verify_sample=verify_sample,
        verify_existing=verify_existing,
        delete=delete,
        dry_run=dry_run,
        seed=seed,
    )
    if whole_listing is not None:
        options = replace(options, whole_listing=whole_listing)
    # Only the location and its options differ (not --repository-file's, which names
    # the source).
    dest_settings = replace(settings, repo=to, repository_file=None, backend_options=to_options)
    unmap_bulk_buffers()
    started = time.monotonic()
    migrator = run_async(lambda: _migrate(settings, dest_settings, options))
    stats = migrator.stats
    report_item_errors(settings, stats.errors, "migrate")
    _summary(settings, migrator, dry_run, time.monotonic() - started)
    if stats.errors:
        message = f"{len(stats.errors)} objects could not be migrated"
        print_error(message, as_json=settings.json, code=EXIT_FATAL)
        return EXIT_FATAL
    return EXIT_OK


async def _migrate(settings: Settings, dest_settings: Settings, options: Any) -> Any:
    from cairn.stages.locking import repository_lock
    from cairn.stages.migrate import Migrator

    # One pair of token buckets for both sides: --limit-upload bounds what is sent
    # to the destination, --limit-download what is read (from either side). The
    # destination is parsed first: a bad --to fails before the password is asked.
    throttles = make_throttles(settings)
    dest, _ = open_backend(dest_settings, throttles, DEST_FAULTS_ENV_VAR)
    try:
        async with open_repo(settings, throttles=throttles) as repo:
            options = replace(
                options,
                transfers=settings.connections or dest.connections,
                lock=not settings.no_lock,
                retry_lock=settings.retry_lock,
            )
            migrator = Migrator(repo, repo.backend, dest, options)
            async with track(settings, "migrate", lambda: _status(migrator)) as reporter:
                # Totals (for percent and ETA) cost a second listing of the source.
                totals = reporter.active
                if settings.no_lock:
                    await migrator.run(count_totals=totals)
                else:
                    async with repository_lock(
                        repo, exclusive=False, retry_seconds=settings.retry_lock
                    ):
                        await migrator.run(count_totals=totals)
    finally:
        with anyio.CancelScope(shield=True):
            await dest.aclose()
    return migrator


def _status(migrator: Any) -> Status:
    s = migrator.stats
    objects = s.objects_total if s.objects_total is not None else s.objects_listed
    size = s.bytes_total if s.bytes_total is not None else s.bytes_listed
    return Status(
        total_files=max(objects, s.objects_done),
        files_done=s.objects_done,
        total_bytes=max(size, s.bytes_done),
        bytes_done=s.bytes_done,
        error_count=len(s.errors),
        bytes_uploaded=s.bytes_sent,
    )


def _summary(settings: Settings, migrator: Any, dry_run: bool, elapsed: float) -> None:
    from cairn.cli.stagetable import echo_table, summary_fields

    s = migrator.stats
    last = s.pipelines[2] if len(s.pipelines) > 2 else None  # data/: the phase that counts
    if settings.json:
        summary = {
            "message_type": "summary",
            "dry_run": dry_run,
            "destination": redact_location(migrator.dest.location),
            "objects_total": s.objects_listed,
            "bytes_total": s.bytes_listed,
            "objects_present": s.objects_present,
            "bytes_present": s.bytes_present,
            "objects_sent": s.objects_sent,
            "bytes_sent": s.bytes_sent,
            "objects_verified": s.objects_verified,
            "bytes_verified": s.bytes_verified,
            "objects_repaired": s.objects_repaired,
            "objects_deleted": s.objects_deleted,
            "bytes_deleted": s.bytes_deleted,
            "errors": len(s.errors),
            "bytes_held_peak": s.held.peak,
            "seconds_elapsed": round(elapsed, 3),
            **summary_fields(last),
        }
        click.echo(json.dumps(summary))
        return
    echo_table(settings, last)
    if settings.quiet:
        return
    from rich.filesize import decimal

    where = redact_location(migrator.dest.location)
    verb = "would send" if dry_run else "sent"
    if s.objects_sent == 0 and s.objects_deleted == 0 and not s.errors:
        click.echo(f"{where} is up to date: nothing to transfer ({s.objects_present} objects)")
    else:
        click.echo(
            f"{verb} {s.objects_sent} objects ({decimal(s.bytes_sent)}) to {where}, "
            f"{s.objects_present} already there"
        )
    extras = []
    if s.objects_verified:
        extras.append(f"verified {s.objects_verified} objects by reading them back")
    if s.objects_repaired:
        extras.append(f"repaired {s.objects_repaired}")
    if s.objects_deleted:
        deleted = "would delete" if dry_run else "deleted"
        extras.append(f"{deleted} {s.objects_deleted} objects the source no longer has")
    if extras:
        click.echo("; ".join(extras))
