"""Time-of-day bandwidth schedules: ``["08:00-19:00=512", "*=0"]`` in KiB/s.

An entry is ``HH:MM-HH:MM=RATE`` (a window may wrap past midnight, as
``22:00-06:00``) or ``*=RATE`` (any time). The first entry whose window holds the
time wins; ``0`` means unlimited. When no entry matches, the fallback (the
static ``limit_upload``/``limit_download``) applies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Protocol

import anyio

_ENTRY = re.compile(r"^\s*(?:\*|(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2}))\s*=\s*(\d+)\s*$")
_DAY = 24 * 60


@dataclass(frozen=True)
class Window:
    """Minutes since midnight: ``start`` inclusive, ``end`` exclusive; None = all day."""

    start: int | None
    end: int | None
    rate: int  # KiB/s, 0 = unlimited

    def holds(self, minute: float) -> bool:
        if self.start is None or self.end is None:
            return True
        if self.start <= self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # wraps past midnight


def parse_schedule(entries: Sequence[str]) -> list[Window]:
    """Parse schedule entries; ``ValueError`` names the bad one."""
    windows = []
    for entry in entries:
        m = _ENTRY.match(entry)
        if not m:
            raise ValueError(f"bad schedule entry {entry!r} (want 'HH:MM-HH:MM=KiB' or '*=KiB')")
        rate = int(m[5])
        if m[1] is None:
            windows.append(Window(None, None, rate))
            continue
        h1, m1, h2, m2 = (int(x) for x in m.group(1, 2, 3, 4))
        if any(h > 24 or m > 59 or (h == 24 and m) for h, m in ((h1, m1), (h2, m2))):
            raise ValueError(f"bad time in schedule entry {entry!r}")
        windows.append(Window((h1 * 60 + m1) % (_DAY + 1), (h2 * 60 + m2) % (_DAY + 1), rate))
    return windows


def _minute(t: time | datetime) -> float:
    return t.hour * 60 + t.minute + t.second / 60 + t.microsecond / 60e6


def rate_at(
    schedule: Sequence[str], when: time | datetime, fallback: int | None = None
) -> int | None:
    """The limit in KiB/s at ``when``; ``None`` for unlimited.

    >>> rate_at(["08:00-19:00=512", "*=0"], time(9, 30))
    512
    """
    minute = _minute(when)
    for window in parse_schedule(schedule):
        if window.holds(minute):
            return window.rate or None
    return fallback or None


def next_boundary(schedule: Sequence[str], when: datetime) -> datetime | None:
    """The first moment after ``when`` at which a window opens or closes."""
    edges = sorted({e for w in parse_schedule(schedule) for e in (w.start, w.end) if e is not None})
    if not edges:
        return None
    midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
    now = _minute(when)
    for day in (0, 1):
        for edge in edges:
            if day * _DAY + edge > now:
                return midnight + timedelta(days=day, minutes=edge)
    return None  # pragma: no cover - an edge always exists the next day


class RateSetter(Protocol):
    """What the updater drives: the engine's token bucket (bytes per second)."""

    def set_rate(self, rate: float | None, burst: int | None = None) -> None: ...


async def follow_schedule(
    throttle: RateSetter,
    schedule: Sequence[str],
    *,
    fallback: int | None = None,
    start: datetime | None = None,
    clock: Callable[[], float] | None = None,
    on_change: Callable[[int | None], None] | None = None,
) -> None:
    """Set ``throttle``'s rate from ``schedule`` now and at every boundary, forever.

    Wall time is ``start`` (default: now, local time) advanced by ``clock``
    (default: the event loop's clock), so tests run it on trio's virtual clock.
    """
    clock = clock or anyio.current_time
    start = start or datetime.now()
    t0 = clock()

    def now() -> datetime:
        return start + timedelta(seconds=clock() - t0)

    current: object = object()
    while True:
        wall = now()
        rate = rate_at(schedule, wall, fallback)
        if rate != current:
            throttle.set_rate(rate * 1024 if rate else None)
            if on_change is not None:
                on_change(rate)
            current = rate
        boundary = next_boundary(schedule, wall)
        if boundary is None:
            await anyio.sleep_forever()
            return  # pragma: no cover
        # A hair past the edge, so the new window already holds when we wake.
        await anyio.sleep((boundary - wall).total_seconds() + 0.001)
