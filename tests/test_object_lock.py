"""S3 Object Lock (``-o s3.object-lock=governance|compliance -o s3.retention-days=N``)
against two real S3 servers that implement it: SeaweedFS (``weed mini``) and moto.

Checked: new buckets get Object Lock; every object but locks is written with a
retain-until date (single PUT and multipart); a retained object is refused with
``Retained`` instead of being hidden behind a delete marker; an existing bucket
without Object Lock is refused at init; ``forget --prune`` keeps what is retained,
says so and exits 0, and everything stays restorable.
Not checked here: what happens once retention ends (the shortest retention S3 allows
is one day); that AWS itself behaves as these two servers do.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.servers")

from cairn.backends.base import BackendError, Retained  # noqa: E402
from cairn.backends.location import InvalidLocation, parse_location  # noqa: E402
from cairn.backends.s3 import S3Backend  # noqa: E402
from tests.cli_helpers import Cairn  # noqa: E402
from tests.servers import S3_KEY, S3_SECRET, S3Server  # noqa: E402

pytest_plugins = ["tests.servers"]

SERVERS = ["s3_server", "moto_server"]


@pytest.fixture(params=SERVERS, ids=["seaweedfs", "moto"])
def s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    server: S3Server = request.getfixturevalue(request.param)
    return server


def locked_location(s3: S3Server) -> str:
    """A fresh bucket each time: Object Lock can only be enabled when one is created."""
    return f"s3:{s3.endpoint}/lock-{uuid.uuid4().hex[:10]}/repo"


def lock_options(mode: str = "governance") -> dict[str, str]:
    return {"s3.region": "us-east-1", "s3.object-lock": mode, "s3.retention-days": "2"}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("mode", ["governance", "compliance"])
async def test_objects_are_retained_but_locks_are_not(
    s3: S3Server, mode: str, anyio_backend: str
) -> None:
    options = {**lock_options(mode), "s3.multipart-threshold": "5M", "s3.part-size": "5M"}
    backend = parse_location(locked_location(s3), options)
    assert isinstance(backend, S3Backend)
    big = os.urandom(11 << 20)  # multipart: three parts
    pack, snap, lock = "data/ab/" + "ab" * 32, "snapshots/" + "cd" * 32, "locks/" + "ef" * 32
    try:
        await backend.create_layout()
        await backend.save(pack, big)
        await backend.save(snap, b"snapshot")
        await backend.save(lock, b"lock")
        client = await backend._s3()
        now = datetime.now(UTC)
        for name in (pack, snap):
            head = await client.head_object(Bucket=backend._bucket, Key=backend._key(name))
            assert head["ObjectLockMode"] == mode.upper()
            assert (
                now + timedelta(days=1)
                < head["ObjectLockRetainUntilDate"]
                < now + timedelta(days=3)
            )
            with pytest.raises(Retained, match="retained until"):
                await backend.remove(name)
        head = await client.head_object(Bucket=backend._bucket, Key=backend._key(lock))
        assert "ObjectLockMode" not in head
        await backend.remove(lock)
        assert {n async for n, _ in backend.list("")} == {pack, snap}
        assert await backend.load(pack) == big
    finally:
        await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_bucket_without_object_lock_is_refused(s3: S3Server, anyio_backend: str) -> None:
    location = locked_location(s3)
    plain = parse_location(location, {"s3.region": "us-east-1"})
    await plain.create_layout()
    await plain.aclose()
    locked = parse_location(location, lock_options())
    try:
        with pytest.raises(BackendError, match="no Object Lock enabled"):
            await locked.create_layout()
    finally:
        await locked.aclose()


@pytest.mark.parametrize(
    "options",
    [
        {"s3.object-lock": "governance"},
        {"s3.retention-days": "3"},
        {"s3.object-lock": "forever", "s3.retention-days": "3"},
        {"s3.object-lock": "compliance", "s3.retention-days": "0"},
    ],
)
def test_object_lock_options_are_checked(options: dict[str, str]) -> None:
    with pytest.raises(InvalidLocation):
        parse_location("s3:http://127.0.0.1:1/bucket", options)


def test_forget_and_prune_keep_what_is_retained(s3: S3Server, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("locked away\n")
    args = tuple(a for k, v in lock_options().items() for a in ("-o", f"{k}={v}"))
    cli = Cairn(locked_location(s3), password, global_args=args)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(3 << 20))
    cli.run("init", check=True)
    cli.run("backup", str(src), check=True)
    first = (src / "a").read_bytes()
    (src / "a").write_bytes(os.urandom(3 << 20))
    cli.run("backup", str(src), check=True)
    result = cli.run("forget", "--keep-last", "1", "--prune")
    assert result.code == 0, result.err
    assert "still under retention" in result.err  # the snapshot forget could not delete
    assert "Traceback" not in result.err
    snapshots = cli.run("--json", "snapshots", check=True).json()
    assert len(snapshots) == 2
    cli.run("check", "--read-data", check=True)
    oldest = min(snapshots, key=lambda s: s["time"])["id"]
    cli.run("restore", oldest, "--target", str(tmp_path / "out"), check=True)
    assert (tmp_path / "out" / src.relative_to("/") / "a").read_bytes() == first
