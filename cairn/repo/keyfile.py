"""Key files: the master key wrapped under a password-derived key (Argon2id).

A key file is UTF-8 JSON (``docs/format.md`` has the schema). The wrapping key is
Argon2id(password, salt, params) → 32 bytes; the master key is encrypted with it by
AES-256-GCM under a random nonce, with associated data binding every header field
(version, created, hostname, username, KDF name/params/salt, cipher), so editing the
metadata invalidates the key file rather than misleading ``key list``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from cairn.repo.crypto import MASTER_KEY_SIZE, MasterKey
from cairn.repo.errors import CorruptedObject, UnsupportedVersion, WrongPassword
from cairn.repo.schema import Reader

KEYFILE_VERSION = 1
KDF_NAME = "argon2id"
CIPHER_NAME = "aes-256-gcm"
SALT_SIZE = 16
NONCE_SIZE = 12
_AD_PREFIX = b"cairn keyfile v1"
_U32 = struct.Struct("<I")

# Bounds accepted when reading, so a hostile key file cannot make `open` allocate
# terabytes or spin for hours before failing.
_MAX_MEMORY_KIB = 4 * 1024 * 1024
_MAX_ITERATIONS = 100
_MAX_LANES = 64


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters. The default takes ~0.12 s here (2 cores)."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def check(self) -> bool:
        """Whether the parameters are within what readers accept."""
        return (
            1 <= self.lanes <= _MAX_LANES
            and 8 * self.lanes <= self.memory_kib <= _MAX_MEMORY_KIB
            and 1 <= self.iterations <= _MAX_ITERATIONS
        )


def _password_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else password


def _derive(password: str | bytes, salt: bytes, params: KdfParams) -> bytes:
    kdf = Argon2id(
        salt=salt,
        length=32,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    )
    return kdf.derive(_password_bytes(password))


def _header_ad(header: dict[str, Any], params: KdfParams, salt: bytes) -> bytes:
    """Length-prefixed concatenation of the header fields (easy to reimplement exactly)."""
    fields = [
        str(header["version"]).encode(),
        header["created"].encode("utf-8"),
        header["hostname"].encode("utf-8"),
        header["username"].encode("utf-8"),
        KDF_NAME.encode(),
        str(params.memory_kib).encode(),
        str(params.iterations).encode(),
        str(params.lanes).encode(),
        salt,
        header["cipher"].encode("utf-8"),
    ]
    return _AD_PREFIX + b"".join(_U32.pack(len(f)) + f for f in fields)


def make_keyfile(
    master: MasterKey,
    password: str | bytes,
    *,
    hostname: str,
    username: str,
    kdf_params: KdfParams | None = None,
    created: datetime | None = None,
) -> bytes:
    """A new key file (JSON bytes) wrapping ``master`` under ``password``."""
    params = kdf_params or KdfParams()
    if not params.check():
        raise ValueError(f"Argon2id parameters out of range: {params}")
    salt = os.urandom(SALT_SIZE)
    nonce = os.urandom(NONCE_SIZE)
    when = (created or datetime.now(UTC)).astimezone(UTC)
    header: dict[str, Any] = {
        "version": KEYFILE_VERSION,
        "created": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": hostname,
        "username": username,
        "cipher": CIPHER_NAME,
    }
    wrapping_key = _derive(password, salt, params)
    wrapped = AESGCM(wrapping_key).encrypt(nonce, master.raw, _header_ad(header, params, salt))
    # "kind" tells password key files from recovery key files (cairn.repo.recovery);
    # it is not in the AD, so key files written before it existed still open.
    doc = {
        "version": header["version"],
        "kind": "password",
        **header,
        "kdf": {
            "name": KDF_NAME,
            "memory_kib": params.memory_kib,
            "iterations": params.iterations,
            "lanes": params.lanes,
            "salt": base64.b64encode(salt).decode("ascii"),
        },
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "wrapped_key": base64.b64encode(wrapped).decode("ascii"),
    }
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass(frozen=True)
class _Parsed:
    header: dict[str, Any]
    params: KdfParams
    salt: bytes
    nonce: bytes
    wrapped: bytes


def _b64(r: Reader, key: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(r.get_str(key), validate=True)
    except (binascii.Error, ValueError):
        r.fail(f"field {key!r} is not base64")
    if len(raw) != size:
        r.fail(f"field {key!r} is not {size} bytes")
    return raw


def _parse(data: bytes, name: str) -> _Parsed:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptedObject("key file", name, "not valid UTF-8 JSON") from None
    r = Reader(doc, "key file", name)
    version = r.get_int("version")
    if version != KEYFILE_VERSION:
        raise UnsupportedVersion("key file", name, f"key file version {version} is not supported")
    if r.get_str("kind", "password") != "password":
        r.fail("not a password key file")
    header = {
        "version": version,
        "created": r.get_str("created"),
        "hostname": r.get_str("hostname"),
        "username": r.get_str("username"),
        "cipher": r.get_str("cipher"),
    }
    for key in ("created", "hostname", "username"):
        try:
            header[key].encode("utf-8")
        except UnicodeEncodeError:
            r.fail(f"field {key!r} is not valid Unicode")
    if header["cipher"] != CIPHER_NAME:
        r.fail(f"unknown cipher {header['cipher']!r}")
    kdf = Reader(r.map.get("kdf"), "key file", name, "kdf")
    if kdf.get_str("name") != KDF_NAME:
        kdf.fail(f"unknown KDF {kdf.map['name']!r}")
    params = KdfParams(
        memory_kib=kdf.get_int("memory_kib"),
        iterations=kdf.get_int("iterations"),
        lanes=kdf.get_int("lanes"),
    )
    if not params.check():
        kdf.fail("Argon2id parameters out of range")
    return _Parsed(
        header,
        params,
        _b64(kdf, "salt", SALT_SIZE),
        _b64(r, "nonce", NONCE_SIZE),
        _b64(r, "wrapped_key", MASTER_KEY_SIZE + 16),
    )


def unwrap_keyfile(data: bytes, password: str | bytes, name: str = "") -> MasterKey:
    """The master key in a key file; ``WrongPassword`` if the password does not open it.

    A key file whose header was modified also fails as ``WrongPassword`` (the header is
    authenticated, and GCM cannot tell the two apart); a malformed one is
    ``CorruptedObject``.
    """
    parsed = _parse(data, name)
    wrapping_key = _derive(password, parsed.salt, parsed.params)
    ad = _header_ad(parsed.header, parsed.params, parsed.salt)
    try:
        raw = AESGCM(wrapping_key).decrypt(parsed.nonce, parsed.wrapped, ad)
    except InvalidTag:
        detail = f"key {name} does not open with this password" if name else ""
        raise (WrongPassword(detail) if detail else WrongPassword()) from None
    return MasterKey(raw)


def keyfile_info(data: bytes, name: str = "") -> dict[str, Any]:
    """Unauthenticated metadata for ``key list``: no password needed."""
    parsed = _parse(data, name)
    return {
        **parsed.header,
        "kdf": {
            "name": KDF_NAME,
            "memory_kib": parsed.params.memory_kib,
            "iterations": parsed.params.iterations,
            "lanes": parsed.params.lanes,
        },
    }
