"""Repository locks: shared for backup/restore/check, exclusive for prune/forget.

A lock is a sealed object under ``locks/``. It is refreshed while held (a new lock
object is written, then the old one removed) so other clients can tell a live lock
from one left by a crashed process.

A holder can **lose** its lock: ``unlock --remove-all`` removes it, or refreshes fail
for so long that others may treat it as stale (and a prune may then delete what this
process uploaded). Then the process must write nothing that refers to data: while the
lock is held, the repository checks it (one ``stat``) before every index file and
snapshot it writes (``Repository.lock_check``), and the refresher cancels the command.
The command fails with ``LockLost`` (exit 11), as restic ≥ 0.16 does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import structlog

from cairn.backends.base import NotFound, object_name
from cairn.repo.errors import CorruptedObject, LockFailed, ObjectNotFound, RepoError
from cairn.repo.lock import STALE_AFTER_NS, Lock, decode_lock, encode_lock, is_stale

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.lock")

# Refresh well inside the 30-minute staleness window (restic refreshes every 5 min).
REFRESH_SECONDS = 5 * 60
# After a failed refresh, try again sooner.
RETRY_REFRESH_SECONDS = 30
# A lock not refreshed for this long is given up before others may call it stale
# (restic: the stale timeout minus 1.5 refresh intervals).
GIVE_UP_SECONDS = STALE_AFTER_NS / 1e9 - 1.5 * REFRESH_SECONDS


class LockLost(RepoError):
    """This process's lock vanished or could not be refreshed in time (exit 11)."""

    exit_code = 11

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"repository lock lost: {detail}; stopped before writing an index or "
            "snapshot (data already uploaded is removed by the next prune)"
        )
        self.detail = detail


class HeldLock:
    """The lock this process holds: its current ID, and whether it is still valid."""

    def __init__(self, repo: Repository, lock: Lock, lock_id: str, clock: Callable[[], float]):
        self.repo = repo
        self.lock = lock
        self.id = lock_id
        self.clock = clock
        self.refreshed_at = clock()
        self.lost: str | None = None
        # A check must not stat the old ID while a refresh replaces it.
        self.mutex = anyio.Lock()

    def _fail(self, detail: str) -> LockLost:
        if self.lost is None:
            self.lost = detail
            log.error("lock.lost", lock=self.id, reason=detail)
        return LockLost(self.lost)

    def _check_age(self) -> None:
        silent = self.clock() - self.refreshed_at
        if silent > GIVE_UP_SECONDS:
            raise self._fail(f"it could not be refreshed for {int(silent // 60)} minutes")

    async def check(self) -> None:
        """Raise ``LockLost`` unless the lock is still on the backend and fresh."""
        if self.lost is not None:
            raise LockLost(self.lost)
        async with self.mutex:
            self._check_age()
            await self._still_there()

    async def _still_there(self) -> None:
        try:
            await self.repo.backend.stat(object_name("locks", self.id))
        except NotFound:
            raise self._fail(
                f"lock {self.id[:8]} was removed by another process (`cairn unlock --remove-all`?)"
            ) from None

    async def refresh(self) -> None:
        """Write a fresh lock object and remove the old one (after checking it)."""
        async with self.mutex:
            await self._still_there()
            self.lock.refreshed_ns = time.time_ns()
            new_id = await self.repo.save_sealed("locks", encode_lock(self.lock))
            old_id, self.id = self.id, new_id
            self.refreshed_at = self.clock()
        try:
            await self.repo.backend.remove(object_name("locks", old_id))
        except NotFound:
            pass
        log.debug("lock.refreshed", lock=new_id)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Lock objects read at once when looking for conflicts (each read is a round trip;
# lock files bypass the connection limit, so this bounds them).
LOCK_READS = 8


async def list_locks(
    repo: Repository, skip: Collection[str] = ()
) -> list[tuple[str, Lock | None]]:
    """Every lock but those in ``skip`` (our own), with its decoded contents
    (``None`` if unreadable). Read concurrently: one after another, each a round
    trip, they added up over a slow link with several clients' locks present."""
    ids = [lock_id for lock_id in await repo.list_ids("locks") if lock_id not in skip]
    found: dict[str, Lock | None] = {}
    limiter = anyio.CapacityLimiter(LOCK_READS)

    async def read(lock_id: str) -> None:
        async with limiter:
            try:
                found[lock_id] = decode_lock(await repo.load_sealed("locks", lock_id), lock_id)
            except (ObjectNotFound, NotFound):
                pass  # removed while we looked: its holder finished
            except CorruptedObject:
                found[lock_id] = None

    async with anyio.create_task_group() as tg:
        for lock_id in ids:
            tg.start_soon(read, lock_id)
    return [(lock_id, found[lock_id]) for lock_id in ids if lock_id in found]


async def _conflict(repo: Repository, exclusive: bool, own: set[str]) -> str | None:
    now = time.time_ns()
    host = socket.gethostname()
    for _lock_id, lock in await list_locks(repo, skip=own):
        if lock is None:
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


async def remove_stale_locks(repo: Repository, *, all_locks: bool = False) -> int:
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
    repo: Repository,
    *,
    exclusive: bool,
    retry_seconds: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[HeldLock]:
    """Hold a lock for the body; refresh it in the background; remove it after.

    Yields the :class:`HeldLock`; while it is held, ``repo.lock_check`` is its
    ``check`` (the repository calls it before writing index files and snapshots).
    """
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
    held = HeldLock(repo, lock, lock_id, clock)
    outer_check = getattr(repo, "lock_check", None)
    repo.lock_check = held.check
    async with anyio.create_task_group() as tg:
        tg.start_soon(_refresher, held)
        try:
            yield held
        finally:
            repo.lock_check = outer_check
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                try:
                    await repo.backend.remove(object_name("locks", held.id))
                except NotFound:
                    pass  # removed by someone else: already reported as lost
                except Exception as exc:
                    log.warning("lock.remove_failed", lock=held.id, error=str(exc))


async def _refresher(held: HeldLock) -> None:
    """Refresh every ``REFRESH_SECONDS``; a failed refresh is retried sooner, and
    the command is stopped (``LockLost``) when the lock vanished or stayed
    unrefreshed for ``GIVE_UP_SECONDS``."""
    delay: float = REFRESH_SECONDS
    while True:
        await anyio.sleep(delay)
        try:
            await held.refresh()
        except LockLost:
            raise
        except Exception as exc:
            log.warning("lock.refresh_failed", lock=held.id, error=str(exc))
            held._check_age()
            delay = RETRY_REFRESH_SECONDS
        else:
            delay = REFRESH_SECONDS
