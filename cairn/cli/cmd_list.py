"""``cairn list``: the IDs of one kind of repository object, one per line (restic's)."""

from __future__ import annotations

import json

import click

from cairn.cli.common import open_repo, run_async
from cairn.cli.errors import EXIT_OK
from cairn.config.settings import Settings

# The kinds restic's ``list`` takes; ``packs`` are the objects under ``data/``.
_KINDS = {"snapshots": "snapshots", "index": "index", "keys": "keys", "locks": "locks"}
KIND_NAMES = (*_KINDS, "packs", "blobs")


@click.command("list")
@click.argument("kind", type=click.Choice(KIND_NAMES))
@click.pass_obj
def command(settings: Settings, kind: str) -> int:
    """List the IDs of every object of KIND: snapshots, index, keys, locks, packs, or
    blobs (``data ID`` / ``tree ID`` per line, from the index).

    With --json, one JSON object per line: ``{"type": ..., "id": ...}``.
    """

    def emit(object_type: str, object_id: str) -> None:
        if settings.json:
            click.echo(json.dumps({"type": object_type, "id": object_id}))
        elif kind == "blobs":
            click.echo(f"{object_type} {object_id}")
        else:
            click.echo(object_id)

    async def main() -> None:
        async with open_repo(settings) as repo:
            if kind == "blobs":
                from cairn.repo.codec import BLOB_TYPE_NAMES

                index = await repo.load_index()
                for blob_id, loc in index.blobs():
                    emit(BLOB_TYPE_NAMES[loc.type], blob_id.hex())
            elif kind == "packs":
                from cairn.backends.base import is_hex_id

                # Streamed as the backend lists them: a large repository has
                # millions of packs.
                async for name, _size in repo.backend.list("data/"):
                    pack_id = name.rsplit("/", 1)[-1]
                    if is_hex_id(pack_id):
                        emit("packs", pack_id)
            else:
                for object_id in await repo.list_ids(_KINDS[kind]):
                    emit(kind, object_id)

    run_async(main)
    return EXIT_OK
