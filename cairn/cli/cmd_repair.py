"""``cairn repair index`` and ``cairn repair snapshots``."""

from __future__ import annotations

import json
from typing import Any

import click

from cairn.cli.common import concurrency, echo_json, open_repo, run_async
from cairn.cli.errors import EXIT_OK
from cairn.config.settings import Settings


@click.group("repair")
def command() -> None:
    """Repair a damaged repository (run `cairn check` first)."""


@command.command("index")
@click.pass_obj
def index(settings: Settings) -> int:
    """Rebuild the index from the pack headers."""
    from cairn.stages.locking import repository_lock
    from cairn.stages.repair import repair_index

    async def main() -> Any:
        async with (
            open_repo(settings) as repo,
            repository_lock(repo, exclusive=True, retry_seconds=settings.retry_lock),
        ):
            repo.cache = None  # rebuild from what the backend holds
            return await repair_index(repo, concurrency(settings, repo.backend).connections)

    result = run_async(main)
    if settings.json:
        echo_json({"message_type": "repair_index", **vars(result)})
        return EXIT_OK
    for pack_id, problem in result.unreadable:
        click.echo(f"warning: pack {pack_id}: header unreadable, not indexed: {problem}")
    if not settings.quiet:
        click.echo(
            f"indexed {result.blobs} blobs in {result.packs_indexed} packs; replaced "
            f"{result.old_index_files} index files by {result.new_index_files}"
        )
    return EXIT_OK


@command.command("snapshots")
@click.option("--forget", is_flag=True, help="Remove the original snapshots.")
@click.option("-n", "--dry-run", is_flag=True, help="Only show what would be repaired.")
@click.pass_obj
def snapshots(settings: Settings, forget: bool, dry_run: bool) -> int:
    """Rewrite snapshots that reference missing data, marking what was lost."""
    from cairn.repo.codec import compression_level
    from cairn.stages.locking import repository_lock
    from cairn.stages.repair import repair_snapshots

    async def main() -> Any:
        async with (
            open_repo(settings) as repo,
            repository_lock(repo, exclusive=True, retry_seconds=settings.retry_lock),
        ):
            # Repair what the backend holds: a cached copy of a tree pack that is
            # damaged on the backend would hide the damage ("repaired 0").
            repo.cache = None
            return await repair_snapshots(
                repo, forget=forget, dry_run=dry_run, level=compression_level(settings.compression)
            )

    result = run_async(main)
    repaired = result.repaired
    if settings.json:
        for r in repaired:
            click.echo(json.dumps({"message_type": "repaired", **vars(r)}))
        for sid, problem in result.damaged:
            click.echo(json.dumps({"message_type": "damaged", "id": sid, "error": problem}))
        summary = {
            "message_type": "summary",
            "dry_run": dry_run,
            "repaired": len(repaired),
            "damaged": len(result.damaged),
        }
        click.echo(json.dumps(summary))
        return EXIT_OK
    for r in repaired:
        new = r.new_id[:8] if r.new_id else "(dry run)"
        click.echo(f"snapshot {r.old_id[:8]} → {new}:")
        for item in r.lost:
            click.echo(f"  lost {item}")
    for sid, problem in result.damaged:
        click.echo(
            f"snapshot {sid[:8]}: file snapshots/{sid} is damaged ({problem}); "
            f"it cannot be repaired, remove it with `cairn forget {sid[:8]}`"
        )
    if not settings.quiet:
        verb = "would repair" if dry_run else "repaired"
        click.echo(f"{verb} {len(repaired)} snapshots")
    return EXIT_OK
