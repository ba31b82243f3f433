"""``cairn copy --from-repo SOURCE [SNAPSHOT…]``: copy snapshots between repositories.

The destination is the global ``-r`` repository with every global flag; the source
is ``--from-repo`` with ``--from-password-file``/``--from-password-command`` and
``--from-option`` (environment: ``CAIRN_FROM_REPOSITORY``,
``CAIRN_FROM_PASSWORD_FILE``, ``CAIRN_FROM_PASSWORD_COMMAND``, ``CAIRN_FROM_PASSWORD``,
as restic's ``RESTIC_FROM_*``). See docs/copy.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import click
import structlog

from cairn.cli.common import (
    backend_counters,
    concurrency,
    open_backend,
    open_repo,
    run_async,
    snapshot_filter_options,
)
from cairn.cli.errors import EXIT_FATAL, EXIT_OK, UsageError
from cairn.cli.progress import Status, track
from cairn.cli.stagetable import echo_table, summary_fields
from cairn.config.settings import Settings

MiB = 1024 * 1024
log = structlog.get_logger("cairn.copy")

#: Environment variables of the source, as restic's ``RESTIC_FROM_*``.
FROM_REPOSITORY = "CAIRN_FROM_REPOSITORY"
FROM_PASSWORD_FILE = "CAIRN_FROM_PASSWORD_FILE"
FROM_PASSWORD_COMMAND = "CAIRN_FROM_PASSWORD_COMMAND"
FROM_PASSWORD = "CAIRN_FROM_PASSWORD"
#: Tests only: a fault spec for the source's backend (``CAIRN_TEST_FAULTS`` is the
#: destination's).
FROM_FAULTS = "CAIRN_TEST_FROM_FAULTS"


def source_settings(
    settings: Settings,
    repo: str | None,
    password_file: str | None,
    password_command: str | None,
    options: tuple[str, ...],
) -> Settings:
    """The settings of the source: the global ones (connections, download limit,
    cache, retries) with the source's location, password and backend options."""
    from cairn.backends.faulty import ENV_VAR as FAULTS

    env = settings.env
    repo = repo or env.get(FROM_REPOSITORY)
    if not repo:
        raise UsageError("no source repository given: use --from-repo or set " + FROM_REPOSITORY)
    if not (password_file or password_command):
        password_file = env.get(FROM_PASSWORD_FILE) or None
        password_command = None if password_file else env.get(FROM_PASSWORD_COMMAND) or None
    # The destination's password variables say nothing about the source.
    src_env = {k: v for k, v in env.items() if not k.startswith("CAIRN_PASSWORD") and k != FAULTS}
    if FROM_PASSWORD in env:
        src_env["CAIRN_PASSWORD"] = env[FROM_PASSWORD]
    if env.get(FROM_FAULTS):
        src_env[FAULTS] = env[FROM_FAULTS]
    return replace(
        settings,
        repo=repo,
        # --repository-file and --key-hint are the destination's.
        repository_file=None,
        key_hint=None,
        password_file=password_file,
        password_command=password_command,
        backend_options=_options(options),
        limit_upload=None,
        limit_upload_schedule=(),
        env=src_env,
    )


def _options(pairs: tuple[str, ...]) -> dict[str, str]:
    """``--from-option key=value`` flags as a dict; the last of a repeated key wins."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(
                f"expected KEY=VALUE, got {pair!r}", param_hint="--from-option"
            )
        out[key.strip()] = value
    return out


@asynccontextmanager
async def open_source(settings: Settings) -> AsyncIterator[Any]:
    """The source repository, opened read-only; its errors name it as the source."""
    from cairn.config.password import read_password
    from cairn.repo.cache import open_cache
    from cairn.repo.repository import open_repository

    backend, _throttles = open_backend(settings)
    try:
        try:
            password = read_password(settings, prompt="enter password for the source repository: ")
            repo = await open_repository(backend, password)
        except Exception as exc:
            _name_source(exc)
            raise
        repo.cache = open_cache(
            repo.config.id,
            cache_dir=settings.cache_dir,
            no_cache=settings.no_cache,
            env=settings.env,
        )
        log.info("source.opened", source_repository=repo.config.id)
        yield repo
    finally:
        with anyio.CancelScope(shield=True):
            await backend.aclose()


#: ``--from-repo restic:LOCATION``: a restic repository (read-only), any backend.
RESTIC_PREFIX = "restic:"


@asynccontextmanager
async def open_restic_source(source: Settings, settings: Settings) -> AsyncIterator[Any]:
    """A restic repository as a copy source: opened, locked (a shared restic lock,
    unless --no-lock), its index loaded."""
    from cairn.config.password import read_password
    from cairn.repo.restic.repository import ResticRepository
    from cairn.repo.restic.source import ResticSource

    assert source.repo is not None
    backend, _throttles = open_backend(replace(source, repo=source.repo[len(RESTIC_PREFIX) :]))
    try:
        try:
            password = read_password(source, prompt="enter password for the source repository: ")
            repo = await ResticRepository.open(backend, password)
        except Exception as exc:
            _name_source(exc)
            raise
        log.info("source.opened", source_repository=repo.config.id, format="restic")
        async with AsyncExitStack() as stack:
            if not source.no_lock:
                await stack.enter_async_context(repo.shared_lock())
            try:
                await repo.load_index()
            except Exception as exc:
                _name_source(exc)
                raise
            yield ResticSource(repo)
    finally:
        import anyio

        with anyio.CancelScope(shield=True):
            await backend.aclose()


def _name_source(exc: BaseException) -> None:
    """Prefix an error's one-line message with "source repository" (the class, and
    so the exit code, stay: 12 for a wrong password, 10 for no repository)."""
    if exc.args and isinstance(exc.args[0], str) and len(exc.args) == 1:
        exc.args = (f"source repository: {exc.args[0]}",)


@click.command("copy")
@click.argument("snapshot_ids", nargs=-1)
@click.option("--from-repo", help=f"Source repository (env {FROM_REPOSITORY}).")
@click.option("--from-password-file", help=f"Source password file (env {FROM_PASSWORD_FILE}).")
@click.option(
    "--from-password-command", help=f"Source password command (env {FROM_PASSWORD_COMMAND})."
)
@click.option(
    "--from-option",
    "from_options",
    multiple=True,
    help="Backend option KEY=VALUE of the source, e.g. s3.region=eu-west-1 (repeatable).",
)
@snapshot_filter_options
@click.pass_obj
def command(
    settings: Settings,
    snapshot_ids: tuple[str, ...],
    from_repo: str | None,
    from_password_file: str | None,
    from_password_command: str | None,
    from_options: tuple[str, ...],
    flt: Any,
) -> int:
    """Copy snapshots (all, or SNAPSHOT_IDS; filtered by --host/--path/--tag) from
    the --from-repo repository into this one."""
    source = source_settings(
        settings, from_repo, from_password_file, from_password_command, from_options
    )
    started = time.time()
    log.info("copy.started", snapshots=list(snapshot_ids))
    result = run_async(lambda: _copy(settings, source, list(snapshot_ids), flt))
    duration = time.time() - started
    log.info(
        "copy.finished",
        copied=len(result.copied),
        skipped=len(result.skipped),
        failed=len(result.failed),
        blobs_added=result.data_blobs + result.tree_blobs,
        bytes_added=result.data_added,
        bytes_stored=result.data_added_packed,
        duration=round(duration, 3),
    )
    _report(settings, result, duration)
    return EXIT_FATAL if result.failed else EXIT_OK


async def _copy(settings: Settings, source: Settings, refs: list[str], flt: Any) -> Any:
    from cairn.pipeline.options import cores
    from cairn.stages.copy import Copier, CopyOptions, copy_workers
    from cairn.stages.copysource import CairnSource, copies_in, select_snapshots
    from cairn.stages.locking import repository_lock
    from cairn.stages.snapshots import load_snapshots

    async with AsyncExitStack() as stack:
        # The workers start (a fork server round trip, ~0.4 s) while the keys are
        # derived; they get the keys with each job.
        workers = settings.cpu_workers or cores()
        pool = await stack.enter_async_context(_started(copy_workers(workers)))
        # One after the other: two Argon2id derivations at once in two threads
        # (cryptography 50 / OpenSSL) never return.
        src_id: str | None = None
        if source.repo and source.repo.startswith(RESTIC_PREFIX):
            reader: Any = await stack.enter_async_context(open_restic_source(source, settings))
        else:
            src_repo = await stack.enter_async_context(open_source(source))
            src_id = src_repo.config.id
            if not source.no_lock:
                try:
                    lock = repository_lock(
                        src_repo, exclusive=False, retry_seconds=settings.retry_lock
                    )
                    await stack.enter_async_context(lock)
                except Exception as exc:  # held exclusively (a prune): exit 11, named
                    _name_source(exc)
                    raise
        dest = await stack.enter_async_context(open_repo(settings))
        if dest.config.id == src_id:
            raise UsageError("the source and the destination are the same repository")
        await stack.enter_async_context(
            repository_lock(dest, exclusive=False, retry_seconds=settings.retry_lock)
        )
        if src_id is not None:
            await src_repo.load_index()
            reader = CairnSource(src_repo)
        await dest.load_index()
        src_snapshots = await reader.snapshots()
        selected = select_snapshots(src_snapshots, refs, flt)
        earlier = copies_in(list(await load_snapshots(dest)), src_snapshots)
        todo = [(sid, snap) for sid, snap in selected if sid not in earlier]
        widths = concurrency(settings, dest.backend)
        options = CopyOptions(
            level=_level(settings),
            pack_size=(settings.pack_size or 16) * MiB,
            cpu_workers=workers,
            connections=widths.connections,
        )
        copier = Copier(reader, dest, options)
        for sid, _snap in selected:
            if sid in earlier:
                copier.result.skipped.append((sid, earlier[sid][0]))
                log.info("copy.snapshot_skipped", source=sid, copy=earlier[sid][0])
        if not todo:
            return copier.result
        counters = backend_counters(dest.backend)
        async with track(settings, "copy", lambda: _status(copier, counters)):
            return await copier.run(todo, earlier, src_snapshots, await pool)
    raise AssertionError("unreachable")  # pragma: no cover - for mypy


class _Starting:
    """A worker pool being started in the background; ``await`` it for the pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.ready = anyio.Event()
        self.error: BaseException | None = None

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await self.ready.wait()
        if self.error is not None:
            raise self.error
        return self.pool


@asynccontextmanager
async def _started(pool: Any) -> AsyncIterator[_Starting]:
    """Start ``pool`` in a task while the body runs; stop it when the body ends."""
    starting = _Starting(pool)

    async def start() -> None:
        try:
            await pool.__aenter__()
        except BaseException as exc:
            starting.error = exc
            raise
        finally:
            starting.ready.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(start)
        try:
            yield starting
        finally:
            with anyio.CancelScope(shield=True):
                await starting.ready.wait()
                if starting.error is None:
                    await pool.aclose()


def _level(settings: Settings) -> int | None:
    """``--compression`` (flag, environment or profile) when given: every blob is
    compressed again at that level. Else None: blobs keep the compression the
    source gave them and are only re-encrypted (most of the CPU a copy would spend)."""
    from cairn.repo.codec import compression_level

    if settings.sources.get("compression", "default") == "default":
        return None
    return compression_level(settings.compression)


def _status(copier: Any, counters: Any) -> Status:
    s = copier.stats
    return Status(
        total_files=s.snapshots_total,
        files_done=s.snapshots_done,
        total_bytes=s.bytes_planned,
        bytes_done=s.bytes_downloaded,
        error_count=len(copier.result.failed),
        bytes_uploaded=counters.bytes_saved if counters is not None else None,
        current_files=[f"snapshot {copier.current[:8]}"] if copier.current else [],
        unit="snapshots",
    )


def _report(settings: Settings, result: Any, duration: float) -> None:
    for sid, why in result.failed:
        message = f"snapshot {sid[:8]} not copied: {why}"
        if settings.json:
            line = {"message_type": "error", "error": {"message": message}, "during": "copy"}
            click.echo(json.dumps({**line, "item": sid}), err=True)
        else:
            click.echo(f"warning: {message}", err=True)
    s = result.stats
    if settings.json:
        summary = {
            "message_type": "summary",
            "snapshots_copied": len(result.copied),
            "snapshots_skipped": len(result.skipped),
            "snapshots_failed": len(result.failed),
            "copied": [{"source": a, "snapshot_id": b} for a, b in result.copied],
            "skipped": [{"source": a, "copy": b} for a, b in result.skipped],
            "failed": [{"source": a, "error": b} for a, b in result.failed],
            "data_blobs": result.data_blobs,
            "tree_blobs": result.tree_blobs,
            "data_added": result.data_added,
            "data_added_packed": result.data_added_packed,
            "packs": result.packs,
            "blobs_recoded": s.blobs_recoded,
            "blobs_already_present": s.blobs_present,
            "blobs_from_earlier_copies": s.blobs_mapped,
            "bytes_downloaded": s.bytes_downloaded,
            "seconds_elapsed": round(duration, 3),
            **summary_fields(result.pipeline),
        }
        click.echo(json.dumps(summary))
        return
    if settings.quiet:
        return
    for sid, copy in result.skipped:
        click.echo(f"skipping snapshot {sid[:8]}, already copied to snapshot {copy[:8]}")
    for sid, new in result.copied:
        click.echo(f"snapshot {sid[:8]} copied to snapshot {new[:8]}")
    echo_table(settings, result.pipeline)
    click.echo(
        f"copied {len(result.copied)} snapshots, skipped {len(result.skipped)}, "
        f"{len(result.failed)} failed; added {result.data_blobs + result.tree_blobs} blobs, "
        f"{result.data_added} bytes ({result.data_added_packed} stored) in {duration:.2f}s"
    )
