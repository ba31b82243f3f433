"""Per-stage counters, immutable snapshots of them, and the end-of-run table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class StageSnapshot:
    """One stage's counters at one moment; plain data, ready for JSON."""

    name: str
    concurrency: int
    items_in: int
    items_out: int
    bytes_in: int
    busy_seconds: float  # summed over tasks, for items finished so far
    queue_depth: int
    queue_capacity: int

    def utilization(self, elapsed: float) -> float:
        """Busy fraction of the stage's task-seconds over ``elapsed`` (0..1)."""
        if elapsed <= 0:
            return 0.0
        return min(1.0, self.busy_seconds / (elapsed * self.concurrency))


@dataclass(frozen=True)
class PipelineSnapshot:
    """All stages of one pipeline at one moment. ``done`` marks the last one."""

    pipeline: str
    elapsed: float
    stages: tuple[StageSnapshot, ...]
    done: bool = False

    def stage(self, name: str) -> StageSnapshot:
        """The snapshot of the stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON status lines and structured logs."""
        return asdict(self)


ProgressCallback = Callable[[PipelineSnapshot], None]


class StageMetrics:
    """Mutable counters a stage updates as it works (single event loop: no locks)."""

    __slots__ = ("busy_seconds", "bytes_in", "concurrency", "items_in", "items_out", "name")

    def __init__(self, name: str, concurrency: int) -> None:
        self.name = name
        self.concurrency = concurrency
        self.items_in = 0
        self.items_out = 0
        self.bytes_in = 0
        self.busy_seconds = 0.0

    def snapshot(self, queue_depth: int = 0, queue_capacity: int = 0) -> StageSnapshot:
        """Freeze the current counters."""
        return StageSnapshot(
            name=self.name,
            concurrency=self.concurrency,
            items_in=self.items_in,
            items_out=self.items_out,
            bytes_in=self.bytes_in,
            busy_seconds=self.busy_seconds,
            queue_depth=queue_depth,
            queue_capacity=queue_capacity,
        )


def sizeof_default(item: object) -> int:
    """Bytes of an item when it is a bytes-like object, else 0."""
    if isinstance(item, bytes | bytearray):
        return len(item)
    if isinstance(item, memoryview):
        return item.nbytes
    return 0


def stats_rows(snapshot: PipelineSnapshot) -> list[dict[str, Any]]:
    """One dict per stage with derived rates, for a ``--stats`` table or JSON."""
    elapsed = snapshot.elapsed
    rows = []
    for s in snapshot.stages:
        rows.append(
            {
                "stage": s.name,
                "tasks": s.concurrency,
                "items": s.items_in,
                "out": s.items_out,
                "bytes": s.bytes_in,
                "MB/s": s.bytes_in / elapsed / 1e6 if elapsed > 0 else 0.0,
                "busy %": 100.0 * s.utilization(elapsed),
                "queue": f"{s.queue_depth}/{s.queue_capacity}",
            }
        )
    return rows


def format_stats(snapshot: PipelineSnapshot) -> str:
    """A plain-text end-of-run table (the CLI may render the rows with rich)."""
    rows = stats_rows(snapshot)
    if not rows:
        return f"{snapshot.pipeline}: no stages"
    headers = list(rows[0])
    cells = [[_cell(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [f"{snapshot.pipeline}: {snapshot.elapsed:.2f} s"]
    lines.append(_line(headers, widths))
    lines.extend(_line(r, widths) for r in cells)
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    # First column left-aligned (names), numbers right-aligned.
    parts = [cells[0].ljust(widths[0])]
    parts.extend(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
    return "  ".join(parts).rstrip()
