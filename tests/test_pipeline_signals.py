"""A pipeline process stopped by SIGINT/SIGTERM (or killed) leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import hashlib, json, os, sys
import anyio
from cairn.pipeline import Interrupted, PipelineOptions, open_engine, stop_on_signals


def churn(data):
    # ~tens of ms of CPU, so the signal lands while jobs run in workers
    return hashlib.sha256(bytes(data) * 2000).hexdigest()


async def main():
    opts = PipelineOptions(cpu_workers=2, slot_size=4096, slot_count=4)
    async with stop_on_signals(), open_engine(opts) as engine:
        slots = engine.slots

        async def pieces():
            while True:
                slot = await slots.acquire()
                slot.view[:] = os.urandom(4096)
                yield slot

        async def digest(slot):
            try:
                return await engine.pool.run(churn, slot.ref())
            finally:
                slot.release()

        announced = False

        async def sink(item):
            nonlocal announced
            if not announced:
                announced = True
                print(json.dumps({"segment": slots.name}), flush=True)

        pipe = engine.pipeline("forever").source("read", pieces())
        await pipe.map("hash", digest, concurrency=4).sink("out", sink).run()


if __name__ == "__main__":  # forkserver imports this module in its server
    try:
        anyio.run(main, backend=sys.argv[1])
    except Interrupted as exc:
        print("interrupted", exc.signum, file=sys.stderr)
        sys.exit(exc.exit_code)
"""


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (workers hang under the forkserver)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def running(pid: int) -> bool:
    # A zombie has exited; it only waits for init (its new parent) to reap it.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone(pids: set[int], deadline: float) -> bool:
    # Polls for an event (processes exiting), it does not time anything.
    while time.monotonic() < deadline:
        if not any(running(pid) for pid in pids):
            return True
        time.sleep(0.02)
    return False


def start(tmp_path: Path, backend: str) -> tuple[subprocess.Popen[str], str, set[int]]:
    script = tmp_path / "forever.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    segment = json.loads(line)["segment"]
    children = descendants(proc.pid)
    assert len(children) >= 3  # forkserver + 2 workers
    assert Path("/dev/shm", segment).exists()
    return proc, segment, children


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_exit_130(
    tmp_path: Path, backend: str, signum: signal.Signals
) -> None:
    proc, segment, children = start(tmp_path, backend)
    os.kill(proc.pid, signum)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert f"interrupted {int(signum)}" in stderr
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr
    assert not Path("/dev/shm", segment).exists()
    assert gone(children, time.monotonic() + 10)


def test_killed_parent_leaves_no_orphans_and_shm_is_reclaimed(tmp_path: Path) -> None:
    proc, segment, children = start(tmp_path, "asyncio")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    # Workers see EOF on their socket and exit; multiprocessing's resource
    # tracker (a separate process) unlinks the segment once they are gone.
    assert gone(children, time.monotonic() + 10)
    deadline = time.monotonic() + 10
    while Path("/dev/shm", segment).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path("/dev/shm", segment).exists()
