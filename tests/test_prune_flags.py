"""``prune``'s restic 0.19 flags through the real command line: the thresholds change
what is repacked, small packs merge, ``--dry-run`` writes nothing, bad values are
one line and exit 1."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from cairn.backends.local import LocalBackend
from cairn.repo.lock import Lock, encode_lock
from cairn.repo.repository import open_repository
from tests.cli_helpers import Cairn
from tests.maintenance_helpers import (
    PASSWORD,
    copy_repo,
    describe,
    make_history,
    new_cairn,
    pack_files,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Cairn:
    """Three snapshots, the two oldest forgotten (not pruned): packs partly used."""
    tmp = tmp_path_factory.mktemp("prune-flags-template")
    c = new_cairn(tmp)
    make_history(c, tmp / "src")
    c.run("forget", "--keep-last", "1", check=True)
    return c


@pytest.fixture(scope="module")
def many_small(tmp_path_factory: pytest.TempPathFactory) -> Cairn:
    """Twelve backups of one new small file each: a small data pack and a small tree
    pack per backup, all blobs in use."""
    tmp = tmp_path_factory.mktemp("prune-small-template")
    c = new_cairn(tmp)
    src = tmp / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i:02}").write_bytes(os.urandom(30_000))
        c.run("backup", str(src), check=True)
    return c


def _dry(c: Cairn, *args: str) -> dict[str, Any]:
    r = c.run("prune", "--dry-run", "--json", *args)
    assert r.code == 0, r.err
    out: dict[str, Any] = r.json()
    return out


def _tree(repo: Path | str) -> dict[str, int]:
    root = Path(repo)
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and "locks" not in p.parts
    }


def test_max_unused_threshold_decides_what_is_repacked(template: Cairn, tmp_path: Path) -> None:
    c = copy_repo(template, tmp_path)
    base = _dry(c, "--max-unused", "unlimited")
    # Unused bytes left once the wholly unused packs are deleted: what repacking frees.
    left = base["bytes"]["unused"] - base["bytes"]["remove"]
    used = base["bytes"]["used"]
    assert left > 0 and base["packs_repack"] == 0
    # A size just above what is left: nothing to repack; just below: something.
    assert _dry(c, "--max-unused", str(left + 1))["packs_repack"] == 0
    assert _dry(c, "--max-unused", str(left - 1))["packs_repack"] >= 1
    # The same as percentages of the size after pruning (restic's meaning):
    # unused / (used + unused) <= pct.
    fraction = 100 * left / (used + left)
    assert _dry(c, "--max-unused", f"{fraction + 0.5:.2f}%")["packs_repack"] == 0
    assert _dry(c, "--max-unused", f"{fraction - 0.5:.2f}%")["packs_repack"] >= 1
    # --max-repack-size bounds the bytes repacked, whatever --max-unused asks.
    everything = _dry(c, "--max-unused", "0")
    assert everything["packs_repack"] >= 1
    limited = _dry(c, "--max-unused", "0", "--max-repack-size", "1")
    assert limited["packs_repack"] == 0 and limited["packs_delete"] == everything["packs_delete"]


def test_dry_run_writes_nothing_and_lists_packs_with_verbose(
    template: Cairn, tmp_path: Path
) -> None:
    c = copy_repo(template, tmp_path)
    before = _tree(c.repo)
    r = c.run("prune", "--dry-run", "--max-unused", "0", "-v")
    assert r.code == 0, r.err
    assert _tree(c.repo) == before
    out = _dry(c, "--max-unused", "0", "-v")
    ids = out["pack_ids"]
    assert len(ids["delete"]) == out["packs_delete"] >= 1
    assert len(ids["repack"]) == out["packs_repack"] >= 1
    for pack_id in ids["delete"] + ids["repack"]:
        assert pack_id in r.out and pack_id in pack_files(c.repo)
    assert "would delete packs:" in r.out and "would repack packs:" in r.out
    # Without -v: counts only.
    assert "pack_ids" not in _dry(c, "--max-unused", "0")
    assert ids["delete"][0] not in c.run("prune", "--dry-run").out
    assert _tree(c.repo) == before
    # The real run does what the dry run said.
    done = c.run("prune", "--max-unused", "0", "--json", check=True).json()
    assert done["packs_deleted"] == len(ids["delete"]) + len(ids["repack"])
    assert not set(ids["delete"] + ids["repack"]) & set(pack_files(c.repo))


def test_restic_shaped_statistics(template: Cairn, tmp_path: Path) -> None:
    c = copy_repo(template, tmp_path)
    out = _dry(c, "--max-unused", "0")
    assert out["packfiles"]["remove"] == out["packs_delete"]
    assert out["packfiles"]["repack"] == out["packs_repack"]
    assert (
        out["packfiles"]["total"]
        == out["packfiles"]["keep"]
        + out["packs_delete"]
        + out["packs_repack"]
        + out["packs_unindexed"]
    )
    b = out["bytes"]
    assert b["remaining_unused"] == out["unused_bytes_after"] == 0
    assert b["remove_total"] == b["remove"] + b["repack_remove"] + b["unreferenced"]
    assert out["blobs"]["used"] == out["used_blobs"]


def test_repack_cacheable_only_rewrites_tree_packs_only(tmp_path: Path) -> None:
    # Two directories; the second changes; the first backup is forgotten: its tree
    # pack and its data pack each hold blobs still in use (d1's) and blobs not.
    c = new_cairn(tmp_path)
    src = tmp_path / "src"
    for d in ("d1", "d2"):
        (src / d).mkdir(parents=True)
        (src / d / "f").write_bytes(os.urandom(100_000))
    first = c.run("backup", str(src), "--json", check=True).json_lines()[-1]["snapshot_id"]
    (src / "d2" / "f").write_bytes(os.urandom(100_000))
    c.run("backup", str(src), check=True)
    c.run("forget", first, check=True)
    types = describe(c.repo)["pack_type"]
    every = _dry(c, "--max-unused", "0", "-v")["pack_ids"]
    assert {types[p] for p in every["repack"]} == {0, 1}  # data and tree packs
    only = _dry(c, "--max-unused", "0", "--repack-cacheable-only", "-v")["pack_ids"]
    assert only["repack"] and {types[p] for p in only["repack"]} == {1}
    assert only["delete"] == every["delete"]  # wholly unused data packs still go


def test_small_packs_merge(many_small: Cairn, tmp_path: Path) -> None:
    c = copy_repo(many_small, tmp_path)
    out = _dry(c)
    assert out["unused_bytes"] == 0 and out["packs_delete"] == 0
    assert out["packs_repack"] == out["packs_total"] == 24, out
    assert 0 < out["target_pack_size"] < 4 * 1024 * 1024
    # Below --repack-smaller-than nothing is small here.
    assert _dry(c, "--repack-smaller-than", "1K")["packs_repack"] == 0
    # Nine small packs are not worth merging (restic's rule: at least ten).
    done = c.run("prune", "--json", check=True).json()
    assert done["packs_written"] == 2  # one data pack, one tree pack
    assert len(pack_files(c.repo)) == 2
    r = c.run("check", "--read-data")
    assert r.code == 0 and "no errors were found" in r.out, r.out + r.err
    again = _dry(c)
    assert again["packs_repack"] == 0  # two small packs: kept


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--max-unused", "100%"), "percentage must be in [0, 100)"),
        (("--max-unused", "-1%"), "percentage must be in [0, 100)"),
        (("--max-unused", "abc%"), "invalid percentage"),
        (("--max-unused", "lots"), "invalid size"),
        (("--max-repack-size", "1X"), "--max-repack-size"),
        (("--repack-smaller-than", "big"), "--repack-smaller-than"),
        (("--repack-smaller-than", "0"), "must be larger than zero"),
        (("--repack-smaller-than", "1G"), "exceeds the pack size"),
        (("--no-lock",), "--no-lock is only allowed with prune --dry-run"),
        (("--repack-uncompressed", "--compression", "off"), "exclude each other"),
    ],
)
def test_bad_prune_flags_are_one_line_exit_1(
    template: Cairn, tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    c = copy_repo(template, tmp_path)
    before = _tree(c.repo)
    r = c.run("prune", *args)
    lines = [line for line in r.err.splitlines() if line.startswith("cairn: ")]
    assert r.code == 1 and len(lines) == 1 and says in lines[0], r.err
    assert "Traceback" not in r.err
    assert _tree(c.repo) == before


async def _write_lock(root: Path, lock: Lock) -> None:
    repo = await open_repository(LocalBackend(root), PASSWORD)
    await repo.save_sealed("locks", encode_lock(lock))


def test_no_lock_dry_run_ignores_a_held_lock(template: Cairn, tmp_path: Path) -> None:
    c = copy_repo(template, tmp_path)
    now = time.time_ns()
    anyio.run(_write_lock, Path(c.repo), Lock(True, "elsewhere", "x", 1, now, now))
    assert c.run("prune", "--dry-run").code == 11  # the other host's exclusive lock
    out = c.run("--no-lock", "prune", "--dry-run", "--json")
    assert out.code == 0 and out.json()["dry_run"], out.err


def test_repack_uncompressed_is_accepted_and_changes_nothing(
    template: Cairn, tmp_path: Path
) -> None:
    """cairn compresses every blob zstd can shrink: the flag is a no-op (see
    docs/maintenance.md), accepted so that restic's scripts run."""
    c = copy_repo(template, tmp_path)
    plain = _dry(c, "-v")
    flagged = _dry(c, "-v", "--repack-uncompressed")
    assert flagged["pack_ids"] == plain["pack_ids"]
    # restic's deprecated --repack-small is accepted too (small packs merge anyway).
    assert _dry(c, "-v", "--repack-small")["pack_ids"] == plain["pack_ids"]
    r = c.run("forget", "--keep-last", "1", "--prune", "--repack-uncompressed")
    assert r.code == 0, r.err
