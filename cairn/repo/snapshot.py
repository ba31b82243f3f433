"""Snapshots: what was backed up, when, from where, and its root tree.

Stored as ``seal(crypto, "snapshot", msgpack(map))`` under ``snapshots/<storage id>``;
the snapshot ID is that storage ID, so it is not a field. Paths are bin (the bytes the
OS gave, ``os.fsencode``), so non-UTF-8 paths survive; the Python API shows them as
``str`` decoded with ``os.fsdecode`` (surrogateescape).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cairn.repo import schema
from cairn.repo.errors import UnsupportedVersion

SNAPSHOT_VERSION = 1

SummaryValue = int | float | str


@dataclass
class Snapshot:
    """One snapshot's metadata; ``tree`` is the 32-byte root tree blob ID."""

    time_ns: int
    tree: bytes
    paths: list[str]
    hostname: str = ""
    username: str = ""
    uid: int = 0
    gid: int = 0
    tags: list[str] = field(default_factory=list)
    parent: str | None = None  # hex snapshot ID
    excludes: list[str] = field(default_factory=list)
    program_version: str = ""
    summary: dict[str, SummaryValue] = field(default_factory=dict)
    original: str | None = None  # hex ID of the snapshot this one rewrites (tag, repair)

    @property
    def time(self) -> datetime:
        """The snapshot time as an aware UTC datetime (microsecond precision)."""
        return datetime.fromtimestamp(self.time_ns / 1e9, tz=UTC)

    @property
    def time_iso(self) -> str:
        """ISO-8601 UTC with nanoseconds, e.g. ``2026-11-03T02:00:01.123456789Z``."""
        seconds, nanos = divmod(self.time_ns, 1_000_000_000)
        base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{base}.{nanos:09d}Z"


def encode_snapshot(snap: Snapshot) -> bytes:
    """The msgpack payload of a snapshot (seal it with kind ``"snapshot"``)."""
    if len(snap.tree) != 32:
        raise ValueError("a tree ID is 32 bytes")
    payload: dict[str, object] = {
        "v": SNAPSHOT_VERSION,
        "time_ns": snap.time_ns,
        "tree": snap.tree,
        "paths": [os.fsencode(p) for p in snap.paths],
        "hostname": snap.hostname,
        "username": snap.username,
        "uid": snap.uid,
        "gid": snap.gid,
        "tags": list(snap.tags),
        "parent": snap.parent,
        "excludes": list(snap.excludes),
        "program_version": snap.program_version,
        "summary": dict(snap.summary),
    }
    if snap.original is not None:
        # Written only when set, so snapshots that were never rewritten keep their bytes.
        payload["original"] = snap.original
    return schema.pack(payload)


def decode_snapshot(payload: bytes, name: str = "") -> Snapshot:
    """Parse and validate a snapshot payload; ``CorruptedObject`` on any deviation."""
    r = schema.Reader(schema.unpack(payload, "snapshot", name), "snapshot", name)
    version = r.get_int("v")
    if version != SNAPSHOT_VERSION:
        raise UnsupportedVersion("snapshot", name, f"snapshot version {version} is not supported")
    parent = r.map.get("parent")
    if parent is not None and not (isinstance(parent, str) and len(parent) == 64):
        r.fail("field 'parent' is not a snapshot ID")
    original = r.map.get("original")
    if original is not None and not (isinstance(original, str) and len(original) == 64):
        r.fail("field 'original' is not a snapshot ID")
    summary = r.map.get("summary", {})
    if not isinstance(summary, dict) or not all(
        isinstance(k, str) and type(v) in (int, float, str) for k, v in summary.items()
    ):
        r.fail("field 'summary' is not a map of numbers and strings")
    return Snapshot(
        time_ns=r.get_int("time_ns", minimum=None),
        tree=r.get_bytes("tree", size=32),
        paths=[os.fsdecode(p) for p in r.get_bytes_list("paths")],
        hostname=r.get_str("hostname", ""),
        username=r.get_str("username", ""),
        uid=r.get_int("uid", 0),
        gid=r.get_int("gid", 0),
        tags=r.get_str_list("tags", []),
        parent=parent,
        excludes=r.get_str_list("excludes", []),
        program_version=r.get_str("program_version", ""),
        summary=summary,
        original=original,
    )
