"""Corpus shapes and their deterministic layout: which files, where, how big, what kind.

A layout is pure data computed from ``(shape, seed)``; :mod:`bench.corpus` writes it to
disk and modifies it. Sizes are drawn log-uniformly by octave, so there are many small
files and few large ones, as on real disks.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.prng import Rng

KiB = 1024
MiB = 1024 * KiB

CORPUS_EPOCH_NS = 1_704_067_200 * 10**9  # 2024-01-01T00:00:00Z: every mtime is after this
FILE_MODE = 0o644
DIR_MODE = 0o755


@dataclass(frozen=True)
class Shape:
    """How many files of which sizes a corpus holds."""

    name: str
    n_small: int
    small_range: tuple[int, int]
    n_medium: int
    medium_range: tuple[int, int]
    big_random: int  # size of the one large random file (0: none)
    big_log: int  # size of the one large log-like file (0: none)
    files_per_dir: int = 20


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        # ~1.1 GiB: ~310 MiB of small files, ~400 MiB medium, 2 x 200 MiB large.
        Shape("default", 20_000, (1 * KiB, 64 * KiB), 50, (1 * MiB, 20 * MiB),
              200 * MiB, 200 * MiB),
        # ~300 MiB, the same mix: a throttled backup at 3000 KiB/s takes ~70 s.
        Shape("medium", 4_000, (1 * KiB, 64 * KiB), 12, (1 * MiB, 20 * MiB), 64 * MiB,
              64 * MiB),
        # ~50 MiB, the same mix scaled down, for quick runs.
        Shape("small", 1_000, (1 * KiB, 64 * KiB), 4, (1 * MiB, 8 * MiB), 10 * MiB, 10 * MiB),
        # 200,000 files of 256 B-8 KiB (~450 MiB): per-file overhead dominates.
        Shape("many-small", 200_000, (256, 8 * KiB), 0, (1, 1), 0, 0, files_per_dir=40),
        # ~0.5 MiB, for unit tests.
        Shape("tiny", 40, (64, 4 * KiB), 2, (16 * KiB, 64 * KiB), 128 * KiB, 128 * KiB,
              files_per_dir=8),
    )
}  # fmt: skip


@dataclass(frozen=True)
class FileSpec:
    """One file of the corpus: its content is ``GENERATORS[kind](seed, label, size)``."""

    path: str  # relative, '/'-separated
    kind: str  # "random" | "text" | "log"
    size: int
    label: str  # names the content stream; equal labels mean identical content
    mtime_ns: int


@dataclass(frozen=True)
class Layout:
    """All directories (parents first) and files (sorted by path) of a corpus."""

    shape: Shape
    seed: int
    dirs: tuple[str, ...]
    files: tuple[FileSpec, ...]

    @property
    def total_bytes(self) -> int:
        """Sum of all file sizes."""
        return sum(f.size for f in self.files)

    def by_path(self) -> dict[str, FileSpec]:
        """The files indexed by path."""
        return {f.path: f for f in self.files}


_DIR_NAMES = (
    "src", "docs", "lib", "tests", "assets", "images", "data", "build", "config", "notes",
    "photos", "projects", "mail", "music", "archive", "reports", "drafts", "vendor",
    "scripts", "static", "templates", "logs", "exports", "invoices", "2019", "2020",
    "2021", "2022", "2023", "2024", "raw", "thumbnails", "fixtures", "papers", "home",
)  # fmt: skip
_STEMS = (
    "readme", "notes", "main", "utils", "index", "report", "draft", "summary", "invoice",
    "config", "model", "photo", "scan", "image", "backup", "data", "export", "chapter",
    "letter", "todo", "changelog", "schema", "handler", "test", "figure", "table",
)  # fmt: skip
# No ".py": linters and type checkers walking bench/ must not parse corpus files.
_EXTENSIONS = {
    "text": (".txt", ".md", ".toml", ".c", ".html", ".json", ".csv", ".go", ".rs", ".xml"),
    "random": (".jpg", ".png", ".gz", ".pdf", ".zip", ".bin", ".mp3", ".webp"),
    "log": (".log",),
}
MAX_DEPTH = 6


def make_dirs(rng: Rng, count: int) -> list[str]:
    """``count`` nested directory paths (parents before children), shallow-biased."""
    dirs = [""]
    depth = {"": 0}
    for _ in range(count):
        parent = rng.choice(dirs)
        # Re-draw once if deep, so the tree is bushy rather than a long chain.
        if depth[parent] >= MAX_DEPTH or (depth[parent] >= 3 and rng.below(2)):
            parent = rng.choice(dirs[: 1 + len(dirs) // 4])
            if depth[parent] >= MAX_DEPTH:
                parent = ""
        name = rng.choice(_DIR_NAMES)
        path = f"{parent}/{name}".lstrip("/")
        suffix = 2
        while path in depth:
            path = f"{parent}/{name}-{suffix}".lstrip("/")
            suffix += 1
        dirs.append(path)
        depth[path] = depth[parent] + 1
    return dirs[1:]


def file_name(rng: Rng, kind: str, serial: int) -> str:
    """A plausible, unique file name (the serial number keeps names unique)."""
    return f"{rng.choice(_STEMS)}_{serial:06d}{rng.choice(_EXTENSIONS[kind])}"


def mtime_for(rng: Rng) -> int:
    """A deterministic modification time within 2024 (whole microseconds)."""
    return CORPUS_EPOCH_NS + rng.below(365 * 86_400 * 10**6) * 1000


def build_layout(shape: Shape, seed: int) -> Layout:
    """The complete, deterministic layout of ``shape`` under ``seed``."""
    rng = Rng(seed, f"layout/{shape.name}")
    n_files = shape.n_small + shape.n_medium + 2
    all_dirs = make_dirs(rng, max(3, n_files // shape.files_per_dir))
    places = ["", *all_dirs]
    files: list[FileSpec] = []

    def add(
        kind: str,
        size: int,
        label: str | None = None,
        place: str | None = None,
        name: str | None = None,
    ) -> None:
        where = rng.choice(places) if place is None else place
        path = f"{where}/{name or file_name(rng, kind, len(files))}".lstrip("/")
        files.append(FileSpec(path, kind, size, label or path, mtime_for(rng)))

    for _ in range(shape.n_small):
        if files and rng.below(50) == 0:  # ~2% exact duplicates, as copies are on real disks
            original = rng.choice(files)
            add(original.kind, original.size, label=original.label)
        else:
            add(rng.choice(("text", "random")), rng.log_uniform(*shape.small_range))
    for _ in range(shape.n_medium):
        add(rng.choice(("text", "random")), rng.log_uniform(*shape.medium_range))
    if shape.big_random:
        add("random", shape.big_random, place=rng.choice(places), name="disk-image.bin")
    if shape.big_log:
        add("log", shape.big_log, place=rng.choice(places), name="service.log")
    return Layout(shape, seed, tuple(all_dirs), tuple(sorted(files, key=lambda f: f.path)))
