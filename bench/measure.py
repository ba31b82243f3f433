"""Run commands and measure wall time, CPU time and peak memory of the process tree.

* **Wall time**: ``time.perf_counter`` around start and ``wait``.
* **CPU time** of the whole process tree: the larger of two counts. (1) The change of
  ``getrusage(RUSAGE_CHILDREN)`` user+sys across the run: the kernel adds a child's CPU
  time — and that of the descendants *it reaped* — when the child is reaped. That
  misses workers started by a forkserver: they are not reaped through the command, so
  a backup measured 8.6 CPU-s this way while it kept both cores busy for 12.2 s.
  (2) The sampler thread below reads ``utime + stime`` of every process in the tree
  (``/proc/PID/stat``) at each sample and sums the last value seen per process; it
  misses at most one sampling interval of a process's CPU before it exits.
* **Peak memory**: ``RUSAGE_CHILDREN.ru_maxrss`` is *not* used as the answer: it is the
  largest single process ever reaped, not the sum over a tree (a pool of 4 workers at
  200 MiB each reports 200 MiB). Instead a thread samples the tree every
  :data:`SAMPLE_INTERVAL` seconds: it walks ``/proc/PID/task/*/children`` from the
  command's PID and sums each process's **PSS** (``/proc/PID/smaps_rollup``;
  proportional set size, so pages shared between a parent and its forked workers, or a
  shared-memory segment, are counted once overall, not once per process). Where
  ``smaps_rollup`` is unreadable it falls back to RSS from ``/proc/PID/statm``. The peak
  is the largest sample, floored by the kernel's ``ru_maxrss`` of any process reaped
  during the run (which catches a process that lived less than one sampling interval).
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SAMPLE_INTERVAL = 0.05  # seconds between memory samples of the process tree
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Command:
    """One program to run: its argument vector and working directory."""

    argv: tuple[str, ...]
    cwd: Path | None = None


@dataclass(frozen=True)
class Measurement:
    """What one step cost. ``error`` is the first line of output of a failed command."""

    wall_s: float
    cpu_s: float
    peak_bytes: int
    exit_code: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether every command of the step exited 0."""
        return self.exit_code == 0 and self.error is None


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads'), via /proc/PID/task/*/children."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:  # the process ended while we looked
        pass
    return out


def _process_bytes(pid: int) -> int:
    """PSS of ``pid`` in bytes (RSS if PSS is unavailable; 0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


_TICK = os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` itself has used (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def tree_pids(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants."""
    out, todo, seen = [], [root_pid], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(_children(pid))
    return out


def tree_memory(root_pid: int) -> int:
    """Sum of the memory of ``root_pid`` and all its descendants, in bytes."""
    return sum(_process_bytes(pid) for pid in tree_pids(root_pid))


class _Sampler(threading.Thread):
    """Samples the memory of a process tree until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.cpu: dict[int, float] = {}  # pid -> last CPU seconds seen
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            pids = tree_pids(self.pid)
            self.peak = max(self.peak, sum(_process_bytes(pid) for pid in pids))
            for pid in pids:
                cpu = _process_cpu(pid)
                if cpu is not None:
                    self.cpu[pid] = cpu
            if self._stop_event.wait(SAMPLE_INTERVAL):
                return

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of every process seen in the tree (last sample of each)."""
        return sum(self.cpu.values())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


_ERROR_PREFIXES = ("error", "fatal", "Error", "Fatal", "FATAL", "ERROR")


def _first_line(path: Path) -> str:
    """The error line of ``path``, at most 200 characters: the last line after a Python
    traceback, else the first line that starts like an error ("Error:", "fatal:"; click
    prints its usage text before it), else the first non-empty line."""
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    if any(x.startswith("Traceback (most recent call last)") for x in lines):
        return lines[-1][:200]
    flagged = [x for x in lines if x.startswith(_ERROR_PREFIXES)]
    return (flagged or lines)[0][:200]


def run_one(cmd: Command, env: Mapping[str, str], log: Path, timeout: float) -> Measurement:
    """Run ``cmd`` with stdout+stderr appended to ``log`` and measure it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    err_path = log.with_suffix(".stderr")
    start = time.perf_counter()
    try:
        with open(log, "ab") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                cmd.argv, cwd=cmd.cwd, env=dict(env), stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            sampler = _Sampler(proc.pid)
            sampler.start()
            timed_out = False
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code, timed_out = proc.wait(), True
            except BaseException:
                # Ctrl-C or SIGTERM of the bench: the command runs in a session of its
                # own, so nothing else would stop it (or the servers it talks to).
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                sampler.stop()
                err.close()
                err_path.unlink(missing_ok=True)
                raise
            wall = time.perf_counter() - start
            peak = sampler.stop()
    except OSError as exc:  # e.g. the program is not installed
        return Measurement(time.perf_counter() - start, 0.0, 0, 127, f"{cmd.argv[0]}: {exc}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cpu = max(cpu, sampler.cpu_seconds)
    if after.ru_maxrss > before.ru_maxrss:  # a reaped process set a new single-process max
        peak = max(peak, after.ru_maxrss * 1024)
    with open(log, "ab") as out:  # keep stderr in the log too, after stdout
        out.write(err_path.read_bytes())
    error = None
    if timed_out:
        error = f"timed out after {timeout:.0f} s"
    elif code != 0:
        error = _first_line(err_path) or _first_line(log) or f"exit code {code}"
    err_path.unlink(missing_ok=True)
    return Measurement(wall, cpu, peak, code, error)


def run_all(
    cmds: Sequence[Command], env: Mapping[str, str], log: Path, timeout: float
) -> Measurement:
    """Run ``cmds`` in order as one step (stopping at the first failure); sum times,
    take the largest peak."""
    wall = cpu = 0.0
    peak = 0
    for cmd in cmds:
        m = run_one(cmd, env, log, timeout)
        wall, cpu, peak = wall + m.wall_s, cpu + m.cpu_s, max(peak, m.peak_bytes)
        if not m.ok:
            return Measurement(wall, cpu, peak, m.exit_code, m.error)
    return Measurement(wall, cpu, peak, 0)


def tree_size(path: Path) -> int:
    """Apparent size in bytes of all regular files under ``path`` (0 if absent)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def tree_count(path: Path) -> tuple[int, int]:
    """Number of regular files and their total size under ``path``."""
    count = size = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                count += 1
                size += st.st_size
    return count, size
