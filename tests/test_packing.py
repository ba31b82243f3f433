"""The shared pack → upload → index stages (cairn/stages/packing.py), on a real
local repository (asyncio and trio)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from cairn.backends.faulty import FaultyBackend, parse_faults
from cairn.backends.local import LocalBackend
from cairn.backends.throttle import ThrottledBackend
from cairn.pipeline import Pipeline, PipelineOptions, StageError
from cairn.repo.cache import MetadataCache
from cairn.repo.codec import encode_blob
from cairn.repo.index import Index
from cairn.repo.keyfile import KdfParams
from cairn.repo.pack import DATA, TREE
from cairn.repo.repository import Repository, init_repository, open_repository
from cairn.stages import packing
from cairn.stages.packing import EncodedBlob, Packer

pytestmark = pytest.mark.anyio

KiB = 1024
CHEAP = KdfParams(memory_kib=64, iterations=1, lanes=1)


async def _repo(path: Path, faults: str = "") -> tuple[Repository, FaultyBackend]:
    backend = FaultyBackend(LocalBackend(path))
    repo = await init_repository(backend, "pw", kdf_params=CHEAP, hostname="h", username="u")
    backend.faults, backend.calls = parse_faults(faults), {}  # counted from here on
    return repo, backend


def _blobs(repo: Repository, count: int, blob_type: int = DATA) -> Iterator[EncodedBlob]:
    for _ in range(count):
        raw = os.urandom(10 * KiB)
        blob_id = repo.crypto.blob_id(raw)
        yield EncodedBlob(
            blob_type, blob_id, encode_blob(repo.crypto, blob_type, blob_id, raw), len(raw)
        )


def _packs(path: Path) -> list[Path]:
    return sorted(path.glob("data/*/*"))


async def test_blobs_become_packs_and_an_index_that_a_reopened_repo_reads(tmp_path: Path) -> None:
    repo, _ = await _repo(tmp_path / "repo")
    repo.cache = MetadataCache(tmp_path / "cache")
    packer = Packer(repo, Index(), pack_size=50 * KiB, connections=2)
    data = list(_blobs(repo, 20))
    trees = list(_blobs(repo, 3, TREE))
    released: list[int] = []
    # A batch sharing one release (the blobs of one output slot), then single blobs.
    batch = [*data[:4], EncodedBlob(**{**data[4].__dict__, "release": lambda: released.append(1)})]
    pipe = Pipeline("t")
    inlet = pipe.inlet("pack", until="src")

    async def produce(send: Any) -> None:
        # Tree blobs come in through the inlet, beside the data blobs of the chain.
        await send.send(batch)
        for i, blob in enumerate(data[5:]):
            await send.send(blob)
            if i < len(trees):
                await inlet.send(trees[i])

    await packer.add_to(pipe.source("src", produce)).run()
    await packer.finish()

    assert released == [1]
    assert packer.stats.data_blobs == 20 and packer.stats.tree_blobs == 3
    assert packer.stats.data_added == 20 * 10 * KiB
    assert packer.stats.packs == len(_packs(tmp_path / "repo")) >= 5
    assert len(packer.stats.index_files) == 1
    assert packer.held.current == 0
    reopened = await open_repository(LocalBackend(tmp_path / "repo"), "pw")
    index = await reopened.load_index()
    for blob in data + trees:
        assert blob.blob_id in index
        assert not packer.claim(blob.blob_id)  # known now: never sent twice
    tree_pack = index.lookup(trees[0].blob_id).pack_id.hex()
    assert await repo.cache.load("data", tree_pack) is not None  # tree packs are cached


async def test_claim_is_true_once_per_new_blob(tmp_path: Path) -> None:
    repo, _ = await _repo(tmp_path / "repo")
    packer = Packer(repo, Index(), pack_size=50 * KiB, connections=1)
    assert packer.claim(b"a" * 32)
    assert not packer.claim(b"a" * 32)


async def test_uploaded_packs_are_indexed_even_when_the_run_fails(tmp_path: Path) -> None:
    # The 3rd pack's save fails: the two uploaded before it must be indexed by
    # finish(), so a rerun reuses them; nothing names the pack that failed.
    repo, _ = await _repo(tmp_path / "repo", "save:data/#3=error")
    packer = Packer(repo, Index(), pack_size=30 * KiB, connections=1)
    pipe = packer.add_to(Pipeline("t").source("src", list(_blobs(repo, 20))))
    with pytest.raises(StageError):
        try:
            await pipe.run()
        finally:
            await packer.finish()
    uploaded = _packs(tmp_path / "repo")
    assert len(uploaded) == 2
    index = await (await open_repository(LocalBackend(tmp_path / "repo"), "pw")).load_index()
    assert {p.hex() for p in index.packs()} == {p.name for p in uploaded}


async def test_dry_run_saves_nothing(tmp_path: Path) -> None:
    repo, _ = await _repo(tmp_path / "repo")
    packer = Packer(repo, Index(), pack_size=30 * KiB, connections=2, dry_run=True)
    await packer.add_to(Pipeline("t").source("src", list(_blobs(repo, 10)))).run()
    await packer.finish()
    assert packer.stats.packs >= 3
    assert not _packs(tmp_path / "repo") and not packer.stats.index_files


async def test_full_packs_do_not_queue_behind_a_busy_uploader(tmp_path: Path) -> None:
    # One connection held up: "pack" keeps one full pack in its hand and then
    # waits; no pack waits in the link (capacity 0), so the held bytes stay at
    # one pack uploading + one waiting + the one filling.
    repo, _ = await _repo(tmp_path / "repo")
    gate = anyio.Event()
    save = repo.backend.save

    async def slow_save(name: str, data: bytes | memoryview) -> None:
        await gate.wait()
        await save(name, data)

    repo.backend.save = slow_save  # type: ignore[method-assign]
    packer = Packer(repo, Index(), pack_size=30 * KiB, connections=1)
    pipe = packer.add_to(
        Pipeline("t", options=PipelineOptions(channel_capacity=1)).source(
            "src", list(_blobs(repo, 40))
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(pipe.run)
        await anyio.wait_all_tasks_blocked()
        snap = pipe.snapshot()
        held = packer.held.current
        gate.set()
    await packer.finish()
    assert snap.stage("upload").queue_capacity == 0
    assert snap.stage("upload").items_in == 1
    one_pack = 30 * KiB + 11 * KiB
    assert held <= 3 * one_pack, held
    assert packer.stats.packs >= 10
    assert packer.stats.packs < packing.PACKS_PER_INDEX  # one index file, at finish
    assert len(packer.stats.index_files) == 1


class _Gate:
    """An upload limiter that admits nothing until opened; counts what it admits."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.charged = 0

    async def acquire(self, nbytes: int) -> None:
        await self.open.wait()
        self.charged += nbytes


async def test_blobs_wait_for_the_upload_limit_in_pack_not_in_upload_tasks(tmp_path: Path) -> None:
    # Behind an upload limit charged per whole object (a local backend), "pack"
    # pays for each blob before it adds it: while the limit holds, no upload
    # task holds a pack and nothing waits in a pack. Each byte is charged once
    # (the save does not charge it again).
    repo, _ = await _repo(tmp_path / "repo")
    gate = _Gate()
    repo.backend = ThrottledBackend(repo.backend, upload=gate)
    packer = Packer(repo, Index(), pack_size=30 * KiB, connections=3)
    pipe = packer.add_to(Pipeline("t").source("src", list(_blobs(repo, 40))))
    async with anyio.create_task_group() as tg:
        tg.start_soon(pipe.run)
        await anyio.wait_all_tasks_blocked()
        held = packer.held.current
        upload_items = pipe.snapshot().stage("upload").items_in
        gate.open.set()
    await packer.finish()
    assert upload_items == 0
    assert held == 0, held
    stored = sum(p.stat().st_size for p in _packs(tmp_path / "repo"))
    assert stored * 0.98 <= gate.charged <= stored * 1.02


async def test_dry_run_is_not_held_by_the_upload_limit(tmp_path: Path) -> None:
    repo, _ = await _repo(tmp_path / "repo")
    gate = _Gate()  # never opens: a dry run must not wait for it
    repo.backend = ThrottledBackend(repo.backend, upload=gate)
    packer = Packer(repo, Index(), pack_size=30 * KiB, connections=2, dry_run=True)
    with anyio.fail_after(10):
        await packer.add_to(Pipeline("t").source("src", list(_blobs(repo, 10)))).run()
    assert packer.stats.packs >= 3 and gate.charged == 0
