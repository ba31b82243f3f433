"""``cairn mount MOUNTPOINT``: browse every snapshot as a read-only filesystem (FUSE)."""

from __future__ import annotations

import os
from typing import Any

import anyio
import click

from cairn.backends.base import rebuild_error
from cairn.cli.common import SIZE, echo_json, open_repo, snapshot_filter_options
from cairn.cli.errors import EXIT_OK, UsageError
from cairn.config.settings import Settings
from cairn.stages.snapshots import SnapshotFilter


class FuseMissing(UsageError):
    """pyfuse3 (libfuse 3) is not installed."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"cairn mount needs pyfuse3 and libfuse 3 ({detail}): "
            "pip install 'cairn-backup[mount]' and apt-get install fuse3"
        )
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_error, (type(self), self.args, self.__dict__))


@click.command("mount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@snapshot_filter_options
@click.option("--allow-other", is_flag=True, help="Let other users access the mount.")
@click.option(
    "--no-default-permissions",
    is_flag=True,
    help="With --allow-other: do not check file permissions (every user reads everything).",
)
@click.option(
    "--cache-size",
    type=SIZE,
    default="64M",
    show_default=True,
    help="Memory for decoded file content (an LRU of blobs).",
)
@click.option(
    "--read-ahead",
    type=SIZE,
    default="8M",
    show_default=True,
    help="Fetch this much past a sequential read in the background (0: off).",
)
@click.option(
    "--refresh-interval",
    type=float,
    default=5.0,
    hidden=True,
    help="Seconds between reloads of the snapshot list (tests set 0).",
)
@click.pass_obj
def command(
    settings: Settings,
    mountpoint: str,
    flt: SnapshotFilter,
    allow_other: bool,
    no_default_permissions: bool,
    cache_size: int,
    read_ahead: int,
    refresh_interval: float,
) -> int:
    """Mount the repository at MOUNTPOINT and serve it until Ctrl-C, SIGTERM or umount.

    \b
    Layout (as restic's):
      snapshots/<time>/...      every snapshot; snapshots/latest links to the newest
      ids/<short id>/...
      hosts/<host>/<time>/...   and hosts/<host>/latest
      tags/<tag>/<time>/...     and tags/<tag>/latest
    After `kill -9`, remove the dead mount with `fusermount3 -u MOUNTPOINT`.
    """
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        raise FuseMissing(str(exc)) from None
    from cairn.mount.run import MountOptions, serve
    from cairn.stages.locking import repository_lock

    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    options = MountOptions(
        mountpoint=os.path.abspath(mountpoint),
        snapshot_filter=flt,
        allow_other=allow_other,
        default_permissions=not no_default_permissions,
        cache_size=cache_size,
        read_ahead=read_ahead,
        refresh_seconds=refresh_interval,
    )

    def mounted(snapshots: int) -> None:
        if settings.json:
            line = {"mountpoint": options.mountpoint, "snapshots": snapshots}
            echo_json({"message_type": "mounted", **line})
        elif not settings.quiet:
            click.echo(f"Now serving {snapshots} snapshots at {options.mountpoint}")
            click.echo("When finished, quit with Ctrl-C here or umount the mountpoint.")

    async def main() -> dict[str, Any]:
        async with (
            open_repo(settings) as repo,
            repository_lock(repo, exclusive=False, retry_seconds=settings.retry_lock),
        ):
            return await serve(repo, options, mounted)

    # Not run_async: a signal here means "unmount and exit 0", as restic does, and the
    # mount handles it itself.
    summary = anyio.run(main, backend="asyncio")
    if settings.json:
        echo_json({"message_type": "summary", "mountpoint": options.mountpoint, **summary})
    elif not settings.quiet:
        click.echo(
            f"unmounted {options.mountpoint}; cache hit rate {summary['cache_hit_rate']:.0%}"
        )
    return EXIT_OK
