"""``cairn ls SNAPSHOT [PATH]``: list files in a snapshot."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from cairn.cli.common import open_repo, run_async, snapshot_filter_options
from cairn.config.settings import Settings
from cairn.stages.snapshots import SnapshotFilter


@click.command("ls")
@click.argument("snapshot")
@click.argument("path", required=False, default="/")
@click.option("-l", "--long", "long_format", is_flag=True, help="Mode, owner, size, time.")
@click.option("--recursive/--no-recursive", default=True, show_default=True)
@snapshot_filter_options
@click.pass_obj
def command(
    settings: Settings,
    snapshot: str,
    path: str,
    long_format: bool,
    recursive: bool,
    flt: SnapshotFilter,
) -> None:
    """List the files and directories of a snapshot (below PATH)."""
    from cairn.repo.errors import ObjectNotFound
    from cairn.stages.browse import find_node, long_line, node_summary, walk
    from cairn.stages.snapshots import find_snapshot

    async def main() -> None:
        async with open_repo(settings) as repo:
            sid, snap = await find_snapshot(repo, snapshot, flt)
            if settings.json:
                from cairn.cli.cmd_snapshots import snapshot_json

                click.echo(json.dumps({**snapshot_json(sid, snap), "struct_type": "snapshot"}))
            else:
                click.echo(f"snapshot {sid[:8]} of {snap.paths} at {snap.time_iso}:")
            base = os.fsencode(path).rstrip(b"/")
            tree_id, node = await find_node(repo, snap.tree, base)
            if tree_id is None and node is None:
                raise ObjectNotFound(f"path {path!r} not found in snapshot {sid[:8]}")
            items: list[tuple[bytes, Any]] = []
            if node is not None:
                items.append((base, node))
            if tree_id is not None:
                if recursive:
                    for item in items:
                        _emit(settings, long_format, *item)
                    async for item in walk(repo, tree_id, base):
                        _emit(settings, long_format, *item)
                    return
                tree = await repo.load_tree(tree_id)
                items += [(base + b"/" + n.name, n) for n in tree.nodes]
            for item in items:
                _emit(settings, long_format, *item)

    def _emit(settings: Settings, long_format: bool, p: bytes, node: Any) -> None:
        if settings.json:
            click.echo(json.dumps(node_summary(p, node)))
        elif long_format:
            click.echo(long_line(p, node))
        else:
            click.echo(p.decode("utf-8", "backslashreplace"))

    run_async(main)
