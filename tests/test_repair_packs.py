"""``cairn repair packs`` through the real command line: salvage a damaged pack's
intact blobs, then ``repair snapshots`` and ``check``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import cairn as cairn_package
from cairn.backends.faulty import ENV_VAR
from tests.cli_helpers import CAIRN, Cairn, Result
from tests.conftest_cli import cairn  # noqa: F401 - fixture
from tests.maintenance_helpers import copy_repo, describe, flip_byte, pack_files

# The copies of the packs land in the current directory (as restic's do): run the
# command in a directory of the test's own, importing this cairn.
_SOURCE_ROOT = str(Path(cairn_package.__file__).parents[1])


def _run_in(c: Cairn, cwd: Path, *args: str, faults: str = "") -> Result:
    cmd = [*CAIRN, "-r", str(c.repo), "--password-file", str(c.password_file), "--insecure-kdf"]
    env = c.env | {"PYTHONPATH": _SOURCE_ROOT} | ({ENV_VAR: faults} if faults else {})
    proc = subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, timeout=600)
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def _data_pack(c: Cairn, src: Path) -> tuple[str, list[tuple[int, int]]]:
    """Back up three small files (one data pack, a blob each); the pack and its
    blobs' (offset, length), in order."""
    src.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        (src / name).write_bytes(os.urandom(40_000))
    c.run("backup", str(src), check=True)
    info = describe(c.repo)
    (pack,) = [p for p, t in info["pack_type"].items() if t == 0]
    return pack, sorted(info["blobs"][pack])


def _restored(c: Cairn, src: Path, target: Path) -> dict[str, bytes]:
    c.run("restore", "latest", "--target", str(target), check=True)
    root = target / str(src).lstrip("/")
    return {p.name: p.read_bytes() for p in root.iterdir()}


def test_repair_packs_keeps_the_intact_blobs_of_a_damaged_pack(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    pack, blobs = _data_pack(cairn, src)
    assert len(blobs) == 3
    path = pack_files(cairn.repo)[pack]
    path.chmod(0o600)
    flip_byte(path, blobs[1][0] + 100)  # inside the second blob only
    damaged = path.read_bytes()
    assert cairn.run("check", "--read-data").code == 1

    work = tmp_path / "work"
    work.mkdir()
    r = _run_in(cairn, work, "repair", "packs", pack, "--json")
    assert r.code == 0, r.err
    summary = r.json_lines()[-1]
    assert summary["salvaged"] == 2 and summary["packs_removed"] == [pack]
    assert len(summary["lost"]) == 1 and summary["lost"][0]["pack"] == pack
    assert (work / f"pack-{pack}").read_bytes() == damaged  # the copy, as it was
    assert pack not in pack_files(cairn.repo)

    r = cairn.run("check")
    assert r.code == 1 and "not in the index" in r.out  # the lost blob
    cairn.run("repair", "snapshots", "--forget", check=True)
    r = cairn.run("check", "--read-data")
    assert r.code == 0, r.out
    restored = _restored(cairn, src, tmp_path / "t")
    intact = {n for n in ("a.bin", "b.bin", "c.bin") if restored[n] == (src / n).read_bytes()}
    assert len(intact) == 2
    (lost,) = {"a.bin", "b.bin", "c.bin"} - intact
    assert restored[lost] == b""


def test_repair_packs_salvages_a_truncated_pack_from_the_index(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """No header to read: the index entries say where the blobs are."""
    src = tmp_path / "src"
    pack, blobs = _data_pack(cairn, src)
    path = pack_files(cairn.repo)[pack]
    path.chmod(0o600)
    end_of_second = blobs[1][0] + blobs[1][1]
    path.write_bytes(path.read_bytes()[: end_of_second + 10])  # header and third blob cut

    r = _run_in(cairn, tmp_path, "repair", "packs", pack)
    assert r.code == 0, r.err
    assert "salvaged 2 blobs into 1 new packs, lost 1; removed 1 packs" in r.out
    assert "past the end of the pack" in r.err
    assert "Use `cairn repair snapshots --forget`" in r.err
    cairn.run("repair", "snapshots", "--forget", check=True)
    assert cairn.run("check", "--read-data").code == 0
    restored = _restored(cairn, src, tmp_path / "t")
    assert sum(restored[n] == (src / n).read_bytes() for n in restored) == 2


def test_repair_packs_wrong_input_changes_nothing(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    pack, _blobs = _data_pack(cairn, tmp_path / "src")
    (tmp_path / f"pack-{pack}").write_bytes(b"a copy from an earlier run")
    before = sorted(p.name for p in Path(cairn.repo).rglob("*") if p.is_file())
    cases = [
        ((), "no pack IDs given"),
        (("abc",), "invalid pack ID 'abc'"),
        (("0" * 64,), "is neither in the index nor in the repository"),
        ((pack,), "already exists: move it away"),
    ]
    for args, phrase in cases:
        r = _run_in(cairn, tmp_path, "repair", "packs", *args)
        assert r.code == 1, (args, r.err)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0], (args, r.err)
    assert sorted(p.name for p in Path(cairn.repo).rglob("*") if p.is_file()) == before
    assert cairn.run("check", "--read-data").code == 0


def test_repair_packs_killed_at_each_write_then_run_again(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Writes: lock, new pack, its index, the superseding index, old index removed,
    damaged pack removed, lock removed. A kill before any of them loses nothing, and
    the command run again (reusing its copy of the pack) finishes the job."""
    src = tmp_path / "src"
    pack, blobs = _data_pack(cairn, src)
    path = pack_files(cairn.repo)[pack]
    path.chmod(0o600)
    flip_byte(path, blobs[0][0] + 100)
    for n in range(2, 7):
        run = tmp_path / f"kill{n}"
        run.mkdir()
        c = copy_repo(cairn, run)
        killed = _run_in(c, run, "repair", "packs", pack, faults=f"write#{n}=kill")
        assert killed.code == -9, (n, killed.err)
        again = _run_in(c, run, "repair", "packs", pack)
        assert again.code == 0, (n, again.err)
        assert pack not in pack_files(c.repo), n
        c.run("repair", "snapshots", "--forget", check=True)
        r = c.run("check", "--read-data")
        assert r.code == 0, (n, r.out)
        restored = _restored(c, src, run / "t")
        assert sum(restored[x] == (src / x).read_bytes() for x in restored) == 2, n
