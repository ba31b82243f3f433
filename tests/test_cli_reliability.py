"""Repository-level trouble seen from the command line: damaged snapshot files, a
cache that must not hide damage, missing backup paths, lost locks, ``--json`` output,
and small CLI defects (issue 20)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli_helpers import CAIRN, Cairn, Result
from tests.conftest_cli import cairn  # noqa: F401 - fixture
from tests.maintenance_helpers import describe, flip_byte, make_history, objects, pack_files
from tests.test_maintenance_cli import _popen, _wait_for_lock


def test_one_damaged_snapshot_file_does_not_block_the_others(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    ids = make_history(cairn, src)
    damaged = ids[1]
    flip_byte(objects(cairn.repo, "snapshots")[damaged], 40)
    nc = ("--no-cache",)  # a new machine: nothing cached to fall back on

    listed = cairn.run(*nc, "snapshots", "--json")
    assert listed.code == 0, listed.err
    assert {s["id"] for s in listed.json()} == {ids[0], ids[2]}
    warnings = [line for line in listed.err.splitlines() if damaged in line]
    assert len(warnings) == 1 and f"snapshots/{damaged}" in warnings[0], listed.err

    repaired = cairn.run(*nc, "repair", "snapshots")
    assert repaired.code == 0, repaired.err
    assert f"file snapshots/{damaged} is damaged" in repaired.out

    (src / "new.txt").write_text("new")
    backup = cairn.run(*nc, "backup", str(src), "--json")
    assert backup.code == 0, backup.err
    assert backup.json_lines()[-1]["parent"] == ids[2]

    # prune must know every snapshot's tree before deleting anything: it refuses.
    refused = cairn.run(*nc, "prune")
    assert refused.code == 1 and damaged in refused.err, refused.err

    forgot = cairn.run(*nc, "forget", damaged[:8])
    assert forgot.code == 0, forgot.err
    assert damaged not in objects(cairn.repo, "snapshots")
    assert len(cairn.run(*nc, "snapshots", "--json", check=True).json()) == 3
    assert cairn.run(*nc, "prune").code == 0
    assert cairn.run(*nc, "check").code == 0


def test_the_cache_does_not_hide_a_damaged_tree_from_repair(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    ids = make_history(cairn, tmp_path / "src")
    for sid in ids:  # every tree pack is now in the local cache, verified
        cairn.run("ls", sid, check=True)
    info = describe(cairn.repo)
    tree_packs = sorted(p for p, t in info["pack_type"].items() if t == 1)
    damaged_pack = tree_packs[0]
    offset, length = info["blobs"][damaged_pack][0]
    flip_byte(pack_files(cairn.repo)[damaged_pack], offset + length // 2)

    assert cairn.run("check").code == 1
    repaired = cairn.run("repair", "snapshots", "--json")
    assert repaired.code == 0, repaired.err
    lines = repaired.json_lines()
    assert lines[-1]["message_type"] == "summary" and lines[-1]["repaired"] >= 1, lines
    assert any("directory contents lost" in item for r in lines[:-1] for item in r["lost"])


def test_backup_of_missing_paths_follows_restic(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    gone = tmp_path / "does-not-exist"
    alone = cairn.run("backup", str(gone))
    assert alone.code == 1, alone.err
    assert alone.err.count("\n") == 1 and str(gone) in alone.err, alone.err
    assert not objects(cairn.repo, "snapshots")  # no (empty) snapshot

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    some = cairn.run("backup", str(src), str(gone), "--json")
    assert some.code == 3, some.err
    assert f"{gone}" in some.err
    summary = some.json_lines()[-1]
    assert summary["errors"] == 1
    saved = cairn.run("snapshots", "--json", check=True).json()
    assert [s["paths"] for s in saved] == [[str(src)]]


def test_backup_stdin_with_paths_is_refused(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    r = cairn.run("backup", "--stdin", str(tmp_path), input=b"data")
    assert r.code == 1 and "--stdin" in r.err and r.err.count("\n") == 1, r.err
    assert not objects(cairn.repo, "snapshots")
    ok = cairn.run("backup", "--stdin", "--stdin-filename", "db.sql", input=b"data")
    assert ok.code == 0, ok.err
    assert cairn.run("snapshots", "--json", check=True).json()[0]["paths"] == ["/db.sql"]


def test_a_backup_whose_lock_was_removed_saves_no_snapshot(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(6 * 1024 * 1024))
    # A throttled upload keeps the backup running for about 12 s.
    backup = _popen(cairn, "backup", str(src), "--limit-upload", "512")
    try:
        _wait_for_lock(cairn, backup)
        removed = cairn.run("unlock", "--remove-all")
        assert removed.code == 0, removed.err
        pruned = cairn.run("prune")
        assert pruned.code == 0, pruned.err
        assert backup.poll() is None  # the removal happened while the backup ran
    finally:
        _out, err = backup.communicate(timeout=120)
    message = err.decode()
    assert backup.returncode == 11, message
    assert "lock lost" in message and "Traceback" not in message, message
    assert not objects(cairn.repo, "snapshots")
    assert not objects(cairn.repo, "locks")
    checked = cairn.run("check")
    assert checked.code == 0, checked.out


def test_init_refuses_a_non_empty_directory_that_is_no_repository(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("pw\n")
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"jpeg")
    refused = Cairn(target, password).run("init")
    assert refused.code == 1, refused.err
    assert refused.err.count("\n") == 1 and "not empty" in refused.err, refused.err
    assert sorted(os.listdir(target)) == ["holiday.jpg"]  # nothing written into it

    empty = tmp_path / "empty"
    empty.mkdir()
    assert Cairn(empty, password).run("init").code == 0


def test_prune_removes_temporaries_left_by_a_killed_process(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(100_000))
    cairn.run("backup", str(src), check=True)
    pack = next(iter(pack_files(cairn.repo).values()))
    # What a prune or backup killed between write and rename leaves behind.
    stale = pack.parent / f".tmp-{pack.name}-0123456789ab"
    stale.write_bytes(pack.read_bytes())
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    fresh = pack.parent / f".tmp-{pack.name}-ba9876543210"  # maybe still being written
    fresh.write_bytes(b"partial")

    pruned = cairn.run("prune", "--json")
    assert pruned.code == 0, pruned.err
    assert pruned.json_lines()[-1]["stale_temporaries_removed"] == 1
    assert not stale.exists() and fresh.exists()
    assert cairn.run("check").code == 0


def test_snapshots_latest(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    ids = make_history(cairn, tmp_path / "src")
    r = cairn.run("snapshots", "latest", "--json")
    assert r.code == 0, r.err
    assert [s["id"] for s in r.json()] == [ids[-1]]
    both = cairn.run("snapshots", "latest", ids[0][:8], "--json", check=True)
    assert sorted(s["id"] for s in both.json()) == sorted([ids[0], ids[-1]])


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("connections = 0", "connections"),
        ("cpu_workers = 1000", "cpu_workers"),
        ('ping_url_failure = "hc-ping.com/abc"', "ping_url_failure"),
        ('ping_url_success = "http://host:port/x"', "ping_url_success"),
        ('keep_within = "fortnight"', "keep_within"),
        ('check_subset = "12/5"', "check_subset"),
        ('compression = "tiny"', "compression"),
        ('metrics_file = "/nonexistent-dir/cairn.prom"', "metrics"),
    ],
)
def test_bad_profile_values_fail_before_anything_runs(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
    line: str,
    key: str,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    config = tmp_path / "config.toml"
    config.write_text(
        "[profiles.nightly]\n"
        f'repository = "{cairn.repo}"\n'
        f'password_file = "{cairn.password_file}"\n'
        f'paths = ["{src}"]\n'
        "keep_last = 3\n"
        f"{line}\n"
    )
    r = cairn.run("--config", str(config), "run", "nightly", base=False)
    assert r.code == 1, r.err
    errors = [x for x in r.err.splitlines() if x.startswith("cairn:")]
    assert len(errors) == 1 and key in errors[0], r.err
    assert "internal error" not in r.err and "Traceback" not in r.err
    assert not objects(cairn.repo, "snapshots")  # failed before the backup


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_sigterm_before_the_command_starts_exits_130(tmp_path: Path) -> None:
    # init asks its --password-command before any async work: the process is then
    # past its imports but before the engine's own signal handling.
    proc = subprocess.Popen(
        [*CAIRN, "-r", str(tmp_path / "repo"), "--password-command", "sleep 60", "init"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not _children(proc.pid):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
        assert caught & (1 << (signal.SIGTERM - 1)), "SIGTERM is not handled yet"
        proc.send_signal(signal.SIGTERM)
    finally:
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.decode().strip() == "cairn: interrupted"
    assert not (tmp_path / "repo").exists()


def _assert_json_lines(r: Result, what: str) -> None:
    for stream, text in (("stdout", r.out), ("stderr", r.err)):
        for line in text.splitlines():
            try:
                json.loads(line)
            except ValueError:
                raise AssertionError(f"{what}: {stream} line is not JSON: {line!r}") from None


def test_json_output_is_json_lines_on_stdout_and_stderr(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
) -> None:
    ids = make_history(cairn, tmp_path / "src")
    src = str(tmp_path / "src")
    keyfile = tmp_path / "pw2"
    keyfile.write_text("another password\n")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[profiles.job]\nrepository = "{cairn.repo}"\npassword_file = "{cairn.password_file}"\n'
        f'paths = ["{src}"]\nkeep_last = 5\n'
    )
    commands: list[tuple[str, ...]] = [
        ("backup", src, "-v"),
        ("backup", src, str(tmp_path / "missing")),  # exit 3, an error line on stderr
        ("snapshots",),
        ("snapshots", "--group-by", "host"),
        ("ls", "latest"),
        ("find", "small.txt"),
        ("diff", ids[0], ids[1]),
        ("restore", "latest", "--target", str(tmp_path / "restored")),
        ("check", "--read-data"),
        ("stats",),
        ("stats", "--mode", "raw-data"),
        ("tag", "--add", "t", "latest"),
        ("key", "list"),
        ("key", "add", "--new-password-file", str(keyfile)),
        ("forget", "--keep-last", "3", "-v"),
        ("prune",),
        ("unlock",),
        ("repair", "index"),
        ("repair", "snapshots"),
        ("cat", "config"),
        ("cat", "snapshot", "latest"),
        ("version",),
        ("config", "show"),
        ("--config", str(config), "run", "job"),
        ("init",),  # fails: the repository exists
        ("snapshots", "--no-such-flag"),
        ("no-such-command",),
        ("backup", str(tmp_path / "missing")),
    ]
    for args in commands:
        r = cairn.run(*args, "--json")
        assert r.code in (0, 1, 3), (args, r.err)
        assert r.out.strip() or r.err.strip(), args
        _assert_json_lines(r, " ".join(args))
    env = {"CAIRN_PASSWORD": "wrong", "CAIRN_REPOSITORY": str(cairn.repo)}
    wrong = cairn.run("snapshots", "--json", env=env, base=False)
    assert wrong.code == 12
    _assert_json_lines(wrong, "wrong password")
    lines = [json.loads(x) for x in wrong.err.splitlines()]
    exit_error = [x for x in lines if x.get("message_type") == "exit_error"]
    assert len(exit_error) == 1 and exit_error[0]["code"] == 12, lines
    assert "wrong password" in exit_error[0]["message"]

    # A damaged snapshot file: the warning on stderr is JSON too.
    flip_byte(next(iter(objects(cairn.repo, "snapshots").values())), 40)
    r = cairn.run("--no-cache", "snapshots", "--json")
    _assert_json_lines(r, "damaged snapshot")
    assert any(json.loads(x)["event"] == "snapshot.damaged" for x in r.err.splitlines())
