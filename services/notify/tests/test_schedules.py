"""The rules of time of scheduled messages: greeting days and instants on
both sides of UTC, 29 February, clock changes, the months a pass plans, and
the weekly digest's ISO weeks."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from services.notify.domain import schedules as rules

NINE = dt.time(9, 0)
SHANGHAI = "Asia/Shanghai"
MEXICO = "America/Mexico_City"
NEW_YORK = "America/New_York"
KIRITIMATI = "Pacific/Kiritimati"  # UTC+14
PAGO_PAGO = "Pacific/Pago_Pago"  # UTC-11


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC)


def test_the_leap_day_is_kept_on_28_february_in_other_years() -> None:
    assert rules.day_in_year(2027, 2, 29) == dt.date(2027, 2, 28)
    assert rules.day_in_year(2028, 2, 29) == dt.date(2028, 2, 29)
    assert rules.day_in_year(2100, 2, 29) == dt.date(2100, 2, 28)  # not a leap year
    assert rules.day_in_year(2027, 3, 1) == dt.date(2027, 3, 1)


@given(st.integers(1900, 2400), st.dates(dt.date(1904, 1, 1), dt.date(2000, 12, 31)))
def test_a_yearly_date_falls_in_its_own_month_every_year(year: int, born: dt.date) -> None:
    day = rules.day_in_year(year, born.month, born.day)
    assert (day.year, day.month) == (year, born.month)
    assert day.day == born.day or (born.month, born.day, day.day) == (2, 29, 28)


def test_greetings_at_nine_local_on_both_sides_of_utc() -> None:
    now = utc(2027, 3, 1)
    east = rules.greeting_on(
        rules.BIRTHDAY, (1990, 3, 15), 2027, at=NINE, time_zone=SHANGHAI, now=now
    )
    west = rules.greeting_on(
        rules.BIRTHDAY, (1985, 3, 15), 2027, at=NINE, time_zone=MEXICO, now=now
    )
    assert east is not None and west is not None
    # 09:00 in Shanghai (UTC+8) is 01:00 UTC; in Mexico City (UTC-6) 15:00.
    assert east.at == utc(2027, 3, 15, 1)
    assert west.at == utc(2027, 3, 15, 15)
    assert (east.years, west.years) == (37, 42)
    far_east = rules.greeting_on("x", (0, 3, 1), 2027, at=NINE, time_zone=KIRITIMATI, now=now)
    assert far_east is not None and far_east.at == utc(2027, 2, 28, 19)
    assert far_east.years is None


def test_a_greeting_across_a_clock_change_keeps_local_nine() -> None:
    # New York moves to summer time on 14 March 2027: 09:00 is 14:00 UTC the
    # day before and 13:00 UTC on the day.
    now = utc(2027, 3, 1)
    before = rules.greeting_on("b", (1990, 3, 13), 2027, at=NINE, time_zone=NEW_YORK, now=now)
    on = rules.greeting_on("b", (1990, 3, 14), 2027, at=NINE, time_zone=NEW_YORK, now=now)
    assert before is not None and on is not None
    assert (before.at, on.at) == (utc(2027, 3, 13, 14), utc(2027, 3, 14, 13))
    # 02:30 does not exist that night: it names the instant an hour later's wall time.
    skipped = rules.greeting_on(
        "b", (1990, 3, 14), 2027, at=dt.time(2, 30), time_zone=NEW_YORK, now=now
    )
    assert skipped is not None
    assert skipped.at.astimezone(ZoneInfo(NEW_YORK)).hour in (1, 3)


def test_no_greeting_for_a_day_gone_by_or_a_date_not_a_year_old() -> None:
    # 16 March has begun in Shanghai (00:30 local), not yet in Mexico City.
    now = utc(2027, 3, 15, 16, 30)
    assert rules.greeting_on("b", (1990, 3, 15), 2027, at=NINE, time_zone=SHANGHAI, now=now) is None
    late = rules.greeting_on("b", (1990, 3, 15), 2027, at=NINE, time_zone=MEXICO, now=now)
    assert late is not None and late.at < now  # still its day: sent at once
    assert rules.greeting_on("b", (2027, 3, 20), 2027, at=NINE, time_zone=MEXICO, now=now) is None
    assert rules.greeting_on("b", (1990, 2, 30), 2027, at=NINE, time_zone=MEXICO, now=now) is None


@given(
    st.dates(dt.date(2000, 1, 1), dt.date(2099, 12, 31)),
    st.sampled_from([SHANGHAI, MEXICO, NEW_YORK, KIRITIMATI, PAGO_PAGO, "UTC"]),
)
def test_every_greeting_is_planned_at_least_two_days_ahead(day: dt.date, time_zone: str) -> None:
    """Whatever the zone, the month of a greeting's local day is among the
    months planned from two days before its instant up to the instant: no
    greeting falls between two months' runs."""
    at = rules.local_instant(day, NINE, time_zone)
    for when in (at - dt.timedelta(days=2), at):
        assert (day.year, day.month) in rules.months_to_plan(when)


def test_the_next_month_is_planned_from_three_days_before_it() -> None:
    assert rules.months_to_plan(utc(2026, 12, 28, 23, 59)) == [(2026, 12)]
    assert rules.months_to_plan(utc(2026, 12, 29)) == [(2026, 12), (2027, 1)]
    assert rules.months_to_plan(utc(2027, 1, 1)) == [(2027, 1)]
    assert rules.month_key(2027, 1) == "2027-01"
    assert rules.parse_month_key("2027-01") == (2027, 1)


def test_iso_weeks_across_the_turn_of_the_year() -> None:
    assert rules.iso_week_key(dt.date(2026, 12, 28)) == "2026-W53"
    assert rules.iso_week_key(dt.date(2027, 1, 3)) == "2026-W53"
    assert rules.iso_week_key(dt.date(2027, 1, 4)) == "2027-W01"
    assert rules.iso_week_key(dt.date(2024, 12, 30)) == "2025-W01"


def test_the_digest_is_due_from_monday_nine_local() -> None:
    # Monday 1 March 2027, 09:00 in Shanghai is 01:00 UTC.
    assert rules.digest_due(utc(2027, 3, 1, 0, 59), SHANGHAI, 0, NINE) is None
    due = rules.digest_due(utc(2027, 3, 1, 1), SHANGHAI, 0, NINE)
    assert due is not None
    assert (due.week, due.day, due.at) == ("2027-W09", dt.date(2027, 3, 1), utc(2027, 3, 1, 1))
    assert due.until == utc(2027, 3, 8, 1)
    # Later in the week it is still this week's digest.
    assert rules.digest_due(utc(2027, 3, 5, 12), SHANGHAI, 0, NINE) == due
    # In Mexico City it is still Sunday then.
    sunday = rules.digest_due(utc(2027, 3, 1, 1), MEXICO, 0, NINE)
    assert sunday is not None and sunday.week == "2027-W08"
    # A Thursday digest is not due on Monday.
    assert rules.digest_due(utc(2027, 3, 1, 12), SHANGHAI, 3, NINE) is None


@given(
    st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2099, 12, 31), timezones=st.just(dt.UTC)),
    st.sampled_from([SHANGHAI, MEXICO, NEW_YORK, KIRITIMATI, PAGO_PAGO]),
    st.integers(0, 6),
)
def test_a_digest_once_due_is_the_week_of_its_local_day(
    now: dt.datetime, time_zone: str, weekday: int
) -> None:
    due = rules.digest_due(now, time_zone, weekday, NINE)
    if due is None:
        return
    assert due.at <= now < due.until + dt.timedelta(days=7)
    assert due.day.weekday() == weekday
    assert due.week == rules.iso_week_key(due.day)
    local = due.at.astimezone(ZoneInfo(time_zone))
    assert (local.date(), local.hour, local.minute) == (due.day, 9, 0)


def test_the_call_list_in_local_time_with_member_numbers_only() -> None:
    lines = [
        rules.CallLine(utc(2027, 3, 2, 8), "M2", "3d"),
        rules.CallLine(utc(2027, 3, 1, 3), "M1", "birthday"),
    ]
    assert rules.call_list(lines, SHANGHAI) == "03-01 11:00 M1 birthday\n03-02 16:00 M2 3d"
    many = [rules.CallLine(utc(2027, 3, 1, 3), f"M{i:03d}", "") for i in range(60)]
    text = rules.call_list(many, SHANGHAI).splitlines()
    assert len(text) == rules.MAX_DIGEST_LINES + 1
    assert text[-1] == "+10"
