"""What most commands share: opening the backend and the repository, running async."""

from __future__ import annotations

import getpass
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import click

from cairn.config.password import read_password
from cairn.config.settings import Settings

T = TypeVar("T")


class NoRepositoryGiven(Exception):
    """Neither ``-r/--repo`` nor ``CAIRN_REPOSITORY`` says where the repository is."""

    exit_code = 1

    def __init__(self) -> None:
        super().__init__("no repository given: use -r/--repo or set CAIRN_REPOSITORY")


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


def open_backend(settings: Settings) -> Any:
    """The storage backend for ``settings.repo``, wrapped as the settings ask."""
    if not settings.repo:
        raise NoRepositoryGiven()
    try:
        from cairn.backends.location import parse_location
    except ImportError:  # remote backends not installed yet: local paths only
        from cairn.backends.local import LocalBackend

        location = settings.repo.removeprefix("local:")
        return LocalBackend(location)
    return parse_location(settings.repo, {})


def kdf_params(settings: Settings) -> Any:
    """Cheap Argon2 parameters for tests (hidden ``--insecure-kdf``), else defaults."""
    if not settings.insecure_kdf:
        return None
    from cairn.repo.keyfile import KdfParams

    return KdfParams(memory_kib=64, iterations=1, lanes=1)


@asynccontextmanager
async def open_repo(settings: Settings) -> AsyncIterator[Any]:
    """Open the repository named by the settings; close the backend afterwards."""
    from cairn.repo.repository import open_repository

    backend = open_backend(settings)
    try:
        password = read_password(settings)
        repo = await open_repository(backend, password)
        yield repo
    finally:
        with anyio.CancelScope(shield=True):
            await backend.aclose()


def echo_json(value: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=_json_default))


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


def stderr(message: str) -> None:
    print(message, file=sys.stderr)
