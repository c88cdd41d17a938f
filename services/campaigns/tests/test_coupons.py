"""Coupon rules: validity windows, refusals, restore policies, codes,
template checks."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chassis import ids
from chassis.errors import InvalidArgument
from services.campaigns.domain import coupons as c
from services.campaigns.domain.coupons import CouponFacts, CouponState, RestorePolicy, Template
from services.campaigns.domain.pricing import CouponKind

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def template(**kw: object) -> Template:
    kw.setdefault("amount_off", 1000)
    kw.setdefault("valid_days", 30)
    return Template("T1", "Ten off", kw.pop("kind", CouponKind.AMOUNT_OFF), "CNY", **kw)  # type: ignore[arg-type]


def test_validity_dates_or_days_the_earlier_end_wins() -> None:
    t = template(valid_from=T0, valid_until=T0 + dt.timedelta(days=10), valid_days=30)
    assert t.validity(T0 - dt.timedelta(days=5)) == (T0, T0 + dt.timedelta(days=10))
    days = template()
    assert days.validity(T0) == (T0, T0 + dt.timedelta(days=30))
    assert not t.issuable(T0 + dt.timedelta(days=11))


def test_budget_needs_a_face_value() -> None:
    with pytest.raises(InvalidArgument):
        c.check_template(template(kind=CouponKind.PERCENT_OFF, percent_bps=1000, budget=10_000))
    assert (
        c.check_template(
            template(kind=CouponKind.PERCENT_OFF, percent_bps=1000, max_discount=500, budget=10_000)
        ).cost
        == 500
    )
    with pytest.raises(InvalidArgument):
        c.check_template(template(kind=CouponKind.GIFT_ITEM, gift_sku="S", budget=10_000))
    with pytest.raises(InvalidArgument):
        c.check_template(template(valid_days=0))


def test_refusals() -> None:
    coupon = CouponFacts("C1", "M1", CouponState.ISSUED, T0, T0 + dt.timedelta(days=1), "")
    assert c.refusal(coupon, "M1", "", T0) == ("", "")
    assert c.refusal(coupon, "", "", T0)[0] == "COUPON_MEMBER_REQUIRED"
    assert c.refusal(coupon, "M2", "", T0)[0] == "COUPON_NOT_YOURS"
    assert c.refusal(coupon, "M1", "", T0 + dt.timedelta(days=2))[0] == "COUPON_EXPIRED"
    assert c.refusal(coupon, "M1", "", T0 - dt.timedelta(days=1))[0] == "COUPON_NOT_YET_VALID"
    held = CouponFacts("C1", "M1", CouponState.RESERVED, T0, T0 + dt.timedelta(days=1), "K1")
    assert c.refusal(held, "M1", "K2", T0)[0] == "COUPON_RESERVED"
    assert c.refusal(held, "M1", "K1", T0) == ("", "")
    used = CouponFacts("C1", "M1", CouponState.REDEEMED, T0, T0 + dt.timedelta(days=1), "K1")
    assert c.refusal(used, "M1", "K1", T0)[0] == "COUPON_USED"


def test_restore_policies() -> None:
    assert not c.restores(RestorePolicy.NEVER, True)
    assert c.restores(RestorePolicy.ON_WHOLE_REFUND, True)
    assert not c.restores(RestorePolicy.ON_WHOLE_REFUND, False)
    assert c.restores(RestorePolicy.ON_ANY_REFUND, False)


@given(st.integers(0, 1000))
def test_codes_are_long_and_read_back(_: int) -> None:
    code = c.new_code()
    assert len(code) >= 12 and set(code) <= set(ids.ALPHABET)
    spaced = "-".join(code[i : i + 4] for i in range(0, len(code), 4)).lower()
    assert c.normalise_code(spaced) == code
