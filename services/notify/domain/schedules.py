"""The rules of time of scheduled messages: which day a birthday or an
anniversary falls on in a given year, the local instant of a greeting, which
months a planning pass covers, and when a store's weekly digest is due.
Pure: no I/O.

Days are local to the member's (or the store's) home store; instants are
UTC. A greeting is planned for the local day it falls on, at the policy's
greeting time in the store's zone."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from services.notify.domain.policy import local_instant, zone

BIRTHDAY = "birthday"
ANNIVERSARY = "anniversary"
WEEKLY_CALL_DIGEST = "weekly_call_digest"
# The anniversary kind of the day a member joined.
ENROLLMENT = "enrollment"

# How many days before a month begins its greetings are planned, so that a
# greeting on the 1st in a zone far ahead of UTC is written in time, and a
# worker that was down for a day still plans it.
PLANNING_LEAD_DAYS = 3


def day_in_year(year: int, month: int, day: int) -> dt.date:
    """The day a yearly date falls on in ``year``: 29 February is kept on
    28 February in the years without it."""
    if month == 2 and day == 29:
        try:
            return dt.date(year, 2, 29)
        except ValueError:
            return dt.date(year, 2, 28)
    return dt.date(year, month, day)


def month_key(year: int, month: int) -> str:
    return f"{year:04d}-{month:02d}"


def parse_month_key(key: str) -> tuple[int, int]:
    year, month = key.split("-")
    return int(year), int(month)


def next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def months_to_plan(now: dt.datetime, lead_days: int = PLANNING_LEAD_DAYS) -> list[tuple[int, int]]:
    """The months whose greetings a pass at ``now`` plans: the month it is
    in UTC, and the next one from ``lead_days`` before it begins (UTC). The
    local day of a greeting may differ from its UTC day by one either way;
    the lead covers the zones ahead of UTC, and the current month is planned
    until its end for those behind."""
    utc = now.astimezone(dt.UTC)
    this = (utc.year, utc.month)
    following = next_month(*this)
    starts = dt.datetime(*following, 1, tzinfo=dt.UTC)
    if utc >= starts - dt.timedelta(days=lead_days):
        return [this, following]
    return [this]


def local_day(now: dt.datetime, time_zone: str) -> dt.date:
    return now.astimezone(zone(time_zone)).date()


@dataclass(frozen=True)
class Greeting:
    """One greeting to plan: what, on which local day, at which instant."""

    kind: str
    day: dt.date
    at: dt.datetime
    # Whole years since the original date; None when its year is unknown.
    years: int | None = None


def greeting_on(
    kind: str,
    original: tuple[int, int, int],
    year: int,
    *,
    at: dt.time,
    time_zone: str,
    now: dt.datetime,
) -> Greeting | None:
    """The greeting of a yearly date ``original`` (year may be 0: unknown)
    in ``year``, at ``at`` local time; None when its local day has passed
    at ``now`` (a greeting is never sent late), or when ``year`` is not
    after the original year (a date not yet one year old)."""
    o_year, o_month, o_day = original
    if o_year and year <= o_year:
        return None
    try:
        day = day_in_year(year, o_month, o_day)
    except ValueError:
        return None
    if day < local_day(now, time_zone):
        return None
    return Greeting(
        kind=kind,
        day=day,
        at=local_instant(day, at, time_zone),
        years=year - o_year if o_year else None,
    )


# --- the weekly digest ---------------------------------------------------


def iso_week_key(day: dt.date) -> str:
    """ "2026-W01": ISO 8601 week numbering (weeks start on Monday; week 1
    holds the year's first Thursday, so 29 December may be in the next
    year's week 1 and 1 January in the last year's week 53)."""
    year, week, _ = day.isocalendar()
    return f"{year:04d}-W{week:02d}"


@dataclass(frozen=True)
class DigestDue:
    week: str
    # The local day it is due on.
    day: dt.date
    # When the digest is due (UTC), and the end of the week it looks at.
    at: dt.datetime
    until: dt.datetime


def digest_due(now: dt.datetime, time_zone: str, weekday: int, at: dt.time) -> DigestDue | None:
    """This local week's digest of a store, when it is due at ``now``: the
    week's ``weekday`` (0 = Monday) at ``at`` local time has come. None
    before then (last week's digest is not sent late)."""
    today = local_day(now, time_zone)
    monday = today - dt.timedelta(days=today.weekday())
    day = monday + dt.timedelta(days=weekday)
    due = local_instant(day, at, time_zone)
    if now < due:
        return None
    return DigestDue(
        week=iso_week_key(day),
        day=day,
        at=due,
        until=local_instant(day + dt.timedelta(days=7), at, time_zone),
    )


@dataclass(frozen=True)
class CallLine:
    """One call on a digest: when, whom (the member number, never a name),
    why."""

    due: dt.datetime
    member_id: str
    reason: str


MAX_DIGEST_LINES = 50


def call_list(lines: list[CallLine], time_zone: str, total: int | None = None) -> str:
    """The calls as text, one line each in local time, earliest first; at
    most MAX_DIGEST_LINES and then how many more there are."""
    tz = zone(time_zone)
    shown = sorted(lines, key=lambda line: (line.due, line.member_id))[:MAX_DIGEST_LINES]
    text = [
        f"{line.due.astimezone(tz):%m-%d %H:%M} {line.member_id} {line.reason}".rstrip()
        for line in shown
    ]
    more = (total if total is not None else len(lines)) - len(shown)
    if more > 0:
        text.append(f"+{more}")
    return "\n".join(text)
