"""``cairn check``: verify the repository's structure and, optionally, its data."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import click

from cairn.cli.common import concurrency, open_repo, run_async, snapshot_filter_options
from cairn.cli.errors import EXIT_FATAL, EXIT_OK, UsageError, print_error
from cairn.cli.stagetable import echo_table, summary_fields
from cairn.config.settings import Settings


def _subset(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from cairn.stages.check import parse_subset

    try:
        return parse_subset(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("check")
@click.argument("snapshot_ids", nargs=-1, metavar="[SNAPSHOT_ID]...")
@click.option("--read-data", is_flag=True, help="Download and verify every pack and blob.")
@click.option(
    "--read-data-subset",
    "subset",
    callback=_subset,
    help="Read only a subset of packs: n/t, x% or a size like 500M.",
)
@click.option("--seed", type=int, hidden=True, help="Seed for random subsets (tests).")
@snapshot_filter_options
@click.pass_obj
def command(
    settings: Settings,
    snapshot_ids: tuple[str, ...],
    read_data: bool,
    subset: Any,
    seed: int | None,
    flt: Any,
) -> int:
    """Check the repository for errors; exit 1 if any are found.

    With snapshot IDs or --host/--path/--tag, only the trees of those snapshots are
    walked and, with --read-data, only the packs holding their blobs are read; the
    index and the pack headers are checked in full.
    """
    from cairn.stages.check import CheckOptions, Problem

    if read_data and subset is not None:
        raise UsageError("--read-data and --read-data-subset cannot be used together")
    options = CheckOptions(
        read_data=read_data or subset is not None,
        subset=subset,
        seed=seed,
        snapshot_filter=flt,
        snapshot_ids=snapshot_ids,
    )

    def report(problem: Problem) -> None:
        if settings.json:
            click.echo(json.dumps(problem.as_json()))
        elif not (settings.quiet and problem.severity == "info"):
            # Problems go to stdout, one per line, so they can be grepped and counted.
            click.echo(problem.line())

    started = time.monotonic()
    result = run_async(lambda: _check(settings, options, report))
    errors = len(result.errors)
    summary = {
        "message_type": "summary",
        "errors": errors,
        # restic's names (check --json): the same count, the packs with errors (for
        # `repair packs`), and whether `repair index` or `prune` would help.
        "num_errors": errors,
        "broken_packs": sorted({p.id for p in result.errors if p.kind == "pack"}),
        "suggest_repair_index": any(p.kind == "index" for p in result.errors),
        "suggest_prune": any(p.kind == "pack" and p.severity == "warning" for p in result.problems),
        "filtered": options.filtered,
        "warnings": sum(p.severity == "warning" for p in result.problems),
        "snapshots": result.snapshots,
        "trees": result.trees,
        "data_blobs": result.data_blobs,
        "packs": result.packs,
        "index_files": result.index_files,
        "packs_read": result.packs_read,
        "bytes_read": result.bytes_read,
        "seconds_elapsed": round(time.monotonic() - started, 3),
        **summary_fields(result.pipeline),
    }
    echo_table(settings, result.pipeline)
    if settings.json:
        click.echo(json.dumps(summary))
    elif not settings.quiet:
        read = f", read {result.packs_read} packs" if options.read_data else ""
        click.echo(
            f"checked {result.snapshots} snapshots, {result.trees} trees, "
            f"{result.data_blobs} data blobs, {result.packs} packs{read}: "
            + (f"{errors} errors" if errors else "no errors were found")
        )
    if errors:
        print_error(f"check found {errors} errors", as_json=settings.json, code=EXIT_FATAL)
        return EXIT_FATAL
    return EXIT_OK


async def _check(settings: Settings, options: Any, report: Any) -> Any:
    from cairn.stages.check import Checker
    from cairn.stages.locking import repository_lock

    async with open_repo(settings, workers=True) as repo:
        # Check what the backend holds, not the local cache's copies (restic, too,
        # checks with a fresh cache).
        repo.cache = None
        widths = concurrency(settings, repo.backend)
        options = replace(options, cpu_workers=widths.cpu_workers, connections=widths.connections)
        if settings.no_lock:
            return await Checker(repo, options, report).run()
        async with repository_lock(repo, exclusive=False, retry_seconds=settings.retry_lock):
            return await Checker(repo, options, report).run()
