"""Repository init/open/keys/objects against a real LocalBackend, on asyncio and trio."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cairn.backends.base import object_name
from cairn.backends.local import LocalBackend
from cairn.repo.codec import encode_blob
from cairn.repo.errors import (
    AmbiguousId,
    CorruptedObject,
    KeyRefused,
    ObjectNotFound,
    RepositoryExists,
    RepositoryNotFound,
    WrongPassword,
)
from cairn.repo.keyfile import KdfParams
from cairn.repo.pack import DATA, TREE, PackEntry
from cairn.repo.repository import Repository, init_repository, open_repository
from cairn.repo.snapshot import Snapshot
from cairn.repo.tree import Node, Tree, encode_tree
from cairn.stages.packing import EncodedBlob, store_blobs

pytestmark = pytest.mark.anyio
CHEAP = KdfParams(memory_kib=64, iterations=1, lanes=1)
HOST, USER = "testhost", "tester"


async def new_repo(root: Path, password: str = "pw") -> Repository:
    return await init_repository(
        LocalBackend(root), password, kdf_params=CHEAP, hostname=HOST, username=USER
    )


async def test_init_then_open(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "r")
    assert (tmp_path / "r" / "config").is_file()
    assert (tmp_path / "r" / "data" / "ff").is_dir()
    opened = await open_repository(LocalBackend(tmp_path / "r"), "pw")
    assert opened.config == repo.config
    assert opened.key_id == repo.key_id
    assert opened.crypto.blob_id(b"x") == repo.crypto.blob_id(b"x")
    assert opened.crypto.chunker_seed == repo.crypto.chunker_seed


async def test_init_refuses_existing_repository(tmp_path: Path) -> None:
    await new_repo(tmp_path)
    before = sorted(os.listdir(tmp_path / "keys"))
    with pytest.raises(RepositoryExists):
        await new_repo(tmp_path, "other")
    assert sorted(os.listdir(tmp_path / "keys")) == before


async def test_open_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFound) as exc:
        await open_repository(LocalBackend(tmp_path / "nothing"), "pw")
    assert exc.value.exit_code == 10


async def test_wrong_password(tmp_path: Path) -> None:
    await new_repo(tmp_path)
    with pytest.raises(WrongPassword) as exc:
        await open_repository(LocalBackend(tmp_path), "nope")
    assert exc.value.exit_code == 12


async def test_corrupted_config(tmp_path: Path) -> None:
    await new_repo(tmp_path)
    path = tmp_path / "config"
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptedObject, match="config"):
        await open_repository(LocalBackend(tmp_path), "pw")


async def test_key_management(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path)
    first = repo.key_id
    second = await repo.add_key("second", kdf_params=CHEAP, hostname="h2", username="u2")
    keys = {k["id"]: k for k in await repo.list_keys()}
    assert set(keys) == {first, second}
    assert keys[first]["current"] and not keys[second]["current"]
    assert keys[second]["hostname"] == "h2" and keys[second]["username"] == "u2"

    other = await open_repository(LocalBackend(tmp_path), "second")
    assert other.key_id == second
    with pytest.raises(KeyRefused):
        await other.remove_key(second)  # in use
    await other.remove_key(first)
    with pytest.raises(WrongPassword):
        await open_repository(LocalBackend(tmp_path), "pw")
    with pytest.raises(KeyRefused):
        await other.remove_key(second)  # both in use and the last one
    with pytest.raises(ObjectNotFound):
        await other.remove_key("00" * 32)


async def test_change_password(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path)
    old = repo.key_id
    new = await repo.change_password("new", kdf_params=CHEAP, hostname=HOST, username=USER)
    assert repo.key_id == new != old
    assert [k["id"] for k in await repo.list_keys()] == [new]
    with pytest.raises(WrongPassword):
        await open_repository(LocalBackend(tmp_path), "pw")
    assert (await open_repository(LocalBackend(tmp_path), "new")).key_id == new


async def test_open_skips_a_corrupt_key_file(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path)
    await repo.backend.save("keys/" + "0" * 64, b"{not json")
    assert (await open_repository(LocalBackend(tmp_path), "pw")).key_id == repo.key_id
    listed = {k["id"]: k for k in await repo.list_keys()}
    assert "error" in listed["0" * 64]


async def test_snapshots_and_find_id(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path)
    snaps = [
        Snapshot(
            time_ns=i, tree=bytes([i]) * 32, paths=["/home", os.fsdecode(b"/x\xff")], hostname=HOST
        )
        for i in range(1, 20)
    ]
    snap_ids = [await repo.save_snapshot(s) for s in snaps]
    assert sorted(snap_ids) == await repo.list_ids("snapshots")
    for snap_id, snap in zip(snap_ids, snaps, strict=True):
        assert await repo.load_snapshot(snap_id) == snap
        assert await repo.find_id("snapshots", snap_id[:12]) == snap_id
    with pytest.raises(ObjectNotFound):
        await repo.find_id("snapshots", "zz")
    # 19 IDs over 16 hex digits: some one-character prefix is shared
    shared = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in snap_ids) > 1)
    with pytest.raises(AmbiguousId):
        await repo.find_id("snapshots", shared)


async def test_sealed_object_with_wrong_name_is_corrupted(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path)
    snap_id = await repo.save_snapshot(Snapshot(time_ns=1, tree=bytes(32), paths=["/"]))
    stored = await repo.backend.load(object_name("snapshots", snap_id))
    fake_id = "ab" * 32
    await repo.backend.save(object_name("snapshots", fake_id), stored)
    with pytest.raises(CorruptedObject) as exc:
        await repo.load_snapshot(fake_id)
    assert fake_id in str(exc.value) and "name" in str(exc.value)


async def write_pack(
    repo: Repository, blob_type: int, blobs: list[bytes]
) -> tuple[bytes, list[PackEntry], list[str]]:
    """Encode ``blobs`` and store them through the shared packing stages as one
    pack; the pack, its entries and the index files written."""
    encoded = []
    for data in blobs:
        blob_id = repo.crypto.blob_id(data)
        stored = encode_blob(repo.crypto, blob_type, blob_id, data)
        encoded.append(EncodedBlob(blob_type, blob_id, stored, len(data)))
    packs, index_files = await store_blobs(repo, encoded)
    assert len(packs) == 1
    return packs[0][0], packs[0][1], index_files


async def test_blobs_and_trees_through_packs_and_index(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path)
    contents = [b"hello" * 1000, os.urandom(100_000), b""]
    await write_pack(repo, DATA, contents)
    tree = Tree([Node("file", b"f\xff", size=5000, content=[repo.crypto.blob_id(contents[0])])])
    tree_plain = encode_tree(tree)
    await write_pack(repo, TREE, [tree_plain])

    reopened = await open_repository(LocalBackend(tmp_path), "pw")
    index = await reopened.load_index()
    assert len(index) == 4 and index.pack_count == 2
    for data in contents:
        assert await reopened.read_blob(reopened.crypto.blob_id(data)) == data
    assert await reopened.load_tree(reopened.crypto.blob_id(tree_plain)) == tree
    with pytest.raises(CorruptedObject):
        await reopened.load_tree(reopened.crypto.blob_id(contents[0]))
    with pytest.raises(ObjectNotFound):
        await reopened.read_blob(bytes(32))


async def test_store_blobs_fills_packs_of_the_size_given_and_indexes_them(
    tmp_path: Path,
) -> None:
    repo = await new_repo(tmp_path)
    await repo.load_index()
    plain = [os.urandom(30_000) for _ in range(7)]
    blobs = []
    for data in plain:
        blob_id = repo.crypto.blob_id(data)
        blobs.append(
            EncodedBlob(DATA, blob_id, encode_blob(repo.crypto, DATA, blob_id, data), 30_000)
        )
    packs, index_files = await store_blobs(repo, blobs, pack_size=100_000)
    # Random data is stored raw (a bit over 30 kB): four blobs fill a pack.
    assert [len(entries) for _pack, entries in packs] == [4, 3]
    assert len(index_files) == 1
    assert {e.id for _p, entries in packs for e in entries} == {b.blob_id for b in blobs}
    assert repo.index is not None and all(b.blob_id in repo.index for b in blobs)
    reopened = await open_repository(LocalBackend(tmp_path), "pw")
    for data in plain:
        assert await reopened.read_blob(reopened.crypto.blob_id(data)) == data


async def test_superseded_index_is_ignored(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path)
    pack_id, entries, written = await write_pack(repo, DATA, [b"one", b"two"])
    old = await repo.save_index([(pack_id, entries)])
    await repo.save_index([(pack_id, entries[:1])], supersedes=[old, *written])
    index = await repo.load_index()
    assert len(index) == 1


async def test_damaged_pack_is_reported_by_name(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path)
    pack, entries, _ = await write_pack(repo, DATA, [b"precious data" * 100])
    pack_id = pack.hex()
    path = tmp_path / object_name("data", pack_id)
    data = bytearray(path.read_bytes())
    data[entries[0].offset + 50] ^= 0x80
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptedObject) as exc:
        await repo.read_blob(entries[0].id)
    assert entries[0].id.hex() in str(exc.value)
    # A pack shorter than the index says
    path.write_bytes(bytes(data[:10]))
    with pytest.raises(CorruptedObject, match="shorter"):
        await repo.read_blob(entries[0].id)
