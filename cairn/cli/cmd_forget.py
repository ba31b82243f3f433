"""``cairn forget``: remove snapshots by ID or by a keep policy (restic's rules)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from cairn.cli.cmd_prune import print_prune, prune_options, prune_settings, run_prune
from cairn.cli.common import open_repo, run_async
from cairn.cli.errors import EXIT_OK
from cairn.config.settings import Settings

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

_UNITS = ("hourly", "daily", "weekly", "monthly", "yearly")


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    from cairn.stages.forget import Duration

    if value is None:
        return Duration()
    try:
        return Duration.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _group_by(_ctx: click.Context, _param: click.Parameter, value: str) -> list[str]:
    from cairn.stages.forget import parse_group_by

    try:
        return parse_group_by(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _options(func: Any) -> Any:
    count = click.IntRange(min=-1)
    opts = [
        click.option("-l", "--keep-last", type=count, default=0, help="Keep the last N (-1: all)."),
        click.option("-H", "--keep-hourly", type=count, default=0, help="Keep N hourly."),
        click.option("-d", "--keep-daily", type=count, default=0, help="Keep N daily."),
        click.option("-w", "--keep-weekly", type=count, default=0, help="Keep N weekly."),
        click.option("-m", "--keep-monthly", type=count, default=0, help="Keep N monthly."),
        click.option("-y", "--keep-yearly", type=count, default=0, help="Keep N yearly."),
        click.option(
            "--keep-within", callback=_duration, help="Keep all within 1y2m3d4h of the newest."
        ),
        *[
            click.option(
                f"--keep-within-{u}", callback=_duration, help=f"Keep {u} within a duration."
            )
            for u in _UNITS
        ],
        click.option("--keep-tag", multiple=True, help="Keep snapshots with these tags (a,b)."),
        click.option("--host", "hosts", multiple=True, help="Only snapshots of this host."),
        click.option("--tag", "tags", multiple=True, help="Only snapshots with these tags."),
        click.option("--path", "paths", multiple=True, help="Only snapshots of these paths."),
        click.option(
            "-g",
            "--group-by",
            default="host,paths",
            show_default=True,
            callback=_group_by,
            help="Apply the policy per group of host, paths, tags.",
        ),
        click.option("-n", "--dry-run", is_flag=True, help="Only show what would be removed."),
        click.option("--prune", "prune", is_flag=True, help="Run prune afterwards."),
        *prune_options,
    ]
    for option in reversed(opts):
        func = option(func)
    return func


def _policy(opts: dict[str, Any]) -> Any:
    from cairn.stages.forget import Policy

    return Policy(
        last=opts["keep_last"],
        hourly=opts["keep_hourly"],
        daily=opts["keep_daily"],
        weekly=opts["keep_weekly"],
        monthly=opts["keep_monthly"],
        yearly=opts["keep_yearly"],
        within=opts["keep_within"],
        **{f"within_{u}": opts[f"keep_within_{u}"] for u in _UNITS},
        tags=tuple(tuple(t for t in tl.split(",") if t) for tl in opts["keep_tag"]),
    )


def local_tz() -> tzinfo:
    """The local timezone, in which days and weeks are counted (as restic does)."""
    return datetime.now().astimezone().tzinfo or UTC


@click.command("forget")
@click.argument("ids", nargs=-1)
@_options
@click.pass_obj
def command(settings: Settings, ids: tuple[str, ...], **opts: Any) -> int:
    """Remove snapshots: the IDs given, or those the --keep-* policy does not keep."""
    from cairn.stages.locking import repository_lock

    async def main() -> tuple[list[dict[str, Any]], tuple[dict[str, Any], Any] | None]:
        async with (
            open_repo(settings) as repo,
            repository_lock(repo, exclusive=True, retry_seconds=settings.retry_lock),
        ):
            groups = await _decide(repo, ids, opts)
            removed = [s["id"] for g in groups for s in g["remove"]]
            prune_out = None
            if not opts["dry_run"]:
                await _remove_snapshots(repo, removed)
                if opts["prune"] and removed:
                    prune_out = await run_prune(repo, prune_settings(settings, repo, opts, False))
            return groups, prune_out

    groups, prune_out = run_async(main)
    _print(settings, groups, opts["dry_run"])
    if prune_out is not None:
        print_prune(settings, *prune_out)
    return EXIT_OK


async def _remove_snapshots(repo: Repository, ids: list[str]) -> None:
    """Remove snapshot files; one storage still retains (S3 Object Lock) is kept, and
    said so on stderr, rather than failing half-way."""
    from cairn.backends.base import object_name
    from cairn.cli.common import stderr
    from cairn.stages.retention import remove_unless_retained

    for sid in ids:
        retained = await remove_unless_retained(repo.backend, object_name("snapshots", sid))
        if retained is not None:
            stderr(f"snapshot {sid[:8]} kept: still under retention ({retained.until})")


async def _decide(
    repo: Repository, ids: tuple[str, ...], opts: dict[str, Any]
) -> list[dict[str, Any]]:
    from cairn.cli.cmd_snapshots import snapshot_json
    from cairn.stages.forget import SnapshotInfo, apply_policy, group_key
    from cairn.stages.snapshots import SnapshotFilter, find_snapshot, load_snapshots

    flt = SnapshotFilter(list(opts["hosts"]), list(opts["paths"]), list(opts["tags"]))
    loaded = await load_snapshots(repo)
    snaps = [(i, s) for i, s in loaded if flt.matches(s)]
    if ids:
        # A damaged snapshot file can be forgotten by its ID (it cannot be filtered).
        damaged = dict(loaded.damaged)
        wanted: set[str] = set()
        broken: list[dict[str, Any]] = []
        for ref in ids:
            full = await repo.find_id("snapshots", ref) if ref != "latest" else None
            if full is not None and full in damaged:
                broken.append(_damaged_json(full, damaged[full]))
            else:
                wanted.add((await find_snapshot(repo, ref, flt))[0])
        chosen = [snapshot_json(i, s) for i, s in snaps if i in wanted]
        return [{"group_key": {}, "keep": [], "remove": chosen + broken, "reasons": []}]
    by_id = dict(snaps)
    grouped: dict[Any, list[SnapshotInfo]] = {}
    for sid, snap in snaps:
        key = group_key(opts["group_by"], snap.hostname, snap.paths, snap.tags)
        grouped.setdefault(key, []).append(SnapshotInfo(sid, snap.time, tuple(snap.tags)))
    policy = _policy(opts)
    now = datetime.now(UTC)
    out = []
    for key, members in grouped.items():
        decisions = apply_policy(members, policy, now=now, tz=local_tz())
        out.append(
            {
                "group_key": {k: list(v) if isinstance(v, tuple) else v for k, v in key},
                "keep": [
                    snapshot_json(d.snapshot.id, by_id[d.snapshot.id]) for d in decisions if d.keep
                ],
                "remove": [
                    snapshot_json(d.snapshot.id, by_id[d.snapshot.id])
                    for d in decisions
                    if not d.keep
                ],
                "reasons": [
                    {"snapshot": d.snapshot.id, "matches": d.reasons, "counters": d.counters}
                    for d in decisions
                    if d.keep
                ],
            }
        )
    return out


def _damaged_json(snapshot_id: str, problem: str) -> dict[str, Any]:
    """What ``forget`` shows of a snapshot whose file cannot be read."""
    return {
        "id": snapshot_id,
        "short_id": snapshot_id[:8],
        "time": "",
        "hostname": "",
        "tags": [],
        "paths": [],
        "damaged": problem,
    }


def _print(settings: Settings, groups: list[dict[str, Any]], dry_run: bool) -> None:
    if settings.json:
        click.echo(json.dumps(groups))
        return
    if settings.quiet:
        return
    console = Console(soft_wrap=True)
    for group in groups:
        if group["group_key"]:
            console.print(
                "snapshots for " + ", ".join(f"{k} {v}" for k, v in group["group_key"].items())
            )
        reasons = {r["snapshot"]: ", ".join(r["matches"]) for r in group["reasons"]}
        for title, members in (("keep", group["keep"]), ("remove", group["remove"])):
            if not members:
                continue
            console.print(f"{title} {len(members)} snapshots:")
            table = Table(box=None, pad_edge=False)
            for col in ("ID", "Time", "Host", "Tags", "Reasons" if title == "keep" else "Paths"):
                table.add_column(col, no_wrap=True)
            for s in members:
                if title == "keep":
                    last = reasons.get(s["id"], "")
                elif "damaged" in s:
                    last = "(damaged snapshot file)"
                else:
                    last = "\n".join(s["paths"])
                table.add_row(
                    s["short_id"],
                    s["time"][:19].replace("T", " "),
                    s["hostname"],
                    ",".join(s["tags"]),
                    last,
                )
            console.print(table)
    removed = sum(len(g["remove"]) for g in groups)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {removed} snapshots")
