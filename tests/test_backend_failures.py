"""Failure behaviour against real servers: down, wrong credentials, dropped connections."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

pytest.register_assert_rewrite("tests.servers")

from cairn.backends.base import (  # noqa: E402
    BackendError,
    PermissionDenied,
    TransientError,
    object_name,
)
from cairn.backends.location import parse_location  # noqa: E402
from cairn.backends.retry import RetryBackend, RetryPolicy  # noqa: E402
from cairn.backends.wrap import wrap_backend  # noqa: E402
from tests import servers  # noqa: E402

pytest_plugins = ["tests.servers"]
NAME = object_name("data", "ab" * 32)


class NoSleep:
    """Records backoff waits instead of sleeping (no real time in tests)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await anyio.lowlevel.checkpoint()


def retries_in(events: list[MutableMapping[str, Any]]) -> int:
    return sum(1 for e in events if e["event"] == "backend.retry")


# --- a server that is down ----------------------------------------------------------


@pytest.mark.anyio
async def test_rest_server_down_fails_after_bounded_retries() -> None:
    port = servers.free_port()  # nothing listens there
    sleep = NoSleep()
    backend = RetryBackend(
        parse_location(f"rest:http://127.0.0.1:{port}/repo"), RetryPolicy(attempts=4), sleep=sleep
    )
    with pytest.raises(TransientError, match=r"after 4 attempts.*cannot connect") as info:
        await backend.load("config")
    assert "\n" not in str(info.value)
    assert len(sleep.waits) == 3
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sftp_server_down_fails_after_bounded_retries(
    sshd_server: servers.SshServer, anyio_backend: str
) -> None:
    port = servers.free_port()
    sleep = NoSleep()
    inner = parse_location(
        f"sftp://root@127.0.0.1:{port}/repo",
        {
            "sftp.identity": str(sshd_server.identity),
            "sftp.known-hosts": str(sshd_server.known_hosts),
        },
    )
    backend = RetryBackend(inner, RetryPolicy(attempts=3), sleep=sleep)
    with pytest.raises(TransientError, match="after 3 attempts"):
        await backend.stat("config")
    assert len(sleep.waits) == 2
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
