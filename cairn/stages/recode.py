"""CPU work of ``copy`` in the worker processes: decode a source blob, re-encode it
for the destination.

A job carries two sets of keys (small, pickled with it): the source's *decoder*
(anything with ``decode(blob_type, blob_id, stored)`` that pickles — cairn's own
:class:`CairnDecoder`, later a restic reader's) and the destination's ``Crypto``.
One job takes a downloaded range of a source pack (an input slot) and writes the
re-encoded blobs one after another into an output slot; only the small list of
where each landed travels back.
"""

from __future__ import annotations

from typing import Protocol

from cairn.repo.codec import (
    DEFAULT_LEVEL,
    decode_blob_keeping_frame,
    encode_blob_into,
    encrypt_blob_body_into,
)
from cairn.repo.crypto import Crypto
from cairn.repo.errors import CorruptedObject


class BlobDecoder(Protocol):
    """What a source repository format gives the workers to read its blobs."""

    def decode(
        self, blob_type: int, blob_id: bytes, stored: memoryview
    ) -> tuple[bytes, bytes | None]:
        """Decrypt, decompress and verify one stored blob (``CorruptedObject`` if
        bad): its plaintext, and its body as cairn packs one (flag byte, then the
        zstd frame or the raw bytes) when the source has it at hand, else None."""
        ...


class CairnDecoder:
    """A cairn repository's blobs: its ``Crypto`` and the blob codec."""

    def __init__(self, crypto: Crypto) -> None:
        self.crypto = crypto

    def decode(
        self, blob_type: int, blob_id: bytes, stored: memoryview
    ) -> tuple[bytes, bytes | None]:
        return decode_blob_keeping_frame(self.crypto, blob_type, blob_id, stored)


def preload() -> None:
    """Nothing: a pool started with this as its initializer has its fork server
    import this module (and the codec's libraries) once, for every worker. The keys
    travel with each job instead, so the pool can start before the repositories
    are open (their key derivations take most of a copy's first second)."""


# (index of the span, blob ID in the destination, offset and length in the output
# slot, plaintext length)
Placed = tuple[int, bytes, int, int, int]


def recode_spans(
    src: memoryview,
    dst: memoryview,
    spans: list[tuple[int, int, int, bytes]],
    level: int | None,
    decoder: BlobDecoder,
    dest: Crypto,
) -> tuple[list[Placed], list[tuple[int, str]]]:
    """Decode the blobs at ``(offset, length, type, source ID)`` of ``src``, and
    encode each for the destination (its keyed ID; compressed at ``level``, or with
    ``None`` kept as the source stored it: only re-encrypted) into ``dst``. Returns
    where each landed and ``(span index, problem)`` for each blob that failed to
    decode (corrupt in the source): one bad blob never stops the others.
    """
    placed: list[Placed] = []
    bad: list[tuple[int, str]] = []
    pos = 0
    for i, (offset, length, blob_type, blob_id) in enumerate(spans):
        try:
            data, body = decoder.decode(blob_type, blob_id, src[offset : offset + length])
        except CorruptedObject as exc:
            bad.append((i, exc.problem))
            continue
        new_id = dest.blob_id(data)
        if level is None and body is not None:
            # Compressing is most of a re-encoding's CPU; the frame needs no key.
            size = encrypt_blob_body_into(dest, blob_type, new_id, body, dst[pos:])
        else:
            # No body to keep (a restic blob stored raw): the default compression.
            chosen = DEFAULT_LEVEL if level is None else level
            size = encode_blob_into(dest, blob_type, new_id, data, dst[pos:], chosen)
        placed.append((i, new_id, pos, size, len(data)))
        pos += size
    return placed, bad
