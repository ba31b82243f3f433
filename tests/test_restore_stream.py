"""Restore streams the snapshot: the walk plans a few groups of files at a time and
never holds the whole snapshot; everything restore does stays right across the
boundaries of those groups (tiny groups here, so there are many).

The restores run in this process (the real repository, the real ``Restorer`` and
worker pool) so that the group size can be made small and what the plan holds can be
counted.
"""

from __future__ import annotations

import gc
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from cairn.backends.local import LocalBackend
from cairn.repo.repository import open_repository
from cairn.repo.tree import Node
from cairn.stages.restore import RestoreOptions, Restorer, RestoreStats
from cairn.stages.snapshots import find_snapshot
from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture
from tests.treeutil import make_everything_tree, snapshot_of

DIRS, FILES_PER_DIR = 8, 60


def _many_small_files(src: Path) -> None:
    """DIRS directories of FILES_PER_DIR small files, hardlinks across directories
    (far apart in the walk), a read-only directory and fixed directory times."""
    for d in range(DIRS):
        sub = src / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(FILES_PER_DIR):
            (sub / f"f{f:03d}").write_bytes(os.urandom(100 + f))
    os.link(src / "d0" / "f000", src / f"d{DIRS - 1}" / "link-to-d0-f000")
    os.link(src / "d1" / "f005", src / "d1" / "link-to-f005")
    os.chmod(src / "d3", 0o555)
    for d in range(DIRS):
        os.utime(src / f"d{d}", ns=(1_500_000_000_000_000_000 + d, 1_500_000_000_000_000_000 + d))


async def _restore(
    c: Cairn, target: Path, group_entries: int, **options: Any
) -> tuple[RestoreStats, int, int]:
    """Restore the latest snapshot; also the most ``Node`` objects alive right after
    ``plan`` and, sampled, during the run."""
    backend = LocalBackend(c.repo)
    repo = await open_repository(backend, c.password_file.read_text().strip())
    try:
        _sid, snap = await find_snapshot(repo, "latest")
        index = await repo.load_index()
        opts = RestoreOptions(target=os.fsencode(str(target)), cpu_workers=1, connections=2)
        restorer = Restorer(repo, index, replace(opts, **options), group_entries)
        await restorer.plan(snap.tree, None)
        after_plan = _nodes_alive()
        most = 0
        async with anyio.create_task_group() as tg:

            async def sample() -> None:
                nonlocal most
                while True:
                    most = max(most, _nodes_alive())
                    await anyio.sleep(0.01)

            tg.start_soon(sample)
            stats = await restorer.run()
            tg.cancel_scope.cancel()
    finally:
        await backend.aclose()
    return stats, after_plan, most


def _nodes_alive() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, Node))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_many_groups_restore_everything_right(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
    anyio_backend: str,
) -> None:
    src = tmp_path / "src"
    _many_small_files(src)
    make_everything_tree(src / "everything")  # big, sparse and special files too
    before = snapshot_of(src)
    cairn.run("backup", str(src), check=True)
    target = tmp_path / "t"
    stats, after_plan, most = await _restore(cairn, target, group_entries=7)
    assert stats.errors == []
    assert stats.pipeline is not None
    after = snapshot_of(target / str(src).lstrip("/"))
    assert after.keys() == before.keys()
    for rel, meta in before.items():
        assert after[rel] == meta, rel
    # The plan holds what is in flight, not the snapshot: ~500 files here. (Before the
    # walk streamed, every node was alive from plan() to the end.)
    files = DIRS * FILES_PER_DIR
    assert after_plan < 50
    assert most < files / 2, most
    os.chmod(target / str(src).lstrip("/") / "d3", 0o755)  # let tmp_path be removed
    os.chmod(target / str(src).lstrip("/") / "everything" / "readonly-dir", 0o755)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_many_groups_resume_verify_delete_and_dry_run(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
    anyio_backend: str,
) -> None:
    src = tmp_path / "src"
    _many_small_files(src)
    os.chmod(src / "d3", 0o755)
    cairn.run("backup", str(src), check=True)
    target = tmp_path / "t"
    base = target / str(src).lstrip("/")
    stats, _, _ = await _restore(cairn, target, group_entries=5)
    assert stats.errors == [] and stats.files == DIRS * FILES_PER_DIR
    # Local changes: one file changed, one removed, extra files in two directories.
    (base / "d2" / "f010").write_bytes(b"changed")
    (base / "d4" / "f020").unlink()
    (base / "d0" / "extra").write_text("x")
    (base / "d6" / "extra-dir").mkdir()
    (base / "d6" / "extra-dir" / "inside").write_text("x")
    dry, _, _ = await _restore(cairn, target, group_entries=5, delete=True, dry_run=True)
    assert (dry.files, dry.deleted) == (2, 3) and dry.pipeline is None
    assert (base / "d0" / "extra").exists()
    stats, _, _ = await _restore(cairn, target, group_entries=5, delete=True, verify=True)
    assert stats.errors == []
    assert (stats.files, stats.deleted) == (2, 3)
    assert stats.files_skipped == DIRS * FILES_PER_DIR - 2
    # Every path of a file, written, kept or hardlinked (two hardlinks).
    assert stats.verified == DIRS * FILES_PER_DIR + 2
    assert snapshot_of(base) == snapshot_of(src)
    assert stat.S_IMODE((base / "d3").stat().st_mode) == 0o755


def test_the_process_collects_garbage_rarely_and_never_rescans_startup() -> None:
    """Every command runs with the collector tuned (cli/memory.py): its first
    threshold raised far above Python's 700 and what startup loaded frozen. At the
    default it took ~2 of the main process's CPU-s on 200,000 small files, in a
    restore as in a backup."""
    from cairn.cli.memory import tune_gc

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        tune_gc()
        assert gc.get_threshold()[0] >= 20_000
        assert gc.get_freeze_count() > frozen
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
