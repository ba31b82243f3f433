"""The ``sftp:`` backend on asyncssh: one SSH connection, many pipelined SFTP requests.

Keys come from the SSH agent and ``~/.ssh`` (or ``identity`` files given), the host
key is checked against ``known_hosts`` (a new host is accepted only when asked
explicitly), and ``~/.ssh/config`` supplies HostName, Port, User and IdentityFile
for host aliases, as with ``ssh``. Saves go to a dot-named temporary file that is
renamed into place with the ``posix-rename`` extension, so they are atomic.
"""

from __future__ import annotations

import posixpath
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import asyncssh

from cairn.backends.base import (
    KINDS,
    BackendError,
    NotFound,
    ObjectTruncated,
    PermissionDenied,
    QuotaExceeded,
    TransientError,
    Unreachable,
    validate_name,
    validate_prefix,
)

# A module-level alias: inside the class, ``list`` names the method.
Entries = list[tuple[str, int]]
T = TypeVar("T")
# restic's default; requests are pipelined over one connection anyway.
DEFAULT_CONNECTIONS = 5
# TCP connect, SSH handshake and authentication together (asyncssh's default is
# none, leaving a blackholed host to the kernel's two-minute TCP timeout).
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class SftpOptions:
    """Connection settings; ``None`` means asyncssh's (and OpenSSH's) defaults."""

    port: int | None = None
    username: str | None = None
    identities: tuple[str, ...] = ()
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    config: tuple[str, ...] = ()
    connections: int = DEFAULT_CONNECTIONS
    extra: dict[str, Any] = field(default_factory=dict)


def _translate(exc: Exception, what: str) -> BackendError:
    """Map asyncssh and socket errors onto the backend hierarchy."""
    if isinstance(exc, asyncssh.SFTPNoSuchFile):
        return NotFound(f"{what}: not found")
    if isinstance(exc, asyncssh.SFTPPermissionDenied | asyncssh.PermissionDenied):
        return PermissionDenied(f"{what}: permission denied ({exc})")
    if isinstance(exc, asyncssh.SFTPNoSpaceOnFilesystem | asyncssh.SFTPQuotaExceeded):
        return QuotaExceeded(f"{what}: no space left ({exc})")
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return PermissionDenied(
            f"{what}: host key not verifiable ({exc}); check known_hosts, or pass "
            "-o sftp.accept-new-host-key=true to trust a host seen for the first time"
        )
    if isinstance(
        exc,
        asyncssh.ConnectionLost | asyncssh.SFTPConnectionLost | asyncssh.DisconnectError | OSError,
    ):
        return TransientError(f"{what}: {exc or type(exc).__name__}")
    if isinstance(exc, asyncssh.SFTPError):
        return BackendError(f"{what}: {exc.reason or exc}")
    return BackendError(f"{what}: {exc}")


class SftpBackend:
    """A repository in ``path`` on an SFTP server; connects on first use."""

    def __init__(self, host: str, path: str, options: SftpOptions | None = None) -> None:
        self._host = host
        self._root = path.rstrip("/") or "/"
        self._opts = options or SftpOptions()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = anyio.Lock()
        # Temporary files a dropped connection kept us from removing; retried on the
        # next connection so that interrupted uploads do not pile up on the server.
        self._orphans: set[str] = set()
        user = f"{self._opts.username}@" if self._opts.username else ""
        port = f":{self._opts.port}" if self._opts.port else ""
        self._location = f"sftp://{user}{host}{port}/{self._root.lstrip('/')}"

    @property
    def location(self) -> str:
        return self._location

    @property
    def connections(self) -> int:
        return self._opts.connections

    @property
    def atomic_replace(self) -> bool:
        return True

    def _path(self, name: str) -> str:
        return posixpath.join(self._root, validate_name(name))

    async def _client(self) -> asyncssh.SFTPClient:
        async with self._lock:
            if self._sftp is None:
                self._conn = await self._connect()
                self._sftp = await self._conn.start_sftp_client()
                await self._remove_orphans(self._sftp)
            return self._sftp

    async def _remove_orphans(self, sftp: asyncssh.SFTPClient) -> None:
        for tmp in list(self._orphans):
            try:
                await sftp.remove(tmp)
            except asyncssh.SFTPNoSuchFile:
                pass
            except (asyncssh.Error, OSError):
                continue
            self._orphans.discard(tmp)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        o = self._opts
        kw: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT, **o.extra}
        if o.port:
            kw["port"] = o.port
        if o.username:
            kw["username"] = o.username
        if o.identities:
            kw["client_keys"] = list(o.identities)
        if o.config:
            kw["config"] = list(o.config)
        if o.known_hosts:
            kw["known_hosts"] = o.known_hosts
        try:
            return await asyncssh.connect(self._host, **kw)
        except asyncssh.HostKeyNotVerifiable:
            if not o.accept_new_host_key or self._host_is_known():
                raise
        # Trust on first use, explicitly requested: connect without a check and
        # record the key, so that later connections verify against it.
        conn = await asyncssh.connect(self._host, **{**kw, "known_hosts": None})
        key = conn.get_server_host_key()
        if key is not None:
            self._remember_host_key(key)
        return conn

    def _known_hosts_file(self) -> Path:
        return Path(self._opts.known_hosts or Path.home() / ".ssh" / "known_hosts")

    def _host_is_known(self) -> bool:
        """Whether known_hosts lists any key for the host (then a mismatch is fatal)."""
        path = self._known_hosts_file()
        if not path.exists():
            return False
        port = self._opts.port or 22
        matches = asyncssh.read_known_hosts(str(path)).match(self._host, "", port)
        return any(matches[:3])

    def _remember_host_key(self, key: asyncssh.SSHKey) -> None:
        port = self._opts.port or 22
        host = self._host if port == 22 else f"[{self._host}]:{port}"
        path = self._known_hosts_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(host.encode() + b" " + key.export_public_key("openssh"))

    async def _call(self, what: str, op: Callable[[asyncssh.SFTPClient], Awaitable[T]]) -> T:
        try:
            sftp = await self._client()
        except (asyncssh.Error, OSError) as exc:
            error = _translate(exc, f"{self._location}: {what}")
            if isinstance(error, TransientError):
                # Refused, unknown host, timeout, or dropped before the session began.
                await self._drop()
                reason = str(exc) or type(exc).__name__
                raise Unreachable(f"{self._location}: {what}: cannot connect: {reason}") from exc
            raise error from exc
        try:
            return await op(sftp)
        except (asyncssh.Error, OSError) as exc:
            error = _translate(exc, f"{self._location}: {what}")
            if isinstance(error, TransientError):
                await self._drop()  # the next attempt reconnects
            raise error from exc

    async def save(self, name: str, data: bytes | memoryview) -> None:
        path = self._path(name)
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{secrets.token_hex(8)}")
        view = memoryview(data).cast("B")

        async def op(sftp: asyncssh.SFTPClient) -> None:
            try:
                f = await sftp.open(tmp, "wb")
            except asyncssh.SFTPNoSuchFile:
                # Directories are made lazily, as restic does: create_layout may
                # predate a new fan-out scheme, or the repository came from elsewhere.
                await sftp.makedirs(posixpath.dirname(path), exist_ok=True)
                f = await sftp.open(tmp, "wb")
            try:
                async with f:
                    await f.write(bytes(view))
                await sftp.posix_rename(tmp, path)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    try:
                        await sftp.remove(tmp)
                    except asyncssh.SFTPNoSuchFile:
                        pass
                    except (asyncssh.Error, OSError):
                        self._orphans.add(tmp)
                raise

        await self._call(f"save {name}", op)

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)

        async def op(sftp: asyncssh.SFTPClient) -> bytes:
            async with sftp.open(path, "rb") as f:
                data: bytes = await f.read(-1 if length is None else length, offset)
                return data

        data = await self._call(f"load {name}", op)
        if length is not None and len(data) != length:
            raise ObjectTruncated(
                f"{name}: asked for {length} bytes at offset {offset}, got {len(data)}"
            )
        return data

    async def stat(self, name: str) -> int:
        path = self._path(name)

        async def op(sftp: asyncssh.SFTPClient) -> int:
            return int((await sftp.stat(path)).size or 0)

        return await self._call(f"stat {name}", op)

    async def remove(self, name: str) -> None:
        path = self._path(name)
        await self._call(f"remove {name}", lambda sftp: sftp.remove(path))

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        validate_prefix(prefix)
        entries = await self._call(f"list {prefix}", lambda sftp: self._walk(sftp, prefix))
        for entry in entries:
            yield entry

    async def _walk(self, sftp: asyncssh.SFTPClient, prefix: str) -> Entries:
        out: Entries = []
        dirs = [prefix.rstrip("/")] if prefix else ["", *KINDS]
        while dirs:
            rel = dirs.pop()
            try:
                names = await sftp.readdir(posixpath.join(self._root, rel) if rel else self._root)
            except asyncssh.SFTPNoSuchFile:
                continue
            for entry in names:
                fname = str(entry.filename)
                if fname.startswith("."):
                    continue
                child = f"{rel}/{fname}" if rel else fname
                if entry.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                    if rel == "data":  # fan-out directories
                        dirs.append(child)
                elif rel or fname == "config":
                    out.append((child, int(entry.attrs.size or 0)))
        return out

    async def create_layout(self) -> None:
        async def mkdir(sftp: asyncssh.SFTPClient, rel: str) -> None:
            try:
                await sftp.mkdir(posixpath.join(self._root, rel))
            except asyncssh.SFTPFailure:  # OpenSSH's answer when it exists already
                pass

        async def op(sftp: asyncssh.SFTPClient) -> None:
            await sftp.makedirs(posixpath.join(self._root, "data"), exist_ok=True)
            # 260 directories: sent concurrently, they cost one round trip, not 260.
            async with anyio.create_task_group() as tg:
                for rel in ("keys", "snapshots", "index", "locks"):
                    tg.start_soon(mkdir, sftp, rel)
                for i in range(256):
                    tg.start_soon(mkdir, sftp, f"data/{i:02x}")

        await self._call("create layout", op)

    async def _drop(self) -> None:
        sftp, conn = self._sftp, self._conn
        self._sftp = self._conn = None
        if sftp is not None:
            sftp.exit()
        if conn is not None:
            conn.close()
            with anyio.move_on_after(5, shield=True):
                await conn.wait_closed()

    async def aclose(self) -> None:
        await self._drop()
