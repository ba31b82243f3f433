"""``cairn mount`` against ``restic mount``, and against ``cairn restore`` of one file.

    python -m bench.mount [--corpus medium] [--reps 3] [--tools cairn,restic]

The corpus (bench.corpus) is backed up once per tool into ``WORK/<tool>-repo``. Each
measurement then mounts the repository afresh (a cold blob cache and page cache for
the mount), runs one client command against ``snapshots/latest``, and unmounts:

* ``read-largest``: ``cat LARGEST > /dev/null`` — sequential read of the largest file;
* ``cat-all``: ``find . -type f -exec cat {} + > /dev/null``;
* ``ls-lR``: ``ls -lR . > /dev/null``;

each after ``cd SNAPSHOT`` (``snapshots/latest/<corpus path>``), as a user browses.

and, without a mount, ``restore-largest``: ``restore latest --include LARGEST`` into an
empty directory (cairn; restic too, for reference). The mount process's peak memory
(PSS of its process tree, sampled) is recorded per step. Times are medians over the
repetitions; the report gives throughput, cairn/restic ratios and cairn's mount read
of the largest file as a share of cairn's restore of it.

Results: ``bench/results/mount-<timestamp>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.corpus import ensure_pristine
from bench.measure import Command, run_one, tree_memory, tree_pids

HERE = Path(__file__).resolve().parent
PASSWORD = "bench mount password"
MOUNT_STEPS = ("read-largest", "cat-all", "ls-lR")
MOUNT_TIMEOUT = 120.0


@dataclass
class Sample:
    tool: str
    step: str
    rep: int
    wall_s: float
    bytes: int
    mount_peak_bytes: int
    ok: bool
    error: str | None = None
    mount_cpu_s: float = 0.0  # CPU the mount process tree spent during the step


class Tool:
    """How to back up, mount and restore with one tool."""

    def __init__(self, name: str, work: Path) -> None:
        self.name = name
        self.repo = work / f"{name}-repo"
        self.work = work
        self.password_file = work / "password"
        self.env = {
            **os.environ,
            "HOME": str(work / "home"),
            "XDG_CACHE_HOME": str(work / f"{name}-cache"),
            "RESTIC_PASSWORD": PASSWORD,
        }
        if name == "cairn":
            self.env["PYTHONPATH"] = str(HERE.parent)

    def base(self) -> list[str]:
        if self.name == "cairn":
            return [sys.executable, "-m", "cairn.cli.main", "-r", str(self.repo),
                    "--password-file", str(self.password_file)]  # fmt: skip
        return ["restic", "-r", str(self.repo)]

    def ensure_backup(self, corpus: Path, log: Path) -> None:
        done = self.repo / ".bench-done"
        if done.exists():
            return
        shutil.rmtree(self.repo, ignore_errors=True)
        for args in (["init"], ["backup", str(corpus)]):
            m = run_one(Command((*self.base(), *args)), self.env, log, 3600)
            if not m.ok:
                raise SystemExit(f"{self.name} {args[0]} failed: {m.error}")
        done.touch()


class Mount:
    """A mount process of one tool, its memory sampled until it ends."""

    def __init__(self, tool: Tool, mountpoint: Path, log: Path) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [*tool.base(), "mount", str(mountpoint)], env=tool.env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{tool.name} mount did not come up (see {log})")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User + system CPU of the mount process and its children so far."""
        total = 0
        for pid in tree_pids(self.proc.pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, tree_memory(self.proc.pid))

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stop.set()
        self._sampler.join()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        return self.peak


def snapshot_dir(mountpoint: Path, corpus: Path) -> Path:
    return mountpoint / "snapshots" / "latest" / str(corpus).lstrip("/")


def client_command(step: str, snap: Path, largest: str) -> str:
    """The step's shell command. Like a user, it changes into the snapshot first:
    every path walked through the ``latest`` symlink costs a readlink request (FUSE
    does not cache symlink targets), three per entry with ``ls -lR`` of full paths."""
    if step == "read-largest":
        return f"cd '{snap}' && cat '{largest}' > /dev/null"
    if step == "cat-all":
        return f"cd '{snap}' && find . -type f -exec cat {{}} + > /dev/null"
    return f"cd '{snap}' && ls -lR . > /dev/null"


def measure_mount(tool: Tool, step: str, rep: int, corpus: Path, largest: str,
                  nbytes: int, log: Path) -> Sample:  # fmt: skip
    mountpoint = tool.work / f"mnt-{tool.name}"
    try:
        mount = Mount(tool, mountpoint, log)
    except RuntimeError as exc:
        return Sample(tool.name, step, rep, 0.0, nbytes, 0, False, str(exc))
    try:
        cmd = client_command(step, snapshot_dir(mountpoint, corpus), largest)
        before = mount.cpu_seconds()
        m = run_one(Command(("sh", "-c", cmd)), os.environ, log, 3600)
        cpu = mount.cpu_seconds() - before
    finally:
        peak = mount.close()
    return Sample(tool.name, step, rep, m.wall_s, nbytes, peak, m.ok, m.error, cpu)


def measure_restore(tool: Tool, rep: int, corpus: Path, largest: str, nbytes: int,
                    log: Path) -> Sample:  # fmt: skip
    target = tool.work / f"restore-{tool.name}"
    shutil.rmtree(target, ignore_errors=True)
    path = str(corpus / largest)
    cmd = (*tool.base(), "restore", "latest", "--target", str(target), "--include", path)
    m = run_one(Command(cmd), tool.env, log, 3600)
    restored = target / path.lstrip("/")
    ok = m.ok and restored.is_file() and restored.stat().st_size == nbytes
    shutil.rmtree(target, ignore_errors=True)
    error = m.error or (None if ok else "restored file missing or of the wrong size")
    return Sample(tool.name, "restore-largest", rep, m.wall_s, nbytes, m.peak_bytes, ok, error)


def median(samples: list[Sample], tool: str, step: str, field: str) -> float | None:
    values = [getattr(s, field) for s in samples if s.tool == tool and s.step == step and s.ok]
    return statistics.median(values) if values else None


def render(samples: list[Sample], meta: dict[str, object]) -> str:
    tools = sorted({s.tool for s in samples})
    steps = [*MOUNT_STEPS, "restore-largest"]
    lines = [
        f"# cairn mount vs restic mount — {meta['stamp']}",
        "",
        f"Corpus `{meta['corpus']}` ({meta['corpus_bytes']:,} bytes in {meta['files']} files), "
        f"largest file {meta['largest_bytes']:,} bytes; {meta['reps']} repetitions (median). "
        "Each mount step runs in a fresh mount; memory is the mount process's peak PSS "
        "(for restore-largest: the restore's); mount CPU is what the mount process spent "
        "during the step (less sensitive than wall time to the machine's other load).",
        "",
        "| step | "
        + " | ".join(f"{t} s | {t} MB/s | {t} mount CPU s | {t} peak MiB" for t in tools)
        + (
            " | restic/cairn time | restic/cairn mount CPU | cairn/restic memory |"
            if len(tools) > 1
            else " |"
        ),
        "| --- " * (1 + 4 * len(tools) + (3 if len(tools) > 1 else 0)) + "|",
    ]
    for step in steps:
        row = [step]
        walls: dict[str, float | None] = {}
        cpus: dict[str, float | None] = {}
        peaks: dict[str, float | None] = {}
        for t in tools:
            wall = median(samples, t, step, "wall_s")
            cpu = median(samples, t, step, "mount_cpu_s") if step in MOUNT_STEPS else None
            peak = median(samples, t, step, "mount_peak_bytes")
            nbytes = next((s.bytes for s in samples if s.step == step), 0)
            walls[t], cpus[t], peaks[t] = wall, cpu, peak
            rate = f"{nbytes / wall / 1e6:.0f}" if wall and step != "ls-lR" else "-"
            row += [
                f"{wall:.2f}" if wall else "failed",
                rate,
                f"{cpu:.2f}" if cpu else "-",
                f"{peak / 2**20:.0f}" if peak else "-",
            ]
        if len(tools) > 1:
            for values in (walls, cpus):
                c, r = values.get("cairn"), values.get("restic")
                row.append(f"{r / c:.2f}x" if c and r else "-")
            cp, rp = peaks.get("cairn"), peaks.get("restic")
            row.append(f"{cp / rp:.2f}x" if cp and rp else "-")
        lines.append("| " + " | ".join(row) + " |")
    mount_read = median(samples, "cairn", "read-largest", "wall_s")
    restore = median(samples, "cairn", "restore-largest", "wall_s")
    if mount_read and restore:
        lines += [
            "",
            f"cairn mount's sequential read of the largest file runs at "
            f"**{restore / mount_read:.0%}** of `cairn restore`'s throughput for it "
            f"({mount_read:.2f} s against {restore:.2f} s, process start included).",
        ]
    failed = [s for s in samples if not s.ok]
    if failed:
        lines += ["", "Failures:", *(f"- {s.tool} {s.step} r{s.rep}: {s.error}" for s in failed)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mount", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--corpus", default="medium",
                   choices=["tiny", "small", "medium", "default"])  # fmt: skip
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tools", default="cairn,restic")
    p.add_argument("--steps", default=",".join([*MOUNT_STEPS, "restore-largest"]))
    p.add_argument("--work", type=Path, default=HERE / "work" / "mount")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "password").write_text(PASSWORD + "\n")
    (work / "home").mkdir(exist_ok=True)
    corpus = work / f"corpus-{args.corpus}"
    layout = ensure_pristine(corpus, args.corpus)
    largest_spec = max(layout.files, key=lambda f: f.size)
    largest, largest_bytes = largest_spec.path, largest_spec.size
    corpus_bytes = layout.total_bytes
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    logs = work / "logs" / stamp
    logs.mkdir(parents=True)
    tools = [Tool(name, work) for name in args.tools.split(",") if name]
    for tool in tools:
        if tool.name == "restic" and shutil.which("restic") is None:
            raise SystemExit("restic is not installed (apt-get install restic)")
        tool.ensure_backup(corpus, logs / f"{tool.name}-backup.log")
    steps = args.steps.split(",")
    sizes = {"read-largest": largest_bytes, "cat-all": corpus_bytes, "ls-lR": 0,
             "restore-largest": largest_bytes}  # fmt: skip
    samples: list[Sample] = []
    for rep in range(args.reps):
        for step in steps:
            order = tools if rep % 2 == 0 else tools[::-1]
            for tool in order:
                log = logs / f"{tool.name}-{step}-r{rep}.log"
                subprocess.run(["sync"], check=False)
                if step == "restore-largest":
                    s = measure_restore(tool, rep, corpus, largest, sizes[step], log)
                else:
                    s = measure_mount(tool, step, rep, corpus, largest, sizes[step], log)
                samples.append(s)
                status = f"{s.wall_s:7.2f} s  peak {s.mount_peak_bytes / 2**20:6.0f} MiB"
                print(f"r{rep} {tool.name:6} {step:15} {status}"
                      + ("" if s.ok else f"  FAILED: {s.error}"), flush=True)  # fmt: skip
    meta = {
        "stamp": stamp,
        "corpus": args.corpus,
        "corpus_bytes": corpus_bytes,
        "files": len(layout.files),
        "largest_bytes": largest_bytes,
        "reps": args.reps,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    report = render(samples, meta)
    (args.results / f"mount-{stamp}.md").write_text(report)
    (args.results / f"mount-{stamp}.json").write_text(
        json.dumps({**meta, "samples": [asdict(s) for s in samples]}, indent=1)
    )
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
