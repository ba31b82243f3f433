"""``repair packs``: salvage the intact blobs of damaged packs (restic's).

For each named pack, in an order that loses nothing if interrupted anywhere:

1. load the whole pack (what can be loaded: a missing pack salvages nothing) and
   keep a copy, ``pack-<ID>`` in the given directory (restic: the current one);
2. decode (decrypt, decompress, check the ID of) every blob that the index or the
   pack's own header lists; the intact ones go on as stored into new packs through
   the shared packing stages — the pipeline is ``packs → salvage → pack → upload →
   index`` — and are indexed;
3. rewrite the index files that list a named pack without it (one new file that
   supersedes them), then delete those old index files;
4. delete the named packs.

Blobs that could not be salvaged are then missing from the index: ``repair
snapshots`` rewrites the snapshots that used them.
"""

from __future__ import annotations

import errno
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import structlog

from cairn.backends.base import NotFound, object_name
from cairn.pipeline import Pipeline, raising_causes
from cairn.repo.codec import decode_blob
from cairn.repo.crypto import Crypto
from cairn.repo.errors import CorruptedObject, RepoError
from cairn.repo.index import Index, IndexFile, decode_index
from cairn.repo.pack import PackEntry, parse_pack_header
from cairn.stages.packing import EncodedBlob, Packer

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

log = structlog.get_logger("cairn.repair")

_PACK_ID = re.compile(r"[0-9a-f]{64}")


class RepairPacksRefused(RepoError):
    """``repair packs`` cannot start (or go on) safely; nothing was deleted."""


@dataclass
class PacksRepair:
    """What ``repair packs`` did."""

    salvaged: int = 0  # blobs stored again
    lost: list[tuple[str, str, str]] = field(default_factory=list)  # (pack, blob, why)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (pack, why)
    copies: list[str] = field(default_factory=list)  # the local copies written
    packs_written: int = 0
    index_files_written: list[str] = field(default_factory=list)
    index_files_removed: int = 0
    packs_removed: list[str] = field(default_factory=list)


def check_pack_ids(pack_ids: list[str]) -> list[str]:
    """The IDs, lower-cased and without duplicates; full IDs only (as restic)."""
    out: list[str] = []
    for raw in pack_ids:
        pack_id = raw.strip().lower()
        if not _PACK_ID.fullmatch(pack_id):
            raise RepairPacksRefused(f"invalid pack ID {raw!r}: give the full 64-digit ID")
        if pack_id not in out:
            out.append(pack_id)
    if not out:
        raise RepairPacksRefused("no pack IDs given")
    return out


def salvage_blobs(
    crypto: Crypto, data: bytes, entries: list[PackEntry]
) -> tuple[list[EncodedBlob], list[tuple[str, str]]]:
    """The intact blobs of a pack's bytes (as stored) and the others ``(blob, why)``.

    A blob listed twice (index and header disagreeing) is salvaged from either place.
    """
    good: dict[bytes, EncodedBlob] = {}
    bad: dict[bytes, str] = {}
    for e in entries:
        if e.id in good:
            continue
        stored = data[e.offset : e.offset + e.length]
        if len(stored) != e.length:
            bad[e.id] = "past the end of the pack"
            continue
        try:
            decode_blob(crypto, e.type, e.id, stored)
        except CorruptedObject as exc:
            bad[e.id] = exc.problem
            continue
        good[e.id] = EncodedBlob(e.type, e.id, stored, e.raw_length)
    lost = [(blob_id.hex(), why) for blob_id, why in bad.items() if blob_id not in good]
    return list(good.values()), lost


class _Salvager:
    """The ``salvage`` stage: one pack in, its intact blobs out."""

    def __init__(
        self, repo: Repository, indexed: dict[str, list[PackEntry]], copy_dir: Path | None
    ) -> None:
        self.repo = repo
        self.indexed = indexed
        self.copy_dir = copy_dir
        self.result = PacksRepair()
        self._seen: set[bytes] = set()  # a blob in two named packs is stored once

    async def salvage(self, pack_id: str) -> AsyncIterator[EncodedBlob]:
        try:
            data = await self.repo.backend.load(object_name("data", pack_id))
        except NotFound:
            self.result.unreadable.append((pack_id, "not in the repository"))
            return
        if self.copy_dir is not None:
            copy = await anyio.to_thread.run_sync(_save_copy, self.copy_dir, pack_id, data)
            self.result.copies.append(copy)
        entries = list(self.indexed.get(pack_id, []))
        try:
            header = parse_pack_header(self.repo.crypto, data, len(data), pack_id)
        except CorruptedObject as exc:
            log.warning("repair.pack_header_unreadable", pack=pack_id, error=exc.problem)
            header = []
        entries += [e for e in header if e not in set(entries)]
        good, lost = await anyio.to_thread.run_sync(salvage_blobs, self.repo.crypto, data, entries)
        self.result.lost += [(pack_id, blob, why) for blob, why in lost]
        if not entries:
            self.result.unreadable.append((pack_id, "no blobs found (no index entry, no header)"))
        for blob in good:
            if blob.blob_id not in self._seen:
                self._seen.add(blob.blob_id)
                self.result.salvaged += 1
                yield blob


def _save_copy(directory: Path, pack_id: str, data: bytes) -> str:
    """``pack-<ID>`` in ``directory``, never over another file of that name."""
    path = directory / f"pack-{pack_id}"
    try:
        with open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        if path.read_bytes() == data:  # from an interrupted run: the same copy
            return str(path)
        raise RepairPacksRefused(
            f"{path} already exists: move it away (nothing was deleted)"
        ) from None
    except OSError as exc:
        why = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise RepairPacksRefused(f"cannot save a copy of the pack to {path}: {why}") from None
    return str(path)


async def repair_packs(
    repo: Repository,
    pack_ids: list[str],
    *,
    copy_dir: Path | None,
    connections: int = 1,
    pack_size: int | None = None,
) -> PacksRepair:
    """Salvage the named packs; see the module docstring."""
    pack_ids = check_pack_ids(pack_ids)
    index = repo.index if repo.index is not None else await repo.load_index()
    named = {bytes.fromhex(p) for p in pack_ids}
    indexed = {p.hex(): entries for p, entries in index.pack_entries() if p in named}
    stored = set()
    async for name, _size in repo.backend.list("data/"):
        if name.rsplit("/", 1)[-1] in pack_ids:
            stored.add(name.rsplit("/", 1)[-1])
    for pack_id in pack_ids:
        if pack_id not in indexed and pack_id not in stored:
            raise RepairPacksRefused(
                f"pack {pack_id} is neither in the index nor in the repository"
            )

    salvager = _Salvager(repo, indexed, copy_dir)
    packer = Packer(
        repo, Index(), pack_size=pack_size or repo.config.pack_size, connections=connections
    )
    pipeline = packer.add_to(
        Pipeline("repair-packs").source("packs", pack_ids).map("salvage", salvager.salvage)
    )
    try:
        with raising_causes():
            await pipeline.run()
    finally:
        await packer.finish()  # what was uploaded is indexed, also on failure
    result = salvager.result
    result.packs_written = packer.stats.packs
    result.index_files_written = list(packer.stats.index_files)
    await _drop_from_index(repo, named, connections, result)
    for pack_id in pack_ids:
        try:
            await repo.backend.remove(object_name("data", pack_id))
        except NotFound:
            continue
        result.packs_removed.append(pack_id)
    log.info(
        "repair.packs",
        salvaged=result.salvaged,
        lost=len(result.lost),
        packs_removed=len(result.packs_removed),
    )
    return result


async def _drop_from_index(
    repo: Repository, doomed: set[bytes], connections: int, result: PacksRepair
) -> None:
    """One index file listing the other packs of every index file in force that
    lists a doomed pack, superseding them; then those files are deleted."""
    ids = await repo.list_ids("index")
    files: dict[str, IndexFile] = {}
    limiter = anyio.CapacityLimiter(max(1, connections))

    async def load(index_id: str) -> None:
        async with limiter:
            files[index_id] = decode_index(await repo.load_sealed("index", index_id), index_id)

    async with anyio.create_task_group() as tg:
        for index_id in ids:
            tg.start_soon(load, index_id)
    superseded = {s.hex() for f in files.values() for s in f.supersedes}
    affected = [
        i for i in ids if i not in superseded and any(p in doomed for p, _e in files[i].packs)
    ]
    if not affected:
        return
    kept = [(p, e) for i in affected for p, e in files[i].packs if p not in doomed]
    result.index_files_written.append(await repo.save_index(kept, supersedes=affected))
    for index_id in affected:
        try:
            await repo.backend.remove(object_name("index", index_id))
        except NotFound:
            continue
        result.index_files_removed += 1
