"""``cairn list``, ``cairn cache`` and ``cairn generate`` through the real command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture


def _backup(c: Cairn, tmp_path: Path) -> str:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n" * 1000)
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    c.run("backup", str(src), check=True)
    return str(c.run("snapshots", "--json", check=True).json()[0]["id"])


def _ids_below(directory: Path) -> set[str]:
    return {p.name for p in directory.rglob("*") if p.is_file()}


def test_list_prints_the_ids_of_each_kind(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    first = _backup(cairn, tmp_path)
    (tmp_path / "src" / "c.txt").write_text("gamma\n")
    cairn.run("backup", str(tmp_path / "src"), check=True)
    repo = Path(cairn.repo)

    snapshots = cairn.run("list", "snapshots", check=True).out.split()
    assert first in snapshots
    assert set(snapshots) == _ids_below(repo / "snapshots") and len(snapshots) == 2
    assert cairn.run("list", "packs", check=True).out.split() != []
    assert set(cairn.run("list", "packs", check=True).out.split()) == _ids_below(repo / "data")
    assert set(cairn.run("list", "index", check=True).out.split()) == _ids_below(repo / "index")
    assert set(cairn.run("list", "keys", check=True).out.split()) == _ids_below(repo / "keys")
    assert cairn.run("list", "locks", check=True).out == ""

    blobs = [line.split() for line in cairn.run("list", "blobs", check=True).out.splitlines()]
    types = {t for t, _ in blobs}
    assert types == {"data", "tree"}
    # Every tree of the snapshot is listed as a tree blob.
    tree = cairn.run("cat", "snapshot", first, check=True).json()["tree"]
    assert ["tree", tree] in blobs
    assert len({b for _, b in blobs}) == len(blobs)

    lines = cairn.run("--json", "list", "blobs", check=True).json_lines()
    assert sorted((x["type"], x["id"]) for x in lines) == sorted((t, b) for t, b in blobs)


def test_list_refuses_an_unknown_kind(cairn: Cairn) -> None:  # noqa: F811
    result = cairn.run("list", "trees")
    assert result.code == 1
    assert "trees" in result.err and "snapshots" in result.err


def _cache_root(c: Cairn) -> Path:
    return Path(c.env["XDG_CACHE_HOME"]) / "cairn"


def _age(path: Path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(path, (then, then))


def test_cache_lists_and_cleans_up_old_caches(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    _backup(cairn, tmp_path)
    root = _cache_root(cairn)
    (current,) = [p for p in root.iterdir() if p.is_dir()]
    old = root / ("ab" * 32)
    (old / "index").mkdir(parents=True)
    (old / "index" / "x").write_bytes(b"x" * 5000)
    _age(old, 40)
    _age(current, 3)

    listed = {x["repository_id"]: x for x in cairn.run("--json", "cache", check=True).json_lines()}
    assert listed.keys() == {current.name, old.name}
    assert listed[old.name]["old"] is True and listed[old.name]["age_days"] == 40
    assert listed[old.name]["size"] == 5000
    assert listed[current.name]["old"] is False and listed[current.name]["age_days"] == 3
    table = cairn.run("cache", check=True).out
    assert "2 cache directories" in table and "1 old" in table

    # Opening the repository marks its cache as used.
    cairn.run("snapshots", check=True)
    assert time.time() - current.stat().st_mtime < 60

    # The 40-day-old cache goes; the one just used stays.
    result = cairn.run("cache", "--cleanup", "--max-age", "10", check=True)
    assert "removed 1 old cache directories" in result.err
    assert not old.exists() and current.exists()


def test_cleanup_cache_flag_removes_old_caches_when_a_command_runs(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    _backup(cairn, tmp_path)
    root = _cache_root(cairn)
    recent, stale = root / ("cd" * 32), root / ("ef" * 32)
    for path, days in ((recent, 29), (stale, 31)):
        path.mkdir()
        _age(path, days)
    cairn.run("snapshots", check=True)
    assert stale.exists()  # only when asked
    cairn.run("--cleanup-cache", "snapshots", check=True)
    assert not stale.exists() and recent.exists()


def _cairn_wrapper(tmp_path: Path, env: dict[str, str]) -> Path:
    """An executable ``cairn`` that runs this checkout's command line."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "cairn"
    root = Path(__file__).resolve().parent.parent
    wrapper.write_text(
        f'#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} -m cairn.cli.main "$@"\n'
    )
    wrapper.chmod(0o755)
    return bindir


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_and_options(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    script = tmp_path / "cairn.bash"
    cairn.run("generate", "--bash-completion", str(script), base=False, check=True)
    bindir = _cairn_wrapper(tmp_path, cairn.env)

    def complete(*words: str) -> list[str]:
        program = (
            f"source {script}\n"
            f"COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}\n"
            '_cairn_completion cairn\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        env = cairn.env | {"PATH": f"{bindir}:{os.environ['PATH']}"}
        out = subprocess.run(
            ["bash", "-c", program], env=env, capture_output=True, check=True, timeout=60
        )
        return out.stdout.decode().split()

    assert complete("cairn", "li") == ["list"]
    assert complete("cairn", "list", "sn") == ["snapshots"]
    assert "--exclude-file" in complete("cairn", "backup", "--exclude-f")


def test_generate_writes_zsh_fish_scripts_and_man_pages(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    zsh = cairn.run("generate", "--zsh-completion", "-", base=False, check=True).out
    assert "#compdef cairn" in zsh and "_CAIRN_COMPLETE=zsh_complete" in zsh
    fish = cairn.run("generate", "--fish-completion", "-", base=False, check=True).out
    assert "_CAIRN_COMPLETE=fish_complete" in fish

    man = tmp_path / "man"
    cairn.run("generate", "--man", str(man), base=False, check=True)
    pages = {p.name for p in man.iterdir()}
    # Every command, and the commands of groups (key add, repair snapshots...).
    assert {"cairn.1", "cairn-backup.1", "cairn-restore.1", "cairn-list.1"} <= pages
    assert "cairn-key-add.1" in pages and "cairn-repair-snapshots.1" in pages
    backup = (man / "cairn-backup.1").read_text()
    assert backup.startswith(".TH") and "exclude\\-file" in backup

    result = cairn.run("generate", base=False)
    assert result.code == 1 and "nothing to generate" in result.err
