"""``python -m bench``: run cairn, restic and borg side by side and write the report."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import corpus as corpus_mod
from bench.layout import SHAPES
from bench.machine import machine_info
from bench.report import samples_from_json, write_reports
from bench.runner import Config, Runner
from bench.tools import OPTIONAL_STEPS, REFERENCES, STEPS, TOOLS

HERE = Path(__file__).resolve().parent
ALL_STEPS = [*STEPS, *(r.name for r in REFERENCES)]


def _csv(allowed: list[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(bad)} (choose from {', '.join(allowed)})"
            )
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m bench``."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--tools",
        type=_csv(list(TOOLS)),
        default=list(TOOLS),
        help="comma-separated: cairn,restic,borg (default: all installed)",
    )
    p.add_argument(
        "--steps",
        type=_csv(ALL_STEPS),
        default=[s for s in ALL_STEPS if s not in OPTIONAL_STEPS],
        help=f"comma-separated subset of {','.join(ALL_STEPS)} (default: all but "
        f"{','.join(OPTIONAL_STEPS)}; prerequisites run untimed)",
    )
    p.add_argument(
        "--limit-upload",
        type=int,
        default=5000,
        metavar="KIB",
        help="KiB/s for the backup-throttled step, the same for every tool (default 5000)",
    )
    p.add_argument("--corpus", choices=sorted(SHAPES), default="default")
    p.add_argument("--seed", type=int, default=corpus_mod.DEFAULT_SEED)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compression", choices=["auto", "max"], default="auto")
    p.add_argument(
        "--workdir",
        type=Path,
        default=HERE / "work",
        help="repositories, corpus and logs (same disk for all tools)",
    )
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument(
        "--profile",
        nargs="?",
        const="auto",
        choices=["auto", "py-spy", "cprofile"],
        help="profile cairn's steps into RESULTS/profiles (py-spy if installed)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    p.add_argument("--keep", action="store_true", help="keep the last repetition's repos")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only re-render RESULTS/<timestamp>.md from an earlier JSON report",
    )
    return p.parse_args(argv)


def installed(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The tools that can run, and every requested tool's version (or 'not installed')."""
    versions = {name: TOOLS[name]().version() for name in names}
    usable = [n for n in names if TOOLS[n]().executable() is not None]
    return usable, versions


def render(json_path: Path, results: Path) -> Path:
    """Re-render the Markdown report of an earlier run from its JSON."""
    data = json.loads(json_path.read_text())
    meta = {k: v for k, v in data.items() if k not in ("samples", "summary")}
    return write_reports(results, meta, samples_from_json(data))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``RESULTS/<timestamp>.{md,json}`` and ``latest.md``."""
    args = parse_args(argv)
    if args.render:
        print(f"written: {render(args.render, args.results)}")
        return 0
    tools, versions = installed(args.tools)
    for name in set(args.tools) - set(tools):
        print(f"warning: {name} is not installed; skipped", file=sys.stderr)
    profile = args.profile
    if profile == "auto":
        has_spy = shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists()
        profile = "py-spy" if has_spy else "cprofile"
    config = Config(
        tools=tools,
        steps=args.steps,
        corpus=args.corpus,
        seed=args.seed,
        reps=args.reps,
        compression=args.compression,
        limit_upload=args.limit_upload,
        workdir=args.workdir,
        profile=profile,
        profile_dir=args.results / "profiles",
        timeout=args.timeout,
        keep=args.keep,
    )
    runner = Runner(config)
    layout = runner.prepare()
    samples = runner.run()
    meta: dict[str, Any] = {
        "timestamp": config.stamp,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "machine": machine_info(config.workdir),
        "tools": versions,
        "corpus": {
            "shape": layout.shape.name,
            "seed": layout.seed,
            "files": len(layout.files),
            "bytes": layout.total_bytes,
            "digest": corpus_mod.digest(runner.corpus_dir),
        },
    }
    md = write_reports(args.results, meta, samples)
    print(md.read_text())
    print(f"written: {md} and {md.with_suffix('.json')}")
    return 0
