"""Deterministic benchmark corpus: generate, modify for incremental runs, revert, digest.

The same ``(shape, seed)`` gives the same bytes, names, modes and mtimes on every run
and machine (see :mod:`bench.prng`). The ``modify`` step is equally deterministic: it
is a function of the pristine layout and a generation number, so it can be undone
exactly, and every benchmark repetition sees the same change.

Command line::

    python -m bench.corpus generate DIR [--shape small] [--seed 1]
    python -m bench.corpus modify DIR [--generation 1]
    python -m bench.corpus revert DIR
    python -m bench.corpus digest DIR

A small state file ``DIR.state.json`` next to the corpus (not inside it, so it is not
backed up) records the shape, seed and applied modification.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import blake3

from bench.content import GENERATORS, log_content
from bench.layout import (
    CORPUS_EPOCH_NS,
    DIR_MODE,
    FILE_MODE,
    SHAPES,
    FileSpec,
    Layout,
    build_layout,
)
from bench.prng import Rng, stream_bytes

DEFAULT_SEED = 1
DIR_MTIME_NS = CORPUS_EPOCH_NS + 366 * 86_400 * 10**9
MODIFY_EPOCH_NS = CORPUS_EPOCH_NS + 400 * 86_400 * 10**9


def write_file(root: Path, spec: FileSpec, seed: int) -> None:
    """Create or replace one file with its deterministic content, mode and mtime."""
    path = root / spec.path
    with open(path, "wb") as out:
        for piece in GENERATORS[spec.kind](seed, spec.label, spec.size):
            out.write(piece)
        os.fchmod(out.fileno(), FILE_MODE)
    os.utime(path, ns=(spec.mtime_ns, spec.mtime_ns))


def _reset_dir_times(root: Path, layout: Layout) -> None:
    """Give every directory its fixed mode and mtime (deepest first, root last)."""
    for rel in [*reversed(layout.dirs), ""]:
        path = root / rel
        os.chmod(path, DIR_MODE)
        os.utime(path, ns=(DIR_MTIME_NS, DIR_MTIME_NS))


def generate(root: Path, shape: str, seed: int = DEFAULT_SEED) -> Layout:
    """Write the corpus ``shape`` into the empty or absent directory ``root``."""
    layout = build_layout(SHAPES[shape], seed)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    for rel in layout.dirs:
        (root / rel).mkdir()
    for spec in layout.files:
        write_file(root, spec, seed)
    _reset_dir_times(root, layout)
    save_state(root, layout, generation=0)
    return layout


@dataclass(frozen=True)
class Change:
    """One step of a modification; ``original`` is what revert restores (None: added)."""

    op: str  # "rewrite" | "patch" | "append" | "add" | "delete"
    new: FileSpec | None
    original: FileSpec | None
    patches: tuple[tuple[int, int], ...] = ()  # (offset, length) for "patch"


def plan_modify(layout: Layout, generation: int) -> list[Change]:
    """The deterministic change set of ``generation``: ~1% of files changed, the log
    appended to, ~0.1% of files added (some in a new directory) and ~0.05% deleted."""
    rng = Rng(layout.seed, f"modify/{layout.shape.name}/{generation}")
    mtime = MODIFY_EPOCH_NS + generation * 86_400 * 10**9
    regular = [f for f in layout.files if f.kind != "log"]
    n_change = max(1, round(len(regular) / 100))
    n_delete = max(1, len(regular) // 2000)
    picked = rng.sample(regular, n_change + n_delete)
    changes: list[Change] = []
    for f in picked[:n_change]:
        if f.size <= layout.shape.small_range[1]:  # small: rewritten, often grown
            size = f.size + rng.below(4097)
            new = FileSpec(f.path, f.kind, size, f"{f.label}@{generation}", mtime)
            changes.append(Change("rewrite", new, f))
        else:  # large: a few regions overwritten in place, as an edited document
            regions = tuple(
                (rng.below(f.size - 65_536), rng.randint(4096, 65_536))
                for _ in range(rng.randint(1, 4))
            )
            new = FileSpec(f.path, f.kind, f.size, f.label, mtime)
            changes.append(Change("patch", new, f, regions))
    changes += [Change("delete", None, f) for f in picked[n_change:]]
    for log in (f for f in layout.files if f.kind == "log"):
        grow = max(4096, log.size // 100)
        changes.append(
            Change(
                "append",
                FileSpec(log.path, "log", log.size + grow, f"{log.label}@{generation}", mtime),
                log,
            )
        )
    dirs = ["", *layout.dirs]
    for i in range(max(2, len(regular) // 1000)):
        where = f"new-{generation}" if i % 2 else rng.choice(dirs)
        kind = rng.choice(("text", "random"))
        path = f"{where}/added-{generation}-{i:04d}.{'txt' if kind == 'text' else 'bin'}"
        size = rng.log_uniform(*layout.shape.small_range)
        changes.append(Change("add", FileSpec(path.lstrip("/"), kind, size, path, mtime), None))
    return changes


def _apply_one(root: Path, change: Change, seed: int, generation: int) -> None:
    new, old = change.new, change.original
    if change.op in ("rewrite", "add") and new is not None:
        (root / new.path).parent.mkdir(exist_ok=True)
        write_file(root, new, seed)
    elif change.op == "delete" and old is not None:
        (root / old.path).unlink()
    elif change.op == "patch" and new is not None:
        with open(root / new.path, "r+b") as out:
            for i, (offset, length) in enumerate(change.patches):
                out.seek(offset)
                out.write(stream_bytes(seed, f"patch/{generation}/{new.path}/{i}", length))
        os.utime(root / new.path, ns=(new.mtime_ns, new.mtime_ns))
    elif change.op == "append" and new is not None and old is not None:
        with open(root / new.path, "ab") as out:
            for piece in log_content(seed, new.label, new.size - old.size):
                out.write(piece)
        os.utime(root / new.path, ns=(new.mtime_ns, new.mtime_ns))


def modify(root: Path, generation: int = 1) -> list[Change]:
    """Apply modification ``generation`` to the pristine corpus (reverting another first)."""
    layout, current = load_state(root)
    if current == generation:
        return plan_modify(layout, generation)
    if current:
        revert(root)
    changes = plan_modify(layout, generation)
    for change in changes:
        _apply_one(root, change, layout.seed, generation)
    touched = {
        Path(spec.path).parent
        for c in changes
        if c.op in ("add", "delete")
        for spec in (c.new, c.original)
        if spec is not None
    }
    for rel in sorted(touched, key=lambda p: -len(p.parts)):
        os.utime(root / rel, ns=(MODIFY_EPOCH_NS, MODIFY_EPOCH_NS))
    save_state(root, layout, generation)
    return changes


def revert(root: Path) -> None:
    """Undo the applied modification, restoring the pristine corpus exactly."""
    layout, generation = load_state(root)
    if not generation:
        return
    for change in plan_modify(layout, generation):
        new, old = change.new, change.original
        if change.op == "add" and new is not None:
            (root / new.path).unlink(missing_ok=True)
        elif change.op == "append" and old is not None:
            os.truncate(root / old.path, old.size)
            os.utime(root / old.path, ns=(old.mtime_ns, old.mtime_ns))
        elif old is not None:
            write_file(root, old, layout.seed)
    new_dir = root / f"new-{generation}"
    if new_dir.is_dir():
        new_dir.rmdir()
    _reset_dir_times(root, layout)
    save_state(root, layout, generation=0)


def digest(root: Path) -> str:
    """BLAKE3 over every entry's path, type, mode, size, mtime and content (sorted)."""
    h = blake3.blake3()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in [*sorted(filenames), *dirnames]:
            path = base / name
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            h.update(
                f"{rel}\0{stat.S_IFMT(st.st_mode)}\0{stat.S_IMODE(st.st_mode):o}\0"
                f"{st.st_size if stat.S_ISREG(st.st_mode) else 0}\0{st.st_mtime_ns}\0".encode()
            )
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    h.update(blake3.blake3(f.read()).digest())
    return h.hexdigest()


def state_path(root: Path) -> Path:
    """Where the state of the corpus at ``root`` is kept (beside it, not inside)."""
    return root.parent / f"{root.name}.state.json"


def save_state(root: Path, layout: Layout, generation: int) -> None:
    """Record shape, seed and applied modification of the corpus at ``root``."""
    state = {
        "shape": layout.shape.name,
        "seed": layout.seed,
        "generation": generation,
        "files": len(layout.files),
        "bytes": layout.total_bytes,
    }
    state_path(root).write_text(json.dumps(state, indent=1) + "\n")


def load_state(root: Path) -> tuple[Layout, int]:
    """The layout of the corpus at ``root`` and the modification applied to it (0: none)."""
    state = json.loads(state_path(root).read_text())
    return build_layout(SHAPES[state["shape"]], int(state["seed"])), int(state["generation"])


def ensure_pristine(root: Path, shape: str, seed: int = DEFAULT_SEED) -> Layout:
    """Reuse the corpus at ``root`` if its state says it is ``(shape, seed)``, else regenerate."""
    try:
        layout, _ = load_state(root)
        if layout.shape.name == shape and layout.seed == seed and root.is_dir():
            revert(root)
            return layout
    except (OSError, ValueError, KeyError):
        pass
    if root.exists():
        shutil.rmtree(root)
    return generate(root, shape, seed)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.corpus``."""
    parser = argparse.ArgumentParser(prog="python -m bench.corpus", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a corpus into an empty directory")
    gen.add_argument("--shape", choices=sorted(SHAPES), default="small")
    gen.add_argument("--seed", type=int, default=DEFAULT_SEED)
    mod = sub.add_parser("modify", help="apply a deterministic modification")
    mod.add_argument("--generation", type=int, default=1)
    rev = sub.add_parser("revert", help="undo the modification")
    dig = sub.add_parser("digest", help="print a digest of the tree")
    for p in (gen, mod, rev, dig):
        p.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "generate":
        layout = generate(args.dir, args.shape, args.seed)
        print(f"{len(layout.files)} files, {layout.total_bytes} bytes")
    elif args.command == "modify":
        print(f"{len(modify(args.dir, args.generation))} changes")
    elif args.command == "revert":
        revert(args.dir)
    else:
        print(digest(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
