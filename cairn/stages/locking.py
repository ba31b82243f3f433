"""Repository locks: shared for backup/restore/check, exclusive for prune/forget.

A lock is a sealed object under ``locks/``. It is refreshed while held (a new lock
object is written, then the old one removed) so other clients can tell a live lock
from one left by a crashed process.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import structlog

from cairn.backends.base import NotFound, object_name
from cairn.repo.errors import CorruptedObject, LockFailed, ObjectNotFound
from cairn.repo.lock import Lock, decode_lock, encode_lock, is_stale

log = structlog.get_logger("cairn.lock")

# Refresh well inside the 30-minute staleness window (restic refreshes every 5 min).
REFRESH_SECONDS = 5 * 60


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def list_locks(repo: Any) -> list[tuple[str, Lock | None]]:
    """Every lock with its decoded contents (``None`` if unreadable)."""
    out: list[tuple[str, Lock | None]] = []
    for lock_id in await repo.list_ids("locks"):
        try:
            out.append((lock_id, decode_lock(await repo.load_sealed("locks", lock_id), lock_id)))
        except (ObjectNotFound, NotFound):
            continue  # removed while we looked: its holder finished
        except CorruptedObject:
            out.append((lock_id, None))
    return out


async def _conflict(repo: Any, exclusive: bool, own: set[str]) -> str | None:
    now = time.time_ns()
    host = socket.gethostname()
    for lock_id, lock in await list_locks(repo):
        if lock_id in own or lock is None:
            continue
        if is_stale(lock, now, host, pid_alive):
            continue
        if exclusive or lock.exclusive:
            return lock.describe() + f", created {_ago(now - lock.created_ns)} ago"
    return None


def _ago(ns: int) -> str:
    seconds = max(0, ns // 1_000_000_000)
    if seconds < 120:
        return f"{seconds}s"
    return f"{seconds // 60}m"


async def remove_stale_locks(repo: Any, *, all_locks: bool = False) -> int:
    """``unlock``: remove stale locks (or every lock); returns how many."""
    now = time.time_ns()
    host = socket.gethostname()
    removed = 0
    for lock_id, lock in await list_locks(repo):
        if all_locks or lock is None or is_stale(lock, now, host, pid_alive):
            try:
                await repo.backend.remove(object_name("locks", lock_id))
                removed += 1
            except NotFound:
                pass
    return removed


@asynccontextmanager
async def repository_lock(
    repo: Any,
    *,
    exclusive: bool,
    retry_seconds: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[None]:
    """Hold a lock for the body; refresh it in the background; remove it after."""
    now = time.time_ns()
    lock = Lock(
        exclusive=exclusive,
        hostname=socket.gethostname(),
        username=os.environ.get("USER", ""),
        pid=os.getpid(),
        created_ns=now,
        refreshed_ns=now,
    )
    deadline = clock() + retry_seconds
    while True:
        holder = await _conflict(repo, exclusive, set())
        if holder is None:
            lock_id = await repo.save_sealed("locks", encode_lock(lock))
            # Two clients may have written at the same moment: look again, and back
            # off if someone else now conflicts (both back off; retry sorts it out).
            holder = await _conflict(repo, exclusive, {lock_id})
            if holder is None:
                break
            await repo.backend.remove(object_name("locks", lock_id))
        if clock() >= deadline:
            raise LockFailed(holder)
        await anyio.sleep(min(5.0, max(0.1, deadline - clock())))
    state = {"id": lock_id}
    async with anyio.create_task_group() as tg:
        tg.start_soon(_refresher, repo, lock, state)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                try:
                    await repo.backend.remove(object_name("locks", state["id"]))
                except Exception as exc:
                    log.warning("lock.remove_failed", lock=state["id"], error=str(exc))


async def _refresher(repo: Any, lock: Lock, state: dict[str, str]) -> None:
    while True:
        await anyio.sleep(REFRESH_SECONDS)
        lock.refreshed_ns = time.time_ns()
        new_id = await repo.save_sealed("locks", encode_lock(lock))
        old_id, state["id"] = state["id"], new_id
        try:
            await repo.backend.remove(object_name("locks", old_id))
        except NotFound:
            pass
        log.debug("lock.refreshed", lock=new_id)
