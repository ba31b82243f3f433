"""Tests of ``bench/latency.py`` without a backup tool: the delay proxy's counters over
real TCP (a local HTTP server behind it), the commands each tool gets per backend, and
the cairn/restic ratio in the rendered table."""

from __future__ import annotations

import http.client
import http.server
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.latency import S3_KEY, DelayProxy, Run, render, tool_command


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several requests on one connection

    def do_GET(self) -> None:
        self._answer(b"x" * 1000)

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(b"")

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_proxy_counts_exchanges_connections_and_bytes(http_server: int) -> None:
    body = b"b" * 300_000  # several 64 KiB chunks: still one request
    with DelayProxy(http_server, rtt_ms=2) as proxy:
        first = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        for method, payload in (("GET", None), ("PUT", body), ("GET", None)):
            first.request(method, "/object", body=payload)
            reply = first.getresponse()
            assert reply.status == 200
            reply.read()
        first.close()
        second = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        second.request("GET", "/other")
        second.getresponse().read()
        second.close()
        requests, connections, up, down = proxy.traffic.counters()
    assert (requests, connections) == (4, 2)
    assert len(body) < up < len(body) + 2000  # headers included
    assert 3000 < down < 5000


def test_tool_commands_per_backend(tmp_path: Path) -> None:
    repo = "s3:http://127.0.0.1:9000/bench/run"
    argv, env = tool_command("restic", repo, 5, ["init"], tmp_path)
    assert argv[1:3] == ["-r", repo] and argv[-3:] == ["-o", "s3.connections=5", "init"]
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    argv, env = tool_command("cairn", repo, 5, ["init"], tmp_path)
    assert "s3.connections=5" in argv and "s3.region=us-east-1" in argv
    assert env["AWS_ACCESS_KEY_ID"] and argv[-1] == "init"
    argv, env = tool_command("cairn", "rest:http://127.0.0.1:9000/run", None, ["init"], tmp_path)
    assert argv[1:3] == ["-r", "rest:http://127.0.0.1:9000/run"]
    assert not any("connections" in a or "s3." in a for a in argv)
    assert env.get("AWS_ACCESS_KEY_ID") != S3_KEY


def test_render_has_the_ratio_at_equal_connections() -> None:
    runs = [
        Run("cairn", "5", "backup", 2.0, 50.0, True, backend="s3", cpu_s=1.0, server_cpu_s=0.5),
        Run("cairn", "5", "snapshots", 0.5, 50.0, True, backend="s3"),
        Run("cairn", "5", "restore", 4.0, 50.0, True, backend="s3", cpu_s=1.5),
        Run("restic", "5", "backup", 3.0, 50.0, True, backend="s3", cpu_s=2.0),
        Run("restic", "5", "snapshots", 0.25, 50.0, True, backend="s3"),
        Run("restic", "5", "restore", 2.0, 50.0, True, backend="s3", cpu_s=0.5),
        Run("cairn", "default", "backup", 2.5, 50.0, True, backend="s3"),
    ]
    text = render(runs, None, 20.0, 50.0)
    assert (
        "| cairn | 5 | 2.00 | 25.0 | 1.50x | 1.00 | 0.50 | 4.00 | 12.5 | 0.50x | 1.50 | 0.00 "
        "| 0.50 | 0.50x |" in text
    )
    assert (
        "| restic | 5 | 3.00 | 16.7 | - | 2.00 | 0.00 | 2.00 | 25.0 | - | 0.50 | 0.00 "
        "| 0.25 | - |" in text
    )
    assert "| cairn | default | 2.50 | 20.0 | - | 0.00 | 0.00 | skipped | - | - | - | - " in text
    assert "SeaweedFS `weed mini` (S3)" in text


def test_render_takes_the_median_of_repetitions() -> None:
    runs = [
        Run("cairn", "5", "backup", wall, 60.0, True, backend="s3", rep=rep)
        for rep, wall in enumerate((2.0, 3.0, 6.0), start=1)
    ] + [
        Run("restic", "5", "backup", wall, 60.0, True, backend="s3", rep=rep)
        for rep, wall in enumerate((4.5, 4.0, 5.0), start=1)
    ]
    text = render(runs, None, 20.0, 60.0)
    # median 3.0 (spread (6-2)/2/3 = 67%), 20 MB/s, restic's median 4.5 / 3.0
    assert "| cairn | 5 | 3.00 ±67% | 20.0 | 1.50x |" in text
    assert "median of 3 runs" in text
