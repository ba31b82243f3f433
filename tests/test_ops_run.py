"""``cairn run PROFILE`` end to end: exit codes, JSON log, metrics file, pings."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture

RUN_CONTEXT = ("run_id", "command", "repository", "host", "profile")


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[tuple[str, str, bytes]] = []

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.hits.append((self.command, self.path, self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    do_GET = do_POST = _record

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def monitor() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A tiny ping receiver on 127.0.0.1: its base URL and the requests it saw."""
    hits: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Recorder,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def _profile(c: Cairn, tmp_path: Path, url: str, paths: list[Path], **extra: str) -> Path:
    lines = [
        "[profiles.base]",
        f'repository = "{c.repo}"',
        f'password_file = "{extra.pop("password_file", c.password_file)}"',
        "",
        "[profiles.nightly]",
        'inherit = "base"',
        "paths = [" + ", ".join(f'"{p}"' for p in paths) + "]",
        'tags = ["nightly"]',
        "keep_last = 2",
        'check_subset = "100%"',
        f'ping_url_success = "{url}/success"',
        f'ping_url_failure = "{url}/fail"',
        'ping_method = "POST"',
    ]
    config = tmp_path / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def _run(c: Cairn, config: Path, tmp_path: Path) -> tuple[Any, list[dict[str, Any]], str]:
    log = tmp_path / "run.log"
    metrics = tmp_path / "cairn.prom"
    result = c.run(
        "--insecure-kdf",
        "run",
        "nightly",
        "--config",
        str(config),
        "--log-format",
        "json",
        "--log-file",
        str(log),
        "--metrics-file",
        str(metrics),
        "--json",
        base=False,
    )
    events = [json.loads(line) for line in log.read_text().splitlines()]  # every line is JSON
    for event in events:
        for key in ("timestamp", "level", "event", "logger", *RUN_CONTEXT):
            assert key in event, (key, event)
        assert event["timestamp"].endswith("Z") and event["command"] == "run"
        assert event["profile"] == "nightly"
    return result, events, metrics.read_text()


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + '{profile="nightly"}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} missing from metrics:\n{text}")


def test_run_success_logs_metrics_and_ping(cairn: Cairn, tmp_path: Path, monitor: Any) -> None:  # noqa: F811
    url, hits = monitor
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha" * 1000)
    config = _profile(cairn, tmp_path, url, [src])
    result, events, metrics = _run(cairn, config, tmp_path)
    assert result.code == 0, result.err
    summary = result.json_lines()[-1]
    assert summary["command"] == "run" and summary["exit_code"] == 0
    assert [s["status"] for s in summary["steps"]] == ["ok", "ok", "ok"]
    names = [e["event"] for e in events]
    for expected in (
        "run.started",
        "backup.started",
        "backup.finished",
        "run.finished",
        "command.finished",
    ):
        assert expected in names, names
    finished = next(e for e in events if e["event"] == "backup.finished")
    assert finished["snapshot_id"] == summary["snapshot_id"] and finished["files"] == 1
    assert finished["bytes_added"] == 5000 and len(finished["repository"]) == 64
    assert _sample(metrics, "cairn_exit_code") == 0
    assert _sample(metrics, "cairn_files") == 1
    assert _sample(metrics, "cairn_bytes_added") == 5000
    assert _sample(metrics, "cairn_last_success_timestamp_seconds") > 1.7e9
    assert "# TYPE cairn_duration_seconds gauge" in metrics
    assert [(m, p) for m, p, _ in hits] == [("POST", "/success")]
    assert json.loads(hits[0][2])["exit_code"] == 0


def test_run_partial_backup_exits_3(cairn: Cairn, tmp_path: Path, monitor: Any) -> None:  # noqa: F811
    url, hits = monitor
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha")
    config = _profile(cairn, tmp_path, url, [src, tmp_path / "vanished"])
    result, events, metrics = _run(cairn, config, tmp_path)
    assert result.code == 3, result.err
    summary = result.json_lines()[-1]
    assert [s["status"] for s in summary["steps"]] == ["partial", "ok", "ok"]
    assert _sample(metrics, "cairn_exit_code") == 3
    assert "cairn_last_success_timestamp_seconds{" not in metrics
    assert [p for _, p, _ in hits] == ["/fail"]
    assert any(e["event"] == "command.finished" and e["exit_code"] == 3 for e in events)


def test_run_failure_keeps_last_success_and_skips_steps(
    cairn: Cairn,  # noqa: F811
    tmp_path: Path,
    monitor: Any,
) -> None:
    url, hits = monitor
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password")
    src = tmp_path / "src"
    src.mkdir()
    config = _profile(cairn, tmp_path, url, [src], password_file=str(wrong))
    (tmp_path / "cairn.prom").write_text(
        'cairn_last_success_timestamp_seconds{profile="nightly"} 1700000000\n'
        'cairn_exit_code{profile="other"} 0\n'
    )
    result, events, metrics = _run(cairn, config, tmp_path)
    assert result.code == 12, result.err
    assert "wrong password" in result.err
    summary = result.json_lines()[-1]
    assert [s["status"] for s in summary["steps"]] == ["failed", "skipped", "skipped"]
    assert _sample(metrics, "cairn_exit_code") == 12
    assert _sample(metrics, "cairn_last_success_timestamp_seconds") == 1700000000
    assert 'cairn_exit_code{profile="other"} 0' in metrics
    failed = [e for e in events if e["event"] == "command.failed"]
    assert failed and failed[0]["exit_code"] == 12 and "wrong password" in failed[0]["error"]
    step = next(e for e in events if e["event"] == "run.step_finished")
    assert step["exit_code"] == 12 and step["level"] == "error"
    assert [p for _, p, _ in hits] == ["/fail"]


def test_run_unknown_profile_is_one_line(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    config = _profile(cairn, tmp_path, "http://127.0.0.1:9", [tmp_path])
    result = cairn.run("run", "weekly", "--config", str(config), base=False)
    assert result.code == 1
    assert result.err.strip().count("\n") == 0 and "no profile 'weekly'" in result.err


def test_exit_code_rules_and_missing_commands() -> None:
    from cairn.cli.cmd_run import Step, _load_command, exit_code_of

    def steps(*codes: int | None) -> list[Step]:
        return [Step(f"s{i}", [], exit_code=c) for i, c in enumerate(codes)]

    assert exit_code_of(steps(0, 0, 0)) == 0
    assert exit_code_of(steps(3, 0, None)) == 3
    assert exit_code_of(steps(3, 11, 1)) == 11
    assert exit_code_of(steps(12, None, None)) == 12
    assert _load_command("no_such_command") is None  # run skips it with a note
    assert _load_command("backup") is not None
