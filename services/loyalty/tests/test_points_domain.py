"""Points rules: expiry dates (time zones, year and month ends), the order
lots are spent in, what expires when points are held, transfers' lots,
refund reversals, points as cash and the policy checks; and, over random
sequences of operations, that spending and transferring never create
points and balances always equal the lots' remaining points."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import FailedPrecondition, InvalidArgument
from services.loyalty.domain.points import (
    DEFAULT_POLICY,
    MAX_POINTS,
    ExpiryRule,
    OpenLot,
    PointsPolicy,
    Take,
    add_months,
    cash_value,
    check_points,
    check_policy,
    check_text,
    due_points,
    end_of_day,
    expirable,
    expiry_of,
    insufficient,
    last_valid_day,
    max_cash_share,
    new_lot_id,
    new_movement_id,
    new_redemption_id,
    points_as_cash,
    points_for_cash,
    received_lots,
    reversal_takes,
    spend_order,
    take,
)

UTC = dt.UTC
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")


def at(*args: int, zone: dt.tzinfo = UTC) -> dt.datetime:
    return dt.datetime(*args, tzinfo=zone)


def months(n: int, zone: str = "Asia/Shanghai") -> PointsPolicy:
    return PointsPolicy(expiry_rule=ExpiryRule.MONTHS_AFTER, expiry_months=n, time_zone=zone)


# --- expiry ------------------------------------------------------------------------


def test_end_of_next_year_in_the_policys_time_zone() -> None:
    # Earned on 15 March 2026 in Shanghai: valid through 31 December 2027,
    # i.e. until midnight starting 1 January 2028 there (16:00 UTC the day before).
    earned = at(2026, 3, 15, 10, 0, zone=SHANGHAI)
    assert expiry_of(DEFAULT_POLICY, earned) == at(2027, 12, 31, 16, 0)
    assert last_valid_day(DEFAULT_POLICY, at(2027, 12, 31, 16, 0)) == dt.date(2027, 12, 31)
    # 31 December 2026 17:00 UTC is already 1 January 2027 in Shanghai: a year later.
    assert expiry_of(DEFAULT_POLICY, at(2026, 12, 31, 17, 0)) == at(2028, 12, 31, 16, 0)
    assert expiry_of(DEFAULT_POLICY, at(2026, 12, 31, 15, 59)) == at(2027, 12, 31, 16, 0)
    # The same instant counted in UTC stays in 2026.
    utc_policy = replace(DEFAULT_POLICY, time_zone="UTC")
    assert expiry_of(utc_policy, at(2026, 12, 31, 17, 0)) == at(2028, 1, 1)
    # New York is behind UTC: early on 1 January UTC is still 31 December there.
    ny = replace(DEFAULT_POLICY, time_zone="America/New_York")
    assert expiry_of(ny, at(2027, 1, 1, 3, 0)) == at(2027, 12, 31, 0, 0, zone=NEW_YORK).astimezone(
        UTC
    ) + dt.timedelta(days=1)
    assert expiry_of(ny, at(2027, 1, 1, 3, 0)) == at(2028, 1, 1, 5, 0)


def test_months_after_ends_with_the_day_and_clamps_to_month_ends() -> None:
    policy = months(1)
    # 31 January + 1 month: the last day of February (2028 is a leap year).
    assert add_months(dt.date(2027, 1, 31), 1) == dt.date(2027, 2, 28)
    assert add_months(dt.date(2028, 1, 31), 1) == dt.date(2028, 2, 29)
    assert add_months(dt.date(2026, 12, 15), 2) == dt.date(2027, 2, 15)
    assert add_months(dt.date(2026, 8, 31), 18) == dt.date(2028, 2, 29)
    earned = at(2027, 1, 31, 9, 0, zone=SHANGHAI)
    expires = expiry_of(policy, earned)
    assert expires == at(2027, 3, 1, 0, 0, zone=SHANGHAI).astimezone(UTC)
    assert last_valid_day(policy, expires) == dt.date(2027, 2, 28)
    # Twelve months in Shanghai from an evening that is already the next day there.
    assert expiry_of(months(12), at(2026, 6, 30, 20, 0)) == at(2027, 7, 1, 16, 0)


def test_end_of_day_across_daylight_saving_time() -> None:
    # New York springs forward on 8 March 2026: the day before is 24 hours,
    # midnight is at 05:00 UTC before and 04:00 UTC after.
    assert end_of_day(dt.date(2026, 3, 7), NEW_YORK) == at(2026, 3, 8, 5, 0)
    assert end_of_day(dt.date(2026, 3, 8), NEW_YORK) == at(2026, 3, 9, 4, 0)
    ny = PointsPolicy(
        expiry_rule=ExpiryRule.MONTHS_AFTER, expiry_months=6, time_zone="America/New_York"
    )
    # Earned in winter, expiring in summer time: midnight local all the same.
    expires = expiry_of(ny, at(2026, 1, 10, 15, 0))
    assert expires == at(2026, 7, 11, 4, 0)
    assert last_valid_day(ny, expires) == dt.date(2026, 7, 10)


@given(
    earned=st.datetimes(
        min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2090, 1, 1), timezones=st.just(UTC)
    ),
    zone=st.sampled_from(["Asia/Shanghai", "UTC", "America/New_York", "Pacific/Auckland"]),
    n=st.integers(1, 120),
)
def test_expiry_is_always_a_local_midnight_after_earning(
    earned: dt.datetime, zone: str, n: int
) -> None:
    for policy in (PointsPolicy(time_zone=zone), months(n, zone)):
        expires = expiry_of(policy, earned)
        assert expires > earned
        local = expires.astimezone(zoneinfo.ZoneInfo(zone))
        # Midnight exists every day in these zones (their clocks change at 2 or 3 a.m.).
        assert (local.hour, local.minute, local.second, local.microsecond) == (0, 0, 0, 0)
        day = policy.local_day(earned)
        last = last_valid_day(policy, expires)
        if policy.expiry_rule == ExpiryRule.END_OF_NEXT_YEAR:
            assert last == dt.date(day.year + 1, 12, 31)
        else:
            assert last == add_months(day, n)
            assert last.day <= day.day


# --- taking from lots ---------------------------------------------------------------------

T0 = at(2026, 1, 1)


def lot(lot_id: str, remaining: int, expires_day: int, earned_day: int = 1) -> OpenLot:
    return OpenLot(
        lot_id, remaining, T0 + dt.timedelta(days=expires_day), T0 + dt.timedelta(days=earned_day)
    )


def test_spending_takes_the_lots_that_expire_first() -> None:
    lots = [lot("c", 50, 300), lot("a", 30, 100), lot("b", 40, 100, earned_day=0)]
    # Same expiry: the older lot first.
    assert [x.lot_id for x in spend_order(lots)] == ["b", "a", "c"]
    assert take(lots, 60) == [
        Take("b", 40, T0 + dt.timedelta(days=100)),
        Take("a", 20, T0 + dt.timedelta(days=100)),
    ]
    assert take(lots, 0) == []
    assert sum(t.points for t in take(lots, 120)) == 120
    with pytest.raises(ValueError):
        take(lots, 121)
    with pytest.raises(ValueError):
        take(lots, -1)


def test_held_points_keep_the_earliest_lots_from_expiring() -> None:
    due = [lot("a", 30, 10), lot("b", 50, 20)]
    # Nothing held: all due points expire.
    assert [(t.lot_id, t.points) for t in expirable(due, 0)] == [("a", 30), ("b", 50)]
    # 40 held: all of a and 10 of b are kept for the hold.
    assert [(t.lot_id, t.points) for t in expirable(due, 40)] == [("b", 40)]
    assert expirable(due, 100) == []
    later = [*due, lot("c", 70, 400)]
    assert due_points(later, 40, T0 + dt.timedelta(days=30)) == 40
    assert due_points(later, 0, T0 + dt.timedelta(days=15)) == 30


def test_a_transfer_gives_lots_with_the_expiry_dates_taken() -> None:
    lots = [lot("a", 30, 100), lot("b", 40, 100), lot("c", 50, 300)]
    takes = take(lots, 100)
    received = received_lots(takes)
    assert received == [(T0 + dt.timedelta(days=100), 70), (T0 + dt.timedelta(days=300), 30)]
    assert sum(points for _, points in received) == 100


def test_a_refund_takes_back_the_sales_lots_first() -> None:
    sale = [lot("s", 20, 400)]
    others = [lot("s", 20, 400), lot("o1", 30, 100), lot("o2", 30, 200)]
    takes = reversal_takes(sale, others, 50, spendable=1000)
    assert [(t.lot_id, t.points) for t in takes] == [("s", 20), ("o1", 30)]
    # Never more than is spendable (held points stay), nor than there is.
    assert sum(t.points for t in reversal_takes(sale, others, 50, spendable=25)) == 25
    assert sum(t.points for t in reversal_takes(sale, others, 500, spendable=1000)) == 80
    assert reversal_takes([], [], 10, spendable=0) == []


# --- points as cash ------------------------------------------------------------------------


def test_cash_conversion_and_rounding() -> None:
    policy = DEFAULT_POLICY  # 100 points = 100 minor units
    assert cash_value(policy, 250) == 250
    assert points_for_cash(policy, 250) == 250
    odd = replace(policy, cash_rate_points=30, cash_rate_minor_units=100)  # 3 points = 10 fen
    assert cash_value(odd, 10) == 33  # rounded down: the member never gets a fraction
    assert points_for_cash(odd, 33) == 10  # rounded up: 9.9 points
    assert points_for_cash(odd, 34) == 11
    assert cash_value(odd, 0) == points_for_cash(odd, 0) == 0
    assert cash_value(odd, -5) == points_for_cash(odd, -5) == 0
    # Half of a 99.99 sale at most.
    assert max_cash_share(policy, 9_999) == 4_999
    assert points_as_cash(policy, 9_999, 10_000) == (4_999, 4_999)
    assert points_as_cash(policy, 9_999, 1_000) == (1_000, 1_000)
    assert points_as_cash(odd, 10_000, 7) == (7, 23)
    assert points_as_cash(policy, 0, 1_000) == (0, 0)


@given(
    rate_points=st.integers(1, 10_000),
    rate_minor=st.integers(1, 10_000),
    minor=st.integers(0, 10**9),
    points=st.integers(0, 10**9),
)
def test_points_for_cash_is_the_fewest_points_worth_it(
    rate_points: int, rate_minor: int, minor: int, points: int
) -> None:
    policy = replace(DEFAULT_POLICY, cash_rate_points=rate_points, cash_rate_minor_units=rate_minor)
    needed = points_for_cash(policy, minor)
    assert cash_value(policy, needed) >= minor
    if needed:
        assert cash_value(policy, needed - 1) < minor
    assert points_for_cash(policy, cash_value(policy, points)) <= points


@given(
    total=st.integers(0, 10**8),
    available=st.integers(0, 10**8),
    bps=st.integers(0, 10_000),
    rate_points=st.integers(1, 1_000),
    rate_minor=st.integers(1, 1_000),
)
def test_points_as_cash_stays_within_the_share_and_the_points(
    total: int, available: int, bps: int, rate_points: int, rate_minor: int
) -> None:
    policy = replace(
        DEFAULT_POLICY,
        max_cash_share_bps=bps,
        cash_rate_points=rate_points,
        cash_rate_minor_units=rate_minor,
    )
    points, value = points_as_cash(policy, total, available)
    assert points <= available
    assert value <= total * bps // 10_000
    assert cash_value(policy, points) >= value


# --- the policy and checks ----------------------------------------------------------------


def test_policy_checks() -> None:
    assert check_policy(DEFAULT_POLICY) == DEFAULT_POLICY
    assert check_policy(months(24)).expiry_months == 24
    bad = PointsPolicy(
        expiry_rule=ExpiryRule.MONTHS_AFTER,
        expiry_months=0,
        time_zone="Mars/Olympus",
        warning_days=400,
        cash_rate_points=0,
        cash_rate_minor_units=10**7,
        currency_code="cny",
        max_cash_share_bps=10_001,
    )
    with pytest.raises(InvalidArgument) as caught:
        check_policy(bad)
    assert {v.field for v in caught.value.violations} == {
        "policy.expiry_months",
        "policy.time_zone",
        "policy.warning_days",
        "policy.cash_rate_points",
        "policy.cash_rate_minor_units",
        "policy.currency_code",
        "policy.max_cash_share_bps",
    }
    with pytest.raises(InvalidArgument):
        check_policy(replace(DEFAULT_POLICY, expiry_months=3))
    with pytest.raises(InvalidArgument):
        check_policy(replace(DEFAULT_POLICY, time_zone=""))


def test_point_and_text_checks() -> None:
    assert check_points(5, "points") == 5
    assert check_points(-5, "points", signed=True) == -5
    for value, signed in ((0, False), (-1, False), (MAX_POINTS + 1, False), (0, True)):
        with pytest.raises(InvalidArgument):
            check_points(value, "points", signed=signed)
    assert check_text("  why  ", "reason", 10, required=True) == "why"
    with pytest.raises(InvalidArgument):
        check_text("   ", "reason", 10, required=True)
    with pytest.raises(InvalidArgument):
        check_text("x" * 11, "reason", 10)
    refusal = insufficient(3, 5)
    assert isinstance(refusal, FailedPrecondition)
    assert refusal.reason == "POINTS_INSUFFICIENT"
    assert refusal.metadata == {"available": "3", "asked": "5"}
    ids = {new_lot_id(), new_movement_id(), new_redemption_id()}
    assert len(ids) == 3 and all(len(i) == 16 for i in ids)


# --- a model ledger over random operations ----------------------------------------------


@dataclass
class Model:
    """Members' lots and holds as the domain functions move them."""

    lots: dict[str, list[OpenLot]] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    created: int = 0
    expired: int = 0
    spent: int = 0
    serial: int = 0

    def balance(self, member: str) -> int:
        return sum(x.remaining for x in self.lots.get(member, []))

    def spendable(self, member: str) -> int:
        return self.balance(member) - self.held.get(member, 0)

    def new_lot(self, member: str, points: int, expires: dt.datetime, earned: dt.datetime) -> None:
        self.serial += 1
        self.lots.setdefault(member, []).append(
            OpenLot(f"L{self.serial:05d}", points, expires, earned)
        )

    def apply(self, member: str, takes: list[Take]) -> None:
        by_id = {t.lot_id: t.points for t in takes}
        self.lots[member] = [
            replace(x, remaining=x.remaining - by_id.get(x.lot_id, 0))
            for x in self.lots.get(member, [])
        ]
        assert all(x.remaining >= 0 for x in self.lots[member])


MEMBERS = ("A", "B", "C")
operation = st.one_of(
    st.tuples(
        st.just("accrue"), st.sampled_from(MEMBERS), st.integers(1, 500), st.integers(0, 700)
    ),
    st.tuples(st.just("spend"), st.sampled_from(MEMBERS), st.integers(1, 500), st.just(0)),
    st.tuples(st.just("hold"), st.sampled_from(MEMBERS), st.integers(0, 300), st.just(0)),
    st.tuples(
        st.just("transfer"), st.sampled_from(MEMBERS), st.integers(1, 500), st.integers(0, 2)
    ),
    st.tuples(st.just("expire"), st.sampled_from(MEMBERS), st.just(0), st.integers(0, 800)),
)


@settings(max_examples=300)
@given(ops=st.lists(operation, max_size=60))
def test_spending_and_transferring_never_create_points(
    ops: list[tuple[str, str, int, int]],
) -> None:
    m = Model()
    for kind, member, points, extra in ops:
        total_before = sum(m.balance(x) for x in MEMBERS)
        if kind == "accrue":
            m.new_lot(member, points, T0 + dt.timedelta(days=extra + 1), T0)
            m.created += points
        elif kind == "spend":
            if m.spendable(member) >= points:
                m.apply(member, take(m.lots[member], points))
                m.spent += points
        elif kind == "hold":
            m.held[member] = min(points, m.balance(member))
        elif kind == "transfer":
            to = MEMBERS[(MEMBERS.index(member) + 1 + extra % 2) % len(MEMBERS)]
            if m.spendable(member) >= points:
                takes = take(m.lots[member], points)
                m.apply(member, takes)
                expiries_taken = {t.expires_at for t in takes}
                for expires, portion in received_lots(takes):
                    assert expires in expiries_taken  # never extends validity
                    m.new_lot(to, portion, expires, T0 + dt.timedelta(days=1))
                assert sum(m.balance(x) for x in MEMBERS) == total_before
        else:  # expire what is due at day `extra`
            now = T0 + dt.timedelta(days=extra)
            due = [x for x in m.lots.get(member, []) if x.expires_at <= now and x.remaining]
            takes = expirable(due, m.held.get(member, 0))
            m.apply(member, takes)
            m.expired += sum(t.points for t in takes)
            assert m.balance(member) >= m.held.get(member, 0)
        for x in MEMBERS:
            assert m.balance(x) >= 0
            assert m.held.get(x, 0) <= m.balance(x)
        assert sum(m.balance(x) for x in MEMBERS) <= total_before + (
            points if kind == "accrue" else 0
        )
    # What is on the lots is exactly what was created less what left.
    assert sum(m.balance(x) for x in MEMBERS) == m.created - m.spent - m.expired


@settings(max_examples=300)
@given(
    lots=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 60)), max_size=8),
    held=st.integers(0, 1500),
    spend=st.integers(0, 1500),
    day=st.integers(0, 60),
)
def test_spending_a_hold_leaves_nothing_due_to_expire(
    lots: list[tuple[int, int]], held: int, spend: int, day: int
) -> None:
    """What the checkout's commit relies on to credit a sale's points
    without reading the due lots again after spending its hold: once what
    is due has expired (held points kept), spending points held takes the
    due lots first, so what is still due stays within what is still held."""
    now = T0 + dt.timedelta(days=day)
    open_ = [
        OpenLot(f"L{i}", points, T0 + dt.timedelta(days=expires), T0)
        for i, (points, expires) in enumerate(lots)
    ]
    balance = sum(x.remaining for x in open_)
    held = min(held, balance)
    spend = min(spend, held)

    def minus(lots_: list[OpenLot], takes: list[Take]) -> list[OpenLot]:
        by_id = {t.lot_id: t.points for t in takes}
        return [replace(x, remaining=x.remaining - by_id.get(x.lot_id, 0)) for x in lots_]

    expired = expirable([x for x in open_ if x.expires_at <= now], held)
    after_expiry = minus(open_, expired)
    after_spend = minus(after_expiry, take(after_expiry, spend))
    still_due = [x for x in after_spend if x.expires_at <= now and x.remaining]
    assert expirable(still_due, held - spend) == []
