"""Structured logs: JSON lines with run context, failures with exit codes, worker events."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from cairn.cli.logsetup import RUN_CONTEXT, configure_logging, log_exit
from cairn.config.settings import Settings
from cairn.pipeline import WorkerPool, worklog
from tests.cli_helpers import Cairn
from tests.conftest_cli import cairn  # noqa: F401 - fixture

REQUIRED = (
    "timestamp",
    "level",
    "event",
    "logger",
    "run_id",
    "command",
    "repository",
    "host",
    "profile",
)


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_backup_json_log_every_line_parses(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 10_000)
    (src / "b").write_bytes(b"y" * 20)
    log = tmp_path / "log.jsonl"
    result = cairn.run("backup", str(src), "--log-format", "json", "--log-file", str(log), "--json")
    assert result.code == 0, result.err
    events = _events(log)
    assert len({e["run_id"] for e in events}) == 1
    for event in events:
        for key in REQUIRED:
            assert key in event, (key, event)
        assert str(event["timestamp"]).endswith("Z")
        assert event["command"] == "backup"
    by_name = {e["event"]: e for e in events}
    started, finished = by_name["backup.started"], by_name["backup.finished"]
    assert started["paths"] == [str(src)]
    assert finished["files"] == 2 and finished["bytes"] == 10_020 and finished["errors"] == 0
    assert finished["snapshot_id"] == result.json_lines()[-1]["snapshot_id"]
    assert len(str(finished["repository"])) == 64
    assert by_name["command.finished"]["exit_code"] == 0
    # Nothing but JSON on stdout: status lines, then the summary.
    lines = result.json_lines()
    assert lines[-1]["message_type"] == "summary"
    status = [line for line in lines if line["message_type"] == "status"]
    assert status and status[-1]["percent_done"] == 1.0
    for key in (
        "total_files",
        "files_done",
        "total_bytes",
        "bytes_done",
        "seconds_elapsed",
        "seconds_remaining",
        "current_files",
    ):
        assert key in status[-1]
    assert status[-1]["bytes_done"] == status[-1]["total_bytes"] == 10_020


def test_wrong_password_logged_with_exit_code(cairn: Cairn, tmp_path: Path) -> None:  # noqa: F811
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    log = tmp_path / "log.logfmt"
    result = cairn.run(
        "-r",
        str(cairn.repo),
        "--password-file",
        str(wrong),
        "snapshots",
        "--log-format",
        "json",
        "--log-file",
        str(log),
        base=False,
    )
    assert result.code == 12
    assert result.err.strip().startswith("cairn: wrong password")
    (failed,) = [e for e in _events(log) if e["event"] == "command.failed"]
    assert failed["exit_code"] == 12 and failed["level"] == "error"
    assert "wrong password" in str(failed["error"]) and failed["command"] == "snapshots"


def test_logfmt_and_levels(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    settings = Settings(log_format="logfmt", log_file=str(log), log_level="warning")
    configure_logging(settings, "test")
    try:
        structlog.get_logger("cairn.test").info("hidden.event")
        structlog.get_logger("cairn.test").warning("shown.event", pack="ab12", bytes=3)
        logging.getLogger("asyncssh").warning("library says hi")
        log_exit(3, None)  # info: below the level
        log_exit(11, "repository is already locked")
    finally:
        _reset_logging()
    lines = log.read_text().splitlines()
    assert not any("hidden.event" in line for line in lines)
    assert lines[0].startswith("timestamp=") and "event=shown.event" in lines[0]
    assert "pack=ab12" in lines[0] and "command=test" in lines[0]
    assert any("library says hi" in line and "logger=asyncssh" in line for line in lines)
    assert "exit_code=11" in lines[-1] and "event=command.failed" in lines[-1]


def _reset_logging() -> None:
    configure_logging(Settings(), None)  # closes the log file
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_cairn", False)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    worklog.set_level(worklog.DEFAULT_LEVEL)
    RUN_CONTEXT.clear()


def log_in_worker(x: int) -> int:
    """Runs in a worker process: logs an event and returns."""
    structlog.get_logger("cairn.test.worker").info("worker.did", x=x, thing=object())
    structlog.get_logger("cairn.test.worker").debug("worker.noise")
    return x * 2


@pytest.mark.anyio
async def test_worker_events_reach_the_parent_stream() -> None:
    worklog.set_level(logging.INFO)
    with capture_logs() as logs:
        async with WorkerPool(1) as pool:
            (pid,) = pool.pids
            assert await pool.run(log_in_worker, 21) == 42
    (event,) = [e for e in logs if e["event"] == "worker.did"]
    assert event["x"] == 21 and event["worker_pid"] == pid
    assert event["log_level"] == "info"
    assert event["thing"].startswith("<object")  # unpicklable values travel as repr
    assert not [e for e in logs if e["event"] == "worker.noise"]  # below the parent's level
