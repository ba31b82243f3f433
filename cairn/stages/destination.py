"""What ``migrate`` needs to know about a destination and the objects it moves.

* :func:`check_destination`: is it this repository, another one, or empty?
* listings: :func:`listing` (a missing bucket or directory lists nothing),
  :func:`listing_up_to` (a whole listing, unless it is too large to hold) and
  :func:`object_key` (32 bytes per object instead of a 64-character name);
* :func:`hashed_name` / :func:`content_id`: the storage ID a name promises, and the
  one the bytes have;
* :class:`ByteBudget`: the bytes of objects in flight at once.

Nothing here needs the key except ``check_destination`` (which opens the config).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import structlog

from cairn.backends.base import Backend, NotFound, is_hex_id
from cairn.pipeline.metrics import waiting_on_output
from cairn.repo.codec import unseal
from cairn.repo.config import decode_config
from cairn.repo.crypto import storage_id
from cairn.repo.errors import CorruptedObject, RepoError
from cairn.repo.repository import refuse_foreign_directory

log = structlog.get_logger("cairn.migrate")

# Objects up to this size are hashed inline; bigger ones in a thread (BLAKE3 releases
# the GIL, and a 16 MiB pack takes ~2 ms: long enough to stall other transfers).
_INLINE_HASH = 1024 * 1024


class ForeignDestination(RepoError):
    """The destination holds another repository (exit 1)."""

    exit_code = 1

    def __init__(self, location: str, detail: str) -> None:
        super().__init__(
            f"{location} holds a different repository ({detail}); "
            "migrate only copies a repository onto an empty destination or onto itself"
        )


class ByteBudget:
    """At most ``total`` bytes held at once by the tasks that acquired them; a request
    larger than ``total`` waits for the whole budget and then goes alone."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._changed = anyio.Condition()

    @asynccontextmanager
    async def holding(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` (at most the whole budget) for the body. The wait counts
        as waiting on output: for other transfers to finish."""
        nbytes = min(nbytes, self.total)
        with waiting_on_output():
            async with self._changed:
                while self.free < nbytes:
                    await self._changed.wait()
                self.free -= nbytes
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with self._changed:
                    self.free += nbytes
                    self._changed.notify_all()


def hashed_name(name: str) -> str | None:
    """The storage ID an object's name promises, or None (``config``, odd key names)."""
    tail = name.rsplit("/", 1)[-1]
    return tail if name != "config" and is_hex_id(tail) else None


async def content_id(data: bytes) -> str:
    """BLAKE3 of stored bytes (in a thread when large)."""
    if len(data) <= _INLINE_HASH:
        return storage_id(data)
    return await anyio.to_thread.run_sync(storage_id, data)


def object_key(name: str) -> Any:
    # 32 bytes instead of a 64-character string: a shard of a 10 M-object
    # repository's listing stays a few MB.
    hashed = hashed_name(name)
    return bytes.fromhex(hashed) if hashed else name


async def check_destination(repo: Any, dest: Backend, source: Backend) -> tuple[bool, bool]:
    """Refuse a destination holding another repository. Returns whether it has a
    config, and whether that config is intact.

    A config must open with this repository's key and carry its ID. Without one (new,
    or a migration interrupted before its config), every key file there must be one
    of the source's: keys are written first, under their storage IDs, so another
    repository's keys are told apart without any password. A config that does not
    open beside keys that are all this repository's is this repository's, damaged:
    it is sent again.
    """
    try:
        stored = await dest.load("config")
    except NotFound:
        stored = None
    if stored is not None:
        try:
            other = decode_config(unseal(repo.crypto, "config", stored))
        except (CorruptedObject, RepoError):
            if await _keys_are_ours(dest, source, foreign_ok=True):
                log.warning("migrate.corrupt_in_destination", name="config")
                return True, False
            raise ForeignDestination(
                dest.location, "its config does not open with this key"
            ) from None
        if other.id != repo.config.id:
            raise ForeignDestination(dest.location, f"repository ID {other.id[:8]}")
        return True, True
    # A local directory holding other files is refused, as init refuses it.
    refuse_foreign_directory(dest)
    await _keys_are_ours(dest, source)
    return False, True


async def _keys_are_ours(dest: Backend, source: Backend, *, foreign_ok: bool = False) -> bool:
    """Whether the destination has key files and all are the source's; a key file that
    is not raises ``ForeignDestination`` (or gives False, with ``foreign_ok``)."""
    mine = {name async for name, _ in source.list("keys/")}
    found = False
    async for name, _ in listing(dest, "keys/"):
        if name not in mine:
            if foreign_ok:
                return False
            raise ForeignDestination(dest.location, f"{name} is not one of this repository's keys")
        found = True
    return found


async def listing_up_to(backend: Backend, prefix: str, limit: int) -> dict[Any, int] | None:
    """``backend``'s objects under ``prefix`` by name, or None beyond ``limit`` of them."""
    there: dict[Any, int] = {}
    async for name, size in listing(backend, prefix):
        there[object_key(name)] = size
        if len(there) > limit:
            return None
    return there


async def listing(backend: Backend, prefix: str) -> AsyncIterator[tuple[str, int]]:
    """``backend.list(prefix)``; a destination whose bucket or directory does not
    exist yet (a first run, or ``--dry-run`` before any) lists nothing."""
    listed = False
    try:
        async for entry in backend.list(prefix):
            listed = True
            yield entry
    except NotFound:
        if listed:
            raise
