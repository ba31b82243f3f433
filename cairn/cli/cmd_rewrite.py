"""``cairn rewrite``: rewrite snapshots to exclude files or change metadata (restic's)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from cairn.cli.common import open_repo, run_async, snapshot_filter_options
from cairn.cli.errors import EXIT_OK, UsageError
from cairn.config.settings import Settings


def parse_new_time(text: str) -> int:
    """``--new-time``: restic's ``2006-01-02 15:04:05`` in local time, or any ISO-8601
    time (with an offset, or local); nanoseconds since the epoch."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"error in time option: {text!r} is not a time like '2026-01-02 15:04:05'"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as restic reads it
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def pattern_rules(opts: dict[str, Any], kind: str) -> Any:
    """The rules of the four ``--exclude``-like (``kind`` "exclude") or
    ``--include``-like options, None when none is given."""
    from cairn.stages.excludes import ExcludeRules

    files, ifiles = opts[f"{kind}_file"], opts[f"i{kind}_file"]
    if not (opts[kind] or opts[f"i{kind}"] or files or ifiles):
        return None
    try:
        ipatterns = ExcludeRules.from_files(list(ifiles)).patterns
        return ExcludeRules.from_files(
            list(files), patterns=list(opts[kind]), ipatterns=[*opts[f"i{kind}"], *ipatterns]
        )
    except OSError as exc:
        raise UsageError(f"cannot read {kind} file {exc.filename}: {exc.strerror}") from None


@click.command("rewrite")
@click.argument("ids", nargs=-1)
@click.option("-e", "--exclude", multiple=True, help="Exclude a pattern (repeatable).")
@click.option("--iexclude", multiple=True, help="Like --exclude, ignoring case.")
@click.option("--exclude-file", multiple=True, help="Read exclude patterns from a file.")
@click.option("--iexclude-file", multiple=True, help="Like --exclude-file, ignoring case.")
@click.option("-i", "--include", multiple=True, help="Keep only what matches (repeatable).")
@click.option("--iinclude", multiple=True, help="Like --include, ignoring case.")
@click.option("--include-file", multiple=True, help="Read include patterns from a file.")
@click.option("--iinclude-file", multiple=True, help="Like --include-file, ignoring case.")
@click.option("--forget", is_flag=True, help="Remove the original snapshots afterwards.")
@click.option("-n", "--dry-run", is_flag=True, help="Only show what would be rewritten.")
@click.option("--new-host", help="Replace the hostname.")
@click.option("--new-time", help="Replace the time ('2026-01-02 15:04:05', local).")
@click.option(
    "-s",
    "--snapshot-summary",
    is_flag=True,
    help="Add the file totals to snapshots whose summary lacks them.",
)
@snapshot_filter_options
@click.pass_obj
def command(settings: Settings, ids: tuple[str, ...], **opts: Any) -> int:
    """Rewrite snapshots to exclude files or change metadata.

    Selects the snapshots by ID and/or --host/--path/--tag (all snapshots if none).
    With --include and the like, only the matching files (and the directories above
    them) are kept; excludes and includes cannot be mixed.
    The new snapshots share every unchanged directory with the originals, keep their
    metadata (unless --new-host/--new-time) and get the tag 'rewrite' — unless
    --forget, which removes the originals instead. Run `prune` to free the space.
    """
    from cairn.stages.rewrite import RewriteOptions

    rules, includes = pattern_rules(opts, "exclude"), pattern_rules(opts, "include")
    if rules is not None and includes is not None:
        raise UsageError("exclude and include patterns are mutually exclusive")
    metadata = opts["new_host"] or opts["new_time"] or opts["snapshot_summary"]
    if rules is None and includes is None and not metadata:
        raise UsageError(
            "nothing to do: no excludes/includes provided and no new metadata provided"
        )
    from cairn.repo.codec import compression_level

    options = RewriteOptions(
        rules=rules,
        includes=includes,
        new_host=opts["new_host"] or None,
        new_time_ns=parse_new_time(opts["new_time"]) if opts["new_time"] else None,
        snapshot_summary=opts["snapshot_summary"],
        forget=opts["forget"],
        dry_run=opts["dry_run"],
        level=compression_level(settings.compression),
    )
    done = run_async(lambda: _rewrite(settings, ids, opts["flt"], options))
    _report(settings, done, options)
    return EXIT_OK


async def _rewrite(settings: Settings, ids: tuple[str, ...], flt: Any, options: Any) -> Any:
    from contextlib import AsyncExitStack

    from cairn.stages.locking import repository_lock
    from cairn.stages.rewrite import rewrite_snapshots
    from cairn.stages.snapshots import find_snapshot, load_snapshots

    async with AsyncExitStack() as stack:
        repo = await stack.enter_async_context(open_repo(settings))
        if not options.dry_run:  # as restic: a dry run takes no lock (it writes nothing)
            lock = repository_lock(
                repo, exclusive=options.forget, retry_seconds=settings.retry_lock
            )
            await stack.enter_async_context(lock)
        snaps = [(i, s) for i, s in await load_snapshots(repo) if flt.matches(s)]
        if ids:
            wanted = {(await find_snapshot(repo, i, flt))[0] for i in ids}
            snaps = [(i, s) for i, s in snaps if i in wanted]
        return await rewrite_snapshots(repo, snaps, options)


def _report(settings: Settings, done: list[Any], options: Any) -> None:
    dry = options.dry_run
    if settings.json:
        for r in done:
            line = {
                "message_type": "rewritten",
                "old_id": r.old_id,
                "new_id": r.new_id,
                "excluded": r.excluded,
                "forgotten": r.forgotten,
            }
            click.echo(json.dumps(line))
        summary = {"message_type": "summary", "modified": len(done), "dry_run": dry}
        click.echo(json.dumps(summary))
        return
    if settings.quiet:
        return
    for r in done:
        click.echo(f"\nsnapshot {r.old_id[:8]}")
        if settings.verbosity >= 1:
            for path in r.excluded:
                click.echo(f"excluding {path}")
        verb = "would set" if dry else "setting"
        if options.new_time_ns is not None:
            when = datetime.fromtimestamp(options.new_time_ns / 1e9).astimezone()
            click.echo(f"{verb} time to {when:%Y-%m-%d %H:%M:%S %z}")
        if options.new_host is not None:
            click.echo(f"{verb} host to {options.new_host}")
        if dry:
            click.echo("would save new snapshot")
            if r.forgotten:
                click.echo("would remove old snapshot")
            continue
        click.echo(f"saved new snapshot {r.new_id[:8]}")
        if r.forgotten:
            click.echo(f"removed old snapshot {r.old_id[:8]}")
    click.echo("")
    if not done:
        click.echo("no snapshots would be modified" if dry else "no snapshots were modified")
    else:
        click.echo(f"{'would modify' if dry else 'modified'} {len(done)} snapshots")
