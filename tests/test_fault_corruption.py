"""The standing fault campaign, part 2: every kind of repository file damaged three
ways, and what each command then does — exactly the table in docs/maintenance.md.

The test reads the table from the document (``## Damaged repository files``), so the
two cannot drift apart: one parametrized case per cell, asserting the exit code and
that the cell's phrase appears in the command's output (stdout and stderr, case
insensitive; ``{id}`` stands for the damaged file's ID, in full or abbreviated).

``CAIRN_CORRUPTION_OBSERVE=1 pytest … -s`` prints the observed cells instead of
asserting them (for updating the document).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli_helpers import Cairn, Result
from tests.maintenance_helpers import describe, new_cairn

DOC = Path(__file__).parent.parent / "docs" / "maintenance.md"
HEADING = "## Damaged repository files"
KINDS = ("data pack", "tree pack", "index", "snapshot", "key", "config")
DAMAGES = ("bit flip", "truncation", "deletion")
COMMANDS = {
    "check": ("check",),
    "check --read-data": ("check", "--read-data"),
    "restore": ("restore", "{snapshot}", "--target", "{target}"),
    "snapshots": ("snapshots",),
    "backup": ("backup", "{src}"),
    "repair index": ("repair", "index"),
    "repair snapshots": ("repair", "snapshots"),
}
MUTATING = {"backup", "repair index", "repair snapshots"}
OBSERVE = os.environ.get("CAIRN_CORRUPTION_OBSERVE", "") not in ("", "0")

@dataclass(frozen=True)
class Cell:
    kind: str
    damage: str
    command: str
    exit_code: int
    phrase: str


def parse_table(text: str) -> list[Cell]:
    """The cells of the table under ``HEADING``: one per file kind, damage and command."""
    section = text.split(HEADING, 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip().strip("`") for c in rows[0].strip("|").split("|")]
    assert header[:2] == ["File", "Damage"] and header[2:] == list(COMMANDS), header
    cells = []
    for row in rows[2:]:
        values = [c.strip() for c in row.strip("|").split("|")]
        kind, damage = values[0], values[1]
        for command, value in zip(header[2:], values[2:], strict=True):
            m = re.fullmatch(r"(\d+): (.+)", value)
            assert m, f"bad cell {value!r} in row {kind}/{damage}"
            cells.append(Cell(kind, damage, command, int(m[1]), m[2].strip("`")))
    return cells


def _params() -> list[object]:
    params = []
    for cell in parse_table(DOC.read_text()):
        ident = f"{cell.kind}-{cell.damage}-{cell.command}".replace(" ", "_")
        params.append(pytest.param(cell, id=ident))
    return params


def test_table_covers_every_kind_damage_and_command() -> None:
    cells = parse_table(DOC.read_text())
    assert {(c.kind, c.damage, c.command) for c in cells} == {
        (k, d, c) for k in KINDS for d in DAMAGES for c in COMMANDS
    }
    assert len(cells) == len(KINDS) * len(DAMAGES) * len(COMMANDS)


class Template:
    """Two snapshots of a small tree; which file of each kind gets damaged."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        (self.src / "dir").mkdir(parents=True)
        (self.src / "keep.bin").write_bytes(os.urandom(300_000))
        (self.src / "dir" / "small.txt").write_text("small\n")
        self.cairn = new_cairn(root)
        self.snapshots = []
        for i in range(2):
            (self.src / f"gen{i}.bin").write_bytes(os.urandom(200_000 + i))
            (self.src / "dir" / "count.txt").write_text(str(i))
            r = self.cairn.run("backup", "--no-cache", str(self.src), "--json", check=True)
            self.snapshots.append(r.json_lines()[-1]["snapshot_id"])
        info = describe(self.cairn.repo)
        latest_index = _newest(self.cairn.repo / "index")
        latest_packs = set(info["by_index"][latest_index.name])
        data = [p for p, t in info["pack_type"].items() if t == 0]
        trees = [p for p, t in info["pack_type"].items() if t == 1]
        repo = self.cairn.repo
        # The data pack of the first backup (keep.bin, gen0.bin: both snapshots use
        # it); the tree pack, index and snapshot of the latest backup.
        first_data = next(p for p in data if p not in latest_packs)
        latest_trees = next(p for p in trees if p in latest_packs)
        self.targets = {
            "data pack": repo / "data" / first_data[:2] / first_data,
            "tree pack": repo / "data" / latest_trees[:2] / latest_trees,
            "index": latest_index,
            "snapshot": repo / "snapshots" / self.snapshots[-1],
            "key": next((repo / "keys").iterdir()),
            "config": repo / "config",
        }
        self.damaged: dict[tuple[str, str], Cairn] = {}

    def damaged_copy(self, kind: str, damage: str, fresh: bool) -> Cairn:
        """The repository with one file damaged (shared unless ``fresh``)."""
        key = (kind, damage)
        if key in self.damaged and not fresh:
            return self.damaged[key]
        dest = self.root / "copies" / f"{kind}-{damage}{'-fresh' if fresh else ''}"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(self.cairn.repo, dest / "repo")
        damage_file(dest / "repo" / self.targets[kind].relative_to(self.cairn.repo), damage)
        c = Cairn(dest / "repo", self.cairn.password_file)
        if not fresh:
            self.damaged[key] = c
        return c


def _newest(directory: Path) -> Path:
    return max(directory.iterdir(), key=lambda p: p.stat().st_mtime_ns)


def damage_file(path: Path, damage: str) -> None:
    """Flip the middle byte, cut the file to half its length, or delete it."""
    if damage == "deletion":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if damage == "bit flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return Template(tmp_path_factory.mktemp("corruption"))


def _run(t: Template, cell: Cell) -> Result:
    c = t.damaged_copy(cell.kind, cell.damage, fresh=cell.command in MUTATING)
    target = t.root / "restore-target"
    if target.exists():
        shutil.rmtree(target)
    values = {"snapshot": t.snapshots[-1], "target": str(target), "src": str(t.src)}
    args = [a.format(**values) for a in COMMANDS[cell.command]]
    return c.run("--no-cache", *args)


def _phrase(t: Template, cell: Cell) -> str:
    return cell.phrase.replace("{id}", t.targets[cell.kind].name[:8])


@pytest.mark.parametrize("cell", _params())
def test_damaged_file(template: Template, cell: Cell) -> None:
    r = _run(template, cell)
    output = r.out + r.err
    if OBSERVE:
        first = (r.err.strip() or r.out.strip()).splitlines()
        print(f"\nOBSERVED {cell.kind} | {cell.damage} | {cell.command} | {r.code}: {first[:3]}")
        return
    assert "Traceback" not in output
    assert r.code == cell.exit_code, f"exit {r.code}, documented {cell.exit_code}\n{output}"
    # {id} matches the ID written out in full or abbreviated to its first 8 digits.
    name = template.targets[cell.kind].name
    shown = output.replace(name, name[:8]) if len(name) > 8 else output
    assert _phrase(template, cell).lower() in shown.lower(), output


def test_check_sends_packs_of_a_damaged_index_to_repair_index(template: Template) -> None:
    """With an index file damaged, its packs look unreferenced; `prune` is the wrong
    advice for them (it would refuse: the snapshots need their blobs)."""
    for damage in ("bit flip", "deletion"):
        r = template.damaged_copy("index", damage, fresh=False).run("--no-cache", "check")
        warnings = [line for line in r.out.splitlines() if line.startswith("warning: pack")]
        assert warnings, r.out
        if damage == "bit flip":  # check sees the damaged file
            assert all("`cairn repair index`" in w for w in warnings), r.out
            assert not any("prune" in w for w in warnings), r.out
        else:  # a deleted index file leaves no trace: the usual advice stands
            assert all("`cairn prune` removes it" in w for w in warnings), r.out
