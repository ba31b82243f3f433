"""Every command end to end through the real ``cairn`` CLI, on every backend.

For local, sftp (OpenSSH), s3 (SeaweedFS and moto), rest (``rclone serve restic``) and rclone
(``--stdio``): init, backup, snapshots, restore (bytes compared), browsing, check
--read-data, a second backup, forget --keep-last 1 --prune, restore again. Backend
options travel as ``-o key=value`` flags and S3 credentials as AWS environment
variables, exactly as a user would pass them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.servers")

from tests.cli_helpers import Cairn  # noqa: E402
from tests.servers import S3_KEY, S3_SECRET, location_for  # noqa: E402
from tests.treeutil import snapshot_of  # noqa: E402

pytest_plugins = ["tests.servers"]

E2E_KINDS = ("local", "sftp", "s3", "s3-moto", "rest", "rclone")


def _cli_for(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Cairn:
    """A CLI runner for a fresh repository of ``kind``, with its ``-o`` flags and env."""
    url, options = location_for(kind, request, tmp_path)
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}
    if kind.startswith("s3"):
        env |= {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        }
    password = tmp_path / "password"
    password.write_text("e2e password\n")
    flags = tuple(f"--option={key}={value}" for key, value in options.items())
    return Cairn(url, password, extra_env=env, global_args=flags)


def _make_tree(root: Path) -> None:
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "docs" / "readme.txt").write_text("hello from the e2e test\n" * 50)
    (root / "docs" / "deep" / "notes.md").write_bytes(b"# notes\n" + bytes(range(256)) * 40)
    (root / "random.bin").write_bytes(os.urandom(1_500_000))
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("docs/readme.txt")


def _contents(root: Path) -> dict[bytes, tuple[int, object]]:
    """Kind and bytes (or link target) of every entry: what must survive a round trip."""
    return {rel: (meta[0], meta[5]) for rel, meta in snapshot_of(root).items()}


def _restored(cli: Cairn, src: Path, target: Path, snapshot: str = "latest") -> Path:
    cli.run("restore", snapshot, "--target", str(target), check=True)
    return target / str(src).lstrip("/")


@pytest.mark.parametrize("kind", E2E_KINDS)
def test_every_command_on_backend(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cli = _cli_for(kind, request, tmp_path)
    src = tmp_path / "src"
    _make_tree(src)
    first_tree = _contents(src)

    cli.run("init", check=True)
    first = cli.run("backup", str(src), "--json", check=True).json_lines()[-1]
    assert first["message_type"] == "summary" and first["errors"] == 0
    assert first["files_new"] == 4

    snaps = cli.run("snapshots", "--json", check=True).json()
    assert [s["id"] for s in snaps] == [first["snapshot_id"]]

    assert _contents(_restored(cli, src, tmp_path / "restore1")) == first_tree

    listing = cli.run("ls", "latest", check=True).out
    assert "notes.md" in listing and "random.bin" in listing
    found = cli.run("find", "notes.md", check=True).out
    assert "deep/notes.md" in found
    dumped = cli.run_bytes("dump", "latest", str(src / "docs" / "readme.txt"))
    assert dumped == (src / "docs" / "readme.txt").read_bytes()
    assert cli.run("key", "list", check=True).code == 0
    assert cli.run("cat", "config", check=True).code == 0
    assert cli.run("stats", check=True).code == 0

    # A second backup with a change, then browse the difference.
    (src / "random.bin").write_bytes(os.urandom(700_000))
    (src / "docs" / "new.txt").write_text("added later\n")
    second_tree = _contents(src)
    second = cli.run("backup", str(src), "--json", check=True).json_lines()[-1]
    assert second["parent"] == first["snapshot_id"]
    assert second["files_new"] == 1 and second["files_changed"] == 1
    diff = cli.run("diff", first["snapshot_id"], second["snapshot_id"], check=True).out
    assert "new.txt" in diff and "random.bin" in diff

    checked = cli.run("check", "--read-data")
    assert checked.code == 0, checked.err

    cli.run("tag", "--add", "e2e", second["snapshot_id"], check=True)
    forgot = cli.run("forget", "--keep-last", "1", "--prune")
    assert forgot.code == 0, forgot.err
    snaps = cli.run("snapshots", "--json", check=True).json()
    assert len(snaps) == 1 and snaps[0]["tags"] == ["e2e"]
    assert snaps[0]["id"] != second["snapshot_id"]  # tagging rewrote it

    # What is left is whole: read every byte again, and restore the survivor.
    checked = cli.run("check", "--read-data")
    assert checked.code == 0, checked.err
    assert _contents(_restored(cli, src, tmp_path / "restore2")) == second_tree
    assert cli.run("unlock", check=True).code == 0
