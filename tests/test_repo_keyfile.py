"""Key files: wrap/unwrap, wrong passwords, tampered headers, malformed JSON."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn.repo.crypto import MasterKey
from cairn.repo.errors import CorruptedObject, UnsupportedVersion, WrongPassword
from cairn.repo.keyfile import KdfParams, keyfile_info, make_keyfile, unwrap_keyfile

CHEAP = KdfParams(memory_kib=64, iterations=1, lanes=1)
MASTER = MasterKey(bytes(range(32)))
KEYFILE = make_keyfile(MASTER, "correct horse", hostname="host", username="ann", kdf_params=CHEAP)


def test_round_trip_and_json_schema() -> None:
    assert unwrap_keyfile(KEYFILE, "correct horse") == MASTER
    assert unwrap_keyfile(KEYFILE, b"correct horse") == MASTER
    doc = json.loads(KEYFILE)
    assert doc["version"] == 1 and doc["cipher"] == "aes-256-gcm"
    assert doc["kdf"]["name"] == "argon2id" and doc["kdf"]["memory_kib"] == 64
    assert len(base64.b64decode(doc["kdf"]["salt"])) == 16
    assert len(base64.b64decode(doc["nonce"])) == 12
    assert len(base64.b64decode(doc["wrapped_key"])) == 48
    assert MASTER.raw.hex() not in KEYFILE.decode()


def test_default_params_are_the_documented_ones() -> None:
    assert KdfParams() == KdfParams(memory_kib=65536, iterations=3, lanes=4)


def test_two_key_files_for_one_master_differ() -> None:
    other = make_keyfile(MASTER, "correct horse", hostname="host", username="ann", kdf_params=CHEAP)
    assert other != KEYFILE
    assert unwrap_keyfile(other, "correct horse") == MASTER


def test_wrong_password() -> None:
    with pytest.raises(WrongPassword) as exc:
        unwrap_keyfile(KEYFILE, "Correct horse", name="abcd")
    assert exc.value.exit_code == 12
    assert "abcd" in str(exc.value)


def test_info_needs_no_password() -> None:
    when = datetime(2026, 11, 3, 2, 0, 1, tzinfo=UTC)
    data = make_keyfile(MASTER, "pw", hostname="h\u00e9", username="u", kdf_params=CHEAP,
                        created=when)  # fmt: skip
    info = keyfile_info(data)
    assert info["hostname"] == "h\u00e9" and info["username"] == "u"
    assert info["created"] == "2026-11-03T02:00:01Z"
    assert info["kdf"] == {"name": "argon2id", "memory_kib": 64, "iterations": 1, "lanes": 1}


@pytest.mark.parametrize("field", ["hostname", "username", "created"])
def test_edited_header_fails_authentication(field: str) -> None:
    doc = json.loads(KEYFILE)
    doc[field] = doc[field] + "x"
    with pytest.raises(WrongPassword):
        unwrap_keyfile(json.dumps(doc).encode(), "correct horse")


def test_raised_kdf_params_fail_authentication() -> None:
    doc = json.loads(KEYFILE)
    doc["kdf"]["iterations"] = 2
    with pytest.raises(WrongPassword):
        unwrap_keyfile(json.dumps(doc).encode(), "correct horse")


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(version=2),
        lambda d: d.update(version="1"),
        lambda d: d.update(cipher="chacha"),
        lambda d: d["kdf"].update(name="scrypt"),
        lambda d: d["kdf"].update(memory_kib=2**40),
        lambda d: d["kdf"].update(lanes=0),
        lambda d: d["kdf"].update(salt="!!"),
        lambda d: d.update(nonce=base64.b64encode(b"short").decode()),
        lambda d: d.pop("wrapped_key"),
        lambda d: d.update(hostname="\ud800"),
        lambda d: d.update(kdf=[]),
    ],
)
def test_malformed_fields_are_corrupted(edit: object) -> None:
    doc = json.loads(KEYFILE)
    edit(doc)  # type: ignore[operator]
    data = json.dumps(doc).encode()
    with pytest.raises(CorruptedObject):
        unwrap_keyfile(data, "correct horse")
    with pytest.raises(CorruptedObject):
        keyfile_info(data)


def test_newer_version_is_unsupported() -> None:
    doc = json.loads(KEYFILE)
    doc["version"] = 2
    with pytest.raises(UnsupportedVersion, match="upgrade"):
        unwrap_keyfile(json.dumps(doc).encode(), "correct horse")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_keyfile_never_yields_a_wrong_key(data: st.DataObject) -> None:
    how = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    if how == "flip":
        bit = data.draw(st.integers(0, len(KEYFILE) * 8 - 1))
        damaged = bytearray(KEYFILE)
        damaged[bit // 8] ^= 1 << (bit % 8)
    elif how == "truncate":
        damaged = bytearray(KEYFILE[: data.draw(st.integers(0, len(KEYFILE) - 1))])
    else:
        damaged = bytearray(data.draw(st.binary(max_size=400)))
    try:
        key = unwrap_keyfile(bytes(damaged), "correct horse")
    except (WrongPassword, CorruptedObject):
        return
    # Some flips are harmless (JSON whitespace, base64 padding bits): then the key is right.
    assert key == MASTER
