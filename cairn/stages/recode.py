"""CPU work of ``copy`` in the worker processes: decode a source blob, re-encode it
for the destination.

A worker of a copy holds two sets of keys: the source's *decoder* (anything with
``decode(blob_type, blob_id, stored) -> plaintext`` that pickles — cairn's own
:class:`CairnDecoder`, later a restic reader's) and the destination's ``Crypto``.
One job takes a downloaded range of a source pack (an input slot) and writes the
re-encoded blobs one after another into an output slot; only the small list of
where each landed travels back.
"""

from __future__ import annotations

from typing import Protocol

from cairn.repo.codec import decode_blob, encode_blob_into
from cairn.repo.crypto import Crypto
from cairn.repo.errors import CorruptedObject


class BlobDecoder(Protocol):
    """What a source repository format gives the workers to read its blobs."""

    def decode(self, blob_type: int, blob_id: bytes, stored: memoryview) -> bytes:
        """Decrypt, decompress and verify one stored blob; ``CorruptedObject`` if bad."""
        ...


class CairnDecoder:
    """A cairn repository's blobs: its ``Crypto`` and the blob codec."""

    def __init__(self, crypto: Crypto) -> None:
        self.crypto = crypto

    def decode(self, blob_type: int, blob_id: bytes, stored: memoryview) -> bytes:
        return decode_blob(self.crypto, blob_type, blob_id, stored)


_keys: tuple[BlobDecoder, Crypto] | None = None


def init_recode_worker(decoder: BlobDecoder, dest: Crypto) -> None:
    """Runs once in each worker of a copy: the source's decoder, the destination's keys."""
    global _keys
    _keys = (decoder, dest)


# (index of the span, blob ID in the destination, offset and length in the output
# slot, plaintext length)
Placed = tuple[int, bytes, int, int, int]


def recode_spans(
    src: memoryview,
    dst: memoryview,
    spans: list[tuple[int, int, int, bytes]],
    level: int,
) -> tuple[list[Placed], list[tuple[int, str]]]:
    """Decode the blobs at ``(offset, length, type, source ID)`` of ``src``, and
    encode each for the destination (its keyed ID, compression ``level``) into
    ``dst``. Returns where each landed and ``(span index, why)`` for each blob that
    failed to decode (corrupt in the source): one bad blob never stops the others.
    """
    if _keys is None:  # pragma: no cover - a pool started without the initializer
        raise RuntimeError("worker started without the copy's keys")
    decoder, dest = _keys
    placed: list[Placed] = []
    bad: list[tuple[int, str]] = []
    pos = 0
    for i, (offset, length, blob_type, blob_id) in enumerate(spans):
        try:
            data = decoder.decode(blob_type, blob_id, src[offset : offset + length])
        except CorruptedObject as exc:
            bad.append((i, str(exc)))
            continue
        new_id = dest.blob_id(data)
        size = encode_blob_into(dest, blob_type, new_id, data, dst[pos:], level)
        placed.append((i, new_id, pos, size, len(data)))
        pos += size
    return placed, bad
