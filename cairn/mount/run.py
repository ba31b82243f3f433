"""Mount, serve until unmounted or signalled, unmount cleanly.

pyfuse3 runs on asyncio (:mod:`cairn.mount.aioloop`, a faster ``pyfuse3.asyncio``),
the loop every cairn command runs on, because the S3 and SFTP backends need it. Each
FUSE request is a task on that loop; blob fetches and read-ahead are tasks of this
module's task group.

The mount ends when:

* the mountpoint is unmounted (``umount``, ``fusermount3 -u``): the kernel ends the
  session, ``pyfuse3.main`` returns;
* SIGINT or SIGTERM arrives: the session is told to end (``pyfuse3.terminate``),
  requests under way finish, then the filesystem is unmounted. A second signal
  stops at once (requests under way get no answer; the kernel fails them);
* the repository lock is lost (``LockLost``, exit 11).

Whichever it is, ``pyfuse3.close(unmount=True)`` runs, so no stale mount is left
behind — unless the process is killed with SIGKILL; then ``fusermount3 -u
MOUNTPOINT`` removes it.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from cairn.mount.blobs import BlobCache, BlobSource
from cairn.pipeline.shm import SlotPool
from cairn.repo.errors import RepoError
from cairn.stages.fetch import SLOT_SIZE

if TYPE_CHECKING:
    from cairn.repo.repository import Repository
    from cairn.stages.snapshots import SnapshotFilter

log = structlog.get_logger("cairn.mount")

MiB = 1024 * 1024
# Decoded blobs kept (``--cache-size``): the read-ahead of a few concurrent readers
# plus the blobs they are reading.
DEFAULT_CACHE_SIZE = 64 * MiB
# How far past a sequential read its next blobs are fetched (``--read-ahead``).
DEFAULT_READ_AHEAD = 8 * MiB
# Seconds between reloads of the snapshot list when the layout is listed.
DEFAULT_REFRESH_SECONDS = 5.0
# Shared-memory slots for ranges being downloaded (each SLOT_SIZE): the bytes in
# flight; four keep two decode threads and the backend busy.
DOWNLOAD_SLOTS = 4
# pyfuse3 worker tasks (requests handled at once).
MAX_REQUESTS = 64


class MountFailed(RepoError):
    """The filesystem could not be mounted (exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class MountOptions:
    """What ``cairn mount`` was asked for."""

    mountpoint: str
    snapshot_filter: SnapshotFilter
    allow_other: bool = False
    default_permissions: bool = True
    cache_size: int = DEFAULT_CACHE_SIZE
    read_ahead: int = DEFAULT_READ_AHEAD
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS


def fuse_options(options: MountOptions) -> set[str]:
    out = {"fsname=cairn", "subtype=cairn", "ro", "noatime"}
    if options.default_permissions:
        out.add("default_permissions")
    if options.allow_other:
        out.add("allow_other")
    return out


async def serve(
    repo: Repository,
    options: MountOptions,
    on_mounted: Callable[[int], None] = lambda snapshots: None,
) -> dict[str, Any]:
    """Mount the repository at ``options.mountpoint`` and serve until unmounted or
    signalled; return the cache statistics. ``on_mounted(snapshot count)`` is
    called once the mount is visible."""
    import pyfuse3

    from cairn.mount import aioloop
    from cairn.mount.fs import READ_AHEAD_SPAN, MountFS

    aioloop.enable()
    await repo.load_index()
    slots = SlotPool(SLOT_SIZE, DOWNLOAD_SLOTS)
    reason = "unmounted"
    try:
        async with anyio.create_task_group() as tg:
            blobs = BlobSource(
                repo, slots, BlobCache(options.cache_size), tg.start_soon, READ_AHEAD_SPAN
            )
            fs = MountFS(
                repo,
                blobs,
                options.snapshot_filter,
                read_ahead=options.read_ahead,
                refresh_seconds=options.refresh_seconds,
            )
            await fs.snapshots.refresh(force=True)
            # The index, snapshots and modules loaded so far live as long as the mount:
            # out of the collector's sight, or its first pass (~75 ms on the medium
            # bench corpus) lands in the middle of the first reads.
            gc.freeze()
            try:
                pyfuse3.init(fs, options.mountpoint, fuse_options(options))
            except RuntimeError as exc:
                raise MountFailed(
                    f"cannot mount at {options.mountpoint}: {exc} (is FUSE available, "
                    "and the mountpoint an empty directory that is not already mounted?)"
                ) from None
            try:
                log.info("mount.mounted", mountpoint=options.mountpoint)
                on_mounted(fs.snapshots.shown)
                signalled: list[int] = []
                tg.start_soon(_stop_on_signals, pyfuse3, tg.cancel_scope, signalled)
                await pyfuse3.main(max_tasks=MAX_REQUESTS)
                if signalled:
                    reason = signal.Signals(signalled[0]).name
            finally:
                pyfuse3.close(unmount=True)
                tg.cancel_scope.cancel()
    finally:
        slots.close()
    stats = {"read_requests": fs.reads, "bytes_read": fs.read_bytes, **blobs.stats.as_fields()}
    log.info("mount.unmounted", mountpoint=options.mountpoint, reason=reason, **stats)
    return {"reason": reason, **stats}


async def _stop_on_signals(pyfuse3: Any, scope: anyio.CancelScope, signalled: list[int]) -> None:
    """First SIGINT/SIGTERM: end the FUSE session gracefully; second: cancel."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as incoming:
        async for signum in incoming:
            if signalled:
                scope.cancel()
                return
            signalled.append(signum)
            log.info("mount.stopping", signal=signal.Signals(signum).name)
            pyfuse3.terminate()
