"""Tiers: the ladder, qualification, upgrades, grace and downgrades. Pure.

A chain's ladder is an ordered list of tiers (by rank, lowest first). The
lowest tier has no thresholds; every other tier is reached by spend and/or
visits over a rolling window of days ending on the day considered.
Qualifying activity is money actually spent (never points: spending points
lowers nothing) and visits, the business days with positive net spend.

A member moves up the moment a sale makes them qualify for a higher tier.
Moving down waits for a review at the end of a period (month, quarter or
year in the ladder's time zone): a member who no longer qualifies for their
tier enters a grace period; whoever still does not qualify when it ends
moves down to the highest tier they qualify for; whoever qualifies again
leaves grace.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass

from chassis.errors import Violations
from services.loyalty.domain.points import Stamp

MAX_TIERS = 20
MAX_AMOUNT = 10**12
MAX_VISITS = 100_000
MAX_WINDOW_DAYS = 1096
MAX_GRACE_DAYS = 366
MAX_RANK = 10_000
MAX_NAME_LENGTH = 50
ONE_BPS = 10_000
MAX_MULTIPLIER_BPS = 100_000
TIER_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class Qualification(enum.StrEnum):
    SPEND_OR_VISITS = "spend_or_visits"
    SPEND_AND_VISITS = "spend_and_visits"
    SPEND_ONLY = "spend_only"
    VISITS_ONLY = "visits_only"


class ReviewPeriod(enum.StrEnum):
    MONTH = "month"
    QUARTER = "quarter"
    YEAR = "year"


class HistoryKind(enum.StrEnum):
    UPGRADED = "upgraded"
    DOWNGRADED = "downgraded"
    GRACE_STARTED = "grace_started"
    GRACE_ENDED = "grace_ended"


# Who made a change, from which store, and when: the points ledger's stamp,
# so that the checkout stamps points and tiers alike.
TierStamp = Stamp


@dataclass(frozen=True)
class Tier:
    tier_id: str
    name: str
    rank: int
    # Minor units of the ladder's currency over the window.
    min_spend: int = 0
    min_visits: int = 0
    qualification: Qualification = Qualification.SPEND_OR_VISITS
    discount_bps: int = 0
    points_multiplier_bps: int = ONE_BPS

    @property
    def open_to_all(self) -> bool:
        """No threshold: the lowest tier."""
        return self.min_spend == 0 and self.min_visits == 0

    def qualifies(self, standing: Standing) -> bool:
        if self.open_to_all:
            return True
        spend = standing.spend >= self.min_spend
        visits = standing.visits >= self.min_visits
        if self.qualification == Qualification.SPEND_ONLY:
            return spend
        if self.qualification == Qualification.VISITS_ONLY:
            return visits
        if self.qualification == Qualification.SPEND_AND_VISITS:
            return spend and visits
        return spend or visits


@dataclass(frozen=True)
class Standing:
    """A member's qualifying activity over a window."""

    spend: int = 0
    visits: int = 0


def standing_of(day_totals: Iterable[int]) -> Standing:
    """From the net spend of each business day in the window: the spend
    (never below zero) and the days with positive spend."""
    totals = list(day_totals)
    return Standing(max(0, sum(totals)), sum(1 for total in totals if total > 0))


@dataclass(frozen=True)
class Ladder:
    currency: str
    # By rank, lowest first.
    tiers: tuple[Tier, ...]
    window_days: int = 365
    review_period: ReviewPeriod = ReviewPeriod.QUARTER
    time_zone: str = "Asia/Shanghai"
    grace_days: int = 30

    @property
    def lowest(self) -> Tier:
        return self.tiers[0]

    def tier(self, tier_id: str) -> Tier | None:
        for tier in self.tiers:
            if tier.tier_id == tier_id:
                return tier
        return None

    def tier_or_lowest(self, tier_id: str) -> Tier:
        return self.tier(tier_id) or self.lowest

    def above(self, tier: Tier) -> Tier | None:
        for candidate in self.tiers:
            if candidate.rank > tier.rank:
                return candidate
        return None

    def qualified(self, standing: Standing) -> Tier:
        """The highest tier ``standing`` qualifies for."""
        best = self.lowest
        for tier in self.tiers:
            if tier.qualifies(standing):
                best = tier
        return best

    def window(self, day: dt.date) -> tuple[dt.date, dt.date]:
        """The first and last business day of the window ending on ``day``."""
        return day - dt.timedelta(days=self.window_days - 1), day

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.time_zone)

    def local_day(self, at: dt.datetime) -> dt.date:
        return at.astimezone(self.zone).date()


def default_ladder() -> Ladder:
    """Non-VIP, quasi-VIP and VIP, in CNY: what a chain has until it sets
    its own."""
    return Ladder(
        currency="CNY",
        tiers=(
            Tier("NON_VIP", "Non-VIP", 0),
            Tier(
                "QUASI_VIP",
                "Quasi-VIP",
                1,
                min_spend=200_000,
                min_visits=6,
                discount_bps=300,
                points_multiplier_bps=12_000,
            ),
            Tier(
                "VIP",
                "VIP",
                2,
                min_spend=1_000_000,
                min_visits=24,
                discount_bps=800,
                points_multiplier_bps=15_000,
            ),
        ),
    )


# --- what a member sees ----------------------------------------------------------


@dataclass(frozen=True)
class MemberTier:
    tier_id: str
    name: str
    rank: int
    discount_bps: int
    points_multiplier_bps: int
    # When the member reached it; None for a member who never changed tier.
    since: dt.datetime | None


@dataclass(frozen=True)
class TierProgress:
    tier: MemberTier
    # Empty at the top of the ladder.
    next_tier_id: str
    next_tier_name: str
    spend_to_next_minor_units: int
    visits_to_next: int
    window_spend_minor_units: int
    window_visits: int
    # The tier before, when this sale moved the member up; "" otherwise.
    changed_from: str


def member_tier(tier: Tier, since: dt.datetime | None) -> MemberTier:
    return MemberTier(
        tier.tier_id, tier.name, tier.rank, tier.discount_bps, tier.points_multiplier_bps, since
    )


def progress(
    ladder: Ladder,
    tier: Tier,
    since: dt.datetime | None,
    standing: Standing,
    changed_from: str = "",
) -> TierProgress:
    following = ladder.above(tier)
    spend_to = visits_to = 0
    if following is not None:
        if following.min_spend:
            spend_to = max(0, following.min_spend - standing.spend)
        if following.min_visits:
            visits_to = max(0, following.min_visits - standing.visits)
    return TierProgress(
        tier=member_tier(tier, since),
        next_tier_id=following.tier_id if following else "",
        next_tier_name=following.name if following else "",
        spend_to_next_minor_units=spend_to,
        visits_to_next=visits_to,
        window_spend_minor_units=standing.spend,
        window_visits=standing.visits,
        changed_from=changed_from,
    )


# --- decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class SaleDecision:
    # The tier the sale moves the member up to.
    upgrade_to: Tier | None = None
    # The member was in grace and qualifies for their tier again.
    leave_grace: bool = False


def decide_after_sale(
    ladder: Ladder, current: Tier, in_grace: bool, standing: Standing
) -> SaleDecision:
    """Up at once to the highest tier now qualified; never down."""
    qualified = ladder.qualified(standing)
    if qualified.rank > current.rank:
        return SaleDecision(upgrade_to=qualified)
    if in_grace and qualified.rank >= current.rank:
        return SaleDecision(leave_grace=True)
    return SaleDecision()


class Action(enum.StrEnum):
    KEEP = "keep"
    ENTER_GRACE = "enter_grace"
    LEAVE_GRACE = "leave_grace"
    DOWNGRADE = "downgrade"


@dataclass(frozen=True)
class ReviewDecision:
    action: Action
    # DOWNGRADE: to this tier.
    to_tier: Tier | None = None
    # ENTER_GRACE: until then.
    grace_until: dt.datetime | None = None


def grace_end(ladder: Ladder, period: Period, reviewed_at: dt.datetime) -> dt.datetime:
    """Grace counts from the end of the period, or from the review when it
    ran late, so that a late review never shortens it."""
    return max(period.end, reviewed_at) + dt.timedelta(days=ladder.grace_days)


def decide_at_review(
    ladder: Ladder,
    current: Tier,
    grace_until: dt.datetime | None,
    standing: Standing,
    *,
    period: Period,
    at: dt.datetime,
) -> ReviewDecision:
    """At the end of ``period`` (reviewed at ``at``)."""
    qualified = ladder.qualified(standing)
    if qualified.rank >= current.rank:
        return ReviewDecision(Action.LEAVE_GRACE if grace_until else Action.KEEP)
    if grace_until is None:
        ends = grace_end(ladder, period, at)
        if ends <= at:
            return ReviewDecision(Action.DOWNGRADE, to_tier=qualified)
        return ReviewDecision(Action.ENTER_GRACE, grace_until=ends)
    if grace_until <= at:
        return ReviewDecision(Action.DOWNGRADE, to_tier=qualified)
    return ReviewDecision(Action.KEEP)


def decide_at_grace_end(ladder: Ladder, current: Tier, standing: Standing) -> ReviewDecision:
    """When a member's grace period is over."""
    qualified = ladder.qualified(standing)
    if qualified.rank >= current.rank:
        return ReviewDecision(Action.LEAVE_GRACE)
    return ReviewDecision(Action.DOWNGRADE, to_tier=qualified)


# --- review periods ------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    # "2026-03", "2026-Q1", "2026".
    key: str
    first_day: dt.date
    last_day: dt.date
    # The first instant of the period and of the next one, in UTC.
    start: dt.datetime
    end: dt.datetime


def _midnight(day: dt.date, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(0), tzinfo=zone).astimezone(dt.UTC)


def period_of(ladder: Ladder, day: dt.date) -> Period:
    """The review period (in the ladder's time zone) holding ``day``."""
    if ladder.review_period == ReviewPeriod.MONTH:
        first = day.replace(day=1)
        following = (first + dt.timedelta(days=32)).replace(day=1)
        key = f"{day.year:04d}-{day.month:02d}"
    elif ladder.review_period == ReviewPeriod.QUARTER:
        quarter = (day.month - 1) // 3
        first = dt.date(day.year, quarter * 3 + 1, 1)
        following = (first + dt.timedelta(days=95)).replace(day=1)
        key = f"{day.year:04d}-Q{quarter + 1}"
    else:
        first = dt.date(day.year, 1, 1)
        following = dt.date(day.year + 1, 1, 1)
        key = f"{day.year:04d}"
    zone = ladder.zone
    return Period(
        key=key,
        first_day=first,
        last_day=following - dt.timedelta(days=1),
        start=_midnight(first, zone),
        end=_midnight(following, zone),
    )


def last_ended_period(ladder: Ladder, at: dt.datetime) -> Period:
    """The latest period that ended at or before ``at``."""
    current = period_of(ladder, ladder.local_day(at))
    return period_of(ladder, current.first_day - dt.timedelta(days=1))


# --- validation -------------------------------------------------------------------------


def check_currency(code: str) -> bool:
    return len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()


def _check_tier(v: Violations, tier: Tier, name: str) -> None:
    if not TIER_ID.match(tier.tier_id):
        v.add(f"{name}.tier_id", "letters, digits, '-' and '_', 1 to 32 of them")
    if not tier.name.strip() or len(tier.name) > MAX_NAME_LENGTH:
        v.add(f"{name}.name", f"required, at most {MAX_NAME_LENGTH} characters")
    if not 0 <= tier.rank <= MAX_RANK:
        v.add(f"{name}.rank", f"0 to {MAX_RANK}")
    if not 0 <= tier.min_spend <= MAX_AMOUNT:
        v.add(f"{name}.min_spend.minor_units", f"0 to {MAX_AMOUNT}")
    if not 0 <= tier.min_visits <= MAX_VISITS:
        v.add(f"{name}.min_visits", f"0 to {MAX_VISITS}")
    if not 0 <= tier.discount_bps <= ONE_BPS:
        v.add(f"{name}.benefits.discount_bps", f"0 to {ONE_BPS}")
    if not ONE_BPS <= tier.points_multiplier_bps <= MAX_MULTIPLIER_BPS:
        v.add(
            f"{name}.benefits.points_multiplier_bps",
            f"{ONE_BPS} (×1) to {MAX_MULTIPLIER_BPS} (×10)",
        )
    if tier.open_to_all:
        return
    needs_spend = tier.qualification != Qualification.VISITS_ONLY
    needs_visits = tier.qualification != Qualification.SPEND_ONLY
    if needs_spend != bool(tier.min_spend):
        v.add(
            f"{name}.min_spend",
            "required by the qualification" if needs_spend else "not used by VISITS_ONLY",
        )
    if needs_visits != bool(tier.min_visits):
        v.add(
            f"{name}.min_visits",
            "required by the qualification" if needs_visits else "not used by SPEND_ONLY",
        )


def _check_order(v: Violations, tiers: list[tuple[int, Tier]]) -> None:
    ranks = [tier.rank for _, tier in tiers]
    for index, tier in tiers:
        if ranks.count(tier.rank) > 1:
            v.add(f"ladder.tiers[{index}].rank", "used by another tier")
    ordered = sorted(tiers, key=lambda item: item[1].rank)
    lowest = [(index, tier) for index, tier in tiers if tier.open_to_all]
    if len(lowest) != 1:
        v.add("ladder.tiers", "exactly one tier without thresholds (the lowest) is needed")
    elif ordered and ordered[0][1] is not lowest[0][1]:
        v.add(f"ladder.tiers[{lowest[0][0]}].rank", "the tier without thresholds is the lowest")
    for position, (index, tier) in enumerate(ordered):
        for _, below in ordered[:position]:
            if below.rank == tier.rank:
                continue
            if below.min_spend and tier.min_spend and tier.min_spend <= below.min_spend:
                v.add(
                    f"ladder.tiers[{index}].min_spend",
                    f"more than tier {below.tier_id}'s, which ranks lower",
                )
            if below.min_visits and tier.min_visits and tier.min_visits <= below.min_visits:
                v.add(
                    f"ladder.tiers[{index}].min_visits",
                    f"more than tier {below.tier_id}'s, which ranks lower",
                )


def check_ladder(ladder: Ladder) -> Ladder:
    """The ladder with its tiers by rank, or INVALID_ARGUMENT with every
    problem at once."""
    v = Violations()
    if not check_currency(ladder.currency):
        v.add("ladder.tiers.min_spend.currency_code", "an ISO 4217 code such as CNY")
    if not 1 <= len(ladder.tiers) <= MAX_TIERS:
        v.add("ladder.tiers", f"1 to {MAX_TIERS} tiers")
    ids: set[str] = set()
    for index, tier in enumerate(ladder.tiers):
        _check_tier(v, tier, f"ladder.tiers[{index}]")
        if tier.tier_id in ids:
            v.add(f"ladder.tiers[{index}].tier_id", "used by another tier")
        ids.add(tier.tier_id)
    _check_order(v, list(enumerate(ladder.tiers)))
    if not 1 <= ladder.window_days <= MAX_WINDOW_DAYS:
        v.add("ladder.window_days", f"1 to {MAX_WINDOW_DAYS}")
    if not 0 <= ladder.grace_days <= MAX_GRACE_DAYS:
        v.add("ladder.grace_days", f"0 to {MAX_GRACE_DAYS}")
    try:
        zoneinfo.ZoneInfo(ladder.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        v.add("ladder.time_zone", "an IANA time zone such as Asia/Shanghai")
    v.raise_if_any("the tier ladder has invalid fields")
    return Ladder(
        currency=ladder.currency,
        tiers=tuple(sorted(ladder.tiers, key=lambda tier: tier.rank)),
        window_days=ladder.window_days,
        review_period=ladder.review_period,
        time_zone=ladder.time_zone,
        grace_days=ladder.grace_days,
    )
