"""Request paths of the REST protocol, parsed and validated before any file is touched.

A repository lives at any path of safe segments (``/``, ``/alice``, ``/alice/laptop``);
below it the protocol names ``config``, ``<kind>/`` (a listing) and ``<kind>/<name>``.
``data/<id>`` is stored as ``data/<id[:2]>/<id>`` on disk, as rest-server does.
Anything else — ``..``, dot-names, percent-escapes, empty segments — is refused:
the server's temporary files are dot-names, so no request can ever reach one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("data", "keys", "locks", "snapshots", "index")
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_NAME = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z_.-]{0,254}$")
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_RESERVED = {*KINDS, "config"}


class BadPath(ValueError):
    """The request path is not one the protocol allows (answered 400)."""


@dataclass(frozen=True)
class Target:
    """What a request addresses: a repository, and in it config, a listing or an object."""

    repo: tuple[str, ...]  # path segments of the repository, () for the root
    kind: str | None = None  # None: the repository itself; "config"; or one of KINDS
    name: str | None = None  # the object name (None for config and listings)

    @property
    def repo_label(self) -> str:
        """The repository as shown in logs and metrics: ``/alice/laptop``."""
        return "/" + "/".join(self.repo)

    @property
    def is_listing(self) -> bool:
        return self.kind in KINDS and self.name is None

    def relative(self) -> str:
        """The file's path below the repository directory (data fans out)."""
        if self.kind == "config":
            return "config"
        if self.kind is None or self.name is None:
            raise ValueError("not an object")
        if self.kind == "data":
            return f"data/{self.name[:2]}/{self.name}"
        return f"{self.kind}/{self.name}"


def is_hex_id(text: str) -> bool:
    return bool(_HEX_ID.match(text))


def parse(raw_path: str) -> Target:
    """Parse the raw (still percent-encoded) request path; raise ``BadPath``."""
    if not raw_path.startswith("/") or "%" in raw_path or "\\" in raw_path:
        raise BadPath(f"bad path {raw_path!r}")
    segments = raw_path[1:].split("/")
    listing = segments[-1] == ""
    if listing:
        segments.pop()
    if not segments:
        return Target(())
    if not listing and segments[-1] == "config":
        return Target(_repo(segments[:-1]), "config")
    if listing and segments[-1] in KINDS:
        return Target(_repo(segments[:-1]), segments[-1])
    if not listing and len(segments) >= 2 and segments[-2] in KINDS:
        kind, name = segments[-2], segments[-1]
        valid = is_hex_id(name) if kind == "data" else bool(_NAME.match(name))
        if not valid:
            raise BadPath(f"bad object name {kind}/{name}")
        return Target(_repo(segments[:-2]), kind, name)
    return Target(_repo(segments))


def _repo(segments: list[str]) -> tuple[str, ...]:
    for segment in segments:
        if not _SEGMENT.match(segment) or segment in _RESERVED:
            raise BadPath(f"bad repository path segment {segment!r}")
    return tuple(segments)
