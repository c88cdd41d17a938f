"""The checkout's pure rules: the basket, member and tier pricing, the
tenders, and how refunds are shared out (property-based)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import FailedPrecondition, InvalidArgument
from services.loyalty.domain.checkout import (
    Buyer,
    Line,
    PointsRate,
    SoldLine,
    SoldTenders,
    Tender,
    TenderKind,
    check_basket,
    member_pricing,
    plan_refund,
    plan_tenders,
    share,
)

RATE = PointsRate(points=100, minor_units=100, max_share_bps=5_000)


def line(no: int, quantity: int, unit_price: int, sku: str = "SKU") -> Line:
    return Line(no, sku, "skincare", "", quantity, unit_price)


# -- the basket and pricing ---------------------------------------------------------


def test_a_basket_reports_every_bad_line() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_basket(
            [line(1, 0, 100, sku=""), line(2, 1, -5)],
            ["CNY", "USD"],
            "CNY",
        )
    fields = {v.field for v in caught.value.violations}
    assert fields == {
        "lines[0].sku",
        "lines[0].quantity",
        "lines[1].unit_price.minor_units",
        "lines[1].unit_price.currency_code",
    }
    with pytest.raises(InvalidArgument):
        check_basket([], [], "CNY")


def test_the_larger_of_member_and_tier_discounts_applies_rounded_down() -> None:
    buyer = Buyer(
        member_id="M1",
        program_id="GOLD",
        program_discount_bps=500,
        tier_id="VIP",
        tier_name="VIP",
        tier_discount_bps=800,
    )
    priced = member_pricing([line(1, 3, 999)], buyer)
    (only,) = priced.lines
    assert only.discount == 2997 * 800 // 10_000 == 239
    assert only.discounts[0].source == "TIER"
    assert priced.total == 2997 - 239
    member_only = member_pricing([line(1, 1, 1000)], Buyer("M1", "GOLD", 500))
    assert member_only.lines[0].discounts[0].source == "MEMBER"
    guest = member_pricing([line(1, 1, 1000)], Buyer(program_discount_bps=500))
    assert guest.total == 1000 and not guest.lines[0].discounts


@given(
    st.lists(st.tuples(st.integers(1, 50), st.integers(0, 10**6)), min_size=1, max_size=20),
    st.integers(0, 10_000),
    st.integers(0, 10_000),
)
def test_pricing_never_charges_less_than_zero_or_more_than_the_shelf(
    items: list[tuple[int, int]], member_bps: int, tier_bps: int
) -> None:
    lines = [line(i + 1, q, p) for i, (q, p) in enumerate(items)]
    priced = member_pricing(lines, Buyer("M1", "P", member_bps, "T", "T", tier_bps))
    assert 0 <= priced.total <= priced.gross
    assert priced.discount == sum(p.discount for p in priced.lines)
    best = max(member_bps, tier_bps)
    for p in priced.lines:
        assert p.discount == p.line.gross * best // 10_000


# -- tenders --------------------------------------------------------------------------


def test_tenders_must_pay_the_total_exactly() -> None:
    plan = plan_tenders(
        10_000,
        [Tender(TenderKind.STORED_VALUE, 6_000), Tender(TenderKind.CASH, 4_000)],
        RATE,
        member=True,
        card_pays=True,
        available_points=0,
    )
    assert (plan.stored_value, plan.cash, plan.money) == (6_000, 4_000, 10_000)
    with pytest.raises(FailedPrecondition) as caught:
        plan_tenders(
            10_000,
            [Tender(TenderKind.CASH, 9_999)],
            RATE,
            member=False,
            card_pays=False,
            available_points=0,
        )
    assert caught.value.reason == "TENDERS_DO_NOT_MATCH_TOTAL"


def test_points_pay_within_the_share_and_the_balance() -> None:
    plan = plan_tenders(
        10_000,
        [Tender(TenderKind.POINTS, points=5_000), Tender(TenderKind.CASH, 5_000)],
        RATE,
        member=True,
        card_pays=False,
        available_points=5_000,
    )
    assert (plan.points, plan.points_value) == (5_000, 5_000)
    with pytest.raises(FailedPrecondition) as caught:
        plan_tenders(
            10_000,
            [Tender(TenderKind.POINTS, points=6_000), Tender(TenderKind.CASH, 4_000)],
            RATE,
            member=True,
            card_pays=False,
            available_points=10_000,
        )
    assert caught.value.reason == "POINTS_SHARE_EXCEEDED"
    with pytest.raises(FailedPrecondition) as caught:
        plan_tenders(
            10_000,
            [Tender(TenderKind.POINTS, points=1_000), Tender(TenderKind.CASH, 9_000)],
            RATE,
            member=True,
            card_pays=False,
            available_points=999,
        )
    assert caught.value.reason == "POINTS_INSUFFICIENT"


def test_bad_tenders_are_named() -> None:
    with pytest.raises(InvalidArgument) as caught:
        plan_tenders(
            100,
            [
                Tender(TenderKind.CASH, 50),
                Tender(TenderKind.CASH, 50),
                Tender(TenderKind.POINTS, points=0),
                Tender(TenderKind.STORED_VALUE, 10),
            ],
            RATE,
            member=False,
            card_pays=False,
            available_points=0,
        )
    fields = {v.field for v in caught.value.violations}
    assert {"tenders[1].kind", "tenders[2].points", "tenders[2].kind", "tenders[3].kind"} <= fields


@given(st.integers(1, 10**7), st.integers(0, 10**7), st.integers(1, 1_000), st.integers(1, 1_000))
def test_the_most_points_never_pass_the_share_or_the_balance(
    total: int, available: int, points: int, minor: int
) -> None:
    rate = PointsRate(points, minor, 5_000)
    most = rate.most_points(total, available)
    assert 0 <= most <= available
    assert rate.value(most) * 10_000 <= total * 5_000


# -- refunds ---------------------------------------------------------------------------


@given(st.integers(0, 10**9), st.integers(1, 1_000), st.data())
def test_shares_taken_in_pieces_add_up_to_the_whole(
    whole: int, parts: int, data: st.DataObject
) -> None:
    done = 0
    taken = 0
    while done < parts:
        step = data.draw(st.integers(1, parts - done))
        piece = share(whole, parts, done, step)
        assert piece >= 0
        taken += piece
        done += step
    assert taken == whole


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(0, 50_000)), min_size=1, max_size=5),
    st.integers(0, 100),
    st.integers(0, 100),
    st.integers(0, 5_000),
    st.data(),
)
def test_refunds_in_pieces_give_back_exactly_what_was_paid(
    items: list[tuple[int, int]],
    sv_pct: int,
    points_pct: int,
    earned: int,
    data: st.DataObject,
) -> None:
    sold = [SoldLine(i + 1, q, net, 0) for i, (q, net) in enumerate(items)]
    total = sum(net for _, net in items)
    stored_value = total * sv_pct // 100
    points_value = (total - stored_value) * points_pct // 100
    cash = total - stored_value - points_value
    paid = {
        TenderKind.STORED_VALUE: stored_value,
        TenderKind.POINTS: points_value,
        TenderKind.CASH: cash,
    }
    refunded = dict.fromkeys(paid, 0)
    points_refunded = 0
    reversed_total = 0
    refunded_before = 0
    while any(s.quantity > s.quantity_refunded for s in sold):
        open_lines = [s for s in sold if s.quantity > s.quantity_refunded]
        chosen = data.draw(st.sampled_from(open_lines))
        quantity = data.draw(st.integers(1, chosen.quantity - chosen.quantity_refunded))
        plan = plan_refund(
            sold,
            [(chosen.line_no, quantity)],
            SoldTenders(paid, dict(refunded), points=points_value, points_refunded=points_refunded),
            total=total,
            refunded_before=refunded_before,
            points_earned=earned,
            points_reversed_before=reversed_total,
        )
        assert sum(plan.by_tender.values()) == plan.amount
        for kind, amount in plan.by_tender.items():
            assert amount >= 0
            refunded[kind] += amount
            assert refunded[kind] <= paid[kind]
        points_refunded += plan.points
        reversed_total += plan.points_to_reverse
        refunded_before += plan.amount
        sold = [
            SoldLine(s.line_no, s.quantity, s.net, s.quantity_refunded + quantity)
            if s.line_no == chosen.line_no
            else s
            for s in sold
        ]
    assert refunded_before == total
    assert refunded == paid
    assert points_refunded == points_value
    assert reversed_total == earned


def test_a_refund_cannot_pass_what_is_left() -> None:
    sold = [SoldLine(1, 2, 1_000, 1)]
    tenders = SoldTenders({TenderKind.CASH: 1_000}, {TenderKind.CASH: 500})
    with pytest.raises(FailedPrecondition) as caught:
        plan_refund(
            sold,
            [(1, 2)],
            tenders,
            total=1_000,
            refunded_before=500,
            points_earned=0,
            points_reversed_before=0,
        )
    assert caught.value.reason == "REFUND_EXCEEDS_SALE"
    with pytest.raises(InvalidArgument):
        plan_refund(
            sold,
            [(9, 1)],
            tenders,
            total=1_000,
            refunded_before=500,
            points_earned=0,
            points_reversed_before=0,
        )
    whole = plan_refund(
        sold,
        [],
        tenders,
        total=1_000,
        refunded_before=500,
        points_earned=10,
        points_reversed_before=5,
    )
    assert whole.whole_sale and whole.amount == 500 and whole.points_to_reverse == 5
