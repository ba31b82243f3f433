"""Tests of the benchmark harness: deterministic corpus and modify step, measurement of a
process tree, and the report's tables and ratios on synthetic measurements.

No backup tool runs here; the only subprocesses are short Python one-liners.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import zstandard

# bench/ is a directory of the checkout, not an installed package: make it importable
# however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import corpus
from bench.content import GENERATORS
from bench.layout import SHAPES, build_layout
from bench.measure import Command, run_all, run_one
from bench.prng import Rng, stream_bytes
from bench.report import fmt_num, fmt_ratio, render_markdown
from bench.results import Sample, Stat, summarize
from bench.runner import needed_steps

# Pinned: if one of these changes, the corpus is no longer the one earlier results used.
TINY_DIGEST = "e1ad4e360b04197b3b21601de9f845f82ea8c741942356f8b1fde07f91bbea3d"
TINY_MODIFIED_DIGEST = "6cac2e45e998f333b8f18b23ca46b1f311bf96de92ff51a2834845c87bddf425"


def test_prng_is_pinned() -> None:
    rng = Rng(1, "test")
    assert rng.u64() == 14435709478373341826
    assert rng.below(1000) == 996
    assert rng.log_uniform(1024, 65536) == 41329
    assert stream_bytes(1, "x", 8, offset=4) == stream_bytes(1, "x", 12)[4:]


def test_prng_ranges() -> None:
    rng = Rng(7, "ranges")
    assert all(0 <= rng.below(3) < 3 for _ in range(200))
    assert all(10 <= rng.log_uniform(10, 1000) <= 1000 for _ in range(200))
    assert sorted(rng.sample(range(10), 10)) == list(range(10))


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_content_exact_size_and_repeatable(kind: str) -> None:
    size = 2_500_000  # spans several pieces
    first = b"".join(GENERATORS[kind](3, "label", size))
    assert len(first) == size
    assert b"".join(GENERATORS[kind](3, "label", size)) == first
    assert b"".join(GENERATORS[kind](3, "other", size)) != first


def test_content_compressibility() -> None:
    def ratio(kind: str) -> float:
        data = b"".join(GENERATORS[kind](1, "c", 1 << 20))
        return len(data) / len(zstandard.ZstdCompressor(level=3).compress(data))

    assert ratio("random") < 1.01
    assert 2.0 < ratio("text") < 6.0
    assert 2.5 < ratio("log") < 10.0


def test_log_lines_are_whole() -> None:
    data = b"".join(GENERATORS["log"](1, "lines", 3 << 20))
    lines = data.split(b"\n")[:-1]
    assert all(line.startswith(b"2024-01-01T") and b" req=" in line for line in lines)


def test_layouts_match_their_shapes() -> None:
    small = build_layout(SHAPES["small"], 1)
    assert build_layout(SHAPES["small"], 1) == small
    assert build_layout(SHAPES["small"], 2) != small
    assert len(small.files) == 1006
    assert 45e6 < small.total_bytes < 65e6
    assert len({f.path for f in small.files}) == len(small.files)
    default = build_layout(SHAPES["default"], 1)
    assert len(default.files) == 20_052
    assert 0.9 * 2**30 < default.total_bytes < 1.25 * 2**30


def test_tiny_corpus_is_deterministic(tmp_path: Path) -> None:
    corpus.generate(tmp_path / "a", "tiny")
    corpus.generate(tmp_path / "b", "tiny")
    assert corpus.digest(tmp_path / "a") == corpus.digest(tmp_path / "b") == TINY_DIGEST


def test_modify_is_deterministic_and_reversible(tmp_path: Path) -> None:
    layout = corpus.generate(tmp_path / "a", "tiny")
    corpus.generate(tmp_path / "b", "tiny")
    changes = corpus.modify(tmp_path / "a")
    corpus.modify(tmp_path / "b")
    assert corpus.digest(tmp_path / "a") == corpus.digest(tmp_path / "b") == TINY_MODIFIED_DIGEST
    ops = sorted(c.op for c in changes)
    assert ops == ["add", "add", "append", "delete", "rewrite"]
    assert corpus.plan_modify(layout, 1) == changes
    assert corpus.plan_modify(layout, 2) != changes
    corpus.revert(tmp_path / "a")
    assert corpus.digest(tmp_path / "a") == TINY_DIGEST


def test_ensure_pristine_reuses_and_reverts(tmp_path: Path) -> None:
    root = tmp_path / "c"
    corpus.generate(root, "tiny")
    corpus.modify(root)
    corpus.ensure_pristine(root, "tiny")
    assert corpus.digest(root) == TINY_DIGEST


def _python(code: str) -> Command:
    return Command((sys.executable, "-c", textwrap.dedent(code)))


def test_measure_sums_memory_over_the_tree(tmp_path: Path) -> None:
    # A parent and a forked child each touch 60 MB of private memory for 0.4 s.
    code = """
        import os, time
        pid = os.fork()
        block = bytearray(60_000_000)
        time.sleep(0.4)
        if pid:
            os.waitpid(pid, 0)
    """
    m = run_one(_python(code), {}, tmp_path / "log", timeout=30)
    assert m.ok
    assert m.peak_bytes > 110_000_000  # both processes, not just the larger one
    assert m.cpu_s > 0
    assert m.wall_s >= 0.4


def test_measure_reports_the_error_line(tmp_path: Path) -> None:
    m = run_all(
        [_python("raise SystemExit('fatal: no such repository')")], {}, tmp_path / "log", timeout=30
    )
    assert not m.ok and m.error == "fatal: no such repository"
    m = run_one(_python("import no_such_module_here"), {}, tmp_path / "log2", timeout=30)
    assert m.error == "ModuleNotFoundError: No module named 'no_such_module_here'"
    m = run_one(Command(("/nonexistent/tool",)), {}, tmp_path / "log3", timeout=30)
    assert not m.ok and m.error is not None and "/nonexistent/tool" in m.error


def test_needed_steps_adds_prerequisites_in_order() -> None:
    assert needed_steps(["restore"]) == ["init", "backup", "restore"]
    assert needed_steps(["forget-prune", "cat"]) == [
        "init",
        "backup",
        "backup-incr",
        "forget-prune",
    ]
    assert needed_steps(["cat"]) == []


def test_stat_and_number_formatting() -> None:
    stat = Stat.of([1.9, 2.0, 2.2])
    assert stat is not None
    assert stat.median == 2.0 and stat.spread == pytest.approx(0.075)
    assert Stat.of([]) is None
    assert [fmt_num(v) for v in (1234.5, 12.345, 1.2345, 0.012345, 0)] == [
        "1234",
        "12.3",
        "1.23",
        "0.012",
        "0",
    ]
    assert fmt_ratio(Stat.of([1.0]), Stat.of([4.0])) == "0.25x"
    assert fmt_ratio(None, Stat.of([4.0])) == "-"


def _sample(
    tool: str, step: str, rep: int, wall: float, ok: bool = True, error: str | None = None
) -> Sample:
    return Sample(
        tool,
        step,
        rep,
        ok,
        wall,
        wall / 2,
        100 * 2**20,
        50 * 2**20,
        10**8 if step == "backup" else None,
        error,
    )


def _meta(tools: dict[str, str]) -> dict[str, object]:
    return {
        "timestamp": "20240101T000000",
        "config": {"reps": 3, "compression": "auto", "profile": None},
        "machine": {
            "cpu_model": "Test CPU",
            "cores": 2,
            "ram_bytes": 2**34,
            "kernel": "6.1",
            "os": "Debian",
            "loadavg_at_start": [0.5, 0, 0],
        },
        "tools": tools,
        "corpus": {"shape": "tiny", "seed": 1, "files": 44, "bytes": 383382, "digest": TINY_DIGEST},
    }


def test_report_tables_and_ratios() -> None:
    samples = []
    for rep in (1, 2, 3):
        samples += [
            _sample("restic", "backup", rep, [4.0, 4.4, 3.6][rep - 1]),
            _sample("borg", "backup", rep, [8.0, 8.0, 8.0][rep - 1]),
            _sample("cairn", "backup", rep, [2.0, 2.2, 1.9][rep - 1]),
            _sample("restic", "restore", rep, 1.0),
            _sample("borg", "restore", rep, 2.0),
            _sample("cairn", "restore", rep, 0.0, ok=False, error="skipped: backup failed")
            if rep == 3
            else _sample("cairn", "restore", rep, 0.5),
            _sample("reference", "cat", rep, 0.5),
        ]
    samples.append(_sample("cairn", "check", 1, 0.1, ok=False, error="Error: no | check"))
    text = render_markdown(_meta({"cairn": "0.1", "restic": "0.14", "borg": "1.2"}), samples)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert "| step | cairn | restic | borg | cairn/restic | cairn/borg | borg/restic |" in rows
    assert "| backup | 2.00 ±8% | 4.00 ±10% | 8.00 ±0% | 0.50x | 0.25x | 2.00x |" in rows
    assert "| restore | skipped | 1.00 ±0% | 2.00 ±0% | - | - | 2.00x |" in rows
    assert "| check | failed [1] | - | - | - | - | - |" in rows
    # MB/s: 10**8 bytes in 2.0 s is 50 MB/s; faster is a ratio above 1.
    assert "| backup | 50.0 ±7% | 25.0 ±10% | 12.5 ±0% | 2.00x | 4.00x | 0.50x |" in rows
    assert "1. cairn check (1/3 runs): `Error: no | check`" in text
    assert "## Reference limits on the same corpus" in text


def test_report_cpu_per_gb_and_per_thousand_files() -> None:
    """CPU-s of the whole tree per 10**9 data bytes and per 1,000 corpus files; check
    (repository bytes, no files) has the first and not the second."""

    def sample(tool: str, step: str, cpu: float, data: int, files: int | None) -> Sample:
        return Sample(tool, step, 1, True, 1.0, cpu, 2**20, 2**20, data, None, 0.0, files)

    samples = [
        sample("cairn", "backup", 3.0, 2 * 10**9, 20_000),
        sample("restic", "backup", 6.0, 2 * 10**9, 20_000),
        sample("cairn", "restore", 1.0, 2 * 10**9, 20_000),
        sample("restic", "restore", 4.0, 2 * 10**9, 20_000),
        sample("cairn", "check", 0.5, 10**9, None),
        sample("restic", "check", 2.0, 10**9, None),
        sample("reference", "tar-zstd", 4.0, 2 * 10**9, None),
    ]
    assert samples[0].cpu_s_per_gb == 1.5 and samples[0].cpu_s_per_kfiles == 0.15
    assert samples[4].cpu_s_per_kfiles is None
    meta = _meta({"cairn": "0.1", "restic": "0.14"})
    meta["config"] = {"reps": 1, "compression": "auto", "profile": None}
    text = render_markdown(meta, samples)
    per_gb = text.split("## CPU-s per GB")[1].split("##")[0]
    assert "| backup | 1.50 | 3.00 | 0.50x |" in per_gb
    assert "| restore | 0.500 | 2.00 | 0.25x |" in per_gb
    assert "| check | 0.500 | 2.00 | 0.25x |" in per_gb
    per_files = text.split("## CPU-s per 1,000 files")[1].split("##")[0]
    assert "| backup | 0.150 | 0.300 | 0.50x |" in per_files
    assert "| restore | 0.050 | 0.200 | 0.25x |" in per_files
    assert "check" not in per_files
    # The reference pipelines get CPU-s per GB too: tar | zstd is the floor to compare to.
    assert "| CPU (s) | CPU-s/GB | peak (MiB) |" in text
    assert "wc) | 1.00 | 2000 | 4.00 | 2.00 | 1.00 | 1.00 |" in text


def test_summaries_count_failures() -> None:
    samples = [
        _sample("restic", "init", 1, 1.0),
        _sample("restic", "init", 2, 3.0),
        _sample("restic", "init", 3, 0.0, ok=False, error="boom"),
    ]
    (summary,) = summarize(samples)
    assert summary.failures == 1 and summary.error == "boom" and not summary.ok
    wall = summary.stats["wall_s"]
    assert wall is not None and wall.median == 2.0 and wall.n == 2
