"""The checkout's rules, pure: what a basket may hold, how member and tier
discounts price it, how the tenders must pay it, and how a refund is shared
out over the lines, the tenders and the points. Amounts are integer minor
units of the store's currency."""

from __future__ import annotations

import datetime as dt
import enum
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass

from chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, Violations
from chassis.ids import random_id

MAX_LINES = 200
MAX_QUANTITY = 9_999
MAX_UNIT_PRICE = 10**10
MAX_CHECKOUT_ID_LENGTH = 64
MAX_REASON_LENGTH = 200


def _new_id(letter: str) -> str:
    return random_id(letter, 15)


def new_sale_id() -> str:
    return _new_id("S")


def new_refund_id() -> str:
    return _new_id("F")


class TenderKind(enum.StrEnum):
    STORED_VALUE = "stored_value"
    POINTS = "points"
    CASH = "cash"
    BANK_CARD = "bank_card"


class SagaStep(enum.StrEnum):
    """Where a checkout is. Before SV_CAPTURED everything can be undone;
    from SV_CAPTURED on (the point of no return: the member's money is
    taken) the checkout can only be completed."""

    STARTED = "started"
    POINTS_HELD = "points_held"
    # A hold was asked of cards: it may exist even if no answer came.
    SV_HOLDING = "sv_holding"
    SV_HELD = "sv_held"
    SV_CAPTURED = "sv_captured"
    # A refund's stored value was given back.
    SV_REFUNDED = "sv_refunded"
    COMMITTED = "committed"
    # Undone after a refusal or a failure: what was taken was given back,
    # and the same checkout may be sent again (once the cause is fixed).
    ABORTED = "aborted"


FINAL_STEPS = frozenset({SagaStep.COMMITTED, SagaStep.ABORTED})
PAST_NO_RETURN = frozenset({SagaStep.SV_CAPTURED, SagaStep.COMMITTED})


@dataclass(frozen=True)
class Line:
    line_no: int
    sku: str
    category: str
    description: str
    quantity: int
    unit_price: int

    @property
    def gross(self) -> int:
        return self.quantity * self.unit_price


@dataclass(frozen=True)
class Tender:
    kind: TenderKind
    amount: int = 0
    points: int = 0
    reference: str = ""


def check_checkout_id(checkout_id: str) -> str:
    text = checkout_id.strip()
    if not text or len(text) > MAX_CHECKOUT_ID_LENGTH:
        raise InvalidArgument(
            [
                FieldViolation(
                    "checkout_id", f"required, at most {MAX_CHECKOUT_ID_LENGTH} characters"
                )
            ]
        )
    return text


def check_basket(lines: Sequence[Line], currencies: Sequence[str], currency: str) -> None:
    """Every problem of the basket at once."""
    v = Violations()
    if not lines:
        v.add("lines", "at least one line")
    if len(lines) > MAX_LINES:
        v.add("lines", f"at most {MAX_LINES} lines")
    for i, (line, code) in enumerate(zip(lines, currencies, strict=True)):
        name = f"lines[{i}]"
        if not line.sku or len(line.sku) > 64:
            v.add(f"{name}.sku", "required, at most 64 characters")
        if len(line.category) > 64:
            v.add(f"{name}.category", "at most 64 characters")
        if len(line.description) > 200:
            v.add(f"{name}.description", "at most 200 characters")
        if not 0 < line.quantity <= MAX_QUANTITY:
            v.add(f"{name}.quantity", f"1 to {MAX_QUANTITY}")
        if not 0 <= line.unit_price <= MAX_UNIT_PRICE:
            v.add(f"{name}.unit_price.minor_units", "not negative")
        if code and code != currency:
            v.add(f"{name}.unit_price.currency_code", f"the store sells in {currency}")
    v.raise_if_any("the basket has invalid lines")


# --- pricing ---------------------------------------------------------------


@dataclass(frozen=True)
class Discount:
    source: str
    description: str
    amount: int


@dataclass(frozen=True)
class PricedLine:
    line: Line
    discounts: tuple[Discount, ...] = ()

    @property
    def discount(self) -> int:
        return sum(d.amount for d in self.discounts)

    @property
    def net(self) -> int:
        return self.line.gross - self.discount


@dataclass(frozen=True)
class PricedBasket:
    lines: tuple[PricedLine, ...]

    @property
    def gross(self) -> int:
        return sum(p.line.gross for p in self.lines)

    @property
    def discount(self) -> int:
        return sum(p.discount for p in self.lines)

    @property
    def total(self) -> int:
        return self.gross - self.discount


@dataclass(frozen=True)
class Buyer:
    """What pricing knows of who buys: nothing for a guest."""

    member_id: str = ""
    program_id: str = ""
    program_discount_bps: int = 0
    tier_id: str = ""
    tier_name: str = ""
    tier_discount_bps: int = 0


def member_pricing(lines: Sequence[Line], buyer: Buyer) -> PricedBasket:
    """The member discount of the card's program or the tier's discount,
    whichever is larger: they do not add up. Each line's discount is
    rounded down, so the member never pays less than the rule says."""
    best = max(
        (
            (buyer.program_discount_bps, "MEMBER", f"member discount {buyer.program_id}"),
            (buyer.tier_discount_bps, "TIER", f"{buyer.tier_name or buyer.tier_id} discount"),
        ),
        key=lambda option: option[0],
    )
    bps, source, label = best
    priced = []
    for line in lines:
        amount = line.gross * bps // 10_000 if buyer.member_id and bps > 0 else 0
        discounts = (Discount(source, f"{label} {bps / 100:g} % off", amount),) if amount else ()
        priced.append(PricedLine(line, discounts))
    return PricedBasket(tuple(priced))


# --- tenders -----------------------------------------------------------------


@dataclass(frozen=True)
class PointsRate:
    """``points`` points are worth ``minor_units``; at most ``max_share_bps``
    of a sale may be paid with points."""

    points: int
    minor_units: int
    max_share_bps: int

    def value(self, points: int) -> int:
        return points * self.minor_units // self.points

    def most_points(self, total: int, available: int) -> int:
        """The most points a sale of ``total`` may take: within the share,
        within what the member has, and only whole minor units' worth."""
        cap_value = total * self.max_share_bps // 10_000
        by_share = cap_value * self.points // self.minor_units
        usable = min(by_share, available)
        # Only as many points as buy whole minor units.
        return self.value(usable) * self.points // self.minor_units if self.minor_units else 0


@dataclass(frozen=True)
class TenderPlan:
    stored_value: int = 0
    points: int = 0
    points_value: int = 0
    cash: int = 0
    bank_card: int = 0
    bank_reference: str = ""

    @property
    def money(self) -> int:
        return self.stored_value + self.cash + self.bank_card


def plan_tenders(
    total: int,
    tenders: Sequence[Tender],
    rate: PointsRate,
    *,
    member: bool,
    card_pays: bool,
    available_points: int,
) -> TenderPlan:
    """The tenders as the sale will take them, or the refusal a cashier can
    act on. Each kind at most once; together they pay ``total`` exactly."""
    v = Violations()
    seen: set[TenderKind] = set()
    for i, tender in enumerate(tenders):
        if tender.kind in seen:
            v.add(f"tenders[{i}].kind", "each kind of tender at most once")
        seen.add(tender.kind)
        if tender.kind == TenderKind.POINTS:
            if tender.points <= 0:
                v.add(f"tenders[{i}].points", "more than zero")
            if not member:
                v.add(f"tenders[{i}].kind", "a guest has no points")
        elif tender.amount <= 0:
            v.add(f"tenders[{i}].amount.minor_units", "more than zero")
        if tender.kind == TenderKind.STORED_VALUE and not card_pays:
            v.add(f"tenders[{i}].kind", "stored value needs the member's card")
    if not tenders and total > 0:
        v.add("tenders", "at least one tender")
    v.raise_if_any("the tenders are invalid")
    by_kind = {t.kind: t for t in tenders}
    points = by_kind.get(TenderKind.POINTS, Tender(TenderKind.POINTS)).points
    value = rate.value(points)
    if points:
        if points > available_points:
            raise FailedPrecondition(
                "the member has fewer points",
                reason="POINTS_INSUFFICIENT",
                metadata={"available": str(available_points), "asked": str(points)},
            )
        most = rate.most_points(total, available_points)
        if points > most or value * 10_000 > total * rate.max_share_bps:
            raise FailedPrecondition(
                "points may pay only part of a sale",
                reason="POINTS_SHARE_EXCEEDED",
                metadata={"max_points": str(most), "max_share_bps": str(rate.max_share_bps)},
            )
    plan = TenderPlan(
        stored_value=by_kind.get(TenderKind.STORED_VALUE, Tender(TenderKind.CASH)).amount,
        points=points,
        points_value=value,
        cash=by_kind.get(TenderKind.CASH, Tender(TenderKind.CASH)).amount,
        bank_card=by_kind.get(TenderKind.BANK_CARD, Tender(TenderKind.CASH)).amount,
        bank_reference=by_kind.get(TenderKind.BANK_CARD, Tender(TenderKind.CASH)).reference,
    )
    if plan.money + plan.points_value != total:
        raise FailedPrecondition(
            "the tenders do not pay the total",
            reason="TENDERS_DO_NOT_MATCH_TOTAL",
            metadata={
                "total_minor_units": str(total),
                "tendered_minor_units": str(plan.money + plan.points_value),
            },
        )
    return plan


def earnable_paid_with_points(plan: TenderPlan) -> int:
    """The part of the sale paid with points: it earns no points."""
    return plan.points_value


def qualifying_spend(total: int, plan: TenderPlan) -> int:
    """What counts towards tiers: money spent, not points."""
    return total - plan.points_value


# --- refunds -------------------------------------------------------------------


def share(whole: int, part_total: int, done_before: int, done_now: int) -> int:
    """The part of ``whole`` that belongs to ``done_now`` more units out of
    ``part_total``, after ``done_before`` units already took theirs: shares
    are rounded down cumulatively, so that taking everything in pieces ends
    exactly at ``whole``."""
    if part_total <= 0:
        return 0
    after = done_before + done_now
    if after >= part_total:
        return whole - whole * done_before // part_total
    return whole * after // part_total - whole * done_before // part_total


@dataclass(frozen=True)
class SoldLine:
    line_no: int
    quantity: int
    net: int
    quantity_refunded: int


@dataclass(frozen=True)
class SoldTenders:
    """What each tender paid (money, and for points also the points), and
    what was given back of each so far."""

    paid: dict[TenderKind, int]
    refunded: dict[TenderKind, int]
    points: int = 0
    points_refunded: int = 0


# Which tender takes a rounding remainder first: the till's own money.
_REMAINDER_ORDER = (
    TenderKind.CASH,
    TenderKind.BANK_CARD,
    TenderKind.STORED_VALUE,
    TenderKind.POINTS,
)


@dataclass(frozen=True)
class RefundPlan:
    lines: tuple[tuple[int, int], ...]  # (line_no, quantity)
    line_amounts: dict[int, int]
    amount: int
    # Money back by tender (for POINTS: the value of the points returned).
    by_tender: dict[TenderKind, int]
    points: int
    points_to_reverse: int
    whole_sale: bool


def _target(whole: int, done: int, total: int) -> int:
    """Of ``whole``, what belongs to ``done`` out of ``total``, rounded
    down; exactly ``whole`` once everything is done."""
    return whole if done >= total else whole * done // total


def _split_over_tenders(
    tenders: SoldTenders, amount: int, done: int, total: int
) -> dict[TenderKind, int]:
    """How ``amount`` goes back to the tenders, in proportion to what each
    paid, cumulatively: ``done`` of ``total`` will have been refunded."""
    room = {kind: paid - tenders.refunded.get(kind, 0) for kind, paid in tenders.paid.items()}
    by_tender = {
        kind: min(room[kind], max(0, _target(paid, done, total) - tenders.refunded.get(kind, 0)))
        for kind, paid in tenders.paid.items()
    }
    # Rounding (and earlier refunds' rounding) leaves the sum a few minor
    # units off the amount: the till's own money evens it out first. Any
    # split within each tender's room will do; the last refund, whose
    # targets are what each tender paid, ends every tender exact.
    gap = amount - sum(by_tender.values())
    order = _REMAINDER_ORDER if gap > 0 else tuple(reversed(_REMAINDER_ORDER))
    for kind in (k for k in order if k in by_tender):
        step = min(room[kind] - by_tender[kind], gap) if gap > 0 else -min(by_tender[kind], -gap)
        by_tender[kind] += step
        gap -= step
    return by_tender


def plan_refund(
    sold: Sequence[SoldLine],
    asked: Sequence[tuple[int, int]],
    tenders: SoldTenders,
    *,
    total: int,
    refunded_before: int,
    points_earned: int,
    points_reversed_before: int,
) -> RefundPlan:
    """A refund of some quantity of some lines (all that is left when
    ``asked`` is empty): its amount, line by line in proportion to each
    line's net price; how it goes back to the tenders in proportion to what
    each paid; and the earned points to take back in proportion to the
    sale. Refunds in parts end exactly where one whole refund would."""
    by_no = {s.line_no: s for s in sold}
    wanted = list(asked) or [
        (s.line_no, s.quantity - s.quantity_refunded)
        for s in sold
        if s.quantity > s.quantity_refunded
    ]
    if not wanted:
        raise FailedPrecondition("nothing is left to refund", reason="REFUND_EXCEEDS_SALE")
    v = Violations()
    seen: set[int] = set()
    for i, (line_no, quantity) in enumerate(wanted):
        if line_no not in by_no:
            v.add(f"lines[{i}].line_no", "not a line of this sale")
        if line_no in seen:
            v.add(f"lines[{i}].line_no", "given twice")
        seen.add(line_no)
        if quantity <= 0:
            v.add(f"lines[{i}].quantity", "more than zero")
    v.raise_if_any("the refund has invalid lines")
    line_amounts: dict[int, int] = {}
    for line_no, quantity in wanted:
        line = by_no[line_no]
        left = line.quantity - line.quantity_refunded
        if quantity > left:
            raise FailedPrecondition(
                "more than is left of this line",
                reason="REFUND_EXCEEDS_SALE",
                metadata={"line_no": str(line_no), "left": str(left)},
            )
        line_amounts[line_no] = share(line.net, line.quantity, line.quantity_refunded, quantity)
    amount = sum(line_amounts.values())
    done = refunded_before + amount
    by_tender = _split_over_tenders(tenders, amount, done, total)
    whole = all(s.quantity_refunded + dict(wanted).get(s.line_no, 0) == s.quantity for s in sold)
    points = 0
    if tenders.points:
        points = (
            tenders.points - tenders.points_refunded
            if whole
            else max(0, _target(tenders.points, done, total) - tenders.points_refunded)
        )
    reverse = (
        points_earned - points_reversed_before
        if whole
        else max(0, _target(points_earned, done, total) - points_reversed_before)
    )
    return RefundPlan(
        lines=tuple(wanted),
        line_amounts=line_amounts,
        amount=amount,
        by_tender={k: a for k, a in by_tender.items() if a},
        points=points,
        points_to_reverse=reverse,
        whole_sale=whole,
    )


def business_day(at: dt.datetime, time_zone: str) -> dt.date:
    """The store's local day of a moment."""
    return at.astimezone(zoneinfo.ZoneInfo(time_zone)).date()
