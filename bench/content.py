"""File contents for the benchmark corpus: random, text-like and log-like bytes.

Every generator is a pure function of ``(seed, label, size)`` and yields the content
in pieces of at most :data:`PIECE` bytes, so a 200 MiB file never sits in memory.

* ``random`` — BLAKE3 XOF output: incompressible (like media or already-compressed
  files), ~5 GB/s.
* ``text`` — Zipf-distributed pseudo-words in phrases and lines; compresses about
  3x with zstd -3, like prose or source code. Built by indexing a 65,536-entry phrase
  table with 16-bit random numbers, which keeps Python's per-item cost low.
* ``log`` — timestamped service log lines with a handful of templates and random ids;
  compresses about 4x, like application logs.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import lru_cache

from bench.prng import Rng, stream_bytes

PIECE = 1 << 20  # bytes per yielded piece

# Letters weighted roughly like English text (counts per 100), so words look word-ish.
_LETTER_WEIGHTS = {
    "e": 12, "t": 9, "a": 8, "o": 8, "i": 7, "n": 7, "s": 6, "h": 6, "r": 6, "d": 4,
    "l": 4, "c": 3, "u": 3, "m": 2, "w": 2, "f": 2, "g": 2, "y": 2, "p": 2, "b": 1,
    "v": 1, "k": 1, "j": 1, "x": 1, "q": 1, "z": 1,
}  # fmt: skip
_VOCAB_SIZE = 4096
_TABLE_SIZE = 1 << 16


def _u16_array(data: bytes) -> array[int]:
    """``data`` read as little-endian unsigned 16-bit integers, on any host."""
    values = array("H", data)
    if sys.byteorder == "big":
        values.byteswap()
    return values


@lru_cache(maxsize=4)
def _phrase_table(seed: int) -> tuple[bytes, ...]:
    """65,536 short phrases made of Zipf-distributed words, with punctuation and newlines."""
    rng = Rng(seed, "text/vocabulary")
    letters = "".join(ch * w for ch, w in _LETTER_WEIGHTS.items())
    vocab = []
    for _ in range(_VOCAB_SIZE):
        length = 1 + rng.below(4) + rng.below(6)
        vocab.append("".join(letters[rng.below(len(letters))] for _ in range(length)))
    # Zipf weights 1/(rank+1); only IEEE-exact arithmetic (+, /), so identical everywhere.
    weights = [1.0 / (rank + 1) for rank in range(_VOCAB_SIZE)]
    total = sum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        acc += w / total
        cumulative.append(acc)

    def zipf_word() -> str:
        u, lo, hi = rng.uniform(), 0, _VOCAB_SIZE - 1
        while lo < hi:  # first rank whose cumulative weight exceeds u
            mid = (lo + hi) // 2
            if cumulative[mid] > u:
                hi = mid
            else:
                lo = mid + 1
        return vocab[lo]

    separators = [" "] * 12 + [", ", ". ", ".\n", "\n", "\n\n", "; ", " - ", "\n    "]
    phrases = []
    for _ in range(_TABLE_SIZE):
        words = [zipf_word() for _ in range(1 + rng.below(3))]
        phrases.append((" ".join(words) + rng.choice(separators)).encode())
    return tuple(phrases)


def random_content(seed: int, label: str, size: int) -> Iterator[bytes]:
    """Incompressible bytes: the XOF stream named ``label``."""
    for offset in range(0, size, PIECE):
        yield stream_bytes(seed, "random/" + label, min(PIECE, size - offset), offset)


def text_content(seed: int, label: str, size: int) -> Iterator[bytes]:
    """Compressible text-like bytes for ``label`` (prose/source-code shaped)."""
    phrases = _phrase_table(seed)
    mean_len = sum(map(len, phrases)) / len(phrases)
    produced, round_no, carry = 0, 0, b""
    while produced < size:
        want = min(PIECE, size - produced)
        parts = [carry]
        have = len(carry)
        while have < want:  # almost always one pass: the estimate overshoots by ~3%
            n = int((want - have) / mean_len * 1.03) + 64
            indices = _u16_array(stream_bytes(seed, f"text/{label}/{round_no}", 2 * n))
            round_no += 1
            part = b"".join(map(phrases.__getitem__, indices))
            parts.append(part)
            have += len(part)
        joined = b"".join(parts)
        piece, carry = joined[:want], joined[want:]
        produced += len(piece)
        yield piece


_LEVELS = [b"INFO "] * 200 + [b"DEBUG"] * 30 + [b"WARN "] * 20 + [b"ERROR"] * 6
_STATUS = [b"200"] * 200 + [b"201"] * 20 + [b"304"] * 16 + [b"404"] * 12 + [b"500"] * 8
_PATHS = [
    f"{method} /api/v{v}/{res}".encode()
    for method in ("GET", "GET", "POST", "PUT")
    for v in (1, 2)
    for res in ("items", "users", "orders", "sessions", "search", "reports", "files", "auth")
]  # 64 entries
_LOG_EPOCH_S = 1_704_067_200  # 2024-01-01T00:00:00Z
_SECONDS = [b"%02d" % s for s in range(60)]
_MILLIS = [b".%03dZ " % ms for ms in range(1000)]


@lru_cache(maxsize=4)
def _log_tables(seed: int) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """Two 65,536-entry tables of line middles and line ends; a line joins one of each,
    so per-line Python work is a few lookups rather than formatting ten fields."""
    block = stream_bytes(seed, "log/tables", 16 * _TABLE_SIZE)
    heads, tails = [], []
    for i in range(0, len(block), 16):
        b = block[i : i + 16]
        heads.append(
            b"%s [svc-%02d] %s/%d"
            % (_LEVELS[b[0]], b[1] & 31, _PATHS[b[2] & 63], int.from_bytes(b[3:6], "little"))
        )
        tails.append(
            b" status=%s bytes=%d dur_ms=%d req=%s\n"
            % (_STATUS[b[6]], int.from_bytes(b[7:9], "little"), b[9], b[10:16].hex().encode())
        )
    return tuple(heads), tuple(tails)


def log_content(seed: int, label: str, size: int) -> Iterator[bytes]:
    """Application-log-like lines for ``label``, with timestamps from 2024-01-01 UTC."""
    heads, tails = _log_tables(seed)
    produced, round_no, clock_ms = 0, 0, 0
    cached_min, minute, carry = -1, b"", b""
    while produced < size:
        want = min(PIECE, size - produced)
        parts = [carry]  # the tail of the previous piece, so no line is cut mid-file
        n = want // 90 + 16  # lines are ~110 bytes; overshoot, keep the rest
        steps = _u16_array(stream_bytes(seed, f"log/{label}/{round_no}", 6 * n))
        for i in range(0, len(steps), 3):
            clock_ms += steps[i] & 127  # ~16 lines a second: a busy service
            sec, ms = divmod(clock_ms, 1000)
            if sec // 60 != cached_min:
                cached_min = sec // 60
                minute = (
                    datetime.fromtimestamp(_LOG_EPOCH_S + 60 * cached_min, UTC)
                    .strftime("%Y-%m-%dT%H:%M:")
                    .encode()
                )
            parts += (
                minute,
                _SECONDS[sec % 60],
                _MILLIS[ms],
                heads[steps[i + 1]],
                tails[steps[i + 2]],
            )
        joined = b"".join(parts)
        piece, carry = joined[:want], joined[want:]
        produced += len(piece)
        round_no += 1
        yield piece


ContentFn = Callable[[int, str, int], Iterator[bytes]]

GENERATORS: dict[str, ContentFn] = {
    "random": random_content,
    "text": text_content,
    "log": log_content,
}
