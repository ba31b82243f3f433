"""``cairn dump SNAPSHOT PATH``: a file to stdout, or a directory as a tar stream."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from typing import TYPE_CHECKING, Any, BinaryIO

import click

from cairn.cli.common import open_repo, run_async, snapshot_filter_options
from cairn.config.settings import Settings
from cairn.stages.snapshots import SnapshotFilter

if TYPE_CHECKING:
    from cairn.repo.repository import Repository


async def write_file(repo: Repository, node: Any, out: BinaryIO) -> None:
    for blob_id in node.content:
        out.write(await repo.read_blob(blob_id))


class _BlobReader(io.RawIOBase):
    """A file-like view of already-fetched blobs, for tarfile.addfile."""

    def __init__(self, parts: list[bytes]):
        self._data = io.BytesIO(b"".join(parts))

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._data.readinto(b)


async def write_tar(repo: Repository, tree_id: bytes, base: bytes, out: BinaryIO) -> None:
    from cairn.stages.browse import walk

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        async for path, node in walk(repo, tree_id, base):
            info = tarfile.TarInfo(os.fsdecode(path.lstrip(b"/")))
            info.mode = node.mode
            info.uid, info.gid = node.uid, node.gid
            info.uname, info.gname = node.user, node.group
            info.mtime = node.mtime_ns / 1e9
            fileobj = None
            if node.type == "file":
                info.type = tarfile.REGTYPE
                parts = [await repo.read_blob(b) for b in node.content]
                info.size = sum(len(p) for p in parts)
                fileobj = _BlobReader(parts)
            elif node.type == "dir":
                info.type = tarfile.DIRTYPE
            elif node.type == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = os.fsdecode(node.link_target)
            elif node.type == "fifo":
                info.type = tarfile.FIFOTYPE
            elif node.type in ("chardev", "blockdev"):
                info.type = tarfile.CHRTYPE if node.type == "chardev" else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
            else:
                continue
            tar.addfile(info, fileobj)


@click.command("dump")
@click.argument("snapshot")
@click.argument("path")
@snapshot_filter_options
@click.pass_obj
def command(
    settings: Settings,
    snapshot: str,
    path: str,
    flt: SnapshotFilter,
) -> None:
    """Write a file from a snapshot to stdout; a directory becomes a tar stream."""
    from cairn.repo.errors import ObjectNotFound
    from cairn.stages.browse import find_node
    from cairn.stages.snapshots import find_snapshot

    async def main() -> None:
        async with open_repo(settings) as repo:
            _sid, snap = await find_snapshot(repo, snapshot, flt)
            target = os.fsencode(path).rstrip(b"/")
            tree_id, node = await find_node(repo, snap.tree, target)
            out = sys.stdout.buffer
            if node is not None and node.type == "file":
                await write_file(repo, node, out)
            elif tree_id is not None:
                await write_tar(repo, tree_id, target, out)
            else:
                raise ObjectNotFound(f"path {path!r} not found in the snapshot")
            out.flush()

    run_async(main)
