"""``cairn diff SNAP1 SNAP2``: what changed between two snapshots."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from cairn.cli.common import open_repo, run_async
from cairn.config.settings import Settings

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

_META = ("mode", "uid", "gid", "user", "group", "mtime_ns", "xattrs", "link_target", "rdev")


async def diff_trees(
    repo: Repository, a: bytes | None, b: bytes | None, prefix: bytes, out: list[tuple[str, bytes]]
) -> None:
    """Append ``(change, path)``: ``+`` added, ``-`` removed, ``M`` content modified,
    ``U`` metadata only, ``T`` type changed. Identical subtrees are skipped unread."""
    if a == b:
        return
    ta = {n.name: n for n in (await repo.load_tree(a)).nodes} if a else {}
    tb = {n.name: n for n in (await repo.load_tree(b)).nodes} if b else {}
    for name in sorted(ta.keys() | tb.keys()):
        path = prefix + b"/" + name
        na, nb = ta.get(name), tb.get(name)
        if na is None or nb is None:
            node = nb if na is None else na
            assert node is not None
            out.append(("+" if na is None else "-", path + (b"/" if node.type == "dir" else b"")))
            if node.type == "dir":
                sub_a = None if na is None else node.subtree
                sub_b = None if nb is None else node.subtree
                await diff_trees(repo, sub_a, sub_b, path, out)
            continue
        if na.type != nb.type:
            out.append(("T", path))
            continue
        if na.type == "dir":
            if any(getattr(na, f) != getattr(nb, f) for f in _META if f != "mtime_ns"):
                out.append(("U", path + b"/"))
            await diff_trees(repo, na.subtree, nb.subtree, path, out)
        elif na.content != nb.content:
            out.append(("M", path))
        elif any(getattr(na, f) != getattr(nb, f) for f in _META):
            out.append(("U", path))


@click.command("diff")
@click.argument("first")
@click.argument("second")
@click.pass_obj
def command(settings: Settings, first: str, second: str) -> None:
    """Show files added (+), removed (-), modified (M), with changed metadata (U)
    or changed type (T) between two snapshots (SNAPSHOT[:PATH] each)."""
    from cairn.stages.browse import find_node
    from cairn.stages.snapshots import find_snapshot, split_snapshot_ref

    async def main() -> tuple[str, str, list[tuple[str, bytes]]]:
        async with open_repo(settings) as repo:
            roots = []
            ids = []
            for ref in (first, second):
                snap_ref, sub = split_snapshot_ref(ref)
                sid, snap = await find_snapshot(repo, snap_ref)
                tree_id, _node = await find_node(repo, snap.tree, sub.encode())
                roots.append(tree_id)
                ids.append(sid)
            out: list[tuple[str, bytes]] = []
            await diff_trees(repo, roots[0], roots[1], b"", out)
            return ids[0], ids[1], out

    a, b, changes = run_async(main)
    counts: dict[str, int] = {}
    for change, path in changes:
        counts[change] = counts.get(change, 0) + 1
        text = path.decode("utf-8", "backslashreplace")
        if settings.json:
            click.echo(json.dumps({"message_type": "change", "path": text, "modifier": change}))
        else:
            click.echo(f"{change:<5}{text}")
    summary = {
        "added": counts.get("+", 0),
        "removed": counts.get("-", 0),
        "modified": counts.get("M", 0),
        "metadata": counts.get("U", 0),
        "type_changed": counts.get("T", 0),
    }
    if settings.json:
        click.echo(
            json.dumps(
                {
                    "message_type": "statistics",
                    "source_snapshot": a,
                    "target_snapshot": b,
                    **summary,
                }
            )
        )
    else:
        click.echo(
            f"\ncomparing snapshot {a[:8]} to {b[:8]}: "
            + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in summary.items())
        )
