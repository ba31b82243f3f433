"""The blob and sealed-object codec: compress when it helps, then encrypt with AD.

Pure module-level functions so worker processes can run them with nothing but a
pickled ``Crypto``. Plaintext inside the encryption envelope is one flag byte
(``0x00`` raw, ``0x01`` zstd frame) followed by the body.
"""

from __future__ import annotations

import threading

import zstandard

from cairn.repo.crypto import Crypto
from cairn.repo.errors import CorruptedObject

FLAG_RAW = 0x00
FLAG_ZSTD = 0x01

BLOB_TYPE_NAMES = {0: "data", 1: "tree"}

# Kinds of whole-file objects and the associated data each is sealed with.
SEAL_KINDS = frozenset({"config", "snapshot", "index", "lock", "packheader"})

# "auto" is zstd level 2: on the bench's default corpus its repository is 0.6%
# larger than level 3's (790 vs 785 MB; restic's "auto": 786 MB) for 1.7x less
# compression CPU (539 vs 316 MB/s per core on its compressible files), and zstd
# was a third of a backup's CPU. Level 1 is faster still but 1.6% larger.
COMPRESSION_LEVELS = {"off": 0, "fastest": 1, "auto": 2, "max": 19}
DEFAULT_LEVEL = COMPRESSION_LEVELS["auto"]
MAX_LEVEL = 22

# Sealed objects are metadata; decompressing more than this means a broken or hostile
# frame header (the frame is authenticated, so only a key holder could write one).
MAX_SEALED_PLAINTEXT = 1 << 32
MAX_BLOB_PLAINTEXT = 1 << 31

# ZstdCompressor objects cost ~8 µs to build (as much as compressing a 4 KiB blob) and
# are not thread-safe, so each thread of each process keeps one per level.
_local = threading.local()


def compression_level(name: str | int) -> int:
    """Map ``off``/``fastest``/``auto``/``max`` or ``0..22`` to a zstd level (0 = off)."""
    if isinstance(name, int):
        level = name
    elif name.strip().lower() in COMPRESSION_LEVELS:
        level = COMPRESSION_LEVELS[name.strip().lower()]
    else:
        try:
            level = int(name)
        except ValueError:
            raise ValueError(
                f"unknown compression {name!r}: use off, fastest, auto, max or 0..22"
            ) from None
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"compression level {level} out of range 0..{MAX_LEVEL}")
    return level


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        # write_content_size lets the reader size its output buffer in one go.
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def _pack_body(data: bytes | bytearray | memoryview, level: int) -> bytes:
    """Flag byte + body; zstd only when the frame is smaller than the input."""
    if level:
        compressed = _compressor(level).compress(data)
        if len(compressed) < len(data):
            return b"\x01" + compressed
    return b"\x00" + bytes(data)


def _unpack_body(plain: bytes, kind: str, name: str, limit: int) -> bytes:
    if not plain:
        raise CorruptedObject(kind, name, "empty plaintext")
    flag = plain[0]
    body = memoryview(plain)[1:]
    if flag == FLAG_RAW:
        return bytes(body)
    if flag != FLAG_ZSTD:
        raise CorruptedObject(kind, name, f"unknown compression flag {flag}")
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise CorruptedObject(kind, name, f"bad zstd frame: {exc}") from None
    if size < 0 or size > limit:
        raise CorruptedObject(kind, name, "zstd frame without a plausible content size")
    try:
        return _decompressor().decompress(body, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptedObject(kind, name, f"zstd decompression failed: {exc}") from None


def blob_ad(blob_type: int, blob_id: bytes) -> bytes:
    """Associated data of a blob: ``b"blob" | type byte | 32-byte blob ID``."""
    return b"blob" + bytes((blob_type,)) + blob_id


def _check_blob_args(blob_type: int, blob_id: bytes) -> None:
    if blob_type not in BLOB_TYPE_NAMES:
        raise ValueError(f"unknown blob type {blob_type}")
    if len(blob_id) != 32:
        raise ValueError("a blob ID is 32 bytes")


def encode_blob(
    crypto: Crypto,
    blob_type: int,
    blob_id: bytes,
    data: bytes | bytearray | memoryview,
    level: int = DEFAULT_LEVEL,
) -> bytes:
    """Compress (level 0 = never) and encrypt one blob, binding its type and ID."""
    _check_blob_args(blob_type, blob_id)
    return crypto.encrypt(_pack_body(data, level), blob_ad(blob_type, blob_id))


def encode_blob_into(
    crypto: Crypto,
    blob_type: int,
    blob_id: bytes,
    data: bytes | bytearray | memoryview,
    out: memoryview,
    level: int = DEFAULT_LEVEL,
) -> int:
    """As :func:`encode_blob`, into ``out``; returns the stored length. Two
    allocations fewer per blob, which a worker's heap would otherwise keep."""
    _check_blob_args(blob_type, blob_id)
    return crypto.encrypt_into(_pack_body(data, level), blob_ad(blob_type, blob_id), out)


def decode_blob(
    crypto: Crypto, blob_type: int, blob_id: bytes, stored: bytes | bytearray | memoryview
) -> bytes:
    """Decrypt, decompress and verify one blob; ``CorruptedObject`` on any mismatch."""
    return decode_blob_keeping_frame(crypto, blob_type, blob_id, stored)[0]


def decode_blob_keeping_frame(
    crypto: Crypto, blob_type: int, blob_id: bytes, stored: bytes | bytearray | memoryview
) -> tuple[bytes, bytes]:
    """As :func:`decode_blob`, and also the encrypted plaintext as it was stored (the
    flag byte and the zstd frame or raw body): ``copy`` re-encrypts that for another
    repository without compressing again (:func:`encrypt_blob_body_into`)."""
    _check_blob_args(blob_type, blob_id)
    kind = f"{BLOB_TYPE_NAMES[blob_type]} blob"
    name = blob_id.hex()
    try:
        plain = crypto.decrypt(stored, blob_ad(blob_type, blob_id))
    except CorruptedObject as exc:
        raise exc.naming(kind, name) from None
    data = _unpack_body(plain, kind, name, MAX_BLOB_PLAINTEXT)
    if crypto.blob_id(data) != blob_id:
        raise CorruptedObject(kind, name, "content does not match its ID")
    return data, plain


def encrypt_blob_body_into(
    crypto: Crypto, blob_type: int, blob_id: bytes, body: bytes | memoryview, out: memoryview
) -> int:
    """Encrypt an already packed blob body (flag byte + frame, as
    :func:`decode_blob_keeping_frame` returns it) into ``out``; the stored length."""
    _check_blob_args(blob_type, blob_id)
    if not body or body[0] not in (FLAG_RAW, FLAG_ZSTD):
        raise ValueError("not a packed blob body")
    return crypto.encrypt_into(body, blob_ad(blob_type, blob_id), out)


def seal(
    crypto: Crypto, kind: str, payload: bytes | bytearray | memoryview, level: int = DEFAULT_LEVEL
) -> bytes:
    """Compress and encrypt a whole-file object with AD = the kind's ASCII name."""
    if kind not in SEAL_KINDS:
        raise ValueError(f"unknown sealed object kind {kind!r}")
    return crypto.encrypt(_pack_body(payload, level), kind.encode("ascii"))


def unseal(
    crypto: Crypto, kind: str, stored: bytes | bytearray | memoryview, name: str = ""
) -> bytes:
    """Reverse ``seal``; ``name`` (e.g. the storage ID) labels errors."""
    if kind not in SEAL_KINDS:
        raise ValueError(f"unknown sealed object kind {kind!r}")
    try:
        plain = crypto.decrypt(stored, kind.encode("ascii"))
    except CorruptedObject as exc:
        raise exc.naming(kind, name) from None
    return _unpack_body(plain, kind, name, MAX_SEALED_PLAINTEXT)
