"""The gift catalogue: what a gift is and the checks on its fields. Pure:
no I/O. Stock is kept per store and chain-wide (store ""); a redemption
takes the store's own stock when it has enough, otherwise the chain-wide
stock (see ``stock_sources``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from chassis.errors import FieldViolation, InvalidArgument, Violations
from services.loyalty.domain.points import MAX_POINTS

CHAIN_WIDE = ""
MAX_NAME_LENGTH = 100
MAX_QUANTITY = 100
MAX_STOCK_DELTA = 10**6
UPDATABLE = frozenset({"name", "points_price", "active"})
_GIFT_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class Gift:
    gift_id: str
    name: str
    points_price: int
    active: bool = True


def check_gift(gift: Gift, prefix: str = "gift") -> Gift:
    v = Violations()
    if not _GIFT_ID.match(gift.gift_id):
        v.add(f"{prefix}.gift_id", "1 to 32 letters, digits, '-' or '_'")
    name = gift.name.strip()
    if not name:
        v.add(f"{prefix}.name", "required")
    elif len(name) > MAX_NAME_LENGTH:
        v.add(f"{prefix}.name", f"at most {MAX_NAME_LENGTH} characters")
    if not 0 < gift.points_price <= MAX_POINTS:
        v.add(f"{prefix}.points_price", f"more than zero and at most {MAX_POINTS}")
    v.raise_if_any("the gift has invalid fields")
    return Gift(gift.gift_id, name, gift.points_price, gift.active)


def check_update_mask(paths: Iterable[str]) -> frozenset[str]:
    """The mask's paths, each an updatable field; an empty mask is refused
    rather than read as "everything"."""
    chosen = frozenset(paths)
    v = Violations()
    if not chosen:
        v.add("update_mask", f"required: one or more of {', '.join(sorted(UPDATABLE))}")
    for path in sorted(chosen - UPDATABLE):
        v.add("update_mask", f"{path!r} cannot be updated; one of {', '.join(sorted(UPDATABLE))}")
    v.raise_if_any()
    return chosen


def check_quantity(quantity: int, field: str = "quantity") -> int:
    if not 0 < quantity <= MAX_QUANTITY:
        raise InvalidArgument([FieldViolation(field, f"1 to {MAX_QUANTITY}")])
    return quantity


def check_stock_delta(delta: int, field: str = "delta") -> int:
    if delta == 0 or abs(delta) > MAX_STOCK_DELTA:
        raise InvalidArgument(
            [FieldViolation(field, f"not zero, at most {MAX_STOCK_DELTA} either way")]
        )
    return delta


def stock_sources(store_id: str) -> tuple[str, ...]:
    """Whose stock a redemption at ``store_id`` tries, in order: the
    store's own, then the chain-wide stock."""
    return (store_id, CHAIN_WIDE) if store_id else (CHAIN_WIDE,)
