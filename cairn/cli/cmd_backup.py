"""``cairn backup``: save files and directories into a new snapshot."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import click
import structlog

from cairn.backends.base import rebuild_error
from cairn.cli.common import (
    SIZE,
    concurrency,
    hostname,
    open_repo,
    report_item_errors,
    run_async,
    username,
)
from cairn.cli.errors import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, UsageError
from cairn.cli.progress import backup_status, track
from cairn.cli.stagetable import echo_table, summary_fields
from cairn.config.settings import Settings

MiB = 1024 * 1024
log = structlog.get_logger("cairn.backup")


def _collect_paths(
    paths: tuple[str, ...], files_from: tuple[str, ...], files_from_raw: tuple[str, ...]
) -> list[bytes]:
    out = [os.fsencode(p) for p in paths]
    for name in files_from:
        with open(name, "rb") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith(b"#"):
                    out.append(line)
    for name in files_from_raw:
        with open(name, "rb") as f:
            out.extend(p for p in f.read().split(b"\0") if p)
    return [os.path.abspath(p) for p in out]


class NoSourceData(Exception):
    """None of the paths to back up exists: nothing is saved (restic: fatal, exit 1)."""

    exit_code = EXIT_FATAL

    def __init__(self, missing: list[tuple[str, str]]) -> None:
        names = ", ".join(path for path, _problem in missing)
        super().__init__(f"no snapshot saved: none of the paths to back up exists ({names})")
        self.missing = missing

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_error, (type(self), self.args, self.__dict__))


def _existing(targets: list[bytes]) -> tuple[list[bytes], list[tuple[str, str]]]:
    """The targets that exist, and ``(path, problem)`` for those that do not.

    As restic does, a missing path is left out of the snapshot (and of its ``paths``)
    with a warning, and makes the exit code 3; if none exists the backup is fatal.
    """
    present, missing = [], []
    for target in targets:
        try:
            os.lstat(target)
        except FileNotFoundError:
            missing.append((os.fsdecode(target), "does not exist, skipped"))
            continue
        except OSError:
            pass  # e.g. permission denied: the walk reports it for this path
        present.append(target)
    return present, missing


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3f} TiB"


@click.command("backup")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("-e", "--exclude", multiple=True, help="Exclude a pattern (repeatable).")
@click.option("--iexclude", multiple=True, help="Like --exclude, ignoring case.")
@click.option("--exclude-file", multiple=True, help="Read exclude patterns from a file.")
@click.option("--exclude-if-present", multiple=True, help="Skip dirs holding this file name.")
@click.option("--exclude-larger-than", type=SIZE, help="Skip files larger than this (e.g. 1G).")
@click.option("-x", "--one-file-system", is_flag=True, help="Don't cross filesystems.")
@click.option("--files-from", multiple=True, help="Read paths from a file, one per line.")
@click.option("--files-from-raw", multiple=True, help="Read NUL-separated paths from a file.")
@click.option("--stdin", "use_stdin", is_flag=True, help="Back up standard input as a file.")
@click.option("--stdin-filename", default="stdin", show_default=True)
@click.option("--tag", multiple=True, help="Add tags (comma-separated, repeatable).")
@click.option("--host", help="Host name to record (default: this host).")
@click.option("--parent", help="Snapshot to compare with (default: latest of same host+paths).")
@click.option("-f", "--force", is_flag=True, help="Re-read every file, ignoring the parent.")
@click.option("-n", "--dry-run", is_flag=True, help="Do everything but write to the repository.")
@click.pass_obj
def command(settings: Settings, paths: tuple[str, ...], **opts: Any) -> int:
    """Back up PATHS into a new snapshot."""
    from cairn.repo.codec import compression_level
    from cairn.stages.backup import BackupOptions
    from cairn.stages.excludes import ExcludeRules

    if opts["use_stdin"] and (paths or opts["files_from"] or opts["files_from_raw"]):
        # restic's rule; the data comes from stdin, its name from --stdin-filename.
        raise UsageError(
            "--stdin was given together with files or directories to back up; "
            "name the stdin data with --stdin-filename"
        )
    targets = (
        []
        if opts["use_stdin"]
        else _collect_paths(paths, opts["files_from"], opts["files_from_raw"])
    )
    if not targets and not opts["use_stdin"]:
        raise UsageError("nothing to back up: give PATHS, --files-from or --stdin")
    targets, missing = _existing(targets)
    if missing and not targets:
        raise NoSourceData(missing)
    rules = ExcludeRules.from_files(
        list(opts["exclude_file"]),
        patterns=list(opts["exclude"]),
        ipatterns=list(opts["iexclude"]),
        if_present=list(opts["exclude_if_present"]),
        larger_than=opts["exclude_larger_than"],
        one_file_system=opts["one_file_system"],
    )
    options = BackupOptions(
        paths=targets,
        rules=rules,
        tags=[t for tag in opts["tag"] for t in tag.split(",") if t],
        host=opts["host"] or hostname(),
        force=opts["force"],
        dry_run=opts["dry_run"],
        level=compression_level(settings.compression),
        pack_size=(settings.pack_size or 16) * MiB,
        stdin_name=os.fsencode(opts["stdin_filename"]) if opts["use_stdin"] else None,
    )
    log.info(
        "backup.started",
        paths=[os.fsdecode(p) for p in targets],
        host=options.host,
        tags=options.tags,
        dry_run=options.dry_run,
    )
    result = run_async(lambda: _backup(settings, options, opts["parent"], missing))
    _log_finished(result)
    click.get_current_context().meta["cairn.backup.result"] = result  # for ``cairn run``
    _report(settings, result)
    return EXIT_PARTIAL if result["errors"] else EXIT_OK


def _log_finished(result: dict[str, Any]) -> None:
    s = result["summary"]
    log.info(
        "backup.finished",
        snapshot_id=result["snapshot_id"],
        parent=result["parent"],
        files_new=s["files_new"],
        files_changed=s["files_changed"],
        files_unmodified=s["files_unmodified"],
        files=s["total_files_processed"],
        bytes=s["total_bytes_processed"],
        bytes_read=s["bytes_read"],
        bytes_added=s["data_added"],
        bytes_stored=s["data_added_packed"],
        errors=s["errors"],
        duration=s["duration_seconds"],
    )


async def _backup(
    settings: Settings, options: Any, parent_ref: str | None, missing: list[tuple[str, str]]
) -> dict[str, Any]:
    from cairn.pipeline.options import cores
    from cairn.stages.backup import default_cpu_workers
    from cairn.stages.backup_run import run_backup
    from cairn.stages.locking import repository_lock

    async with (
        open_repo(settings) as repo,
        repository_lock(repo, exclusive=False, retry_seconds=settings.retry_lock),
    ):
        limit = settings.limit_upload * 1024 if settings.limit_upload else None
        cpu = default_cpu_workers(cores(), limit, bool(settings.limit_upload_schedule))
        widths = concurrency(settings, repo.backend, cpu_default=cpu)
        options = replace(
            options,
            cpu_workers=widths.cpu_workers,
            read_concurrency=widths.read_concurrency,
            connections=widths.connections,
        )
        result = await run_backup(
            repo,
            options,
            parent_ref=parent_ref,
            missing=missing,
            username=username(),
            watch=lambda archiver: track(
                settings,
                "backup",
                lambda: backup_status(archiver.stats, archiver.snapshot(), archiver.repo.backend),
            ),
        )
    return {
        "summary": result.summary,
        "snapshot_id": result.snapshot_id,
        "parent": result.parent,
        "errors": result.errors,
        "dry_run": result.dry_run,
        "pipeline": result.pipeline,
    }


def _report(settings: Settings, result: dict[str, Any]) -> None:
    s = result["summary"]
    report_item_errors(settings, result["errors"], "archival")
    if settings.json:
        click.echo(
            json.dumps(
                {
                    "message_type": "summary",
                    **s,
                    "snapshot_id": result["snapshot_id"],
                    "parent": result["parent"],
                    "dry_run": result["dry_run"],
                    **summary_fields(result["pipeline"]),
                }
            )
        )
        return
    if settings.quiet:
        return
    if result["parent"]:
        click.echo(f"using parent snapshot {result['parent'][:8]}")
    click.echo(
        f"Files: {s['files_new']:>7} new, {s['files_changed']:>7} changed, "
        f"{s['files_unmodified']:>7} unmodified"
    )
    click.echo(
        f"Dirs:  {s['dirs_new']:>7} new, {s['dirs_changed']:>7} changed, "
        f"{s['dirs_unmodified']:>7} unmodified"
    )
    click.echo(
        f"Added to the repository: {_human(s['data_added'])} "
        f"({_human(s['data_added_packed'])} stored)"
    )
    click.echo(
        f"processed {s['total_files_processed']} files, {_human(s['total_bytes_processed'])} "
        f"in {s['duration_seconds']:.2f}s"
    )
    echo_table(settings, result["pipeline"])
    if result["snapshot_id"]:
        click.echo(f"snapshot {result['snapshot_id'][:8]} saved")
    else:
        click.echo("dry run: nothing was written")
    if result["errors"]:
        click.echo(
            f"warning: {len(result['errors'])} files or directories could not be read", err=True
        )
