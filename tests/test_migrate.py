"""``cairn migrate``: the same repository copied to another backend, through the real CLI.

Across real servers (local → S3 on SeaweedFS → SFTP on sshd → rclone), each hop
followed by ``check --read-data`` and a restore compared with the source tree; and on
local directories: resume after a failing destination, SIGKILL and SIGINT without
sending anything twice, repair of a corrupted or truncated destination object,
refusal of another repository, ``--delete``, ``--dry-run``, read-back verification.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.servers")

from tests.cli_helpers import CAIRN, Cairn, Result  # noqa: E402
from tests.servers import S3_KEY, S3_SECRET, location_for  # noqa: E402
from tests.treeutil import snapshot_of  # noqa: E402

pytest_plugins = ["tests.servers"]

DEST_FAULTS = "CAIRN_TEST_DEST_FAULTS"


def _make_tree(root: Path, seed: int = 0) -> None:
    (root / "docs").mkdir(parents=True, exist_ok=True)
    (root / "docs" / "readme.txt").write_text(f"migrate test {seed}\n" * 200)
    (root / f"random-{seed}.bin").write_bytes(os.urandom(2_500_000))
    (root / f"more-{seed}.bin").write_bytes(os.urandom(1_800_000))
    (root / "link").unlink(missing_ok=True)
    (root / "link").symlink_to("docs/readme.txt")


def _contents(root: Path) -> dict[bytes, tuple[int, object]]:
    return {rel: (meta[0], meta[5]) for rel, meta in snapshot_of(root).items()}


def _objects(root: Path) -> dict[str, int]:
    """Every repository object of a local repository (not locks) and its size."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not name.startswith(".") and not rel.startswith("locks/"):
                out[rel] = os.path.getsize(os.path.join(dirpath, name))
    return out


def _summary(result: Result) -> dict:
    assert result.code == 0, result.err
    line = result.json_lines()[-1]
    assert line["message_type"] == "summary"
    return line


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A local repository with two snapshots (four data packs), and its tree: made
    once, copied for each test (which may damage or prune it)."""
    base = tmp_path_factory.mktemp("migrate-source")
    password = base / "password"
    password.write_text("migrate password\n")
    cli = Cairn(base / "repo", password)
    cli.run("init", check=True)
    tree = base / "tree"
    _make_tree(tree, 0)
    cli.run("--pack-size", "4", "backup", str(tree), check=True)
    _make_tree(tree, 1)
    cli.run("--pack-size", "4", "backup", str(tree), check=True)
    return base / "repo", tree


@pytest.fixture
def source(pristine: tuple[Path, Path], tmp_path: Path) -> tuple[Cairn, Path]:
    """This test's copy of the pristine repository, and the tree it holds."""
    repo, tree = pristine
    shutil.copytree(repo, tmp_path / "src-repo", symlinks=True)
    password = tmp_path / "password"
    password.write_text("migrate password\n")
    return Cairn(tmp_path / "src-repo", password), tree


def _migrate(cli: Cairn, dest: Path | str, *args: str, env: dict | None = None) -> Result:
    return cli.run("migrate", "--to", str(dest), "--json", *args, env=env)


def _at(cli: Cairn, repo: Path | str, global_args: tuple[str, ...] = ()) -> Cairn:
    """The same password and environment, another repository location."""
    return Cairn(repo, cli.password_file, extra_env=cli.env, global_args=global_args)


def _restores_tree(cli: Cairn, tree: Path, target: Path) -> None:
    cli.run("restore", "latest", "--target", str(target), check=True)
    assert _contents(target / str(tree).lstrip("/")) == _contents(tree)


# --- across real servers ---------------------------------------------------------------


def test_local_to_s3_to_sftp_to_rclone(
    source: tuple[Cairn, Path], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cli, tree = source
    env = {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    hop_from = Cairn(cli.repo, cli.password_file, extra_env=cli.env | env)
    total = len(_objects(Path(cli.repo)))
    for i, kind in enumerate(("s3", "sftp", "rclone")):
        (tmp_path / f"hop{i}").mkdir()
        url, options = location_for(kind, request, tmp_path / f"hop{i}")
        to_flags = [f"--to-option={k}={v}" for k, v in options.items()]
        done = _summary(hop_from.run("migrate", "--to", url, *to_flags, "--json"))
        assert done["objects_sent"] == total and done["errors"] == 0, (kind, done)
        hop_to = _at(hop_from, url, tuple(f"--option={k}={v}" for k, v in options.items()))
        checked = hop_to.run("check", "--read-data")
        assert checked.code == 0, (kind, checked.out, checked.err)
        _restores_tree(hop_to, tree, tmp_path / f"restore-{kind}")
        # Again: the replica is current, nothing moves.
        again = _summary(hop_from.run("migrate", "--to", url, *to_flags, "--json"))
        assert again["objects_sent"] == 0 and again["objects_present"] == total
        previous, hop_from, last = hop_from, hop_to, (url, to_flags)
    # rclone's REST protocol refuses to overwrite: a damaged pack there is removed,
    # then sent again.
    url, to_flags = last
    remote = request.getfixturevalue("rclone_remote")
    packs = sorted((remote.root / url.rsplit(":", 1)[1] / "data").glob("*/*"))
    packs[0].write_bytes(packs[0].read_bytes()[:-1])
    repaired = _summary(previous.run("migrate", "--to", url, *to_flags, "--json"))
    assert repaired["objects_repaired"] == 1 and repaired["objects_sent"] == 1
    assert hop_from.run("check", "--read-data").code == 0


# --- on local directories ------------------------------------------------------------


def test_migrate_then_rerun_sends_nothing_and_says_so(
    source: tuple[Cairn, Path], tmp_path: Path
) -> None:
    cli, tree = source
    dest = tmp_path / "dest"
    first = _summary(_migrate(cli, dest))
    objects = _objects(Path(cli.repo))
    assert first["objects_sent"] == len(objects) and first["bytes_sent"] == sum(objects.values())
    assert _objects(dest) == objects
    # Memory: one object per transfer in flight, at most.
    assert 0 < first["bytes_held_peak"] <= 4 * max(objects.values())
    text = cli.run("migrate", "--to", str(dest))
    assert text.code == 0, text.err
    assert "is up to date: nothing to transfer" in text.out
    assert not list((dest / "locks").iterdir())  # its lock on the destination is gone
    # The same, planning data/ shard by shard (as for a destination of many packs).
    sharded = _summary(_migrate(cli, dest, "--whole-listing", "0"))
    assert sharded["objects_sent"] == 0 and sharded["objects_present"] == len(objects)
    _restores_tree(_at(cli, dest), tree, tmp_path / "restored")


def test_foreign_destination_is_refused(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    cli, _tree = source
    other = _at(cli, tmp_path / "other")
    other.run("init", check=True)
    before = _objects(tmp_path / "other")
    refused = cli.run("migrate", "--to", str(tmp_path / "other"))
    assert refused.code == 1
    assert "holds a different repository" in refused.err
    assert len(refused.err.strip().splitlines()) == 1  # one line, no traceback
    assert _objects(tmp_path / "other") == before
    # Without its config, another repository's key files still give it away.
    os.unlink(tmp_path / "other" / "config")
    refused = cli.run("migrate", "--to", str(tmp_path / "other"))
    assert refused.code == 1 and "is not one of this repository's keys" in refused.err
    # A directory of other files is not a destination either (as for init).
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    refused = cli.run("migrate", "--to", str(tmp_path / "home"))
    assert refused.code == 1 and "is not a cairn repository" in refused.err
    assert os.listdir(tmp_path / "home") == ["notes.txt"]


def test_bad_destination_is_one_line(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    cli, _tree = source
    for args, expected in (
        (("--to", "sftp:"), "invalid location"),
        (("--to", str(tmp_path / "d"), "--to-option", "local.bogus=1"), "unknown option"),
        (("--to", "rest:http://127.0.0.1:1/repo"), "cannot connect"),
    ):
        result = cli.run("migrate", *args)
        assert result.code == 1 and expected in result.err, result.err
        assert len(result.err.strip().splitlines()) == 1


def test_dry_run_writes_nothing(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    cli, _tree = source
    dest = tmp_path / "dest"
    dry = _summary(_migrate(cli, dest, "--dry-run"))
    assert dry["dry_run"] and dry["objects_sent"] == len(_objects(Path(cli.repo)))
    assert not dest.exists() or _objects(dest) == {}


def test_delete_removes_what_the_source_no_longer_has(
    source: tuple[Cairn, Path], tmp_path: Path
) -> None:
    cli, tree = source
    dest = tmp_path / "dest"
    _summary(_migrate(cli, dest))
    cli.run("forget", "--keep-last", "1", "--prune", check=True)
    # Without --delete the replica keeps the old objects.
    kept = _summary(_migrate(cli, dest))
    assert kept["objects_deleted"] == 0 and set(_objects(Path(cli.repo))) < set(_objects(dest))
    dry = _summary(_migrate(cli, dest, "--delete", "--dry-run"))
    assert dry["objects_deleted"] > 0 and set(_objects(Path(cli.repo))) < set(_objects(dest))
    deleted = _summary(_migrate(cli, dest, "--delete", "--whole-listing", "0"))
    assert deleted["objects_deleted"] == dry["objects_deleted"]
    assert _objects(dest) == _objects(Path(cli.repo))
    replica = _at(cli, dest)
    assert replica.run("check", "--read-data").code == 0
    _restores_tree(replica, tree, tmp_path / "restored")


def _flip_byte(path: Path, offset: int = 100) -> None:
    os.chmod(path, 0o600)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_pack(repo: Path) -> Path:
    return max((repo / "data").glob("*/*"), key=lambda p: p.stat().st_size)


def test_corrupted_destination_object_is_detected_and_repaired(
    source: tuple[Cairn, Path], tmp_path: Path
) -> None:
    cli, _tree = source
    dest = tmp_path / "dest"
    _summary(_migrate(cli, dest))
    pack = _largest_pack(dest)
    _flip_byte(pack)  # same size: only a hash check sees it
    # The default sample need not look at it; --verify-existing does.
    repaired = _summary(_migrate(cli, dest, "--verify-existing"))
    assert repaired["objects_repaired"] == 1 and repaired["objects_sent"] == 1
    assert repaired["objects_verified"] >= len(_objects(dest)) - 2  # all but config, keys
    assert _at(cli, dest).run("check", "--read-data").code == 0
    # A truncated object has the wrong size: every run repairs it.
    os.chmod(pack, 0o600)
    pack.write_bytes(pack.read_bytes()[:-10])
    again = _summary(_migrate(cli, dest, "--verify-sample", "0", "--whole-listing", "0"))
    assert again["objects_repaired"] == 1 and again["objects_sent"] == 1
    assert _objects(dest) == _objects(Path(cli.repo))
    # A damaged config beside this repository's keys is this repository's: replaced.
    _flip_byte(dest / "config", 50)
    config = _summary(_migrate(cli, dest, "--verify-sample", "0"))
    assert config["objects_repaired"] == 1 and config["objects_sent"] == 1
    assert (dest / "config").read_bytes() == (Path(cli.repo) / "config").read_bytes()
    assert _at(cli, dest).run("check").code == 0


def test_damaged_source_object_is_not_copied(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    cli, _tree = source
    pack = _largest_pack(Path(cli.repo))
    _flip_byte(pack)
    result = _migrate(cli, tmp_path / "dest")
    assert result.code == 1
    assert "damaged in the source" in result.err and "1 objects could not be migrated" in result.err
    assert not (tmp_path / "dest" / pack.relative_to(cli.repo)).exists()
    # Everything else was sent.
    assert len(_objects(tmp_path / "dest")) == len(_objects(Path(cli.repo))) - 1


def test_read_back_catches_a_destination_that_garbles(
    source: tuple[Cairn, Path], tmp_path: Path
) -> None:
    cli, _tree = source
    result = _migrate(
        cli, tmp_path / "dest", "--verify-sample", "100", env={DEST_FAULTS: "load:data/=flip:7"}
    )
    assert result.code == 1
    assert "reads back from the destination differently" in result.err


# --- interruptions and resume --------------------------------------------------------


def _resume_sends_only_the_rest(cli: Cairn, dest: Path, log: Path, *args: str) -> None:
    """After an interrupted run: what the destination lists is whole and is not sent
    again; the rest is, once; the result is the source's objects, byte for byte."""
    there = _objects(dest)
    src = _objects(Path(cli.repo))
    assert all(src[name] == size for name, size in there.items())  # nothing partial
    done = _summary(
        cli.run(
            "--log-file",
            str(log),
            "--log-level",
            "debug",
            "--log-format",
            "json",
            "migrate",
            "--to",
            str(dest),
            "--json",
            *args,
        )
    )
    sent = {
        line.split('"name": "', 1)[1].split('"', 1)[0]
        for line in log.read_text().splitlines()
        if '"event": "migrate.sent"' in line
    }
    assert sent == set(src) - set(there)
    assert done["objects_sent"] == len(src) - len(there)
    assert done["objects_present"] == len(there)
    assert _objects(dest) == src
    assert _at(cli, dest).run("check", "--read-data").code == 0


def test_failing_destination_then_resume(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    cli, _tree = source
    # A transient failure is retried (the destination has the usual wrapper stack):
    # its 4th save is the first pack (after keys, config and its lock).
    result = _migrate(cli, tmp_path / "other", env={DEST_FAULTS: "save#4=transient"})
    assert _summary(result)["errors"] == 0 and "backend.retry" in result.err
    assert _objects(tmp_path / "other") == _objects(Path(cli.repo))
    dest = tmp_path / "dest"
    failed = _migrate(cli, dest, env={DEST_FAULTS: "save#5-=error"})
    assert failed.code == 1 and failed.err.strip()
    assert 0 < len(_objects(dest)) < len(_objects(Path(cli.repo)))
    _resume_sends_only_the_rest(cli, dest, tmp_path / "log.json", "--whole-listing", "0")


@pytest.mark.parametrize("n", [2, 7, 9, 11])
def test_sigkill_at_a_write_then_resume(source: tuple[Cairn, Path], tmp_path: Path, n: int) -> None:
    cli, _tree = source
    dest = tmp_path / "dest"
    # Writes to the destination: keys (1), config (2), its lock (3), the packs (4-7),
    # the index files (8-9), the snapshots (10-11): killed in every phase.
    killed = _migrate(cli, dest, env={DEST_FAULTS: f"write#{n}=kill"})
    assert killed.code == -signal.SIGKILL
    _resume_sends_only_the_rest(cli, dest, tmp_path / "log.json")


def test_sigint_then_resume(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    cli, _tree = source
    dest = tmp_path / "dest"
    cmd = [
        *CAIRN,
        "-r",
        str(cli.repo),
        "--password-file",
        str(cli.password_file),
        "--insecure-kdf",
        "--limit-upload",
        "1024",
        "--connections",
        "1",
        "migrate",
        "--to",
        str(dest),
    ]
    proc = subprocess.Popen(cmd, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Interrupt once the first pack has arrived (the upload limit keeps the rest
        # of the ~9 MB coming for seconds).
        while not list((dest / "data").glob("*/[0-9a-f]*")) and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    assert _objects(dest) != _objects(Path(cli.repo))
    _resume_sends_only_the_rest(cli, dest, tmp_path / "log.json")


# --- the byte budget ------------------------------------------------------------------


@pytest.mark.anyio
async def test_byte_budget_bounds_what_is_held() -> None:
    import anyio.lowlevel

    from cairn.stages.destination import ByteBudget

    budget = ByteBudget(10)
    held: list[int] = []
    peak = 0
    alone: list[bool] = []

    async def hold(n: int) -> None:
        nonlocal peak
        async with budget.holding(n):
            held.append(n)
            peak = max(peak, sum(min(h, 10) for h in held))
            if n > 10:  # more than the whole budget: it goes alone
                alone.append(held == [n])
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            held.remove(n)

    async with anyio.create_task_group() as tg:
        for n in (4, 4, 4, 3, 25, 6, 1, 9):
            tg.start_soon(hold, n)
    assert alone == [True] and 0 < peak <= 10
    assert budget.free == budget.total


# --- throttling ----------------------------------------------------------------------


def test_upload_limit_is_paid_before_an_object_is_loaded(
    source: tuple[Cairn, Path], tmp_path: Path
) -> None:
    cli, _tree = source
    largest = max(_objects(Path(cli.repo)).values())
    result = cli.run(
        "--limit-upload", "2048", "--connections", "6",
        "migrate", "--to", str(tmp_path / "dest"), "--json",
    )  # fmt: skip
    lines = result.json_lines()
    done = _summary(result)
    assert done["bottleneck"]["hint"] == "--limit-upload/--limit-download"
    # Progress: status lines, the last one complete.
    statuses = [line for line in lines if line["message_type"] == "status"]
    assert statuses and statuses[-1]["bytes_done"] == done["bytes_total"]
    # Objects wait for the limit before they are loaded, not in memory: one is held
    # at a time, two at a hand-over on a busy machine (without prepaying, each of the
    # six transfers held its pack while it waited).
    assert done["bytes_held_peak"] <= 2 * largest


# --- the destination's lock ------------------------------------------------------------


def _hold_lock(repo: Path, password: Path, *, exclusive: bool) -> None:
    """Leave a live lock in ``repo``: this test process's PID, which is running."""
    import socket

    import anyio

    from cairn.backends.local import LocalBackend
    from cairn.repo.lock import Lock, encode_lock
    from cairn.repo.repository import open_repository

    secret = password.read_text().strip()

    async def put() -> None:
        opened = await open_repository(LocalBackend(repo), secret)
        now = time.time_ns()
        lock = Lock(exclusive, socket.gethostname(), "test", os.getpid(), now, now)
        await opened.save_sealed("locks", encode_lock(lock))

    anyio.run(put)


def test_destination_lock_keeps_out_a_prune_and_is_exclusive_with_delete(
    source: tuple[Cairn, Path], tmp_path: Path
) -> None:
    cli, _tree = source
    dest = tmp_path / "dest"
    _summary(_migrate(cli, dest))
    # A backup into the replica (shared) does not stop a migration, but --delete
    # needs the destination to itself.
    _hold_lock(dest, cli.password_file, exclusive=False)
    assert _migrate(cli, dest).code == 0
    refused = _migrate(cli, dest, "--delete")
    assert refused.code == 11 and "locked" in refused.err
    # A prune of the replica (exclusive) stops any migration into it.
    for lock in (dest / "locks").iterdir():
        lock.unlink()
    _hold_lock(dest, cli.password_file, exclusive=True)
    refused = _migrate(cli, dest)
    assert refused.code == 11 and "locked" in refused.err
    assert _migrate(cli, dest, "--no-lock").code == 0


def test_repository_file_names_the_source_only(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    cli, tree = source
    (tmp_path / "repository").write_text(f"{cli.repo}\n")
    result = cli.run(
        "--repository-file", str(tmp_path / "repository"),
        "--password-file", str(cli.password_file), "--insecure-kdf",
        "migrate", "--to", str(tmp_path / "dest"), "--json",
        base=False,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert _objects(tmp_path / "dest") == _objects(Path(cli.repo))
    _restores_tree(_at(cli, tmp_path / "dest"), tree, tmp_path / "restored")
