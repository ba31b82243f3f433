"""Crypto and codec: round trips, key separation, and corruption always detected."""

from __future__ import annotations

import os
import pickle

import blake3
import pyfastcdc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn.repo.codec import (
    compression_level,
    decode_blob,
    encode_blob,
    seal,
    unseal,
)
from cairn.repo.crypto import (
    CONTEXT_BLOB_ID,
    HEADER_SIZE,
    OVERHEAD,
    Crypto,
    MasterKey,
    storage_id,
)
from cairn.repo.errors import CorruptedObject
from cairn.repo.pack import DATA, TREE

MASTER = MasterKey(bytes(range(32)))
CRYPTO = MASTER.crypto()
OTHER = MasterKey(bytes(range(1, 33))).crypto()
# The project machine is 2 shared cores: no per-example deadline, no slow-data check.
relaxed = settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)

blobs = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda n, b: b * n, st.integers(1, 2000), st.binary(min_size=1, max_size=8)),
)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_subkeys_are_blake3_derive_key_of_the_master() -> None:
    id_key = blake3.blake3(MASTER.raw, derive_key_context=CONTEXT_BLOB_ID).digest()
    assert CRYPTO.blob_id(b"abc") == blake3.blake3(b"abc", key=id_key).digest()
    assert CRYPTO.blob_id(b"abc") != blake3.blake3(b"abc").digest()
    assert CRYPTO.blob_id(b"abc") != OTHER.blob_id(b"abc")


def test_chunker_seed_is_accepted_by_pyfastcdc_and_changes_boundaries() -> None:
    data = os.urandom(4 << 20)
    seeds = [CRYPTO.chunker_seed, OTHER.chunker_seed]
    cuts = []
    for seed in seeds:
        assert 0 < seed < 2**63
        cdc = pyfastcdc.FastCDC(256 * 1024, min_size=64 * 1024, max_size=1 << 20, seed=seed)
        cuts.append([c.length for c in cdc.cut_buf(data)])
    assert cuts[0] != cuts[1]


def test_storage_id_is_plain_blake3_hex() -> None:
    assert storage_id(b"x") == blake3.blake3(b"x").hexdigest()


def test_reprs_hide_keys() -> None:
    assert MASTER.raw.hex() not in repr(MASTER)
    assert "redacted" in repr(CRYPTO)


def test_crypto_pickles_small_without_master_key_or_session() -> None:
    CRYPTO.encrypt(b"warm up the session", b"ad")
    data = pickle.dumps(CRYPTO)
    assert len(data) < 200
    assert MASTER.raw not in data
    clone = pickle.loads(data)
    assert clone.blob_id(b"q") == CRYPTO.blob_id(b"q")
    assert clone.chunker_seed == CRYPTO.chunker_seed
    stored = clone.encrypt(b"hello", b"ad")
    assert CRYPTO.decrypt(stored, b"ad") == b"hello"
    # the clone drew its own session salt
    assert stored[1 : HEADER_SIZE - 12] != CRYPTO.encrypt(b"x", b"ad")[1 : HEADER_SIZE - 12]


def test_session_salt_rotates_at_the_limit() -> None:
    crypto = Crypto(os.urandom(32), os.urandom(32), 7, session_limit=2)
    salts = [crypto.encrypt(b"m", b"ad")[1:17] for _ in range(5)]
    assert salts[0] == salts[1] != salts[2]
    assert salts[2] == salts[3] != salts[4]
    for _ in range(3):
        stored = crypto.encrypt(b"m", b"ad")
        assert crypto.decrypt(stored, b"ad") == b"m"


def test_layout_and_overhead() -> None:
    stored = CRYPTO.encrypt(b"abc", b"ad")
    assert stored[0] == 1
    assert len(stored) == OVERHEAD + 3


@relaxed
@given(plain=st.binary(max_size=300), ad=st.binary(max_size=40))
def test_encrypt_round_trip_and_ad_binding(plain: bytes, ad: bytes) -> None:
    stored = CRYPTO.encrypt(plain, ad)
    assert CRYPTO.decrypt(stored, ad) == plain
    with pytest.raises(CorruptedObject):
        CRYPTO.decrypt(stored, ad + b"x")
    with pytest.raises(CorruptedObject):
        OTHER.decrypt(stored, ad)


@relaxed
@given(data=blobs, level=st.sampled_from([0, 1, 3, 19]), blob_type=st.sampled_from([DATA, TREE]))
def test_blob_round_trip(data: bytes, level: int, blob_type: int) -> None:
    blob_id = CRYPTO.blob_id(data)
    stored = encode_blob(CRYPTO, blob_type, blob_id, data, level)
    assert decode_blob(CRYPTO, blob_type, blob_id, stored) == data
    # compression never makes the stored form bigger than raw + flag + envelope
    assert len(stored) <= len(data) + 1 + OVERHEAD


def test_compression_used_only_when_it_helps() -> None:
    text = b"a" * 100_000
    noise = os.urandom(100_000)
    assert len(encode_blob(CRYPTO, DATA, CRYPTO.blob_id(text), text, 3)) < 1000
    assert len(encode_blob(CRYPTO, DATA, CRYPTO.blob_id(noise), noise, 3)) == 100_000 + 1 + OVERHEAD
    assert len(encode_blob(CRYPTO, DATA, CRYPTO.blob_id(text), text, 0)) == 100_000 + 1 + OVERHEAD


def test_blob_binds_type_and_id() -> None:
    data = b"payload" * 10
    blob_id = CRYPTO.blob_id(data)
    stored = encode_blob(CRYPTO, DATA, blob_id, data)
    with pytest.raises(CorruptedObject) as exc:
        decode_blob(CRYPTO, TREE, blob_id, stored)
    assert blob_id.hex() in str(exc.value) and "tree blob" in str(exc.value)
    other_id = CRYPTO.blob_id(b"other")
    with pytest.raises(CorruptedObject):
        decode_blob(CRYPTO, DATA, other_id, stored)


def test_blob_with_wrong_id_is_detected_after_decryption() -> None:
    # A writer that lies about the ID (bug or malice by a key holder) is caught.
    wrong_id = CRYPTO.blob_id(b"something else")
    stored = encode_blob(CRYPTO, DATA, wrong_id, b"actual content")
    with pytest.raises(CorruptedObject, match="does not match its ID"):
        decode_blob(CRYPTO, DATA, wrong_id, stored)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=200)
@given(data=st.data())
def test_damaged_blob_always_raises_corrupted(data: st.DataObject) -> None:
    plain = data.draw(blobs)
    blob_id = CRYPTO.blob_id(plain)
    stored = encode_blob(CRYPTO, DATA, blob_id, plain, data.draw(st.sampled_from([0, 3])))
    how = data.draw(st.sampled_from(["flip", "truncate", "garbage", "extend"]))
    if how == "flip":
        damaged = flip(stored, data.draw(st.integers(0, len(stored) * 8 - 1)))
    elif how == "truncate":
        damaged = stored[: data.draw(st.integers(0, len(stored) - 1))]
    elif how == "extend":
        damaged = stored + data.draw(st.binary(min_size=1, max_size=20))
    else:
        damaged = data.draw(st.binary(max_size=200))
    with pytest.raises(CorruptedObject):
        decode_blob(CRYPTO, DATA, blob_id, damaged)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=100)
@given(
    payload=st.binary(max_size=2000),
    kind=st.sampled_from(["config", "snapshot", "index", "lock", "packheader"]),
    bit=st.integers(min_value=0),
)
def test_seal_round_trip_and_damage(payload: bytes, kind: str, bit: int) -> None:
    stored = seal(CRYPTO, kind, payload)
    assert unseal(CRYPTO, kind, stored) == payload
    with pytest.raises(CorruptedObject):
        unseal(CRYPTO, kind, flip(stored, bit % (len(stored) * 8)))
    with pytest.raises(CorruptedObject):
        unseal(CRYPTO, kind, stored[: bit % len(stored)])
    other = "index" if kind != "index" else "lock"
    with pytest.raises(CorruptedObject) as exc:
        unseal(CRYPTO, other, stored, name="abc")
    assert "abc" in str(exc.value)


def test_compression_level_names() -> None:
    assert [compression_level(n) for n in ("off", "fastest", "auto", "max")] == [0, 1, 3, 19]
    assert compression_level("7") == 7
    assert compression_level(22) == 22
    for bad in ("fast", "23", -1):
        with pytest.raises(ValueError):
            compression_level(bad)
