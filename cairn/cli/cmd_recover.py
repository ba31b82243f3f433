"""``cairn recover``: save a snapshot of the trees no snapshot references (restic's)."""

from __future__ import annotations

from typing import Any

import click

from cairn.cli.common import concurrency, echo_json, hostname, open_repo, run_async, stderr
from cairn.cli.errors import EXIT_OK
from cairn.config.settings import Settings


@click.command("recover")
@click.pass_obj
def command(settings: Settings) -> int:
    """Recover data from the repository not referenced by snapshots.

    Builds a new snapshot (path /recover, tag 'recovered') with one directory per
    tree that no snapshot and no other such tree refers to — e.g. after a snapshot
    was forgotten by mistake, and before `prune` deletes its data.
    """
    from cairn.repo.codec import compression_level
    from cairn.stages.locking import repository_lock
    from cairn.stages.recover import recover

    async def main() -> Any:
        async with (
            open_repo(settings) as repo,
            repository_lock(repo, exclusive=True, retry_seconds=settings.retry_lock),
        ):
            return await recover(
                repo,
                hostname=hostname(),
                connections=concurrency(settings, repo.backend).connections,
                level=compression_level(settings.compression),
            )

    result = run_async(main)
    if settings.json:
        echo_json({"message_type": "summary", **vars(result)})
        return EXIT_OK
    for tree_id, problem in result.unreadable:
        stderr(f"unable to load tree {tree_id[:8]}: {problem}")
    if settings.quiet:
        return EXIT_OK
    if result.packs_indexed:
        click.echo(f"indexed {result.packs_indexed} packs that no index listed")
    click.echo(f"loaded {result.trees} trees")
    if settings.verbosity >= 1:
        for tree_id in result.roots:
            click.echo(f"found root tree {tree_id[:8]}")
    click.echo(f"found {len(result.roots)} unreferenced roots")
    if result.snapshot_id is None:
        click.echo("no snapshot to write.")
    else:
        click.echo(f"saved new snapshot {result.snapshot_id[:8]}")
    return EXIT_OK
