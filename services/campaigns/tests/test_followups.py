"""Follow-up plans' pure rules: plan validation, the 3+3+3 offsets (month
ends), and call-window scheduling across time zones and DST changes."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from services.campaigns.domain import followups as d
from services.campaigns.domain.followups import CallWindow, Plan, PlanKind

UTC = dt.UTC
ZONES = (
    "Asia/Shanghai",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Pacific/Chatham",
    "Asia/Kolkata",
    "UTC",
)


def at(zone: str, *args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=ZoneInfo(zone)).astimezone(UTC)  # type: ignore[misc]


def test_due_is_the_first_window_of_the_target_day_in_the_stores_zone() -> None:
    day = dt.date(2026, 3, 10)
    assert d.due_time(day, "Asia/Shanghai") == at("Asia/Shanghai", 2026, 3, 10, 11)
    assert d.due_time(day, "America/New_York") == at("America/New_York", 2026, 3, 10, 11)
    # Later that day: the afternoon window; after it, the next morning.
    noon = at("Asia/Shanghai", 2026, 3, 10, 12, 30)
    assert d.due_time(day, "Asia/Shanghai", not_before=noon) == at("Asia/Shanghai", 2026, 3, 10, 16)
    evening = at("Asia/Shanghai", 2026, 3, 10, 18)
    assert d.due_time(day, "Asia/Shanghai", not_before=evening) == at(
        "Asia/Shanghai", 2026, 3, 11, 11
    )
    # Inside a window: kept.
    inside = at("Asia/Shanghai", 2026, 3, 10, 16, 20)
    assert d.due_time(day, "Asia/Shanghai", not_before=inside) == inside


def test_a_window_in_a_dst_gap_starts_when_the_gap_ends() -> None:
    early = (CallWindow(dt.time(2, 0), dt.time(4, 0)),)
    # New York springs forward at 02:00 on 8 March 2026: 02:00-03:00 does not exist.
    due = d.due_time(dt.date(2026, 3, 8), "America/New_York", early)
    assert due == at("America/New_York", 2026, 3, 8, 3)
    assert due.astimezone(ZoneInfo("America/New_York")).hour == 3
    # A window the gap swallows whole is not there that day.
    gone = (CallWindow(dt.time(2, 0), dt.time(3, 0)),)
    due = d.due_time(dt.date(2026, 3, 8), "America/New_York", gone)
    assert due == at("America/New_York", 2026, 3, 9, 2)


def test_an_ambiguous_window_start_is_its_first_occurrence() -> None:
    late = (CallWindow(dt.time(1, 0), dt.time(2, 0)),)
    # New York falls back at 02:00 EDT on 1 November 2026.
    due = d.due_time(dt.date(2026, 11, 1), "America/New_York", late)
    assert due == dt.datetime(2026, 11, 1, 5, 0, tzinfo=UTC)  # 01:00 EDT


def test_three_three_three_offsets_are_month_end_safe() -> None:
    got = d.three_three_three_days(dt.date(2026, 11, 30))
    assert [(o, day) for o, _, day in got] == [
        ("3d", dt.date(2026, 12, 3)),
        ("3w", dt.date(2026, 12, 21)),
        ("3m", dt.date(2027, 2, 28)),
    ]
    assert d.add_months(dt.date(2027, 11, 30), 3) == dt.date(2028, 2, 29)
    assert d.add_months(dt.date(2026, 10, 31), 3) == dt.date(2027, 1, 31)
    assert d.birthday_in(2027, 2, 29) == dt.date(2027, 2, 28)


def test_snap_moves_a_time_into_the_next_window() -> None:
    wanted = at("Europe/London", 2026, 6, 1, 9, 15)
    assert d.snap(wanted, "Europe/London") == at("Europe/London", 2026, 6, 1, 11)
    inside = at("Europe/London", 2026, 6, 1, 11, 40)
    assert d.snap(inside, "Europe/London") == inside


def test_plans_are_validated_with_their_kinds_defaults() -> None:
    win_back = d.validate_plan(Plan("lapsed", PlanKind.WIN_BACK))
    assert win_back.days == d.DEFAULT_WIN_BACK_DAYS
    care = d.validate_plan(Plan("serum-care", PlanKind.POST_PURCHASE, category="serum"))
    assert care.days == d.DEFAULT_POST_PURCHASE_DAYS
    with pytest.raises(InvalidArgument) as refused:
        d.validate_plan(Plan("Bad Id", PlanKind.POST_PURCHASE, days=-1))
    assert {v.field for v in refused.value.violations} == {
        "plan.plan_id",
        "plan.days",
        "plan.category",
    }
    with pytest.raises(InvalidArgument):
        d.parse_windows([("11:00", "12:00"), ("11:30", "13:00")])
    with pytest.raises(InvalidArgument):
        d.parse_windows([("12:00", "11:00")])
    assert d.parse_windows([("16:00", "17:00"), ("09:30", "10:00")]) == (
        CallWindow(dt.time(9, 30), dt.time(10, 0)),
        CallWindow(dt.time(16, 0), dt.time(17, 0)),
    )


def test_only_an_explicit_refusal_skips_the_call() -> None:
    assert d.phone_allowed(None) and d.phone_allowed(True)
    assert not d.phone_allowed(False)


@st.composite
def windows(draw: st.DrawFn) -> tuple[CallWindow, ...]:
    minutes = sorted(draw(st.sets(st.integers(0, 24 * 60 - 1), min_size=2, max_size=6).map(sorted)))
    pairs = list(zip(minutes[::2], minutes[1::2], strict=False))
    return (
        tuple(
            CallWindow(dt.time(a // 60, a % 60), dt.time(b // 60, b % 60))
            for a, b in pairs
            if b > a
        )
        or d.DEFAULT_WINDOWS
    )


@settings(max_examples=300, deadline=None)
@given(
    day=st.dates(dt.date(2024, 1, 1), dt.date(2030, 12, 31)),
    zone=st.sampled_from(ZONES),
    chosen=windows(),
    offset_minutes=st.one_of(st.none(), st.integers(-3 * 24 * 60, 3 * 24 * 60)),
)
def test_a_due_time_is_always_inside_a_window_and_never_before_the_target_day(
    day: dt.date,
    zone: str,
    chosen: tuple[CallWindow, ...],
    offset_minutes: int | None,
) -> None:
    tz = ZoneInfo(zone)
    not_before = None
    if offset_minutes is not None:
        not_before = dt.datetime.combine(day, dt.time(12), tzinfo=tz).astimezone(
            UTC
        ) + dt.timedelta(minutes=offset_minutes)
    due = d.due_time(day, zone, chosen, not_before=not_before)
    assert d.in_window(due, zone, chosen)
    assert due.astimezone(tz).date() >= day
    if not_before is not None:
        assert due >= not_before
    local = due.astimezone(tz)
    assert any(w.start <= local.time().replace(tzinfo=None) < w.end for w in chosen) or (
        # A window that opens in a DST gap starts when the gap ends.
        local.utcoffset() != (local - dt.timedelta(hours=3)).utcoffset()
    )
    # Nothing earlier qualifies: no window start between the target and the due time.
    if not_before is None:
        assert due == min(
            bounds[0]
            for offset in range(d.SEARCH_DAYS)
            for w in chosen
            if (bounds := d.window_bounds(day + dt.timedelta(days=offset), w, tz)) is not None
        )


@settings(max_examples=200, deadline=None)
@given(
    wanted=st.datetimes(dt.datetime(2024, 1, 1), dt.datetime(2030, 12, 31), timezones=st.just(UTC)),
    zone=st.sampled_from(ZONES),
)
def test_a_snapped_time_is_inside_a_window_and_not_earlier(wanted: dt.datetime, zone: str) -> None:
    snapped = d.snap(wanted, zone)
    assert snapped >= wanted
    assert d.in_window(snapped, zone)
    if d.in_window(wanted, zone):
        assert snapped == wanted
