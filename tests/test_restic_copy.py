"""``cairn copy --from-repo restic:LOCATION``: restic history into cairn, through the
real CLI, from repositories the real ``restic`` writes (format 1 and 2, local and S3).

Every copied snapshot restores identical to what restic itself restores; a second
run copies nothing; a damaged pack fails only the snapshots that need it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.servers")

from tests.cli_helpers import Cairn, Result  # noqa: E402
from tests.servers import S3_KEY, S3_SECRET, location_for  # noqa: E402
from tests.treeutil import make_everything_tree, snapshot_of  # noqa: E402

pytest_plugins = ["tests.servers"]

RESTIC_PASSWORD = "the restic password"


def restic(repo: str, *args: str, env: dict[str, str] | None = None) -> str:
    full_env = {
        **os.environ,
        "RESTIC_PASSWORD": RESTIC_PASSWORD,
        "RESTIC_CACHE_DIR": "/nonexistent-restic-cache",
        **(env or {}),
    }
    proc = subprocess.run(
        ["restic", "--no-cache", "-q", "-r", repo, *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _dest(tmp_path: Path, env: dict[str, str] | None = None) -> Cairn:
    password = tmp_path / "cairn.password"
    password.write_text("the cairn password\n")
    c = Cairn(tmp_path / "cairn-repo", password, extra_env=env)
    c.run("init", check=True)
    (tmp_path / "restic.password").write_text(RESTIC_PASSWORD + "\n")
    return c


def _copy(dest: Cairn, location: str, *args: str) -> Result:
    return dest.run(
        "--json",
        "copy",
        "--from-repo",
        f"restic:{location}",
        "--from-password-file",
        str(Path(dest.password_file).parent / "restic.password"),
        *args,
    )


def _summary(result: Result) -> dict[str, Any]:
    summary: dict[str, Any] = result.json_lines()[-1]
    assert summary["message_type"] == "summary", (result.out, result.err)
    return summary


def _history(tmp_path: Path, repo: str, env: dict[str, str] | None = None) -> Path:
    """Three restic snapshots of a tree with every kind of entry, changing between."""
    tree = tmp_path / "tree"
    make_everything_tree(tree)
    restic(repo, "backup", "--host", "alpha", "--tag", "daily", str(tree), env=env)
    (tree / "small.txt").write_text("edited\n")
    (tree / "new-file").write_bytes(os.urandom(700_000))
    restic(repo, "backup", "--host", "alpha", "--tag", "daily,extra", str(tree), env=env)
    shutil.rmtree(tree / "empty-dir")
    restic(repo, "backup", "--host", "beta", str(tree), env=env)
    return tree


def _same_restores(dest: Cairn, repo: str, tmp_path: Path) -> None:
    """Every copied snapshot restores from cairn as restic restores the original."""
    originals = {s["id"] for s in json.loads(restic(repo, "snapshots", "--json"))}
    copies = dest.run("snapshots", "--json", check=True).json()
    assert len(copies) == len(originals)
    for i, snap in enumerate(copies):
        source_id = _original(dest, snap["id"])
        assert source_id in originals
        mine, theirs = tmp_path / f"cairn-{i}", tmp_path / f"restic-{i}"
        dest.run("restore", snap["id"], "--target", str(mine), check=True)
        restic(repo, "restore", source_id, "--target", str(theirs))
        assert snapshot_of(mine) == snapshot_of(theirs), snap
        shutil.rmtree(mine)
        shutil.rmtree(theirs)


def _original(dest: Cairn, snapshot_id: str) -> str:
    value: str = dest.run("cat", "snapshot", snapshot_id, check=True).json()["original"]
    return value


@pytest.mark.parametrize("version", ["1", "2"])
def test_copy_from_restic_restores_as_restic_does(tmp_path: Path, version: str) -> None:
    repo = str(tmp_path / "restic-repo")
    restic(repo, "init", "--repository-version", version)
    _history(tmp_path, repo)
    dest = _dest(tmp_path)

    first = _copy(dest, repo)
    assert first.code == 0, first.err
    summary = _summary(first)
    assert summary["snapshots_copied"] == 3 and summary["snapshots_failed"] == 0
    snaps = dest.run("snapshots", "--json", check=True).json()
    assert sorted((s["hostname"], tuple(s["tags"])) for s in snaps) == [
        ("alpha", ("daily",)),
        ("alpha", ("daily", "extra")),
        ("beta", ()),
    ]
    _same_restores(dest, repo, tmp_path)
    assert not list(Path(repo, "locks").iterdir())  # our restic lock is gone
    # Compressed either way: format 2's zstd frames are kept (re-encrypted only),
    # format 1's raw blobs are compressed now. The tree's log compresses ~20-fold.
    raw = dest.run("stats", "--mode", "raw-data", "--json", check=True).json()
    assert raw["total_size"] < raw["total_uncompressed_size"] * 0.7, raw

    again = _summary(_copy(dest, repo))
    assert (again["snapshots_copied"], again["snapshots_skipped"]) == (0, 3)
    assert again["data_blobs"] == 0 and again["tree_blobs"] == 0
    assert dest.run("check", "--read-data").code == 0


def test_a_damaged_restic_pack_fails_only_the_snapshots_needing_it(tmp_path: Path) -> None:
    repo = str(tmp_path / "restic-repo")
    restic(repo, "init")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "only-here.bin").write_bytes(os.urandom(2_000_000))
    (second / "elsewhere.bin").write_bytes(os.urandom(2_000_000))
    before = set(Path(repo, "data").rglob("*"))
    restic(repo, "backup", str(first))
    first_packs = [p for p in set(Path(repo, "data").rglob("*")) - before if p.is_file()]
    restic(repo, "backup", str(second))
    # The first backup wrote one data pack (and a tree pack): damage the biggest.
    victim = max(first_packs, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))

    dest = _dest(tmp_path)
    result = _copy(dest, repo)
    assert result.code == 1, result.err
    summary = _summary(result)
    assert (summary["snapshots_copied"], summary["snapshots_failed"]) == (1, 1)
    assert "authentication failed" in summary["failed"][0]["error"]
    target = tmp_path / "restored"
    dest.run("restore", "latest", "--target", str(target), check=True)
    assert (target / str(second).lstrip("/") / "elsewhere.bin").read_bytes() == (
        second / "elsewhere.bin"
    ).read_bytes()


def test_wrong_restic_password_is_one_line_and_exit_12(tmp_path: Path) -> None:
    repo = str(tmp_path / "restic-repo")
    restic(repo, "init")
    dest = _dest(tmp_path)
    (tmp_path / "restic.password").write_text("not it\n")
    result = _copy(dest, repo)
    assert result.code == 12, result.err
    assert "source repository: wrong password" in result.err
    missing = _copy(dest, str(tmp_path / "nothing-here"))
    assert missing.code == 10 and "source repository" in missing.err


def test_copy_from_a_restic_repository_on_s3(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url, _options = location_for("s3", request, tmp_path)
    endpoint_and_path = url[len("s3:") :]
    env = {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    restic_repo = f"s3:{endpoint_and_path}"
    restic(restic_repo, "init", env=env)
    tree = tmp_path / "tree"
    make_everything_tree(tree)
    restic(restic_repo, "backup", str(tree), env=env)
    dest = _dest(tmp_path, env=env)
    result = dest.run(
        "--json",
        "copy",
        "--from-repo",
        f"restic:{url}",
        "--from-option",
        "s3.region=us-east-1",
        "--from-password-file",
        str(tmp_path / "restic.password"),
    )
    assert result.code == 0, result.err
    assert _summary(result)["snapshots_copied"] == 1
    target = tmp_path / "restored"
    dest.run("restore", "latest", "--target", str(target), check=True)
    assert snapshot_of(target / str(tree).lstrip("/")) == snapshot_of(tree)
