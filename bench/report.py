"""Render a run's results as Markdown tables (with ratios between tools) and JSON."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.results import Sample, Stat, Summary, summarize
from bench.tools import REFERENCES, STEPS

MiB = 1024 * 1024
DASH = "-"  # a cell without a value
RATIO_PAIRS = (("cairn", "restic"), ("cairn", "borg"), ("borg", "restic"))
TABLES = (  # metric, heading, scale (divide by)
    ("wall_s", "Wall time (s)", 1.0),
    ("mb_per_s", "Throughput (MB/s, 10^6 bytes per second of wall time)", 1.0),
    ("cpu_s", "CPU time, user + sys of the whole process tree (s)", 1.0),
    ("cpu_s_per_gb", "CPU-s per GB (10^9 corpus bytes; repository bytes for check)", 1.0),
    ("cpu_s_per_kfiles", "CPU-s per 1,000 files of the corpus", 1.0),
    ("peak_bytes", "Peak memory of the process tree (MiB, sampled PSS)", MiB),
    ("repo_bytes", "Repository size after the step (MiB)", MiB),
)


def fmt_num(value: float) -> str:
    """Three significant figures, without exponent notation."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}" if magnitude else "0"


def fmt_stat(stat: Stat | None, scale: float = 1.0) -> str:
    """``median ±spread%`` (spread only with more than one repetition), or a dash."""
    if stat is None:
        return DASH
    text = fmt_num(stat.median / scale)
    return f"{text} ±{stat.spread * 100:.0f}%" if stat.n > 1 else text


def fmt_ratio(a: Stat | None, b: Stat | None) -> str:
    """``a.median / b.median`` as ``1.23x``; a dash if either is missing or zero."""
    if a is None or b is None or not b.median:
        return DASH
    return f"{a.median / b.median:.2f}x"


class Footnotes:
    """Numbers each distinct failure once, for the cells that refer to it."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def cell(self, summary: Summary, reps: int) -> str:
        """The table cell for a failed summary."""
        error = summary.error or "failed"
        if error.startswith("skipped"):
            return "skipped"
        note = f"{summary.tool} {summary.step} ({summary.failures}/{reps} runs): `{error}`"
        if note not in self.notes:
            self.notes.append(note)
        return f"failed [{self.notes.index(note) + 1}]"


def metric_table(
    summaries: list[Summary],
    tools: list[str],
    metric: str,
    scale: float,
    reps: int,
    notes: Footnotes,
) -> list[str]:
    """One Markdown table: a row per step, a column per tool, then ratio columns."""
    index = {(s.tool, s.step): s for s in summaries}
    pairs = [(a, b) for a, b in RATIO_PAIRS if a in tools and b in tools]
    head = ["step", *tools, *(f"{a}/{b}" for a, b in pairs)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for step in STEPS:
        row = [index.get((tool, step)) for tool in tools]
        if all(s is None for s in row):
            continue
        done = [s for s in row if s is not None and s.ok]
        if done and all(s.stats[metric] is None for s in done):
            continue  # the metric means nothing for this step (e.g. MB/s of init)
        cells = [step]
        for s in row:
            if s is None:
                cells.append(DASH)
            else:
                cells.append(fmt_stat(s.stats[metric], scale) if s.ok else notes.cell(s, reps))

        ok = {t: s.stats[metric] for t, s in zip(tools, row, strict=True) if s is not None and s.ok}
        cells += [fmt_ratio(ok.get(a), ok.get(b)) for a, b in pairs]
        lines.append(_row(cells))
    return lines


def _row(cells: list[str]) -> str:
    """A Markdown table row; pipes inside cells are escaped."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def reference_table(summaries: list[Summary], reps: int, notes: Footnotes) -> list[str]:
    """The reference pipelines (lower bounds on the same corpus)."""
    refs = {s.step: s for s in summaries if s.tool == "reference"}
    if not refs:
        return []
    lines = [
        "| reference | wall (s) | MB/s | CPU (s) | CPU-s/GB | peak (MiB) | output (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ref in REFERENCES:
        s = refs.get(ref.name)
        if s is None:
            continue
        if not s.ok:
            lines.append(_row([ref.description, notes.cell(s, reps), "", "", "", "", ""]))
            continue
        cells = [
            fmt_stat(s.stats[m], scale)
            for m, scale in (
                ("wall_s", 1.0),
                ("mb_per_s", 1.0),
                ("cpu_s", 1.0),
                ("cpu_s_per_gb", 1.0),
                ("peak_bytes", MiB),
                ("repo_bytes", MiB),
            )
        ]
        lines.append(_row([ref.description, *cells]))
    return lines


def render_markdown(meta: dict[str, Any], samples: list[Sample]) -> str:
    """The whole Markdown report."""
    summaries = summarize(samples)
    tools = [t for t in meta["tools"] if any(s.tool == t for s in summaries)]
    reps = int(meta["config"]["reps"])
    corpus, machine = meta["corpus"], meta["machine"]
    notes = Footnotes()
    out = [
        f"# Benchmark — corpus `{corpus['shape']}`, {meta['timestamp']}",
        "",
        f"Corpus: {corpus['files']:,} files, {corpus['bytes'] / 1e6:,.1f} MB "
        f"(seed {corpus['seed']}, digest `{corpus['digest'][:16]}`). "
        f"{reps} repetition(s), tools alternating, warm page cache, fresh repositories "
        f"and caches per repetition; compression `{meta['config']['compression']}`.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['ram_bytes'] / 2**30:.1f} GiB RAM, Linux {machine['kernel']}, "
        f"{machine['os']}; load average at start {machine['loadavg_at_start'][0]:.2f}.",
        "",
        "Tools: " + "; ".join(f"{k}: {v}" for k, v in meta["tools"].items()) + ".",
        "",
        "Medians over the repetitions; ±x% is half the min-to-max range relative to the median. "
        "A ratio column divides the first tool's median by the second's (below 1: less "
        "time, CPU, memory or bytes; for MB/s above 1 is faster).",
    ]
    if meta["config"].get("profile"):
        out += ["", f"**cairn ran under {meta['config']['profile']}: its times are inflated.**"]
    for metric, heading, scale in TABLES:
        table = metric_table(summaries, tools, metric, scale, reps, notes)
        if len(table) > 2:
            out += ["", f"## {heading}", "", *table]
    refs = reference_table(summaries, reps, notes)
    if refs:
        out += ["", "## Reference limits on the same corpus", "", *refs]
    if notes.notes:
        out += ["", "## Failures", ""]
        out += [f"{i}. {note}" for i, note in enumerate(notes.notes, 1)]
    return "\n".join(out) + "\n"


def stat_dict(stat: Stat | None) -> dict[str, float] | None:
    """A JSON-ready form of a :class:`Stat`."""
    if stat is None:
        return None
    return {
        "median": stat.median,
        "min": stat.low,
        "max": stat.high,
        "n": stat.n,
        "spread": stat.spread,
    }


def to_json(meta: dict[str, Any], samples: list[Sample]) -> dict[str, Any]:
    """Everything: metadata, every sample, and the summaries."""
    summaries = [
        {
            "tool": s.tool,
            "step": s.step,
            "failures": s.failures,
            "error": s.error,
            "stats": {k: stat_dict(v) for k, v in s.stats.items()},
        }
        for s in summarize(samples)
    ]
    raw = [
        {
            **asdict(s),
            "mb_per_s": s.mb_per_s,
            "cpu_s_per_gb": s.cpu_s_per_gb,
            "cpu_s_per_kfiles": s.cpu_s_per_kfiles,
        }
        for s in samples
    ]
    return {**meta, "samples": raw, "summary": summaries}


def samples_from_json(data: dict[str, Any]) -> list[Sample]:
    """The samples of a JSON report written by :func:`to_json`."""
    fields = set(Sample.__dataclass_fields__)
    return [Sample(**{k: v for k, v in raw.items() if k in fields}) for raw in data["samples"]]


def write_reports(results_dir: Path, meta: dict[str, Any], samples: list[Sample]) -> Path:
    """Write ``<timestamp>.md``, ``<timestamp>.json`` and ``latest.md``; return the .md."""
    results_dir.mkdir(parents=True, exist_ok=True)
    md = results_dir / f"{meta['timestamp']}.md"
    md.write_text(render_markdown(meta, samples))
    md.with_suffix(".json").write_text(json.dumps(to_json(meta, samples), indent=1) + "\n")
    shutil.copyfile(md, results_dir / "latest.md")
    return md
