"""The local metadata cache (``cairn/repo/cache.py``) through the real CLI over REST.

What the backend is asked for is read from the logging wrapper's ``backend.load``
debug events (``--log-level debug --log-file``): a run that should be served by the
cache must not load any ``snapshots/``, ``index/`` or tree-pack ``data/`` object.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.servers")

from cairn.repo.cache import MetadataCache, default_cache_root  # noqa: E402
from cairn.repo.crypto import storage_id  # noqa: E402
from tests.cli_helpers import Cairn, Result  # noqa: E402
from tests.servers import location_for  # noqa: E402

pytest_plugins = ["tests.servers"]


class Logged:
    """A CLI over a fresh REST repository that reports what each run loaded."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        url, _options = location_for("rest", request, tmp_path)
        server = request.getfixturevalue("rest_server")
        self.remote = server.root / url.rsplit("/", 1)[-1]  # the repository's files
        password = tmp_path / "password"
        password.write_text("cache test\n")
        self.cache_home = tmp_path / "xdg-cache"
        self.cli = Cairn(url, password, extra_env={"XDG_CACHE_HOME": str(self.cache_home)})
        self.log = tmp_path / "cairn.log"
        self.runs = 0

    def run(self, *args: str) -> tuple[Result, list[str]]:
        """Run a command that must succeed; its result and the names it loaded."""
        self.runs += 1
        log = self.log.with_suffix(f".{self.runs}")
        result = self.cli.run(
            "--log-file", str(log), "--log-level", "debug", "--log-format", "json", *args
        )
        assert result.code == 0, result.err
        events = [json.loads(line) for line in log.read_text().splitlines()]
        return result, [e["name"] for e in events if e["event"] == "backend.load"]

    def cache_dir(self) -> Path:
        (entry,) = [p for p in (self.cache_home / "cairn").iterdir() if p.is_dir()]
        return entry


def _metadata(loads: list[str]) -> list[str]:
    return [n for n in loads if n.startswith(("snapshots/", "index/", "data/"))]


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.txt").write_text("deep\n")
    (root / "top.txt").write_text("top\n" * 100)
    (root / "blob.bin").write_bytes(os.urandom(300_000))


@pytest.fixture
def rest(request: pytest.FixtureRequest, tmp_path: Path) -> Logged:
    return Logged(request, tmp_path)


def test_second_runs_load_nothing_from_the_backend(rest: Logged, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    rest.run("init")
    # Written with --no-cache: the cache starts empty, so the first reads must fill it.
    first, _ = rest.run("--no-cache", "backup", str(src), "--json")
    first_id = first.json_lines()[-1]["snapshot_id"]
    assert not (rest.cache_home / "cairn").exists()

    _, loads = rest.run("snapshots")
    assert f"snapshots/{first_id}" in loads
    _, loads = rest.run("snapshots")
    assert _metadata(loads) == []

    _, loads = rest.run("ls", "latest")
    assert any(n.startswith("index/") for n in loads)
    assert any(n.startswith("data/") for n in loads)  # the tree pack
    out, loads = rest.run("ls", "latest")
    assert "deep.txt" in out.out and _metadata(loads) == []
    out, loads = rest.run("find", "deep.txt")
    assert "deep.txt" in out.out and _metadata(loads) == []

    # A second backup reads index and parent trees from the cache, and writes its
    # own snapshot, index file and tree pack through to it.
    (src / "top.txt").write_text("changed\n")
    second, loads = rest.run("backup", str(src), "--json")
    summary = second.json_lines()[-1]
    assert summary["parent"] == first_id and summary["files_unmodified"] == 2
    assert _metadata(loads) == []
    second_id = summary["snapshot_id"]
    out, loads = rest.run("diff", first_id, second_id)
    assert "top.txt" in out.out and _metadata(loads) == []
    _, loads = rest.run("snapshots")
    assert _metadata(loads) == []
    # check verifies what the backend holds, never the cache's copies.
    _, loads = rest.run("check")
    assert sum(n.startswith("index/") for n in loads) == 2
    assert sum(n.startswith("snapshots/") for n in loads) == 2


def test_corrupt_entries_are_detected_and_fetched_again(rest: Logged, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    rest.run("init")
    snap_id = rest.run("backup", str(src), "--json")[0].json_lines()[-1]["snapshot_id"]
    cache = rest.cache_dir()
    entry = cache / "snapshots" / snap_id[:2] / snap_id
    good = entry.read_bytes()
    entry.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))

    out, loads = rest.run("snapshots", "--json")
    assert [s["id"] for s in out.json()] == [snap_id]
    assert loads.count(f"snapshots/{snap_id}") == 1  # fetched again...
    assert entry.read_bytes() == good  # ...and the entry repaired

    # The same for a cached tree pack: every one is broken, ls still works.
    packs = list((cache / "data").glob("*/*"))
    assert packs
    for pack in packs:
        pack.write_bytes(b"garbage" + pack.read_bytes()[7:])
    out, loads = rest.run("ls", "latest")
    assert "deep.txt" in out.out
    assert sorted(n.rsplit("/", 1)[-1] for n in loads if n.startswith("data/")) == sorted(
        p.name for p in packs
    )
    for pack in packs:
        assert storage_id(pack.read_bytes()) == pack.name


def test_no_cache_bypasses_and_stale_entries_are_dropped(rest: Logged, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    rest.run("init")
    first = rest.run("backup", str(src), "--json")[0].json_lines()[-1]["snapshot_id"]
    (src / "top.txt").write_text("second\n")
    rest.run("backup", str(src))
    rest.run("snapshots")
    cache = rest.cache_dir()
    assert (cache / "snapshots" / first[:2] / first).exists()

    # --no-cache goes to the backend although the cache holds everything...
    _, loads = rest.run("--no-cache", "snapshots")
    assert sum(n.startswith("snapshots/") for n in loads) == 2
    # ...and neither reads nor writes a --cache-dir given with it.
    other = tmp_path / "other-cache"
    _, loads = rest.run("--no-cache", "--cache-dir", str(other), "ls", "latest")
    assert any(n.startswith("data/") for n in loads) and not other.exists()
    # --cache-dir alone moves the cache.
    rest.run("--cache-dir", str(other), "snapshots")
    assert len(list(other.glob("*/snapshots/*/*"))) == 2

    packs_before = {p.name for p in (cache / "data").glob("*/*")}
    rest.run("--no-cache", "forget", "--keep-last", "1", "--prune", "--max-unused", "0")
    # The next listing drops the forgotten snapshot; the next index load drops the
    # tree packs prune removed.
    rest.run("snapshots")
    assert not (cache / "snapshots" / first[:2] / first).exists()
    assert len(list((cache / "snapshots").glob("*/*"))) == 1
    rest.run("ls", "latest")
    remote = {p.name for p in rest.remote.glob("data/*/*")}
    cached = {p.name for p in (cache / "data").glob("*/*")}
    assert packs_before - remote, "prune removed no tree pack: the test proves nothing"
    assert cached and cached <= remote
    assert not cached & (packs_before - remote)
    cached_index = {p.name for p in (cache / "index").glob("*/*")}
    assert cached_index == {p.name for p in rest.remote.glob("index/*")}


@pytest.mark.anyio
async def test_cache_unit_verify_and_drop(tmp_path: Path) -> None:
    cache = MetadataCache.open(tmp_path / "root", "ab" * 32)
    data = b"sealed bytes"
    object_id = storage_id(data)
    assert await cache.load("index", object_id) is None
    await cache.save("index", object_id, data)
    assert await cache.load("index", object_id) == data
    cache.path("index", object_id).write_bytes(b"sealed bytez")
    assert await cache.load("index", object_id) is None  # corrupt: dropped
    assert not cache.path("index", object_id).exists()
    assert cache.stats.corrupt == 1
    await cache.save("snapshots", object_id, data)
    assert cache.drop_stale("snapshots", ["cd" * 32]) == 1
    assert cache.cached_ids("snapshots") == set()
    assert (tmp_path / "root" / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f59")
    with pytest.raises(ValueError):
        cache.path("keys", object_id)


def test_default_cache_root_follows_xdg() -> None:
    assert default_cache_root({"XDG_CACHE_HOME": "/x/cache", "HOME": "/h"}) == Path(
        "/x/cache/cairn"
    )
    assert default_cache_root({"XDG_CACHE_HOME": "relative", "HOME": "/h"}) == Path(
        "/h/.cache/cairn"
    )
