"""The aiohttp application: routing, authentication, access logs and metrics.

aiohttp's server streams both ways: an upload is read piece by piece as it arrives
(``request.content``) into the store's temporary file, and a download is sent with
``sendfile`` by ``FileResponse``, which also answers ``Range`` (206, or 416 past the
end). No object is ever held in memory whole.

Status codes follow rest-server, which restic 0.14 is written against: 200 on
success, 404 for what is not there, 403 for what append-only mode refuses (DELETE of
anything but a lock, overwriting an object), 400 for bad paths and bad uploads, 401
without valid credentials, 413 over a repository's quota, 507 when the disk is full.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import ClientError, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError

from cairn.serve.auth import Htpasswd
from cairn.serve.metrics import Metrics
from cairn.serve.paths import BadPath, Target, parse
from cairn.serve.store import BadUpload, Store, StoreError

log = structlog.get_logger("cairn.serve")
V1 = "application/vnd.x.restic.rest.v1"
V2 = "application/vnd.x.restic.rest.v2"
_OBJECT_METHODS = ("HEAD", "GET", "POST", "DELETE")
_INFO: web.AppKey[ServerInfo] = web.AppKey("info")


@dataclass(frozen=True)
class ServerInfo:
    store: Store
    htpasswd: Htpasswd | None
    private_repos: bool
    prometheus_no_auth: bool
    metrics: Metrics


def make_app(
    store: Store,
    htpasswd: Htpasswd | None = None,
    *,
    private_repos: bool = False,
    prometheus_no_auth: bool = False,
) -> web.Application:
    """The application serving every repository below ``store.root``."""
    app = web.Application(middlewares=[_access])
    app[_INFO] = ServerInfo(store, htpasswd, private_repos, prometheus_no_auth, Metrics())
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


def _text(status: int, message: str = "", headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message or f"{status}\n", headers=headers)


@web.middleware
async def _access(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Authenticate, run the handler, then log and count the request."""
    info = request.app[_INFO]
    started = time.monotonic()
    request["user"] = None
    request["received"] = 0
    request["target"] = None
    response: web.StreamResponse | None = None
    error = ""
    try:
        if info.htpasswd is not None and not (
            info.prometheus_no_auth and _path_of(request) == "/metrics"
        ):
            request["user"] = await info.htpasswd.check(request.headers.get("Authorization"))
            if request["user"] is None:
                response = _text(
                    401, "401 unauthorized\n", {"WWW-Authenticate": 'Basic realm="cairn"'}
                )
                return response
        response = await handler(request)
        return response
    except (ConnectionError, asyncio.CancelledError) as exc:
        error = f"connection lost: {type(exc).__name__}"
        raise
    except Exception as exc:
        # A disk error, a bug: the client gets a 500, the log gets the reason (and
        # the traceback with --debug), and the server keeps serving.
        error = f"{type(exc).__name__}: {exc}"
        log.debug("serve.request_failed", exc_info=True)
        response = _text(500, "500 internal server error\n")
        return response
    finally:
        _record(request, response, error, time.monotonic() - started)


def _record(
    request: web.Request, response: web.StreamResponse | None, error: str, seconds: float
) -> None:
    info = request.app[_INFO]
    target: Target | None = request["target"]
    status = response.status if response is not None else 499  # client went away
    sent = 0
    if response is not None and request.method == "GET" and status < 300:
        sent = response.content_length or 0
    repo = target.repo_label if target is not None else ""
    kind = (target.kind or "") if target is not None else ""
    info.metrics.request(repo, request.method, status, kind, sent, request["received"])
    fields = {
        "remote": request.remote,
        "user": request["user"],
        "method": request.method,
        "path": _path_of(request),
        "repo": repo,
        "status": status,
        "bytes_in": request["received"],
        "bytes_out": sent,
        "seconds": round(seconds, 4),
        "agent": request.headers.get("User-Agent", ""),
    }
    if error or request.get("error"):
        fields["error"] = error or request["error"]
    if status >= 500:
        log.error("serve.request", **fields)
    else:
        log.info("serve.request", **fields)


def _path_of(request: web.Request) -> str:
    # The request target exactly as sent: yarl would resolve "..", hiding it from us.
    return request.raw_path.split("?", 1)[0]


async def _dispatch(request: web.Request) -> web.StreamResponse:
    info = request.app[_INFO]
    raw = _path_of(request)
    if raw == "/metrics":
        if request.method not in ("GET", "HEAD"):
            return _text(405, headers={"Allow": "GET, HEAD"})
        return web.Response(
            text=info.metrics.render(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )
    try:
        target = parse(raw)
    except BadPath as exc:
        request["error"] = str(exc)
        return _text(400, f"{exc}\n")
    request["target"] = target
    if info.private_repos and (not target.repo or target.repo[0] != request["user"]):
        request["error"] = "private repositories: not this user's"
        return _text(403, "403 forbidden: not your repository\n")
    try:
        return await _handle(request, info.store, target)
    except StoreError as exc:
        request["error"] = str(exc)
        return _text(exc.status, f"{exc}\n")


async def _handle(request: web.Request, store: Store, target: Target) -> web.StreamResponse:
    method = request.method
    if target.kind is None:
        if method != "POST":
            return _text(405, headers={"Allow": "POST"})
        if request.query.get("create") != "true":
            return _text(400, "POST to a repository needs ?create=true\n")
        await store.create(target)
        log.info("serve.repository_created", repo=target.repo_label, user=request["user"])
        return web.Response()
    if target.is_listing:
        if method != "GET":
            return _text(405, headers={"Allow": "GET"})
        return await _listing(request, store, target)
    if method in ("HEAD", "GET"):
        await store.size(target)  # 404 before aiohttp's own answer
        response = _SentFile(store.file(target))
        # Sent here, not after the middleware: the access log then has its bytes.
        await response.prepare(request)
        await response.write_eof()
        return response
    if method == "POST":
        request["received"] = await store.save(target, _body(request), request.content_length)
        return web.Response()
    if method == "DELETE":
        await store.delete(target)
        return web.Response()
    return _text(405, headers={"Allow": ", ".join(_OBJECT_METHODS)})


class _SentFile(web.FileResponse):
    """A FileResponse sent inside the handler; aiohttp's second ``prepare`` is a no-op."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)


async def _listing(request: web.Request, store: Store, target: Target) -> web.Response:
    entries = await store.listing(target)
    if request.headers.get("Accept") == V2:
        body = [{"name": name, "size": size} for name, size in entries]
        return web.Response(body=json.dumps(body).encode(), headers={"Content-Type": V2})
    names = [name for name, _size in entries]
    return web.Response(body=json.dumps(names).encode(), headers={"Content-Type": V1})


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a connection lost mid-way is a bad upload."""
    try:
        async for piece in request.content.iter_any():
            yield piece
    except (HttpProcessingError, ConnectionError, ClientError, asyncio.IncompleteReadError) as exc:
        raise BadUpload(f"upload interrupted: {type(exc).__name__}: {exc}") from exc
