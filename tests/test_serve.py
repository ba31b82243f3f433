"""``cairn serve`` against real clients: Debian's restic 0.14 and cairn's own ``rest:``.

restic runs init, backup, snapshots, restore, check --read-data and forget --prune
in normal mode; in --append-only mode forget --prune fails and every snapshot and pack
stays there and restorable. The protocol details (authentication, private
repositories, bad paths, verification, killed uploads, quota, metrics) are checked
with plain HTTP requests (``http.client`` sends paths exactly as written: ``..``
reaches the server). The conformance suite runs against it too (kind ``serve`` in
test_backend_conformance.py).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import blake3
import pytest

pytest.register_assert_rewrite("tests.servers")

from tests.cli_helpers import Cairn  # noqa: E402
from tests.servers import CairnServe, cairn_serve, find_binary, make_htpasswd  # noqa: E402

USERS = {"alice": "alice-secret", "bob": "bob-secret"}
V2 = "application/vnd.x.restic.rest.v2"


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("htpasswd") / "htpasswd"
    make_htpasswd(path, USERS)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, htpasswd: Path) -> Iterator[CairnServe]:
    """Normal mode, authenticated, private repositories, uploads verified."""
    base = tmp_path_factory.mktemp("serve-normal")
    with cairn_serve(base, "--htpasswd-file", str(htpasswd), "--private-repos") as s:
        yield s


@pytest.fixture(scope="module")
def append_only(tmp_path_factory: pytest.TempPathFactory, htpasswd: Path) -> Iterator[CairnServe]:
    base = tmp_path_factory.mktemp("serve-append")
    with cairn_serve(base, "--htpasswd-file", str(htpasswd), "--append-only") as s:
        yield s


# --- plain HTTP ------------------------------------------------------------------


def request(
    server: CairnServe,
    method: str,
    path: str,
    body: bytes | None = None,
    user: str | None = "alice",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request with ``path`` sent exactly as given; (status, body)."""
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    sent = dict(headers or {})
    if user is not None:
        token = base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()
        sent["Authorization"] = f"Basic {token}"
    try:
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def create(server: CairnServe, repo: str, user: str = "alice") -> None:
    assert request(server, "POST", f"{repo}/?create=true", b"", user=user)[0] == 200


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_on_disk(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_wrong_or_missing_credentials_are_401(server: CairnServe) -> None:
    create(server, "/alice/creds")
    assert request(server, "GET", "/alice/creds/keys/", user=None)[0] == 401
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    bad = base64.b64encode(b"alice:not-her-password").decode()
    conn.request("GET", "/alice/creds/keys/", headers={"Authorization": f"Basic {bad}"})
    response = conn.getresponse()
    assert response.status == 401
    assert response.getheader("WWW-Authenticate", "").startswith("Basic")
    conn.close()
    assert request(server, "GET", "/alice/creds/keys/")[0] == 200


def test_private_repositories(server: CairnServe) -> None:
    create(server, "/bob/secret", user="bob")
    data = b"bob's snapshot"
    assert request(server, "POST", f"/bob/secret/snapshots/{sha(data)}", data, user="bob")[0] == 200
    for method, path in [
        ("GET", "/bob/secret/snapshots/"),
        ("GET", f"/bob/secret/snapshots/{sha(data)}"),
        ("HEAD", f"/bob/secret/snapshots/{sha(data)}"),
        ("DELETE", f"/bob/secret/snapshots/{sha(data)}"),
        ("POST", "/bob/other/?create=true"),
        ("GET", "/keys/"),  # the root repository belongs to nobody
    ]:
        assert request(server, method, path, b"" if method == "POST" else None)[0] == 403, path
    assert request(server, "GET", f"/bob/secret/snapshots/{sha(data)}", user="bob") == (200, data)


@pytest.mark.parametrize(
    "path",
    [
        "/alice/../bob/secret/config",
        "/alice/repo/..",
        "/alice/%2e%2e/bob/secret/config",
        "/alice/repo/keys/.hidden",
        "/alice/repo/keys/..",
        "/alice/.tmp-x/config",
        "/alice//repo/config",
        "/alice/repo/data/zz",
        "/alice/repo/data/" + "a" * 63,
        "/alice/repo/keys/a/b/..",
    ],
)
def test_bad_paths_are_400(server: CairnServe, path: str) -> None:
    assert request(server, "GET", path)[0] == 400
    assert request(server, "POST", path, b"x")[0] == 400


def test_uploads_must_match_their_names(server: CairnServe) -> None:
    create(server, "/alice/verify")
    data = os.urandom(100_000)
    assert request(server, "POST", f"/alice/verify/data/{sha(b'other')}", data)[0] == 400
    assert request(server, "POST", f"/alice/verify/data/{sha(data)}", data)[0] == 200  # restic
    b3 = blake3.blake3(data).hexdigest()
    assert request(server, "POST", f"/alice/verify/index/{b3}", data)[0] == 200  # cairn
    status, body = request(server, "GET", "/alice/verify/data/", headers={"Accept": V2})
    assert status == 200
    assert json.loads(body) == [{"name": sha(data), "size": len(data)}]


def test_ranges_and_listing_versions(server: CairnServe) -> None:
    create(server, "/alice/ranges")
    data = bytes(range(256)) * 40
    name = sha(data)
    assert request(server, "POST", f"/alice/ranges/data/{name}", data)[0] == 200
    assert request(
        server, "GET", f"/alice/ranges/data/{name}", headers={"Range": "bytes=10-19"}
    ) == (
        206,
        data[10:20],
    )
    past_end = {"Range": f"bytes={len(data) + 5}-"}
    assert request(server, "GET", f"/alice/ranges/data/{name}", headers=past_end)[0] == 416
    status, body = request(server, "GET", "/alice/ranges/data/")  # API v1: names only
    assert (status, json.loads(body)) == (200, [name])
    assert request(server, "GET", f"/alice/ranges/data/{sha(b'missing')}")[0] == 404
    assert request(server, "DELETE", f"/alice/ranges/data/{sha(b'missing')}")[0] == 404


def test_killed_upload_leaves_nothing(server: CairnServe) -> None:
    """A client that dies mid-body: no object, and no temporary file left behind."""
    create(server, "/alice/killed")
    data = os.urandom(4 << 20)
    name = sha(data)
    parts = urlsplit(server.url)
    token = base64.b64encode(b"alice:alice-secret").decode()
    with socket.create_connection((parts.hostname or "", parts.port or 0)) as sock:
        sock.sendall(
            f"POST /alice/killed/data/{name} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Basic {token}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        )
        sock.sendall(data[: len(data) // 2])
        # Closed with half the body sent: the process that sent it is gone.
    repo = server.root / "alice" / "killed"
    for _ in range(100):  # until the server has noticed the connection is gone
        if not [p for p in repo.rglob(".tmp-*")]:
            break
        time.sleep(0.05)
    assert [p for p in repo.rglob("*") if p.is_file()] == []
    assert request(server, "HEAD", f"/alice/killed/data/{name}")[0] == 404
    status, body = request(server, "GET", "/alice/killed/data/", headers={"Accept": V2})
    assert (status, json.loads(body)) == (200, [])
    # The same upload, whole, then succeeds.
    assert request(server, "POST", f"/alice/killed/data/{name}", data)[0] == 200


def test_append_only_refuses_delete_and_overwrite(append_only: CairnServe) -> None:
    create(append_only, "/ao")
    snap, lock = b"snapshot", b"lock"
    assert request(append_only, "POST", f"/ao/snapshots/{sha(snap)}", snap)[0] == 200
    assert request(append_only, "POST", f"/ao/locks/{sha(lock)}", lock)[0] == 200
    assert request(append_only, "DELETE", f"/ao/snapshots/{sha(snap)}")[0] == 403
    assert request(append_only, "DELETE", "/ao/config")[0] == 403
    assert request(append_only, "DELETE", f"/ao/locks/{sha(lock)}")[0] == 200
    # A retried upload of the same bytes is fine; other bytes under the name are not.
    assert request(append_only, "POST", f"/ao/snapshots/{sha(snap)}", snap)[0] == 200
    assert request(append_only, "POST", "/ao/config", b"config one")[0] == 200
    assert request(append_only, "POST", "/ao/config", b"config two")[0] == 403
    assert request(append_only, "GET", "/ao/config") == (200, b"config one")
    assert request(append_only, "GET", f"/ao/snapshots/{sha(snap)}") == (200, snap)


def test_quota_per_repository(tmp_path: Path) -> None:
    with cairn_serve(tmp_path, "--max-size", "1K", "--no-verify-upload") as s:
        for repo in ("/one", "/two"):
            assert request(s, "POST", f"{repo}/?create=true", b"", user=None)[0] == 200
            assert request(s, "POST", f"{repo}/keys/a", b"x" * 600, user=None)[0] == 200
            assert request(s, "POST", f"{repo}/keys/b", b"x" * 600, user=None)[0] == 413
            assert request(s, "DELETE", f"{repo}/keys/a", user=None)[0] == 200
            assert request(s, "POST", f"{repo}/keys/b", b"x" * 600, user=None)[0] == 200
        assert files_on_disk(s.root) == ["one/keys/b", "two/keys/b"]


def test_metrics_and_access_log(server: CairnServe) -> None:
    create(server, "/alice/metered")
    data = b"counted"
    assert request(server, "POST", f"/alice/metered/keys/{sha(data)}", data)[0] == 200
    status, body = request(server, "GET", "/metrics")
    assert status == 200
    text = body.decode()
    assert 'cairn_serve_requests_total{repo="/alice/metered",method="POST",status="200"} 2' in text
    assert 'cairn_serve_received_bytes_total{repo="/alice/metered",kind="keys"} 7' in text
    events = [json.loads(line) for line in server.log.read_text().splitlines() if line[0] == "{"]
    posts = [
        e
        for e in events
        if e["event"] == "serve.request" and e["path"] == f"/alice/metered/keys/{sha(data)}"
    ]
    assert [(p["user"], p["method"], p["status"], p["bytes_in"]) for p in posts] == [
        ("alice", "POST", 200, 7)
    ]


def test_htpasswd_reloaded_on_change(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    make_htpasswd(path, {"alice": USERS["alice"]})
    with cairn_serve(tmp_path / "s", "--htpasswd-file", str(path)) as s:
        assert request(s, "POST", "/?create=true", b"", user="bob")[0] == 401
        make_htpasswd(path, USERS)
        status = 401
        for _ in range(100):  # the file is looked at again at most once a second
            status = request(s, "POST", "/?create=true", b"", user="bob")[0]
            if status != 401:
                break
            time.sleep(0.05)
        assert status == 200


def test_refuses_to_serve_a_network_without_auth(tmp_path: Path) -> None:
    cli = Cairn(tmp_path / "unused", tmp_path / "pw")
    result = cli.run("serve", "--path", str(tmp_path), "--listen", "0.0.0.0:0", base=False)
    assert result.code == 1
    assert "without authentication" in result.err
    assert "Traceback" not in result.err


# --- restic -----------------------------------------------------------------------


def restic(
    repo: str, tmp_path: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    binary = find_binary("restic", "apt-get install -y restic")
    env = {
        **os.environ,
        "RESTIC_REPOSITORY": f"rest:{repo}",
        "RESTIC_PASSWORD": "restic test password",
        "RESTIC_CACHE_DIR": str(tmp_path / "restic-cache"),
    }
    result = subprocess.run([binary, *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"restic {' '.join(args)}: {result.stderr}"
    return result


def make_source(root: Path) -> dict[str, bytes]:
    files = {
        "big.bin": os.urandom(6 << 20),
        "text/readme.txt": b"hello from the restic client\n" * 1000,
        "empty": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def restored(repo: str, tmp_path: Path, snapshot: str, src: Path) -> dict[str, bytes]:
    target = tmp_path / f"restore-{snapshot}"
    shutil.rmtree(target, ignore_errors=True)
    restic(repo, tmp_path, "restore", snapshot, "--target", str(target))
    inside = target / src.relative_to("/")
    return {str(p.relative_to(inside)): p.read_bytes() for p in inside.rglob("*") if p.is_file()}


def snapshot_ids(repo: str, tmp_path: Path) -> list[str]:
    out = restic(repo, tmp_path, "snapshots", "--json").stdout
    return [s["id"] for s in json.loads(out)]


def test_restic_client_normal_mode(server: CairnServe, tmp_path: Path) -> None:
    repo = server.with_user("alice", USERS["alice"]) + "alice/restic"
    src = tmp_path / "src"
    first = make_source(src)
    restic(repo, tmp_path, "init")
    restic(repo, tmp_path, "backup", str(src))
    (src / "text" / "new.txt").write_bytes(b"second run\n")
    restic(repo, tmp_path, "backup", str(src))
    ids = snapshot_ids(repo, tmp_path)
    assert len(ids) == 2
    assert restored(repo, tmp_path, ids[0], src) == first
    restic(repo, tmp_path, "check", "--read-data")
    restic(repo, tmp_path, "forget", "--keep-last", "1", "--prune")
    assert snapshot_ids(repo, tmp_path) == [ids[1]]
    assert restored(repo, tmp_path, "latest", src) == {**first, "text/new.txt": b"second run\n"}
    restic(repo, tmp_path, "check", "--read-data")


def test_restic_client_append_only(append_only: CairnServe, tmp_path: Path) -> None:
    repo = append_only.with_user("bob", USERS["bob"]) + "restic"
    src = tmp_path / "src"
    first = make_source(src)
    restic(repo, tmp_path, "init")
    restic(repo, tmp_path, "backup", str(src))
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    second = {**first, "big.bin": (src / "big.bin").read_bytes()}
    restic(repo, tmp_path, "backup", str(src))
    ids = snapshot_ids(repo, tmp_path)
    before = files_on_disk(append_only.root / "restic")
    # What a compromised client would try: it fails, and nothing is gone.
    forget = restic(repo, tmp_path, "forget", "--keep-last", "1", "--prune", check=False)
    assert forget.returncode != 0
    assert snapshot_ids(repo, tmp_path) == ids
    after = [f for f in files_on_disk(append_only.root / "restic") if not f.startswith("locks/")]
    assert set(after) >= {f for f in before if not f.startswith("locks/")}
    restic(repo, tmp_path, "unlock")
    restic(repo, tmp_path, "check", "--read-data")
    assert restored(repo, tmp_path, ids[0], src) == first
    assert restored(repo, tmp_path, ids[1], src) == second


# --- cairn's own client -----------------------------------------------------------


def test_cairn_client_append_only(append_only: CairnServe, tmp_path: Path) -> None:
    """cairn backs up to an append-only, verifying server (its names are BLAKE3); its
    forget cannot delete."""
    password = tmp_path / "password"
    password.write_text("cairn over cairn serve\n")
    url = "rest:" + append_only.with_user("alice", USERS["alice"]) + "cairn"
    cli = Cairn(url, password)
    src = tmp_path / "src"
    files = make_source(src)
    cli.run("init", check=True)
    cli.run("backup", str(src), check=True)
    cli.run("backup", str(src), check=True)
    forget = cli.run("forget", "--keep-last", "1")
    assert forget.code != 0
    assert "append-only" in forget.err
    # A 403 is a refusal, not a wrong password (rest.py used to say so for both).
    assert "refused by the server" in forget.err and "check user and password" not in forget.err
    assert "Traceback" not in forget.err
    snapshots = cli.run("--json", "snapshots", check=True).json()
    assert len(snapshots) == 2
    cli.run("check", "--read-data", check=True)
    cli.run("restore", "latest", "--target", str(tmp_path / "out"), check=True)
    inside = tmp_path / "out" / src.relative_to("/")
    assert {
        str(p.relative_to(inside)): p.read_bytes() for p in inside.rglob("*") if p.is_file()
    } == files


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with cairn_serve(tmp_path / "s", "--tls-cert", str(cert), "--tls-key", str(key)) as s:
        assert s.url.startswith("https://127.0.0.1:")
        parts = urlsplit(s.url)
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=30, context=context
        )
        conn.request("POST", "/tls/?create=true", body=b"")
        assert conn.getresponse().status == 200
        conn.close()
        plain = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/tls/keys/")
            plain.getresponse()
        plain.close()


def test_quota_applies_to_bodies_without_a_length(tmp_path: Path) -> None:
    with cairn_serve(tmp_path, "--max-size", "1M", "--no-verify-upload") as s:
        assert request(s, "POST", "/q/?create=true", b"", user=None)[0] == 200
        parts = urlsplit(s.url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        pieces = iter([b"x" * (256 << 10)] * 8)  # 2 MiB, chunked: no Content-Length
        conn.request("POST", "/q/keys/big", body=pieces, encode_chunked=True)
        assert conn.getresponse().status == 413
        conn.close()
        assert files_on_disk(s.root) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--private-repos"], "--private-repos needs --htpasswd-file"),
        (["--max-size", "12Q"], "--max-size"),
        (["--listen", "nowhere"], "expected HOST:PORT"),
        (["--tls-cert", "/nonexistent"], "go together"),
        (["--tls-cert", "/nonexistent", "--tls-key", "/nonexistent"], "cannot load TLS"),
        (["--htpasswd-file", "/nonexistent"], "cannot read htpasswd file"),
        (["--htpasswd-file", "/nonexistent", "--no-auth"], "contradict"),
    ],
)
def test_misuse_is_one_line_and_exit_1(tmp_path: Path, args: list[str], message: str) -> None:
    cli = Cairn(tmp_path / "unused", tmp_path / "pw")
    result = cli.run("serve", "--path", str(tmp_path / "repos"), *args, base=False, timeout=60)
    assert result.code == 1
    assert message in result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli = Cairn(tmp_path / "unused", tmp_path / "pw")
        listen = f"127.0.0.1:{port}"
        result = cli.run("serve", "--path", str(tmp_path), "--listen", listen, base=False)
    assert result.code == 1
    assert "cannot listen on" in result.err


def test_stale_temporaries_are_swept_at_start(tmp_path: Path) -> None:
    """What a server killed mid-upload left (invisible) is removed when one starts."""
    keys = tmp_path / "repos" / "r" / "keys"
    keys.mkdir(parents=True)
    stale, fresh = keys / ".tmp-abc-123", keys / ".tmp-def-456"
    stale.write_bytes(b"half an upload")
    fresh.write_bytes(b"someone's live upload")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    with cairn_serve(tmp_path):
        for _ in range(100):  # the sweep runs once the server listens
            if not stale.exists():
                break
            time.sleep(0.05)
        assert not stale.exists()
        assert fresh.exists()


def test_disk_error_is_500_and_the_server_carries_on(server: CairnServe) -> None:
    create(server, "/alice/broken")
    fan_out = server.root / "alice" / "broken" / "data" / "ab"
    fan_out.rmdir()
    fan_out.write_bytes(b"a file where a directory should be")
    path = "/alice/broken/data/" + "ab" * 32
    assert request(server, "POST", path, b"x")[0] == 500
    events = [json.loads(line) for line in server.log.read_text().splitlines() if line[0] == "{"]
    failed = [e for e in events if e["event"] == "serve.request" and e["path"] == path]
    assert [(e["status"], e["level"]) for e in failed] == [(500, "error")]
    assert "NotADirectoryError" in failed[0]["error"]
    assert request(server, "GET", "/alice/broken/keys/")[0] == 200


def test_cairn_client_normal_mode(server: CairnServe, tmp_path: Path) -> None:
    """cairn's full cycle through a verifying server, forget --prune included."""
    password = tmp_path / "password"
    password.write_text("cairn over cairn serve\n")
    cli = Cairn("rest:" + server.with_user("bob", USERS["bob"]) + "bob/cairn", password)
    src = tmp_path / "src"
    make_source(src)
    cli.run("init", check=True)
    cli.run("backup", str(src), check=True)
    (src / "big.bin").write_bytes(os.urandom(2 << 20))
    second = {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    cli.run("backup", str(src), check=True)
    cli.run("forget", "--keep-last", "1", "--prune", check=True)
    assert len(cli.run("--json", "snapshots", check=True).json()) == 1
    cli.run("check", "--read-data", check=True)
    cli.run("restore", "latest", "--target", str(tmp_path / "out"), check=True)
    inside = tmp_path / "out" / src.relative_to("/")
    restored = {
        str(p.relative_to(inside)): p.read_bytes() for p in inside.rglob("*") if p.is_file()
    }
    assert restored == second
