"""``cairn cache``: the local metadata caches of this machine, and their cleanup."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import click

from cairn.cli.common import CACHE_MAX_AGE_DAYS, cleanup_old_caches, echo_json, human_bytes
from cairn.cli.errors import EXIT_OK
from cairn.config.settings import Settings


@click.command("cache")
@click.option("--cleanup", is_flag=True, help="Remove the caches older than --max-age.")
@click.option(
    "--max-age",
    type=click.IntRange(0),
    default=CACHE_MAX_AGE_DAYS,
    show_default=True,
    help="Days without use after which a cache is old.",
)
@click.option("--no-size", is_flag=True, help="Do not compute the size of each cache.")
@click.pass_obj
def command(settings: Settings, cleanup: bool, max_age: int, no_size: bool) -> int:
    """List the repository caches on this machine (in --cache-dir or the default
    place), when each was last used and its size; with --cleanup, remove the old
    ones. Needs no repository."""
    from cairn.repo.cache import default_cache_root, list_caches

    root = (
        Path(settings.cache_dir).expanduser()
        if settings.cache_dir
        else default_cache_root(settings.env)
    )
    if cleanup:
        removed = cleanup_old_caches(settings, root, max_age)
        if settings.json:
            echo_json({"message_type": "cache_cleanup", "removed": removed, "root": str(root)})
        elif removed == 0 and not settings.quiet:
            click.echo("no old cache directories found")
        return EXIT_OK
    now = time.time()
    caches = list_caches(root)
    if settings.json:
        for cache in caches:
            echo_json(
                {
                    "repository_id": cache.repo_id,
                    "path": str(cache.path),
                    "last_used": datetime.fromtimestamp(cache.last_used, UTC).isoformat(),
                    "age_days": int(cache.age_days(now)),
                    "old": cache.age_days(now) > max_age,
                    "size": None if no_size else cache.size(),
                }
            )
        return EXIT_OK
    if not caches:
        if not settings.quiet:
            click.echo(f"no caches found in {root}")
        return EXIT_OK
    click.echo(f"{'Repository ID':<16} {'Last used':>14} {'Old':>4} {'Size':>12}")
    click.echo("-" * 49)
    old = 0
    for cache in caches:
        days = int(cache.age_days(now))
        is_old = cache.age_days(now) > max_age
        old += is_old
        size = "" if no_size else human_bytes(cache.size())
        click.echo(
            f"{cache.repo_id[:16]:<16} {f'{days} days ago':>14} {'yes' if is_old else '':>4} "
            f"{size:>12}"
        )
    click.echo("-" * 49)
    click.echo(f"{len(caches)} cache directories in {root}, {old} old")
    if old:
        click.echo("run `cairn cache --cleanup` to remove the old ones")
    return EXIT_OK
