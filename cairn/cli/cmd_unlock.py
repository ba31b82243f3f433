"""``cairn unlock``: remove stale locks (or, with ``--remove-all``, every lock)."""

from __future__ import annotations

import click

from cairn.cli.common import echo_json, open_repo, run_async
from cairn.cli.errors import EXIT_OK
from cairn.config.settings import Settings


@click.command("unlock")
@click.option("--remove-all", is_flag=True, help="Remove all locks, even live ones.")
@click.pass_obj
def command(settings: Settings, remove_all: bool) -> int:
    """Remove locks left by processes that are gone."""
    from cairn.stages.locking import remove_stale_locks

    async def main() -> int:
        async with open_repo(settings) as repo:
            return await remove_stale_locks(repo, all_locks=remove_all)

    removed = run_async(main)
    if settings.json:
        echo_json({"message_type": "unlock", "removed": removed})
    elif not settings.quiet:
        click.echo(f"removed {removed} locks")
    return EXIT_OK
