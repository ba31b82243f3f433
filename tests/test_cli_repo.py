"""init, key, cat and version through the real command, and their error exits."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_init_refuses_existing_repository(cairn: Cairn) -> None:  # noqa: F811
    before = _files(cairn.repo)
    result = cairn.run("init")
    assert result.code == 1
    assert "already exists" in result.err and len(result.err.strip().splitlines()) == 1
    assert _files(cairn.repo) == before


def test_wrong_password_exit_12(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    wrong = tmp_path / "wrong"
    wrong.write_text("not it")
    result = cairn.run(
        "snapshots",
        base=False,
        env={"CAIRN_REPOSITORY": str(cairn.repo), "CAIRN_PASSWORD_FILE": str(wrong)},
    )
    assert result.code == 12
    assert result.err.strip().startswith("cairn: wrong password")
    assert "Traceback" not in result.err


def test_key_file_name_is_not_required_but_damage_is_named(cairn: Cairn) -> None:  # noqa: F811
    """A key file under another name still opens (docs/format.md: readers must not
    require the storage ID); one whose bytes changed is named as damaged, not taken
    for a wrong password."""
    (key,) = (Path(cairn.repo) / "keys").iterdir()
    renamed = key.with_name("0" * 64)
    key.rename(renamed)
    assert cairn.run("snapshots").code == 0
    data = bytearray(renamed.read_bytes())
    data[len(data) // 2] ^= 0x01
    renamed.write_bytes(bytes(data))
    renamed.rename(key)
    result = cairn.run("snapshots")
    assert result.code == 12, result.err
    assert f"damaged key files: keys/{key.name} (content does not match its name)" in result.err


def test_no_repository_exit_10(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x")
    c = Cairn(tmp_path / "missing", pw)
    result = c.run("snapshots")
    assert result.code == 10
    assert "no repository" in result.err


def test_password_sources(cairn: Cairn) -> None:  # noqa: F811
    env = {"CAIRN_REPOSITORY": str(cairn.repo)}
    r = cairn.run(
        "key",
        "list",
        base=False,
        env=env | {"CAIRN_PASSWORD_COMMAND": f"cat {cairn.password_file}"},
    )
    assert r.code == 0, r.err
    r = cairn.run("key", "list", "--password-command", "false", base=False, env=env)
    assert r.code == 1 and "password command" in r.err
    r = cairn.run("key", "list", base=False, env=env, input=b"")
    assert r.code == 1 and "no password given" in r.err


def test_key_add_list_passwd_remove(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    second = tmp_path / "second"
    second.write_text("second password")
    r = cairn.run("key", "add", "--new-password-file", str(second), "--json", check=True)
    added = r.json()["id"]
    keys = cairn.run("key", "list", "--json", check=True).json()
    assert len(keys) == 2
    current = [k for k in keys if k["current"]]
    assert len(current) == 1 and current[0]["id"] != added
    # The key in use cannot be removed; the other one can, by prefix.
    r = cairn.run("key", "remove", current[0]["id"][:10])
    assert r.code == 1 and "in use" in r.err
    other = Cairn(cairn.repo, second)
    assert other.run("key", "list", check=True).code == 0
    # passwd: the old password stops working, the new one works.
    third = tmp_path / "third"
    third.write_text("third password")
    other.run("key", "passwd", "--new-password-file", str(third), check=True)
    assert other.run("key", "list").code == 12
    assert Cairn(cairn.repo, third).run("key", "list").code == 0
    r = cairn.run("key", "remove", added[:8])
    assert r.code == 1  # already removed by passwd
    keys = cairn.run("key", "list", "--json", check=True).json()
    assert len(keys) == 2
    removable = next(k["id"] for k in keys if not k["current"])
    cairn.run("key", "remove", removable, check=True)
    # Now only one key is left: removing it is refused even from another password.
    keys = cairn.run("key", "list", "--json", check=True).json()
    assert len(keys) == 1


def test_cat_objects(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello cat\n")
    cfg = cairn.run("cat", "config", check=True).json()
    assert cfg["version"] == 1 and len(cfg["id"]) == 64
    cairn.run("backup", str(src), check=True)
    snaps = cairn.run("snapshots", "--json", check=True).json()
    snap = cairn.run("cat", "snapshot", snaps[0]["short_id"], check=True).json()
    assert snap["paths"] == [str(src)]
    tree = cairn.run("cat", "tree", snap["tree"], check=True).json()
    assert tree["nodes"][0]["type"] == "dir"
    index_ids = os.listdir(cairn.repo / "index")
    index = cairn.run("cat", "index", index_ids[0], check=True).json()
    pack_id = index["packs"][0]["id"]
    pack = cairn.run("cat", "pack", pack_id[:12], check=True).json()
    assert pack["blobs"]
    data_packs = [p for p in index["packs"] if p["blobs"][0]["type"] == "data"]
    blob_id = data_packs[0]["blobs"][0]["id"]
    blob = cairn.run("cat", "blob", blob_id, check=True)
    assert blob.out == "hello cat\n"
    key_id = os.listdir(cairn.repo / "keys")[0]
    key = cairn.run("cat", "key", key_id, check=True).json()
    assert "kdf" in json.dumps(key)


def test_corrupted_objects_are_named_not_decoded(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(5000))
    cairn.run("backup", str(src), check=True)
    snap_dir = cairn.repo / "snapshots"
    snap_file = next(snap_dir.iterdir())
    data = bytearray(snap_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(snap_file, 0o600)
    snap_file.write_bytes(bytes(data))
    # The backup left a good copy in the local metadata cache; read the backend's.
    r = cairn.run("--no-cache", "cat", "snapshot", snap_file.name)
    assert r.code == 1
    assert snap_file.name in r.err and "corrupted" in r.err
    assert "Traceback" not in r.err
    # Listing skips it with a warning naming the file (the others stay usable).
    r = cairn.run("--no-cache", "snapshots")
    assert r.code == 0 and f"snapshots/{snap_file.name}" in r.err and "damaged" in r.err
    # Truncated config: reported as corrupted config.
    config = cairn.repo / "config"
    os.chmod(config, 0o600)
    config.write_bytes(config.read_bytes()[:-7])
    r = cairn.run("snapshots")
    assert r.code == 1 and "config" in r.err and "Traceback" not in r.err


def test_version(tmp_path: Path) -> None:
    c = Cairn(tmp_path, tmp_path)
    r = c.run("version", "--json", base=False, check=True)
    assert r.json()["version"]
