"""Progress of backup and restore: JSON ``status`` lines or a rich display on stderr.

The reporter polls the running command's public stats once per tick (no callbacks in
the hot path): backup's :class:`~cairn.stages.backup.BackupStats` and its pipeline's
snapshot, restore's :class:`~cairn.stages.restore.RestoreStats`. Totals of a backup
grow while the walk is still scanning, as restic's do. Output:

* ``--json``: a ``status`` line on stdout every second (``docs/json.md``);
* a terminal on stderr (or ``--progress``): a rich display with files and bytes
  done/total, rate, ETA and the current file; ``-v`` adds queue gauges;
* ``--quiet``, ``--no-progress`` or stderr not a terminal: nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import click

from cairn.config.settings import Settings
from cairn.pipeline import PipelineSnapshot

INTERVAL = 1.0


@dataclass(frozen=True)
class Status:
    """One poll of a running backup or restore."""

    total_files: int
    files_done: int
    total_bytes: int
    bytes_done: int
    error_count: int = 0
    current_files: list[str] = field(default_factory=list)
    gauges: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (used, max)
    bytes_uploaded: int | None = None  # what reached the backend (throttled runs lag)
    unit: str = "files"  # what total_files counts, in the display (copy: snapshots)


def backup_status(
    stats: Any, pipeline: PipelineSnapshot | None = None, backend: Any = None
) -> Status:
    """Poll a backup: its :class:`~cairn.stages.backup.BackupStats`, its pipeline's
    snapshot (``Archiver.snapshot()``: one gauge per channel, the items queued for
    each stage) and the counters of its ``backend`` (bytes uploaded)."""
    s = stats
    done = s.files_new + s.files_changed + s.files_unmodified
    current = [os.fsdecode(s.current)] if s.current else []
    gauges: dict[str, tuple[int, int]] = {}
    if pipeline is not None:
        for stage in pipeline.stages[1:]:  # the source has no input channel
            gauges[f"queued for {stage.name}"] = (stage.queue_depth, stage.queue_capacity)
    from cairn.cli.common import backend_counters

    counters = backend_counters(backend) if backend is not None else None
    return Status(
        bytes_uploaded=counters.bytes_saved if counters is not None else None,
        total_files=max(s.files_seen, done),
        files_done=done,
        total_bytes=s.bytes_processed,
        bytes_done=min(s.bytes_read + s.bytes_unmodified, s.bytes_processed),
        error_count=len(s.errors),
        current_files=current,
        gauges=gauges,
    )


def restore_status(restorer: Any) -> Status:
    """Poll a :class:`~cairn.stages.restore.Restorer`.

    Restore writes pack by pack, not file by file, so ``files_done`` is estimated
    from the bytes written until the write phase ends.
    """
    s = restorer.stats
    total = s.files + s.files_skipped
    fraction = s.bytes_written / s.bytes_total if s.bytes_total else 0.0
    return Status(
        total_files=total,
        files_done=s.files_skipped + int(s.files * min(1.0, fraction)),
        total_bytes=s.bytes_total,
        bytes_done=s.bytes_written,
        error_count=len(s.errors),
    )


def status_json(status: Status, elapsed: float) -> dict[str, Any]:
    """restic's ``status`` message for one poll."""
    if status.total_bytes:
        fraction = status.bytes_done / status.total_bytes
    elif status.total_files:
        fraction = status.files_done / status.total_files
    else:
        fraction = 0.0
    fraction = min(1.0, fraction)
    remaining = None
    if 0 < fraction < 1:
        remaining = int(elapsed * (1 - fraction) / fraction)
    elif fraction >= 1:
        remaining = 0
    out: dict[str, Any] = {
        "message_type": "status",
        "seconds_elapsed": int(elapsed),
        "percent_done": round(fraction, 4),
        "total_files": status.total_files,
        "files_done": status.files_done,
        "total_bytes": status.total_bytes,
        "bytes_done": status.bytes_done,
        "error_count": status.error_count,
        "current_files": status.current_files,
    }
    if status.bytes_uploaded is not None:
        out["bytes_uploaded"] = status.bytes_uploaded
    if remaining is not None:
        out["seconds_remaining"] = remaining
    return out


def wants_display(settings: Settings) -> bool:
    """A rich display: not with --json or --quiet; on a terminal unless --(no-)progress."""
    if settings.json or settings.quiet or settings.progress is False:
        return False
    return bool(settings.progress) or sys.stderr.isatty()


class Reporter:
    """Turns polls into output; :meth:`tick` is called once per interval."""

    def __init__(
        self,
        settings: Settings,
        kind: str,
        poll: Callable[[], Status],
        *,
        clock: Callable[[], float] = time.monotonic,
        echo: Callable[[str], None] = click.echo,
    ) -> None:
        self.settings = settings
        self.kind = kind
        self.poll = poll
        self._clock = clock
        self._start = clock()
        self._echo = echo
        self.json = settings.json and not settings.quiet
        self.display = wants_display(settings)
        self._live: Any = None

    @property
    def active(self) -> bool:
        return self.json or self.display

    def elapsed(self) -> float:
        return self._clock() - self._start

    def tick(self) -> None:
        status = self.poll()
        if self.json:
            self._echo(json.dumps(status_json(status, self.elapsed())))
        if self.display:
            self._render(status)

    def _render(self, status: Status) -> None:
        from rich.console import Console
        from rich.live import Live

        if self._live is None:
            console = Console(stderr=True, force_terminal=True if self.settings.progress else None)
            self._live = Live(console=console, auto_refresh=False, transient=True)
            self._live.start()
        self._live.update(self.renderable(status), refresh=True)

    def renderable(self, status: Status) -> Any:
        """The rich display for one poll (a grid of lines)."""
        from rich.filesize import decimal
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        elapsed = self.elapsed()
        info = status_json(status, elapsed)
        rate = status.bytes_done / elapsed if elapsed > 0 else 0.0
        eta = info.get("seconds_remaining")
        grid = Table.grid(padding=(0, 1))
        grid.add_column()
        grid.add_column()
        total = max(status.total_bytes, 1)
        grid.add_row(
            ProgressBar(total=total, completed=min(status.bytes_done, total), width=30),
            f"{100 * info['percent_done']:5.1f}%  {decimal(status.bytes_done)} / "
            f"{decimal(status.total_bytes)}  {decimal(int(rate))}/s  "
            f"ETA {_clock_time(eta) if eta is not None else '--:--'}  [{_clock_time(elapsed)}]",
        )
        errors = f", {status.error_count} errors" if status.error_count else ""
        uploaded = f", {decimal(status.bytes_uploaded)} uploaded" if status.bytes_uploaded else ""
        grid.add_row(
            self.kind, f"{status.files_done} / {status.total_files} {status.unit}{uploaded}{errors}"
        )
        for path in status.current_files[:4]:
            grid.add_row("", path)
        if self.settings.verbosity >= 1:
            for name, (used, cap) in status.gauges.items():
                grid.add_row("", f"{name}: {used}/{cap if cap >= 0 else '∞'}")
        return grid

    def close(self) -> None:
        """Stop the display; a final JSON status line marks the end."""
        if self._live is not None:
            self._live.stop()
            self._live = None


def _clock_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@asynccontextmanager
async def track(
    settings: Settings, kind: str, poll: Callable[[], Status], interval: float = INTERVAL
) -> AsyncIterator[Reporter]:
    """Report progress of the body every ``interval`` seconds (when anything wants it)."""
    reporter = Reporter(settings, kind, poll)
    if not reporter.active:
        yield reporter
        return

    async def ticker() -> None:
        while True:
            await anyio.sleep(interval)
            reporter.tick()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            try:
                yield reporter
            finally:
                tg.cancel_scope.cancel()
        if reporter.json:
            reporter.tick()  # a last status at 100 %, before the summary
    finally:
        reporter.close()
