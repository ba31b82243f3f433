"""Restore memory on many small files: cairn and restic side by side, per file.

    python -m bench.restore_memory [--work DIR] [--only cairn|restic] [--checkout DIR] N...

For each N, a corpus of N small files (1-4 KiB, 100 per directory) is made once in
``DIR/src-N`` and backed up once per tool into ``DIR/<tool>-N`` (kept, so a later run
measures only the restore). Each restore goes into an empty directory; the line
printed gives its wall time, CPU time and the peak PSS of its process tree
(bench.measure), and time and memory divided by N. ``--checkout DIR`` restores with
the ``cairn`` package in DIR (e.g. ``git archive main cairn`` unpacked there) for a
before/after comparison on the same repositories. The machine's load moves wall
times a lot: compare runs made one after the other, more than once.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

from bench.measure import Command, Measurement, run_one

PASSWORD = "cairn-bench-password"
PER_DIR = 100
# The cairn of this checkout (PYTHONPATH below), as the installed script runs it.
CAIRN_MAIN = "import sys; from cairn.cli.early import main; sys.argv[0] = 'cairn'; sys.exit(main())"


def make_corpus(root: Path, n: int) -> None:
    if (root / ".done").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(n)
    for i in range(n):
        d = root / f"d{i // PER_DIR // 100:03d}" / f"d{i // PER_DIR:05d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True)
        (d / f"f{i:07d}.txt").write_bytes(rng.randbytes(rng.randint(1024, 4096)))
    (root / ".done").touch()


def commands(tool: str, repo: Path, pwfile: Path) -> dict[str, list[str]]:
    if tool == "cairn":
        base = [sys.executable, "-c", CAIRN_MAIN, "-r", str(repo), "--password-file", str(pwfile)]
    else:
        base = ["restic", "-r", str(repo), "--password-file", str(pwfile)]
    return {
        "init": [*base, "init"],
        "backup": [*base, "backup", "."],
        "restore": [*base, "restore", "latest", "--target"],
    }


def measure(tool: str, n: int, work: Path, checkout: Path | None = None) -> Measurement:
    src, repo, pwfile = work / f"src-{n}", work / f"{tool}-{n}", work / "password"
    pwfile.write_text(PASSWORD)
    env = {**os.environ, "HOME": str(work / "home"), "XDG_CACHE_HOME": str(work / "cache")}
    env["PYTHONPATH"] = str(checkout or Path(__file__).resolve().parent.parent)
    log = work / f"{tool}-{n}.log"
    cmds = commands(tool, repo, pwfile)
    make_corpus(src, n)
    if not (repo / ".backed-up").exists():
        shutil.rmtree(repo, ignore_errors=True)
        for step in ("init", "backup"):
            m = run_one(Command(tuple(cmds[step]), cwd=src), env, log, 3600)
            if not m.ok:
                raise SystemExit(f"{tool} {step} failed: {m.error}")
        (repo / ".backed-up").touch()
    target = work / f"restore-{tool}-{n}"
    shutil.rmtree(target, ignore_errors=True)
    # Not run from this checkout: ``python -c`` puts the working directory first on
    # sys.path, before PYTHONPATH, and --checkout would silently measure this one.
    m = run_one(Command((*cmds["restore"], str(target)), cwd=work), env, log, 3600)
    shutil.rmtree(target, ignore_errors=True)
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="+", type=int)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cairn-restore-memory"))
    parser.add_argument("--only", choices=("cairn", "restic"))
    parser.add_argument(
        "--checkout", type=Path, help="run the cairn package in this directory (A/B runs)"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tools = [args.only] if args.only else ["cairn", "restic"]
    print(
        f"{'tool':7} {'files':>7} {'time s':>7} {'cpu s':>6} {'peak MiB':>9} "
        f"{'ms/file':>8} {'KiB/file':>9}"
    )
    for n in args.counts:
        for tool in tools:
            m = measure(tool, n, args.work, args.checkout)
            mib = m.peak_bytes / 2**20
            note = "" if m.ok else f"  FAILED: {m.error}"
            print(
                f"{tool:7} {n:7} {m.wall_s:7.2f} {m.cpu_s:6.1f} {mib:9.1f} "
                f"{1000 * m.wall_s / n:8.3f} {m.peak_bytes / 1024 / n:9.2f}{note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
