"""The standing fault campaign, part 1: commands killed by SIGKILL at many points.

Each real ``cairn`` command runs with ``CAIRN_TEST_FAULTS=write#N=kill``: the process
kills itself just before its Nth save or remove, so after exactly N-1 completed writes.
After every crash: ``check`` is clean (its only allowed warnings are packs no index
lists, which the next ``prune`` deletes; a stale lock of the dead process is ignored by
``check`` and removed by ``unlock``), every snapshot completed before restores byte for
byte, and a rerun of the killed command succeeds.

By default a sample of N runs (CI stays fast); ``CAIRN_FULL_SWEEP=1`` crashes each
command at every write, N = 1, 2, … until a run completes (see docs/maintenance.md).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cairn.backends.base import BackendError, PermissionDenied, TransientError
from cairn.backends.faulty import Fault, FaultyBackend, parse_faults
from cairn.backends.local import LocalBackend
from tests.cli_helpers import Cairn
from tests.fault_helpers import (
    FULL_SWEEP,
    assert_check_clean,
    assert_restores,
    fresh_copy,
    killed,
    run_with_faults,
    snapshot_ids,
    sweep_points,
)
from tests.maintenance_helpers import new_cairn
from tests.treeutil import snapshot_of

NEW_PASSWORD = "a new password for the sweep"


class History:
    """A template repository with two snapshots of a changing tree, and a second key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        self.cairn = new_cairn(root)
        self.expected: dict[str, dict[bytes, tuple]] = {}
        (self.src / "dir").mkdir(parents=True)
        (self.src / "keep.bin").write_bytes(os.urandom(300_000))
        for i in range(2):
            self.change(i)
            self.backup(self.cairn)
        new_pw = root / "other-password"
        new_pw.write_text("the second key\n")
        out = self.cairn.run("key", "add", "--new-password-file", str(new_pw), check=True).out
        self.other_key = out.split()[-1]  # "saved new key as ID"

    def change(self, i: int) -> None:
        (self.src / f"gen{i}.bin").write_bytes(os.urandom(200_000 + i))
        if (self.src / f"gen{i - 1}.bin").exists():
            (self.src / f"gen{i - 1}.bin").unlink()
        (self.src / "dir" / "count.txt").write_text(str(i))

    def backup(self, c: Cairn) -> str:
        r = c.run("backup", "--no-cache", str(self.src), "--json", check=True)
        snap: str = r.json_lines()[-1]["snapshot_id"]
        self.expected[snap] = snapshot_of(self.src)
        return snap


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return History(tmp_path_factory.mktemp("history"))


def _sweep(sample: tuple[int, ...], crash_one: Callable[[int], bool]) -> list[int]:
    """Run ``crash_one(n)`` for each N; it returns False once a run completed."""
    crashed = []
    for n in sweep_points(sample):
        if not crash_one(n):
            assert FULL_SWEEP or n == sample[-1], f"run completed before write {n}"
            break
        crashed.append(n)
    else:
        assert not FULL_SWEEP, "the full sweep never reached a completed run"
    assert crashed, "no crash happened"
    return crashed


def test_fault_spec_counts_writes_and_open_ranges() -> None:
    assert parse_faults("write#3=kill, save#2-=error, remove#1=exit") == [
        Fault("write", "kill", TransientError, 0, "", 3, 3),
        Fault("save", "fail", BackendError, 0, "", 2, None),
        Fault("remove", "exit", TransientError, 0, "", 1, 1),
    ]


@pytest.mark.anyio
async def test_write_rules_count_saves_and_removes_together(tmp_path: Path) -> None:
    backend = FaultyBackend(LocalBackend(tmp_path), "write#3-=denied")
    await backend.save("keys/a", b"1")  # write 1
    await backend.remove("keys/a")  # write 2
    with pytest.raises(PermissionDenied):
        await backend.save("keys/b", b"2")  # write 3
    with pytest.raises(PermissionDenied):
        await backend.remove("keys/b")  # write 4: the range is open
    assert backend.calls == {"save": 2, "remove": 2, "write": 4}


def test_backup_killed_at_each_write(history: History, tmp_path: Path) -> None:
    src = history.src
    (src / "new-in-killed-run.bin").write_bytes(os.urandom(150_000))
    before = dict(history.expected)

    def crash_one(n: int) -> bool:
        c = fresh_copy(history.cairn, tmp_path / "repo-copy")
        r = run_with_faults(c, f"write#{n}=kill", "backup", "--no-cache", str(src))
        if not killed(r):
            assert r.code == 0, r.err
            return False
        assert_check_clean(c)
        assert_restores(c, before, src, tmp_path)
        rerun = c.run("backup", "--no-cache", str(src), "--json")
        assert rerun.code == 0, rerun.err
        new = rerun.json_lines()[-1]["snapshot_id"]
        assert_restores(c, {new: snapshot_of(src)}, src, tmp_path)
        return True

    try:
        _sweep((3, 5), crash_one)
    finally:
        (src / "new-in-killed-run.bin").unlink()


def test_prune_killed_at_each_write(history: History, tmp_path: Path) -> None:
    template = fresh_copy(history.cairn, tmp_path / "template")
    oldest = snapshot_ids(template)[0]
    template.run("forget", "--no-cache", oldest, check=True)
    kept = {k: v for k, v in history.expected.items() if k != oldest}

    def crash_one(n: int) -> bool:
        c = fresh_copy(template, tmp_path / "repo-copy")
        r = run_with_faults(c, f"write#{n}=kill", "prune", "--no-cache")
        if not killed(r):
            assert r.code == 0, r.err
            return False
        assert_check_clean(c)
        assert_restores(c, kept, history.src, tmp_path)
        rerun = c.run("prune", "--no-cache")
        assert rerun.code == 0, rerun.err
        check = assert_check_clean(c)
        assert "warning" not in check.out, "prune left what it should have removed"
        return True

    _sweep((3, 5), crash_one)


def _opens(c: Cairn, password_file: Path) -> bool:
    probe = Cairn(c.repo, password_file)
    return probe.run("snapshots", "--no-cache").code == 0


@pytest.mark.parametrize("op", ["add", "remove", "passwd"])
def test_key_command_killed_at_each_write(history: History, tmp_path: Path, op: str) -> None:
    """At every crash point some password still opens the repository, the data is all
    there, and the command can be run again (with a password that works)."""
    new_pw = tmp_path / "new-password"
    new_pw.write_text(NEW_PASSWORD + "\n")
    args = {
        "add": ("key", "add", "--new-password-file", str(new_pw)),
        "remove": ("key", "remove", history.other_key),
        "passwd": ("key", "passwd", "--new-password-file", str(new_pw)),
    }[op]

    def crash_one(n: int) -> bool:
        c = fresh_copy(history.cairn, tmp_path / "repo-copy")
        r = run_with_faults(c, f"write#{n}=kill", *args)
        if not killed(r):
            assert r.code == 0, r.err
            return False
        old_works, new_works = _opens(c, c.password_file), _opens(c, new_pw)
        assert old_works or new_works, f"{op} killed at write {n}: no password opens it"
        if not old_works:
            shutil.copy(new_pw, c.password_file)
        assert_check_clean(c)
        assert_restores(c, history.expected, history.src, tmp_path)
        rerun = c.run(*args)
        assert rerun.code == 0, rerun.err
        if op != "remove":
            assert _opens(c, new_pw)
        return True

    # add and remove write once, passwd twice: crash it between the new key and the
    # old one's removal (the full sweep also crashes it before the new key).
    _sweep((1,) if op != "passwd" else (2,), crash_one)


def test_backup_when_the_backend_fails_from_write_n_on(history: History, tmp_path: Path) -> None:
    """The storage goes away for good mid-run (``write#N-=error``): one error line,
    exit 1 (or 0 when only the final lock removal failed), nothing lost."""
    src = history.src
    (src / "new-in-failed-run.bin").write_bytes(os.urandom(150_000))

    def fail_from(n: int) -> bool:
        c = fresh_copy(history.cairn, tmp_path / "repo-copy")
        r = run_with_faults(c, f"write#{n}-=error", "backup", "--no-cache", str(src))
        assert "Traceback" not in r.err and "internal error" not in r.err, r.err
        if r.code == 0:  # every write but the lock's removal succeeded
            assert "lock.remove_failed" in r.err, r.err
            return False
        assert r.code == 1, r.err
        errors = [line for line in r.err.splitlines() if line.startswith("cairn:")]
        assert len(errors) == 1 and "injected" in errors[0], r.err
        assert_check_clean(c)
        assert_restores(c, history.expected, src, tmp_path)
        assert c.run("backup", "--no-cache", str(src)).code == 0
        return True

    try:
        _sweep((3,), fail_from)
    finally:
        (src / "new-in-failed-run.bin").unlink()


def test_forget_killed_at_each_write(history: History, tmp_path: Path) -> None:
    oldest, newest = snapshot_ids(history.cairn)

    def crash_one(n: int) -> bool:
        c = fresh_copy(history.cairn, tmp_path / "repo-copy")
        r = run_with_faults(c, f"write#{n}=kill", "forget", "--no-cache", oldest)
        if not killed(r):
            assert r.code == 0, r.err
            return False
        assert_check_clean(c)
        left = snapshot_ids(c)
        assert newest in left and set(left) <= {oldest, newest}
        assert_restores(c, {s: history.expected[s] for s in left}, history.src, tmp_path)
        rerun = c.run("forget", "--no-cache", oldest)
        assert rerun.code == 0 or oldest not in left, rerun.err
        assert snapshot_ids(c) == [newest]
        return True

    _sweep((2,), crash_one)


def test_repair_index_killed_at_each_write(history: History, tmp_path: Path) -> None:
    """repair index writes the new index before deleting the old files it supersedes."""

    def crash_one(n: int) -> bool:
        c = fresh_copy(history.cairn, tmp_path / "repo-copy")
        r = run_with_faults(c, f"write#{n}=kill", "repair", "index", "--no-cache")
        if not killed(r):
            assert r.code == 0, r.err
            return False
        assert_check_clean(c)
        assert_restores(c, history.expected, history.src, tmp_path)
        assert c.run("repair", "index", "--no-cache").code == 0
        return True

    _sweep((3,), crash_one)


def test_init_killed_at_each_write(tmp_path: Path) -> None:
    """An init killed after its key but before its config, then run again, must give a
    repository that opens: the first run's orphan key (same password, another master
    key) used to be picked first and made every command fail with 'config is
    corrupted'."""
    password = tmp_path / "password"
    password.write_text("init sweep\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "file.bin").write_bytes(os.urandom(50_000))

    def crash_one(n: int) -> bool:
        root = tmp_path / "init"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        c = Cairn(root / "repo", password)
        r = run_with_faults(c, f"write#{n}=kill", "init")
        if not killed(r):
            assert r.code == 0, r.err
            return False
        # The orphan key, if any, sorts first: the order that used to break.
        for key in (root / "repo" / "keys").glob("*"):
            key.rename(key.with_name("0" * 64))
        assert c.run("init").code == 0, "init again after the crash"
        snap = c.run("--no-cache", "backup", str(src), "--json")
        assert snap.code == 0, snap.err
        assert_check_clean(c)
        expected = {snap.json_lines()[-1]["snapshot_id"]: snapshot_of(src)}
        assert_restores(c, expected, src, tmp_path)
        return True

    _sweep((2,), crash_one)
