"""Turn a repository location (``-r``/``CAIRN_REPOSITORY``) into a backend.

Syntax (see ``docs/backends.md``)::

    /srv/repo  ./repo  local:/srv/repo
    sftp:[user@]host:[/]path           sftp://[user@]host[:port]/path
    s3:https://endpoint/bucket[/prefix]  s3:bucket[/prefix]          (AWS)
    rest:http(s)://[user:pass@]host[:port][/path]
    rclone:remote:path

``options`` are restic-style ``-o`` settings named ``<scheme>.<key>``; an option for
another scheme is ignored (one profile may serve several repositories), an unknown
key of the location's own scheme is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from cairn.backends.base import Backend, BackendError

Options = Mapping[str, str]

KNOWN_OPTIONS = {
    "local": {"connections"},
    "sftp": {"connections", "identity", "known-hosts", "accept-new-host-key", "config"},
    "s3": {
        "connections",
        "region",
        "profile",
        "path-style",
        "storage-class",
        "part-size",
        "multipart-threshold",
        "object-lock",
        "retention-days",
    },
    "rest": {"connections"},
    "rclone": {"connections", "program", "args", "config"},
}
# The password of ``scheme://user:password@host`` anywhere in a location.
_URL_SECRET = re.compile(r"(//[^/@:\s]*:)[^/@\s]*@")
_SIZE = re.compile(r"^(\d+)\s*([kmg]?)i?b?$", re.IGNORECASE)
_SCP = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^:/@]+):(?P<path>.*)$")


class InvalidLocation(BackendError, ValueError):
    """The repository location or one of its options is malformed."""


def redact_location(location: str) -> str:
    """``location`` with any URL password replaced by ``***``, for display.

    ``rest:http://user:secret@host/`` becomes ``rest:http://user:***@host/``; the same
    for credentials someone put in an S3 endpoint or an sftp URL.
    """
    return _URL_SECRET.sub(r"\1***@", location)


def _scheme_options(scheme: str, options: Options | None) -> dict[str, str]:
    mine = {}
    for key, value in (options or {}).items():
        head, _, rest = key.partition(".")
        if head != scheme:
            continue
        if rest not in KNOWN_OPTIONS[scheme]:
            allowed = ", ".join(sorted(f"{scheme}.{k}" for k in KNOWN_OPTIONS[scheme]))
            raise InvalidLocation(f"unknown option {key!r} (known: {allowed})")
        mine[rest] = value
    return mine


def _int(opts: dict[str, str], key: str, scheme: str, default: int) -> int:
    if key not in opts:
        return default
    m = _SIZE.match(opts[key].strip())
    if not m or int(m[1]) < 1:
        raise InvalidLocation(
            f"option {scheme}.{key}: expected a positive number, got {opts[key]!r}"
        )
    return int(m[1]) * 1024 ** " kmg".index((m[2] or " ").lower())


def _bool(opts: dict[str, str], key: str, scheme: str) -> bool | None:
    if key not in opts:
        return None
    value = opts[key].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidLocation(f"option {scheme}.{key}: expected true or false, got {opts[key]!r}")


def parse_location(url: str, options: Options | None = None) -> Backend:
    """The backend for ``url``; raises ``InvalidLocation`` with a one-line reason."""
    if not url or not url.strip():
        raise InvalidLocation("empty repository location")
    scheme, sep, rest = url.partition(":")
    if sep and scheme in ("sftp", "s3", "rest", "rclone"):
        opts = _scheme_options(scheme, options)
        builder = {"sftp": _sftp, "s3": _s3, "rest": _rest, "rclone": _rclone}[scheme]
        return builder(rest, opts, url)
    from cairn.backends.local import DEFAULT_CONNECTIONS, LocalBackend

    path = rest if scheme == "local" and sep else url
    if not path:
        raise InvalidLocation(f"invalid location {url!r}: expected local:/path/to/repo")
    opts = _scheme_options("local", options)
    return LocalBackend(path, _int(opts, "connections", "local", DEFAULT_CONNECTIONS))


def _sftp(rest: str, opts: dict[str, str], url: str) -> Backend:
    from cairn.backends.sftp import DEFAULT_CONNECTIONS, SftpBackend, SftpOptions

    usage = "expected sftp:[user@]host:/path or sftp://[user@]host[:port]/path"
    port = None
    if rest.startswith("//"):
        parts = urlsplit("sftp:" + rest)
        try:
            port = parts.port
        except ValueError:
            raise InvalidLocation(f"invalid location {url!r}: bad port; {usage}") from None
        host, user, path = parts.hostname, parts.username, unquote(parts.path)
        # sftp://host/~/repo names a path in the home directory.
        path = path[3:] if path.startswith("/~/") else path
    else:
        m = _SCP.match(rest)
        if not m:
            raise InvalidLocation(f"invalid location {url!r}: {usage}")
        host, user, path = m["host"].strip("[]"), m["user"], m["path"]
    if not host or not path or path == "/":
        raise InvalidLocation(f"invalid location {url!r}: {usage}")
    identities = tuple(p for p in opts.get("identity", "").split(",") if p)
    config = tuple(p for p in opts.get("config", "").split(",") if p)
    options = SftpOptions(
        port=port,
        username=user,
        identities=identities,
        known_hosts=opts.get("known-hosts"),
        accept_new_host_key=bool(_bool(opts, "accept-new-host-key", "sftp")),
        config=config,
        connections=_int(opts, "connections", "sftp", DEFAULT_CONNECTIONS),
    )
    return SftpBackend(host, path, options)


def _s3(rest: str, opts: dict[str, str], url: str) -> Backend:
    from cairn.backends import s3

    usage = "expected s3:https://endpoint/bucket[/prefix] or s3:bucket[/prefix]"
    endpoint = None
    if rest.startswith(("http://", "https://")):
        parts = urlsplit(rest)
        if not parts.netloc:
            raise InvalidLocation(f"invalid location {url!r}: {usage}")
        endpoint = f"{parts.scheme}://{parts.netloc}"
        rest = parts.path
    bucket, _, prefix = rest.strip("/").partition("/")
    if not bucket or not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
        raise InvalidLocation(f"invalid location {url!r}: bad or missing bucket name; {usage}")
    path_style = _bool(opts, "path-style", "s3")
    if path_style is None and endpoint is not None:
        # S3-compatible servers rarely have the wildcard DNS virtual hosting needs.
        path_style = True
    options = s3.S3Options(
        endpoint=endpoint,
        region=opts.get("region"),
        profile=opts.get("profile"),
        path_style=path_style,
        storage_class=opts.get("storage-class"),
        multipart_threshold=_int(opts, "multipart-threshold", "s3", s3.MULTIPART_THRESHOLD),
        part_size=_int(opts, "part-size", "s3", s3.PART_SIZE),
        connections=_int(opts, "connections", "s3", s3.DEFAULT_CONNECTIONS),
        **_object_lock(opts),
    )
    if options.part_size < 5 * 1024 * 1024:
        raise InvalidLocation("option s3.part-size: S3 requires at least 5 MiB")
    return s3.S3Backend(bucket, prefix, options)


def _object_lock(opts: dict[str, str]) -> dict[str, Any]:
    """``s3.object-lock=governance|compliance`` with ``s3.retention-days=N``: both or neither."""
    mode = opts.get("object-lock", "").strip().upper()
    if mode not in ("", "GOVERNANCE", "COMPLIANCE"):
        raise InvalidLocation(
            f"option s3.object-lock: expected governance or compliance, got {opts['object-lock']!r}"
        )
    if bool(mode) != ("retention-days" in opts):
        raise InvalidLocation("options s3.object-lock and s3.retention-days go together")
    if not mode:
        return {}
    days = opts["retention-days"].strip()
    if not days.isdigit() or int(days) < 1:
        raise InvalidLocation(f"option s3.retention-days: expected whole days ≥ 1, got {days!r}")
    return {"object_lock": mode, "retention_days": int(days)}


def _rest(rest: str, opts: dict[str, str], url: str) -> Backend:
    from cairn.backends.rest import DEFAULT_CONNECTIONS, RestBackend

    try:
        return RestBackend.from_url(rest, _int(opts, "connections", "rest", DEFAULT_CONNECTIONS))
    except ValueError as exc:
        raise InvalidLocation(
            f"invalid location {url!r}: expected rest:http(s)://[user:pass@]host[:port]/path"
        ) from exc


def _rclone(rest: str, opts: dict[str, str], url: str) -> Backend:
    from cairn.backends.rclone import DEFAULT_ARGS, DEFAULT_CONNECTIONS, RcloneBackend

    if not rest:
        raise InvalidLocation(f"invalid location {url!r}: expected rclone:remote:path")
    args = tuple(opts["args"].split()) if "args" in opts else DEFAULT_ARGS
    return RcloneBackend(
        rest,
        program=opts.get("program", "rclone"),
        args=args,
        config=opts.get("config"),
        connections=_int(opts, "connections", "rclone", DEFAULT_CONNECTIONS),
    )
