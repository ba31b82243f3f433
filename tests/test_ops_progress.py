"""Progress reporting: status lines from polled stats, the rich display, when to show it."""

from __future__ import annotations

import json

from rich.console import Console

from cairn.cli.progress import Reporter, Status, backup_status, status_json, wants_display
from cairn.config.settings import Settings
from cairn.pipeline import PipelineSnapshot, StageSnapshot
from cairn.stages.backup import BackupStats


def test_backup_status_counts_unchanged_bytes_as_done() -> None:
    stats = BackupStats(
        files_new=1,
        files_unmodified=3,
        bytes_processed=1000,
        bytes_read=100,
        files_seen=6,
        bytes_unmodified=600,
        current=b"/src/big",
    )
    status = backup_status(stats)
    assert (status.total_files, status.files_done) == (6, 4)
    assert (status.total_bytes, status.bytes_done) == (1000, 700)
    assert status.current_files == ["/src/big"]


def test_backup_status_gauges_come_from_the_pipeline_snapshot() -> None:
    def stage(name: str, depth: int, capacity: int) -> StageSnapshot:
        return StageSnapshot(name, 1, 0, 0, 0, 0.0, depth, capacity)

    snap = PipelineSnapshot(
        "backup", 1.0, (stage("walk", 0, 0), stage("read", 3, 4), stage("upload", 0, 0))
    )
    status = backup_status(BackupStats(), snap)
    assert status.gauges == {"queued for read": (3, 4), "queued for upload": (0, 0)}
    assert status.bytes_uploaded is None


def test_status_json_fields_and_eta() -> None:
    line = status_json(Status(10, 5, 1000, 250, current_files=["/a"]), elapsed=30.0)
    assert line["message_type"] == "status" and line["percent_done"] == 0.25
    assert line["seconds_elapsed"] == 30 and line["seconds_remaining"] == 90
    assert line["current_files"] == ["/a"]
    empty = status_json(Status(0, 0, 0, 0), elapsed=1.0)
    assert empty["percent_done"] == 0.0 and "seconds_remaining" not in empty


def test_reporter_json_ticks_and_display() -> None:
    now = [100.0]
    out: list[str] = []
    status = Status(4, 1, 4000, 1000, gauges={"packs to upload": (1, 4)}, bytes_uploaded=500)
    reporter = Reporter(
        Settings(json=True), "backup", lambda: status, clock=lambda: now[0], echo=out.append
    )
    assert reporter.json and not reporter.display
    now[0] += 2
    reporter.tick()
    assert json.loads(out[0])["seconds_remaining"] == 6
    verbose = Reporter(
        Settings(verbosity=1, progress=True), "backup", lambda: status, clock=lambda: now[0]
    )
    console = Console(record=True, width=120)
    console.print(verbose.renderable(status))
    text = console.export_text()
    assert "25.0%" in text and "1 / 4 files" in text and "packs to upload: 1/4" in text


def test_when_to_show_progress() -> None:
    assert not wants_display(Settings(json=True, progress=True))
    assert not wants_display(Settings(quiet=True, progress=True))
    assert wants_display(Settings(progress=True))
    assert not wants_display(Settings(progress=False))
    quiet = Reporter(Settings(json=True, quiet=True), "backup", lambda: Status(0, 0, 0, 0))
    assert not quiet.active
