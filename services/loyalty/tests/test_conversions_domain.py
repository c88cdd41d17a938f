"""Conversions with partners: the arithmetic at integer rates (rounding in
the chain's favour both ways, never taking more than was given), the
least and most points of a conversion, the daily cap, and the checks of
the terms HQ sets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chassis.errors import FailedPrecondition, InvalidArgument
from services.loyalty.domain.conversions import (
    Amounts,
    Direction,
    PartnerTerms,
    Rate,
    Terms,
    check_amount,
    check_daily_cap,
    check_terms,
    convert,
    least_points,
    most_points,
    new_conversion_id,
)
from services.loyalty.domain.points import MAX_POINTS, MAX_RATE

IN, OUT = Direction.TO_CHAIN, Direction.TO_PARTNER
# 10 bank points for 1 chain point in; 1 chain point for 8 bank points out.
BANK_IN = Rate(partner_points=10, chain_points=1)
BANK_OUT = Rate(partner_points=8, chain_points=1)


@pytest.mark.parametrize(
    ("rate", "direction", "points", "taken", "received"),
    [
        # 25 bank points are worth 2.5 chain points: 2, for 20 bank points.
        (BANK_IN, IN, 25, 20, 2),
        (BANK_IN, IN, 10, 10, 1),
        (BANK_IN, IN, 9, 0, 0),
        (BANK_OUT, OUT, 3, 3, 24),
        # 3 chain points for 2 bank points: 10 chain points give 6, for 9.
        (Rate(partner_points=2, chain_points=3), OUT, 10, 9, 6),
        # 2 chain points for 3 bank points: 7 bank points give 4, for 6.
        (Rate(partner_points=3, chain_points=2), IN, 7, 6, 4),
        (BANK_IN, IN, 0, 0, 0),
    ],
)
def test_conversions_round_in_the_chains_favour(
    rate: Rate, direction: Direction, points: int, taken: int, received: int
) -> None:
    assert convert(rate, direction, points) == Amounts(taken=taken, received=received)


@given(
    partner=st.integers(1, MAX_RATE),
    chain=st.integers(1, MAX_RATE),
    points=st.integers(0, MAX_POINTS),
    direction=st.sampled_from(list(Direction)),
)
def test_never_more_than_the_rate_and_never_more_than_given(
    partner: int, chain: int, points: int, direction: Direction
) -> None:
    amounts = convert(Rate(partner, chain), direction, points)
    partner_points, chain_points = amounts.partner_and_chain(direction)
    # Never more than was given is taken...
    assert 0 <= amounts.taken <= points
    # ...what is received is worth no more than what is taken (the rate,
    # partner * chain_points == chain * partner_points, rounded the chain's way)...
    if direction == IN:
        assert chain_points * partner <= partner_points * chain
    else:
        assert partner_points * chain <= chain_points * partner
    # ...and the points given but not taken would not buy one more point.
    assert convert(Rate(partner, chain), direction, points - amounts.taken).received == 0
    # Taking fewer would not pay for what is received.
    if amounts.taken:
        assert convert(Rate(partner, chain), direction, amounts.taken - 1).received < (
            amounts.received
        )


def test_the_least_and_most_points_of_a_conversion() -> None:
    assert least_points(Terms(BANK_IN), IN) == 10  # the fewest worth one chain point
    assert least_points(Terms(BANK_IN, min_points=100), IN) == 100
    assert least_points(Terms(BANK_OUT), OUT) == 1
    assert most_points(Terms(BANK_OUT)) == MAX_POINTS
    assert most_points(Terms(BANK_OUT, max_points=500)) == 500
    terms = Terms(BANK_IN, min_points=20, max_points=1_000)
    assert check_amount(terms, IN, 25) == Amounts(taken=20, received=2)
    for asked in (10, 1_001):
        with pytest.raises(FailedPrecondition) as refused:
            check_amount(terms, IN, asked)
        assert refused.value.reason == "CONVERSION_AMOUNT_OUT_OF_RANGE"
        assert refused.value.metadata == {"min": "20", "max": "1000", "asked": str(asked)}


def test_the_daily_cap() -> None:
    check_daily_cap(Terms(BANK_IN), 10**6, 10**6)  # no cap
    capped = Terms(BANK_IN, daily_cap=100)
    check_daily_cap(capped, 60, 40)
    with pytest.raises(FailedPrecondition) as refused:
        check_daily_cap(capped, 60, 41)
    assert refused.value.reason == "CONVERSION_DAILY_LIMIT_EXCEEDED"
    assert refused.value.metadata == {"limit": "100", "used": "60", "asked": "41"}


def test_a_partner_offers_each_way_only_while_enabled() -> None:
    terms = PartnerTerms("bank-a", enabled=True, to_chain=Terms(BANK_IN))
    assert terms.terms(IN) == Terms(BANK_IN)
    assert terms.terms(OUT) is None
    assert PartnerTerms("bank-a", enabled=False, to_chain=Terms(BANK_IN)).terms(IN) is None


def test_the_terms_checks() -> None:
    good = PartnerTerms(
        "bank-a",
        enabled=True,
        to_chain=Terms(BANK_IN, max_points=10_000, daily_cap=500),
        to_partner=Terms(BANK_OUT, min_points=100),
    )
    assert check_terms(good) is good
    # Disabled terms need offer nothing.
    check_terms(PartnerTerms("bank-a", enabled=False))
    cases = {
        "partner_conversion.partner_id": PartnerTerms("", enabled=False),
        "partner_conversion.to_chain": PartnerTerms("bank-a", enabled=True),
        "partner_conversion.to_chain.rate.partner_points": PartnerTerms(
            "bank-a", enabled=True, to_chain=Terms(Rate(0, 1))
        ),
        "partner_conversion.to_partner.rate.chain_points": PartnerTerms(
            "bank-a", enabled=True, to_partner=Terms(Rate(1, MAX_RATE + 1))
        ),
        # A maximum below the fewest points worth one chain point.
        "partner_conversion.to_chain.max_points": PartnerTerms(
            "bank-a", enabled=True, to_chain=Terms(BANK_IN, max_points=9)
        ),
        # A cap below the smallest conversion: nobody could ever convert.
        "partner_conversion.to_partner.daily_chain_points_per_member": PartnerTerms(
            "bank-a", enabled=True, to_partner=Terms(BANK_OUT, min_points=100, daily_cap=99)
        ),
        "partner_conversion.to_partner.min_points": PartnerTerms(
            "bank-a", enabled=True, to_partner=Terms(BANK_OUT, min_points=-1)
        ),
    }
    for field, terms in cases.items():
        with pytest.raises(InvalidArgument) as refused:
            check_terms(terms)
        assert [v.field for v in refused.value.violations] == [field], field


def test_conversion_ids() -> None:
    ids = {new_conversion_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 16 and i.startswith("V") for i in ids)
