"""Keys and the authenticated encryption every stored object goes through.

The master key is 32 random bytes. Everything else is derived from it with BLAKE3's
``derive_key`` mode under fixed context strings (see ``docs/format.md``):

* the *encryption key* — never used with AES directly: each encrypted object names a
  16-byte salt, and its AES-256-GCM key is keyed-BLAKE3(encryption key, salt);
* the *blob ID key* — blob ID = keyed-BLAKE3-256(blob ID key, plaintext), so an ID
  reveals nothing about content to someone holding only the storage;
* the *chunker seed* — a 63-bit integer for ``pyfastcdc.FastCDC(seed=)``, so chunk
  boundaries (and hence sizes) are repository-specific.

Nonce budget. Random 96-bit GCM nonces under one key stay safe only up to about 2^32
messages; a repository reaches billions of blobs. So the AES key changes with the salt.
Deriving a fresh key per object costs ~2.3 µs (BLAKE3 + AESGCM setup), which doubles
the encryption cost of a 4 KiB blob (measured: 2.3 µs cached key, 4.6 µs per-object
key; 1 MiB: 118 µs vs 121 µs). So a ``Crypto`` picks one random salt per process
("session"), reuses its derived key, and rotates to a new salt after
``SESSION_MESSAGE_LIMIT`` (2^24) encryptions or when the process ID changes (a fork
or a worker process). Decryption caches keys per salt. ``docs/format.md`` gives the
collision bounds.
"""

from __future__ import annotations

import os
import threading

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cairn.repo.errors import CorruptedObject, UnsupportedVersion

# Context strings for BLAKE3 derive_key. Fixed forever for format version 1: changing
# one changes every key, ID or chunk boundary of existing repositories.
CONTEXT_ENCRYPTION = "cairn 2026-11 repository encryption key v1"
CONTEXT_BLOB_ID = "cairn 2026-11 blob id key v1"
CONTEXT_CHUNKER_SEED = "cairn 2026-11 chunker seed v1"

MASTER_KEY_SIZE = 32
ENVELOPE_VERSION = 0x01
SALT_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1 + SALT_SIZE + NONCE_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE

# Messages encrypted under one per-session salt before a fresh one is drawn. With
# random nonces the nonce-collision probability per key is about n^2 / 2^97, i.e.
# 2^-49 at n = 2^24 (format.md works through the whole budget).
SESSION_MESSAGE_LIMIT = 1 << 24

# Decryption keys kept per salt; a restore touches objects written by a handful of
# sessions, so a small cache hits almost always.
_DECRYPT_CACHE_SIZE = 256

# pyfastcdc's Cython build converts the seed through a signed C long: it accepts
# 0 .. 2^63-1, and 0 means "the unmodified gear table".
_SEED_MASK = (1 << 63) - 1


def derive_subkey(master: bytes, context: str) -> bytes:
    """BLAKE3 ``derive_key`` of ``master`` under ``context``: 32 bytes."""
    return blake3.blake3(master, derive_key_context=context).digest()


def storage_id(data: bytes | bytearray | memoryview) -> str:
    """Hex plain BLAKE3-256 of stored bytes: the backend name of most objects."""
    return blake3.blake3(data).hexdigest()


class MasterKey:
    """The repository's 32-byte master key. Its repr never shows the bytes."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != MASTER_KEY_SIZE:
            raise ValueError(f"a master key is {MASTER_KEY_SIZE} bytes, got {len(raw)}")
        self._raw = bytes(raw)

    @classmethod
    def generate(cls) -> MasterKey:
        """A fresh random master key from the OS CSPRNG."""
        return cls(os.urandom(MASTER_KEY_SIZE))

    @property
    def raw(self) -> bytes:
        """The key bytes (for wrapping into key files only)."""
        return self._raw

    def crypto(self) -> Crypto:
        """The ``Crypto`` object holding the sub-keys derived from this key."""
        seed = int.from_bytes(derive_subkey(self._raw, CONTEXT_CHUNKER_SEED)[:8], "little")
        # 0 would select pyfastcdc's public default table; the chance is 2^-63 but
        # the fix is free.
        seed = (seed & _SEED_MASK) or 1
        return Crypto(
            derive_subkey(self._raw, CONTEXT_ENCRYPTION),
            derive_subkey(self._raw, CONTEXT_BLOB_ID),
            seed,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MasterKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return "MasterKey(<redacted>)"


class Crypto:
    """Blob IDs, encryption and decryption under one repository's sub-keys.

    Small and picklable: it is sent to each worker process once per run. Pickling
    carries only the sub-keys (not the master key, not the session), so every process
    draws its own session salt. Safe to share between threads; the message counter is
    approximate under races, which only moves the rotation point by a few messages.
    """

    __slots__ = (
        "_cache",
        "_count",
        "_enc_key",
        "_id_key",
        "_lock",
        "_pid",
        "_session",
        "_session_limit",
        "_session_salt",
        "chunker_seed",
    )

    def __init__(
        self,
        enc_key: bytes,
        id_key: bytes,
        chunker_seed: int,
        session_limit: int = SESSION_MESSAGE_LIMIT,
    ) -> None:
        if len(enc_key) != 32 or len(id_key) != 32:
            raise ValueError("sub-keys are 32 bytes")
        if not 0 < chunker_seed <= _SEED_MASK:
            raise ValueError("chunker seed out of range")
        self._enc_key = bytes(enc_key)
        self._id_key = bytes(id_key)
        self.chunker_seed = chunker_seed
        self._lock = threading.Lock()
        self._cache: dict[bytes, AESGCM] = {}
        self._session: AESGCM | None = None
        self._session_salt = b""
        self._count = 0
        self._pid = 0
        # A parameter only so tests can see rotation happen; never raise it above 2^24.
        self._session_limit = min(session_limit, SESSION_MESSAGE_LIMIT)

    def __reduce__(self) -> tuple[type[Crypto], tuple[bytes, bytes, int, int]]:
        return (Crypto, (self._enc_key, self._id_key, self.chunker_seed, self._session_limit))

    def __repr__(self) -> str:
        return "Crypto(<redacted>)"

    def blob_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """Keyed BLAKE3-256 of the plaintext: the 32-byte blob ID."""
        return blake3.blake3(data, key=self._id_key).digest()

    def _object_key(self, salt: bytes) -> AESGCM:
        return AESGCM(blake3.blake3(salt, key=self._enc_key).digest())

    def _session_key(self) -> tuple[bytes, AESGCM]:
        with self._lock:
            pid = os.getpid()
            if self._session is None or self._count >= self._session_limit or pid != self._pid:
                self._session_salt = os.urandom(SALT_SIZE)
                self._session = self._object_key(self._session_salt)
                self._count = 0
                self._pid = pid
            self._count += 1
            return self._session_salt, self._session

    def encrypt(self, plaintext: bytes | bytearray | memoryview, ad: bytes) -> bytes:
        """Encrypt and authenticate; ``ad`` binds what the object is.

        Layout: ``0x01 | salt(16) | nonce(12) | ciphertext | tag(16)``. The version
        byte is authenticated too (GCM associated data = version byte + ``ad``).
        """
        salt, aead = self._session_key()
        nonce = os.urandom(NONCE_SIZE)
        header = bytes((ENVELOPE_VERSION,)) + salt + nonce
        return header + aead.encrypt(nonce, plaintext, header[:1] + ad)

    def encrypt_into(
        self, plaintext: bytes | bytearray | memoryview, ad: bytes, out: memoryview
    ) -> int:
        """As :meth:`encrypt`, written into ``out`` (at least ``len(plaintext) +
        OVERHEAD`` bytes) instead of new bytes; returns the length written."""
        salt, aead = self._session_key()
        nonce = os.urandom(NONCE_SIZE)
        end = HEADER_SIZE + len(plaintext) + TAG_SIZE
        if len(out) < end:
            raise ValueError("output buffer too small for the encrypted object")
        out[0] = ENVELOPE_VERSION
        out[1 : 1 + SALT_SIZE] = salt
        out[1 + SALT_SIZE : HEADER_SIZE] = nonce
        aead.encrypt_into(nonce, plaintext, bytes((ENVELOPE_VERSION,)) + ad, out[HEADER_SIZE:end])
        return end

    def decrypt(self, stored: bytes | bytearray | memoryview, ad: bytes) -> bytes:
        """Authenticate and decrypt; raise ``CorruptedObject`` on any failure.

        The error names no object (this layer does not know it); callers re-label it
        with ``CorruptedObject.naming``.
        """
        view = memoryview(stored)
        if len(view) < OVERHEAD:
            raise CorruptedObject("encrypted object", "", f"truncated to {len(view)} bytes")
        version = view[0]
        if version != ENVELOPE_VERSION:
            raise UnsupportedVersion(
                "encrypted object", "", f"unknown encryption envelope version {version}"
            )
        salt = bytes(view[1 : 1 + SALT_SIZE])
        nonce = bytes(view[1 + SALT_SIZE : HEADER_SIZE])
        aead = self._cache.get(salt)
        if aead is None:
            aead = self._object_key(salt)
            with self._lock:
                if len(self._cache) >= _DECRYPT_CACHE_SIZE:
                    self._cache.clear()
                self._cache[salt] = aead
        try:
            return aead.decrypt(nonce, view[HEADER_SIZE:], bytes((version,)) + ad)
        except InvalidTag:
            raise CorruptedObject(
                "encrypted object", "", "authentication failed (modified, truncated or wrong key)"
            ) from None
