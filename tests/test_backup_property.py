"""Property: for random trees, backup then restore gives identical content and metadata."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli_helpers import Cairn
from tests.treeutil import snapshot_of

# Names: any bytes but NUL and "/", including invalid UTF-8; not "." or "..".
names = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
contents = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda n, b: b * n, st.integers(0, 700_000), st.binary(min_size=1, max_size=3)),
)
modes = st.sampled_from([0o644, 0o600, 0o755, 0o444, 0o4755, 0o2711])
mtimes = st.integers(0, 2_000_000_000_000_000_000)


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> dict[bytes, object]:
    entries = draw(st.dictionaries(names, st.none(), max_size=6))
    out: dict[bytes, object] = {}
    for name in entries:
        kind = draw(st.sampled_from(["file", "file", "link", "dir"] if depth < 3 else ["file"]))
        if kind == "file":
            out[name] = ("file", draw(contents), draw(modes), draw(mtimes))
        elif kind == "link":
            out[name] = ("link", draw(st.binary(min_size=1, max_size=60).filter(
                lambda b: b"\0" not in b)))
        else:
            out[name] = ("dir", draw(trees(depth + 1)), draw(st.sampled_from([0o755, 0o700])))
    return out


def _write(root: bytes, tree: dict[bytes, object]) -> None:
    for name, spec in tree.items():
        path = root + b"/" + name
        kind = spec[0]  # type: ignore[index]
        if kind == "file":
            _, data, mode, mtime = spec  # type: ignore[misc]
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, mode)
            os.utime(path, ns=(mtime, mtime))
        elif kind == "link":
            os.symlink(spec[1], path)  # type: ignore[index]
        else:
            _, sub, mode = spec  # type: ignore[misc]
            os.mkdir(path)
            _write(path, sub)
            os.chmod(path, mode)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=trees())
def test_random_trees_round_trip(tmp_path_factory: object, tree: dict[bytes, object]) -> None:
    base: Path = tmp_path_factory.mktemp("prop")  # type: ignore[attr-defined]
    password = base / "pw"
    password.write_text("pw")
    cairn = Cairn(base / "repo", password)
    cairn.run("init", check=True)
    src = base / "src"
    src.mkdir()
    _write(os.fsencode(str(src)), tree)
    before = snapshot_of(src)
    cairn.run("backup", str(src), check=True)
    target = base / "restore"
    cairn.run("restore", "latest", "--target", str(target), check=True)
    after = snapshot_of(target / str(src).lstrip("/"))
    assert after == before
    shutil.rmtree(base, ignore_errors=True)
