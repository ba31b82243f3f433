"""``cairn find PATTERN...``: search file names across snapshots."""

from __future__ import annotations

import fnmatch
import json
import os

import click

from cairn.cli.common import open_repo, run_async, snapshot_filter_options
from cairn.config.settings import Settings
from cairn.stages.snapshots import SnapshotFilter


@click.command("find")
@click.argument("patterns", nargs=-1, required=True)
@click.option("-i", "--ignore-case", is_flag=True)
@click.option("-s", "--snapshot", "snapshots", multiple=True, help="Only these snapshots.")
@snapshot_filter_options
@click.option("-l", "--long", "long_format", is_flag=True)
@click.pass_obj
def command(
    settings: Settings,
    patterns: tuple[str, ...],
    ignore_case: bool,
    snapshots: tuple[str, ...],
    flt: SnapshotFilter,
    long_format: bool,
) -> None:
    """Find files whose name (or path, if the pattern has a /) matches a glob."""
    from cairn.stages.browse import long_line, node_summary, walk
    from cairn.stages.snapshots import load_snapshots

    def norm(text: str) -> str:
        return text.lower() if ignore_case else text

    pats = [norm(p) for p in patterns]
    flt = flt

    async def main() -> None:
        async with open_repo(settings) as repo:
            wanted = {await repo.find_id("snapshots", s) for s in snapshots}
            # Trees are shared between snapshots: remember what was already searched.
            for sid, snap in await load_snapshots(repo):
                if (wanted and sid not in wanted) or not flt.matches(snap):
                    continue
                matches = []
                async for path, node in walk(repo, snap.tree):
                    text = norm(os.fsdecode(path))
                    name = text.rsplit("/", 1)[-1]
                    if any(fnmatch.fnmatchcase(text if "/" in p else name, p) for p in pats):
                        matches.append((path, node))
                if not matches:
                    continue
                if settings.json:
                    click.echo(
                        json.dumps(
                            {
                                "snapshot": sid,
                                "hits": len(matches),
                                "matches": [node_summary(p, n) for p, n in matches],
                            }
                        )
                    )
                    continue
                click.echo(f"Found matching entries in snapshot {sid[:8]} from {snap.time_iso}")
                for p, n in matches:
                    click.echo(long_line(p, n) if long_format else os.fsdecode(p))
                click.echo("")

    run_async(main)
