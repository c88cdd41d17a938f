"""Points: the rules of the lot ledger, the chain's points policy and
points as cash. Pure: no I/O.

A member's points are lots. A lot has a source, when it was earned, when it
expires (decided once, by the policy in force when it was earned) and what
is left of it. Spending, transfers, reversals and negative adjustments take
the lots that expire first; a transfer gives the receiver lots with the
expiry dates of the lots it took, so it never extends validity; nothing but
a gain (a purchase, a bonus, a conversion, an adjustment, a refunded spend)
creates points. Points held for a sale in progress are counted on the lots
that expire first and do not expire while held.
"""

from __future__ import annotations

import calendar
import datetime as dt
import enum
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, Violations
from chassis.ids import random_id

# More than any member will hold; sums of many stay well inside 64 bits.
MAX_POINTS = 10**9
MAX_REASON_LENGTH = 200
MAX_REFERENCE_LENGTH = 100
MAX_EXPIRY_MONTHS = 120
MAX_WARNING_DAYS = 365
MAX_RATE = 10**6
FULL_SHARE_BPS = 10_000


def _new_id(letter: str) -> str:
    return random_id(letter, 15)


def new_lot_id() -> str:
    return _new_id("L")


def new_movement_id() -> str:
    return _new_id("P")


def new_redemption_id() -> str:
    return _new_id("R")


@dataclass(frozen=True)
class Stamp:
    """Who made a change, from which store (empty when not a store's), and
    when. Every movement is stamped."""

    principal: str
    store_id: str
    at: dt.datetime


class LotSource(enum.StrEnum):
    """Where a lot's points came from."""

    PURCHASE = "purchase"
    BONUS = "bonus"
    ADJUSTMENT = "adjustment"
    PARTNER_CONVERSION = "partner_conversion"
    # Points spent on a sale that was refunded, given back.
    REFUND_REVERSAL = "refund_reversal"
    # Received from another member.
    TRANSFER = "transfer"


# What `accrue` takes: the gains a sale or a partner brings. Adjustments,
# refunds and transfers have calls of their own.
ACCRUE_SOURCES = frozenset({LotSource.PURCHASE, LotSource.BONUS, LotSource.PARTNER_CONVERSION})
# What counts as earned (lifetime_earned; a refund's reversal takes back
# from the sale's lots of these sources first).
EARNED_SOURCES = ACCRUE_SOURCES


class SpendPurpose(enum.StrEnum):
    """What points paid for (the source of a spending movement)."""

    SALE = "sale"
    GIFT = "gift"
    TRANSFER = "transfer"
    # Converted into a partner's points.
    PARTNER_CONVERSION = "partner_conversion"
    # Charged by another service for something of its own (a campaign's
    # lottery draw), through PointsService.ChargePoints.
    CAMPAIGN = "campaign"


class MovementKind(enum.StrEnum):
    ACCRUE = "accrue"
    SPEND = "spend"
    REDEEM = "redeem"
    EXPIRE = "expire"
    ADJUST = "adjust"
    REVERSE = "reverse"
    RETURN = "return"
    TRANSFER_OUT = "transfer_out"
    TRANSFER_IN = "transfer_in"
    MERGE_OUT = "merge_out"
    MERGE_IN = "merge_in"
    FORFEIT = "forfeit"
    # Converted into a partner's points (conversions from a partner's
    # points are ACCRUE, source PARTNER_CONVERSION).
    CONVERT_OUT = "convert_out"
    # Charged by another service (PointsService.ChargePoints, source
    # CAMPAIGN).
    CHARGE = "charge"


class HoldState(enum.StrEnum):
    HELD = "held"
    SPENT = "spent"
    RELEASED = "released"


class ExpiryRule(enum.StrEnum):
    END_OF_NEXT_YEAR = "end_of_next_year"
    MONTHS_AFTER = "months_after"


@dataclass(frozen=True)
class Lot:
    lot_id: str
    member_id: str
    source: LotSource
    reference: str
    points: int
    remaining: int
    earned_at: dt.datetime
    expires_at: dt.datetime
    warned_at: dt.datetime | None = None
    expired_at: dt.datetime | None = None

    @property
    def open(self) -> bool:
        return self.remaining > 0


# --- the policy --------------------------------------------------------------


@dataclass(frozen=True)
class PointsPolicy:
    expiry_rule: ExpiryRule = ExpiryRule.END_OF_NEXT_YEAR
    # MONTHS_AFTER only.
    expiry_months: int = 0
    time_zone: str = "Asia/Shanghai"
    # 0: no warnings.
    warning_days: int = 30
    # cash_rate_points points are worth cash_rate_minor_units.
    cash_rate_points: int = 100
    cash_rate_minor_units: int = 100
    currency_code: str = "CNY"
    max_cash_share_bps: int = 5_000

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.time_zone)

    def local_day(self, at: dt.datetime) -> dt.date:
        return at.astimezone(self.zone).date()

    def warning_horizon(self, now: dt.datetime) -> dt.datetime:
        return now + dt.timedelta(days=self.warning_days)


DEFAULT_POLICY = PointsPolicy()


def _valid_zone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return bool(name)


def check_currency(code: str) -> bool:
    return len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()


def check_policy(policy: PointsPolicy, prefix: str = "policy") -> PointsPolicy:
    v = Violations()
    if policy.expiry_rule == ExpiryRule.MONTHS_AFTER:
        if not 1 <= policy.expiry_months <= MAX_EXPIRY_MONTHS:
            v.add(f"{prefix}.expiry_months", f"1 to {MAX_EXPIRY_MONTHS} with MONTHS_AFTER")
    elif policy.expiry_months:
        v.add(f"{prefix}.expiry_months", "only with MONTHS_AFTER")
    if not _valid_zone(policy.time_zone):
        v.add(f"{prefix}.time_zone", "an IANA time zone such as Asia/Shanghai")
    if not 0 <= policy.warning_days <= MAX_WARNING_DAYS:
        v.add(f"{prefix}.warning_days", f"0 to {MAX_WARNING_DAYS}")
    if not 1 <= policy.cash_rate_points <= MAX_RATE:
        v.add(f"{prefix}.cash_rate_points", f"1 to {MAX_RATE}")
    if not 1 <= policy.cash_rate_minor_units <= MAX_RATE:
        v.add(f"{prefix}.cash_rate_minor_units", f"1 to {MAX_RATE}")
    if not check_currency(policy.currency_code):
        v.add(f"{prefix}.currency_code", "an ISO 4217 code such as CNY")
    if not 0 <= policy.max_cash_share_bps <= FULL_SHARE_BPS:
        v.add(f"{prefix}.max_cash_share_bps", f"0 to {FULL_SHARE_BPS}")
    v.raise_if_any("the policy has invalid fields")
    return policy


# --- expiry ------------------------------------------------------------------


def add_months(day: dt.date, months: int) -> dt.date:
    """The same day ``months`` later; the month's last day when it is
    shorter (31 January + 1 month = 28 or 29 February)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    return dt.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def end_of_day(day: dt.date, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """The first instant after ``day`` in ``zone`` (midnight starting the
    next day), in UTC: a point is valid while now < this."""
    following = day + dt.timedelta(days=1)
    return dt.datetime(following.year, following.month, following.day, tzinfo=zone).astimezone(
        dt.UTC
    )


def expiry_of(policy: PointsPolicy, earned_at: dt.datetime) -> dt.datetime:
    """When points earned at ``earned_at`` expire under ``policy``: the end
    of the next calendar year, or of the day ``expiry_months`` after, both
    counted in the policy's time zone."""
    day = policy.local_day(earned_at)
    if policy.expiry_rule == ExpiryRule.MONTHS_AFTER:
        last = add_months(day, policy.expiry_months)
    else:
        last = dt.date(day.year + 1, 12, 31)
    return end_of_day(last, policy.zone)


def last_valid_day(policy: PointsPolicy, expires_at: dt.datetime) -> dt.date:
    """The policy's local day a lot expiring at ``expires_at`` ends with."""
    return policy.local_day(expires_at - dt.timedelta(microseconds=1))


# --- taking points from lots ------------------------------------------------


@dataclass(frozen=True)
class OpenLot:
    """What taking needs to know of a lot."""

    lot_id: str
    remaining: int
    expires_at: dt.datetime
    earned_at: dt.datetime


@dataclass(frozen=True)
class Take:
    """Points taken from one lot."""

    lot_id: str
    points: int
    expires_at: dt.datetime


def spend_order(lots: Iterable[OpenLot]) -> list[OpenLot]:
    """The order lots are spent in: earliest expiry first, then oldest."""
    return sorted(lots, key=lambda lot: (lot.expires_at, lot.earned_at, lot.lot_id))


def take(lots: Iterable[OpenLot], points: int, *, ordered: bool = False) -> list[Take]:
    """``points`` taken from ``lots`` in spend order (or in the order given
    with ``ordered``), as few lots as that order allows. The caller has
    checked there are enough: a shortfall is a bug, not a refusal."""
    if points < 0:
        raise ValueError("cannot take a negative number of points")
    takes: list[Take] = []
    left = points
    for lot in lots if ordered else spend_order(lots):
        if left == 0:
            break
        portion = min(left, lot.remaining)
        if portion > 0:
            takes.append(Take(lot.lot_id, portion, lot.expires_at))
            left -= portion
    if left:
        raise ValueError(f"the lots hold {points - left} points, not {points}")
    return takes


def expirable(due: Iterable[OpenLot], held: int) -> list[Take]:
    """Of the lots past their expiry, what expires now. Held points are
    counted on the lots spending would take first and are kept until the
    hold is spent or released; the rest of each due lot expires."""
    protected = held
    takes: list[Take] = []
    for lot in spend_order(due):
        keep = min(protected, lot.remaining)
        protected -= keep
        if lot.remaining - keep > 0:
            takes.append(Take(lot.lot_id, lot.remaining - keep, lot.expires_at))
    return takes


def due_points(lots: Iterable[OpenLot], held: int, now: dt.datetime) -> int:
    """How many points would expire at ``now`` (see ``expirable``)."""
    return sum(t.points for t in expirable([lot for lot in lots if lot.expires_at <= now], held))


def received_lots(takes: Sequence[Take]) -> list[tuple[dt.datetime, int]]:
    """The lots a transfer's receiver gets for what was taken: one per
    expiry date, with the points taken that expire then."""
    by_expiry: dict[dt.datetime, int] = {}
    for part in takes:
        by_expiry[part.expires_at] = by_expiry.get(part.expires_at, 0) + part.points
    return sorted(by_expiry.items())


def reversal_takes(
    sale_lots: Iterable[OpenLot], other_lots: Iterable[OpenLot], points: int, spendable: int
) -> list[Take]:
    """A refund takes back up to ``points`` earned on the sale: from what
    is left of the sale's own lots first, then from the other lots that
    expire first, never more than ``spendable`` (what is not held)."""
    sale = spend_order(sale_lots)
    sale_ids = {lot.lot_id for lot in sale}
    rest = [lot for lot in spend_order(other_lots) if lot.lot_id not in sale_ids]
    ordered = [*sale, *rest]
    there = sum(lot.remaining for lot in ordered)
    return take(ordered, max(0, min(points, spendable, there)), ordered=True)


# --- points as cash -------------------------------------------------------------


def cash_value(policy: PointsPolicy, points: int) -> int:
    """What ``points`` are worth in minor units, rounded down."""
    if points <= 0:
        return 0
    return points * policy.cash_rate_minor_units // policy.cash_rate_points


def points_for_cash(policy: PointsPolicy, minor_units: int) -> int:
    """The fewest points worth at least ``minor_units``, rounded up."""
    if minor_units <= 0:
        return 0
    return -(-minor_units * policy.cash_rate_points // policy.cash_rate_minor_units)


def max_cash_share(policy: PointsPolicy, sale_total: int) -> int:
    """The most of a sale of ``sale_total`` minor units points may pay."""
    if sale_total <= 0:
        return 0
    return sale_total * policy.max_cash_share_bps // FULL_SHARE_BPS


def points_as_cash(policy: PointsPolicy, sale_total: int, available: int) -> tuple[int, int]:
    """(points, minor units): the most of a sale that ``available`` points
    may pay under the policy's share, and the fewest points that pay it."""
    value = min(max_cash_share(policy, sale_total), cash_value(policy, available))
    return points_for_cash(policy, value), value


# --- checks ----------------------------------------------------------------------


def insufficient(available: int, asked: int) -> FailedPrecondition:
    return FailedPrecondition(
        "the member has too few points available",
        reason="POINTS_INSUFFICIENT",
        metadata={"available": str(available), "asked": str(asked)},
    )


def check_points(points: int, field: str, *, signed: bool = False) -> int:
    if signed:
        if points == 0 or abs(points) > MAX_POINTS:
            raise InvalidArgument(
                [FieldViolation(field, f"not zero, at most {MAX_POINTS} either way")]
            )
    elif not 0 < points <= MAX_POINTS:
        raise InvalidArgument([FieldViolation(field, f"more than zero and at most {MAX_POINTS}")])
    return points


def check_text(value: str, field: str, max_length: int, *, required: bool = False) -> str:
    text = value.strip()
    if required and not text:
        raise InvalidArgument([FieldViolation(field, "required")])
    if len(text) > max_length:
        raise InvalidArgument([FieldViolation(field, f"at most {max_length} characters")])
    return text
