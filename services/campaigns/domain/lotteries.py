"""Points lotteries' rules, pure: the lottery's validation and the mapping
of a draw's randomness onto its prize table.

The outcome of a round is a function of (seed, draw id, round, table) and
nothing else, so that an auditor can recompute it from the draw's record:

    roll   = HMAC-SHA256(key=seed, msg=f"{draw_id}:{round}") as a big-endian
             unsigned 256-bit integer
    table  = the prizes with stock > 0 (and weight > 0), by prize_id
    total  = sum(their weights) + no_prize_weight
    point  = roll mod total
    prize  = the first in table order whose cumulative weight exceeds
             point; none when point falls in the no-prize range at the end
             (or total is 0)

With 256 random bits and totals under 2**63 the modulo's bias is below
2**-190: the frequencies are the weights'.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from chassis.errors import Violations
from chassis.ids import random_id

ALGORITHM = "hmac-sha256-v1"
SEED_BYTES = 32
MAX_PRIZES = 50
MAX_AMOUNT = 1_000_000_000
MAX_NAME_LENGTH = 100
PRIZE_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def _new_id(letter: str) -> str:
    return random_id(letter, 15)


def new_lottery_id() -> str:
    return _new_id("Y")


def new_draw_id() -> str:
    return _new_id("D")


def new_seed() -> bytes:
    """A draw's 256 bits of randomness, from the operating system."""
    return secrets.token_bytes(SEED_BYTES)


class PrizeKind(enum.StrEnum):
    COUPON = "coupon"
    POINTS = "points"
    GIFT = "gift"


class DrawState(enum.StrEnum):
    CHARGING = "charging"
    DRAWN = "drawn"
    REFUNDING = "refunding"
    REFUNDED = "refunded"


class Fulfilment(enum.StrEnum):
    NONE = "none"
    COUPON_ISSUED = "coupon_issued"
    POINTS_PENDING = "points_pending"
    POINTS_AWARDED = "points_awarded"
    GIFT_TO_COLLECT = "gift_to_collect"


@dataclass(frozen=True)
class Prize:
    prize_id: str
    kind: PrizeKind
    display_name: str = ""
    template_id: str = ""
    points: int = 0
    gift_id: str = ""
    stock: int = 0
    weight: int = 1


@dataclass(frozen=True)
class Lottery:
    lottery_id: str
    display_name: str
    start_at: dt.datetime
    end_at: dt.datetime
    cost_points: int
    prizes: tuple[Prize, ...]
    no_prize_weight: int
    table_version: int = 1

    def open_at(self, at: dt.datetime) -> bool:
        return self.start_at <= at < self.end_at

    def prize(self, prize_id: str) -> Prize | None:
        return next((p for p in self.prizes if p.prize_id == prize_id), None)


def validate(lottery: Lottery) -> Lottery:
    """INVALID_ARGUMENT with every problem at once."""
    v = Violations()
    if not lottery.display_name.strip():
        v.add("lottery.display_name", "required")
    elif len(lottery.display_name) > MAX_NAME_LENGTH:
        v.add("lottery.display_name", f"at most {MAX_NAME_LENGTH} characters")
    if lottery.end_at <= lottery.start_at:
        v.add("lottery.end_time", "must be after start_time")
    if not 0 < lottery.cost_points <= MAX_AMOUNT:
        v.add("lottery.cost_points", f"1 to {MAX_AMOUNT}")
    if not 0 <= lottery.no_prize_weight <= MAX_AMOUNT:
        v.add("lottery.no_prize_weight", f"0 to {MAX_AMOUNT}")
    if not 0 < len(lottery.prizes) <= MAX_PRIZES:
        v.add("lottery.prizes", f"1 to {MAX_PRIZES} prizes")
    seen: set[str] = set()
    for i, p in enumerate(lottery.prizes):
        at = f"lottery.prizes[{i}]"
        if not PRIZE_ID.match(p.prize_id):
            v.add(f"{at}.prize_id", "letters, digits, '-' and '_', 1 to 40")
        elif p.prize_id in seen:
            v.add(f"{at}.prize_id", "used twice")
        seen.add(p.prize_id)
        _validate_prize(v, at, p)
    v.raise_if_any()
    return lottery


def _validate_prize(v: Violations, at: str, p: Prize) -> None:
    if len(p.display_name) > MAX_NAME_LENGTH:
        v.add(f"{at}.display_name", f"at most {MAX_NAME_LENGTH} characters")
    if not 0 <= p.stock <= MAX_AMOUNT:
        v.add(f"{at}.stock", f"0 to {MAX_AMOUNT}")
    if not 0 < p.weight <= MAX_AMOUNT:
        v.add(f"{at}.weight", f"1 to {MAX_AMOUNT}")
    if p.kind == PrizeKind.COUPON and not p.template_id:
        v.add(f"{at}.coupon_template_id", "required for a coupon prize")
    if p.kind == PrizeKind.POINTS and not 0 < p.points <= MAX_AMOUNT:
        v.add(f"{at}.points", f"1 to {MAX_AMOUNT} for a points prize")
    if p.kind == PrizeKind.GIFT and not p.gift_id:
        v.add(f"{at}.gift_id", "required for a gift prize")


# --- the outcome ------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A prize as a round saw it."""

    prize_id: str
    stock: int
    weight: int


@dataclass(frozen=True)
class Round:
    """One round: the table it was drawn on and what it gave. ``given``
    false with a ``refusal``: the prize could not be taken after all
    (OUT_OF_STOCK, or the coupon's reason) and another round followed."""

    round: int
    table: tuple[Entry, ...]
    no_prize_weight: int
    roll: int
    total: int
    point: int
    prize_id: str
    given: bool = True
    refusal: str = ""


def roll(seed: bytes, draw_id: str, round_no: int) -> int:
    digest = hmac.new(seed, f"{draw_id}:{round_no}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest, "big")


def in_stock(table: Sequence[Entry]) -> list[Entry]:
    """The entries a round can give, in the mapping's order."""
    return sorted(
        (e for e in table if e.stock > 0 and e.weight > 0), key=lambda e: e.prize_id.encode()
    )


def pick(value: int, table: Sequence[Entry], no_prize_weight: int) -> tuple[int, int, str]:
    """(total, point, prize_id) for a roll: "" for no prize."""
    entries = in_stock(table)
    total = sum(e.weight for e in entries) + max(0, no_prize_weight)
    if total <= 0:
        return 0, 0, ""
    point = value % total
    upper = 0
    for e in entries:
        upper += e.weight
        if point < upper:
            return total, point, e.prize_id
    return total, point, ""


def draw_round(
    seed: bytes, draw_id: str, round_no: int, table: Sequence[Entry], no_prize_weight: int
) -> Round:
    value = roll(seed, draw_id, round_no)
    total, point, prize_id = pick(value, table, no_prize_weight)
    return Round(round_no, tuple(table), no_prize_weight, value, total, point, prize_id)


@dataclass(frozen=True)
class Audit:
    matches: bool
    recomputed: list[Round]
    mismatches: list[str] = field(default_factory=list)


def audit(seed: bytes, draw_id: str, rounds: Sequence[Round], prize_id: str) -> Audit:
    """Recomputes every recorded round from the seed and its table: each
    must give what was recorded; every round but the last was not given,
    and its prize is at stock 0 (or was refused) in the next round's table;
    the last round's prize is the draw's."""
    mismatches: list[str] = []
    recomputed: list[Round] = []
    if not rounds:
        mismatches.append("no rounds recorded")
    for i, recorded in enumerate(rounds):
        again = draw_round(seed, draw_id, i, recorded.table, recorded.no_prize_weight)
        recomputed.append(
            Round(
                i,
                again.table,
                again.no_prize_weight,
                again.roll,
                again.total,
                again.point,
                again.prize_id,
                recorded.given,
                recorded.refusal,
            )
        )
        if recorded.round != i:
            mismatches.append(f"round {i}: recorded as round {recorded.round}")
        if (again.roll, again.total, again.point, again.prize_id) != (
            recorded.roll,
            recorded.total,
            recorded.point,
            recorded.prize_id,
        ):
            mismatches.append(
                f"round {i}: recomputed {again.prize_id or 'no prize'},"
                f" recorded {recorded.prize_id or 'no prize'}"
            )
        last = i == len(rounds) - 1
        if not last:
            if recorded.given or not recorded.prize_id:
                mismatches.append(f"round {i}: followed by another round but was given")
            else:
                after = {e.prize_id: e.stock for e in rounds[i + 1].table}
                if after.get(recorded.prize_id, 0) > 0:
                    mismatches.append(
                        f"round {i}: {recorded.prize_id} still in stock in the next round"
                    )
        elif recorded.prize_id != prize_id or not recorded.given:
            mismatches.append(f"the draw's prize is {prize_id or 'none'}, not the last round's")
    return Audit(not mismatches, recomputed, mismatches)
