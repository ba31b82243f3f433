"""The repository config: format version, repository ID and chunking parameters.

Stored as ``seal(crypto, "config", msgpack(map))`` under the name ``config``. It is
written once by ``init`` and never changes; the chunker parameters are fixed here
because changing them would defeat deduplication against existing snapshots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cairn.repo import schema
from cairn.repo.errors import UnsupportedVersion

REPO_VERSION = 1

# DESIGN.md defaults: large chunks keep the index small (1 MiB average ⇒ ~1M blobs
# per TiB) at some cost in dedup of small edits; within pyfastcdc's limits
# (min ≤ 1 MiB, avg ≤ 4 MiB, max ≤ 16 MiB).
DEFAULT_CHUNK_MIN = 512 * 1024
DEFAULT_CHUNK_AVG = 1024 * 1024
DEFAULT_CHUNK_MAX = 8 * 1024 * 1024
DEFAULT_PACK_SIZE = 16 * 1024 * 1024


def _utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Config:
    """The decoded config object."""

    id: str = field(default_factory=lambda: os.urandom(32).hex())
    version: int = REPO_VERSION
    chunk_min: int = DEFAULT_CHUNK_MIN
    chunk_avg: int = DEFAULT_CHUNK_AVG
    chunk_max: int = DEFAULT_CHUNK_MAX
    pack_size: int = DEFAULT_PACK_SIZE
    created: str = field(default_factory=_utc_now_iso)


def encode_config(config: Config) -> bytes:
    """The msgpack payload of a config (seal it with kind ``"config"``)."""
    return schema.pack(
        {
            "version": config.version,
            "id": config.id,
            "chunker": {"min": config.chunk_min, "avg": config.chunk_avg, "max": config.chunk_max},
            "pack_size": config.pack_size,
            "created": config.created,
        }
    )


def decode_config(payload: bytes) -> Config:
    """Parse and validate a config payload.

    Raises ``UnsupportedVersion`` for a newer format, ``CorruptedObject`` otherwise.
    """
    r = schema.Reader(schema.unpack(payload, "config", "config"), "config", "")
    version = r.get_int("version")
    if version != REPO_VERSION:
        raise UnsupportedVersion(
            "config", "", f"repository format version {version} is not supported"
        )
    repo_id = r.get_str("id")
    try:
        ok = len(bytes.fromhex(repo_id)) == 32
    except ValueError:
        ok = False
    if not ok:
        r.fail("field 'id' is not 64 hex digits")
    chunker = schema.Reader(r.map.get("chunker"), "config", "", "chunker")
    cmin, cavg, cmax = (chunker.get_int(k) for k in ("min", "avg", "max"))
    if not 64 <= cmin <= cavg <= cmax:
        r.fail("chunker sizes are not ordered min ≤ avg ≤ max")
    pack_size = r.get_int("pack_size")
    if pack_size < 1:
        r.fail("pack_size is not positive")
    return Config(
        id=repo_id,
        version=version,
        chunk_min=cmin,
        chunk_avg=cavg,
        chunk_max=cmax,
        pack_size=pack_size,
        created=r.get_str("created", ""),
    )
