"""The backend contract (``cairn/backends/base.py``), checked against every backend.

Parametrized over local, the fault wrapper in pass-through mode, rest (``rclone serve
restic``), serve (``cairn serve``, the same protocol), rclone (``--stdio``), sftp
(OpenSSH) and s3 (SeaweedFS, and moto as a second implementation); each on asyncio,
and on trio too where the client library allows (not asyncssh, not aiobotocore).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

pytest.register_assert_rewrite("tests.servers")

from cairn.backends.base import (  # noqa: E402
    Backend,
    InvalidName,
    NotFound,
    ObjectTruncated,
    object_name,
)
from tests.servers import ASYNCIO_ONLY, KINDS, open_backend  # noqa: E402

pytest_plugins = ["tests.servers"]
pytestmark = pytest.mark.anyio


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every (backend kind, event loop) pair the backend's client library supports."""
    if "kind" in metafunc.fixturenames:
        pairs = [
            pytest.param(kind, loop, id=f"{kind}-{loop}")
            for kind in KINDS
            for loop in ("asyncio", "trio")
            if not (loop == "trio" and kind in ASYNCIO_ONLY)
        ]
        metafunc.parametrize(("kind", "anyio_backend"), pairs)


@pytest.fixture
async def backend(
    kind: str, anyio_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Backend]:
    async with open_backend(kind, request, tmp_path) as b:
        yield b


def hexid(seed: int) -> str:
    return f"{seed:02x}" * 32


DATA = os.urandom(300_000)


async def listing(backend: Backend, prefix: str) -> dict[str, int]:
    return {name: size async for name, size in backend.list(prefix)}


async def test_is_a_backend(backend: Backend) -> None:
    assert isinstance(backend, Backend)
    assert backend.connections >= 1
    assert backend.location


async def test_save_load_roundtrip(backend: Backend) -> None:
    await backend.save("config", b"config bytes")
    name = object_name("data", hexid(0xAB))
    await backend.save(name, memoryview(DATA))  # memoryviews are accepted too
    assert await backend.load("config") == b"config bytes"
    assert await backend.load(name) == DATA


async def test_empty_object(backend: Backend) -> None:
    await backend.save("keys/empty", b"")
    assert await backend.load("keys/empty") == b""
    assert await backend.stat("keys/empty") == 0


async def test_ranged_load(backend: Backend) -> None:
    name = object_name("index", hexid(1))
    await backend.save(name, DATA)
    assert await backend.load(name, 10, 100) == DATA[10:110]
    assert await backend.load(name, 0, 1) == DATA[:1]
    assert await backend.load(name, 299_990) == DATA[299_990:]
    assert await backend.load(name, len(DATA) - 5, 5) == DATA[-5:]
    assert await backend.load(name, 7, 0) == b""


async def test_load_past_end_is_truncated(backend: Backend) -> None:
    name = object_name("snapshots", hexid(2))
    await backend.save(name, b"0123456789")
    with pytest.raises(ObjectTruncated):
        await backend.load(name, 5, 10)  # straddles the end
    with pytest.raises(ObjectTruncated):
        await backend.load(name, 20, 5)  # starts past the end


async def test_stat(backend: Backend) -> None:
    name = object_name("data", hexid(3))
    await backend.save(name, DATA)
    assert await backend.stat(name) == len(DATA)


async def test_list_with_fanout(backend: Backend) -> None:
    data_a, data_b = object_name("data", hexid(0xAB)), object_name("data", hexid(0xCD))
    await backend.save("config", b"c")
    await backend.save(data_a, b"a" * 10)
    await backend.save(data_b, b"b" * 20)
    await backend.save(object_name("keys", hexid(4)), b"key")
    await backend.save(object_name("locks", hexid(5)), b"lock")
    assert await listing(backend, "data/") == {data_a: 10, data_b: 20}
    assert await listing(backend, "data/ab/") == {data_a: 10}
    assert await listing(backend, "keys/") == {f"keys/{hexid(4)}": 3}
    assert await listing(backend, "snapshots/") == {}
    everything = await listing(backend, "")
    assert everything == {
        "config": 1,
        data_a: 10,
        data_b: 20,
        f"keys/{hexid(4)}": 3,
        f"locks/{hexid(5)}": 4,
    }


async def test_remove_and_not_found(backend: Backend) -> None:
    name = object_name("locks", hexid(6))
    await backend.save(name, b"lock")
    await backend.remove(name)
    assert await listing(backend, "locks/") == {}
    with pytest.raises(NotFound):
        await backend.load(name)
    with pytest.raises(NotFound):
        await backend.load(name, 0, 1)
    with pytest.raises(NotFound):
        await backend.stat(name)
    with pytest.raises(NotFound):
        await backend.remove(name)


async def test_missing_config_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFound):
        await backend.load("config")


async def test_idempotent_resave(backend: Backend) -> None:
    name = object_name("data", hexid(7))
    await backend.save(name, DATA)
    await backend.save(name, DATA)  # a retried save of the same bytes is harmless
    assert await backend.load(name) == DATA
    assert await listing(backend, "data/") == {name: len(DATA)}


async def settled_listing(backend: Backend, name: str, size: int) -> dict[str, int]:
    """The listing once the server has finished with an upload we abandoned.

    ``rclone serve restic`` writes in place and removes the partial file only after
    noticing the aborted request, so for a moment a prefix can be listed. cairn never
    reads an object before its save returned (packs are indexed only afterwards), so
    what matters is that nothing partial *stays*; we wait up to 5 s for that.
    """
    entries = await listing(backend, "data/")
    for _ in range(50):
        if entries in ({}, {name: size}):
            break
        await anyio.sleep(0.1)
        entries = await listing(backend, "data/")
    return entries


async def test_interrupted_save_leaves_all_or_nothing(backend: Backend) -> None:
    """A save cancelled mid-way never leaves a prefix of the object visible."""
    name = object_name("data", hexid(8))
    big = os.urandom(8 * 1024 * 1024)
    for delay in (0.0, 0.005, 0.05):
        with anyio.move_on_after(delay):
            await backend.save(name, big)
        entries = await settled_listing(backend, name, len(big))
        try:
            stored = await backend.load(name)
        except NotFound:
            assert entries == {}
        else:
            assert stored == big
            # A server may finish a request its client abandoned (moto does): the
            # object then appears a moment after the listing above — whole.
            for _ in range(50):
                entries = await listing(backend, "data/")
                if entries == {name: len(big)}:
                    break
                await anyio.sleep(0.1)
            assert entries == {name: len(big)}
        if entries:
            await backend.remove(name)
    # The backend stays usable after an interrupted call. (Another name: a request
    # the server finishes late could still land on this one.)
    after = object_name("data", hexid(9))
    await backend.save(after, b"after")
    assert await backend.load(after) == b"after"


async def test_concurrent_saves_and_loads(backend: Backend) -> None:
    blobs = {object_name("data", hexid(i)): os.urandom(50_000 + i) for i in range(16)}
    async with anyio.create_task_group() as tg:
        for name, data in blobs.items():
            tg.start_soon(backend.save, name, data)
    loaded: dict[str, bytes] = {}

    async def fetch(name: str) -> None:
        loaded[name] = await backend.load(name)

    async with anyio.create_task_group() as tg:
        for name in blobs:
            tg.start_soon(fetch, name)
    assert loaded == blobs
    assert await listing(backend, "data/") == {n: len(d) for n, d in blobs.items()}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../config",
        "/etc/passwd",
        "keys/../config",
        "keys/..",
        "keys/.hidden",
        "data/xx",
        f"data/{hexid(1)}",
        f"data/zz/{hexid(1)}",
        "unknown/abc",
        "keys/a/b",
        "config/x",
    ],
)
async def test_invalid_names_rejected(backend: Backend, bad: str) -> None:
    with pytest.raises(InvalidName):
        await backend.save(bad, b"x")
    with pytest.raises(InvalidName):
        await backend.load(bad)
    with pytest.raises(InvalidName):
        await backend.stat(bad)
    with pytest.raises(InvalidName):
        await backend.remove(bad)


async def test_invalid_list_prefix_rejected(backend: Backend) -> None:
    with pytest.raises(InvalidName):
        await listing(backend, "../")


async def test_aclose_after_failure_and_twice(backend: Backend) -> None:
    with pytest.raises(NotFound):
        await backend.stat("config")
    await backend.aclose()
    await backend.aclose()  # the fixture closes it once more
