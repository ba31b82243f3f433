"""Failure behaviour against real servers: down, wrong credentials, dropped connections."""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import signal
import subprocess
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

pytest.register_assert_rewrite("tests.servers")

from cairn.backends.base import (  # noqa: E402
    Backend,
    BackendError,
    NotFound,
    PermissionDenied,
    ServerUnavailable,
    TransientError,
    Unreachable,
    object_name,
)
from cairn.backends.location import parse_location  # noqa: E402
from cairn.backends.retry import RetryBackend, RetryPolicy  # noqa: E402
from cairn.backends.wrap import wrap_backend  # noqa: E402
from tests import servers  # noqa: E402
from tests.cli_helpers import Cairn  # noqa: E402

pytest_plugins = ["tests.servers"]
NAME = object_name("data", "ab" * 32)


def retries_in(events: list[MutableMapping[str, Any]]) -> int:
    return sum(1 for e in events if e["event"] == "backend.retry")


# --- a server that never answered fails fast ------------------------------------------


def attempts_in(events: list[MutableMapping[str, Any]], op: str) -> int:
    """Calls that reached the backend: the logging wrapper logs each one."""
    return sum(1 for e in events if e["event"] in (f"backend.{op}", f"backend.{op}.failed"))


async def _fails_fast(url: str, options: dict[str, str] | None = None) -> Unreachable:
    """Open ``url`` through the standard wrapper stack; its first call must fail at
    once with one line naming the location and the cause."""
    backend = wrap_backend(parse_location(url, options))
    try:
        with (
            anyio.fail_after(30),  # a hang guard only, far above the 10 s promise
            structlog.testing.capture_logs() as events,
            pytest.raises(Unreachable) as info,
        ):
            await backend.load("config")
    finally:
        await backend.aclose()
    assert attempts_in(events, "load") == 1
    assert retries_in(events) == 0
    message = str(info.value)
    assert "\n" not in message and "cannot connect" in message
    assert message.startswith(backend.location)
    return info.value


@pytest.mark.anyio
async def test_rest_closed_port_fails_fast() -> None:
    await _fails_fast(f"rest:http://127.0.0.1:{servers.free_port()}/repo")


@pytest.mark.anyio
async def test_rest_unknown_host_fails_fast() -> None:
    error = await _fails_fast("rest:http://cairn-test.invalid/repo")  # .invalid never resolves
    assert "cairn-test.invalid" in str(error)


@pytest.mark.anyio
async def test_rest_tls_failure_fails_fast(rest_server: servers.RestServer) -> None:
    # TLS spoken to a plain-HTTP server: the handshake fails.
    await _fails_fast(f"rest:https://127.0.0.1:{rest_server.port}/repo")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_closed_port_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, anyio_backend: str
) -> None:
    for key, value in _s3_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    port = servers.free_port()
    await _fails_fast(f"s3:http://127.0.0.1:{port}/bucket/x", {"s3.region": "us-east-1"})


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_tls_failure_fails_fast(
    moto_server: servers.S3Server,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    anyio_backend: str,
) -> None:
    for key, value in _s3_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    # TLS spoken to a plain-HTTP S3 server: the handshake fails.
    await _fails_fast(
        f"s3:https://127.0.0.1:{moto_server.port}/bucket/x", {"s3.region": "us-east-1"}
    )


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sftp_closed_port_fails_fast(
    sshd_server: servers.SshServer, tmp_path: Path, anyio_backend: str
) -> None:
    (tmp_path / "ssh_config").touch()
    await _fails_fast(
        f"sftp://root@127.0.0.1:{servers.free_port()}/repo",
        {
            "sftp.identity": str(sshd_server.identity),
            "sftp.known-hosts": str(sshd_server.known_hosts),
            "sftp.config": str(tmp_path / "ssh_config"),
        },
    )


class FakeClock:
    """Time that passes only in the recorded backoff waits (no real time in tests)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


@pytest.mark.anyio
async def test_retry_max_time_waits_for_a_server_that_is_down() -> None:
    """--retry-max-time asks to wait for the server: even the first contact is
    retried, for that long and no longer."""
    clock = FakeClock()
    backend = RetryBackend(
        parse_location(f"rest:http://127.0.0.1:{servers.free_port()}/repo"),
        RetryPolicy(max_time=10, jitter=0),
        sleep=clock.sleep,
        clock=clock,
    )
    with (
        structlog.testing.capture_logs() as events,
        pytest.raises(Unreachable, match=r"cannot connect.*gave up after 5 attempts"),
    ):
        await backend.load("config")
    assert clock.waits == [0.5, 1, 2, 4]  # + 8 would end past 10 s
    retries = [e for e in events if e["event"] == "backend.retry"]
    assert [(e["attempt"], e["of"]) for e in retries] == [(1, 5), (2, 5), (3, 5), (4, 5)]
    await backend.aclose()


# --- wrong credentials fail at once -------------------------------------------------


@pytest.mark.anyio
async def test_rest_wrong_password_fails_at_once(rest_server: servers.RestServer) -> None:
    url = f"rest:http://cairn:wrong@127.0.0.1:{rest_server.port}/repo"
    backend = wrap_backend(parse_location(url))
    with structlog.testing.capture_logs() as events, pytest.raises(PermissionDenied):
        await backend.stat("config")
    assert retries_in(events) == 0
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_wrong_credentials_fail_at_once(
    s3_server: servers.S3Server,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    anyio_backend: str,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", servers.S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    backend = wrap_backend(
        parse_location(f"s3:{s3_server.endpoint}/{servers.S3_BUCKET}/x", {"s3.region": "us-east-1"})
    )
    with structlog.testing.capture_logs() as events, pytest.raises(PermissionDenied):
        await backend.save(NAME, b"data")
    assert retries_in(events) == 0
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_profile_from_shared_credentials_file(
    s3_server: servers.S3Server,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    anyio_backend: str,
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[cairn]\naws_access_key_id = {servers.S3_KEY}\n"
        f"aws_secret_access_key = {servers.S3_SECRET}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    backend = parse_location(
        f"s3:{s3_server.endpoint}/{servers.S3_BUCKET}/profile",
        {"s3.region": "us-east-1", "s3.profile": "cairn"},
    )
    await backend.create_layout()
    await backend.save(NAME, b"via profile")
    assert await backend.load(NAME) == b"via profile"
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_plain_http_endpoint_loads_no_ca_bundle(
    s3_server: servers.S3Server,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    anyio_backend: str,
) -> None:
    """An http:// endpoint has no TLS to verify: a CA bundle setting, here one that
    does not exist, is not even read (parsing the default one cost every command
    ~30 ms before its first request)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", servers.S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", servers.S3_SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "no-such-bundle.pem"))
    assert s3_server.endpoint.startswith("http://")
    backend = parse_location(
        f"s3:{s3_server.endpoint}/{servers.S3_BUCKET}/plain", {"s3.region": "us-east-1"}
    )
    await backend.save(NAME, b"plain http")
    assert await backend.load(NAME) == b"plain http"
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_multipart_upload(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> None:
    url, options = servers.location_for("s3", request, tmp_path)
    options |= {"s3.multipart-threshold": "5M", "s3.part-size": "5M"}
    backend = parse_location(url, options)
    await backend.create_layout()
    data = os.urandom(12 * 1024 * 1024)  # three parts: 5 + 5 + 2 MiB
    await backend.save(NAME, data)
    assert await backend.stat(NAME) == len(data)
    assert await backend.load(NAME, 5 * 1024 * 1024 - 10, 20) == data[5 * 1024 * 1024 - 10 :][:20]
    assert await backend.load(NAME) == data
    await backend.aclose()


# --- S3: checksums every S3 implementation accepts ------------------------------------


async def _s3_recording(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[Backend, list[Any]]:
    """A fresh S3 backend whose client reports every request it sends (the real
    requests, observed through botocore's event hooks, not replaced)."""
    url, options = servers.location_for(kind, request, tmp_path)
    backend = parse_location(url, options)
    await backend.create_layout()
    client = await backend._s3()  # type: ignore[attr-defined]
    sent: list[Any] = []
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request))
    return backend, sent


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["s3", "s3-moto"])
async def test_s3_checksums_only_where_required(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> None:
    """No CRC trailers on uploads and no checksum mode on (ranged) downloads, which
    S3-compatible servers get wrong; uploads carry Content-MD5 instead."""
    backend, sent = await _s3_recording(kind, request, tmp_path)
    data = os.urandom(100_000)
    await backend.save(NAME, data)
    assert await backend.load(NAME, 10, 50) == data[10:60]
    assert await backend.load(NAME) == data
    put, ranged, whole = sent
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    assert put.method == "PUT" and put.headers["Content-MD5"] == md5.encode()
    for req in (put, ranged, whole):
        names = {k.lower() for k in req.headers}
        assert not any(n.startswith("x-amz-checksum") for n in names), req.headers
        assert "x-amz-sdk-checksum-algorithm" not in names
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_uploads_do_not_wait_for_100_continue(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> None:
    """No ``Expect: 100-continue`` on a PUT or an uploaded part: with it the client waits
    a round trip for the server's interim answer before sending each body."""
    url, options = servers.location_for("s3", request, tmp_path)
    options |= {"s3.multipart-threshold": "5M", "s3.part-size": "5M"}
    backend = parse_location(url, options)
    await backend.create_layout()
    client = await backend._s3()  # type: ignore[attr-defined]
    sent: list[Any] = []
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request))
    small, large = os.urandom(100_000), os.urandom(6 * 1024 * 1024)  # one PUT; two parts
    await backend.save(NAME, small)
    await backend.save("data/00/" + "0" * 64, large)
    uploads = [r for r in sent if r.method == "PUT"]
    assert len(uploads) == 3, [(r.method, r.url) for r in sent]
    for req in uploads:
        assert "expect" not in {k.lower() for k in req.headers}, req.headers
    assert await backend.load(NAME) == small
    assert await backend.load("data/00/" + "0" * 64) == large
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_uploads_are_not_hashed_twice(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> None:
    """Every PUT carries the Content-MD5 the server checks (signed with the other
    headers) and no SHA-256 of the body, which botocore computes on the event loop
    for plain-http endpoints unless told not to."""
    url, options = servers.location_for("s3", request, tmp_path)
    options |= {"s3.multipart-threshold": "5M", "s3.part-size": "5M"}
    backend = parse_location(url, options)
    await backend.create_layout()
    client = await backend._s3()  # type: ignore[attr-defined]
    sent: list[Any] = []
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request))
    small, large = os.urandom(100_000), os.urandom(6 * 1024 * 1024)  # one PUT; two parts
    await backend.save(NAME, small)
    await backend.save("data/00/" + "0" * 64, large)
    uploads = [r for r in sent if r.method == "PUT"]
    assert len(uploads) == 3
    for req in uploads:
        headers = {k.lower(): v for k, v in req.headers.items()}
        assert headers["x-amz-content-sha256"] in (b"UNSIGNED-PAYLOAD", "UNSIGNED-PAYLOAD")
        assert "content-md5" in headers
        signed = str(headers["authorization"]).split("SignedHeaders=")[1].split(",")[0]
        assert "content-md5" in signed.split(";")
    assert await backend.load(NAME) == small
    assert await backend.load("data/00/" + "0" * 64) == large
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_s3_body_damaged_in_transit_is_refused_and_resent(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> None:
    """A body altered after it was hashed (as a bad proxy or NIC would) is refused
    for its Content-MD5, and the retry wrapper sends it again. SeaweedFS only: moto
    does not check Content-MD5 (AWS, MinIO, Ceph and SeaweedFS do)."""
    backend, _sent = await _s3_recording("s3", request, tmp_path)
    client = await backend._s3()  # type: ignore[attr-defined]
    damaged: list[bytes] = []

    def damage(request: Any, **_: Any) -> None:
        if request.method == "PUT" and not damaged:
            body = request.body  # a BytesIO, rewound before each send
            body.seek(1000)
            flipped = bytes([body.read(1)[0] ^ 0xFF])
            body.seek(1000)
            body.write(flipped)
            body.seek(0)
            damaged.append(flipped)

    client.meta.events.register("before-send.s3", damage)
    data = os.urandom(100_000)
    with pytest.raises(TransientError, match="BadDigest"):
        await backend.save(NAME, data)
    with pytest.raises(NotFound):
        await backend.stat(NAME)  # nothing damaged was stored
    damaged.clear()
    retrying = RetryBackend(backend, RetryPolicy(base_delay=0.01))
    await retrying.save(NAME, data)
    assert await backend.load(NAME) == data
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sftp_wrong_key_and_unknown_host(
    sshd_server: servers.SshServer, tmp_path: Path, anyio_backend: str
) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)  # noqa: ASYNC221
    (tmp_path / "ssh_config").touch()
    url = f"sftp://root@127.0.0.1:{sshd_server.port}{sshd_server.root}/x"
    common = {"sftp.config": str(tmp_path / "ssh_config")}
    wrong_key = wrap_backend(
        parse_location(
            url,
            common
            | {"sftp.identity": str(stranger), "sftp.known-hosts": str(sshd_server.known_hosts)},
        )
    )
    with structlog.testing.capture_logs() as events, pytest.raises(PermissionDenied):
        await wrong_key.stat("config")
    assert retries_in(events) == 0
    await wrong_key.aclose()

    # An unknown host is refused, with a hint; accepted only when asked explicitly.
    known = tmp_path / "known_hosts"
    known.write_text("")
    opts = common | {"sftp.identity": str(sshd_server.identity), "sftp.known-hosts": str(known)}
    refused = parse_location(url, opts)
    with pytest.raises(PermissionDenied, match="accept-new-host-key"):
        await refused.stat("config")
    await refused.aclose()
    trusting = parse_location(url, opts | {"sftp.accept-new-host-key": "true"})
    await trusting.create_layout()
    await trusting.aclose()
    assert f"[127.0.0.1]:{sshd_server.port} ssh-ed25519" in known.read_text()
    again = parse_location(url, opts)  # now verified against the recorded key
    await again.create_layout()
    await again.aclose()


@pytest.mark.anyio
async def test_rclone_bad_remote_says_why(
    rclone_remote: servers.RcloneRemote,
) -> None:
    backend = wrap_backend(
        parse_location("rclone:no-such-remote:repo", {"rclone.config": str(rclone_remote.config)})
    )
    with structlog.testing.capture_logs() as events, pytest.raises(BackendError) as info:
        await backend.stat("config")
    assert not isinstance(info.value, TransientError)
    assert "rclone exited" in str(info.value) and "no-such-remote" in str(info.value)
    assert retries_in(events) == 0
    await backend.aclose()


# --- a connection dropped mid-upload ---------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sftp_connection_killed_mid_upload_is_retried(
    sshd_server: servers.SshServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    anyio_backend: str,
) -> None:
    """Kill the server side of our SSH session while a save is streaming; the retry
    wrapper reconnects and the save completes, with no temporary file left over."""
    url, options = servers.location_for("sftp", request, tmp_path)
    inner = parse_location(url, options)
    await inner.create_layout()
    backend = wrap_backend(inner, retries=RetryPolicy(attempts=5, base_delay=0.01))
    repo = sshd_server.root / url.rsplit("/", 1)[1]
    data = os.urandom(64 * 1024 * 1024)
    killed = False

    async def kill_when_uploading() -> None:
        nonlocal killed
        fan_out = repo / "data" / NAME.split("/")[1]
        with anyio.fail_after(30):
            # Polling the server's disk: there is no event to wait for.
            while not any(p.stat().st_size > 0 for p in fan_out.glob(".tmp-*")):  # noqa: ASYNC110
                await anyio.sleep(0.005)
        # The per-connection sshd processes are the children of the listener.
        children = subprocess.run(  # noqa: ASYNC221 (must happen mid-upload, it is quick)
            ["pgrep", "-P", str(sshd_server.process.pid)], capture_output=True, text=True
        ).stdout.split()
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        killed = bool(children)

    with structlog.testing.capture_logs() as events:
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_when_uploading)
            await backend.save(NAME, data)
    assert killed
    assert retries_in(events) >= 1
    assert await backend.load(NAME) == data
    assert list((repo / "data" / "ab").glob(".tmp-*")) == []
    await backend.aclose()


# --- the same through the command line: one line, an exit code --------------------------


def _cli(repo: str, tmp_path: Path, env: dict[str, str] | None = None) -> Cairn:
    password = tmp_path / "password"
    password.write_text("pw\n")
    return Cairn(repo, password, extra_env=env)


def _s3_env(tmp_path: Path, secret: str = servers.S3_SECRET) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": servers.S3_KEY,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }


def test_cli_server_down_fails_fast_in_one_line(tmp_path: Path) -> None:
    port = servers.free_port()
    result = _cli(f"rest:http://cairn:secret@127.0.0.1:{port}/repo", tmp_path).run(
        "snapshots", timeout=30
    )
    assert result.code == 1
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"cairn: rest:http://cairn@127.0.0.1:{port}/repo/: ")
    assert "cannot connect" in lines[0] and "secret" not in lines[0]


class _BadGateway(http.server.BaseHTTPRequestHandler):
    """A reverse proxy whose server is down: 502 to everything, at once."""

    def _answer(self) -> None:
        body = b"<html><body><h1>502 Bad Gateway</h1>\n</body></html>\n"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_cli_gateway_error_before_first_contact_fails_fast(tmp_path: Path) -> None:
    """502 from a proxy before any answer from the server is "not reached": one line
    naming the location and the status, not ~3 minutes of retries."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        result = _cli(f"rest:http://127.0.0.1:{port}/", tmp_path).run("snapshots", timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert result.code == 1
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"cairn: rest:http://127.0.0.1:{port}/: ")
    assert "HTTP 502 Bad Gateway" in lines[0]
    assert "gave up" not in lines[0] and "backend.retry" not in result.err


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("scheme", ["rest", "s3"])
async def test_gateway_error_before_first_contact_is_not_retried(
    scheme: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, anyio_backend: str
) -> None:
    for key, value in _s3_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    if scheme == "rest":
        backend = wrap_backend(parse_location(f"rest:http://127.0.0.1:{port}/repo"))
    else:
        url = f"s3:http://127.0.0.1:{port}/bucket/x"
        backend = wrap_backend(parse_location(url, {"s3.region": "us-east-1"}))
    try:
        with (
            anyio.fail_after(30),  # a hang guard only
            structlog.testing.capture_logs() as events,
            pytest.raises(ServerUnavailable) as info,
        ):
            await backend.load("config")
    finally:
        await backend.aclose()
        server.shutdown()
        server.server_close()
    assert attempts_in(events, "load") == 1 and retries_in(events) == 0
    message = str(info.value)
    assert message.startswith(backend.location) and "HTTP 502" in message
    assert "\n" not in message


def test_cli_retry_max_time_logs_attempts(tmp_path: Path) -> None:
    port = servers.free_port()
    result = _cli(f"rest:http://127.0.0.1:{port}/repo", tmp_path).run(
        "--retry-max-time", "3s", "snapshots", timeout=30
    )
    assert result.code == 1
    *lines, last = result.err.splitlines()
    assert all("backend.retry" in line for line in lines), result.err
    # Opening asks for config and the key list at once: each is retried on its own.
    # Waits of 0.5 s and 1 s (at most: jitter cuts them) fit in 3 s; 2 s more would not.
    retries = [line for line in lines if "name=config " in line]
    assert len(retries) == 2, result.err
    for n, line in enumerate(retries, start=1):
        assert f"attempt={n}" in line and "of=3" in line and "delay=" in line
    assert last.startswith("cairn: ") and "gave up after 3 attempts" in last


def test_cli_bad_retry_max_time_is_a_usage_error(tmp_path: Path) -> None:
    result = _cli("rest:http://127.0.0.1:9/repo", tmp_path).run(
        "--retry-max-time", "soon", "snapshots", timeout=30
    )
    assert result.code == 1
    assert "invalid duration 'soon'" in result.err


@pytest.mark.parametrize("kind", ["s3", "s3-moto"])
def test_cli_s3_no_such_bucket(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url, options = servers.location_for(kind, request, tmp_path)
    endpoint = url.removeprefix("s3:").split("/", 3)[:3]
    repo = "s3:" + "/".join(endpoint) + "/no-such-bucket/repo"
    cli = Cairn(
        repo,
        _cli(repo, tmp_path).password_file,
        extra_env=_s3_env(tmp_path),
        global_args=tuple(f"-o{k}={v}" for k, v in options.items()),
    )
    result = cli.run("snapshots", timeout=30)
    assert result.code == 10
    assert len(result.err.splitlines()) == 1, result.err
    assert "no-such-bucket" in result.err


def test_cli_s3_wrong_credentials(s3_server: servers.S3Server, tmp_path: Path) -> None:
    repo = f"s3:{s3_server.endpoint}/{servers.S3_BUCKET}/creds"
    cli = _cli(repo, tmp_path, _s3_env(tmp_path, secret="wrong"))
    result = cli.run("-o", "s3.region=us-east-1", "snapshots", timeout=30)
    assert result.code == 1
    assert len(result.err.splitlines()) == 1, result.err
    assert "access denied" in result.err and servers.S3_BUCKET in result.err


def test_cli_rclone_bad_remote(rclone_remote: servers.RcloneRemote, tmp_path: Path) -> None:
    cli = _cli("rclone:no-such-remote:repo", tmp_path)
    result = cli.run("-o", f"rclone.config={rclone_remote.config}", "snapshots", timeout=30)
    assert result.code == 1
    assert len(result.err.splitlines()) == 1, result.err
    assert "rclone exited" in result.err and "no-such-remote" in result.err
