"""Card programs and card numbers.

A program's number range is its prefix followed by ``range_digits`` digits
(and a Luhn check digit when the program wants one). Numbers are handed out
by a per-program serial; the serial is spread over the range by an affine
map ``serial * multiplier + offset (mod 10**range_digits)`` with a multiplier
prime to 10, a bijection, so consecutive cards do not get consecutive
numbers and no two serials give the same number. The spread is not a
secret (card numbers are identifiers, not credentials); it only keeps the
next member's number from being the obvious one.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import secrets
from dataclasses import dataclass

from chassis.errors import Violations

_PROGRAM_ID = re.compile(r"^[A-Z0-9][A-Z0-9_\-]{0,31}$")
_PARTNER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
_DIGITS = re.compile(r"^[0-9]+$")
MAX_NAME_LENGTH = 100
MIN_NUMBER_LENGTH = 8
MAX_NUMBER_LENGTH = 19
MAX_PREFIX_LENGTH = 12
# Fewer than a hundred numbers is not a range anyone can run a program on.
MIN_RANGE_DIGITS = 2
MAX_VALIDITY_MONTHS = 240
MAX_DISCOUNT_BPS = 10_000
MAX_GROUP_HOLDERS = 100
MAX_SUPPLEMENTARY_CARDS = 20


class Form(enum.StrEnum):
    PHYSICAL = "physical"
    VIRTUAL = "virtual"


class Holding(enum.StrEnum):
    PERSONAL = "personal"
    GROUP = "group"


class CancelSettlement(enum.StrEnum):
    """What the paid stored value of an account becomes when its last card
    is cancelled (bonus funds are always forfeited)."""

    PAY_OUT = "pay_out"
    FORFEIT = "forfeit"


@dataclass(frozen=True)
class NumberFormat:
    prefix: str
    length: int
    luhn: bool

    @property
    def range_digits(self) -> int:
        return self.length - len(self.prefix) - (1 if self.luhn else 0)

    @property
    def capacity(self) -> int:
        return int(10**self.range_digits)

    def overlaps(self, other: NumberFormat) -> bool:
        """Whether the two ranges could produce the same number: equal
        lengths and one prefix starting the other."""
        return self.length == other.length and (
            self.prefix.startswith(other.prefix) or other.prefix.startswith(self.prefix)
        )


@dataclass(frozen=True)
class Program:
    program_id: str
    display_name: str
    form: Form
    number_format: NumberFormat
    validity_months: int = 0
    stored_value: bool = False
    member_discount_bps: int = 0
    holding: Holding = Holding.PERSONAL
    max_group_holders: int = 0
    allows_supplementary: bool = False
    max_supplementary_cards: int = 0
    allows_linking: bool = False
    partner_id: str = ""
    cancel_settlement: CancelSettlement = CancelSettlement.PAY_OUT


def validate_program(p: Program, prefix: str = "card_program") -> Program:
    """Checks every field and reports every problem at once; returns the
    program with its texts trimmed."""
    v = Violations()
    program_id = p.program_id.strip()
    name = p.display_name.strip()
    if not _PROGRAM_ID.match(program_id):
        v.add(f"{prefix}.program_id", "upper-case letters, digits, '_' or '-', at most 32")
    if not name or len(name) > MAX_NAME_LENGTH:
        v.add(f"{prefix}.display_name", f"required, at most {MAX_NAME_LENGTH} characters")
    _check_number_format(p.number_format, prefix, v)
    if not 0 <= p.validity_months <= MAX_VALIDITY_MONTHS:
        v.add(f"{prefix}.validity_months", f"0 (never expires) to {MAX_VALIDITY_MONTHS}")
    if not 0 <= p.member_discount_bps <= MAX_DISCOUNT_BPS:
        v.add(f"{prefix}.member_discount_bps", f"0 to {MAX_DISCOUNT_BPS} basis points")
    _check_relations(p, prefix, v)
    partner = p.partner_id.strip()
    if partner and not _PARTNER_ID.match(partner):
        v.add(f"{prefix}.partner_id", "letters, digits, '_' or '-', at most 64")
    v.raise_if_any()
    return dataclasses.replace(p, program_id=program_id, display_name=name, partner_id=partner)


def _check_number_format(fmt: NumberFormat, prefix: str, v: Violations) -> None:
    if not _DIGITS.match(fmt.prefix) or len(fmt.prefix) > MAX_PREFIX_LENGTH:
        v.add(f"{prefix}.number_format.prefix", f"1 to {MAX_PREFIX_LENGTH} digits")
    if not MIN_NUMBER_LENGTH <= fmt.length <= MAX_NUMBER_LENGTH:
        v.add(
            f"{prefix}.number_format.length",
            f"{MIN_NUMBER_LENGTH} to {MAX_NUMBER_LENGTH} digits",
        )
    elif fmt.range_digits < MIN_RANGE_DIGITS:
        v.add(
            f"{prefix}.number_format.length",
            f"leaves fewer than {MIN_RANGE_DIGITS} digits after the prefix and check digit",
        )


def _check_relations(p: Program, prefix: str, v: Violations) -> None:
    if p.holding == Holding.GROUP:
        if not 2 <= p.max_group_holders <= MAX_GROUP_HOLDERS:
            v.add(f"{prefix}.max_group_holders", f"2 to {MAX_GROUP_HOLDERS} for a group program")
        if p.allows_supplementary:
            v.add(f"{prefix}.allows_supplementary", "a group program has holders instead")
    elif p.max_group_holders:
        v.add(f"{prefix}.max_group_holders", "only for a group program")
    if p.allows_supplementary:
        if not p.stored_value:
            v.add(
                f"{prefix}.allows_supplementary",
                "supplementary cards draw on stored value: the program needs stored value",
            )
        if not 1 <= p.max_supplementary_cards <= MAX_SUPPLEMENTARY_CARDS:
            v.add(f"{prefix}.max_supplementary_cards", f"1 to {MAX_SUPPLEMENTARY_CARDS}")
    elif p.max_supplementary_cards:
        v.add(f"{prefix}.max_supplementary_cards", "only when supplementary cards are allowed")


# -- numbers ------------------------------------------------------------------------


def luhn_check_digit(payload: str) -> str:
    """The digit that makes ``payload + digit`` pass the Luhn check."""
    total = 0
    # Doubling starts from the digit next to the check digit.
    for position, char in enumerate(reversed(payload)):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    if not number.isdigit() or len(number) < 2:
        return False
    return luhn_check_digit(number[:-1]) == number[-1]


@dataclass(frozen=True)
class Spread:
    """How serials map onto a range (see the module's docstring)."""

    multiplier: int
    offset: int


def new_spread(capacity: int) -> Spread:
    """A random multiplier prime to the capacity (a power of ten, so: odd
    and not a multiple of five) and a random offset."""
    while True:
        multiplier = secrets.randbelow(capacity)
        if multiplier and math.gcd(multiplier, capacity) == 1:
            return Spread(multiplier, secrets.randbelow(capacity))


def card_number(fmt: NumberFormat, spread: Spread, serial: int) -> str:
    """The number of the ``serial``-th card of a range (0-based)."""
    if not 0 <= serial < fmt.capacity:
        raise ValueError("serial outside the range")
    body = (serial * spread.multiplier + spread.offset) % fmt.capacity
    payload = fmt.prefix + str(body).zfill(fmt.range_digits)
    return payload + luhn_check_digit(payload) if fmt.luhn else payload


def fits(fmt: NumberFormat, number: str) -> bool:
    """Whether a number given from outside (a partner's) is one of the
    range's: its prefix, its length and, if the format has one, a right
    check digit."""
    return (
        number.isdigit()
        and len(number) == fmt.length
        and number.startswith(fmt.prefix)
        and (not fmt.luhn or luhn_valid(number))
    )


def normalise_card_number(raw: str) -> str | None:
    """A number as typed or scanned (spaces and dashes allowed); None when
    it cannot be a card number."""
    digits = raw.replace(" ", "").replace("-", "")
    if not digits.isdigit() or not MIN_NUMBER_LENGTH <= len(digits) <= MAX_NUMBER_LENGTH:
        return None
    return digits
