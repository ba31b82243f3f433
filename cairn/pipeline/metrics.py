"""Per-stage counters, immutable snapshots of them, and the end-of-run table."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any

import anyio


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
    # Task-seconds spent waiting for an input item, waiting to hand an output on
    # (a full channel, or a resource only downstream gives back: see
    # :func:`waiting_on_output`), and waiting for a token bucket (:class:`Throttle`).
    # None of them is busy time.
    wait_in_seconds: float = 0.0
    wait_out_seconds: float = 0.0
    throttled_seconds: float = 0.0
    # What to tune when this stage is the bottleneck (given by the pipeline's
    # builder, e.g. "--cpu-workers"), and when it mostly waits for its throttle.
    hint: str = ""
    throttle_hint: str = ""

    def utilization(self, elapsed: float) -> float:
        """Busy fraction of the stage's task-seconds over ``elapsed`` (0..1)."""
        return self.share(self.busy_seconds, elapsed)

    def share(self, seconds: float, elapsed: float) -> float:
        """``seconds`` as a fraction of the stage's task-seconds over ``elapsed`` (0..1)."""
        if elapsed <= 0:
            return 0.0
        return min(1.0, seconds / (elapsed * self.concurrency))


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

    __slots__ = (
        "busy_seconds",
        "bytes_in",
        "concurrency",
        "hint",
        "items_in",
        "items_out",
        "name",
        "throttle_hint",
        "throttled_seconds",
        "wait_in_seconds",
        "wait_out_seconds",
    )

    def __init__(
        self, name: str, concurrency: int, hint: str = "", throttle_hint: str = ""
    ) -> None:
        self.name = name
        self.concurrency = concurrency
        self.hint = hint
        self.throttle_hint = throttle_hint
        self.items_in = 0
        self.items_out = 0
        self.bytes_in = 0
        self.busy_seconds = 0.0
        self.wait_in_seconds = 0.0
        self.wait_out_seconds = 0.0
        self.throttled_seconds = 0.0

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
            wait_in_seconds=self.wait_in_seconds,
            wait_out_seconds=self.wait_out_seconds,
            throttled_seconds=self.throttled_seconds,
            hint=self.hint,
            throttle_hint=self.throttle_hint,
        )


class Waits:
    """Waits noted while a stage's function runs for one item (see :func:`waits`)."""

    __slots__ = ("output", "throttled")

    def __init__(self) -> None:
        self.output = 0.0
        self.throttled = 0.0


_WAITS: ContextVar[Waits | None] = ContextVar("cairn_stage_waits", default=None)


@contextmanager
def waits() -> Iterator[Waits]:
    """Collect, while a stage's function runs, the time it spends in
    :func:`waiting_on_output` and in a throttle: the stage counts it as such,
    not as busy time. (A context variable: each stage task has its own.)"""
    collected = Waits()
    token = _WAITS.set(collected)
    try:
        yield collected
    finally:
        _WAITS.reset(token)


@contextmanager
def waiting_on_output() -> Iterator[None]:
    """Mark a wait inside a stage's function as blocked on output: e.g. a download
    waiting for a shared-memory slot that only a later stage frees. Outside a
    stage it does nothing."""
    collected = _WAITS.get()
    start = anyio.current_time()
    try:
        yield
    finally:
        if collected is not None:
            collected.output += anyio.current_time() - start


def note_throttled(seconds: float) -> None:
    """A token bucket held the current stage's function for ``seconds``."""
    collected = _WAITS.get()
    if collected is not None:
        collected.throttled += seconds


def sizeof_default(item: object) -> int:
    """Bytes of an item when it is a bytes-like object, else 0."""
    if isinstance(item, bytes | bytearray):
        return len(item)
    if isinstance(item, memoryview):
        return item.nbytes
    return 0


# Column headings of the text table, by key of :func:`stats_rows`.
HEADINGS = {
    "stage": "stage",
    "tasks": "tasks",
    "items": "items",
    "out": "out",
    "bytes": "bytes",
    "mb_per_s": "MB/s",
    "busy_pct": "busy %",
    "wait_in_pct": "wait in %",
    "wait_out_pct": "wait out %",
    "throttled_pct": "throttled %",
    "queue": "queue",
}
# Below this share of its task-time busy (or throttled), no stage limits the run:
# the bottleneck line says so rather than name a flag that would not help.
SATURATED = 0.5


def stats_rows(snapshot: PipelineSnapshot) -> list[dict[str, Any]]:
    """One dict per stage with derived rates, for the ``-v`` table and JSON.

    The ``*_pct`` columns are shares of the stage's task-time (elapsed x tasks):
    working, waiting for input, waiting to hand output on, held by a throttle.
    """
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
                "mb_per_s": round(s.bytes_in / elapsed / 1e6, 3) if elapsed > 0 else 0.0,
                "busy_pct": round(100.0 * s.utilization(elapsed), 1),
                "wait_in_pct": round(100.0 * s.share(s.wait_in_seconds, elapsed), 1),
                "wait_out_pct": round(100.0 * s.share(s.wait_out_seconds, elapsed), 1),
                "throttled_pct": round(100.0 * s.share(s.throttled_seconds, elapsed), 1),
                "queue": f"{s.queue_depth}/{s.queue_capacity}",
            }
        )
    return rows


def bottleneck(snapshot: PipelineSnapshot) -> tuple[str, str]:
    """``(stage, hint)``: the stage that limits the run and what to tune.

    * Throttled: a stage whose tasks waited for a token bucket at least
      :data:`SATURATED` of the elapsed time, and longer than they worked, is
      held by the limit (one bucket serves all its tasks, so one waiting task
      is enough): its ``throttle_hint``.
    * Else the stage with the largest share of its task-time busy (a tie goes
      to the later stage: a slow stage keeps those before it waiting on
      output, not busy): its ``hint``. When that share is below
      :data:`SATURATED`, no stage limits the run: it is named, and the hint
      says so.

    ``("", "")`` for a pipeline without stages or time.
    """
    elapsed = snapshot.elapsed
    if not snapshot.stages or elapsed <= 0:
        return "", ""
    held = max(snapshot.stages, key=lambda s: s.throttled_seconds)
    if held.throttled_seconds >= SATURATED * elapsed and held.throttled_seconds > held.busy_seconds:
        return held.name, held.throttle_hint or "a rate limit"
    best = snapshot.stages[0]
    for s in snapshot.stages:
        if s.utilization(elapsed) >= best.utilization(elapsed):
            best = s
    if best.utilization(elapsed) < SATURATED:
        return best.name, "none: no stage was busy half of the time"
    return best.name, best.hint or "none"


def format_bottleneck(snapshot: PipelineSnapshot) -> str:
    """The one ``bottleneck:`` line printed under the table."""
    stage, hint = bottleneck(snapshot)
    if not stage:
        return "bottleneck: none (nothing ran)"
    s = snapshot.stage(stage)
    elapsed = snapshot.elapsed
    if hint == s.throttle_hint and s.throttled_seconds >= SATURATED * elapsed:
        why = (
            f"held by a throttle {100.0 * min(1.0, s.throttled_seconds / elapsed):.0f}% of the time"
        )
    else:
        why = f"busy {100.0 * s.utilization(elapsed):.0f}% of {s.concurrency} tasks' time"
    return f"bottleneck: {stage} ({why}); tune: {hint}"


def format_stats(snapshot: PipelineSnapshot) -> str:
    """A plain-text end-of-run table (the CLI may render the rows with rich)."""
    rows = stats_rows(snapshot)
    if not rows:
        return f"{snapshot.pipeline}: no stages"
    headers = [HEADINGS[key] for key in rows[0]]
    cells = [[_cell(value) for value in row.values()] for row in rows]
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
