"""restic's encryption: AES-256-CTR with a Poly1305-AES MAC, and scrypt key files.

Every encrypted object is ``IV (16) || ciphertext || MAC (16)``; the MAC is
Poly1305 over the ciphertext with the one-time key ``r || AES-128_k(IV)`` (restic's
``doc/design.rst``, "Keys, Encryption and MAC"). A key file derives 64 bytes from
the password with scrypt: an AES-256 key, then ``k`` and ``r`` of the MAC key, which
open the key file's ``data`` — the master keys, as JSON.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.poly1305 import Poly1305

from cairn.repo.errors import CorruptedObject

IV_SIZE = 16
MAC_SIZE = 16
OVERHEAD = IV_SIZE + MAC_SIZE


class Unauthenticated(CorruptedObject):
    """The MAC does not match: a wrong key, or damaged bytes."""


@dataclass(frozen=True)
class ResticKey:
    """A restic master key (or a key derived from a password): encryption and MAC."""

    encrypt: bytes  # AES-256
    mac_k: bytes  # AES-128 key of Poly1305-AES
    mac_r: bytes  # Poly1305's r

    def _mac_key(self, iv: bytes) -> bytes:
        aes = Cipher(algorithms.AES(self.mac_k), modes.ECB()).encryptor()
        return self.mac_r + aes.update(iv) + aes.finalize()

    def open(self, data: bytes | memoryview, kind: str = "object", name: str = "") -> bytes:
        """Authenticate and decrypt one object; ``Unauthenticated`` if it fails."""
        if len(data) < OVERHEAD:
            raise Unauthenticated(kind, name, f"{len(data)} bytes: too short to be encrypted")
        view = memoryview(data)
        iv = bytes(view[:IV_SIZE])
        ciphertext, tag = view[IV_SIZE:-MAC_SIZE], bytes(view[-MAC_SIZE:])
        try:
            Poly1305.verify_tag(self._mac_key(iv), ciphertext, tag)
        except InvalidSignature:
            raise Unauthenticated(kind, name, "authentication failed (MAC mismatch)") from None
        decryptor = Cipher(algorithms.AES(self.encrypt), modes.CTR(iv)).decryptor()
        return decryptor.update(ciphertext) + decryptor.finalize()

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` with a fresh random IV."""
        iv = os.urandom(IV_SIZE)
        encryptor = Cipher(algorithms.AES(self.encrypt), modes.CTR(iv)).encryptor()
        ciphertext = encryptor.update(plaintext) + encryptor.finalize()
        return iv + ciphertext + Poly1305.generate_tag(self._mac_key(iv), ciphertext)

    @classmethod
    def from_master_json(cls, doc: Any) -> ResticKey:
        try:
            key = cls(
                encrypt=base64.b64decode(doc["encrypt"]),
                mac_k=base64.b64decode(doc["mac"]["k"]),
                mac_r=base64.b64decode(doc["mac"]["r"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptedObject("master key", "", f"malformed: {exc}") from None
        if (len(key.encrypt), len(key.mac_k), len(key.mac_r)) != (32, 16, 16):
            raise CorruptedObject("master key", "", "wrong key sizes")
        return key


def parse_key_file(data: bytes, key_id: str) -> dict[str, Any]:
    """A key file's JSON, checked for the fields opening it needs."""
    try:
        doc = json.loads(data)
        if doc.get("kdf") != "scrypt":
            raise ValueError(f"unsupported KDF {doc.get('kdf')!r}")
        for field in ("N", "r", "p"):
            if not isinstance(doc.get(field), int) or doc[field] <= 0:
                raise ValueError(f"bad scrypt parameter {field}")
        base64.b64decode(doc["salt"]), base64.b64decode(doc["data"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptedObject("restic key", key_id, f"malformed key file: {exc}") from None
    return dict(doc)


def open_key_file(doc: dict[str, Any], password: bytes, key_id: str) -> ResticKey | None:
    """The master key a key file holds, or None when the password does not open it.

    scrypt costs what the key file says (restic's default: 64 MiB, ~0.5 s); parameters
    beyond 1 GiB of memory are refused as damage rather than tried."""
    n, r, p = doc["N"], doc["r"], doc["p"]
    if 128 * n * r * p > 1 << 30:
        raise CorruptedObject("restic key", key_id, f"scrypt parameters too large (N={n})")
    derived = Scrypt(salt=base64.b64decode(doc["salt"]), length=64, n=n, r=r, p=p).derive(password)
    user_key = ResticKey(derived[:32], derived[32:48], derived[48:64])
    try:
        master = user_key.open(base64.b64decode(doc["data"]), "restic key", key_id)
    except Unauthenticated:
        return None
    try:
        return ResticKey.from_master_json(json.loads(master))
    except ValueError as exc:
        raise CorruptedObject("restic key", key_id, f"master key is not JSON: {exc}") from None
