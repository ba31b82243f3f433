"""``parse_location``: each syntax, its options, and one-line errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cairn.backends.local import LocalBackend
from cairn.backends.location import InvalidLocation, parse_location
from cairn.backends.rclone import RcloneBackend
from cairn.backends.rest import RestBackend
from cairn.backends.s3 import S3Backend
from cairn.backends.sftp import SftpBackend


def test_local_paths(tmp_path: Path) -> None:
    for url in (str(tmp_path), f"local:{tmp_path}"):
        backend = parse_location(url)
        assert isinstance(backend, LocalBackend)
        assert backend.root == tmp_path
    assert parse_location(str(tmp_path), {"local.connections": "7"}).connections == 7


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("sftp:alice@host:/srv/repo", "sftp://alice@host/srv/repo"),
        ("sftp:host:repo", "sftp://host/repo"),
        ("sftp://alice@host:2222/srv/repo", "sftp://alice@host:2222/srv/repo"),
        ("sftp://host/~/repo", "sftp://host/repo"),
    ],
)
def test_sftp(url: str, location: str) -> None:
    backend = parse_location(url, {"sftp.connections": "3", "s3.region": "ignored"})
    assert isinstance(backend, SftpBackend)
    assert backend.location == location
    assert backend.connections == 3


def test_s3() -> None:
    backend = parse_location("s3:https://minio.example:9000/bucket/some/prefix")
    assert isinstance(backend, S3Backend)
    assert backend.location == "s3:https://minio.example:9000/bucket/some/prefix"
    aws = parse_location(
        "s3:my-bucket/repo", {"s3.storage-class": "STANDARD_IA", "s3.part-size": "8M"}
    )
    assert isinstance(aws, S3Backend)
    assert aws.location == "s3:my-bucket/repo"


def test_rest_hides_password() -> None:
    backend = parse_location("rest:http://user:secret@127.0.0.1:8000/repo")
    assert isinstance(backend, RestBackend)
    assert backend.location == "rest:http://user@127.0.0.1:8000/repo/"
    assert "secret" not in backend.location


def test_rclone() -> None:
    backend = parse_location("rclone:remote:path/to/repo", {"rclone.config": "/dev/null"})
    assert isinstance(backend, RcloneBackend)
    assert backend.location == "rclone:remote:path/to/repo"


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("", None, "empty repository location"),
        ("sftp:hostonly", None, "expected sftp:"),
        ("sftp:host:", None, "expected sftp:"),
        ("sftp://host:notaport/repo", None, "bad port"),
        ("s3:", None, "bucket"),
        ("s3:https:///bucket", None, "expected s3:"),
        ("s3:Bad_Bucket/x", None, "bucket"),
        ("rest:ftp://host/x", None, "expected rest:"),
        ("rest:", None, "expected rest:"),
        ("rclone:", None, "expected rclone:"),
        ("s3:bucket/x", {"s3.nope": "1"}, "unknown option 's3.nope'"),
        ("s3:bucket/x", {"s3.path-style": "maybe"}, "expected true or false"),
        ("s3:bucket/x", {"s3.connections": "0"}, "positive number"),
        ("s3:bucket/x", {"s3.part-size": "1M"}, "at least 5 MiB"),
    ],
)
def test_malformed_locations_fail_in_one_line(
    url: str, options: dict[str, str] | None, message: str
) -> None:
    with pytest.raises(InvalidLocation, match=message) as info:
        parse_location(url, options)
    assert "\n" not in str(info.value)


def test_s3_backend_imports_neither_httpx_nor_rich() -> None:
    """aiobotocore would import httpx (and rich through it) for a transport the s3
    backend does not use, a quarter of its import time; httpx still imports after."""
    code = (
        "import sys; import cairn.backends.s3; "
        "print(sorted(m for m in ('httpx', 'rich') if m in sys.modules)); "
        "import httpx; print(httpx.__name__)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "httpx"]
