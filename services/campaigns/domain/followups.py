"""Follow-up plans as data, and when their calls are due. Pure: no I/O.

A plan aims at a local day of the member's store (three days after the
first purchase, the birthday, ...); the call is due at the start of the
first call window at or after that day, in the store's IANA time zone.
Windows are wall-clock times, so a window that falls in a daylight-saving
gap begins when the gap ends (or does not exist that day, when the gap
swallows it), and an ambiguous wall time means its first occurrence.
"""

from __future__ import annotations

import calendar
import datetime as dt
import enum
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from chassis.errors import FieldViolation, InvalidArgument

UTC = dt.UTC


class PlanKind(enum.StrEnum):
    THREE_THREE_THREE = "three_three_three"
    BIRTHDAY = "birthday"
    WIN_BACK = "win_back"
    POST_PURCHASE = "post_purchase"
    # Not a plan: a call another service asked for (CreateFollowUpTask).
    REQUESTED = "requested"


class TaskState(enum.StrEnum):
    SCHEDULED = "scheduled"
    DUE = "due"
    COMPLETED = "completed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


OPEN_STATES = frozenset({TaskState.SCHEDULED, TaskState.DUE})


class Outcome(enum.StrEnum):
    REACHED = "reached"
    NO_ANSWER = "no_answer"
    CALL_BACK = "call_back"
    DECLINED = "declined"
    WRONG_NUMBER = "wrong_number"


SKIP_NO_PHONE_CONSENT = "NO_PHONE_CONSENT"


@dataclass(frozen=True, order=True)
class CallWindow:
    start: dt.time
    end: dt.time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


DEFAULT_WINDOWS = (
    CallWindow(dt.time(11, 0), dt.time(12, 0)),
    CallWindow(dt.time(16, 0), dt.time(17, 0)),
)
DEFAULT_WIN_BACK_DAYS = 90
DEFAULT_POST_PURCHASE_DAYS = 3
MAX_DAYS = 3660
# A week of days without a usable window means the windows are broken.
SEARCH_DAYS = 8

_PLAN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Plan:
    plan_id: str
    kind: PlanKind
    display_name: str = ""
    enabled: bool = True
    days: int = 0
    category: str = ""
    # Empty: DEFAULT_WINDOWS.
    windows: tuple[CallWindow, ...] = field(default=())

    @property
    def call_windows(self) -> tuple[CallWindow, ...]:
        return self.windows or DEFAULT_WINDOWS


DEFAULT_PLANS = (
    Plan("three-three-three", PlanKind.THREE_THREE_THREE, "3+3+3 新客回访"),
    Plan("birthday", PlanKind.BIRTHDAY, "生日关怀"),
    Plan("win-back", PlanKind.WIN_BACK, "沉睡唤醒", days=DEFAULT_WIN_BACK_DAYS),
)


def parse_time(text: str) -> dt.time | None:
    found = _HHMM.match(text.strip())
    return None if found is None else dt.time(int(found[1]), int(found[2]))


def parse_windows(
    pairs: Sequence[tuple[str, str]], field_name: str = "plan.call_windows"
) -> tuple[CallWindow, ...]:
    """Windows from ("HH:MM", "HH:MM") pairs: each ends after it starts and
    none overlaps another."""
    windows: list[CallWindow] = []
    violations: list[FieldViolation] = []
    for index, (start_text, end_text) in enumerate(pairs):
        start, end = parse_time(start_text), parse_time(end_text)
        if start is None or end is None:
            violations.append(FieldViolation(f"{field_name}[{index}]", "HH:MM to HH:MM"))
        elif end <= start:
            violations.append(FieldViolation(f"{field_name}[{index}]", "must end after it starts"))
        else:
            windows.append(CallWindow(start, end))
    windows.sort()
    for before, after in itertools.pairwise(windows):
        if after.start < before.end:
            violations.append(FieldViolation(field_name, "windows must not overlap"))
            break
    if violations:
        raise InvalidArgument(violations)
    return tuple(windows)


def validate_plan(plan: Plan) -> Plan:
    """The plan as stored: checked, with its kind's defaults filled in."""
    violations: list[FieldViolation] = []
    if not _PLAN_ID.match(plan.plan_id):
        violations.append(
            FieldViolation("plan.plan_id", "lower-case letters, digits, '-' or '_', at most 40")
        )
    if len(plan.display_name) > 100:
        violations.append(FieldViolation("plan.display_name", "at most 100 characters"))
    if not 0 <= plan.days <= MAX_DAYS:
        violations.append(FieldViolation("plan.days", f"0 to {MAX_DAYS}"))
    category = plan.category.strip()
    days = plan.days
    if plan.kind == PlanKind.POST_PURCHASE:
        if not category:
            violations.append(FieldViolation("plan.category", "required for post-purchase"))
        days = days or DEFAULT_POST_PURCHASE_DAYS
    elif category:
        violations.append(FieldViolation("plan.category", "only for post-purchase plans"))
    if plan.kind == PlanKind.WIN_BACK:
        days = days or DEFAULT_WIN_BACK_DAYS
    if plan.kind == PlanKind.THREE_THREE_THREE and days:
        violations.append(FieldViolation("plan.days", "the 3+3+3 plan has fixed offsets"))
    if len(category) > 64:
        violations.append(FieldViolation("plan.category", "at most 64 characters"))
    if violations:
        raise InvalidArgument(violations)
    return replace(plan, days=days, category=category, display_name=plan.display_name.strip())


def zone_of(time_zone: str) -> ZoneInfo:
    try:
        return ZoneInfo(time_zone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def add_months(day: dt.date, months: int) -> dt.date:
    """``day`` moved by whole months, clamped to the month's end (Nov 30 +
    3 months is Feb 28, or 29)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return dt.date(year, month + 1, min(day.day, last))


# The 3+3+3 plan: occasion -> (offset, reason).
THREE_THREE_THREE = (
    ("3d", "first purchase +3 days"),
    ("3w", "first purchase +3 weeks"),
    ("3m", "first purchase +3 months"),
)


def three_three_three_days(first_purchase: dt.date) -> list[tuple[str, str, dt.date]]:
    """The three calls after a first purchase: (occasion, reason, day)."""
    targets = {
        "3d": first_purchase + dt.timedelta(days=3),
        "3w": first_purchase + dt.timedelta(weeks=3),
        "3m": add_months(first_purchase, 3),
    }
    return [(occasion, reason, targets[occasion]) for occasion, reason in THREE_THREE_THREE]


def birthday_in(year: int, month: int, day: int) -> dt.date:
    """The birthday's date in ``year`` (29 February is 28 February in a
    common year)."""
    return dt.date(year, month, min(day, calendar.monthrange(year, month)[1]))


def local_day(at: dt.datetime, zone: ZoneInfo) -> dt.date:
    return at.astimezone(zone).date()


def first_instant(day: dt.date, wall: dt.time, zone: ZoneInfo) -> dt.datetime:
    """The first instant (UTC) at which the local clock reads ``wall`` or
    later on ``day``: the wall time itself when it exists (its first
    occurrence when ambiguous), else the end of the DST gap it falls in."""
    naive = dt.datetime.combine(day, wall)
    candidate = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if candidate.astimezone(zone).replace(tzinfo=None) == naive:
        # fold=0 is the first occurrence of an ambiguous wall time.
        return candidate
    # In a gap: fold=1 reads the wall time with the offset after the
    # transition, fold=0 with the one before; the transition lies between.
    low = min(candidate, naive.replace(tzinfo=zone, fold=1).astimezone(UTC))
    high = max(candidate, naive.replace(tzinfo=zone, fold=1).astimezone(UTC))
    while high - low > dt.timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(zone).replace(tzinfo=None) >= naive:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)


def window_bounds(
    day: dt.date, window: CallWindow, zone: ZoneInfo
) -> tuple[dt.datetime, dt.datetime] | None:
    """The window on ``day`` as UTC instants [start, end); None when a DST
    gap leaves nothing of it."""
    start = first_instant(day, window.start, zone)
    end = first_instant(day, window.end, zone)
    if end <= start or start.astimezone(zone).date() != day:
        return None
    return start, end


def due_time(
    target_day: dt.date,
    time_zone: str,
    windows: Sequence[CallWindow] = DEFAULT_WINDOWS,
    *,
    not_before: dt.datetime | None = None,
) -> dt.datetime:
    """When a call aimed at ``target_day`` is due: the start of the first
    call window at or after the start of that local day (and at or after
    ``not_before``; a ``not_before`` inside a window is kept as it is)."""
    zone = zone_of(time_zone)
    ordered = sorted(windows or DEFAULT_WINDOWS)
    day = target_day
    if not_before is not None:
        day = max(day, local_day(not_before, zone))
    for offset in range(SEARCH_DAYS):
        current = day + dt.timedelta(days=offset)
        for window in ordered:
            bounds = window_bounds(current, window, zone)
            if bounds is None:
                continue
            start, end = bounds
            if not_before is None or start >= not_before:
                return start
            if not_before < end:
                return not_before.astimezone(UTC)
    raise ValueError("no usable call window in a week")


def in_window(
    at: dt.datetime, time_zone: str, windows: Sequence[CallWindow] = DEFAULT_WINDOWS
) -> bool:
    zone = zone_of(time_zone)
    day = local_day(at, zone)
    for window in windows or DEFAULT_WINDOWS:
        bounds = window_bounds(day, window, zone)
        if bounds is not None and bounds[0] <= at < bounds[1]:
            return True
    return False


def snap(
    wanted: dt.datetime, time_zone: str, windows: Sequence[CallWindow] = DEFAULT_WINDOWS
) -> dt.datetime:
    """A rescheduled time moved into a call window: kept when inside one,
    else the start of the next window."""
    zone = zone_of(time_zone)
    return due_time(local_day(wanted, zone), time_zone, windows, not_before=wanted)


@dataclass(frozen=True)
class MemberFacts:
    """What members says of a member when a task is about to be created."""

    member_id: str
    home_store_id: str
    consultant_id: str
    phone_consent: bool
    birthday: dt.date | None
    active: bool = True


def phone_allowed(consent_granted: bool | None) -> bool:
    """A member who said no to phone calls is not called; a member who never
    said anything is (a follow-up of one's own purchase is service, not
    marketing) — only an explicit refusal skips."""
    return consent_granted is not False


def win_back_due(last_visit: dt.date, today: dt.date, days: int) -> bool:
    return (today - last_visit).days >= days


def win_back_occasion(last_visit: dt.date) -> str:
    """Once per lapse: a lapse is known by the visit it follows."""
    return f"lapse:{last_visit.isoformat()}"


def overdue(due: dt.datetime, now: dt.datetime) -> bool:
    return now - due > dt.timedelta(days=1)
