"""Measurements of a benchmark run and their summary statistics (median and spread)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One step of one tool in one repetition.

    ``data_bytes`` is what the step's MB/s and CPU-s per GB are computed from: the corpus
    size for backups, restores and the reference pipelines, the repository size for
    ``check``; None where a rate means nothing (init, forget + prune). ``data_files`` is
    the corpus's file count for the steps that read or write the corpus (backups,
    restore), for CPU-s per 1,000 files.
    """

    tool: str
    step: str
    rep: int
    ok: bool
    wall_s: float
    cpu_s: float
    peak_bytes: int
    repo_bytes: int | None
    data_bytes: int | None
    error: str | None = None
    load1: float = 0.0  # 1-minute load average before the step: other work on the machine
    data_files: int | None = None  # files in the corpus, for steps that have one

    @property
    def mb_per_s(self) -> float | None:
        """Throughput in MB/s (10**6 bytes), if the step has one."""
        if self.data_bytes is None or self.wall_s <= 0:
            return None
        return self.data_bytes / 1e6 / self.wall_s

    @property
    def cpu_s_per_gb(self) -> float | None:
        """CPU seconds of the process tree per 10**9 bytes of ``data_bytes``."""
        if not self.data_bytes:
            return None
        return self.cpu_s / (self.data_bytes / 1e9)

    @property
    def cpu_s_per_kfiles(self) -> float | None:
        """CPU seconds of the process tree per 1,000 files of the corpus."""
        if not self.data_files:
            return None
        return self.cpu_s / (self.data_files / 1000)


@dataclass(frozen=True)
class Stat:
    """Median and range of one metric over the repetitions."""

    median: float
    low: float
    high: float
    n: int

    @property
    def spread(self) -> float:
        """Half the range as a fraction of the median (0.05 is shown as ±5%)."""
        return (self.high - self.low) / 2 / self.median if self.median else 0.0

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        """The statistics of ``values``; None when there are none."""
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))


METRICS = (
    "wall_s",
    "mb_per_s",
    "cpu_s",
    "cpu_s_per_gb",
    "cpu_s_per_kfiles",
    "peak_bytes",
    "repo_bytes",
)


@dataclass(frozen=True)
class Summary:
    """All repetitions of one tool's step: statistics per metric, or the failure."""

    tool: str
    step: str
    stats: dict[str, Stat | None]
    failures: int
    error: str | None

    @property
    def ok(self) -> bool:
        """True when every repetition succeeded."""
        return self.failures == 0


def summarize(samples: list[Sample]) -> list[Summary]:
    """One :class:`Summary` per (tool, step), in first-seen order."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.tool, s.step), []).append(s)
    out = []
    for (tool, step), group in groups.items():
        good = [s for s in group if s.ok]
        stats: dict[str, Stat | None] = {}
        for metric in METRICS:
            values = [getattr(s, metric) for s in good]
            stats[metric] = Stat.of([float(v) for v in values if v is not None])
        failed = [s for s in group if not s.ok]
        error = failed[0].error if failed else None
        out.append(Summary(tool, step, stats, len(failed), error))
    return out
