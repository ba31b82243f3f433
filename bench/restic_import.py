"""Importing a restic repository into cairn (``cairn copy --from-repo restic:…``)
against ``restic restore`` of the same snapshot, and what later cairn backups share
with the imported data. See "Importing from restic" in ``bench/README.md``::

    .venv/bin/python -m bench.restic_import                      # default corpus, ~3 min
    .venv/bin/python -m bench.restic_import --corpus medium --reps 1

Per repetition, alternating: ``restic restore latest`` into an empty directory, and
``cairn copy`` of the restic repository (made once per corpus, kept in the workdir)
into a fresh cairn repository. Then, once: a ``cairn backup`` of the same corpus
into the imported repository (it takes the imported snapshot as parent: nothing is
re-read) and a ``--force`` backup (every file re-read and re-chunked), each with
the bytes it added — the price of keeping restic's chunk boundaries.

Results: ``bench/results/restic-import-<timestamp>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench.corpus import ensure_pristine
from bench.machine import machine_info
from bench.measure import Command, Measurement, run_one
from bench.tools import Cairn as CairnTool

HERE = Path(__file__).resolve().parent
PASSWORD = "bench restic import password"
# The cairn of this checkout, as the installed script runs it.
CAIRN_MAIN = "import sys; from cairn.cli.early import main; sys.argv[0] = 'cairn'; sys.exit(main())"


def tree_bytes(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(root) for f in files)


class Runner:
    def __init__(self, work: Path, log: Path) -> None:
        self.work, self.log = work, log
        self.pwfile = work / "password"
        self.pwfile.write_text(PASSWORD + "\n")
        self.env = {
            **os.environ,
            "HOME": str(work / "home"),
            "XDG_CACHE_HOME": str(work / "cache"),
            "RESTIC_PASSWORD_FILE": str(self.pwfile),
            "RESTIC_CACHE_DIR": str(work / "restic-cache"),
            "PYTHONPATH": str(HERE.parent),
        }

    def cairn(self, repo: Path, *args: str) -> tuple[str, ...]:
        return (
            sys.executable, "-c", CAIRN_MAIN, "-r", str(repo), "--password-file", str(self.pwfile),
            *args,
        )  # fmt: skip

    def run(self, argv: tuple[str, ...]) -> Measurement:
        # From the workdir: ``python -c`` puts the working directory first on sys.path.
        m = run_one(Command(argv, cwd=self.work), self.env, self.log, 3600)
        if not m.ok:
            raise SystemExit(f"{argv[:6]} failed: {m.error} (see {self.log})")
        return m

    def json_summary(self, argv: tuple[str, ...]) -> dict[str, object]:
        out = self.log.with_suffix(".summary")
        m = run_one(Command(("sh", "-c", f'"$@" > {out}', "sh", *argv), cwd=self.work),
                    self.env, self.log, 3600)  # fmt: skip
        if not m.ok:
            raise SystemExit(f"{argv[:6]} failed: {m.error}")
        lines = [json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("message_type") == "summary"][-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.restic_import", description=__doc__)
    p.add_argument("--corpus", default="default", help="corpus shape (bench/layout.py)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=HERE / "work" / "restic-import")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    CairnTool().prepare()  # bytecode compiled, as installed (bench/tools.py)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    r = Runner(work, work / f"restic-import-{stamp}.log")
    corpus = work / f"corpus-{args.corpus}-1"
    ensure_pristine(corpus, args.corpus)
    corpus_bytes = tree_bytes(corpus)
    source = work / f"restic-{args.corpus}"
    if not (source / ".backed-up").exists():
        shutil.rmtree(source, ignore_errors=True)
        r.run(("restic", "-q", "-r", str(source), "init"))
        r.run(("restic", "-q", "-r", str(source), "backup", str(corpus)))
        (source / ".backed-up").touch()
    restores: list[Measurement] = []
    imports: list[Measurement] = []
    for rep in range(args.reps):
        target = work / f"restored-{rep}"
        shutil.rmtree(target, ignore_errors=True)
        restores.append(
            r.run(("restic", "-q", "-r", str(source), "restore", "latest", "--target", str(target)))
        )
        dest = work / f"imported-{rep}"
        shutil.rmtree(dest, ignore_errors=True)
        r.run(r.cairn(dest, "init", "-q"))
        imports.append(
            r.run(
                r.cairn(
                    dest,
                    "-q",
                    "copy",
                    "--from-repo",
                    f"restic:{source}",
                    "--from-password-file",
                    str(r.pwfile),
                )
            )
        )
        print(f"rep {rep + 1}: restic restore {restores[-1].wall_s:.2f} s, "
              f"cairn import {imports[-1].wall_s:.2f} s", flush=True)  # fmt: skip
    dest = work / f"imported-{args.reps - 1}"
    after = r.json_summary(r.cairn(dest, "--json", "backup", str(corpus)))
    forced = r.json_summary(r.cairn(dest, "--json", "backup", "--force", str(corpus)))
    report = render(args, corpus_bytes, restores, imports, after, forced, work, stamp)
    for rep in range(args.reps):  # targets stay until the end (bench/README.md)
        shutil.rmtree(work / f"restored-{rep}", ignore_errors=True)
        shutil.rmtree(work / f"imported-{rep}", ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"restic-import-{stamp}.md"
    path.write_text(report)
    print(report)
    print(f"written to {path}")
    return 0


def _median(ms: list[Measurement], attr: str) -> float:
    return statistics.median(getattr(m, attr) for m in ms)


def render(
    args: argparse.Namespace,
    corpus_bytes: int,
    restores: list[Measurement],
    imports: list[Measurement],
    after: dict[str, object],
    forced: dict[str, object],
    work: Path,
    stamp: str,
) -> str:
    info = machine_info(work)
    mb = corpus_bytes / 1e6
    rows = []
    for name, ms in (("restic restore", restores), ("cairn copy --from-repo restic:", imports)):
        wall, cpu = _median(ms, "wall_s"), _median(ms, "cpu_s")
        peak = _median(ms, "peak_bytes") / 2**20
        rows.append(f"| {name} | {wall:.2f} | {mb / wall:.1f} | {cpu:.1f} | {peak:.0f} |")
    ratio = _median(restores, "wall_s") / _median(imports, "wall_s")
    return "\n".join([
        f"# Importing a restic repository — corpus `{args.corpus}`, {stamp}",
        "",
        f"Corpus: {mb:.1f} MB. {args.reps} repetition(s), alternating; medians. "
        f"Machine: {info['cpu_model']}, {info['cores']} cores, "
        f"load average at the end {os.getloadavg()[0]:.2f}.",
        "",
        "| step | wall s | MB/s | CPU s (tree) | peak MiB |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Import throughput / restic restore throughput: **{ratio:.2f}x** (target >= 1x).",
        "",
        "Later cairn backups of the same corpus into the imported repository:",
        "",
        "| backup | files unmodified | bytes added |",
        "| --- | ---: | ---: |",
        f"| with the imported snapshot as parent | {after['files_unmodified']} | "
        f"{after['data_added']:,} |",
        f"| `--force` (every file re-read and re-chunked) | — | {forced['data_added']:,} |",
        "",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
