"""The directories above the snapshots, as restic lays them out (so scripts carry over)::

    snapshots/<time>/…         every snapshot, named by its time (RFC 3339, local time)
    snapshots/latest -> <time> the newest one
    ids/<short id>/…
    hosts/<host>/<time>/…  and  hosts/<host>/latest
    tags/<tag>/<time>/…    and  tags/<tag>/latest

Two snapshots with the same time get ``-1``, ``-2``… appended, as in restic. A tag
that is not a valid file name (``""``, ``.``, ``..``, one with ``/``) is spelt with
underscores, as in restic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from cairn.repo.snapshot import Snapshot

TOP_DIRS = (b"hosts", b"ids", b"snapshots", b"tags")
LATEST = b"latest"


@dataclass(frozen=True)
class SnapshotDir:
    """A directory showing one snapshot's tree."""

    id: str
    snapshot: Snapshot


@dataclass(frozen=True)
class Link:
    """A symbolic link (``latest``)."""

    target: bytes
    time_ns: int


@dataclass
class MetaDir:
    """A directory of the layout: names to sub-directories, snapshots or links."""

    entries: dict[bytes, MetaDir | SnapshotDir | Link] = field(default_factory=dict)
    time_ns: int = 0  # the newest snapshot below (the directory's times)

    def subdir(self, name: bytes) -> MetaDir:
        entry = self.entries.get(name)
        if not isinstance(entry, MetaDir):
            entry = self.entries[name] = MetaDir()
        return entry


def time_name(snap: Snapshot) -> str:
    """restic's default ``--time-template`` (Go's RFC 3339) in local time."""
    when = datetime.fromtimestamp(snap.time_ns / 1e9).astimezone()
    text = when.isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def tag_name(tag: str) -> str:
    """A tag (or host) as a file name."""
    if tag in ("", "."):
        return "_"
    if tag == "..":
        return "__"
    return tag.replace("/", "_")


def _add_timed(parent: MetaDir, sid: str, snap: Snapshot) -> None:
    """``<time>`` (made unique) and, if this is the newest so far, ``latest``."""
    base = time_name(snap).encode()
    name, n = base, 0
    while name in parent.entries:
        n += 1
        name = base + b"-%d" % n
    parent.entries[name] = SnapshotDir(sid, snap)
    latest = parent.entries.get(LATEST)
    if not isinstance(latest, Link) or snap.time_ns >= latest.time_ns:
        parent.entries[LATEST] = Link(name, snap.time_ns)


def build_layout(snapshots: Iterable[tuple[str, Snapshot]], short_id: int = 8) -> MetaDir:
    """The root of the layout for these ``(id, snapshot)`` pairs (oldest first)."""
    root = MetaDir()
    for top in TOP_DIRS:
        root.subdir(top)
    for sid, snap in sorted(snapshots, key=lambda s: (s[1].time_ns, s[0])):
        root.subdir(b"ids").entries[sid[:short_id].encode()] = SnapshotDir(sid, snap)
        _add_timed(root.subdir(b"snapshots"), sid, snap)
        _add_timed(root.subdir(b"hosts").subdir(tag_name(snap.hostname).encode()), sid, snap)
        for tag in snap.tags:
            _add_timed(root.subdir(b"tags").subdir(tag_name(tag).encode()), sid, snap)
    _stamp(root)
    return root


def _stamp(meta: MetaDir) -> int:
    """Give each directory the time of its newest snapshot; return it."""
    newest = 0
    for entry in meta.entries.values():
        if isinstance(entry, MetaDir):
            newest = max(newest, _stamp(entry))
        elif isinstance(entry, SnapshotDir):
            newest = max(newest, entry.snapshot.time_ns)
    meta.time_ns = newest
    return newest
