"""Restore on a bad day, through the real CLI: filters with ``--delete``, corrupt data
and trees, entries that cannot be restored, trees deeper than PATH_MAX, a full disk.

The rule under test everywhere: one entry that cannot be restored is one line naming
its path and cause; everything else is restored; exit code 1 with a summary; nothing
is left looking restored that is not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.cli_helpers import Cairn, Result
from tests.conftest_cli import cairn  # noqa: F401 - fixture

MiB = 1024 * 1024


def _summary(result: Result) -> dict[str, Any]:
    summary: dict[str, Any] = result.json_lines()[-1]
    assert summary["message_type"] == "summary", result.out
    return summary


def _errors(result: Result) -> dict[str, str]:
    """path → message of the JSON error lines a ``--json`` restore printed."""
    out = {}
    for line in result.err.splitlines():
        if line.startswith("{"):
            msg = json.loads(line)
            if msg.get("message_type") == "error":
                out[msg["item"]] = msg["error"]["message"]
    return out


def _under(target: Path, src: Path) -> Path:
    return target / str(src).lstrip("/")


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


# -- --delete within the filters ---------------------------------------------------------


def test_delete_with_include_touches_only_what_the_filters_select(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "music").mkdir()
    (src / "docs" / "a.txt").write_text("a")
    (src / "music" / "song").write_text("la")
    cairn.run("backup", str(src), check=True)
    target = tmp_path / "t"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    base = _under(target, src)
    # Local changes: unrelated files beside and outside the restored subdirectory,
    # and stale files inside it.
    (base / "music" / "new-song").write_text("mine")
    (base / "unrelated.txt").write_text("mine")
    (target / "elsewhere").mkdir()
    (target / "elsewhere" / "x").write_text("mine")
    (base / "docs" / "stale.txt").write_text("old")
    (base / "docs" / "stale-dir" / "deeper").mkdir(parents=True)
    (base / "docs" / "stale-dir" / "deeper" / "f").write_text("old")

    args = ("restore", "latest", "--target", str(target), "--include", "*/docs", "--delete")
    dry = cairn.run(*args, "--dry-run", "-v")
    assert dry.code == 0, dry.err
    assert "would delete 4 entries" in dry.out
    would = sorted(
        line.split(" ", 2)[2] for line in dry.out.splitlines() if line.startswith("would delete /")
    )
    assert would == sorted(
        str(base / "docs" / p)
        for p in ("stale.txt", "stale-dir", "stale-dir/deeper", "stale-dir/deeper/f")
    )
    assert (base / "docs" / "stale.txt").exists(), "a dry run deleted something"

    real = cairn.run(*args, "--json")
    assert real.code == 0, real.err
    assert _summary(real)["deleted"] == 4
    assert not (base / "docs" / "stale.txt").exists()
    assert not (base / "docs" / "stale-dir").exists()
    assert (base / "docs" / "a.txt").read_text() == "a"
    # Outside what --include selects, nothing is deleted.
    assert (base / "music" / "new-song").read_text() == "mine"
    assert (base / "unrelated.txt").read_text() == "mine"
    assert (target / "elsewhere" / "x").read_text() == "mine"


def test_delete_with_exclude_and_subpath(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "a.txt").write_text("a")
    cairn.run("backup", str(src), check=True)
    target = tmp_path / "t"
    target.mkdir()
    (target / "extra.txt").write_text("x")
    (target / "notes.log").write_text("excluded: never deleted")
    # SNAPSHOT:PATH maps the subtree onto the target root: extras there are deleted,
    # excluded ones are not.
    result = cairn.run(
        "restore",
        f"latest:{src}",
        "--target",
        str(target),
        "--delete",
        "--exclude",
        "*.log",
        "--json",
    )
    assert result.code == 0, result.err
    assert _summary(result)["deleted"] == 1
    assert sorted(p.name for p in target.iterdir()) == ["keep", "notes.log"]
