"""``cairn check``: damage injected into the repository files and through the faulty
backend; each report names exactly the damaged object."""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import pytest
import trio
import trio.testing

from cairn.backends.faulty import FaultyBackend
from cairn.backends.local import LocalBackend
from cairn.pipeline import SlotPool
from cairn.repo.repository import open_repository
from cairn.stages.check import (
    Checker,
    CheckOptions,
    Subset,
    parse_subset,
    select_packs,
)
from cairn.stages.fetch import Batch, DownloadPace, download, downloads_needed
from tests.cli_helpers import Cairn
from tests.maintenance_helpers import (
    PASSWORD,
    copy_repo,
    describe,
    error_lines,
    flip_byte,
    make_history,
    new_cairn,
    objects,
    pack_files,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Cairn:
    tmp = tmp_path_factory.mktemp("check-template")
    c = new_cairn(tmp)
    make_history(c, tmp / "src")
    return c


@pytest.fixture
def repo(template: Cairn, tmp_path: Path) -> Cairn:
    return copy_repo(template, tmp_path)


def _data_pack(c: Cairn) -> str:
    info = describe(c.repo)
    return sorted(p for p, t in info["pack_type"].items() if t == 0)[0]


def test_clean_repository_passes(repo: Cairn) -> None:
    r = repo.run("check", "--read-data")
    assert r.code == 0, r.out + r.err
    assert "no errors were found" in r.out
    r = repo.run("check", "--json")
    summary = r.json_lines()[-1]
    assert summary["errors"] == 0 and summary["snapshots"] == 3


def test_deleted_pack(repo: Cairn) -> None:
    pack = _data_pack(repo)
    pack_files(repo.repo)[pack].unlink()
    r = repo.run("check")
    assert r.code == 1
    lines = error_lines(r.out)
    assert len(lines) == 1, r.out
    assert lines[0].startswith(f"error: pack {pack}") and "missing" in lines[0]


def test_flipped_byte_in_pack_blob(repo: Cairn) -> None:
    pack = _data_pack(repo)
    offset, length = describe(repo.repo)["blobs"][pack][0]
    flip_byte(pack_files(repo.repo)[pack], offset + length // 2)
    assert repo.run("check").code == 0  # structure is intact; only the data is not
    r = repo.run("check", "--read-data")
    assert r.code == 1
    lines = error_lines(r.out)
    assert len(lines) == 2, r.out
    assert any(line.startswith(f"error: pack {pack}: content does not match") for line in lines)
    assert any(line.startswith("error: data blob ") and f"in pack {pack}" in line for line in lines)


def test_flipped_byte_in_pack_header(repo: Cairn) -> None:
    pack = _data_pack(repo)
    path = pack_files(repo.repo)[pack]
    flip_byte(path, path.stat().st_size - 20)
    r = repo.run("check")
    assert r.code == 1
    assert error_lines(r.out) == [
        line for line in r.out.splitlines() if line.startswith(f"error: pack {pack}: unreadable")
    ]
    assert len(error_lines(r.out)) == 1


def test_truncated_pack(repo: Cairn) -> None:
    pack = _data_pack(repo)
    path = pack_files(repo.repo)[pack]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    r = repo.run("check")
    assert r.code == 1
    lines = error_lines(r.out)
    assert len(lines) == 1 and lines[0].startswith(f"error: pack {pack}"), r.out


def test_damaged_tree_spoils_only_that_tree(tmp_path: Path) -> None:
    # Trees are read a range of neighbouring blobs at a time: one bad tree in the
    # range must not hide its neighbours (each is authenticated on its own).
    c = new_cairn(tmp_path)
    src = tmp_path / "src"
    for name in ("a", "b", "c"):
        (src / name).mkdir(parents=True)
        (src / name / "file").write_bytes(os.urandom(1000))
    c.run("backup", str(src), check=True)
    clean = c.run("check", "--json").json_lines()[-1]
    info = describe(c.repo)
    (tree_pack,) = (p for p, t in info["pack_type"].items() if t == 1)
    # Trees are written children first: the first is one of a/, b/ and c/ (which one
    # depends on which directory the backup finished first), the other two next.
    offset, length = sorted(info["blobs"][tree_pack])[0]
    flip_byte(pack_files(c.repo)[tree_pack], offset + length // 2)
    r = c.run("check", "--json")
    assert r.code == 1
    problems = [line for line in r.json_lines() if line.get("message_type") == "error"]
    assert len(problems) == 1 and problems[0]["object"] == "tree", problems
    assert "cannot be read" in problems[0]["message"]
    assert problems[0]["path"].rsplit("/", 1)[-1] in ("a", "b", "c"), problems
    summary = r.json_lines()[-1]
    assert (summary["trees"], summary["data_blobs"]) == (clean["trees"], clean["data_blobs"] - 1)


def test_flipped_byte_in_snapshot(repo: Cairn) -> None:
    snaps = objects(repo.repo, "snapshots")
    sid = sorted(snaps)[1]
    flip_byte(snaps[sid], 40)
    r = repo.run("check")
    assert r.code == 1
    assert error_lines(r.out) == [f"error: snapshot {sid}: content does not match its name"]


def test_flipped_byte_in_index(repo: Cairn) -> None:
    info = describe(repo.repo)
    index_id = sorted(info["by_index"])[0]
    flip_byte(objects(repo.repo, "index")[index_id], 40)
    r = repo.run("check")
    assert r.code == 1
    lines = error_lines(r.out)
    assert lines[0] == f"error: index {index_id}: content does not match its name"
    # Everything else follows from the lost index: its packs are unindexed (warnings)
    # and blobs only it listed are "not in the index".
    assert all("not in the index" in line for line in lines[1:]), r.out
    for pack in info["by_index"][index_id]:
        assert f"warning: pack {pack}: not referenced by any index" in r.out


def test_missing_index(repo: Cairn) -> None:
    info = describe(repo.repo)
    index_id = sorted(info["by_index"])[-1]
    objects(repo.repo, "index")[index_id].unlink()
    r = repo.run("check")
    assert r.code == 1
    assert error_lines(r.out) and all("not in the index" in x for x in error_lines(r.out))
    for pack in info["by_index"][index_id]:
        assert f"warning: pack {pack}: not referenced by any index" in r.out


def test_unreferenced_pack_is_a_warning_and_duplicates_are_info(repo: Cairn) -> None:
    # An index file listing an existing pack again as another file would is fine; a
    # copy of a pack's content under a new name is an unreferenced pack.
    pack = _data_pack(repo)
    src = pack_files(repo.repo)[pack]
    fake = "ab" + "0" * 62
    (repo.repo / "data" / "ab").mkdir(exist_ok=True)
    (repo.repo / "data" / "ab" / fake).write_bytes(src.read_bytes())
    r = repo.run("check")
    assert r.code == 0, r.out
    assert f"warning: pack {fake}: not referenced by any index" in r.out


def test_subset_parsing_and_selection() -> None:
    assert parse_subset("2/5") == Subset("bucket", n=2, t=5)
    assert parse_subset("10%") == Subset("percent", value=10.0)
    assert parse_subset("500M") == Subset("size", value=500 * 1024 * 1024)
    for bad in ("0/3", "4/3", "0%", "101%", "lots"):
        with pytest.raises(ValueError):
            parse_subset(bad)
    packs = {f"{i:02x}" + "0" * 62: 1000 for i in range(256)}
    buckets = [
        set(select_packs(packs, Subset("bucket", n=n, t=3), random.Random(0))) for n in (1, 2, 3)
    ]
    assert set().union(*buckets) == set(packs) and sum(map(len, buckets)) == 256
    assert len(select_packs(packs, Subset("percent", value=10), random.Random(1))) == 26
    assert len(select_packs(packs, Subset("size", value=5500), random.Random(1))) == 6


def test_read_data_subset_cli(repo: Cairn) -> None:
    total = 0
    for n in (1, 2):
        r = repo.run("check", "--read-data-subset", f"{n}/2", "--json")
        assert r.code == 0
        total += r.json_lines()[-1]["packs_read"]
    assert total == len(pack_files(repo.repo))
    r = repo.run("check", "--read-data-subset", "1K", "--json")
    assert r.code == 0 and r.json_lines()[-1]["packs_read"] >= 1
    assert repo.run("check", "--read-data-subset", "nonsense").code == 1


async def _check_through(root: Path, faults: str, read_data: bool) -> list[str]:
    backend = FaultyBackend(LocalBackend(root), faults)
    repo = await open_repository(backend, PASSWORD)
    try:
        result = await Checker(repo, CheckOptions(read_data=read_data, cpu_workers=1)).run()
    finally:
        await backend.aclose()
    return [p.line() for p in result.errors]


def test_faulty_backend_flipped_and_truncated_loads(repo: Cairn) -> None:
    packs = set(pack_files(repo.repo))
    # Every pack read back with one flipped byte: each pack reports a hash mismatch.
    lines = anyio.run(_check_through, repo.repo, "load:data/=flip:50", True)
    mismatched = {line.split()[2].rstrip(":") for line in lines if "does not match" in line}
    assert mismatched == packs
    # Truncated reads of pack tails: every pack's header is reported unreadable.
    lines = anyio.run(_check_through, repo.repo, "load:data/=truncate:1", False)
    assert {
        line.split()[2].rstrip(":") for line in lines if line.startswith("error: pack")
    } == packs


def test_check_exit_code_is_1_with_problem_count_on_stderr(repo: Cairn) -> None:
    os.remove(pack_files(repo.repo)[_data_pack(repo)])
    r = repo.run("check", "--json")
    assert r.code == 1
    docs = r.json_lines()
    assert docs[0]["message_type"] == "error" and docs[0]["object"] == "pack"
    assert docs[-1]["errors"] == 1
    assert "check found 1 errors" in r.err


def test_downloads_needed_keeps_the_workers_fed_and_no_more() -> None:
    # A local disk: a pack in 8 ms, a worker verifies one in 25 ms.
    assert downloads_needed(2, 0.008, 0.025, 4) == 1
    assert downloads_needed(2, 0.02, 0.025, 4) == 2
    # A remote store slower per pack than the workers: every connection.
    assert downloads_needed(2, 0.5, 0.025, 5) == 5
    # Nothing measured yet: no limit below the connections.
    assert downloads_needed(2, 0.0, 0.025, 5) == 5


class _SlowLoads:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        await trio.sleep(self.seconds)
        return b"pack"


@pytest.mark.trio
async def test_download_pace_follows_the_slower_side(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = _SlowLoads(1.0)
    pace = DownloadPace(backend, workers=2, most=5)
    assert pace.limiter.total_tokens == 1  # one load until both sides are measured
    assert await pace.load("data/00/00") == b"pack"  # (the first is not measured)
    await pace.load("data/00/00")
    pace.verified(0.1)
    assert pace.limiter.total_tokens == 2  # downloads are the slow side: one more each time
    for _ in range(5):
        await pace.load("data/00/00")
    assert pace.limiter.total_tokens == 5  # up to every connection
    backend.seconds = 0.001
    for _ in range(20):  # downloads became fast: back to one
        await pace.load("data/00/00")
        pace.verified(0.1)
    assert pace.limiter.total_tokens == 1


@pytest.mark.trio
async def test_a_download_waiting_for_its_turn_holds_no_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pace = DownloadPace(_SlowLoads(1.0), workers=2, most=4)
    slots = SlotPool(16, 3)
    fetch = pace.paced(download(pace, slots))
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(fetch, Batch(bytes(32), 0, 4, []))
            await trio.sleep(0.5)
            # One turn: one download under way with its slot, two waiting with none.
            assert slots.in_use == 1
            nursery.cancel_scope.cancel()
    finally:
        slots.close()
