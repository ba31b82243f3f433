"""``cairn repair index``, ``cairn repair snapshots`` and ``cairn repair packs``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cairn.cli.common import concurrency, echo_json, open_repo, run_async, stderr
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


@command.command("packs")
@click.argument("pack_ids", nargs=-1)
@click.pass_obj
def packs(settings: Settings, pack_ids: tuple[str, ...]) -> int:
    """Salvage the intact blobs of damaged packs, then remove the packs.

    Keeps a copy of each pack (pack-<ID>) in the current directory first, as restic
    does. Run `cairn repair snapshots --forget` afterwards.
    """
    from cairn.stages.locking import repository_lock
    from cairn.stages.repair_packs import check_pack_ids, repair_packs

    ids = check_pack_ids(list(pack_ids))  # before the repository is even opened

    async def main() -> Any:
        async with (
            open_repo(settings) as repo,
            repository_lock(repo, exclusive=True, retry_seconds=settings.retry_lock),
        ):
            repo.cache = None  # salvage what the backend holds
            return await repair_packs(
                repo,
                ids,
                copy_dir=Path.cwd(),
                connections=concurrency(settings, repo.backend).connections,
                pack_size=settings.pack_size * 1024 * 1024 if settings.pack_size else None,
            )

    result = run_async(main)
    if settings.json:
        lost = [{"pack": p, "blob": b, "error": why} for p, b, why in result.lost]
        unreadable = [{"pack": p, "error": why} for p, why in result.unreadable]
        echo_json(
            {"message_type": "summary", **vars(result), "lost": lost, "unreadable": unreadable}
        )
        return EXIT_OK
    for pack_id, blob_id, why in result.lost:
        stderr(f"pack {pack_id[:8]}: blob {blob_id} lost: {why}")
    for pack_id, why in result.unreadable:
        stderr(f"pack {pack_id[:8]}: {why}")
    if not settings.quiet:
        for path in result.copies:
            click.echo(f"saved a copy of the pack to {path}")
        click.echo(
            f"salvaged {result.salvaged} blobs into {result.packs_written} new packs, "
            f"lost {len(result.lost)}; removed {len(result.packs_removed)} packs"
        )
    stderr(
        "\nUse `cairn repair snapshots --forget` to remove the corrupted data blobs "
        "from all snapshots"
    )
    return EXIT_OK
