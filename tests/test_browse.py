"""snapshots, ls, find, diff and dump through the real command."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "report.odt").write_bytes(b"report v1")
    (src / "docs" / "notes.txt").write_text("notes")
    (src / "code").mkdir()
    (src / "code" / "main.py").write_text("print('hi')\n")
    (src / "link").symlink_to("docs/notes.txt")
    return src


def test_ls_find_dump(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = _tree(tmp_path)
    cairn.run("backup", str(src), "--tag", "t1", check=True)
    out = cairn.run("ls", "latest", check=True).out.splitlines()
    assert f"{src}/docs/report.odt" in out and f"{src}/code" in out
    lines = cairn.run("ls", "latest", f"{src}/docs", "--json", check=True).json_lines()
    assert lines[0]["struct_type"] == "snapshot"
    assert {n["name"] for n in lines[1:]} == {"docs", "report.odt", "notes.txt"}
    long = cairn.run("ls", "-l", "latest", f"{src}/link", check=True).out
    assert "lrwxrwxrwx" in long and "-> docs/notes.txt" in long
    found = cairn.run("find", "*.odt", check=True).out
    assert f"{src}/docs/report.odt" in found and "notes" not in found
    found = cairn.run("find", "-i", "MAIN.PY", "--json", check=True).json_lines()
    assert found[0]["hits"] == 1
    dumped = cairn.run("dump", "latest", f"{src}/docs/report.odt", check=True).out
    assert dumped == "report v1"
    tar_bytes = cairn.run_bytes("dump", "latest", f"{src}/docs")
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = sorted(tar.getnames())
        member = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("notes.txt")))
        assert member is not None and member.read() == b"notes"
    assert any(n.endswith("docs/report.odt") for n in names)
    r = cairn.run("ls", "latest", "/no/such/path")
    assert r.code == 1 and "not found" in r.err


def test_diff_and_snapshot_filters(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = _tree(tmp_path)
    cairn.run("backup", str(src), "--host", "alpha", check=True)
    (src / "docs" / "report.odt").write_bytes(b"report v2")
    (src / "code" / "main.py").unlink()
    (src / "new.txt").write_text("new")
    os.chmod(src / "docs" / "notes.txt", 0o600)
    cairn.run("backup", str(src), "--host", "beta", "--tag", "x,y", check=True)
    snaps = cairn.run("snapshots", "--json", check=True).json()
    assert [s["hostname"] for s in snaps] == ["alpha", "beta"]
    only = cairn.run("snapshots", "--json", "--host", "alpha", check=True).json()
    assert len(only) == 1
    assert len(cairn.run("snapshots", "--json", "--tag", "x", check=True).json()) == 1
    assert len(cairn.run("snapshots", "--json", "--tag", "x,z", check=True).json()) == 0
    grouped = cairn.run(
        "snapshots", "--json", "--group-by", "host", "--latest", "1", check=True
    ).json()
    assert len(grouped) == 2
    lines = cairn.run(
        "diff", snaps[0]["short_id"], snaps[1]["short_id"], "--json", check=True
    ).json_lines()
    changes = {line["path"]: line["modifier"] for line in lines if line["message_type"] == "change"}
    assert changes[f"{src}/docs/report.odt"] == "M"
    assert changes[f"{src}/code/main.py"] == "-"
    assert changes[f"{src}/new.txt"] == "+"
    assert changes[f"{src}/docs/notes.txt"] == "U"
    stats = lines[-1]
    assert stats["modified"] == 1 and stats["added"] == 1 and stats["removed"] == 1
