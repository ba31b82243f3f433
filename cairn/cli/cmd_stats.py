"""``cairn stats``: how big snapshots are, counted four ways."""

from __future__ import annotations

from typing import Any

import click

from cairn.cli.common import echo_json, open_repo, run_async, snapshot_filter_options
from cairn.cli.errors import EXIT_OK
from cairn.config.settings import Settings
from cairn.stages.stats import MODES


@click.command("stats")
@click.argument("ids", nargs=-1)
@click.option("--mode", type=click.Choice(MODES), default="restore-size", show_default=True)
@snapshot_filter_options
@click.pass_obj
def command(settings: Settings, ids: tuple[str, ...], mode: str, **opts: Any) -> int:
    """Show the size of the selected snapshots (all by default; 'latest' works)."""
    stats = run_async(lambda: _stats(settings, ids, mode, opts))
    out = stats.as_json()
    if settings.json:
        echo_json(out)
    elif not settings.quiet:
        click.echo(f"stats in {mode} mode:")
        for key, value in out.items():
            click.echo(f"  {key.replace('_', ' ')}: {value}")
    return EXIT_OK


async def _stats(settings: Settings, ids: tuple[str, ...], mode: str, opts: dict[str, Any]) -> Any:
    from cairn.stages.locking import repository_lock
    from cairn.stages.snapshots import find_snapshot, load_snapshots
    from cairn.stages.stats import compute_stats

    flt = opts["flt"]
    async with (
        open_repo(settings) as repo,
        repository_lock(repo, exclusive=False, retry_seconds=settings.retry_lock),
    ):
        if ids:
            trees = [(await find_snapshot(repo, ref, flt))[1].tree for ref in ids]
        else:
            trees = [s.tree for _i, s in await load_snapshots(repo) if flt.matches(s)]
        return await compute_stats(repo, trees, mode)
