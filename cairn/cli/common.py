"""What most commands share: opening the backend and the repository, running async."""

from __future__ import annotations

import functools
import getpass
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
import click
import structlog

from cairn.cli.logsetup import bind_repository
from cairn.config.password import read_password
from cairn.config.settings import Settings

T = TypeVar("T")


class NoRepositoryGiven(Exception):
    """Neither ``-r/--repo`` nor ``CAIRN_REPOSITORY`` says where the repository is."""

    exit_code = 1

    def __init__(self) -> None:
        super().__init__(
            "no repository given: use -r/--repo or --repository-file, or set "
            "CAIRN_REPOSITORY or CAIRN_REPOSITORY_FILE"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        from cairn.backends.base import rebuild_error

        return (rebuild_error, (type(self), self.args, self.__dict__))


def run_async(func: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine on asyncio (aiobotocore and asyncssh need it).

    SIGINT and SIGTERM cancel it cleanly (workers stopped, shared memory unlinked,
    an interrupted backup's uploaded packs indexed) and end in exit code 130.
    """
    from cairn.pipeline.signals import stop_on_signals

    async def main() -> T:
        async with stop_on_signals():
            return await func()
        raise AssertionError("unreachable")  # pragma: no cover - for mypy

    return anyio.run(main, backend="asyncio")


def hostname() -> str:
    return socket.gethostname()


def username() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return ""


@dataclass(frozen=True)
class Throttles:
    """The token buckets inside a backend's wrapper stack (None: no limit), handed
    back beside the backend so that a bandwidth schedule can move their rates."""

    upload: Any = None
    download: Any = None


def open_backend(
    settings: Settings, throttles: Throttles | None = None, faults_var: str | None = None
) -> tuple[Any, Throttles]:
    """The storage backend for ``settings.repo``, wrapped as the settings ask, and
    its throttles.

    The wrapper stack (retry with ``--retry-max-time``, ``--connections``,
    ``--limit-upload``/``--limit-download`` token buckets, logging) comes from
    :func:`cairn.backends.wrap.wrap_backend`; :func:`open_repo` drives the returned
    throttles from a bandwidth schedule. ``throttles``: share another backend's
    buckets (``migrate``'s destination spends the same limits as its source).
    ``faults_var``: the environment variable with a test fault spec (default
    ``CAIRN_TEST_FAULTS``).
    """
    location = settings.repository()  # --repository-file is read here, when needed
    if not location:
        raise NoRepositoryGiven()
    from cairn.backends.faulty import ENV_VAR as FAULTS_ENV_VAR
    from cairn.backends.location import parse_location
    from cairn.backends.retry import RetryPolicy
    from cairn.backends.wrap import wrap_backend

    backend = parse_location(location, settings.backend_options)
    if throttles is None:
        throttles = make_throttles(settings)
    wrapped = wrap_backend(
        backend,
        retries=RetryPolicy(max_time=settings.retry_max_time),
        connections=settings.connections,
        upload_limiter=throttles.upload,
        download_limiter=throttles.download,
        # Tests only: a fault spec that crashes or fails this run deterministically.
        faults=settings.env.get(faults_var or FAULTS_ENV_VAR) or None,
    )
    return wrapped, throttles


def make_throttles(settings: Settings) -> Throttles:
    """The token buckets ``--limit-upload``/``--limit-download`` and their schedules ask for."""
    from cairn.pipeline.throttle import Throttle

    upload = _throttle(Throttle, settings.limit_upload, settings.limit_upload_schedule)
    download = _throttle(Throttle, settings.limit_download, settings.limit_download_schedule)
    return Throttles(upload, download)


def concurrency(settings: Settings, backend: Any, cpu_default: int | None = None) -> Any:
    """The widths a run uses, decided in this one place: ``--cpu-workers``,
    ``--read-concurrency`` and ``--connections`` (flag or profile) where given, else
    one worker per core (``cpu_default`` when the command knows better), two
    readers, and the backend's own connection count — its location's default or
    ``-o <kind>.connections``, which the backend's wrapper stack enforces anyway."""
    from cairn.pipeline.options import DEFAULT_READ_CONCURRENCY, PipelineOptions, cores

    return PipelineOptions(
        cpu_workers=settings.cpu_workers or cpu_default or cores(),
        read_concurrency=settings.read_concurrency or DEFAULT_READ_CONCURRENCY,
        connections=backend.connections,
    )


def _throttle(cls: Any, kib: int | None, schedule: tuple[str, ...]) -> Any:
    """A token bucket when a limit or a schedule applies (the schedule sets its rate)."""
    if not kib and not schedule:
        return None
    return cls(kib * 1024 if kib else None)


@asynccontextmanager
async def _follow_schedules(settings: Settings, throttles: Throttles) -> AsyncIterator[None]:
    """While the body runs, move the throttles' rates at the schedules' boundaries.

    A ``--limit-upload``/``--limit-download`` flag beats the profile's schedule.
    """
    from cairn.config.schedule import follow_schedule

    plans = []
    for direction in ("upload", "download"):
        schedule = getattr(settings, f"limit_{direction}_schedule")
        limit = getattr(settings, f"limit_{direction}")
        flag_wins = settings.sources.get(f"limit_{direction}") == "flag"
        throttle = getattr(throttles, direction)
        if schedule and not flag_wins and throttle is not None:
            plans.append((direction, throttle, schedule, limit))
    if not plans:
        yield
        return
    log = structlog.get_logger("cairn.throttle")
    async with anyio.create_task_group() as tg:
        for direction, throttle, schedule, limit in plans:

            def changed(rate: int | None, direction: str = direction) -> None:
                log.info("throttle.rate_changed", direction=direction, kib_per_second=rate or 0)

            tg.start_soon(
                partial(follow_schedule, throttle, schedule, fallback=limit, on_change=changed)
            )
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


def kdf_params(settings: Settings) -> Any:
    """Cheap Argon2 parameters for tests (hidden ``--insecure-kdf``), else defaults."""
    if not settings.insecure_kdf:
        return None
    from cairn.repo.keyfile import KdfParams

    return KdfParams(memory_kib=64, iterations=1, lanes=1)


# Where every worker pool's initializer (``cpu.init_worker``) lives: what the fork
# server started ahead of a command's pool imports.
WORKER_MODULES = ("cairn.stages.cpu",)


@asynccontextmanager
async def open_repo(
    settings: Settings,
    identities: Any = None,
    throttles: Throttles | None = None,
    *,
    workers: bool = False,
) -> AsyncIterator[Any]:
    """Open the repository named by the settings; close the backend afterwards.

    With ``identities`` (age identities, ``key recover``) a recovery key opens it and
    no password is asked for. ``throttles`` as in :func:`open_backend`. ``workers``:
    the command will start a worker pool whatever it finds (restore, check); its fork
    server starts first, importing the
    job code on another core while this process imports the backend and opens the
    repository (the pool was then ready in 0.02 s instead of 0.2). Not for backup,
    which starts workers only past 32 MiB of new data, while it goes on encoding in
    threads: a small or no-change backup would pay for a server it never uses.
    """
    from cairn.repo.cache import open_cache
    from cairn.repo.repository import open_repository, open_repository_with_identities

    if workers:
        from cairn.pipeline.workers import start_fork_server

        start_fork_server(WORKER_MODULES)
    backend, throttles = open_backend(settings, throttles)
    try:
        if identities is not None:
            repo = await open_repository_with_identities(backend, identities)
        else:
            repo = await open_repository(
                backend, read_password(settings), key_hint=settings.key_hint
            )
        repo.cache = open_cache(
            repo.config.id,
            cache_dir=settings.cache_dir,
            no_cache=settings.no_cache,
            env=settings.env,
        )
        if settings.cleanup_cache and repo.cache is not None:
            cleanup_old_caches(settings, repo.cache.directory.parent)
        bind_repository(repo.config.id)
        structlog.get_logger("cairn.cli").info(
            "repository.opened", backend=type(_innermost(backend)).__name__
        )
        async with _follow_schedules(settings, throttles):
            yield repo
    finally:
        with anyio.CancelScope(shield=True):
            await backend.aclose()


#: Days after which --cleanup-cache (and ``cairn cache --cleanup``) removes a cache.
CACHE_MAX_AGE_DAYS = 30


def cleanup_old_caches(
    settings: Settings, root: Any, max_age_days: float = CACHE_MAX_AGE_DAYS
) -> int:
    """Remove the caches under ``root`` unused for ``max_age_days``; say how many."""
    import time

    from cairn.repo.cache import remove_old_caches

    removed = remove_old_caches(root, max_age_days, time.time())
    if removed and not settings.quiet and not settings.json:
        stderr(f"removed {len(removed)} old cache directories")
    return len(removed)


def _innermost(backend: Any) -> Any:
    while hasattr(backend, "inner"):
        backend = backend.inner
    return backend


def backend_counters(backend: Any) -> Any:
    """The logging wrapper's traffic counters (bytes saved/loaded), or None."""
    while backend is not None:
        counters = getattr(backend, "counters", None)
        if counters is not None:
            return counters
        backend = getattr(backend, "inner", None)
    return None


class SizeType(click.ParamType):
    """A size option: ``500M``, ``2G``, ``1024`` → bytes; bad input is a usage error."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        from cairn.stages.units import parse_size

        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


_FILTER_OPTIONS = (
    click.option("--host", "hosts", multiple=True, help="Only snapshots of this host."),
    click.option("--path", "paths", multiple=True, help="Only snapshots of exactly these paths."),
    click.option("--tag", "tags", multiple=True, help="Only snapshots with these tags (a,b)."),
)


def snapshot_filter_options(func: Callable[..., T]) -> Callable[..., T]:
    """restic's ``--host/--path/--tag``, handed to the command as one ``flt``
    (a ``SnapshotFilter``). Put it below ``@click.command``, above ``pass_obj``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from cairn.stages.snapshots import SnapshotFilter

        kwargs["flt"] = SnapshotFilter(
            list(kwargs.pop("hosts")), list(kwargs.pop("paths")), list(kwargs.pop("tags"))
        )
        return func(*args, **kwargs)

    for option in reversed(_FILTER_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def report_item_errors(settings: Settings, errors: list[tuple[str, str]], during: str) -> None:
    """Per-file problems on stderr: restic's ``error`` JSON lines, or warnings."""
    for path, problem in errors:
        if settings.json:
            line = {
                "message_type": "error",
                "error": {"message": problem},
                "during": during,
                "item": path,
            }
            print(json.dumps(line), file=sys.stderr)
        else:
            print(f"warning: {path}: {problem}", file=sys.stderr)


def echo_json(value: Any) -> None:
    """One JSON document on stdout, on one line (``--json`` output is JSON Lines)."""
    click.echo(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.hex()
    if hasattr(value, "__dict__"):
        return vars(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def human_bytes(n: float) -> str:
    """``1.50 MiB``: sizes as people read them (binary units, up to GiB)."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def stderr(message: str) -> None:
    print(message, file=sys.stderr)
