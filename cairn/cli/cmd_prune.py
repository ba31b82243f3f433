"""``cairn prune``: remove data no snapshot references."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click
import structlog

from cairn.cli.common import SIZE, concurrency, human_bytes, open_repo, run_async
from cairn.cli.errors import EXIT_OK, UsageError
from cairn.cli.stagetable import echo_table, summary_fields
from cairn.config.settings import Settings
from cairn.pipeline import PipelineSnapshot

if TYPE_CHECKING:
    from cairn.repo.repository import Repository


def check_prune_flags(settings: Settings, opts: dict[str, Any]) -> None:
    """Flags that exclude each other (restic's checks, before the repository is opened)."""
    smaller = opts.get("repack_smaller_than")
    if smaller is not None and smaller <= 0:
        raise UsageError("--repack-smaller-than must be larger than zero")
    off = settings.compression.strip().lower() in ("off", "0")
    if opts.get("repack_uncompressed") and off:
        raise UsageError("--compression off and --repack-uncompressed exclude each other")


def _max_unused(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from cairn.stages.prune import max_unused_limit

    try:
        max_unused_limit(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


prune_options = [
    click.option(
        "--max-unused",
        default="5%",
        show_default=True,
        callback=_max_unused,
        help="Tolerated unused space: x%, a size, or 'unlimited'.",
    ),
    click.option("--max-repack-size", type=SIZE, help="Repack at most this much (e.g. 1G)."),
    click.option(
        "--repack-smaller-than",
        type=SIZE,
        metavar="SIZE",
        help="Packs below SIZE are small: merged when there are ten or more "
        "(default: 80% of max(4 MiB, 3rd percentile of pack sizes)).",
    ),
    click.option(
        "--repack-cacheable-only",
        is_flag=True,
        help="Only repack tree packs (data packs are kept unless wholly unused).",
    ),
    # restic deprecated --repack-small when small packs started to merge by
    # themselves; accepted (and ignored) so that older scripts run.
    click.option("--repack-small", is_flag=True, hidden=True),
    click.option(
        "--repack-uncompressed",
        is_flag=True,
        help="Accepted for restic's scripts; cairn compresses every blob it can "
        "(docs/maintenance.md).",
    ),
]


def prune_settings(
    settings: Settings, repo: Repository, opts: dict[str, Any], dry_run: bool
) -> Any:
    """PruneOptions from the command's flags and the global settings."""
    from cairn.stages.prune import PruneOptions

    pack_size = (settings.pack_size or 0) * 1024 * 1024 or repo.config.pack_size
    widths = concurrency(settings, repo.backend)
    check_prune_flags(settings, opts)
    if opts.get("repack_uncompressed"):
        # Accepted so that restic's scripts run, and changes nothing: cairn stores a
        # blob raw only when zstd does not shrink it (or with --compression off), and
        # the index cannot tell the two apart, so "repack what is uncompressed" would
        # rewrite every pack of incompressible data on every run (docs/maintenance.md).
        structlog.get_logger("cairn.prune").info(
            "prune.repack_uncompressed_ignored", reason="blobs are compressed when it helps"
        )
    smaller = opts.get("repack_smaller_than")
    if smaller is not None and smaller > pack_size:
        raise UsageError(
            f"--repack-smaller-than {smaller} exceeds the pack size ({pack_size} bytes): "
            "every pack would be small"
        )
    return PruneOptions(
        max_unused=opts["max_unused"],
        max_repack_size=opts["max_repack_size"],
        repack_smaller_than=smaller,
        repack_cacheable_only=bool(opts.get("repack_cacheable_only")),
        dry_run=dry_run,
        connections=widths.connections,
        cpu_workers=widths.cpu_workers,
        pack_size=pack_size,
    )


async def run_prune(
    repo: Repository, options: Any
) -> tuple[dict[str, Any], PipelineSnapshot | None]:
    """Plan, and unless a dry run, execute; the summary as a dict, and the repack
    pipeline's final counters (for ``print_prune``'s ``-v`` table). The summary's
    ``stages`` and ``bottleneck`` are ``[]`` and ``null`` when nothing was repacked.
    Caller holds the lock."""
    from cairn.stages.prune import execute_prune, plan_prune

    plan = await plan_prune(repo, options)
    out: dict[str, Any] = {"message_type": "prune", **plan.summary(), "dry_run": options.dry_run}
    # The packs themselves (``print_prune`` shows them with -v only).
    out["pack_ids"] = {
        "delete": sorted(p.id for p in plan.with_action("delete")),
        "repack": sorted(p.id for p in plan.with_action("repack")),
        "unindexed": sorted(plan.unindexed),
    }
    pipeline = None
    if not options.dry_run:
        result = await execute_prune(repo, plan, options)
        pipeline = result.pipeline
        out |= {
            "packs_written": result.packs_written,
            "bytes_written": result.bytes_written,
            "packs_deleted": result.packs_deleted,
            "bytes_deleted": result.bytes_deleted,
            "index_files_written": len(result.index_written),
            "index_files_deleted": result.index_deleted,
            "stale_temporaries_removed": len(await _remove_stale_temporaries(repo)),
            "retained_kept": result.retained,
        }
    return out | summary_fields(pipeline), pipeline


#: Temporary files of a local repository older than this are left by killed
#: processes (an upload in progress keeps touching its file).
STALE_TEMPORARY_SECONDS = 3600


async def _remove_stale_temporaries(repo: Repository) -> list[str]:
    """``.tmp-*`` files a killed process left in a local repository (restic's
    prune, too, cleans up after interrupted writes)."""
    from cairn.backends.local import LocalBackend, remove_stale_temporaries

    inner = repo.backend
    while hasattr(inner, "inner"):
        inner = inner.inner
    if not isinstance(inner, LocalBackend):
        return []
    return await remove_stale_temporaries(inner, STALE_TEMPORARY_SECONDS)


def print_prune(
    settings: Settings, out: dict[str, Any], pipeline: PipelineSnapshot | None = None
) -> None:
    """Text or JSON report of a prune (with ``-v``, the repack's stage table and the
    IDs of the packs deleted and repacked — ``pack_ids`` in JSON)."""
    if not settings.verbosity:
        out = {k: v for k, v in out.items() if k != "pack_ids"}
    if settings.json:
        click.echo(json.dumps(out))
        return
    echo_table(settings, pipeline)
    if settings.quiet:
        return
    verb = "would" if out["dry_run"] else "will"
    click.echo(
        f"used: {out['used_blobs']} blobs, {human_bytes(out['used_bytes'])}; "
        f"unused: {human_bytes(out['unused_bytes'])}"
    )
    click.echo(
        f"{verb} delete {out['packs_delete']} packs and {out['packs_unindexed']} unindexed "
        f"packs ({human_bytes(out['bytes_delete'])}), repack {out['packs_repack']} packs "
        f"({human_bytes(out['bytes_repack'])}); unused afterwards: "
        f"{human_bytes(out['unused_bytes_after'])}"
    )
    for what, ids in out.get("pack_ids", {}).items():
        if ids:
            label = "unindexed packs" if what == "unindexed" else "packs"
            click.echo(f"{verb} {'delete' if what == 'unindexed' else what} {label}:")
            for pack_id in ids:
                click.echo(f"  {pack_id}")
    if out["packs_missing"]:
        click.echo(f"{out['packs_missing']} packs listed in the index are missing; dropping them")
    if not out["dry_run"]:
        click.echo(
            f"wrote {out['packs_written']} packs ({human_bytes(out['bytes_written'])}), deleted "
            f"{out['packs_deleted']} packs ({human_bytes(out['bytes_deleted'])}), replaced "
            f"{out['index_files_deleted']} index files by {out['index_files_written']}"
        )
        if out["retained_kept"]:
            click.echo(
                f"kept {out['retained_kept']} files still under retention (S3 Object Lock); "
                "a later prune removes them once it has ended"
            )
        if out["stale_temporaries_removed"]:
            click.echo(
                f"removed {out['stale_temporaries_removed']} temporary files left by "
                "interrupted writes"
            )


def _decorate(func: Any) -> Any:
    for option in reversed(prune_options):
        func = option(func)
    return func


@click.command("prune")
@click.option("-n", "--dry-run", is_flag=True, help="Only show what would be done.")
@_decorate
@click.pass_obj
def command(settings: Settings, dry_run: bool, **opts: Any) -> int:
    """Remove unreferenced data from the repository (takes an exclusive lock)."""
    from cairn.stages.locking import repository_lock

    check_prune_flags(settings, opts)  # before the repository is opened
    if settings.no_lock and not dry_run:
        raise UsageError("--no-lock is only allowed with prune --dry-run")

    async def main() -> tuple[dict[str, Any], PipelineSnapshot | None]:
        async with open_repo(settings) as repo:
            options = prune_settings(settings, repo, opts, dry_run)
            if settings.no_lock:  # a dry run changes nothing: it may run without a lock
                return await run_prune(repo, options)
            async with repository_lock(repo, exclusive=True, retry_seconds=settings.retry_lock):
                return await run_prune(repo, options)

    print_prune(settings, *run_async(main))
    return EXIT_OK
