"""Locks between commands, and ``unlock``, ``tag``, ``stats``, ``repair`` through the
real command line."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import anyio

from cairn.backends.local import LocalBackend
from cairn.repo.lock import Lock, encode_lock
from cairn.repo.repository import open_repository
from tests.cli_helpers import CAIRN, Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture
from tests.maintenance_helpers import PASSWORD, error_lines, make_history, objects, pack_files
from tests.treeutil import snapshot_of


def _popen(c: Cairn, *args: str) -> subprocess.Popen[bytes]:
    cmd = [
        *CAIRN,
        "-r",
        str(c.repo),
        "--password-file",
        str(c.password_file),
        "--insecure-kdf",
        *args,
    ]
    return subprocess.Popen(cmd, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_lock(c: Cairn, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not list((c.repo / "locks").iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_prune_refuses_while_backup_holds_a_lock_and_waits_with_retry(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(6 * 1024 * 1024))
    # A throttled upload keeps the backup (and its shared lock) alive for a few seconds.
    backup = _popen(cairn, "backup", str(src), "--limit-upload", "1024")
    try:
        _wait_for_lock(cairn, backup)
        refused = cairn.run("prune")
        assert refused.code == 11, refused.err
        assert "locked by" in refused.err and "shared lock" in refused.err
        waited = cairn.run("prune", "--retry-lock", "120", "--json")
        assert backup.poll() is not None  # prune only got in after the backup ended
    finally:
        _out, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    assert waited.code == 0, waited.err
    assert cairn.run("check").code == 0


def test_two_backups_at_once_both_succeed(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    sources = []
    for name in ("one", "two"):
        src = tmp_path / name
        src.mkdir()
        for i in range(30):
            (src / f"f{i}").write_bytes(os.urandom(50_000) + b"shared" * 1000)
        sources.append(src)
    procs = [_popen(cairn, "backup", str(s)) for s in sources]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert len(cairn.run("snapshots", "--json", check=True).json()) == 2
    r = cairn.run("check", "--read-data")
    assert r.code == 0, r.out
    for n, src in enumerate(sources):
        target = tmp_path / f"restore{n}"
        cairn.run("restore", "latest", "--path", str(src), "--target", str(target), check=True)
        assert snapshot_of(target / str(src).lstrip("/")) == snapshot_of(src)


async def _write_lock(root: Path, lock: Lock) -> str:
    repo = await open_repository(LocalBackend(root), PASSWORD)
    return str(await repo.save_sealed("locks", encode_lock(lock)))


def test_unlock_removes_stale_locks_only(cairn: Cairn) -> None:  # noqa: F811
    import socket

    now = time.time_ns()
    host = socket.gethostname()
    dead = Lock(True, host, "x", 2**22 + 7, now, now)  # no such PID
    old = Lock(False, "elsewhere", "x", 1, now, now - 3600 * 10**9)
    live = Lock(False, "elsewhere", "x", 1, now, now)
    ids = {
        name: anyio.run(_write_lock, cairn.repo, lock)
        for name, lock in (("dead", dead), ("old", old), ("live", live))
    }
    assert cairn.run("prune").code == 11  # the live lock from another host blocks it
    r = cairn.run("unlock", "--json", check=True)
    assert r.json()["removed"] == 2
    assert set(objects(cairn.repo, "locks")) == {ids["live"]}
    cairn.run("unlock", "--remove-all", check=True)
    assert not objects(cairn.repo, "locks")
    assert cairn.run("prune").code == 0


def test_tag_rewrites_snapshots(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    ids = make_history(cairn, tmp_path / "src")
    r = cairn.run("tag", "--add", "a,b", ids[0][:8], "--json", check=True)
    ((old, new),) = r.json()["changed"]
    assert old == ids[0] and old not in objects(cairn.repo, "snapshots")
    cat = cairn.run("cat", "snapshot", new, check=True).out
    assert "a" in cat
    cairn.run("tag", "--tag", "a", "--remove", "a", check=True)
    snaps = {s["id"]: s for s in cairn.run("snapshots", "--json", check=True).json()}
    assert sorted(s["tags"] for s in snaps.values()) == [[], [], ["b"]]
    cairn.run("tag", "--set", "x", check=True)
    snaps = cairn.run("snapshots", "--json", check=True).json()
    assert [s["tags"] for s in snaps] == [["x"]] * 3
    assert cairn.run("tag", "--add", "y", "--set", "z").code == 1
    assert cairn.run("check").code == 0


async def _original(root: Path, snapshot_id: str) -> str | None:
    repo = await open_repository(LocalBackend(root), PASSWORD)
    return (await repo.load_snapshot(snapshot_id)).original


def test_tag_notes_the_original(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    first = cairn.run("backup", str(src), "--json", check=True).json_lines()[-1]["snapshot_id"]
    r = cairn.run("tag", "--add", "t1", "--json", check=True).json()["changed"]
    assert anyio.run(_original, cairn.repo, r[0][1]) == first
    r2 = cairn.run("tag", "--add", "t2", "--json", check=True).json()["changed"]
    assert r2[0][0] == r[0][1]
    assert anyio.run(_original, cairn.repo, r2[0][1]) == first  # the first original stays
    # As restic's: `snapshots --json` shows it.
    (listed,) = cairn.run("snapshots", "--json", check=True).json()
    assert (listed["id"], listed["original"]) == (r2[0][1], first)


def test_stats_modes(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"A" * 100_000)
    (src / "b").write_bytes(b"A" * 100_000)  # same contents as a
    (src / "c").write_bytes(os.urandom(10_000))
    cairn.run("backup", str(src), check=True)
    cairn.run("backup", str(src), check=True)

    def stats(mode: str) -> dict[str, int]:
        return dict(cairn.run("stats", "--mode", mode, "--json", check=True).json())

    restore = stats("restore-size")
    assert restore["snapshots_count"] == 2
    assert restore["total_size"] == 2 * 210_000
    by_contents = stats("files-by-contents")
    assert by_contents == {"total_size": 110_000, "total_file_count": 2, "snapshots_count": 2}
    raw = stats("raw-data")
    assert raw["total_uncompressed_size"] > 110_000 and raw["total_size"] < 20_000 + 10_000
    per_file = stats("blobs-per-file")
    assert per_file["total_blob_count"] == 2 and per_file["total_size"] == 110_000
    latest = dict(cairn.run("stats", "latest", "--json", check=True).json())
    assert latest["total_size"] == 210_000


def test_repair_index_after_losing_and_damaging_index_files(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    make_history(cairn, src)
    index_files = sorted(objects(cairn.repo, "index").values())
    index_files[0].unlink()
    data = bytearray(index_files[1].read_bytes())
    data[50] ^= 1
    index_files[1].write_bytes(bytes(data))
    assert cairn.run("check").code == 1
    r = cairn.run("repair", "index", check=True)
    assert "replaced 2 index files by 1" in r.out
    r = cairn.run("check", "--read-data")
    assert r.code == 0 and "warning" not in r.out, r.out
    target = tmp_path / "t"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    assert snapshot_of(target / str(src).lstrip("/")) == snapshot_of(src)


def test_repair_snapshots_after_losing_a_pack(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "doomed.bin").write_bytes(os.urandom(100_000))
    cairn.run("backup", str(src), check=True)
    before = set(pack_files(cairn.repo))
    (src / "safe.txt").write_text("still here")
    cairn.run("backup", str(src), check=True)
    # Lose the first backup's data pack: both snapshots lose doomed.bin's content.
    info_lines = cairn.run("check", "--json").json_lines()
    assert info_lines[-1]["errors"] == 0
    from tests.maintenance_helpers import describe

    types = describe(cairn.repo)["pack_type"]
    (doomed_pack,) = [p for p in before if types[p] == 0]
    pack_files(cairn.repo)[doomed_pack].unlink()
    r = cairn.run("check")
    assert error_lines(r.out) == [
        f"error: pack {doomed_pack}: listed in index "
        f"{error_lines(r.out)[0].split()[-3]} but missing"
    ]
    cairn.run("repair", "index", check=True)
    r = cairn.run("check")
    assert r.code == 1 and all("not in the index" in x for x in error_lines(r.out))
    dry = cairn.run("repair", "snapshots", "--dry-run", check=True)
    assert "would repair 2 snapshots" in dry.out and "doomed.bin: 1 of 1 data blobs lost" in dry.out
    cairn.run("repair", "snapshots", "--forget", check=True)
    r = cairn.run("check", "--read-data")
    assert r.code == 0, r.out
    snaps = cairn.run("snapshots", "--json", check=True).json()
    assert len(snaps) == 2 and all("repaired" in s["tags"] for s in snaps)
    target = tmp_path / "t"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    restored = target / str(src).lstrip("/")
    assert (restored / "safe.txt").read_text() == "still here"
    assert (restored / "doomed.bin").stat().st_size == 0
