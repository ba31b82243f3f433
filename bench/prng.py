"""A seeded, portable pseudo-random stream built on the BLAKE3 extendable output.

Python's :mod:`random` is avoided on purpose: its algorithms for ``randint``,
``choice`` and friends have changed between versions. Here every value is derived
from BLAKE3 output (a published, frozen function), so the same seed gives the same
bytes on every Python version and every machine.

Two kinds of use:

* :class:`Rng` — a sequential stream for structural decisions (tree shape, sizes,
  which files to modify); small draws are served from a buffered block of output.
* :func:`stream_bytes` — random access into an independent stream named by a label
  (e.g. a file's path), so each file's content can be produced on its own, in any
  order, and regenerated later without replaying anything else.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TypeVar

import blake3

T = TypeVar("T")

_BLOCK = 1 << 16  # bytes of XOF output buffered per refill of a sequential stream


def _key(seed: int, label: str) -> bytes:
    """The 32-byte BLAKE3 key for the stream called ``label`` under ``seed``."""
    return blake3.blake3(
        f"{seed}\x00{label}".encode(), derive_key_context="cairn bench corpus 2024 v1"
    ).digest()


def stream_bytes(seed: int, label: str, length: int, offset: int = 0) -> bytes:
    """``length`` bytes of the stream ``label`` starting at ``offset`` (random access)."""
    return blake3.blake3(key=_key(seed, label)).digest(length=length, seek=offset)


class Rng:
    """A sequential deterministic random stream (not for cryptography)."""

    def __init__(self, seed: int, label: str) -> None:
        self._hasher = blake3.blake3(key=_key(seed, label))
        self._pos = 0
        self._buf = b""
        self._i = 0

    def bytes(self, n: int) -> bytes:
        """The next ``n`` bytes of the stream."""
        out = bytearray()
        while n > 0:
            if self._i >= len(self._buf):
                self._buf = self._hasher.digest(length=_BLOCK, seek=self._pos)
                self._pos += _BLOCK
                self._i = 0
            take = min(n, len(self._buf) - self._i)
            out += self._buf[self._i : self._i + take]
            self._i += take
            n -= take
        return bytes(out)

    def u64(self) -> int:
        """A uniform integer in [0, 2**64)."""
        value: int = struct.unpack("<Q", self.bytes(8))[0]
        return value

    def below(self, n: int) -> int:
        """A uniform integer in [0, n), without modulo bias (rejection sampling)."""
        if n <= 0:
            raise ValueError("n must be positive")
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            value = self.u64()
            if value < limit:
                return value % n

    def randint(self, lo: int, hi: int) -> int:
        """A uniform integer in [lo, hi] (both ends included)."""
        return lo + self.below(hi - lo + 1)

    def uniform(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        return (self.u64() >> 11) / float(1 << 53)

    def log_uniform(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi], log-uniform by octave (many small values, few large).

        An octave [lo*2**k, lo*2**(k+1)) is picked uniformly, then a value uniformly
        inside it. Integer arithmetic only, so no libm rounding can differ by platform.
        """
        if not 0 < lo <= hi:
            raise ValueError("need 0 < lo <= hi")
        bounds = [lo]
        while bounds[-1] * 2 < hi:
            bounds.append(bounds[-1] * 2)
        bounds.append(hi + 1)
        k = self.below(len(bounds) - 1)
        return bounds[k] + self.below(bounds[k + 1] - bounds[k])

    def choice(self, items: Sequence[T]) -> T:
        """One element of ``items``, uniformly."""
        return items[self.below(len(items))]

    def sample(self, items: Sequence[T], k: int) -> list[T]:
        """``k`` distinct elements of ``items`` in a deterministic order."""
        pool = list(items)
        k = min(k, len(pool))
        for i in range(k):  # partial Fisher-Yates
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]
