"""``cairn tag``: add, remove or set snapshot tags.

A snapshot's ID is the hash of its bytes, so changing tags means writing a new
snapshot (with ``original`` naming the first one it replaces) and then deleting the
old one — in that order, so an interruption never loses the snapshot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from cairn.cli.common import echo_json, open_repo, run_async, snapshot_filter_options
from cairn.cli.errors import EXIT_OK, UsageError
from cairn.config.settings import Settings


def _split(values: tuple[str, ...]) -> list[str]:
    return [t for v in values for t in v.split(",") if t]


def new_tags(
    old: list[str], add: list[str], remove: list[str], set_: list[str] | None
) -> list[str]:
    """The tag list after ``--set``, then ``--add``, then ``--remove`` (order kept)."""
    tags = list(set_) if set_ is not None else list(old)
    for t in add:
        if t not in tags:
            tags.append(t)
    return [t for t in tags if t not in remove]


@click.command("tag")
@click.argument("ids", nargs=-1)
@click.option("--add", multiple=True, help="Tags to add (a,b).")
@click.option("--remove", multiple=True, help="Tags to remove (a,b).")
@click.option("--set", "set_", multiple=True, help="Replace all tags with these (a,b).")
@snapshot_filter_options
@click.pass_obj
def command(settings: Settings, ids: tuple[str, ...], **opts: Any) -> int:
    """Change the tags of the selected snapshots (all, if no IDs or filters)."""
    if not (opts["add"] or opts["remove"] or opts["set_"]):
        raise UsageError("nothing to do: give --add, --remove or --set")
    if opts["set_"] and (opts["add"] or opts["remove"]):
        raise UsageError("--set cannot be combined with --add or --remove")
    changed = run_async(lambda: _tag(settings, ids, opts))
    if settings.json:
        echo_json({"message_type": "tag", "changed": changed})
    elif not settings.quiet:
        for old, new in changed:
            click.echo(f"snapshot {old[:8]} → {new[:8]}")
        click.echo(f"modified {len(changed)} snapshots")
    return EXIT_OK


async def _tag(settings: Settings, ids: tuple[str, ...], opts: dict[str, Any]) -> list[list[str]]:
    from cairn.backends.base import object_name
    from cairn.stages.locking import repository_lock
    from cairn.stages.snapshots import find_snapshot, load_snapshots

    flt = opts["flt"]
    add, remove = _split(opts["add"]), _split(opts["remove"])
    set_ = _split(opts["set_"]) if opts["set_"] else None
    changed = []
    async with (
        open_repo(settings) as repo,
        repository_lock(repo, exclusive=True, retry_seconds=settings.retry_lock),
    ):
        snaps = [(i, s) for i, s in await load_snapshots(repo) if flt.matches(s)]
        if ids:
            wanted = {(await find_snapshot(repo, i, flt))[0] for i in ids}
            snaps = [(i, s) for i, s in snaps if i in wanted]
        for sid, snap in snaps:
            tags = new_tags(snap.tags, add, remove, set_)
            if tags == snap.tags:
                continue
            new = dataclasses.replace(snap, tags=tags, original=snap.original or sid)
            new_id = await repo.save_snapshot(new)
            await repo.backend.remove(object_name("snapshots", sid))
            changed.append([sid, new_id])
    return changed
