"""``cairn copy --from-repo``: snapshots between repositories with different keys,
through the real CLI.

Copies twice (the second adds nothing), restores from the copy and compares every
kind of entry, dedupes against what the destination holds, resumes after a failed
upload without sending its packs again, fails only the snapshots a corrupt source
blob belongs to, names the source in its errors, and writes to S3 (SeaweedFS).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.servers")

from cairn.backends.faulty import ENV_VAR as FAULTS  # noqa: E402
from cairn.repo.snapshot import Snapshot  # noqa: E402
from cairn.stages.copy import _Want, split_by_raw  # noqa: E402
from cairn.stages.copysource import SnapshotRefError, copies_in, select_snapshots  # noqa: E402
from cairn.stages.fetch import Batch  # noqa: E402
from cairn.stages.snapshots import SnapshotFilter  # noqa: E402
from tests.cli_helpers import CAIRN, Cairn, Result  # noqa: E402
from tests.servers import S3_KEY, S3_SECRET, location_for  # noqa: E402
from tests.treeutil import make_everything_tree, snapshot_of  # noqa: E402

pytest_plugins = ["tests.servers"]

MiB = 1024 * 1024


def _snap(time_ns: int, host: str = "h", tags: list[str] | None = None, **kw: Any) -> Snapshot:
    return Snapshot(time_ns, bytes(32), ["/data"], hostname=host, tags=tags or [], **kw)


def test_select_snapshots_by_id_latest_and_filters() -> None:
    source = [("aa11", _snap(1, "x")), ("ab22", _snap(2, "y", ["t"])), ("bb33", _snap(3, "x"))]
    assert [i for i, _ in select_snapshots(source, [], SnapshotFilter())] == [
        "aa11",
        "ab22",
        "bb33",
    ]
    assert [i for i, _ in select_snapshots(source, [], SnapshotFilter(tags=["t"]))] == ["ab22"]
    # latest of what the filters match; IDs in time order whatever the order given.
    chosen = select_snapshots(source, ["latest", "AA"], SnapshotFilter(hosts=["y"]))
    assert [i for i, _ in chosen] == ["aa11", "ab22"]
    with pytest.raises(SnapshotRefError, match="matches 2 snapshots"):
        select_snapshots(source, ["a"], SnapshotFilter())
    with pytest.raises(SnapshotRefError, match="no snapshot"):
        select_snapshots(source, ["cc"], SnapshotFilter())


def test_a_copy_is_recognised_by_its_original_and_its_metadata() -> None:
    a, b = _snap(1, tags=["x", "y"]), _snap(2)
    dest = [
        ("d1", replace(a, tags=["y", "x"], original="s1", tree=b"\1" * 32)),
        ("d2", replace(b, original="s2", hostname="other")),  # same ID, not similar
        ("d3", replace(b, original="zz")),  # similar, another original
    ]
    assert copies_in(dest, [("s1", a), ("s2", b)]) == {"s1": ("d1", dest[0][1])}
    # A snapshot that is itself a copy is known by its own original.
    assert copies_in(dest, [("s9", replace(b, original="zz"))]) == {"s9": ("d3", dest[2][1])}


def test_ranges_are_cut_so_that_their_blobs_fit_an_output_slot() -> None:
    # Four blobs of 10 stored bytes that decode to 400 bytes each, in one range.
    wants = [_Want(bytes([i]) * 32, 100 + 10 * i, 10, 400) for i in range(4)]
    batch = Batch(b"p" * 32, 100, 40, wants)
    parts = split_by_raw([batch], 1000)
    assert [len(p.blobs) for p in parts] == [2, 2]
    assert [(p.offset, p.length) for p in parts] == [(100, 20), (120, 20)]
    assert split_by_raw([batch], 10_000) == [batch]


def _repo(tmp: Path, name: str, password: str) -> Cairn:
    pw = tmp / f"{name}.password"
    pw.write_text(password + "\n")
    c = Cairn(tmp / name, pw)
    c.run("init", check=True)
    return c


def _copy(dest: Cairn, src: Cairn, *args: str, env: dict[str, str] | None = None) -> Result:
    return dest.run(
        "copy",
        "--from-repo",
        str(src.repo),
        "--from-password-file",
        str(src.password_file),
        "--json",
        *args,
        env=env,
    )


def _summary(result: Result) -> dict[str, Any]:
    summary: dict[str, Any] = result.json_lines()[-1]
    assert summary["message_type"] == "summary", result.out
    return summary


def _snapshots(c: Cairn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = c.run("snapshots", "--json", check=True).json()
    return out


def _files(c: Cairn, kind: str) -> dict[str, int]:
    root = Path(c.repo) / kind
    return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _same_metadata(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("time", "hostname", "username", "paths", "tags", "excludes"):
        assert a.get(key) == b.get(key), key


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cairn, Path]:
    """A repository with two snapshots of a tree holding every kind of entry."""
    tmp = tmp_path_factory.mktemp("copy-source")
    src = _repo(tmp, "src", "the source's password")
    tree = tmp / "tree"
    make_everything_tree(tree)
    src.run("backup", str(tree), "--tag", "first", "--host", "alpha", check=True)
    (tree / "added.txt").write_text("in the second snapshot only\n")
    src.run("backup", str(tree), "--tag", "second,more", check=True)
    return src, tree


def test_copy_twice_then_restore_equals_the_source(
    source: tuple[Cairn, Path], tmp_path: Path
) -> None:
    src, tree = source
    dest = _repo(tmp_path, "dest", "another password entirely")
    first = _copy(dest, src)
    assert first.code == 0, first.err
    s = _summary(first)
    assert s["snapshots_copied"] == 2 and s["snapshots_skipped"] == 0, s
    assert s["data_blobs"] > 0 and s["data_added"] > 6 * MiB  # every file's content
    assert "Traceback" not in first.err

    # Same time, host, paths, tags as the originals; each remembers its original.
    originals = sorted(_snapshots(src), key=lambda s: s["time"])
    copies = sorted(_snapshots(dest), key=lambda s: s["time"])
    assert len(copies) == 2
    for a, b in zip(originals, copies, strict=True):
        _same_metadata(a, b)
        assert b["id"] != a["id"]
        assert b["tree"] != a["tree"]  # blob IDs are keyed: new trees
    pairs = {c["source"]: c["snapshot_id"] for c in s["copied"]}
    assert set(pairs) == {o["id"] for o in originals}

    # The second run copies nothing and writes nothing but its lock.
    packs, index = _files(dest, "data"), _files(dest, "index")
    second = _copy(dest, src)
    assert second.code == 0, second.err
    s2 = _summary(second)
    assert (s2["snapshots_copied"], s2["snapshots_skipped"]) == (0, 2), s2
    assert s2["data_blobs"] == s2["tree_blobs"] == s2["bytes_downloaded"] == 0
    assert {x["copy"] for x in s2["skipped"]} == set(pairs.values())
    assert _files(dest, "data") == packs and _files(dest, "index") == index
    assert len(_snapshots(dest)) == 2

    assert dest.run("check", "--read-data").code == 0
    # Every kind of entry comes back from the copy as it was backed up.
    target = tmp_path / "restored"
    dest.run("restore", "latest", "--target", str(target), check=True)
    assert snapshot_of(target / tree.relative_to("/")) == snapshot_of(tree)


def test_copy_selected_snapshots_and_filters(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    src, _tree = source
    dest = _repo(tmp_path, "dest", "dest password")
    result = _copy(dest, src, "--host", "alpha")
    assert result.code == 0, result.err
    (only,) = _snapshots(dest)
    assert only["hostname"] == "alpha" and only["tags"] == ["first"]
    # Then by ID prefix: the other one, and the first is skipped as copied.
    ids = [s["id"] for s in _snapshots(src)]
    result = _copy(dest, src, *(i[:10] for i in ids))
    s = _summary(result)
    assert (s["snapshots_copied"], s["snapshots_skipped"]) == (1, 1), s
    # The incremental copy knew the first one's blobs from its copy: only what
    # changed was downloaded.
    assert s["blobs_from_earlier_copies"] > 0
    assert s["bytes_downloaded"] < 1 * MiB, s
    assert _copy(dest, src, "nosuchid").code == 1


def test_copy_dedupes_against_what_the_destination_holds(tmp_path: Path) -> None:
    src = _repo(tmp_path, "src", "source pw")
    dest = _repo(tmp_path, "dest", "dest pw")
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20):  # single-blob files: the same blob whatever the chunker seed
        (tree / f"f{i}").write_bytes(os.urandom(100_000))
    src.run("backup", str(tree), check=True)
    dest.run("backup", str(tree), check=True)  # the destination has the same content
    packs = _files(dest, "data")
    s = _summary(_copy(dest, src))
    assert s["snapshots_copied"] == 1
    assert s["blobs_already_present"] == 20 and s["data_blobs"] == s["data_added"] == 0, s
    # What was sent are the trees (their directories' times differ): a few KiB.
    added = {n: size for n, size in _files(dest, "data").items() if n not in packs}
    assert sum(added.values()) < 64 * 1024, added


def test_blobs_keep_their_compression_unless_compression_is_given(tmp_path: Path) -> None:
    src = _repo(tmp_path, "src", "source pw")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "log.txt").write_bytes(b"".join(b"line %d of a log\n" % i for i in range(100_000)))
    src.run("backup", str(tree), check=True)
    kept = _summary(_copy(_repo(tmp_path, "kept", "pw 1"), src))
    assert kept["data_added_packed"] < kept["data_added"] / 3, kept  # still compressed
    plain_repo = _repo(tmp_path, "plain", "pw 2")
    plain = _summary(_copy(plain_repo, src, "--compression", "off"))
    assert plain["data_added"] == kept["data_added"]
    assert plain["data_added_packed"] > plain["data_added"], plain  # stored raw
    target = tmp_path / "restored"
    plain_repo.run("restore", "latest", "--target", str(target), check=True)
    assert snapshot_of(target / tree.relative_to("/")) == snapshot_of(tree)


def _newest_data_pack(c: Cairn, before: dict[str, int]) -> Path:
    new = {n: size for n, size in _files(c, "data").items() if n not in before}
    name = max(new, key=lambda n: new[n])  # the data pack, not the small tree pack
    return Path(c.repo) / "data" / name[:2] / name


def test_a_corrupt_source_blob_fails_only_the_snapshots_needing_it(tmp_path: Path) -> None:
    src = _repo(tmp_path, "src", "source pw")
    dest = _repo(tmp_path, "dest", "dest pw")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "a.bin").write_bytes(os.urandom(300_000))
    (bad / "b.bin").write_bytes(os.urandom(300_000))
    src.run("backup", str(good), check=True)
    before = _files(src, "data")
    src.run("backup", str(bad), check=True)
    pack = _newest_data_pack(src, before)
    data = bytearray(pack.read_bytes())
    data[1000] ^= 0xFF  # inside the blob: its authentication fails
    pack.write_bytes(bytes(data))
    bad_id = next(s["id"] for s in _snapshots(src) if s["paths"] == [str(bad)])

    result = _copy(dest, src)
    assert result.code == 1, result.err
    s = _summary(result)
    assert s["snapshots_copied"] == 1 and s["snapshots_failed"] == 1, s
    assert s["failed"][0]["source"] == bad_id
    (line,) = [ln for ln in result.err.splitlines() if "not copied" in ln]
    assert bad_id[:8] in line and "b.bin" in line and "corrupt" in line, line
    assert "Traceback" not in result.err
    (copied,) = _snapshots(dest)
    assert copied["paths"] == [str(good)]
    assert dest.run("check", "--read-data").code == 0


def test_a_lost_source_pack_fails_only_the_snapshots_needing_it(tmp_path: Path) -> None:
    src = _repo(tmp_path, "src", "source pw")
    dest = _repo(tmp_path, "dest", "dest pw")
    good, gone = tmp_path / "good", tmp_path / "gone"
    good.mkdir()
    gone.mkdir()
    (good / "a.bin").write_bytes(os.urandom(300_000))
    (gone / "b.bin").write_bytes(os.urandom(300_000))
    src.run("backup", str(gone), check=True)
    before = _files(src, "data")
    src.run("backup", str(good), check=True)
    lost = max(before, key=lambda n: before[n])  # the data pack of the first snapshot
    (Path(src.repo) / "data" / lost[:2] / lost).unlink()

    result = _copy(dest, src)
    assert result.code == 1, result.err
    s = _summary(result)
    assert (s["snapshots_copied"], s["snapshots_failed"]) == (1, 1), s
    (line,) = [ln for ln in result.err.splitlines() if "not copied" in ln]
    assert f"pack {lost} cannot be read" in line and "b.bin" in line, line
    (copied,) = _snapshots(dest)
    assert copied["paths"] == [str(good)]


def test_source_errors_name_the_source(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    src, _tree = source
    dest = _repo(tmp_path, "dest", "dest pw")
    wrong = tmp_path / "wrong"
    wrong.write_text("not the source's password\n")
    result = dest.run("copy", "--from-repo", str(src.repo), "--from-password-file", str(wrong))
    assert result.code == 12, result.err
    assert result.err.strip().startswith("cairn: source repository: wrong password"), result.err
    result = _copy(dest, Cairn(tmp_path / "nothing-here", src.password_file))
    assert result.code == 10, result.err
    assert "source repository" in result.err and "Traceback" not in result.err
    result = dest.run(
        "copy",
        "--from-repo",
        "rest:http://127.0.0.1:9/repo",
        "--from-password-file",
        str(src.password_file),
    )
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1, result.err
    assert "source repository" in result.err
    # The destination's password variables never reach the source.
    result = dest.run("copy", "--from-repo", str(src.repo), env={"CAIRN_PASSWORD": "x"})
    assert result.code == 1 and "no password given" in result.err, result.err
    # The source's own, as restic's RESTIC_FROM_*, do.
    env = {"CAIRN_FROM_REPOSITORY": str(src.repo), "CAIRN_FROM_PASSWORD": "the source's password"}
    result = dest.run("copy", "--host", "alpha", "--json", env=env)
    assert result.code == 0 and _summary(result)["snapshots_copied"] == 1, result.err


_HOLD_EXCLUSIVE = """
import sys, anyio
from cairn.backends.local import LocalBackend
from cairn.repo.repository import open_repository
from cairn.stages.locking import repository_lock

async def main():
    repo = await open_repository(LocalBackend(sys.argv[1]), sys.argv[2])
    async with repository_lock(repo, exclusive=True):
        await anyio.sleep(120)

anyio.run(main)
"""


def test_a_source_locked_exclusively_is_named(source: tuple[Cairn, Path], tmp_path: Path) -> None:
    src, _tree = source
    dest = _repo(tmp_path, "dest", "dest pw")
    password = src.password_file.read_text().strip()
    holder = subprocess.Popen(
        [*CAIRN[:1], "-c", _HOLD_EXCLUSIVE, str(src.repo), password], env=src.env
    )
    try:
        deadline = time.monotonic() + 60
        while not _files(src, "locks"):
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        result = _copy(dest, src)
    finally:
        holder.kill()
        holder.wait()
    assert result.code == 11, result.err
    assert "source repository" in result.err and "locked" in result.err, result.err
    assert not _snapshots(dest)


def test_an_interrupted_copy_resumes_without_sending_its_packs_again(tmp_path: Path) -> None:
    src = _repo(tmp_path, "src", "source pw")
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(8):
        (tree / f"f{i}").write_bytes(os.urandom(3 * MiB))
    src.run("backup", str(tree), check=True)

    clean = _repo(tmp_path, "clean", "dest pw")
    assert _copy(clean, src, "--pack-size", "4").code == 0
    clean_bytes = sum(_files(clean, "data").values())

    dest = _repo(tmp_path, "dest", "dest pw")
    # The destination's 5th save fails, and every save under data/ after it: the
    # first ones are its lock and three data packs.
    faults = {FAULTS: "save:data/#5-=error"}
    first = _copy(dest, src, "--pack-size", "4", "--connections", "1", env=faults)
    assert first.code == 1, first.err
    assert "Traceback" not in first.err
    sent = _files(dest, "data")
    assert len(sent) >= 2, sent
    assert _files(dest, "index"), "the packs uploaded before the failure were not indexed"
    assert not _files(dest, "snapshots")

    second = _copy(dest, src, "--pack-size", "4")
    assert second.code == 0, second.err
    s = _summary(second)
    assert s["snapshots_copied"] == 1 and s["blobs_already_present"] > 0, s
    after = _files(dest, "data")
    assert sent.items() <= after.items()
    # Nothing was sent twice: the repository is no larger than a clean copy's.
    assert sum(after.values()) <= clean_bytes + 64 * 1024, (sum(after.values()), clean_bytes)
    assert dest.run("check", "--read-data").code == 0
    target = tmp_path / "restored"
    dest.run("restore", "latest", "--target", str(target), check=True)
    assert snapshot_of(target / tree.relative_to("/")) == snapshot_of(tree)


def test_ctrl_c_stops_a_copy_and_the_next_run_reuses_its_packs(tmp_path: Path) -> None:
    src = _repo(tmp_path, "src", "source pw")
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(10):
        (tree / f"f{i}").write_bytes(os.urandom(4 * MiB))
    src.run("backup", str(tree), check=True)
    dest = _repo(tmp_path, "dest", "dest pw")
    # Small packs behind an upload limit: the signal lands with some packs stored.
    cmd = [*CAIRN, "-r", str(dest.repo), "--password-file", str(dest.password_file)]
    cmd += ["--insecure-kdf", "--pack-size", "4", "--limit-upload", "6000", "copy"]
    cmd += ["--from-repo", str(src.repo), "--from-password-file", str(src.password_file)]
    proc = subprocess.Popen(
        cmd,
        env=dest.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(_files(dest, "data")) < 2:
            assert proc.poll() is None, "the copy ended before it could be interrupted"
            assert time.monotonic() < deadline, "no packs appeared"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    sent = _files(dest, "data")
    assert _files(dest, "index") and not _files(dest, "snapshots")
    assert not _files(dest, "locks") and not _files(src, "locks"), "stale lock after the interrupt"

    second = _copy(dest, src)
    assert second.code == 0, second.err
    after = _files(dest, "data")
    assert sent.items() <= after.items()
    # Nothing sent twice: the copy is no larger than its (incompressible) source.
    source_bytes = sum(_files(src, "data").values())
    assert sum(after.values()) <= source_bytes + 64 * 1024, (sum(after.values()), source_bytes)
    assert dest.run("check").code == 0


def test_copy_to_s3(
    source: tuple[Cairn, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    src, tree = source
    url, options = location_for("s3", request, tmp_path)
    env = {
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    password = tmp_path / "password"
    password.write_text("s3 password\n")
    flags = tuple(f"--option={key}={value}" for key, value in options.items())
    dest = Cairn(url, password, extra_env=env, global_args=flags)
    dest.run("init", check=True)
    result = _copy(dest, src, "latest")
    assert result.code == 0, result.err
    assert _summary(result)["snapshots_copied"] == 1
    assert _summary(_copy(dest, src, "latest"))["snapshots_skipped"] == 1
    assert dest.run("check", "--read-data").code == 0
    target = tmp_path / "restored"
    dest.run("restore", "latest", "--target", str(target), check=True)
    assert snapshot_of(target / tree.relative_to("/")) == snapshot_of(tree)
    shutil.rmtree(target)


def test_repository_file_and_key_hint_name_the_destination_only(
    source: tuple[Cairn, Path], tmp_path: Path
) -> None:
    src, _tree = source
    dest = _repo(tmp_path, "dest", "another password entirely")
    (tmp_path / "repository").write_text(f"{dest.repo}\n")
    (dest_key,) = [k["id"] for k in dest.run("key", "list", "--json", check=True).json()]
    result = dest.run(
        "--repository-file", str(tmp_path / "repository"), "--key-hint", dest_key,
        "--password-file", str(dest.password_file), "--insecure-kdf", "--json",
        "copy", "--from-repo", str(src.repo), "--from-password-file", str(src.password_file),
        base=False,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert _summary(result)["snapshots_copied"] == 2
    assert len(_snapshots(dest)) == 2
