"""The gift catalogue's checks: gift fields, update masks, quantities,
stock changes, and whose stock a redemption tries."""

from __future__ import annotations

import pytest

from chassis.errors import InvalidArgument
from services.loyalty.domain.gifts import (
    CHAIN_WIDE,
    MAX_QUANTITY,
    MAX_STOCK_DELTA,
    Gift,
    check_gift,
    check_quantity,
    check_stock_delta,
    check_update_mask,
    stock_sources,
)
from services.loyalty.domain.points import MAX_POINTS


def test_gift_fields() -> None:
    assert check_gift(Gift("MUG-01", "  保温杯 ", 1_200)) == Gift("MUG-01", "保温杯", 1_200, True)
    with pytest.raises(InvalidArgument) as caught:
        check_gift(Gift("bad id!", " ", 0))
    assert {v.field for v in caught.value.violations} == {
        "gift.gift_id",
        "gift.name",
        "gift.points_price",
    }
    for gift in (
        Gift("", "x", 1),
        Gift("A" * 33, "x", 1),
        Gift("A", "x" * 101, 1),
        Gift("A", "x", MAX_POINTS + 1),
    ):
        with pytest.raises(InvalidArgument):
            check_gift(gift)


def test_update_masks() -> None:
    assert check_update_mask(["name", "active"]) == {"name", "active"}
    with pytest.raises(InvalidArgument):
        check_update_mask([])
    with pytest.raises(InvalidArgument):
        check_update_mask(["gift_id"])


def test_quantities_and_stock_changes() -> None:
    assert check_quantity(1) == 1 and check_quantity(MAX_QUANTITY) == MAX_QUANTITY
    for bad in (0, -1, MAX_QUANTITY + 1):
        with pytest.raises(InvalidArgument):
            check_quantity(bad)
    assert check_stock_delta(-5) == -5
    for bad in (0, MAX_STOCK_DELTA + 1, -MAX_STOCK_DELTA - 1):
        with pytest.raises(InvalidArgument):
            check_stock_delta(bad)


def test_a_store_takes_its_own_stock_first() -> None:
    assert stock_sources("S001") == ("S001", CHAIN_WIDE)
    assert stock_sources(CHAIN_WIDE) == (CHAIN_WIDE,)
