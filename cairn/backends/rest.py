"""The restic REST protocol client (``rest:`` locations), API v2 with v1 fallback.

Servers: restic's ``rest-server`` and ``rclone serve restic`` (also over stdio, see
``rclone.py``). Our names map onto the protocol's paths: ``config`` is ``/config``,
``<kind>/<id>`` is ``/<kind>/<id>``, and ``data/<xx>/<id>`` is ``/data/<id>`` — the
protocol has no fan-out directories; the server adds its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from cairn.backends.base import (
    KINDS,
    BackendError,
    InvalidName,
    NotFound,
    ObjectTruncated,
    PermissionDenied,
    QuotaExceeded,
    ServerUnavailable,
    TransientError,
    Unreachable,
    validate_name,
    validate_prefix,
)
from cairn.backends.throttle import UPLOAD_PACER, paced_pieces

# A module-level alias: inside the class, ``list`` names the method.
Entries = list[tuple[str, int]]

# restic's default for REST; the server handles each request on its own goroutine.
DEFAULT_CONNECTIONS = 5
V2 = "application/vnd.x.restic.rest.v2"
# Generous: a 16 MiB pack over a throttled link takes a while. Connecting (TCP and
# TLS) takes well under a second on any working network; 10 s bounds how long a
# blackholed address keeps a first contact waiting (see retry.py on failing fast).
TIMEOUT = httpx.Timeout(300.0, connect=10.0)
# Bad Gateway, Service Unavailable, Gateway Timeout: the service behind the address
# is not there (yet); see ServerUnavailable.
GATEWAY_STATUSES = (502, 503, 504)


def _path(name: str) -> str:
    """The protocol path of one of our object names."""
    validate_name(name)
    if name.startswith("data/"):
        return "data/" + name.rsplit("/", 1)[1]
    return name


def _status_error(status: int, what: str, text: str = "") -> BackendError:
    """Map an HTTP status onto the backend error hierarchy."""
    detail = f"{what}: HTTP {status}" + (f" ({text.strip()[:200]})" if text.strip() else "")
    if status == 404:
        return NotFound(f"{what}: not found")
    if status == 401:
        return PermissionDenied(f"{detail}: access denied (check user and password)")
    if status == 403:
        # rest-server and cairn serve answer 403 to what --append-only forbids.
        return PermissionDenied(f"{detail}: refused by the server (is it append-only?)")
    if status in (413, 507):
        return QuotaExceeded(f"{detail}: storage full or quota exceeded")
    if status == 416:
        return ObjectTruncated(f"{what}: requested range is past the end of the object")
    if status in (408, 429) or status >= 500:
        return TransientError(detail)
    return BackendError(detail)


class RestBackend:
    """Speaks the REST protocol through an ``httpx.AsyncClient`` whose base is the repo."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        location: str,
        connections: int = DEFAULT_CONNECTIONS,
    ) -> None:
        self._client = client
        self._location = location
        self._connections = connections

    @classmethod
    def from_url(cls, url: str, connections: int = DEFAULT_CONNECTIONS) -> RestBackend:
        """Open ``http(s)://[user:pass@]host[:port]/path``; credentials become basic auth."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"rest: expected http(s)://host[:port]/path, got {url!r}")
        auth = None
        if parts.username is not None:
            auth = httpx.BasicAuth(parts.username, parts.password or "")
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # IPv6 literal
            netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/", "", ""))
        limits = httpx.Limits(
            max_connections=connections * 2, max_keepalive_connections=connections
        )
        client = httpx.AsyncClient(base_url=base, auth=auth, timeout=TIMEOUT, limits=limits)
        # The location shown to users never contains the password.
        shown = base if parts.username is None else base.replace("://", f"://{parts.username}@", 1)
        return cls(client, f"rest:{shown}", connections)

    @property
    def location(self) -> str:
        return self._location

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def atomic_replace(self) -> bool:
        # rest-server refuses to overwrite objects; don't rely on replacing.
        return False

    @property
    def paces_uploads(self) -> bool:
        # Bodies are streamed from an async generator when an upload limit applies.
        return True

    async def _request(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, quote(path), **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Unreachable(f"{self._location}: {what}: {_describe(exc)}") from exc
        except httpx.TransportError as exc:
            raise TransientError(f"{self._location}: {what}: {_describe(exc)}") from exc
        status = response.status_code
        if status in GATEWAY_STATUSES:
            # Most often a reverse proxy whose server is down: its body is its own
            # HTML page, not worth a line. Named with the location: before any other
            # answer, this is the error the user sees (retry.py, failing fast).
            raise ServerUnavailable(
                f"{self._location}: {what}: HTTP {status} {response.reason_phrase}: "
                "the server (or the proxy in front of it) is unavailable"
            )
        if status >= 300:
            raise _status_error(status, what, response.text)
        return response

    async def save(self, name: str, data: bytes | memoryview) -> None:
        pacer = UPLOAD_PACER.get()
        if pacer is not None:
            # --limit-upload: each piece goes out once the token bucket admits it.
            size = memoryview(data).nbytes
            await self._request(
                "POST",
                _path(name),
                name,
                content=paced_pieces(data, pacer),
                headers={"Content-Length": str(size)},
            )
            return
        body = bytes(data)  # httpx wants bytes; the copy is cheap next to the upload
        await self._request("POST", _path(name), name, content=body)

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        headers = {}
        if length == 0:
            if await self.stat(name) < offset:
                raise ObjectTruncated(f"{name}: offset {offset} is past the end")
            return b""
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        response = await self._request("GET", _path(name), name, headers=headers)
        data = response.content
        if response.status_code == 200 and headers:
            # The server ignored the range and sent the whole object.
            data = data[offset:] if length is None else data[offset : offset + length]
        if length is not None and len(data) != length:
            raise ObjectTruncated(
                f"{name}: asked for {length} bytes at offset {offset}, got {len(data)}"
            )
        return data

    async def stat(self, name: str) -> int:
        response = await self._request("HEAD", _path(name), name)
        try:
            return int(response.headers["Content-Length"])
        except (KeyError, ValueError) as exc:
            raise BackendError(f"{name}: server sent no usable Content-Length") from exc

    async def remove(self, name: str) -> None:
        await self._request("DELETE", _path(name), name)

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        validate_prefix(prefix)
        if prefix == "":
            try:
                yield "config", await self.stat("config")
            except NotFound:
                pass
            kinds: tuple[str, ...] = KINDS
        else:
            kinds = (prefix.split("/", 1)[0],)
        for kind in kinds:
            for name, size in await self._list_kind(kind):
                full = f"data/{name[:2]}/{name}" if kind == "data" else f"{kind}/{name}"
                if full.startswith(prefix):
                    yield full, size

    async def _list_kind(self, kind: str) -> Entries:
        try:
            response = await self._request("GET", f"{kind}/", f"{kind}/", headers={"Accept": V2})
        except NotFound:
            return []
        try:
            entries = response.json()
            if response.headers.get("Content-Type", "").startswith(V2):
                return [(str(e["name"]), int(e["size"])) for e in entries]
            # API v1: names only, sizes cost one HEAD each (restic does the same).
            out = []
            for raw in entries:
                name = str(raw)
                if kind == "data":
                    size = await self.stat(f"data/{name[:2]}/{name}")
                else:
                    size = await self.stat(f"{kind}/{name}")
                out.append((name, size))
            return out
        except InvalidName:
            raise BackendError(f"{self._location}: server listed an invalid name") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"{self._location}: malformed listing of {kind}/") from exc

    async def create_layout(self) -> None:
        await self._request("POST", "", "create repository", params={"create": "true"})

    async def aclose(self) -> None:
        await self._client.aclose()


def _describe(exc: httpx.TransportError) -> str:
    """A one-line reason for a transport failure (httpx messages can be empty)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return f"cannot connect: timed out after {TIMEOUT.connect:.0f} s"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {text}"
    return text
