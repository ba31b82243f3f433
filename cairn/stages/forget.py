"""``forget`` policy: which snapshots to keep, and why — restic's rules, as pure functions.

The bucket logic follows restic's ``internal/restic/snapshot_policy.go`` (see
``docs/forget.md``): snapshots are walked newest first; each ``--keep-<unit> N``
bucket keeps a snapshot whenever its time falls in a different unit (hour, day,
ISO week, month, year) than the last one it kept, until N are kept (N = -1: no
limit); the oldest snapshot is also kept by a bucket that still has counts left.
``--keep-within D`` keeps everything newer than the newest snapshot minus D;
``--keep-within-<unit> D`` applies the unit buckets, without a count, inside D.
``--keep-tag`` keeps snapshots carrying all tags of one of the given lists.

Time enters only through arguments: ``now`` (for "the newest snapshot not in the
future") and ``tz`` (in which the wall-clock units are counted).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo

_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?$")


@dataclass(frozen=True)
class Duration:
    """restic's ``--keep-within`` duration: ``1y2m3d4h`` (years, months, days, hours)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse ``[Ny][Nm][Nd][Nh]`` (at least one part); ``ValueError`` otherwise."""
        m = _DURATION.match(text.strip())
        if not text.strip() or m is None:
            raise ValueError(f"invalid duration {text!r}: use e.g. 1y2m3d4h")
        return cls(*(int(g or 0) for g in m.groups()))

    @property
    def zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def __str__(self) -> str:
        parts = [(self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")]
        return "".join(f"{n}{u}" for n, u in parts if n) or "0h"

    def before(self, t: datetime) -> datetime:
        """``t`` minus this duration, as Go's ``t.AddDate(-y, -m, -d).Add(-h hours)``.

        ``AddDate`` works on the wall clock and normalises overflowing days (March 31
        minus one month is March 3 in a non-leap year), which is reproduced here.
        """
        month0 = t.year * 12 + (t.month - 1) - self.years * 12 - self.months
        year, month = divmod(month0, 12)
        first = t.replace(year=year, month=month + 1, day=1)
        shifted = first + timedelta(days=t.day - 1 - self.days)
        return shifted - timedelta(hours=self.hours)


@dataclass(frozen=True)
class Policy:
    """The ``--keep-*`` options; counts of -1 mean "all"."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration = Duration()
    within_hourly: Duration = Duration()
    within_daily: Duration = Duration()
    within_weekly: Duration = Duration()
    within_monthly: Duration = Duration()
    within_yearly: Duration = Duration()
    tags: tuple[tuple[str, ...], ...] = ()

    @property
    def empty(self) -> bool:
        """No rule at all: ``forget`` then removes nothing (restic 0.14)."""
        return not self.tags and self == Policy()


@dataclass(frozen=True)
class SnapshotInfo:
    """What the policy looks at: ID, time (aware), tags."""

    id: str
    time: datetime
    tags: tuple[str, ...] = ()


@dataclass
class Decision:
    """One snapshot's fate: kept (with reasons and the counters after it) or removed."""

    snapshot: SnapshotInfo
    keep: bool
    reasons: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)


def _hour(t: datetime, _nr: int) -> int:
    return t.year * 1_000_000 + t.month * 10_000 + t.day * 100 + t.hour


def _day(t: datetime, _nr: int) -> int:
    return t.year * 10_000 + t.month * 100 + t.day


def _week(t: datetime, _nr: int) -> int:
    year, week, _ = t.isocalendar()
    return year * 100 + week


def _month(t: datetime, _nr: int) -> int:
    return t.year * 100 + t.month


def _year(t: datetime, _nr: int) -> int:
    return t.year


def _always(_t: datetime, nr: int) -> int:
    return nr


Bucketer = Callable[[datetime, int], int]
COUNTER_NAMES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def _latest(snaps: Sequence[SnapshotInfo], now: datetime) -> datetime | None:
    """The newest snapshot time that is not in the future (None: all are)."""
    times = [s.time for s in snaps if s.time < now]
    return max(times) if times else None


def apply_policy(
    snapshots: Sequence[SnapshotInfo], policy: Policy, *, now: datetime, tz: tzinfo
) -> list[Decision]:
    """Decide for each snapshot of one group; the result is sorted newest first."""
    ordered = sorted(snapshots, key=lambda s: s.time, reverse=True)  # stable, like Go's
    if policy.empty:
        return [Decision(s, True, ["policy is empty"]) for s in ordered]
    if not ordered:
        return []
    counts = [
        policy.last,
        policy.hourly,
        policy.daily,
        policy.weekly,
        policy.monthly,
        policy.yearly,
    ]
    buckers: list[Bucketer] = [_always, _hour, _day, _week, _month, _year]
    reasons = [
        "last snapshot",
        "hourly snapshot",
        "daily snapshot",
        "weekly snapshot",
        "monthly snapshot",
        "yearly snapshot",
    ]
    lasts: list[int | None] = [None] * 6
    within = [
        policy.within_hourly,
        policy.within_daily,
        policy.within_weekly,
        policy.within_monthly,
        policy.within_yearly,
    ]
    within_reasons = [
        "hourly within",
        "daily within",
        "weekly within",
        "monthly within",
        "yearly within",
    ]
    within_lasts: list[int | None] = [None] * 5
    latest = _latest(ordered, now)

    def inside(d: Duration, t: datetime) -> bool:
        # Go's zero time is before everything: with no usable latest, all are inside.
        return latest is None or t > d.before(latest.astimezone(tz))

    out = []
    for nr, snap in enumerate(ordered):
        t = snap.time.astimezone(tz)
        why = [f"has tags {list(tl)}" for tl in policy.tags if set(tl) <= set(snap.tags)]
        if not policy.within.zero and inside(policy.within, t):
            why.append(f"within {policy.within}")
        for i in range(6):
            if counts[i] > 0 or counts[i] == -1:
                val = buckers[i](t, nr)
                if val != lasts[i] or nr == len(ordered) - 1:
                    lasts[i] = val
                    if counts[i] > 0:
                        counts[i] -= 1
                    why.append(reasons[i])
        for i, d in enumerate(within):
            if not d.zero and inside(d, t):
                val = buckers[i + 1](t, nr)
                if val != within_lasts[i]:
                    within_lasts[i] = val
                    why.append(f"{within_reasons[i]} {d}")
        if why:
            counters = {n: c for n, c in zip(COUNTER_NAMES, counts, strict=True) if c}
            out.append(Decision(snap, True, why, counters))
        else:
            out.append(Decision(snap, False))
    return out


def group_key(
    group_by: Sequence[str], host: str, paths: Sequence[str], tags: Sequence[str]
) -> tuple[tuple[str, object], ...]:
    """The ``--group-by`` key of a snapshot (restic sorts paths and tags)."""
    key: list[tuple[str, object]] = []
    for name in group_by:
        if name == "host":
            key.append(("host", host))
        elif name == "paths":
            key.append(("paths", tuple(sorted(paths))))
        elif name == "tags":
            key.append(("tags", tuple(sorted(tags))))
        else:
            raise ValueError(f"unknown group-by field {name!r} (use host, paths, tags)")
    return tuple(key)


def parse_group_by(text: str) -> list[str]:
    """``host,paths`` → ``["host", "paths"]``; validates the names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    group_key(names, "", (), ())  # raises on unknown names
    return names
