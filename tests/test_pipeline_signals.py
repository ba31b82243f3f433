"""A pipeline process stopped by SIGINT/SIGTERM (or killed) leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
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
        start_new_session=True,  # its own process group, to kill as a whole
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        segment = json.loads(line)["segment"]
        children = descendants(proc.pid)
        assert len(children) >= 3  # forkserver + 2 workers
        assert holders(segment, {proc.pid} | children), "the slot memory is not where we look"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # a script that runs forever: never leave it
        proc.communicate()
        raise
    return proc, segment, children


def holders(segment: str, pids: set[int]) -> set[int]:
    """Which of ``pids`` hold the slot memory ``segment`` open or mapped."""
    token = segment.rsplit(":", 1)[1]
    found = set()
    for pid in pids:
        try:
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue  # exited meanwhile
        if any(f"memfd:cairn_{token}" in target for target in fds) or f"cairn_{token}" in maps:
            found.add(pid)
    return found


def named_segments(pid: int) -> list[Path]:
    """Named shared memory of ``pid`` (what versions before memfd slots left)."""
    return list(Path("/dev/shm").glob(f"cairn_{pid}_*"))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_exit_130(
    tmp_path: Path, backend: str, signum: signal.Signals
) -> None:
    proc, _, children = start(tmp_path, backend)
    os.kill(proc.pid, signum)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert f"interrupted {int(signum)}" in stderr
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr
    assert not named_segments(proc.pid)
    assert gone(children, time.monotonic() + 10)


@pytest.mark.parametrize("whole_group", [False, True], ids=["parent", "process-group"])
def test_killed_run_leaves_no_orphans_and_shm_is_reclaimed(
    tmp_path: Path, whole_group: bool
) -> None:
    proc, segment, children = start(tmp_path, "asyncio")
    # SIGKILL of the whole group is what systemd does when a stop times out:
    # nobody is left to clean up, so the memory must need no cleaning.
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    # Workers see EOF on their socket and exit; with the last holder gone the
    # kernel frees the (nameless) memory.
    assert gone(children, time.monotonic() + 10)
    assert not holders(segment, children)
    assert not named_segments(proc.pid)


@pytest.mark.anyio
async def test_what_fails_because_of_the_stop_is_reported_as_the_stop() -> None:
    """A signal sent to the process group also reaches a child being started (the
    fork server, before it ignores SIGINT); the start then fails with its own
    error while the run unwinds. The user asked for a stop: exit 130, not an
    internal error."""
    from cairn.pipeline import Interrupted, stop_on_signals

    with pytest.raises(Interrupted) as caught:
        async with stop_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                await anyio.sleep_forever()
            finally:
                raise EOFError("unexpected EOF")  # what the start raised
    assert caught.value.signum == signal.SIGINT
    assert "unexpected EOF" in repr(caught.value.__cause__)
