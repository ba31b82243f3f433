"""``prune``: what it frees, that snapshots survive it, and that an interruption at
any backend operation leaves a repository ``check`` passes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest

from cairn.backends.base import BackendError
from cairn.backends.faulty import FaultyBackend, parse_faults
from cairn.backends.local import LocalBackend
from cairn.repo.repository import open_repository
from cairn.stages.check import Checker, CheckOptions, CheckResult
from cairn.stages.prune import (
    PruneOptions,
    PruneResult,
    execute_prune,
    max_unused_limit,
    parse_size,
    plan_prune,
)
from tests.cli_helpers import Cairn
from tests.maintenance_helpers import (
    PASSWORD,
    copy_repo,
    flip_byte,
    make_history,
    new_cairn,
    objects,
    pack_files,
    repo_size,
)
from tests.treeutil import snapshot_of


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Cairn:
    """Three snapshots, the two oldest forgotten (not pruned)."""
    tmp = tmp_path_factory.mktemp("prune-template")
    c = new_cairn(tmp)
    make_history(c, tmp / "src")
    c.run("forget", "--keep-last", "1", check=True)
    return c


async def _prune(root: Path, faults: str = "") -> dict[str, int]:
    """Prune through a faulty backend (faults armed after opening); the call counts."""
    backend = FaultyBackend(LocalBackend(root))
    try:
        repo = await open_repository(backend, PASSWORD)
        backend.faults = parse_faults(faults)
        backend.calls = {}
        options = PruneOptions()
        await execute_prune(repo, await plan_prune(repo, options), options)
    finally:
        await backend.aclose()
    return dict(backend.calls)


async def _check(root: Path, read_data: bool = False) -> CheckResult:
    backend = LocalBackend(root)
    try:
        repo = await open_repository(backend, PASSWORD)
        return await Checker(repo, CheckOptions(read_data=read_data, cpu_workers=1)).run()
    finally:
        await backend.aclose()


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def test_prune_frees_and_keeps_the_repository_checkable(template: Cairn, tmp_path: Path) -> None:
    c = copy_repo(template, tmp_path)
    before = set(pack_files(c.repo))
    dry = c.run("prune", "--dry-run", "--json", check=True).json()
    assert dry["dry_run"] and dry["packs_delete"] >= 1 and dry["packs_repack"] >= 1
    assert set(pack_files(c.repo)) == before  # a dry run changes nothing
    size = repo_size(c.repo, "data")
    out = c.run("prune", "--json", check=True).json()
    assert size - repo_size(c.repo, "data") == out["bytes_deleted"] - out["bytes_written"]
    assert out["packs_deleted"] == dry["packs_delete"] + dry["packs_repack"]
    result = anyio.run(_check, c.repo, True)
    assert not result.problems, [p.line() for p in result.problems]
    again = c.run("prune", "--json", check=True).json()
    assert again["packs_delete"] == again["packs_repack"] == 0


def test_max_unused_and_repack_size(template: Cairn, tmp_path: Path) -> None:
    c = copy_repo(template, tmp_path)
    out = c.run("prune", "--dry-run", "--max-unused", "unlimited", "--json", check=True).json()
    assert out["packs_repack"] == 0 and out["packs_delete"] >= 1
    out = c.run("prune", "--dry-run", "--max-repack-size", "1", "--json", check=True).json()
    assert out["packs_repack"] == 0
    assert c.run("prune", "--max-unused", "lots").code == 1
    assert parse_size("2K") == 2048 and parse_size("1.5M") == 1536 * 1024
    assert max_unused_limit("5%")(950) == pytest.approx(50)
    assert max_unused_limit("1M")(0) == 1 << 20


def test_interrupted_prune_at_every_operation(template: Cairn, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    shutil.copytree(template.repo, reference)
    calls = anyio.run(_prune, reference)
    clean_size = repo_size(reference, "data")
    assert calls.get("save", 0) >= 2 and calls.get("remove", 0) >= 3
    for op in ("save", "remove", "load", "list"):
        for n in range(1, calls.get(op, 0) + 1):
            root = tmp_path / f"{op}-{n}"
            shutil.copytree(template.repo, root)
            with pytest.raises((BackendError, ExceptionGroup)) as info:
                anyio.run(_prune, root, f"{op}#{n}=error")
            assert "injected" in str(_unwrap(info.value))
            result = anyio.run(_check, root)
            assert not result.errors, (op, n, [p.line() for p in result.errors])
            assert result.snapshots == 1
            # A rerun finishes the job: same data as an uninterrupted prune.
            anyio.run(_prune, root)
            result = anyio.run(_check, root)
            assert not result.problems, (op, n, [p.line() for p in result.problems])
            assert repo_size(root, "data") == clean_size, (op, n)
            shutil.rmtree(root)


def test_repack_keeps_every_blob_byte_for_byte(template: Cairn, tmp_path: Path) -> None:
    """Prune that repacks every partly used pack: check --read-data is clean, the kept
    snapshot restores byte for byte, and a second prune finds the same blobs in use."""
    c = copy_repo(template, tmp_path)
    out = c.run("prune", "--max-unused", "0", "--json", check=True).json()
    assert out["packs_repack"] >= 1 and out["packs_written"] >= 1
    assert out["unused_bytes_after"] == 0
    r = c.run("check", "--read-data")
    assert r.code == 0 and "no errors were found" in r.out, r.out + r.err
    assert not any(line.startswith(("error", "warning")) for line in r.out.splitlines())
    target = tmp_path / "restored"
    c.run("restore", "latest", "--target", str(target), check=True)
    src = Path(template.repo).parent / "src"
    assert snapshot_of(target / str(src).lstrip("/")) == snapshot_of(src)
    again = c.run("prune", "--max-unused", "0", "--json", check=True).json()
    assert again["used_blobs"] == out["used_blobs"] and again["used_bytes"] == out["used_bytes"]
    assert again["unused_bytes"] == 0 and again["packs_repack"] == again["packs_delete"] == 0


async def _plan(root: Path) -> Any:
    backend = LocalBackend(root)
    try:
        repo = await open_repository(backend, PASSWORD)
        return await plan_prune(repo, PruneOptions(max_unused="0"))
    finally:
        await backend.aclose()


def test_repack_refuses_a_corrupt_blob_and_deletes_nothing(template: Cairn, tmp_path: Path) -> None:
    c = copy_repo(template, tmp_path)
    plan = anyio.run(_plan, Path(c.repo))
    victim = plan.with_action("repack")[0]
    entry = victim.used[-1]
    flip_byte(pack_files(c.repo)[victim.id], entry.offset + entry.length // 2)
    packs, index = set(pack_files(c.repo)), set(objects(c.repo, "index"))
    r = c.run("prune", "--max-unused", "0")
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert f"in pack {victim.id}" in lines[0] and "nothing was deleted" in lines[0]
    # Nothing removed (new packs written before the damage was found are indexed
    # beside the old ones: the next prune sorts them out).
    assert packs <= set(pack_files(c.repo)) and index <= set(objects(c.repo, "index"))
    # The damage found is the only damage there is.
    r = c.run("check", "--read-data")
    errors = [line for line in r.out.splitlines() if line.startswith("error")]
    assert r.code == 1 and errors and all(victim.id in line for line in errors), r.out


async def _prune_result(root: Path, faults: str = "") -> PruneResult:
    backend = FaultyBackend(LocalBackend(root), faults)
    try:
        repo = await open_repository(backend, PASSWORD)
        options = PruneOptions(max_unused="0")
        return await execute_prune(repo, await plan_prune(repo, options), options)
    finally:
        await backend.aclose()


def test_rerun_keeps_the_packs_an_interrupted_repack_indexed(
    template: Cairn, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    shutil.copytree(template.repo, reference)
    clean = anyio.run(_prune_result, reference)
    assert clean.packs_written >= 1 and len(clean.index_written) == 2
    root = tmp_path / "interrupted"
    shutil.copytree(template.repo, root)
    # The new packs and their index file are stored; the index superseding the old
    # one is not: every repacked blob is now in an old and in a new pack. (Saves are
    # counted over all names: the new packs, their index, then the failing one.)
    with pytest.raises(BackendError):
        anyio.run(_prune_result, root, f"save:index/#{clean.packs_written + 2}=error")
    result = anyio.run(_check, root)
    assert not result.errors and any("stored in packs" in p.message for p in result.problems)
    # The rerun keeps the new packs (all in use) and deletes the old ones: nothing
    # is repacked twice.
    rerun = anyio.run(_prune_result, root)
    assert rerun.packs_written == 0 and rerun.packs_deleted == clean.packs_deleted
    result = anyio.run(_check, root, True)
    assert not result.problems, [p.line() for p in result.problems]
    assert repo_size(root, "data") == repo_size(reference, "data")


async def _prune_slowly(root: Path) -> PruneResult:
    """Prune into packs of one blob each, uploaded one at a time, each slowly."""
    backend = FaultyBackend(LocalBackend(root), "save:data/=delay:0.02")
    try:
        repo = await open_repository(backend, PASSWORD)
        options = PruneOptions(max_unused="0", pack_size=16 * 1024, connections=1, cpu_workers=1)
        return await execute_prune(repo, await plan_prune(repo, options), options)
    finally:
        await backend.aclose()


def test_repack_memory_is_bounded_behind_a_slow_backend(tmp_path: Path) -> None:
    c = new_cairn(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(80):
        (src / f"f{i:02}").write_bytes(os.urandom(20_000))  # one blob each
    c.run("backup", str(src), check=True)
    for i in range(0, 80, 2):
        (src / f"f{i:02}").write_bytes(os.urandom(20_000))
    c.run("backup", str(src), check=True)
    c.run("forget", "--keep-last", "1", check=True)
    result = anyio.run(_prune_slowly, Path(c.repo))
    # 40 kept blobs (800 kB) repacked one per pack: several times the bound.
    assert result.packs_written >= 40 and result.bytes_written > 4 * result.held_bound
    assert 0 < result.held_peak <= result.held_bound


def test_forget_prune_restores_identical(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    states = []
    for i in range(3):
        (src / f"file{i}").write_bytes(bytes([i]) * 400_000 + b"%d" % i)
        if i:
            (src / f"file{i - 1}").write_bytes(b"changed %d" % i)
        cairn.run("backup", str(src), check=True)
        states.append(snapshot_of(src))
    size = repo_size(cairn.repo)
    r = cairn.run("forget", "--keep-last", "2", "--prune", "--json", check=True)
    groups, pruned = r.json_lines()
    assert len(groups[0]["remove"]) == 1 and len(groups[0]["keep"]) == 2
    assert pruned["bytes_deleted"] > 0
    freed = size - repo_size(cairn.repo)
    assert freed > pruned["bytes_deleted"] - pruned["bytes_written"] - 4096  # +- index files
    for n, snap in enumerate(groups[0]["keep"]):
        target = tmp_path / f"restore{n}"
        cairn.run("restore", snap["id"], "--target", str(target), check=True)
        assert snapshot_of(target / str(src).lstrip("/")) == states[2 - n]
    assert cairn.run("check", "--read-data").code == 0


from tests.conftest_cli import cairn  # noqa: E402, F401 - fixture
