"""Pricing rules: member and tier discounts, each promotion kind, stacking
and exclusion groups, coupons; and, for any basket and rules, that no price
goes negative, no discount passes its line and the total is the sum of the
nets (hypothesis)."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from services.campaigns.domain import pricing as p
from services.campaigns.domain.pricing import (
    Buyer,
    Context,
    CouponKind,
    CouponTerms,
    Line,
    PresentedCoupon,
    Promotion,
    PromotionKind,
    Scope,
    Source,
    Stacking,
)

AT = dt.datetime(2026, 6, 10, 12, tzinfo=dt.UTC)  # a Wednesday
START = AT - dt.timedelta(days=1)
MEMBER = Buyer(member_id="M1", program_id="GOLD", member_discount_bps=500, tier_discount_bps=0)


def ctx(buyer: Buyer = MEMBER, store: str = "S001", region: str = "EAST") -> Context:
    return Context(store, region, AT, "CNY", buyer)


def promo(pid: str, kind: PromotionKind = PromotionKind.PERCENT_OFF, **kw: object) -> Promotion:
    kw.setdefault("percent_bps", 1000)
    return Promotion(pid, f"Promo {pid}", kind, START, "CNY", **kw)  # type: ignore[arg-type]


LINES = [Line(1, "LIP-1", "lipstick", 2, 10_000), Line(2, "CRM-1", "cream", 1, 30_000)]


def test_member_and_tier_take_the_larger() -> None:
    priced = p.price(LINES, ctx(Buyer("M1", "GOLD", 500, "T1", "Gold", 800)))
    assert [d.source for d in priced.lines[0].discounts] == [Source.TIER]
    assert priced.total == 50_000 - 4_000
    guest = p.price(LINES, ctx(Buyer(member_discount_bps=500)))
    assert guest.total == 50_000 and not guest.lines[0].discounts


def test_percent_off_by_category_and_member_price() -> None:
    promos = [
        promo("A", scope=Scope(categories=frozenset({"cream"}))),
        promo(
            "B",
            PromotionKind.MEMBER_PRICE,
            scope=Scope(skus=frozenset({"LIP-1"})),
            member_price=8_000,
        ),
    ]
    priced = p.price(LINES, ctx(Buyer("M1")), promos)
    lip, cream = priced.lines
    assert lip.net == 16_000 and "member price 80.00 CNY each" in lip.discounts[0].description
    assert cream.net == 27_000 and cream.discounts[0].rule_id == "A"
    assert set(priced.promotions) == {"A", "B"}


def test_spend_save_spreads_exactly() -> None:
    lines = [Line(1, "A", "x", 1, 3_333), Line(2, "B", "x", 1, 3_333), Line(3, "C", "x", 1, 3_334)]
    promos = [promo("S", PromotionKind.SPEND_SAVE, threshold=10_000, save=1_000)]
    priced = p.price(lines, ctx(Buyer()), promos)
    assert priced.total == 9_000
    assert sum(line.discount for line in priced.lines) == 1_000
    below = p.price(lines[:2], ctx(Buyer()), promos)
    assert below.discount == 0
    repeating = [promo("S", PromotionKind.SPEND_SAVE, threshold=3_000, save=500, repeating=True)]
    assert p.price(lines, ctx(Buyer()), repeating).discount == 1_500


def test_member_day_birthday_and_double_points() -> None:
    promos = [
        promo("D", PromotionKind.MEMBER_DAY, weekdays=frozenset({3})),
        promo("W", PromotionKind.MEMBER_DAY, weekdays=frozenset({4})),
        promo("B", PromotionKind.BIRTHDAY, percent_bps=2000),
        promo("X2", PromotionKind.DOUBLE_POINTS, points_multiplier_bps=20_000),
        promo(
            "X3",
            PromotionKind.DOUBLE_POINTS,
            points_multiplier_bps=30_000,
            ends_at=START + dt.timedelta(hours=1),
        ),
    ]
    june = p.price(LINES, ctx(Buyer("M1", birthday_month=6)), promos)
    assert set(june.promotions) == {"D", "B"}
    assert june.points_multiplier_bps == 20_000 and june.points_promotion_id == "X2"
    assert any("birthday month" in d.description for d in june.lines[0].discounts)
    guest = p.price(LINES, ctx(Buyer()), promos)
    assert guest.promotions == () and guest.points_multiplier_bps == p.NO_MULTIPLIER


def test_exclusive_against_the_combinable_stack() -> None:
    combinable = [promo("C1", percent_bps=1000), promo("C2", percent_bps=1000, priority=5)]
    small = promo("E", stacking=Stacking.EXCLUSIVE, percent_bps=1500)
    big = promo("E2", stacking=Stacking.EXCLUSIVE, percent_bps=3000)
    assert p.price(LINES, ctx(Buyer()), [*combinable, small]).promotions == ("C2", "C1")
    assert p.price(LINES, ctx(Buyer()), [*combinable, small, big]).promotions == ("E2",)


def test_exclusion_group_best_wins_and_store_scope() -> None:
    promos = [
        promo("G1", exclusion_group="g", percent_bps=1000),
        promo("G2", exclusion_group="g", percent_bps=2000),
        promo("OTHER", store_ids=frozenset({"S002"})),
        promo("EAST", region_ids=frozenset({"EAST"}), percent_bps=500),
    ]
    assert p.price(LINES, ctx(Buyer()), promos).promotions == ("EAST", "G2")


def test_coupons_after_promotions() -> None:
    amount = CouponTerms(
        "T1", "Ten off", CouponKind.AMOUNT_OFF, "CNY", amount_off=1_000, min_spend=20_000
    )
    capped = CouponTerms(
        "T2", "Half", CouponKind.PERCENT_OFF, "CNY", percent_bps=5000, max_discount=2_000
    )
    gift = CouponTerms("T3", "Gift", CouponKind.GIFT_ITEM, "CNY", gift_sku="LIP-1")
    creams = CouponTerms(
        "T4",
        "Cream",
        CouponKind.AMOUNT_OFF,
        "CNY",
        amount_off=500,
        min_spend=40_000,
        scope=Scope(categories=frozenset({"cream"})),
    )
    priced = p.price(
        LINES,
        ctx(Buyer("M1")),
        [promo("P", percent_bps=1000)],
        [
            PresentedCoupon("a", "C1", amount),
            PresentedCoupon("b", "C2", capped),
            PresentedCoupon("c", "C3", gift),
            PresentedCoupon("d", "C4", creams),
            PresentedCoupon("a", "C1", amount),
            PresentedCoupon("zz", refusal="COUPON_NOT_FOUND"),
        ],
    )
    uses = {u.coupon_id or u.code: u for u in priced.coupons[:4]}
    assert uses["C1"].accepted and uses["C1"].discount == 1_000
    assert uses["C2"].discount == 2_000
    assert uses["C3"].accepted and uses["C3"].discount > 0
    assert uses["C4"].refusal == "COUPON_MINIMUM_SPEND"
    assert [u.refusal for u in priced.coupons][-2:] == ["COUPON_DUPLICATE", "COUPON_NOT_FOUND"]
    assert priced.total == sum(line.net for line in priced.lines)


def test_spread_is_exact() -> None:
    assert p.spread(10, [10, 10, 10]) == [4, 3, 3]
    assert p.spread(10, [1, 1, 1]) == [1, 1, 1]
    assert p.spread(5, [0, 0]) == [0, 0]
    assert p.spread(100, [10, 20]) == [10, 20]


# --- properties ----------------------------------------------------------------------

lines_st = st.lists(
    st.builds(
        Line,
        st.just(0),
        st.sampled_from(["A", "B", "C", "D"]),
        st.sampled_from(["x", "y"]),
        st.integers(1, 20),
        st.integers(0, 100_000),
    ),
    min_size=1,
    max_size=8,
).map(
    lambda ls: [Line(i + 1, x.sku, x.category, x.quantity, x.unit_price) for i, x in enumerate(ls)]
)

scope_st = st.builds(
    Scope,
    st.frozensets(st.sampled_from(["A", "B", "C"]), max_size=2),
    st.frozensets(st.sampled_from(["x", "y"]), max_size=1),
)


@st.composite
def promotions_st(draw: st.DrawFn) -> list[Promotion]:
    out = []
    for i in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(list(PromotionKind)))
        threshold = draw(st.integers(1, 200_000))
        out.append(
            Promotion(
                f"P{i}",
                f"p{i}",
                kind,
                START,
                "CNY",
                scope=Scope(skus=frozenset({"A"}))
                if kind == PromotionKind.MEMBER_PRICE
                else draw(scope_st),
                priority=draw(st.integers(-3, 3)),
                stacking=draw(st.sampled_from(list(Stacking)))
                if kind != PromotionKind.DOUBLE_POINTS
                else Stacking.COMBINABLE,
                exclusion_group=draw(st.sampled_from(["", "", "g1", "g2"]))
                if kind != PromotionKind.DOUBLE_POINTS
                else "",
                percent_bps=draw(st.integers(1, 10_000)),
                member_price=draw(st.integers(0, 50_000)),
                threshold=threshold,
                save=draw(st.integers(1, threshold)),
                repeating=draw(st.booleans()),
                weekdays=frozenset({3}),
                points_multiplier_bps=draw(st.integers(10_001, 30_000)),
            )
        )
    return out


coupon_st = st.builds(
    CouponTerms,
    st.sampled_from(["T1", "T2"]),
    st.just("c"),
    st.sampled_from(list(CouponKind)),
    st.just("CNY"),
    amount_off=st.integers(1, 100_000),
    percent_bps=st.integers(1, 10_000),
    max_discount=st.one_of(st.none(), st.integers(1, 50_000)),
    gift_sku=st.sampled_from(["A", "B", "Z"]),
    min_spend=st.integers(0, 100_000),
    scope=scope_st,
)


@settings(max_examples=300, deadline=None)
@given(
    lines_st,
    promotions_st(),
    st.lists(coupon_st, max_size=3),
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.booleans(),
)
def test_prices_are_sound_and_deterministic(
    lines: list[Line],
    promos: list[Promotion],
    coupons: list[CouponTerms],
    member_bps: int,
    tier_bps: int,
    member: bool,
) -> None:
    buyer = Buyer("M1" if member else "", "GOLD", member_bps, "T", "Tier", tier_bps, 6)
    presented = [PresentedCoupon(f"c{i}", f"C{i}", t) for i, t in enumerate(coupons)]
    priced = p.price(lines, ctx(buyer), promos, presented)
    for line in priced.lines:
        assert line.net >= 0
        assert all(d.amount >= 0 for d in line.discounts)
        assert line.discount <= line.line.gross
    assert priced.total == sum(line.net for line in priced.lines)
    assert priced.total + priced.discount == priced.gross
    coupon_total = sum(u.discount for u in priced.coupons if u.accepted)
    assert coupon_total == sum(
        d.amount for line in priced.lines for d in line.discounts if d.source == Source.COUPON
    )
    for use in priced.coupons:
        terms = coupons[int(use.coupon_id[1:])]
        if use.accepted and terms.kind == CouponKind.PERCENT_OFF and terms.max_discount is not None:
            assert use.discount <= terms.max_discount
    assert p.price(lines, ctx(buyer), list(reversed(promos)), presented) == priced
