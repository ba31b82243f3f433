"""A read-only restic repository (format versions 1 and 2) on any cairn backend.

Layout, key files, packs, index, trees and snapshots as restic's ``doc/design.rst``
describes them: every file is named by the SHA-256 of its stored bytes, blobs by the
SHA-256 of their plaintext; "unpacked" files (index, snapshots, locks) are encrypted
JSON, in version 2 optionally a ``0x02`` byte and zstd-compressed JSON; blobs of a
version 2 repository may be zstd-compressed (the index gives their plaintext size).

Nothing is written but a lock file (so that a ``restic prune`` running meanwhile
waits, as it would for another restic), removed when done.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
import structlog
import zstandard

from cairn.backends.base import Backend, NotFound, is_hex_id, object_name
from cairn.repo.codec import FLAG_ZSTD
from cairn.repo.errors import (
    CorruptedObject,
    ObjectNotFound,
    RepositoryNotFound,
    WrongPassword,
)
from cairn.repo.restic.convert import snapshot_from_json, tree_from_json
from cairn.repo.restic.crypto import ResticKey, open_key_file, parse_key_file
from cairn.repo.snapshot import Snapshot
from cairn.repo.tree import Tree

log = structlog.get_logger("cairn.restic")

DATA, TREE = 0, 1  # cairn's blob types (cairn.repo.pack), which restic's match
_MAX_BLOB = 64 * 1024 * 1024
FLAG_ZSTD_BYTE = bytes((FLAG_ZSTD,))  # restic's chunks are ≤ 8 MiB; trees are bounded too


class BlobLocation(NamedTuple):
    pack_id: bytes
    type: int
    offset: int
    length: int  # stored (encrypted) bytes
    raw_length: int  # plaintext bytes


def _sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def _decompress(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def decode_blob(key: ResticKey, blob_id: bytes, stored: bytes | memoryview) -> bytes:
    """One blob's plaintext, verified against its ID (see :func:`decode_blob_and_frame`)."""
    return decode_blob_and_frame(key, blob_id, stored)[0]


def decode_blob_and_frame(
    key: ResticKey, blob_id: bytes, stored: bytes | memoryview
) -> tuple[bytes, bytes | None]:
    """One blob's plaintext, verified against its ID, and its zstd frame if it was
    stored compressed (None if not).

    Whether it was compressed is told by the hash: the decrypted bytes either hash
    to the ID, or decompress to bytes that do (a stored ``.zst`` file's chunk is not
    mistaken for compressed). What starts as a zstd frame is tried decompressed
    first: in a format 2 repository nearly every blob is, and one hash is saved."""
    name = blob_id.hex()
    plain = key.open(stored, "restic blob", name)
    if plain[:4] == _ZSTD_MAGIC:
        try:
            data = _decompress(plain)
        except zstandard.ZstdError:
            pass
        else:
            if _sha256(data) == blob_id:
                return data, plain
    if _sha256(plain) == blob_id:
        return plain, None
    raise CorruptedObject("restic blob", name, "content does not match its ID")


class ResticDecoder:
    """The workers' reader of restic blobs (pickled to them with the master key)."""

    def __init__(self, key: ResticKey) -> None:
        self.key = key

    def decode(
        self, blob_type: int, blob_id: bytes, stored: memoryview
    ) -> tuple[bytes, bytes | None]:
        """The plaintext, and — for a blob restic stored compressed, in a frame that
        records its size as cairn's reader requires — cairn's packed body (flag byte
        and the same frame), so that copy only re-encrypts it instead of compressing
        again. Blobs restic stored raw get None: copy compresses them."""
        data, frame = decode_blob_and_frame(self.key, blob_id, stored)
        if frame is not None and zstandard.frame_content_size(frame) == len(data):
            return data, FLAG_ZSTD_BYTE + frame
        return data, None


@dataclass
class ResticConfig:
    version: int
    id: str
    chunker_polynomial: str


class ResticRepository:
    """An open restic repository: its backend, master key and config."""

    def __init__(self, backend: Backend, key: ResticKey, config: ResticConfig, key_id: str):
        self.backend = backend
        self.key = key
        self.config = config
        self.key_id = key_id
        self.index: dict[bytes, BlobLocation] | None = None

    # -- opening ----------------------------------------------------------------------

    @classmethod
    async def open(cls, backend: Backend, password: str | bytes) -> ResticRepository:
        """Open with whichever key file the password unlocks."""
        secret = password.encode() if isinstance(password, str) else password
        try:
            config_bytes = await backend.load("config")
        except NotFound:
            raise RepositoryNotFound(backend.location) from None
        names = [name.rsplit("/", 1)[-1] async for name, _ in backend.list("keys/")]
        key_ids = sorted(n for n in names if is_hex_id(n))
        damaged = []
        for key_id in key_ids:
            try:
                data = await backend.load(object_name("keys", key_id))
            except NotFound:
                continue
            try:
                if _sha256(data).hex() != key_id:
                    raise CorruptedObject("restic key", key_id, "content does not match its name")
                doc = parse_key_file(data, key_id)
                key = await anyio.to_thread.run_sync(open_key_file, doc, secret, key_id)
            except CorruptedObject as exc:
                damaged.append(f"keys/{key_id} ({exc.problem})")
                continue
            if key is not None:
                config = _decode_config(key, config_bytes)
                log.info("restic.opened", key=key_id[:8], version=config.version)
                return cls(backend, key, config, key_id)
        if damaged:
            raise WrongPassword(
                "no key of the restic repository opens with this password; damaged key "
                "files: " + ", ".join(damaged)
            )
        raise WrongPassword("no key of the restic repository opens with this password")

    # -- unpacked files ---------------------------------------------------------------

    async def load_json(self, kind: str, object_id: str) -> Any:
        """An index, snapshot or lock file's JSON, checked against its name."""
        try:
            stored = await self.backend.load(object_name(kind, object_id))
        except NotFound:
            raise ObjectNotFound(f"restic {kind}/{object_id}: not found") from None
        label = f"restic {kind.rstrip('s') if kind != 'index' else kind}"
        if _sha256(stored).hex() != object_id:
            raise CorruptedObject(label, object_id, "content does not match its name")
        return _decode_unpacked(self.key, stored, label, object_id)

    async def list_ids(self, kind: str) -> list[str]:
        ids = [name.rsplit("/", 1)[-1] async for name, _ in self.backend.list(f"{kind}/")]
        return sorted(i for i in ids if is_hex_id(i))

    async def snapshots(self) -> tuple[list[tuple[str, Snapshot]], list[tuple[str, str]]]:
        """Every readable snapshot, oldest first, and ``(id, problem)`` of the others."""
        out: list[tuple[str, Snapshot]] = []
        damaged: list[tuple[str, str]] = []
        for snapshot_id in await self.list_ids("snapshots"):
            try:
                doc = await self.load_json("snapshots", snapshot_id)
                out.append((snapshot_id, snapshot_from_json(doc, snapshot_id)))
            except (CorruptedObject, ObjectNotFound) as exc:
                damaged.append((snapshot_id, str(exc)))
        out.sort(key=lambda item: (item[1].time_ns, item[0]))
        return out, damaged

    async def load_index(self) -> dict[bytes, BlobLocation]:
        """Every blob's location, from every index file (a damaged one is an error:
        its blobs would look missing)."""
        index: dict[bytes, BlobLocation] = {}
        for index_id in await self.list_ids("index"):
            doc = await self.load_json("index", index_id)
            try:
                for pack in doc["packs"] or []:
                    pack_id = bytes.fromhex(pack["id"])
                    for blob in pack["blobs"] or []:
                        blob_type = {"data": DATA, "tree": TREE}[blob["type"]]
                        length = int(blob["length"])
                        raw = int(blob.get("uncompressed_length") or 0) or length - 32
                        index[bytes.fromhex(blob["id"])] = BlobLocation(
                            pack_id, blob_type, int(blob["offset"]), length, raw
                        )
            except (KeyError, TypeError, ValueError) as exc:
                raise CorruptedObject("restic index", index_id, f"malformed: {exc}") from None
        self.index = index
        return index

    # -- blobs and trees --------------------------------------------------------------

    async def read_blob(self, blob_id: bytes) -> bytes:
        assert self.index is not None, "load the index first"
        loc = self.index.get(blob_id)
        if loc is None:
            raise ObjectNotFound(f"restic blob {blob_id.hex()} is not in the index")
        if loc.length > _MAX_BLOB:
            raise CorruptedObject("restic index", "", f"blob {blob_id.hex()} is {loc.length} bytes")
        try:
            stored = await self.backend.load(
                object_name("data", loc.pack_id.hex()), loc.offset, loc.length
            )
        except NotFound:
            raise ObjectNotFound(f"restic pack {loc.pack_id.hex()}: not found") from None
        if len(stored) != loc.length:
            raise CorruptedObject("restic pack", loc.pack_id.hex(), "shorter than its index says")
        return await anyio.to_thread.run_sync(decode_blob, self.key, blob_id, stored)

    async def load_tree(self, tree_id: bytes) -> Tree:
        plain = await self.read_blob(tree_id)
        try:
            doc = json.loads(plain)
        except ValueError as exc:
            raise CorruptedObject("restic tree", tree_id.hex(), f"not JSON: {exc}") from None
        tree, skipped = tree_from_json(doc, tree_id.hex())
        if skipped:
            log.warning("restic.entries_skipped", tree=tree_id.hex(), count=skipped)
        return tree

    # -- locking ----------------------------------------------------------------------

    @asynccontextmanager
    async def shared_lock(self, refresh_seconds: float = 300) -> AsyncIterator[None]:
        """A non-exclusive restic lock for as long as the block runs (refreshed as
        restic does), so that a concurrent ``restic prune`` waits for us."""
        name = await self._write_lock()
        try:
            async with anyio.create_task_group() as tg:

                async def refresh() -> None:
                    nonlocal name
                    while True:
                        await anyio.sleep(refresh_seconds)
                        old, name = name, await self._write_lock()
                        await self._remove_lock(old)

                tg.start_soon(refresh)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._remove_lock(name)

    async def _write_lock(self) -> str:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        doc = {
            "time": f"{stamp}.{int(now % 1 * 1e9):09d}Z",
            "exclusive": False,
            "hostname": socket.gethostname(),
            "username": _user(),
            "pid": os.getpid(),
            "uid": os.getuid(),
            "gid": os.getgid(),
        }
        stored = self.key.seal(json.dumps(doc).encode())
        lock_id = _sha256(stored).hex()
        await self.backend.save(object_name("locks", lock_id), stored)
        return lock_id

    async def _remove_lock(self, lock_id: str) -> None:
        try:
            await self.backend.remove(object_name("locks", lock_id))
        except NotFound:
            pass


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _decode_unpacked(key: ResticKey, stored: bytes, label: str, name: str) -> Any:
    plain = key.open(stored, label, name)
    if plain[:1] == b"\x02":
        try:
            plain = _decompress(plain[1:])
        except zstandard.ZstdError as exc:
            raise CorruptedObject(label, name, f"does not decompress: {exc}") from None
    elif plain[:1] not in (b"{", b"["):
        raise CorruptedObject(label, name, f"unknown encoding version {plain[:1]!r}")
    try:
        return json.loads(plain)
    except ValueError as exc:
        raise CorruptedObject(label, name, f"not JSON: {exc}") from None


def _decode_config(key: ResticKey, stored: bytes) -> ResticConfig:
    doc = _decode_unpacked(key, stored, "restic config", "")
    try:
        config = ResticConfig(int(doc["version"]), str(doc["id"]), str(doc["chunker_polynomial"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptedObject("restic config", "", f"malformed: {exc}") from None
    if config.version not in (1, 2):
        raise CorruptedObject(
            "restic config",
            "",
            f"unsupported repository version {config.version} (cairn reads 1 and 2)",
        )
    return config
