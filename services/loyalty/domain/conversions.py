"""Conversions with partners: the terms HQ sets for a partner (a bank) and
the arithmetic of converting its points into the chain's and back. Pure: no
I/O.

A rate is an integer ratio: ``partner_points`` of the partner's points are
worth ``chain_points`` of the chain's. Rounding is always in the chain's
favour, both ways: a conversion gives the whole points of the other side
that the points given are worth, rounded down, and takes only the fewest
points worth what it gives, rounded up (never more than were given). So the
chain never gives more than the rate says, and the member never loses the
fraction the rounding leaves: it stays where it was.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from chassis.errors import FailedPrecondition, Violations
from chassis.ids import random_id
from services.loyalty.domain.points import MAX_POINTS, MAX_RATE

MAX_PARTNER_ID_LENGTH = 64
MAX_REFERENCE_LENGTH = 100


def new_conversion_id() -> str:
    return random_id("V", 15)


class Direction(enum.StrEnum):
    # Partner points into chain points.
    TO_CHAIN = "to_chain"
    # Chain points into partner points.
    TO_PARTNER = "to_partner"


@dataclass(frozen=True)
class Rate:
    """``partner_points`` of the partner's are worth ``chain_points`` of
    the chain's."""

    partner_points: int
    chain_points: int


@dataclass(frozen=True)
class Terms:
    """One way of converting. ``min_points`` and ``max_points`` bound the
    points one conversion gives (partner points to the chain, chain points
    to the partner; 0: the fewest worth one point / the platform's
    maximum); ``daily_cap`` bounds the chain points one member receives or
    gives through the partner in a local day (0: none)."""

    rate: Rate
    min_points: int = 0
    max_points: int = 0
    daily_cap: int = 0


@dataclass(frozen=True)
class PartnerTerms:
    partner_id: str
    enabled: bool
    to_chain: Terms | None = None
    to_partner: Terms | None = None

    def terms(self, direction: Direction) -> Terms | None:
        """The terms of one way, when the partner is enabled and offers it."""
        if not self.enabled:
            return None
        return self.to_chain if direction == Direction.TO_CHAIN else self.to_partner


@dataclass(frozen=True)
class Amounts:
    """What a conversion moves: the points taken from the side given (the
    fewest worth what is received, at most what was asked) and the points
    received on the other side."""

    taken: int
    received: int

    def partner_and_chain(self, direction: Direction) -> tuple[int, int]:
        """(partner points, chain points) of the conversion."""
        if direction == Direction.TO_CHAIN:
            return self.taken, self.received
        return self.received, self.taken


def _given_and_received(rate: Rate, direction: Direction) -> tuple[int, int]:
    """The rate as (points given, points received) for one way."""
    if direction == Direction.TO_CHAIN:
        return rate.partner_points, rate.chain_points
    return rate.chain_points, rate.partner_points


def convert(rate: Rate, direction: Direction, points: int) -> Amounts:
    """``points`` given one way: the whole points received, rounded down,
    and the fewest points given that are worth them, rounded up."""
    if points < 0:
        raise ValueError("cannot convert a negative number of points")
    given, received = _given_and_received(rate, direction)
    out = points * received // given
    taken = -(-out * given // received)
    return Amounts(taken=taken, received=out)


def least_points(terms: Terms, direction: Direction) -> int:
    """The fewest points one conversion may give: the terms' minimum, and
    never fewer than are worth one point of the other side."""
    given, received = _given_and_received(terms.rate, direction)
    worth_one = -(-given // received)
    return max(terms.min_points, worth_one, 1)


def most_points(terms: Terms) -> int:
    return terms.max_points or MAX_POINTS


def check_amount(terms: Terms, direction: Direction, points: int) -> Amounts:
    """The amounts of a conversion of ``points``, or the refusal of an
    amount outside the terms (FAILED_PRECONDITION
    CONVERSION_AMOUNT_OUT_OF_RANGE, with ``min`` and ``max``)."""
    least, most = least_points(terms, direction), most_points(terms)
    amounts = convert(terms.rate, direction, points)
    if not least <= points <= most or amounts.received <= 0:
        raise FailedPrecondition(
            "the points to convert are outside the partner's terms",
            reason="CONVERSION_AMOUNT_OUT_OF_RANGE",
            metadata={"min": str(least), "max": str(most), "asked": str(points)},
        )
    return amounts


def check_daily_cap(terms: Terms, used_today: int, chain_points: int) -> None:
    """Refuses a conversion that would take the member's chain points
    converted today through the partner (one way) beyond the cap."""
    if terms.daily_cap and used_today + chain_points > terms.daily_cap:
        raise FailedPrecondition(
            "the member reached today's conversion limit with this partner",
            reason="CONVERSION_DAILY_LIMIT_EXCEEDED",
            metadata={
                "limit": str(terms.daily_cap),
                "used": str(used_today),
                "asked": str(chain_points),
            },
        )


def check_terms(partner_terms: PartnerTerms, prefix: str = "partner_conversion") -> PartnerTerms:
    v = Violations()
    partner_id = partner_terms.partner_id
    if not partner_id or len(partner_id) > MAX_PARTNER_ID_LENGTH:
        v.add(f"{prefix}.partner_id", f"required, at most {MAX_PARTNER_ID_LENGTH} characters")
    offered = partner_terms.to_chain is not None or partner_terms.to_partner is not None
    if partner_terms.enabled and not offered:
        v.add(f"{prefix}.to_chain", "an enabled conversion offers at least one way")
    for direction in Direction:
        terms = (
            partner_terms.to_chain if direction == Direction.TO_CHAIN else partner_terms.to_partner
        )
        if terms is None:
            continue
        field = f"{prefix}.{direction.value}"
        rate = terms.rate
        if not 1 <= rate.partner_points <= MAX_RATE:
            v.add(f"{field}.rate.partner_points", f"1 to {MAX_RATE}")
        if not 1 <= rate.chain_points <= MAX_RATE:
            v.add(f"{field}.rate.chain_points", f"1 to {MAX_RATE}")
        if not 0 <= terms.min_points <= MAX_POINTS:
            v.add(f"{field}.min_points", f"0 to {MAX_POINTS}")
        if not 0 <= terms.max_points <= MAX_POINTS:
            v.add(f"{field}.max_points", f"0 to {MAX_POINTS}")
        if not 0 <= terms.daily_cap <= MAX_POINTS:
            v.add(f"{field}.daily_chain_points_per_member", f"0 to {MAX_POINTS}")
        if v:
            continue
        least = least_points(terms, direction)
        if terms.max_points and terms.max_points < least:
            v.add(
                f"{field}.max_points",
                f"at least {least}: the minimum, and the fewest points worth one",
            )
        smallest = convert(rate, direction, least)
        chain = smallest.partner_and_chain(direction)[1]
        if terms.daily_cap and terms.daily_cap < chain:
            v.add(
                f"{field}.daily_chain_points_per_member",
                f"0, or at least {chain}: the chain points of the smallest conversion",
            )
    v.raise_if_any("the partner conversion has invalid fields")
    return partner_terms
