"""The glue between a backend and the format: open/init, sealed objects, keys, blobs.

Deliberately thin. Packs are written only by the shared packing stages
(``cairn/stages/packing.py``: ``Packer``, and ``store_blobs`` for small writes);
this class serves them, the CLI and the restore side with whole-object reads and
writes.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog

from cairn.backends.base import AlreadyExists, Backend, NotFound, ObjectTruncated, is_hex_id
from cairn.backends.base import object_name as backend_name
from cairn.repo.cache import MetadataCache
from cairn.repo.codec import decode_blob, seal, unseal
from cairn.repo.config import Config, decode_config, encode_config
from cairn.repo.crypto import Crypto, MasterKey, storage_id
from cairn.repo.errors import (
    AmbiguousId,
    CorruptedObject,
    KeyRefused,
    ObjectNotFound,
    RepoError,
    RepositoryExists,
    RepositoryNotFound,
    WrongPassword,
)
from cairn.repo.index import Index, IndexFile, decode_index, encode_index
from cairn.repo.keyfile import KdfParams, keyfile_info, make_keyfile, unwrap_keyfile
from cairn.repo.pack import TREE, PackEntry
from cairn.repo.recovery import (
    KIND_RECOVERY,
    IdentityMismatch,
    NoRecoveryKey,
    Recipient,
    key_kind,
    make_recovery_keyfile,
    recipient_set,
    recovery_info,
    unwrap_recovery_keyfile,
)
from cairn.repo.snapshot import Snapshot, decode_snapshot, encode_snapshot
from cairn.repo.tree import Tree, decode_tree

# Backend directory → the kind sealed objects in it are bound to (their AD).
log = structlog.get_logger("cairn.repository")

_SEAL_KIND = {"snapshots": "snapshot", "index": "index", "locks": "lock"}
# Sealed kinds the metadata cache keeps.
_CACHED = ("snapshots", "index")
# Sealed kinds written only while this process's lock is verified to be held.
_LOCK_CHECKED = ("snapshots", "index")

# A repository's top-level directories (an interrupted init may have left them).
_LAYOUT = frozenset({"keys", "snapshots", "index", "locks", "data"})

# Decoding below this size is cheaper inline than a hop to a worker thread (~50 µs).
_INLINE_DECODE = 64 * 1024


async def init_repository(
    backend: Backend,
    password: str | bytes,
    *,
    hostname: str,
    username: str,
    kdf_params: KdfParams | None = None,
    config: Config | None = None,
    recipients: Sequence[Recipient] = (),
    callbacks: Any = None,
) -> Repository:
    """Create a repository: layout, first key file, the recovery key file when
    ``recipients`` are given, then config (its presence = the repository exists)."""
    try:
        await backend.stat("config")
    except NotFound:
        pass
    else:
        raise RepositoryExists(backend.location)
    refuse_foreign_directory(backend)
    create_layout = getattr(backend, "create_layout", None)
    if create_layout is not None:
        try:
            await create_layout()
        except AlreadyExists:
            raise RepositoryExists(backend.location) from None
    master = MasterKey.generate()
    keyfile = await anyio.to_thread.run_sync(
        lambda: make_keyfile(
            master, password, hostname=hostname, username=username, kdf_params=kdf_params
        )
    )
    key_id = storage_id(keyfile)
    await backend.save(backend_name("keys", key_id), keyfile)
    if recipients:
        await _save_recovery_key(backend, master, recipients, hostname, username, callbacks)
    config = config or Config()
    crypto = master.crypto()
    await backend.save("config", seal(crypto, "config", encode_config(config)))
    return Repository(backend, master, config, key_id)


class DirectoryNotEmpty(RepoError):
    """``init`` into a local directory that holds something other than a repository."""

    exit_code = 1

    def __init__(self, path: Path, entry: str) -> None:
        super().__init__(
            f"{path}: the directory is not empty and is not a cairn repository "
            f"(it holds {entry!r}); choose an empty or new directory"
        )


def refuse_foreign_directory(backend: Backend) -> None:
    """Refuse to create a repository inside a local directory that already holds
    other files (restic refuses too): they would be mixed with the repository's.

    Only the repository's own top-level directories (left by an interrupted init)
    are allowed.
    """
    inner: Any = backend
    while hasattr(inner, "inner"):
        inner = inner.inner
    root = getattr(inner, "root", None)
    if not isinstance(root, Path):
        return
    try:
        entries = sorted(os.listdir(root))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry not in _LAYOUT:
            raise DirectoryNotEmpty(root, entry)


async def _save_recovery_key(
    backend: Backend,
    master: MasterKey,
    recipients: Sequence[Recipient],
    hostname: str,
    username: str,
    callbacks: Any,
) -> str:
    keyfile = await anyio.to_thread.run_sync(
        lambda: make_recovery_keyfile(
            master, recipients, hostname=hostname, username=username, callbacks=callbacks
        )
    )
    key_id = storage_id(keyfile)
    await backend.save(backend_name("keys", key_id), keyfile)
    log.info("key.recovery_added", key=key_id, recipients=len(recipients))
    return key_id


async def _load_key(backend: Backend, key_id: str) -> bytes | None:
    try:
        return await backend.load(backend_name("keys", key_id))
    except NotFound:  # removed while we listed
        return None


def _check_key_name(data: bytes, key_id: str) -> None:
    """For a key file that did not open: it was written under the BLAKE3 of its
    bytes, so a mismatch means damage inside its encrypted part, which would
    otherwise read as a wrong password. (A key file that opens is used whatever
    its name: docs/format.md.)"""
    if is_hex_id(key_id) and storage_id(data) != key_id:
        raise CorruptedObject("key file", key_id, "content does not match its name")


async def _try_key(data: bytes, key_id: str, password: str | bytes) -> MasterKey | None:
    """The master key if ``password`` opens this password key file, else None."""
    try:
        return await anyio.to_thread.run_sync(unwrap_keyfile, data, password, key_id)
    except WrongPassword:
        return None  # not this key; a damaged one raises CorruptedObject


async def _key_ids(backend: Backend) -> list[str]:
    key_ids = sorted([n.rsplit("/", 1)[-1] async for n, _size in backend.list("keys/")])
    if not key_ids:
        raise RepoError(f"{backend.location}: the repository has no key files")
    return key_ids


async def _load_config(backend: Backend) -> bytes:
    try:
        return await backend.load("config")
    except NotFound:
        raise RepositoryNotFound(backend.location) from None


async def _config_and_key_ids(backend: Backend) -> tuple[bytes, list[str]]:
    """The config's bytes and the key files' names, asked for at once: two round trips
    that need nothing from each other (over a 20 ms link, one fewer to wait for). A
    missing config is reported before a missing key, as when they were asked in turn."""
    outcomes: dict[str, Any] = {}

    async def fetch(what: str, call: Callable[[Backend], Awaitable[Any]]) -> None:
        try:
            outcomes[what] = await call(backend)
        except Exception as exc:
            outcomes[what] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch, "config", _load_config)
        tg.start_soon(fetch, "keys", _key_ids)
    for what in ("config", "keys"):
        if isinstance(outcomes[what], Exception):
            raise outcomes[what]
    return outcomes["config"], outcomes["keys"]


async def open_repository(
    backend: Backend, password: str | bytes, *, key_hint: str | None = None
) -> Repository:
    """Open with whichever password key file the password unlocks.

    ``key_hint`` (restic's ``--key-hint``): the keys whose ID starts with it are
    tried first, so a repository with many keys costs one Argon2 run, not one per
    key; a hint that matches no key changes nothing (restic ignores it too)."""
    config_bytes, key_ids = await _config_and_key_ids(backend)
    if key_hint:
        hint = key_hint.strip().lower()
        key_ids.sort(key=lambda key_id: not key_id.startswith(hint))
    damaged: list[str] = []
    config_error: CorruptedObject | None = None
    recovery_only = True
    for key_id in key_ids:
        data = await _load_key(backend, key_id)
        if data is None:
            continue
        try:
            # A recovery key file never opens with a password: no age, no Argon2.
            if key_kind(data, key_id) == KIND_RECOVERY:
                continue
            recovery_only = False
            master = await _try_key(data, key_id, password)
            if master is None:
                _check_key_name(data, key_id)
        except CorruptedObject as exc:
            # A corrupt key must not lock the user out if another one opens.
            recovery_only = False
            damaged.append(f"keys/{key_id} ({exc.problem})")
            continue
        if master is None:
            continue
        try:
            # Unnamed: the kind alone reads "config is corrupted: …".
            config = decode_config(unseal(master.crypto(), "config", config_bytes))
        except CorruptedObject as exc:
            # This key may hold another master key: an init killed between its key
            # and its config leaves such an orphan, and a second init adds the real
            # one beside it. Try the other keys before calling the config damaged.
            config_error = exc
            continue
        return Repository(backend, master, config, key_id)
    if config_error is not None:
        raise config_error
    if damaged:  # the password may well be right: say which key files are broken
        raise WrongPassword(
            "no key of the repository opens with this password; damaged key files: "
            + ", ".join(damaged)
        )
    if recovery_only:
        raise WrongPassword(
            "the repository has no password key, only recovery keys: "
            "add one with `cairn key recover --identity FILE`"
        )
    raise WrongPassword()


async def open_repository_with_identities(
    backend: Backend, identities: Sequence[Any]
) -> Repository:
    """Open with a recovery key file that one of the age ``identities`` unlocks.

    The recovered master key must open the (authenticated) config: a recovery key
    file forged by someone who only knows the recipients' public keys cannot pass.
    """
    config_bytes = await _load_config(backend)
    damaged: list[str] = []
    found = 0
    for key_id in await _key_ids(backend):
        data = await _load_key(backend, key_id)
        try:
            if data is None or key_kind(data, key_id) != KIND_RECOVERY:
                continue
            found += 1
            opened = await anyio.to_thread.run_sync(
                unwrap_recovery_keyfile, data, identities, key_id
            )
            if opened is None:
                _check_key_name(data, key_id)
        except CorruptedObject as exc:
            damaged.append(f"keys/{key_id} ({exc.problem})")
            continue
        if opened is None:
            continue
        master, verified = opened
        try:
            config = decode_config(unseal(master.crypto(), "config", config_bytes))
        except CorruptedObject:
            damaged.append(f"keys/{key_id} (it holds a key that does not open this repository)")
            continue
        if not verified:
            log.warning("key.recovery_mac_mismatch", key=key_id)
        return Repository(backend, master, config, key_id)
    if not found and not damaged:
        raise NoRecoveryKey(backend.location)
    detail = f"; damaged recovery key files: {', '.join(damaged)}" if damaged else ""
    raise IdentityMismatch(detail)


class Repository:
    """An open repository: its backend, sub-keys, config and the key in use."""

    def __init__(self, backend: Backend, master: MasterKey, config: Config, key_id: str) -> None:
        self.backend = backend
        self._master = master
        self.crypto: Crypto = master.crypto()
        self.config = config
        self.key_id = key_id
        self.index: Index | None = None
        # The local metadata cache (index files, snapshots, tree packs); set by the
        # CLI unless --no-cache. None: every read goes to the backend.
        self.cache: MetadataCache | None = None
        self._pack_locks: dict[str, anyio.Lock] = {}
        self._damaged_packs: set[str] = set()  # tree packs that failed their hash
        # Set while a repository lock is held (cairn.stages.locking): raises if the
        # lock was lost. Index files and snapshots are written only after it passes,
        # so a process whose lock was removed (and whose packs a prune may have
        # deleted) never publishes references to them.
        self.lock_check: Callable[[], Awaitable[None]] | None = None

    def on_backend(self, backend: Backend) -> Repository:
        """The same repository (key, config) reached through another backend: a
        migration's destination, which holds a copy of this one's files."""
        return Repository(backend, self._master, self.config, self.key_id)

    # --- sealed whole-file objects -------------------------------------------------

    async def save_sealed(self, kind: str, payload: bytes) -> str:
        """Seal ``payload`` and store it under ``<kind>/<storage id>``; return the ID."""
        if kind in _LOCK_CHECKED and self.lock_check is not None:
            await self.lock_check()
        stored = seal(self.crypto, _SEAL_KIND[kind], payload)
        object_id = storage_id(stored)
        await self.backend.save(backend_name(kind, object_id), stored)
        if self.cache is not None and kind in _CACHED:
            await self.cache.save(kind, object_id, stored)
        return object_id

    async def load_sealed(self, kind: str, object_id: str) -> bytes:
        """Load, verify the name hash, and unseal one object."""
        seal_kind = _SEAL_KIND[kind]
        cache = self.cache if kind in _CACHED else None
        cached = await cache.load(kind, object_id) if cache is not None else None
        if cached is not None:
            stored = cached  # verified against its name by the cache
        else:
            try:
                stored = await self.backend.load(backend_name(kind, object_id))
            except NotFound:
                raise ObjectNotFound(f"{kind}/{object_id}: not found") from None
            if storage_id(stored) != object_id:
                raise CorruptedObject(seal_kind, object_id, "content does not match its name")
            if cache is not None:
                await cache.save(kind, object_id, stored)
        if len(stored) <= _INLINE_DECODE:
            return unseal(self.crypto, seal_kind, stored, object_id)
        return await anyio.to_thread.run_sync(unseal, self.crypto, seal_kind, stored, object_id)

    async def list_ids(self, kind: str) -> list[str]:
        """Sorted IDs of every object of a kind (``snapshots``, ``index``, ``keys``...)."""
        ids = [name.rsplit("/", 1)[-1] async for name, _size in self.backend.list(f"{kind}/")]
        out = sorted(i for i in ids if is_hex_id(i))
        if self.cache is not None and kind in _CACHED:
            self.cache.drop_stale(kind, out)  # gone from the backend: gone from the cache
        return out

    async def find_id(self, kind: str, prefix: str) -> str:
        """The one ID of ``kind`` starting with ``prefix`` (restic-style short IDs)."""
        prefix = prefix.lower()
        matches = [i for i in await self.list_ids(kind) if i.startswith(prefix)]
        if not matches:
            raise ObjectNotFound(f"no {kind} object matches ID {prefix!r}")
        if len(matches) > 1:
            raise AmbiguousId(
                f"ID {prefix!r} matches {len(matches)} {kind} objects; give more characters"
            )
        return matches[0]

    # --- keys ------------------------------------------------------------------------

    async def list_keys(self) -> list[dict[str, Any]]:
        """Metadata of every key file (``key_info``), sorted by ID."""
        return [await self.key_info(key_id) for key_id in await self.list_ids("keys")]

    async def key_info(self, key_id: str) -> dict[str, Any]:
        """One key file's metadata, with ``id``, ``kind`` (``password`` or
        ``recovery``) and ``current`` (the key in use); recovery keys also list their
        recipients and whether their MAC verifies under this repository's key; a
        damaged file has ``error`` instead."""
        data = await self.backend.load(backend_name("keys", key_id))
        kind = "password"
        try:
            kind = key_kind(data, key_id)
            if kind == KIND_RECOVERY:
                info = recovery_info(data, key_id, self._master)
            else:
                info = keyfile_info(data, key_id)
        except CorruptedObject as exc:
            info = {"error": str(exc)}
        return {"id": key_id, "kind": kind, "current": key_id == self.key_id, **info}

    async def add_recovery_key(
        self,
        recipients: Sequence[Recipient],
        *,
        hostname: str,
        username: str,
        callbacks: Any = None,
    ) -> str:
        """Add a recovery key file escrowing the master key to ``recipients``."""
        return await _save_recovery_key(
            self.backend, self._master, recipients, hostname, username, callbacks
        )

    async def find_recovery_key(self, recipients: Sequence[Recipient]) -> str | None:
        """The ID of a verified recovery key for exactly these recipients, if any."""
        wanted = recipient_set(recipients)
        for key in await self.list_keys():
            if key["kind"] != KIND_RECOVERY or not key.get("verified"):
                continue
            if frozenset(r["recipient"] for r in key["recipients"]) == wanted:
                return str(key["id"])
        return None

    async def add_key(
        self,
        new_password: str | bytes,
        *,
        hostname: str,
        username: str,
        kdf_params: KdfParams | None = None,
    ) -> str:
        """Add a key file for ``new_password``; return its ID."""
        keyfile = await anyio.to_thread.run_sync(
            lambda: make_keyfile(
                self._master,
                new_password,
                hostname=hostname,
                username=username,
                kdf_params=kdf_params,
            )
        )
        key_id = storage_id(keyfile)
        await self.backend.save(backend_name("keys", key_id), keyfile)
        return key_id

    async def remove_key(self, key_id: str) -> None:
        """Remove a key file; refuses the key in use and the last key."""
        if key_id == self.key_id:
            raise KeyRefused("refusing to remove the key in use (open with another key)")
        keys = await self.list_ids("keys")
        if key_id not in keys:
            raise ObjectNotFound(f"keys/{key_id}: not found")
        if len(keys) <= 1:
            raise KeyRefused("refusing to remove the last key of the repository")
        await self.backend.remove(backend_name("keys", key_id))

    async def change_password(
        self,
        new_password: str | bytes,
        *,
        hostname: str,
        username: str,
        kdf_params: KdfParams | None = None,
    ) -> str:
        """Add a key for ``new_password``, switch to it, then remove the old key."""
        new_id = await self.add_key(
            new_password, hostname=hostname, username=username, kdf_params=kdf_params
        )
        old_id, self.key_id = self.key_id, new_id
        await self.remove_key(old_id)
        return new_id

    # --- index -----------------------------------------------------------------------

    async def load_index(self) -> Index:
        """Load every index file concurrently, skipping superseded ones."""
        ids = await self.list_ids("index")
        files: dict[str, IndexFile] = {}
        limiter = anyio.CapacityLimiter(max(1, self.backend.connections))

        async def load_one(index_id: str) -> None:
            async with limiter:
                payload = await self.load_sealed("index", index_id)
            files[index_id] = decode_index(payload, index_id)

        async with anyio.create_task_group() as tg:
            for index_id in ids:
                tg.start_soon(load_one, index_id)
        superseded = {s.hex() for f in files.values() for s in f.supersedes}
        index = Index()
        for index_id in ids:
            if index_id not in superseded:
                index.add_file(files[index_id])
        self.index = index
        if self.cache is not None:
            self.cache.drop_stale("data", (p.hex() for p in index.packs()))
        return index

    async def save_index(
        self,
        packs: Iterable[tuple[bytes | str, Sequence[PackEntry]]],
        supersedes: Iterable[str] = (),
    ) -> str:
        """Write one index file for ``packs`` (ID bytes or hex, entries); return its ID."""
        pack_list = [
            (bytes.fromhex(p) if isinstance(p, str) else p, list(entries)) for p, entries in packs
        ]
        index_file = IndexFile(pack_list, [bytes.fromhex(s) for s in supersedes])
        index_id = await self.save_sealed("index", encode_index(index_file))
        if self.index is not None:
            self.index.add_file(index_file)
        return index_id

    # --- snapshots, trees, blobs -----------------------------------------------------

    async def save_snapshot(self, snap: Snapshot) -> str:
        """Store a snapshot; its ID is the storage ID of the sealed bytes."""
        return await self.save_sealed("snapshots", encode_snapshot(snap))

    async def load_snapshot(self, snapshot_id: str) -> Snapshot:
        """Load one snapshot by full ID."""
        return decode_snapshot(await self.load_sealed("snapshots", snapshot_id), snapshot_id)

    async def read_blob(self, blob_id: bytes) -> bytes:
        """A blob's plaintext via the index (loaded on first use), verified."""
        index = self.index if self.index is not None else await self.load_index()
        loc = index.lookup(blob_id)
        if loc is None:
            raise ObjectNotFound(f"blob {blob_id.hex()} is not in the index")
        pack_id = loc.pack_id.hex()
        pack = None
        if loc.type == TREE and self.cache is not None and pack_id not in self._damaged_packs:
            try:
                pack = await self.load_tree_pack(pack_id)
            except CorruptedObject as exc:
                # One bad byte fails the whole pack's hash, but every blob in it is
                # authenticated on its own: read them one by one from now on, so the
                # intact trees of a damaged pack stay readable (and nothing is cached).
                log.warning("pack.damaged", pack=pack_id, error=str(exc))
                self._damaged_packs.add(pack_id)
        if pack is not None:
            stored = pack[loc.offset : loc.offset + loc.length]
            if len(stored) != loc.length:
                raise CorruptedObject("pack", pack_id, "shorter than the index says")
        else:
            try:
                stored = await self.backend.load(
                    backend_name("data", pack_id), loc.offset, loc.length
                )
            except NotFound:
                raise CorruptedObject("pack", pack_id, "listed in the index but missing") from None
            except ObjectTruncated:
                raise CorruptedObject("pack", pack_id, "shorter than the index says") from None
        if loc.length <= _INLINE_DECODE:
            return decode_blob(self.crypto, loc.type, blob_id, stored)
        return await anyio.to_thread.run_sync(decode_blob, self.crypto, loc.type, blob_id, stored)

    async def load_tree_pack(self, pack_id: str) -> bytes:
        """A whole tree pack, from the cache when it holds it, else downloaded (once
        per pack however many tasks ask), verified against its ID, and cached."""
        if self.cache is None:
            raise RuntimeError("load_tree_pack needs the metadata cache")
        cached = await self.cache.load("data", pack_id)
        if cached is not None:
            return cached
        lock = self._pack_locks.setdefault(pack_id, anyio.Lock())
        async with lock:
            cached = await self.cache.load("data", pack_id)
            if cached is not None:
                return cached
            try:
                data = await self.backend.load(backend_name("data", pack_id))
            except NotFound:
                raise CorruptedObject("pack", pack_id, "listed in the index but missing") from None
            if await anyio.to_thread.run_sync(storage_id, data) != pack_id:
                raise CorruptedObject("pack", pack_id, "content does not match its name")
            await self.cache.save("data", pack_id, data)
            self.cache.remember(pack_id, data)
        self._pack_locks.pop(pack_id, None)
        return data

    async def load_tree(self, blob_id: bytes) -> Tree:
        """Read and decode one tree blob."""
        index = self.index if self.index is not None else await self.load_index()
        loc = index.lookup(blob_id)
        if loc is not None and loc.type != TREE:
            raise CorruptedObject("tree", blob_id.hex(), "the index lists it as a data blob")
        return decode_tree(await self.read_blob(blob_id), blob_id.hex())
