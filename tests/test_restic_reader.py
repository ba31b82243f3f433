"""The restic repository reader against repositories written by the real ``restic``
(Debian's binary), format versions 1 and 2, and fuzzed decoders."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anyio
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cairn.backends.local import LocalBackend
from cairn.repo.errors import CorruptedObject, WrongPassword
from cairn.repo.restic.convert import go_unquote, parse_time, snapshot_from_json, tree_from_json
from cairn.repo.restic.crypto import ResticKey, Unauthenticated
from cairn.repo.restic.repository import ResticRepository
from cairn.repo.tree import Node

PASSWORD = "restic reader test"


def restic(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(repo) + ".cache"}
    return subprocess.run(
        ["restic", "-q", "-r", str(repo), *args],
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
    )


def make_source(root: Path) -> Path:
    """A tree with every kind of entry restic and cairn both keep."""
    src = root / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "plain.txt").write_text("hello\n" * 100)
    (src / "sub" / "deeper" / "random.bin").write_bytes(os.urandom(3_000_000))
    (src / "sub" / "text.log").write_text("line of text\n" * 200_000)  # compresses
    (src / "empty").write_bytes(b"")
    # Stored as is in format 1, it still begins as a zstd frame: not to be decompressed.
    (src / "archive.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zst " * 50_000))
    (src / 'quote"and\\backslash').write_text("q")
    (src / os.fsdecode(b"latin\xe9name")).write_text("non-UTF-8 name")
    os.link(src / "plain.txt", src / "hardlink.txt")
    os.symlink("sub/text.log", src / "link")
    os.mkfifo(src / "fifo")
    os.setxattr(src / "plain.txt", "user.colour", b"blue\x00green")
    os.chmod(src / "sub", 0o2750)
    os.utime(src / "empty", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    return src


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("restic")
    src = make_source(root)
    out = {}
    for version in ("1", "2"):
        repo = root / f"repo-v{version}"
        restic(repo, "init", "--repository-version", version)
        restic(repo, "backup", "--host", "alpha", "--tag", "first", str(src))
        (src / "plain.txt").write_text("changed\n")
        restic(repo, "backup", "--host", "beta", "--tag", "second,extra", str(src))
        (src / "plain.txt").write_text("hello\n" * 100)
        out[version] = (repo, src)
    return out


async def _open(repo: Path) -> ResticRepository:
    return await ResticRepository.open(LocalBackend(repo), PASSWORD)


async def _find(r: ResticRepository, tree_id: bytes, path: list[bytes]) -> Node:
    tree = await r.load_tree(tree_id)
    (node,) = [n for n in tree.nodes if n.name == path[0]]
    if len(path) == 1:
        return node
    assert node.subtree is not None
    return await _find(r, node.subtree, path[1:])


def _components(path: Path) -> list[bytes]:
    return [os.fsencode(p) for p in path.parts[1:]]


async def _content(r: ResticRepository, node: Node) -> bytes:
    return b"".join([await r.read_blob(b) for b in node.content])


@pytest.mark.parametrize("version", ["1", "2"])
def test_reads_what_restic_wrote(repos: dict[str, tuple[Path, Path]], version: str) -> None:
    repo, src = repos[version]
    listed = json.loads(restic(repo, "snapshots", "--json").stdout)

    async def main() -> None:
        r = await _open(repo)
        assert r.config.version == int(version)
        snaps, damaged = await r.snapshots()
        assert damaged == []
        assert [i for i, _ in snaps] == [s["id"] for s in listed]
        first, second = snaps[0][1], snaps[1][1]
        assert (first.hostname, first.tags, second.hostname, second.tags) == (
            "alpha",
            ["first"],
            "beta",
            ["second", "extra"],
        )
        assert first.paths == [str(src)] and first.original == snaps[0][0]
        await r.load_index()
        # restic's tree holds the absolute path, as cairn's does.
        top = _components(src)
        for name in (b"sub/deeper/random.bin", b"sub/text.log", b"empty", b"archive.zst"):
            node = await _find(r, second.tree, top + name.split(b"/"))
            path = src / os.fsdecode(name)
            assert await _content(r, node) == path.read_bytes()
            st_ = path.lstat()
            assert (node.size, node.mode, node.mtime_ns) == (
                st_.st_size,
                st_.st_mode & 0o7777,
                st_.st_mtime_ns,
            )
        plain = await _find(r, first.tree, [*top, b"plain.txt"])
        assert await _content(r, plain) == b"hello\n" * 100
        assert plain.xattrs == {b"user.colour": b"blue\x00green"}
        assert plain.links == 2 and plain.mode == 0o644
        changed = await _find(r, second.tree, [*top, b"plain.txt"])
        assert await _content(r, changed) == b"changed\n"
        sub = await _find(r, second.tree, [*top, b"sub"])
        assert sub.type == "dir" and sub.mode == 0o2750
        link = await _find(r, second.tree, [*top, b"link"])
        assert (link.type, link.link_target) == ("symlink", b"sub/text.log")
        assert (await _find(r, second.tree, [*top, b"fifo"])).type == "fifo"
        empty = await _find(r, second.tree, [*top, b"empty"])
        assert empty.mtime_ns == 1_500_000_000_987_654_321  # nanoseconds survive
        for odd in (b'quote"and\\backslash', b"latin\xe9name"):
            node = await _find(r, second.tree, [*top, odd])
            assert await _content(r, node) == (src / os.fsdecode(odd)).read_bytes()

    anyio.run(main)


def test_wrong_password_and_missing_repository(
    repos: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    repo, _ = repos["2"]

    async def main() -> None:
        with pytest.raises(WrongPassword):
            await ResticRepository.open(LocalBackend(repo), "not the password")
        with pytest.raises(Exception, match="no repository found"):
            await ResticRepository.open(LocalBackend(tmp_path / "nothing"), PASSWORD)

    anyio.run(main)


def test_a_damaged_pack_fails_only_its_blobs(
    repos: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    original, src = repos["2"]
    repo = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(original), str(repo)], check=True)

    async def main() -> None:
        r = await _open(repo)
        snaps, _ = await r.snapshots()
        index = await r.load_index()
        top = _components(src)
        random_bin = await _find(r, snaps[-1][1].tree, [*top, b"sub", b"deeper", b"random.bin"])
        victim = index[random_bin.content[0]]
        pack = repo / "data" / victim.pack_id.hex()[:2] / victim.pack_id.hex()
        data = bytearray(pack.read_bytes())
        data[victim.offset + 100] ^= 0x01
        pack.chmod(0o644)
        pack.write_bytes(bytes(data))
        with pytest.raises(CorruptedObject, match="authentication failed"):
            await r.read_blob(random_bin.content[0])
        # Blobs elsewhere still read.
        log = await _find(r, snaps[-1][1].tree, [*top, b"sub", b"text.log"])
        assert await _content(r, log) == (src / "sub" / "text.log").read_bytes()

    anyio.run(main)


def test_go_unquote_and_times() -> None:
    assert go_unquote("plain") == b"plain"
    assert go_unquote("bad\\xffname") == b"bad\xffname"
    assert go_unquote('q\\"x\\\\y\\n\\t') == b'q"x\\y\n\t'
    assert go_unquote("\\u00e9\\U0001F600") == "é😀".encode()
    assert go_unquote("not\\quoted") == b"not\\quoted"  # no valid escape: kept as is
    assert go_unquote("é") == "é".encode()
    assert parse_time("1970-01-01T00:00:00Z") == 0
    assert parse_time("2014-12-22T14:47:59.912418701+01:00") == 1419256079_912418701
    assert parse_time("2014-12-22T13:47:59.9Z") == 1419256079_900000000
    assert parse_time("0001-01-01T00:00:00Z") < 0
    with pytest.raises(ValueError):
        parse_time("yesterday")


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "nodes",
                        "name",
                        "type",
                        "mode",
                        "mtime",
                        "content",
                        "subtree",
                        "time",
                        "tree",
                        "paths",
                        "tags",
                        "extended_attributes",
                        "size",
                    ]
                ),
                inner,
                max_size=6,
            )
        ),
        max_leaves=20,
    )
)
def test_decoders_reject_malformed_json_cleanly(doc: object) -> None:
    for decode in (tree_from_json, snapshot_from_json):
        try:
            decode(doc, "x" * 64)
        except CorruptedObject:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_open_rejects_random_bytes(data: bytes) -> None:
    key = ResticKey(os.urandom(32), os.urandom(16), os.urandom(16))
    with pytest.raises(Unauthenticated):
        key.open(data)
    assert key.open(key.seal(data)) == data
