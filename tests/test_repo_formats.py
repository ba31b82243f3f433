"""Pack, index, tree, snapshot, lock and config: round trips and damaged inputs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn.backends.base import spooled_descriptor
from cairn.backends.local import LocalBackend
from cairn.repo import schema
from cairn.repo.codec import decode_blob, encode_blob, encode_blob_into, seal, unseal
from cairn.repo.config import Config, decode_config, encode_config
from cairn.repo.crypto import MasterKey, storage_id
from cairn.repo.errors import CorruptedObject, UnsupportedVersion
from cairn.repo.index import Index, IndexFile, decode_index, encode_index
from cairn.repo.lock import STALE_AFTER_NS, Lock, decode_lock, encode_lock, is_stale
from cairn.repo.pack import (
    DATA,
    TREE,
    PackEntry,
    PackWriter,
    SpooledPack,
    initial_tail_length,
    parse_pack_header,
    required_tail_length,
)
from cairn.repo.snapshot import Snapshot, decode_snapshot, encode_snapshot
from cairn.repo.tree import NODE_TYPES, Node, Tree, decode_tree, encode_tree

CRYPTO = MasterKey(bytes(range(32))).crypto()
# Composite strategies (trees, snapshots) are slow to generate on a loaded 2-core box.
relaxed = settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)

ids = st.binary(min_size=32, max_size=32)
u32 = st.integers(0, 2**32 - 1)
entries_st = st.lists(
    st.builds(
        PackEntry,
        st.sampled_from([DATA, TREE]),
        ids,
        st.integers(0, 2**40),
        st.integers(46, 2**32 - 1),
        u32,
    ),
    max_size=20,
)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def damage(data: st.DataObject, stored: bytes) -> bytes:
    """A single bit flip, a truncation, or random bytes."""
    how = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    if how == "flip":
        return flip(stored, data.draw(st.integers(0, len(stored) * 8 - 1)))
    if how == "truncate":
        return stored[: data.draw(st.integers(0, len(stored) - 1))]
    return data.draw(st.binary(max_size=300))


def returns_or_corrupted(decoder: Callable[[bytes], Any], payload: bytes) -> None:
    """An unauthenticated payload may decode to *something*, but only ever fail cleanly."""
    try:
        decoder(payload)
    except CorruptedObject:
        pass


# --- pack ------------------------------------------------------------------------------


def make_pack(blob_type: int, contents: list[bytes]) -> tuple[bytes, str, list[PackEntry]]:
    writer = PackWriter(blob_type)
    for data in contents:
        blob_id = CRYPTO.blob_id(data)
        writer.add(blob_type, blob_id, encode_blob(CRYPTO, blob_type, blob_id, data), len(data))
    return writer.finish(CRYPTO)


@relaxed
@given(
    contents=st.lists(st.binary(max_size=2000), min_size=1, max_size=12),
    blob_type=st.sampled_from([DATA, TREE]),
)
def test_pack_round_trip(contents: list[bytes], blob_type: int) -> None:
    pack, pack_id, entries = make_pack(blob_type, contents)
    tail = pack[-initial_tail_length(len(pack)) :]
    assert required_tail_length(tail, len(pack)) <= len(tail)
    parsed = parse_pack_header(CRYPTO, tail, len(pack), pack_id)
    assert parsed == entries
    for entry, data in zip(parsed, contents, strict=True):
        assert entry.raw_length == len(data)
        stored = pack[entry.offset : entry.offset + entry.length]
        assert decode_blob(CRYPTO, blob_type, entry.id, stored) == data


@relaxed
@given(contents=st.lists(st.binary(max_size=5000), min_size=1, max_size=12))
def test_spooled_pack_is_the_same_format(contents: list[bytes]) -> None:
    """A pack spooled to a temporary file: its ID names its bytes, its header parses,
    every blob decodes; the file has no name and is gone once closed."""
    with tempfile.TemporaryDirectory() as spool:
        writer = PackWriter(DATA, spool_dir=spool)
        for data in contents:
            blob_id = CRYPTO.blob_id(data)
            writer.add(DATA, blob_id, encode_blob(CRYPTO, DATA, blob_id, data), len(data))
        with writer.finish_spooled(CRYPTO) as pack:
            assert isinstance(pack, SpooledPack)
            assert os.listdir(spool) == []  # unlinked from the start
            stored = bytes(pack.view)
            assert len(stored) == pack.size
            assert storage_id(stored) == pack.pack_id
            assert parse_pack_header(CRYPTO, stored, len(stored), pack.pack_id) == pack.entries
            for entry, data in zip(pack.entries, contents, strict=True):
                blob = stored[entry.offset : entry.offset + entry.length]
                assert decode_blob(CRYPTO, DATA, entry.id, blob) == data
        with pytest.raises(ValueError):
            pack.view  # noqa: B018 - closed


def test_spooled_pack_of_more_blobs_than_one_writev_takes(tmp_path: Path) -> None:
    """Blobs are spooled with writev, at most IOV_MAX buffers at a time: a run of
    1,500 comes out whole and in order."""
    writer = PackWriter(DATA, spool_dir=str(tmp_path))
    contents = [i.to_bytes(2, "big") * (1 + i % 7) for i in range(1500)]
    blobs = []
    for data in contents:
        blob_id = CRYPTO.blob_id(data)
        blobs.append(
            (DATA, blob_id, memoryview(encode_blob(CRYPTO, DATA, blob_id, data)), len(data))
        )
    writer.add_many(blobs[:700])
    writer.add_many(blobs[700:])
    with writer.finish_spooled(CRYPTO) as pack:
        stored = bytes(pack.view)
        assert storage_id(stored) == pack.pack_id
        entries = parse_pack_header(CRYPTO, stored, len(stored), pack.pack_id)
        decoded = [
            decode_blob(CRYPTO, DATA, e.id, stored[e.offset : e.offset + e.length]) for e in entries
        ]
        assert decoded == contents


@pytest.mark.anyio
async def test_local_backend_links_a_whole_spooled_pack_and_copies_a_part(tmp_path: Path) -> None:
    """A local repository adopts a pack spooled in its own directory: the stored file
    *is* the spool file (same inode), not a copy. A view of part of it is copied."""
    backend = LocalBackend(tmp_path / "repo")
    await backend.create_layout()
    writer = PackWriter(DATA, spool_dir=backend.spool_dir)
    data = os.urandom(100_000)
    blob_id = CRYPTO.blob_id(data)
    writer.add(DATA, blob_id, encode_blob(CRYPTO, DATA, blob_id, data, 0), len(data))
    with writer.finish_spooled(CRYPTO) as pack:
        view = pack.view
        assert spooled_descriptor(view) is not None
        assert spooled_descriptor(view[:100]) is None
        await backend.save(f"data/{pack.pack_id[:2]}/{pack.pack_id}", view)
        await backend.save("data/00/" + "0" * 64, view[:100])
        spool_inode = os.fstat(spooled_descriptor(view) or -1).st_ino
        whole = tmp_path / "repo" / "data" / pack.pack_id[:2] / pack.pack_id
        assert os.stat(whole).st_ino == spool_inode
        assert whole.read_bytes() == bytes(view)
        part = tmp_path / "repo" / "data" / "00" / ("0" * 64)
        assert os.stat(part).st_ino != spool_inode
        assert part.read_bytes() == bytes(view[:100])
        del view
    # Closed, the pack stays in the repository, read-only like every object.
    assert whole.read_bytes()[:10] == part.read_bytes()[:10]
    assert whole.stat().st_mode & 0o777 == 0o400
    assert [n for n in os.listdir(whole.parent) if n.startswith(".tmp")] == []


def test_spooled_writer_errors_name_the_directory(tmp_path: Path) -> None:
    writer = PackWriter(TREE, spool_dir=str(tmp_path / "missing"))
    with pytest.raises(OSError, match=r"temporary pack file in .*missing: "):
        writer.add(TREE, bytes(32), b"x" * 40, 1)
    with pytest.raises(ValueError):
        PackWriter(DATA).finish_spooled(CRYPTO)


@relaxed
@given(data=st.binary(max_size=5000), level=st.sampled_from([0, 3]), slack=st.integers(0, 64))
def test_blob_encoded_into_a_buffer_decodes(data: bytes, level: int, slack: int) -> None:
    """encode_blob_into writes what encode_blob returns (up to the random salt/nonce):
    the same length, decoding to the same data; a buffer too small is refused."""
    blob_id = CRYPTO.blob_id(data)
    expected = len(encode_blob(CRYPTO, DATA, blob_id, data, level))
    buf = bytearray(expected + slack)
    size = encode_blob_into(CRYPTO, DATA, blob_id, data, memoryview(buf), level)
    assert size == expected
    assert decode_blob(CRYPTO, DATA, blob_id, bytes(buf[:size])) == data
    with pytest.raises(CorruptedObject):
        decode_blob(CRYPTO, TREE, blob_id, bytes(buf[:size]))  # the type is bound
    with pytest.raises(ValueError):
        encode_blob_into(CRYPTO, DATA, blob_id, data, memoryview(bytearray(size - 1)), level)


def test_pack_header_needs_more_than_the_first_guess() -> None:
    # Many tiny incompressible blobs: the header outgrows the 64 KiB guess.
    contents = [os.urandom(40) + i.to_bytes(4, "little") for i in range(3000)]
    pack, pack_id, entries = make_pack(TREE, contents)
    tail = pack[-initial_tail_length(len(pack)) :]
    needed = required_tail_length(tail, len(pack), pack_id)
    assert needed > len(tail)
    with pytest.raises(ValueError):
        parse_pack_header(CRYPTO, tail, len(pack), pack_id)
    assert parse_pack_header(CRYPTO, pack[-needed:], len(pack), pack_id) == entries


def test_pack_types_never_mix_and_empty_pack_refused() -> None:
    writer = PackWriter(DATA)
    with pytest.raises(ValueError):
        writer.add(TREE, bytes(32), b"x" * 40, 1)
    with pytest.raises(ValueError):
        writer.finish(CRYPTO)
    with pytest.raises(ValueError):
        PackWriter(7)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=150)
@given(data=st.data())
def test_damaged_pack_header_raises_corrupted(data: st.DataObject) -> None:
    pack, pack_id, _ = make_pack(DATA, [b"alpha" * 30, os.urandom(50)])
    # Damage only the header + length trailer: blob damage is the blob codec's business.
    header_start = len(pack) - required_tail_length(pack, len(pack))
    damaged_tail = damage(data, pack[header_start:])
    damaged = pack[:header_start] + damaged_tail
    with pytest.raises(CorruptedObject):
        parse_pack_header(CRYPTO, damaged, len(damaged), pack_id)


def test_pack_header_lying_about_layout_is_corrupted() -> None:
    # A well-sealed header whose entries do not tile the pack (e.g. a writer bug).
    blob = encode_blob(CRYPTO, DATA, CRYPTO.blob_id(b"x"), b"x")
    bad = [[DATA, CRYPTO.blob_id(b"x"), 1, len(blob) - 1, 1]]
    header = seal(CRYPTO, "packheader", msgpack.packb(bad))
    pack = blob + header + len(header).to_bytes(4, "little")
    with pytest.raises(CorruptedObject, match="contiguous"):
        parse_pack_header(CRYPTO, pack, len(pack), "p")


# --- index -----------------------------------------------------------------------------


@relaxed
@given(packs=st.lists(st.tuples(ids, entries_st), max_size=5))
def test_index_entries_are_written_as_the_arrays_of_the_format(
    packs: list[tuple[bytes, list[PackEntry]]],
) -> None:
    """Entries go to msgpack as tuples: the bytes are exactly those of the format's
    ``[type, id, offset, length, raw_length]`` lists (docs/format.md)."""
    as_lists = {
        "v": 1,
        "supersedes": [],
        "packs": [{"id": p, "blobs": [list(e) for e in entries]} for p, entries in packs],
    }
    expected = msgpack.packb(as_lists, use_bin_type=True)
    assert encode_index(IndexFile(packs=packs)) == expected


@relaxed
@given(
    packs=st.lists(st.tuples(ids, entries_st), max_size=5),
    supersedes=st.lists(ids, max_size=3),
)
def test_index_file_round_trip(
    packs: list[tuple[bytes, list[PackEntry]]], supersedes: list[bytes]
) -> None:
    index_file = IndexFile(packs, supersedes)
    assert decode_index(encode_index(index_file)) == index_file


@relaxed
@given(packs=st.lists(st.tuples(ids, entries_st), max_size=5))
def test_in_memory_index_lookup(packs: list[tuple[bytes, list[PackEntry]]]) -> None:
    index = Index()
    expected: dict[bytes, tuple[bytes, PackEntry]] = {}
    for pack_id, entries in packs:
        index.add_pack(pack_id, entries)
        for entry in entries:
            expected.setdefault(entry.id, (pack_id, entry))
    assert len(index) == index.blob_count == len(expected)
    for blob_id, (pack_id, entry) in expected.items():
        assert blob_id in index
        loc = index.lookup(blob_id)
        assert loc is not None
        assert (loc.pack_id, loc.type, loc.offset, loc.length, loc.raw_length) == (
            pack_id,
            entry.type,
            entry.offset,
            entry.length,
            entry.raw_length,
        )
    assert dict(index.blobs()).keys() == expected.keys()
    assert index.lookup(b"\xff" * 31) is None
    assert set(index.packs()) <= {p for p, _ in packs}


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=150)
@given(data=st.data())
def test_damaged_sealed_index_raises_corrupted(data: st.DataObject) -> None:
    entries = data.draw(entries_st)
    stored = seal(CRYPTO, "index", encode_index(IndexFile([(bytes(32), entries)], [])))
    with pytest.raises(CorruptedObject):
        decode_index(unseal(CRYPTO, "index", damage(data, stored)))


@relaxed
@given(payload=st.binary(max_size=200))
def test_index_decoder_fails_cleanly_on_garbage(payload: bytes) -> None:
    returns_or_corrupted(decode_index, payload)


@pytest.mark.parametrize(
    "doc",
    [
        {"v": 1, "packs": [{"id": b"x", "blobs": []}]},
        {"v": 1, "packs": [{"id": bytes(32), "blobs": [[0, bytes(32), 0, 40]]}]},
        {"v": 1, "packs": [{"id": bytes(32), "blobs": [[5, bytes(32), 0, 40, 1]]}]},
        {"v": 1, "packs": [{"id": bytes(32), "blobs": [[0, bytes(32), -1, 40, 1]]}]},
        {"v": 1, "packs": [{"id": bytes(32), "blobs": [[0, bytes(32), 0, 2**33, 1]]}]},
        {"v": 1, "packs": "nope"},
        {"v": 1},
        [1, 2],
    ],
)
def test_index_schema_violations(doc: object) -> None:
    with pytest.raises(CorruptedObject):
        decode_index(schema.pack(doc))


def test_newer_versions_are_reported_as_unsupported() -> None:
    with pytest.raises(UnsupportedVersion):
        decode_index(schema.pack({"v": 2, "packs": []}))
    with pytest.raises(UnsupportedVersion):
        decode_tree(schema.pack({"v": 2, "nodes": []}))


# --- tree ------------------------------------------------------------------------------

names = st.binary(min_size=1, max_size=30).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n
)
ints = st.integers(0, 2**64 - 1)
times = st.integers(-(2**62), 2**62)


@st.composite
def nodes(draw: st.DrawFn) -> Node:
    node_type = draw(st.sampled_from(NODE_TYPES))
    node = Node(
        type=node_type,
        name=draw(names),
        mode=draw(st.integers(0, 0o177777)),
        uid=draw(ints),
        gid=draw(ints),
        user=draw(st.text(max_size=10)),
        group=draw(st.text(max_size=10)),
        mtime_ns=draw(times),
        atime_ns=draw(times),
        ctime_ns=draw(times),
        inode=draw(ints),
        device=draw(ints),
        links=draw(ints),
        size=draw(ints),
        xattrs=draw(st.dictionaries(st.binary(max_size=10), st.binary(max_size=20), max_size=3)),
    )
    if node_type == "file":
        node.content = draw(st.lists(ids, max_size=4))
    elif node_type == "dir":
        node.subtree = draw(ids)
    elif node_type == "symlink":
        node.link_target = draw(st.binary(max_size=40))
    elif node_type in ("chardev", "blockdev"):
        node.rdev = draw(ints)
    return node


trees = st.lists(nodes(), max_size=5, unique_by=lambda n: n.name).map(Tree)


@relaxed
@given(tree=trees)
def test_tree_round_trip_and_canonical(tree: Tree) -> None:
    payload = encode_tree(tree)
    decoded = decode_tree(payload)
    assert decoded == tree
    assert encode_tree(Tree(reversed(tree.nodes))) == payload


_odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False),
    st.text(max_size=4), st.binary(max_size=40), st.lists(ids, max_size=2),
    st.lists(st.binary(max_size=40), max_size=2),
    st.dictionaries(st.binary(max_size=3), st.binary(max_size=3), max_size=1),
)  # fmt: skip


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=1500)
@given(node=nodes(), data=st.data())
def test_tree_fast_node_decoder_agrees_with_the_strict_one(node: Node, data: Any) -> None:
    """The fast path takes only what the strict reader accepts, as the same node."""
    from cairn.repo.tree import _decode_node_fast, _decode_node_strict, _encode_node

    if data.draw(st.booleans()):  # mostly nodes of the kinds the fast path takes
        node.xattrs = {}
        node.type = data.draw(st.sampled_from(["file", "dir", "symlink"]))
        node.subtree = node.subtree or bytes(32)
    raw: dict[Any, Any] = _encode_node(node)
    assert node.xattrs or node.type not in ("file", "dir", "symlink") or _decode_node_fast(raw)
    key = data.draw(st.sampled_from([*raw, "xattrs", "rdev", "subtree", "content", "other"]))
    if data.draw(st.booleans()):
        raw.pop(key, None)
    else:
        raw[key] = data.draw(_odd_values)
    fast = _decode_node_fast(raw)
    if fast is not None:
        assert _decode_node_strict(raw, "t") == fast


def test_tree_keeps_non_utf8_names_and_sorts_bytewise() -> None:
    tree = Tree(
        [
            Node("file", b"\xff\xfe-latin1-\xe9"),
            Node("dir", b"a", subtree=bytes(32)),
            Node("symlink", b"B", link_target=b"/t\x80rget"),
        ]
    )
    decoded = decode_tree(encode_tree(tree))
    assert [n.name for n in decoded] == [b"B", b"a", b"\xff\xfe-latin1-\xe9"]
    assert decoded.nodes[0].link_target == b"/t\x80rget"


def test_tree_rejects_duplicates_and_bad_names() -> None:
    with pytest.raises(ValueError):
        Tree([Node("file", b"x"), Node("fifo", b"x")])
    for bad in (b"", b".", b"..", b"a/b"):
        with pytest.raises(ValueError):
            encode_tree(Tree([Node("file", bad)]))
    # A decoder must refuse path traversal even from an authenticated blob.
    node = {"type": "file", "name": b"..", "mode": 0, "uid": 0, "gid": 0, "mtime_ns": 0,
            "atime_ns": 0, "ctime_ns": 0, "inode": 0, "device": 0, "links": 1, "size": 0,
            "content": []}  # fmt: skip
    with pytest.raises(CorruptedObject, match="invalid entry name"):
        decode_tree(schema.pack({"v": 1, "nodes": [node]}))
    unsorted = [dict(node, name=b"b"), dict(node, name=b"a")]
    with pytest.raises(CorruptedObject, match="sorted"):
        decode_tree(schema.pack({"v": 1, "nodes": unsorted}))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=150)
@given(data=st.data())
def test_damaged_tree_blob_raises_corrupted(data: st.DataObject) -> None:
    plain = encode_tree(data.draw(trees))
    blob_id = CRYPTO.blob_id(plain)
    stored = encode_blob(CRYPTO, TREE, blob_id, plain)
    with pytest.raises(CorruptedObject):
        decode_tree(decode_blob(CRYPTO, TREE, blob_id, damage(data, stored)))


@relaxed
@given(tree=trees, data=st.data())
def test_tree_decoder_fails_cleanly_on_damaged_plaintext(tree: Tree, data: st.DataObject) -> None:
    returns_or_corrupted(decode_tree, damage(data, encode_tree(tree)))


# --- snapshot --------------------------------------------------------------------------

paths = st.lists(st.binary(min_size=1, max_size=30).map(os.fsdecode), max_size=4)
snapshots = st.builds(
    Snapshot,
    time_ns=times,
    tree=ids,
    paths=paths,
    hostname=st.text(max_size=20),
    username=st.text(max_size=20),
    uid=ints,
    gid=ints,
    tags=st.lists(st.text(max_size=10), max_size=3),
    parent=st.one_of(st.none(), ids.map(bytes.hex)),
    excludes=st.lists(st.text(max_size=10), max_size=3),
    program_version=st.text(max_size=10),
    summary=st.dictionaries(
        st.text(max_size=10),
        st.one_of(st.integers(0, 2**63), st.floats(allow_nan=False), st.text(max_size=5)),
        max_size=5,
    ),
)


@relaxed
@given(snap=snapshots)
def test_snapshot_round_trip(snap: Snapshot) -> None:
    assert decode_snapshot(encode_snapshot(snap)) == snap


def test_snapshot_time_iso() -> None:
    snap = Snapshot(time_ns=1_700_000_000_123_456_789, tree=bytes(32), paths=["/"])
    assert snap.time_iso == "2023-11-14T22:13:20.123456789Z"
    assert snap.time.year == 2023


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=100)
@given(snap=snapshots, data=st.data())
def test_damaged_snapshot(snap: Snapshot, data: st.DataObject) -> None:
    payload = encode_snapshot(snap)
    returns_or_corrupted(decode_snapshot, damage(data, payload))
    with pytest.raises(CorruptedObject):
        decode_snapshot(unseal(CRYPTO, "snapshot", damage(data, seal(CRYPTO, "snapshot", payload))))


# --- lock and config -------------------------------------------------------------------

locks = st.builds(
    Lock, st.booleans(), st.text(max_size=10), st.text(max_size=10), ints, times, times
)


@relaxed
@given(lock=locks, data=st.data())
def test_lock_round_trip_and_damage(lock: Lock, data: st.DataObject) -> None:
    payload = encode_lock(lock)
    assert decode_lock(payload) == lock
    returns_or_corrupted(decode_lock, damage(data, payload))
    with pytest.raises(CorruptedObject):
        decode_lock(unseal(CRYPTO, "lock", damage(data, seal(CRYPTO, "lock", payload))))


def test_lock_staleness() -> None:
    now = 10**18
    lock = Lock(False, "h1", "u", 42, now - 10, now - 10)

    def alive(pid: int) -> bool:
        return True

    def dead(pid: int) -> bool:
        return False

    assert not is_stale(lock, now, "h1", alive)
    assert is_stale(lock, now, "h1", dead)  # same host, PID gone
    assert not is_stale(lock, now, "h2", dead)  # other host: cannot check the PID
    old = Lock(True, "h1", "u", 42, now - STALE_AFTER_NS - 11, now - STALE_AFTER_NS - 1)
    assert is_stale(old, now, "h2", alive)
    assert "u@h1" in lock.describe() and "42" in lock.describe()


def test_config_round_trip_and_defaults() -> None:
    config = Config()
    assert (config.chunk_min, config.chunk_avg, config.chunk_max) == (
        512 * 1024,
        1024 * 1024,
        8 * 1024 * 1024,
    )
    assert len(config.id) == 64 and config.created.endswith("Z")
    assert decode_config(encode_config(config)) == config


@relaxed
@given(data=st.data())
def test_damaged_config(data: st.DataObject) -> None:
    # fixed fields: hypothesis needs the same input sizes on replay
    payload = encode_config(Config(id="ab" * 32, created="2026-11-01T00:00:00Z"))
    returns_or_corrupted(decode_config, damage(data, payload))
    with pytest.raises(CorruptedObject):
        decode_config(unseal(CRYPTO, "config", damage(data, seal(CRYPTO, "config", payload))))


def test_config_version_and_fields_checked() -> None:
    doc = msgpack.unpackb(encode_config(Config()))
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode_config(schema.pack(dict(doc, version=2)))
    with pytest.raises(CorruptedObject, match="ordered"):
        decode_config(schema.pack(dict(doc, chunker={"min": 9000, "avg": 100, "max": 1})))
    with pytest.raises(CorruptedObject, match="hex"):
        decode_config(schema.pack(dict(doc, id="zz")))
