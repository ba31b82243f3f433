"""``check`` of selected snapshots (restic 0.19 #3326): damage reachable only from
an unselected snapshot is not looked at; the same damage in a selected one is
reported. And ``check --json`` in restic's shape."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import Cairn
from tests.maintenance_helpers import copy_repo, describe, flip_byte, new_cairn, pack_files


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two snapshots of unrelated trees, tagged ``a`` and ``b``; the packs each one
    added (a data pack and a tree pack)."""
    tmp = tmp_path_factory.mktemp("check-filter-template")
    c = new_cairn(tmp)
    added: dict[str, set[str]] = {}
    ids: dict[str, str] = {}
    paths: dict[str, str] = {}
    for name in ("a", "b"):
        src = tmp / f"src-{name}" / "inner"
        src.mkdir(parents=True)
        (src / "file").write_bytes(os.urandom(200_000))
        before = set(pack_files(c.repo))
        out = c.run("backup", str(src.parent), "--tag", name, "--json", check=True)
        ids[name] = out.json_lines()[-1]["snapshot_id"]
        added[name] = set(pack_files(c.repo)) - before
        paths[name] = str(src.parent)
    return {"cairn": c, "ids": ids, "added": added, "paths": paths}


def _pack_of(template: dict[str, Any], name: str, kind: int, repo: Path) -> tuple[Path, int]:
    """A pack ``name``'s backup added, of ``kind`` (0 data, 1 tree), and the middle
    of its first blob."""
    info = describe(repo)
    pack = next(p for p in sorted(template["added"][name]) if info["pack_type"][p] == kind)
    offset, length = info["blobs"][pack][0]
    return pack_files(repo)[pack], offset + length // 2


def _check(c: Cairn, *args: str) -> tuple[int, list[dict[str, Any]]]:
    r = c.run("check", "--json", *args)
    lines = r.json_lines()
    assert lines[-1]["message_type"] == "summary", r.out
    return r.code, lines


def test_damaged_data_is_read_only_for_selected_snapshots(
    template: dict[str, Any], tmp_path: Path
) -> None:
    c = copy_repo(template["cairn"], tmp_path)
    ids = template["ids"]
    path, offset = _pack_of(template, "a", 0, Path(c.repo))
    flip_byte(path, offset)
    # b's snapshot: a's packs are not read.
    for selection in (("--tag", "b"), (ids["b"][:8],), ("--host", "no-such-host", ids["b"])):
        code, lines = _check(c, "--read-data", *selection)
        summary = lines[-1]
        assert code == 0 and summary["errors"] == 0, lines
        assert summary["snapshots"] == 1 and summary["filtered"]
        assert 0 < summary["packs_read"] < summary["packs"]
    # a's snapshot, or everything: the damaged pack is read and reported.
    for selection in (("--tag", "a"), (ids["a"],), ()):
        code, lines = _check(c, "--read-data", *selection)
        summary = lines[-1]
        assert code == 1 and path.name in summary["broken_packs"], lines
        assert summary["num_errors"] == summary["errors"] >= 1
    # A subset picks among the selected snapshot's packs only.
    code, lines = _check(c, "--read-data-subset", "1/1", "--tag", "b")
    assert code == 0 and lines[-1]["packs_read"] < lines[-1]["packs"]


def test_damaged_tree_is_walked_only_for_selected_snapshots(
    template: dict[str, Any], tmp_path: Path
) -> None:
    c = copy_repo(template["cairn"], tmp_path)
    ids = template["ids"]
    path, offset = _pack_of(template, "a", 1, Path(c.repo))
    flip_byte(path, offset)
    code, lines = _check(c, "--tag", "b")
    assert code == 0 and lines[-1]["snapshots"] == 1, lines
    code, lines = _check(c, ids["a"][:10])
    trees = [x for x in lines if x["message_type"] == "error" and x["object"] == "tree"]
    assert code == 1 and trees and all(x["snapshot"] == ids["a"] for x in trees), lines
    assert c.run("check", "--path", template["paths"]["b"]).code == 0
    assert c.run("check", "--path", template["paths"]["a"]).code == 1
    assert c.run("check", "--tag", "a").code == 1
    assert c.run("check", "latest", "--tag", "b").code == 0  # latest among b's


def test_no_match_is_a_warning_and_a_bad_id_fails(template: dict[str, Any], tmp_path: Path) -> None:
    c = copy_repo(template["cairn"], tmp_path)
    code, lines = _check(c, "--tag", "nothing-has-this")
    assert code == 0 and lines[-1]["snapshots"] == 0
    assert any(x["message_type"] == "warning" and "no snapshot" in x["message"] for x in lines)
    r = c.run("check", "ffffffffffff" if not template["ids"]["a"].startswith("ff") else "0000000")
    err = [line for line in r.err.splitlines() if line.startswith("cairn: ")]
    assert r.code == 1 and len(err) == 1 and "no snapshots object matches" in err[0], r.err


def test_read_data_and_subset_exclude_each_other(template: dict[str, Any]) -> None:
    r = template["cairn"].run("check", "--read-data", "--read-data-subset", "1/2")
    err = [line for line in r.err.splitlines() if line.startswith("cairn: ")]
    assert r.code == 1 and len(err) == 1 and "cannot be used together" in err[0], r.err


def test_check_json_lines(template: dict[str, Any], tmp_path: Path) -> None:
    """Every stdout line parses; problems carry restic's ``message_type`` and
    ``message``; the summary has cairn's and restic's fields."""
    c = copy_repo(template["cairn"], tmp_path)
    (Path(c.repo) / "data" / "00").mkdir(exist_ok=True)
    stray = Path(c.repo) / "data" / "00" / ("00" * 32)
    stray.write_bytes(b"x" * 100)  # an unindexed file: a warning, prune removes it
    code, lines = _check(c)
    assert code == 0
    warning = next(x for x in lines if x["message_type"] == "warning")
    assert set(warning) >= {"message_type", "object", "id", "message"}
    summary = lines[-1]
    for key in ("errors", "warnings", "snapshots", "trees", "data_blobs", "packs"):
        assert isinstance(summary[key], int), key
    assert summary["suggest_prune"] is True and summary["suggest_repair_index"] is False
    assert summary["broken_packs"] == [] and summary["num_errors"] == 0
    assert summary["filtered"] is False
