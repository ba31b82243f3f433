"""The per-stage table of backup, restore, ``check --read-data`` and prune's repack:
``-v`` prints it with a ``bottleneck:`` line, ``--json`` puts its rows in the summary;
run on a real local repository through the command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cairn.pipeline.options import cores
from tests.cli_helpers import Cairn
from tests.maintenance_helpers import copy_repo, new_cairn

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Cairn:
    tmp = tmp_path_factory.mktemp("stage-table")
    c = new_cairn(tmp)
    src = tmp / "src"
    (src / "dir").mkdir(parents=True)
    # Two 5 MiB files of random data: more than a download range (at most 8 MiB).
    for i in range(2):
        (src / f"big{i}.bin").write_bytes(os.urandom(5 * MiB))
    for i in range(20):
        (src / "dir" / f"small{i}.txt").write_text(f"small {i}\n")
    c.run("backup", str(src), check=True)
    return c


@pytest.fixture
def repo(template: Cairn, tmp_path: Path) -> Cairn:
    return copy_repo(template, tmp_path)


def _stages(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["stage"]: row for row in summary["stages"]}


def _table(out: str, names: list[str]) -> list[str]:
    """The table's heading and rows, checked to name the stages in order."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "tasks"])
    rows = lines[start + 1 : start + 1 + len(names)]
    assert [row.split()[0] for row in rows] == names
    assert "wait in %" in lines[start] and "wait out %" in lines[start]
    assert "busy %" in lines[start] and "throttled %" in lines[start]
    return rows


def test_restore_verbose_prints_the_table_and_bottleneck(repo: Cairn, tmp_path: Path) -> None:
    r = repo.run("restore", "latest", "-t", str(tmp_path / "out"), "-v")
    assert r.code == 0, r.out + r.err
    _table(r.out, ["plan", "download", "decode", "account"])
    lines = [line for line in r.out.splitlines() if line.startswith("bottleneck:")]
    assert len(lines) == 1
    stage = lines[0].split()[1]
    assert stage in ("plan", "download", "decode", "account")
    assert "tune: " in lines[0]


def test_restore_json_summary_has_stages_and_bottleneck(repo: Cairn, tmp_path: Path) -> None:
    r = repo.run("restore", "latest", "-t", str(tmp_path / "out"), "--json")
    assert r.code == 0, r.out + r.err
    summary = r.json_lines()[-1]
    assert summary["message_type"] == "summary"
    assert [row["stage"] for row in summary["stages"]] == ["plan", "download", "decode", "account"]
    rows = _stages(summary)
    ranges = rows["download"]["items"]
    assert ranges >= 2  # 10 MiB: more than one range
    # Each range planned is downloaded once, decoded once, accounted once.
    assert rows["plan"]["out"] == ranges
    assert rows["download"]["out"] == ranges
    assert rows["decode"]["items"] == ranges == rows["decode"]["out"]
    assert rows["account"]["items"] == ranges
    # The ranges hold every stored byte of the two files (encrypted, so a bit more).
    assert rows["download"]["bytes"] == rows["decode"]["bytes"] >= 10 * MiB
    for row in summary["stages"]:
        for key in ("busy_pct", "wait_in_pct", "wait_out_pct", "throttled_pct"):
            assert 0 <= row[key] <= 100
    assert summary["bottleneck"]["stage"] in rows
    assert summary["bottleneck"]["hint"]
    # Not in the -v table's form: --json prints only JSON lines.
    assert not any(line.startswith("bottleneck:") for line in r.out.splitlines())


def test_restore_under_a_download_limit_names_the_limit(repo: Cairn, tmp_path: Path) -> None:
    # 10 MiB at 4 MiB/s: the download stage waits for the token bucket for seconds,
    # while decoding 10 MiB takes a fraction of one.
    r = repo.run(
        "restore", "latest", "-t", str(tmp_path / "out"), "--json", "--limit-download", "4096"
    )
    assert r.code == 0, r.out + r.err
    summary = r.json_lines()[-1]
    assert summary["bottleneck"]["stage"] == "download"
    assert "--limit-download" in summary["bottleneck"]["hint"]
    assert _stages(summary)["download"]["throttled_pct"] > 0


def test_restore_with_nothing_to_download(repo: Cairn, tmp_path: Path) -> None:
    target = tmp_path / "out"
    repo.run("restore", "latest", "-t", str(target), check=True)
    # Everything already there: no pipeline runs, the fields say so.
    r = repo.run("restore", "latest", "-t", str(target), "--json")
    assert r.code == 0, r.out + r.err
    summary = r.json_lines()[-1]
    assert summary["files_skipped"] > 0
    assert summary["stages"] == [] and summary["bottleneck"] is None
    r = repo.run("restore", "latest", "-t", str(target), "-v")
    assert not any(line.startswith("bottleneck:") for line in r.out.splitlines())


def test_check_read_data_verbose_and_json(repo: Cairn) -> None:
    r = repo.run("check", "--read-data", "-v")
    assert r.code == 0, r.out + r.err
    _table(r.out, ["plan", "download", "verify", "report"])
    assert sum(line.startswith("bottleneck:") for line in r.out.splitlines()) == 1

    r = repo.run("check", "--read-data", "--json")
    assert r.code == 0, r.out + r.err
    summary = r.json_lines()[-1]
    rows = _stages(summary)
    assert list(rows) == ["plan", "download", "verify", "report"]
    # One download per pack read, each verified and reported once.
    packs = summary["packs_read"]
    assert packs >= 2
    assert rows["plan"]["out"] == rows["download"]["items"] == packs
    assert rows["verify"]["items"] == rows["report"]["items"] == packs
    assert rows["download"]["bytes"] == summary["bytes_read"]
    assert summary["bottleneck"]["stage"] in rows


def test_check_without_read_data_has_no_stages(repo: Cairn) -> None:
    summary = repo.run("check", "--json", check=True).json_lines()[-1]
    assert summary["stages"] == [] and summary["bottleneck"] is None


BACKUP_STAGES = ["walk", "read", "encode", "pack", "upload", "index"]


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "bsrc"
    (src / "dir").mkdir(parents=True)
    for i in range(2):
        (src / f"big{i}.bin").write_bytes(os.urandom(3 * MiB))
    for i in range(30):
        (src / "dir" / f"small{i}.txt").write_text(f"small {i}\n")
    return src


def test_backup_verbose_prints_the_table_and_bottleneck(repo: Cairn, tmp_path: Path) -> None:
    r = repo.run("backup", str(_source(tmp_path)), "-v")
    assert r.code == 0, r.out + r.err
    _table(r.out, BACKUP_STAGES)
    lines = [line for line in r.out.splitlines() if line.startswith("bottleneck:")]
    assert len(lines) == 1 and lines[0].split()[1] in BACKUP_STAGES


def test_backup_json_summary_has_stages_and_bottleneck(repo: Cairn, tmp_path: Path) -> None:
    src = _source(tmp_path)
    summary = repo.run("backup", str(src), "--json", check=True).json_lines()[-1]
    assert summary["message_type"] == "summary"
    assert [row["stage"] for row in summary["stages"]] == BACKUP_STAGES
    rows = _stages(summary)
    # Every file the walk sent on was read: the two large ones alone, the 30 small
    # ones in one batch; every blob encoded reached "pack", plus the trees through
    # its inlet (the source directory, "dir", and the directories above it).
    assert rows["walk"]["out"] == rows["read"]["items"] == 3
    assert rows["read"]["bytes"] == summary["bytes_read"]
    assert rows["encode"]["items"] == rows["read"]["out"] >= 2
    assert rows["pack"]["items"] == rows["encode"]["out"] + summary["tree_blobs"]
    assert rows["upload"]["items"] == rows["pack"]["out"] == rows["index"]["items"] >= 2
    for row in summary["stages"]:
        for key in ("busy_pct", "wait_in_pct", "wait_out_pct", "throttled_pct"):
            assert 0 <= row[key] <= 100
    assert summary["bottleneck"]["stage"] in rows and summary["bottleneck"]["hint"]

    # Nothing changed: nothing is read or encoded (the worker pool never starts).
    again = repo.run("backup", str(src), "--json", check=True).json_lines()[-1]
    rows = _stages(again)
    assert rows["read"]["items"] == rows["encode"]["items"] == 0
    assert rows["walk"]["out"] == 0


def test_backup_under_an_upload_limit_names_the_limit(repo: Cairn, tmp_path: Path) -> None:
    # 6 MiB of random data at 2 MiB/s: the token bucket holds the run for seconds;
    # reading and encoding 6 MiB take a fraction of one. A local backend is charged
    # per whole pack, so "pack" pays before handing a pack over (no upload task
    # holds a pack while it waits): the limit shows there.
    r = repo.run("--limit-upload", "2048", "backup", str(_source(tmp_path)), "--json")
    assert r.code == 0, r.out + r.err
    summary = r.json_lines()[-1]
    assert summary["bottleneck"]["stage"] == "pack"
    assert "--limit-upload" in summary["bottleneck"]["hint"]
    rows = _stages(summary)
    assert rows["pack"]["throttled_pct"] > 0 and rows["upload"]["throttled_pct"] == 0


@pytest.fixture
def pruneable(repo: Cairn, tmp_path: Path) -> Cairn:
    """Two more snapshots of a directory whose second big file changed between them;
    all but the last forgotten. The data pack holding both versions of the second
    file and the unchanged first is partly used, so prune repacks it."""
    src = tmp_path / "src2"
    src.mkdir()
    for i in range(2):
        (src / f"big{i}.bin").write_bytes(os.urandom(5 * MiB))
    repo.run("backup", str(src), check=True)
    (src / "big1.bin").write_bytes(os.urandom(5 * MiB))
    repo.run("backup", str(src), check=True)
    repo.run("forget", "--keep-last", "1", check=True)
    return repo


REPACK_STAGES = ["plan", "download", "verify", "pack", "upload", "index"]


def test_prune_json_summary_has_stages_and_bottleneck(pruneable: Cairn) -> None:
    out = pruneable.run("prune", "--max-unused", "0", "--json", check=True).json()
    assert out["packs_repack"] >= 1
    assert [row["stage"] for row in out["stages"]] == REPACK_STAGES
    rows = _stages(out)
    ranges = rows["download"]["items"]
    assert ranges >= 1 and rows["plan"]["out"] == ranges == rows["verify"]["items"]
    # Each kept blob is verified once and packed once: among them the unchanged
    # 5 MiB file, stored as it was (random data: a bit more than 5 MiB).
    assert rows["verify"]["out"] == rows["pack"]["items"] >= 1
    assert rows["download"]["bytes"] >= rows["upload"]["bytes"] >= 5 * MiB
    # Each new pack uploaded once and passed to the index stage once.
    assert rows["pack"]["out"] == rows["upload"]["items"] == out["packs_written"] >= 1
    assert rows["index"]["items"] == out["packs_written"]
    assert out["bottleneck"]["stage"] in rows and out["bottleneck"]["hint"]
    # Nothing left to repack: no pipeline ran.
    again = pruneable.run("prune", "--max-unused", "0", "--json", check=True).json()
    assert again["stages"] == [] and again["bottleneck"] is None


def test_prune_verbose_prints_the_table(pruneable: Cairn) -> None:
    r = pruneable.run("prune", "--max-unused", "0", "-v")
    assert r.code == 0, r.out + r.err
    _table(r.out, REPACK_STAGES)
    assert sum(line.startswith("bottleneck:") for line in r.out.splitlines()) == 1


def test_widths_come_from_flags_else_the_backend(repo: Cairn, tmp_path: Path) -> None:
    """One place decides the widths: --connections, else the location's own count
    (``-o local.connections``, else the local default 4); --cpu-workers and
    --read-concurrency likewise (the stage table shows each stage's tasks)."""
    src = _source(tmp_path)

    def tasks(*args: str) -> dict[str, int]:
        summary = repo.run(*args, "backup", "--force", str(src), "--json", check=True)
        return {s: row["tasks"] for s, row in _stages(summary.json_lines()[-1]).items()}

    default = tasks()
    # read: --read-concurrency readers of large files, and one task more per worker
    # for batches of small files (worker jobs)
    assert default["upload"] == 4 and default["read"] == 2 + cores()
    assert tasks("-o", "local.connections=3")["upload"] == 3
    flags = tasks("-o", "local.connections=3", "--connections", "2", "--read-concurrency", "3")
    assert flags["upload"] == 2 and flags["read"] == 3 + cores()
    one = tasks("--cpu-workers", "1")
    assert one["encode"] == 2 and one["read"] == 3  # two jobs in flight per worker
    restored = repo.run(
        "-o", "local.connections=3", "restore", "latest", "--target", str(tmp_path / "t"), "--json"
    ).json_lines()[-1]
    assert _stages(restored)["download"]["tasks"] == 3
