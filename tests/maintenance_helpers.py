"""Helpers for the check/prune/repair tests: a small repository with history, and
ways to look inside it and damage it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import anyio

from cairn.backends.local import LocalBackend
from cairn.repo.index import decode_index
from cairn.repo.repository import open_repository
from tests.cli_helpers import Cairn

PASSWORD = "correct horse battery staple"


def new_cairn(tmp: Path) -> Cairn:
    """An initialised repository under ``tmp`` (like the ``cairn`` fixture)."""
    password = tmp / "password"
    password.write_text(PASSWORD + "\n")
    c = Cairn(tmp / "repo", password)
    c.run("init", check=True)
    return c


def make_history(c: Cairn, src: Path) -> list[str]:
    """Three backups of a changing tree; returns the snapshot IDs, oldest first."""
    (src / "dir").mkdir(parents=True)
    (src / "keep.bin").write_bytes(os.urandom(300_000))
    (src / "dir" / "small.txt").write_text("small\n")
    ids = []
    for i in range(3):
        (src / f"gen{i}.bin").write_bytes(os.urandom(200_000 + i))
        if i:
            (src / f"gen{i - 1}.bin").unlink()
        (src / "dir" / "count.txt").write_text(str(i))
        out = c.run("backup", str(src), "--json", check=True).json_lines()[-1]
        ids.append(out["snapshot_id"])
    return ids


def copy_repo(c: Cairn, dest: Path) -> Cairn:
    """A copy of ``c``'s repository, with its own Cairn runner."""
    shutil.copytree(c.repo, dest / "repo")
    return Cairn(dest / "repo", c.password_file)


def pack_files(repo: Path) -> dict[str, Path]:
    return {p.name: p for p in (repo / "data").glob("*/*")}


def objects(repo: Path, kind: str) -> dict[str, Path]:
    return {p.name: p for p in (repo / kind).iterdir()}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def repo_size(repo: Path, sub: str = "") -> int:
    return sum(p.stat().st_size for p in (repo / sub).rglob("*") if p.is_file())


async def _describe(repo_path: Path) -> dict[str, Any]:
    repo = await open_repository(LocalBackend(repo_path), PASSWORD)
    packs: dict[str, int] = {}
    by_index: dict[str, list[str]] = {}
    blobs: dict[str, list[tuple[int, int]]] = {}
    for index_id in await repo.list_ids("index"):
        f = decode_index(await repo.load_sealed("index", index_id), index_id)
        by_index[index_id] = [p.hex() for p, _ in f.packs]
        for pack_id, entries in f.packs:
            packs[pack_id.hex()] = entries[0].type
            blobs[pack_id.hex()] = [(e.offset, e.length) for e in entries]
    await repo.backend.aclose()
    return {"pack_type": packs, "by_index": by_index, "blobs": blobs}


def describe(repo_path: Path) -> dict[str, Any]:
    """Pack types (0 data, 1 tree), packs per index file, blob ranges per pack."""
    return anyio.run(_describe, repo_path)


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: ")]
