"""``cairn cat``: print the decoded contents of one repository object."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any

import click

from cairn.cli.common import open_repo, run_async
from cairn.config.settings import Settings

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

OBJECT_TYPES = ("config", "key", "keys", "snapshot", "index", "pack", "blob", "tree", "lock")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8") if not _looks_binary(value) else value.hex()
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def node_json(node: Any) -> dict[str, Any]:
    """A tree node as JSON: names and link targets as text (hex if not UTF-8),
    blob IDs as hex."""
    out = _jsonable(node)
    out["name"] = _text(node.name)
    out["link_target"] = _text(node.link_target)
    out["content"] = [b.hex() for b in node.content]
    out["subtree"] = node.subtree.hex() if node.subtree else None
    out["xattrs"] = {_text(k): _text(v) for k, v in node.xattrs.items()}
    return dict(out)


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.hex()


def _looks_binary(value: bytes) -> bool:
    return len(value) == 32 and not value.isascii()


async def _cat(repo: Repository, kind: str, object_id: str | None) -> Any:
    from cairn.backends.base import object_name
    from cairn.repo.index import decode_index
    from cairn.repo.lock import decode_lock
    from cairn.repo.pack import initial_tail_length, parse_pack_header, required_tail_length
    from cairn.repo.snapshot import decode_snapshot
    from cairn.repo.tree import decode_tree

    if kind == "config":
        return repo.config
    if object_id is None:
        raise click.UsageError(f"cat {kind} needs an ID")
    if kind in ("key", "keys"):
        full = await repo.find_id("keys", object_id)
        return await repo.key_info(full)
    if kind == "snapshot":
        if object_id == "latest":
            from cairn.stages.snapshots import find_snapshot

            full, snap = await find_snapshot(repo, "latest")
        else:
            full = await repo.find_id("snapshots", object_id)
            snap = decode_snapshot(await repo.load_sealed("snapshots", full), full)
        return {"id": full, **_jsonable(snap), "time": snap.time_iso}
    if kind == "index":
        full = await repo.find_id("index", object_id)
        index_file = decode_index(await repo.load_sealed("index", full), full)
        return {
            "supersedes": [s.hex() for s in index_file.supersedes],
            "packs": [
                {"id": pid.hex(), "blobs": [_entry(e) for e in entries]}
                for pid, entries in index_file.packs
            ],
        }
    if kind == "lock":
        full = await repo.find_id("locks", object_id)
        return decode_lock(await repo.load_sealed("locks", full), full)
    if kind == "pack":
        full = await repo.find_id("data", object_id)
        name = object_name("data", full)
        size = await repo.backend.stat(name)
        tail = await repo.backend.load(name, size - initial_tail_length(size))
        need = required_tail_length(tail, size, full)
        if need > len(tail):
            tail = await repo.backend.load(name, size - need)
        return {
            "id": full,
            "size": size,
            "blobs": [_entry(e) for e in parse_pack_header(repo.crypto, tail, size, full)],
        }
    blob_id = bytes.fromhex(await _find_blob(repo, object_id))
    if kind == "tree":
        tree = decode_tree(await repo.read_blob(blob_id), blob_id.hex())
        return {"nodes": [node_json(n) for n in tree.nodes]}
    return await repo.read_blob(blob_id)


async def _find_blob(repo: Repository, prefix: str) -> str:
    from cairn.repo.errors import AmbiguousId, ObjectNotFound

    index = await repo.load_index()
    matches = [b.hex() for b, _ in index.blobs() if b.hex().startswith(prefix.lower())]
    if not matches:
        raise ObjectNotFound(f"no blob matches {prefix!r}")
    if len(matches) > 1:
        raise AmbiguousId(f"blob ID prefix {prefix!r} is ambiguous ({len(matches)} matches)")
    return str(matches[0])


def _entry(entry: Any) -> dict[str, Any]:
    return {
        "type": "tree" if entry.type == 1 else "data",
        "id": entry.id.hex(),
        "offset": entry.offset,
        "length": entry.length,
        "raw_length": entry.raw_length,
    }


@click.command("cat")
@click.argument("kind", type=click.Choice(OBJECT_TYPES))
@click.argument("object_id", required=False)
@click.pass_obj
def command(settings: Settings, kind: str, object_id: str | None) -> None:
    """Print an object: config, key ID, snapshot ID, index ID, pack ID, blob ID,
    tree ID or lock ID. Blobs are written raw; everything else as JSON."""

    async def main() -> Any:
        async with open_repo(settings) as repo:
            return await _cat(repo, kind, object_id)

    value = run_async(main)
    if kind == "blob":
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
        return
    # With --json one line (JSON Lines); for people, indented.
    click.echo(json.dumps(_jsonable(value), indent=None if settings.json else 2))
