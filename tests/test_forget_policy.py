"""The forget policy (restic's bucket rules): table tests and properties."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cairn.stages.forget import Duration, Policy, SnapshotInfo, apply_policy, parse_group_by

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def snaps(*times: str, tags: dict[int, tuple[str, ...]] | None = None) -> list[SnapshotInfo]:
    return [
        SnapshotInfo(
            f"s{i}", datetime.fromisoformat(t).replace(tzinfo=UTC), (tags or {}).get(i, ())
        )
        for i, t in enumerate(times)
    ]


def kept(policy: Policy, items: list[SnapshotInfo], now: datetime = NOW) -> list[str]:
    return [d.snapshot.id for d in apply_policy(items, policy, now=now, tz=UTC) if d.keep]


HOURLY_DAY = snaps(*(f"2026-05-10T{h:02d}:{m:02d}" for h in range(0, 24, 3) for m in (0, 30)))
DAYS = snaps(*(f"2026-05-{d:02d}T10:00" for d in range(1, 31)))


@pytest.mark.parametrize(
    ("policy", "items", "expected"),
    [
        (Policy(last=3), DAYS, ["s29", "s28", "s27"]),
        (Policy(last=-1), DAYS[:4], ["s3", "s2", "s1", "s0"]),
        # Newest of each of the last 2 days.
        (
            Policy(daily=2),
            snaps("2026-05-01T01:00", "2026-05-02T01:00", "2026-05-02T05:00", "2026-05-03T01:00"),
            ["s3", "s2"],
        ),
        # Counts left at the oldest snapshot: it is kept too (longest history).
        (
            Policy(daily=5),
            snaps("2026-05-01T01:00", "2026-05-01T02:00", "2026-05-02T01:00"),
            ["s2", "s1", "s0"],
        ),
        (Policy(hourly=3), HOURLY_DAY, ["s15", "s13", "s11"]),
        # ISO weeks: 2026-01-01 (Thu) is week 1 of 2026, 2025-12-28 (Sun) week 52 of 2025.
        (
            Policy(weekly=2),
            snaps("2025-12-28T10:00", "2025-12-29T10:00", "2026-01-01T10:00", "2026-01-05T10:00"),
            ["s3", "s2"],
        ),
        (
            Policy(weekly=3),
            snaps(
                "2025-12-21T10:00",
                "2025-12-28T10:00",
                "2025-12-29T10:00",
                "2026-01-01T10:00",
                "2026-01-05T10:00",
            ),
            ["s4", "s3", "s1"],
        ),
        (
            Policy(monthly=2, yearly=2),
            snaps("2024-12-31T10:00", "2025-11-01T10:00", "2025-12-01T10:00", "2025-12-15T10:00"),
            ["s3", "s1", "s0"],
        ),
        # Within 2 days of the newest snapshot (not of now).
        (Policy(within=Duration(days=2)), DAYS, ["s29", "s28"]),
        (Policy(within=Duration(days=2, hours=1)), DAYS, ["s29", "s28", "s27"]),
        (
            Policy(tags=(("keep",),)),
            snaps("2026-05-01", "2026-05-02", tags={0: ("keep", "x")}),
            ["s0"],
        ),
        (Policy(tags=(("a", "b"),)), snaps("2026-05-01", "2026-05-02", tags={0: ("a",)}), []),
        (
            Policy(within_daily=Duration(days=3)),
            snaps("2026-05-01T10:00", "2026-05-02T10:00", "2026-05-02T11:00", "2026-05-03T10:00"),
            ["s3", "s2", "s0"],
        ),
        (Policy(), DAYS[:3], ["s2", "s1", "s0"]),
    ],
)
def test_policy_table(policy: Policy, items: list[SnapshotInfo], expected: list[str]) -> None:
    assert kept(policy, items) == expected


def test_reasons_and_counters() -> None:
    decisions = apply_policy(DAYS[-3:], Policy(last=1, daily=2), now=NOW, tz=UTC)
    assert [d.reasons for d in decisions] == [
        ["last snapshot", "daily snapshot"],
        ["daily snapshot"],
        [],
    ]
    assert decisions[0].counters == {"daily": 1}
    assert decisions[1].counters == {}
    empty = apply_policy(DAYS[:1], Policy(), now=NOW, tz=UTC)
    assert empty[0].reasons == ["policy is empty"]


def test_future_snapshots_do_not_anchor_within() -> None:
    items = snaps("2026-05-30T10:00", "2026-05-31T10:00", "2027-01-01T00:00")
    # The newest not in the future is 05-31; the future one is after it, so inside.
    assert kept(Policy(within=Duration(hours=12)), items) == ["s2", "s1"]


def test_days_are_counted_in_the_given_timezone() -> None:
    from zoneinfo import ZoneInfo

    items = snaps("2026-05-01T23:30", "2026-05-02T00:30")
    assert len([d for d in apply_policy(items, Policy(daily=-1), now=NOW, tz=UTC) if d.keep]) == 2
    tokyo = ZoneInfo("Asia/Tokyo")  # both are May 2 there; the oldest is still kept
    decisions = apply_policy(items, Policy(daily=-1), now=NOW, tz=tokyo)
    assert [d.reasons for d in decisions] == [["daily snapshot"], ["daily snapshot"]]
    decisions = apply_policy(items, Policy(within_daily=Duration(days=5)), now=NOW, tz=tokyo)
    assert [d.keep for d in decisions] == [True, False]


def test_duration_parsing_and_go_adddate() -> None:
    assert Duration.parse("1y2m3d4h") == Duration(1, 2, 3, 4)
    assert Duration.parse("36h") == Duration(hours=36)
    for bad in ("", "1w", "h", "3d1y"):
        with pytest.raises(ValueError):
            Duration.parse(bad)
    t = datetime(2023, 3, 31, 12, tzinfo=UTC)
    assert Duration(months=1).before(t) == datetime(2023, 3, 3, 12, tzinfo=UTC)
    assert Duration(years=1, days=31).before(t) == datetime(2022, 2, 28, 12, tzinfo=UTC)
    assert Duration(days=1, hours=13).before(t) == datetime(2023, 3, 29, 23, tzinfo=UTC)
    assert str(Duration(1, 0, 3, 0)) == "1y3d"


def test_group_by_names() -> None:
    assert parse_group_by("host,paths") == ["host", "paths"]
    assert parse_group_by("") == []
    with pytest.raises(ValueError):
        parse_group_by("host,colour")


# -- properties ----------------------------------------------------------------------

times = st.lists(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2026, 5, 31)).map(
        lambda t: t.replace(tzinfo=UTC)
    ),
    min_size=0,
    max_size=40,
)
counts = st.integers(min_value=-1, max_value=6)
durations = st.builds(
    Duration, st.integers(0, 2), st.integers(0, 14), st.integers(0, 40), st.integers(0, 48)
)
policies = st.builds(
    Policy,
    last=counts,
    hourly=counts,
    daily=counts,
    weekly=counts,
    monthly=counts,
    yearly=counts,
    within=durations,
    within_daily=durations,
    within_weekly=durations,
)


def _infos(ts: list[datetime]) -> list[SnapshotInfo]:
    return [SnapshotInfo(f"s{i}", t) for i, t in enumerate(ts)]


@settings(max_examples=200, deadline=None)
@given(times, policies)
def test_every_snapshot_is_decided_once_with_reasons(ts: list[datetime], policy: Policy) -> None:
    decisions = apply_policy(_infos(ts), policy, now=NOW, tz=UTC)
    assert sorted(d.snapshot.id for d in decisions) == sorted(f"s{i}" for i in range(len(ts)))
    assert [d.snapshot.time for d in decisions] == sorted(ts, reverse=True)
    assert all(bool(d.reasons) == d.keep for d in decisions)


@settings(max_examples=200, deadline=None)
@given(times, policies, st.sampled_from(["last", "hourly", "daily", "weekly", "monthly", "yearly"]))
def test_raising_a_count_keeps_a_superset(ts: list[datetime], policy: Policy, name: str) -> None:
    before = set(kept(policy, _infos(ts)))
    value = getattr(policy, name)
    bigger = Policy(**{**policy.__dict__, name: -1 if value == -1 else value + 1})
    assert before <= set(kept(bigger, _infos(ts)))


@settings(max_examples=200, deadline=None)
@given(times, st.integers(1, 10))
def test_keep_last_keeps_exactly_the_newest(ts: list[datetime], n: int) -> None:
    ordered = [d.snapshot.id for d in apply_policy(_infos(ts), Policy(last=n), now=NOW, tz=UTC)]
    # Counts run out before the oldest when there are more than n: no extra one kept.
    assert kept(Policy(last=n), _infos(ts)) == ordered[:n]


@settings(max_examples=200, deadline=None)
@given(times)
def test_daily_all_keeps_newest_per_day_plus_oldest(ts: list[datetime]) -> None:
    decisions = apply_policy(_infos(ts), Policy(daily=-1), now=NOW, tz=UTC)
    days_seen: set[object] = set()
    for i, d in enumerate(decisions):
        day = d.snapshot.time.date()
        expected = day not in days_seen or i == len(decisions) - 1
        days_seen.add(day)
        assert d.keep == expected


@settings(max_examples=100, deadline=None)
@given(times, durations)
def test_within_keeps_a_suffix_in_time(ts: list[datetime], d: Duration) -> None:
    decisions = apply_policy(_infos(ts), Policy(within=d), now=NOW, tz=UTC)
    flags = [x.keep for x in decisions]  # newest first: kept ones come first
    assert flags == sorted(flags, reverse=True)
    if ts and not d.zero:
        assert flags[0]
