"""The standing fault campaign, part 3: a hostile environment rather than a crash.

* the repository's disk fills up during a backup (a small tmpfs; needs root);
* several backups run at once into one repository while ``forget --prune`` races them.

After each: a clear one-line error where one is due, ``check`` clean, and every
snapshot restores byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.cli_helpers import CAIRN, Cairn, Result
from tests.fault_helpers import assert_check_clean, assert_restores, snapshot_ids
from tests.maintenance_helpers import PASSWORD
from tests.servers import RestServer
from tests.treeutil import snapshot_of

pytest_plugins = ["tests.servers"]


def _backup(c: Cairn, src: Path) -> str:
    r = c.run("--no-cache", "backup", str(src), "--json", check=True)
    snap: str = r.json_lines()[-1]["snapshot_id"]
    return snap


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 3 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_on_the_repository_during_backup(small_disk: Path, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    c = Cairn(small_disk / "repo", password)  # the cache stays off the small disk
    c.run("init", check=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text("fits\n")
    first = _backup(c, src)
    expected = {first: snapshot_of(src)}

    (src / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))  # more than the disk
    r = c.run("--no-cache", "backup", str(src))
    assert r.code == 1, r.out + r.err
    errors = [line for line in r.err.splitlines() if line.startswith("cairn:")]
    assert len(errors) == 1, r.err
    assert "no space left on device" in errors[0].lower(), r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    # Nothing half-written stays behind under a final name or as a temporary file.
    assert not [p for p in (small_disk / "repo").rglob("*") if ".tmp" in p.name]

    assert_check_clean(c)
    assert snapshot_ids(c) == [first]
    assert_restores(c, expected, src, tmp_path)

    (src / "big.bin").write_bytes(os.urandom(1024 * 1024))  # now it fits
    second = _backup(c, src)
    expected[second] = snapshot_of(src)
    assert_check_clean(c)
    assert_restores(c, expected, src, tmp_path)
    assert c.run("--no-cache", "prune").code == 0
    assert "warning" not in assert_check_clean(c).out


def test_full_temporary_directory_during_backup(
    small_disk: Path, tmp_path: Path, rest_server: RestServer
) -> None:
    """Packs for a remote repository are assembled in $TMPDIR (as restic does): when
    it fills up, one line names it, and nothing is lost."""
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    repo = f"rest:{rest_server.url}{uuid.uuid4().hex[:12]}"
    c = Cairn(repo, password, extra_env={"TMPDIR": str(small_disk)})
    c.run("init", check=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text("fits\n")
    first = _backup(c, src)
    expected = {first: snapshot_of(src)}

    (src / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))  # more than $TMPDIR
    r = c.run("--no-cache", "backup", str(src))
    assert r.code == 1, r.out + r.err
    errors = [line for line in r.err.splitlines() if line.startswith("cairn:")]
    assert len(errors) == 1, r.err
    assert f"temporary pack file in {small_disk}: No space left on device" in errors[0]
    assert "Traceback" not in r.err and "internal error" not in r.err
    assert os.listdir(small_disk) == []  # the spooled packs had no name to leave

    assert_check_clean(c)
    assert snapshot_ids(c) == [first]
    c.env["TMPDIR"] = str(tmp_path)
    second = _backup(c, src)
    expected[second] = snapshot_of(src)
    assert_check_clean(c)
    assert_restores(c, expected, src, tmp_path)


def test_local_repository_assembles_packs_in_its_own_directory(
    small_disk: Path, tmp_path: Path
) -> None:
    """A local repository's packs are made on its own filesystem and linked into
    place: a full $TMPDIR does not matter to it."""
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    c = Cairn(tmp_path / "repo", password, extra_env={"TMPDIR": str(small_disk)})
    c.run("init", check=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))  # more than $TMPDIR
    first = _backup(c, src)
    assert os.listdir(small_disk) == []
    assert_check_clean(c)
    assert_restores(c, {first: snapshot_of(src)}, src, tmp_path)


def _start(c: Cairn, *args: str) -> subprocess.Popen[bytes]:
    cmd = [*CAIRN, "-r", str(c.repo), "--password-file", str(c.password_file)]
    cmd += ["--insecure-kdf", "--no-cache", *args]
    return subprocess.Popen(cmd, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[bytes]) -> Result:
    out, err = proc.communicate(timeout=300)
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def test_concurrent_backups_with_forget_and_prune_racing(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    c = Cairn(tmp_path / "repo", password)
    c.run("init", check=True)
    shared = os.urandom(400_000)  # the same content in every source: dedup across runs
    sources = [tmp_path / f"host{i}" for i in range(3)]
    expected: dict[str, dict[bytes, tuple]] = {}
    origin: dict[str, Path] = {}
    for rnd in range(2):
        for i, src in enumerate(sources):
            (src / "sub").mkdir(parents=True, exist_ok=True)
            (src / "shared.bin").write_bytes(shared)
            (src / "sub" / f"round{rnd}.bin").write_bytes(os.urandom(150_000 + i))
            if rnd:
                (src / "sub" / f"round{rnd - 1}.bin").unlink()
        states = {src: snapshot_of(src) for src in sources}
        lock_wait = ("--retry-lock", "120")
        backups = [_start(c, *lock_wait, "backup", str(s), "--json") for s in sources]
        racer = _start(c, *lock_wait, "forget", "--keep-last", "1", "--prune")
        results = [_finish(p) for p in backups]
        raced = _finish(racer)
        assert raced.code == 0, raced.err
        for src, r in zip(sources, results, strict=True):
            assert r.code == 0, r.err
            snap = r.json_lines()[-1]["snapshot_id"]
            expected[snap], origin[snap] = states[src], src

    assert_check_clean(c)
    present = snapshot_ids(c)
    # forget kept the newest of each source, and maybe older ones it ran before.
    assert len(sources) <= len(present) <= len(expected), present
    for snap in present:
        assert_restores(c, {snap: expected[snap]}, origin[snap], tmp_path)
