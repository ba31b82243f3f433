"""``cairn snapshots``: list snapshots."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cairn.cli.common import open_repo, run_async, snapshot_filter_options
from cairn.config.settings import Settings
from cairn.stages.snapshots import SnapshotFilter


def snapshot_json(snapshot_id: str, snap: Any) -> dict[str, Any]:
    """restic-shaped JSON of one snapshot."""
    return {
        "time": snap.time_iso,
        "parent": snap.parent,
        "tree": snap.tree.hex(),
        "paths": snap.paths,
        "hostname": snap.hostname,
        "username": snap.username,
        "uid": snap.uid,
        "gid": snap.gid,
        "tags": snap.tags,
        "excludes": snap.excludes,
        "program_version": snap.program_version,
        "summary": snap.summary,
        "original": snap.original,
        "id": snapshot_id,
        "short_id": snapshot_id[:8],
    }


def _group_key(snap: Any, group_by: str) -> tuple[Any, ...]:
    fields = [f for f in group_by.split(",") if f]
    key: list[Any] = []
    for f in fields:
        if f == "host":
            key.append(("host", snap.hostname))
        elif f == "paths":
            key.append(("paths", tuple(sorted(snap.paths))))
        elif f == "tags":
            key.append(("tags", tuple(sorted(snap.tags))))
        else:
            raise click.BadParameter(f"unknown group-by field {f!r} (host, paths, tags)")
    return tuple(key)


@click.command("snapshots")
@click.argument("ids", nargs=-1)
@snapshot_filter_options
@click.option("--latest", type=int, default=0, help="Only the last N snapshots per group.")
@click.option("-g", "--group-by", default="", help="Group by host,paths,tags.")
@click.pass_obj
def command(
    settings: Settings,
    ids: tuple[str, ...],
    flt: SnapshotFilter,
    latest: int,
    group_by: str,
) -> None:
    """List the snapshots in the repository."""
    from cairn.stages.snapshots import load_snapshots

    flt = flt

    async def main() -> list[tuple[str, Any]]:
        async with open_repo(settings) as repo:
            snaps = [(i, s) for i, s in await load_snapshots(repo) if flt.matches(s)]
            if ids:
                # ``latest``: the newest snapshot the filters select, as everywhere.
                wanted = {
                    (snaps[-1][0] if snaps else None)
                    if i == "latest"
                    else await repo.find_id("snapshots", i)
                    for i in ids
                }
                snaps = [(i, s) for i, s in snaps if i in wanted]
            return snaps

    snaps = run_async(main)
    groups: dict[tuple[Any, ...], list[tuple[str, Any]]] = {}
    for sid, snap in snaps:
        groups.setdefault(_group_key(snap, group_by) if group_by else (), []).append((sid, snap))
    if latest:
        groups = {k: v[-latest:] for k, v in groups.items()}
    if settings.json:
        if group_by:
            out: Any = [
                {"group_key": dict(k), "snapshots": [snapshot_json(i, s) for i, s in v]}
                for k, v in groups.items()
            ]
        else:
            out = [snapshot_json(i, s) for v in groups.values() for i, s in v]
        click.echo(json.dumps(out))
        return
    console = Console(soft_wrap=True)
    for key, members in groups.items():
        if group_by:
            console.print("group " + ", ".join(f"{k}: {v}" for k, v in key))
        table = Table(box=None, pad_edge=False)
        for col in ("ID", "Time", "Host", "Tags", "Paths"):
            table.add_column(col, no_wrap=True)
        for sid, snap in members:
            table.add_row(
                sid[:8],
                snap.time.strftime("%Y-%m-%d %H:%M:%S"),
                snap.hostname,
                ",".join(snap.tags),
                "\n".join(snap.paths),
            )
        console.print(table)
        console.print(f"{len(members)} snapshots")
