"""restic's JSON trees and snapshots as cairn's :class:`Node`, :class:`Tree` and
:class:`Snapshot` (restic's ``doc/design.rst``, "Trees and Data", "Snapshots").

What differs and how it maps:

* names: restic stores each name through Go's ``strconv.Quote`` (minus the quotes;
  restic 0.14 already did), so a non-UTF-8 name is ``\\xNN`` escapes; a name that is
  not a valid quoted string is kept as it is;
* modes: Go's ``fs.FileMode`` — permissions in the low 9 bits, setuid, setgid and
  sticky at bits 23, 22 and 20 — become Unix permission bits;
* times: RFC 3339 with nanoseconds and a zone offset become nanoseconds since the
  epoch (UTC);
* types: restic's ``dev`` is a block device; ``irregular`` entries (restic's
  Windows reparse points and the like) have no equivalent and are left out;
* symlink targets: ``linktarget_raw`` (base64, restic ≥ 0.16) wins over
  ``linktarget``; extended attributes are ``{name, value (base64)}`` pairs.
"""

from __future__ import annotations

import base64
import calendar
import os
import re
from typing import Any

from cairn.repo.errors import CorruptedObject
from cairn.repo.snapshot import Snapshot
from cairn.repo.tree import Node, Tree

_GO_SETUID, _GO_SETGID, _GO_STICKY = 1 << 23, 1 << 22, 1 << 20
_TYPES = {
    "file": "file",
    "dir": "dir",
    "symlink": "symlink",
    "dev": "blockdev",
    "chardev": "chardev",
    "fifo": "fifo",
    "socket": "socket",
}
_TIME = re.compile(
    r"(-?\d{4,})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)\Z"
)
_ESCAPE = re.compile(
    rb"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|[abfnrtv\\'\"])"
)
_SIMPLE = {b"a": 7, b"b": 8, b"f": 12, b"n": 10, b"r": 13, b"t": 9, b"v": 11}


def parse_time(text: str) -> int:
    """RFC 3339 (Go's ``time.Time`` JSON) as nanoseconds since the epoch."""
    m = _TIME.match(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction, zone = m.group(7) or "", m.group(8)
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + int(fraction.ljust(9, "0") or 0)


def go_unquote(name: str) -> bytes:
    """A name as restic stored it, back to its bytes (Go's ``strconv.Unquote`` of
    ``"`` + name + ``"``); one with an invalid escape comes back as it is."""
    raw = name.encode("utf-8", "surrogateescape")
    if b"\\" not in raw:
        return raw
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(raw):
        if m.start() != pos and b"\\" in raw[pos : m.start()]:
            return raw  # a lone backslash: not a quoted name (restic < 0.17)
        out += raw[pos : m.start()]
        esc = m.group(1)
        head = esc[:1]
        if head == b"x":
            out.append(int(esc[1:], 16))
        elif head in (b"u", b"U"):
            out += chr(int(esc[1:], 16)).encode("utf-8", "surrogatepass")
        elif head.isdigit():
            out.append(int(esc, 8) & 0xFF)
        else:
            out += bytes([_SIMPLE[head]]) if head in _SIMPLE else head
        pos = m.end()
    if b"\\" in raw[pos:]:
        return raw
    out += raw[pos:]
    return bytes(out)


def unix_mode(go_mode: int) -> int:
    """Go's ``fs.FileMode`` as Unix permission bits (with setuid/setgid/sticky)."""
    mode = go_mode & 0o777
    if go_mode & _GO_SETUID:
        mode |= 0o4000
    if go_mode & _GO_SETGID:
        mode |= 0o2000
    if go_mode & _GO_STICKY:
        mode |= 0o1000
    return mode


def _id(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError(f"not an ID: {value!r}")
    return bytes.fromhex(value)


def node_from_json(doc: dict[str, Any]) -> Node | None:
    """One restic tree node as a cairn node (None for a type cairn cannot hold)."""
    kind = _TYPES.get(doc.get("type", ""))
    if kind is None:
        return None
    node = Node(
        type=kind,
        name=go_unquote(doc["name"]),
        mode=unix_mode(int(doc.get("mode", 0))),
        uid=int(doc.get("uid", 0)),
        gid=int(doc.get("gid", 0)),
        user=doc.get("user") or "",
        group=doc.get("group") or "",
        mtime_ns=parse_time(doc["mtime"]) if doc.get("mtime") else 0,
        atime_ns=parse_time(doc["atime"]) if doc.get("atime") else 0,
        ctime_ns=parse_time(doc["ctime"]) if doc.get("ctime") else 0,
        inode=int(doc.get("inode", 0)),
        device=int(doc.get("device_id", 0)),
        links=int(doc.get("links", 0)) or 1,
        size=int(doc.get("size", 0)) if kind == "file" else 0,
    )
    if kind == "file":
        node.content = [_id(i) for i in doc.get("content") or []]
    elif kind == "dir":
        node.subtree = _id(doc.get("subtree"))
    elif kind == "symlink":
        raw = doc.get("linktarget_raw")
        if raw:
            node.link_target = base64.b64decode(raw)
        else:
            node.link_target = (doc.get("linktarget") or "").encode("utf-8", "surrogateescape")
    elif kind in ("chardev", "blockdev"):
        node.rdev = int(doc.get("device", 0))
    for attr in doc.get("extended_attributes") or []:
        node.xattrs[os.fsencode(attr["name"])] = base64.b64decode(attr.get("value") or "")
    return node


def tree_from_json(doc: Any, tree_id: str) -> tuple[Tree, int]:
    """A restic tree as a cairn tree, and how many entries were left out (types
    cairn cannot hold). ``CorruptedObject`` when it does not parse."""
    try:
        nodes = [n for n in (node_from_json(d) for d in doc["nodes"] or []) if n is not None]
        skipped = len(doc["nodes"] or []) - len(nodes)
        return Tree(nodes), skipped
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptedObject("restic tree", tree_id, f"malformed: {exc}") from None


def snapshot_from_json(doc: Any, snapshot_id: str) -> Snapshot:
    """A restic snapshot as a cairn snapshot; ``original`` names the restic snapshot
    it came from (its own ``original`` if it has one), so copies are recognised."""
    try:
        summary = {
            k: v
            for k, v in (doc.get("summary") or {}).items()
            if isinstance(v, int | float | str) and not isinstance(v, bool)
        }
        return Snapshot(
            time_ns=parse_time(doc["time"]),
            tree=_id(doc["tree"]),
            paths=list(doc.get("paths") or []),
            hostname=doc.get("hostname") or "",
            username=doc.get("username") or "",
            uid=int(doc.get("uid", 0)),
            gid=int(doc.get("gid", 0)),
            tags=list(doc.get("tags") or []),
            parent=doc.get("parent") or None,
            excludes=list(doc.get("excludes") or []),
            program_version=doc.get("program_version") or "restic",
            summary=summary,
            original=doc.get("original") or snapshot_id,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptedObject("restic snapshot", snapshot_id, f"malformed: {exc}") from None
