"""Pricing a basket: the member's discount, the promotions in force and the
coupons presented, line by line, each discount with the rule that gave it.
Pure and deterministic: the same basket, rules and time give the same
answer. Amounts are integer minor units of the basket's currency.

The order, each step on the running net of every line:

1. The card program's member discount or the tier's discount, whichever is
   larger (they exclude each other), rounded down per line.
2. Promotions in force at the store: their validity window, stores and
   regions, and for member days, birthdays and member prices a member.
   Promotions sharing an exclusion group exclude each other: the one that
   saves most alone wins (then the higher priority, then the smaller id).
   Then either the best EXCLUSIVE promotion alone or every COMBINABLE one
   in priority order, whichever saves more (a tie goes to the combinable
   ones). Double-points promotions change no price: the largest multiplier
   in force is reported apart.
3. Coupons, in the order presented, on their eligible lines (see
   ``apply_coupon``).

A discount never takes a line below zero; the total is the sum of the
lines' nets.
"""

from __future__ import annotations

import datetime as dt
import enum
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from chassis.errors import Violations
from chassis.ids import random_id

MAX_LINES = 200
MAX_QUANTITY = 9_999
MAX_UNIT_PRICE = 10**10
MAX_AMOUNT = 10**12
MAX_COUPONS = 20
NO_MULTIPLIER = 10_000
MAX_MULTIPLIER_BPS = 100_000


def new_promotion_id() -> str:
    return random_id("P", 15)


class Source(enum.StrEnum):
    MEMBER = "member"
    TIER = "tier"
    PROMOTION = "promotion"
    COUPON = "coupon"


class PromotionKind(enum.StrEnum):
    MEMBER_PRICE = "member_price"
    PERCENT_OFF = "percent_off"
    SPEND_SAVE = "spend_save"
    MEMBER_DAY = "member_day"
    BIRTHDAY = "birthday"
    DOUBLE_POINTS = "double_points"


# Kinds that only ever apply to a member.
MEMBER_KINDS = frozenset(
    {
        PromotionKind.MEMBER_PRICE,
        PromotionKind.MEMBER_DAY,
        PromotionKind.BIRTHDAY,
        PromotionKind.DOUBLE_POINTS,
    }
)
PERCENT_KINDS = frozenset(
    {PromotionKind.PERCENT_OFF, PromotionKind.MEMBER_DAY, PromotionKind.BIRTHDAY}
)


class Stacking(enum.StrEnum):
    COMBINABLE = "combinable"
    EXCLUSIVE = "exclusive"


@dataclass(frozen=True)
class Line:
    line_no: int
    sku: str
    category: str
    quantity: int
    unit_price: int

    @property
    def gross(self) -> int:
        return self.quantity * self.unit_price


@dataclass(frozen=True)
class Discount:
    source: Source
    rule_id: str
    description: str
    amount: int
    coupon_id: str = ""


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

    def plus(self, discount: Discount) -> PricedLine:
        return replace(self, discounts=(*self.discounts, discount)) if discount.amount else self


@dataclass(frozen=True)
class Scope:
    """Which lines a rule applies to: empty SKUs and categories both mean
    every line."""

    skus: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()

    def covers(self, line: Line) -> bool:
        if not self.skus and not self.categories:
            return True
        return line.sku in self.skus or line.category in self.categories


@dataclass(frozen=True)
class Promotion:
    promotion_id: str
    name: str
    kind: PromotionKind
    starts_at: dt.datetime
    currency: str
    ends_at: dt.datetime | None = None
    store_ids: frozenset[str] = frozenset()
    region_ids: frozenset[str] = frozenset()
    scope: Scope = Scope()
    priority: int = 0
    stacking: Stacking = Stacking.COMBINABLE
    exclusion_group: str = ""
    percent_bps: int = 0
    member_price: int = 0
    threshold: int = 0
    save: int = 0
    repeating: bool = False
    weekdays: frozenset[int] = frozenset()
    month_days: frozenset[int] = frozenset()
    points_multiplier_bps: int = 0
    time_zone: str = "UTC"
    members_only: bool = False
    description: str = ""

    def in_force(self, at: dt.datetime) -> bool:
        return self.starts_at <= at and (self.ends_at is None or at < self.ends_at)

    def at_store(self, store_id: str, region_id: str) -> bool:
        if not self.store_ids and not self.region_ids:
            return True
        return store_id in self.store_ids or (bool(region_id) and region_id in self.region_ids)

    def local(self, at: dt.datetime) -> dt.datetime:
        return at.astimezone(zoneinfo.ZoneInfo(self.time_zone))


@dataclass(frozen=True)
class Buyer:
    member_id: str = ""
    program_id: str = ""
    member_discount_bps: int = 0
    tier_id: str = ""
    tier_name: str = ""
    tier_discount_bps: int = 0
    birthday_month: int = 0


@dataclass(frozen=True)
class Context:
    store_id: str
    region_id: str
    at: dt.datetime
    currency: str
    buyer: Buyer = Buyer()


def money_text(amount: int, currency: str) -> str:
    sign = "-" if amount < 0 else ""
    return f"{sign}{abs(amount) // 100}.{abs(amount) % 100:02d} {currency}"


def percent_text(bps: int) -> str:
    return f"{bps / 100:g}%"


# --- checks ---------------------------------------------------------------------


def check_lines(lines: Sequence[Line], currencies: Sequence[str]) -> str:
    """Every problem of the basket at once; returns its one currency."""
    v = Violations()
    if not lines:
        v.add("lines", "at least one line")
    if len(lines) > MAX_LINES:
        v.add("lines", f"at most {MAX_LINES} lines")
    seen: set[int] = set()
    for i, line in enumerate(lines):
        name = f"lines[{i}]"
        if line.line_no in seen:
            v.add(f"{name}.line_no", "unique within the basket")
        seen.add(line.line_no)
        if not line.sku.strip() or len(line.sku) > 64:
            v.add(f"{name}.sku", "required, at most 64 characters")
        if len(line.category) > 64:
            v.add(f"{name}.category", "at most 64 characters")
        if not 0 < line.quantity <= MAX_QUANTITY:
            v.add(f"{name}.quantity", f"1 to {MAX_QUANTITY}")
        if not 0 <= line.unit_price <= MAX_UNIT_PRICE:
            v.add(f"{name}.unit_price.minor_units", f"0 to {MAX_UNIT_PRICE}")
    codes = {c for c in currencies}
    if len(codes) > 1:
        v.add("lines", "every line in one currency")
    currency = next(iter(codes), "")
    if lines and not check_currency(currency):
        v.add("lines[0].unit_price.currency_code", "an ISO 4217 code such as CNY")
    v.raise_if_any("the basket has invalid lines")
    return currency


def check_currency(code: str) -> bool:
    return len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()


def check_promotion(p: Promotion, prefix: str = "promotion") -> Promotion:  # noqa: PLR0912 - a check a field
    v = Violations()
    if not p.name.strip() or len(p.name) > 100:
        v.add(f"{prefix}.display_name", "required, at most 100 characters")
    if len(p.description) > 500:
        v.add(f"{prefix}.description", "at most 500 characters")
    if not check_currency(p.currency) and p.kind in (
        PromotionKind.MEMBER_PRICE,
        PromotionKind.SPEND_SAVE,
    ):
        v.add(f"{prefix}.currency_code", "an ISO 4217 code such as CNY")
    if p.ends_at is not None and p.ends_at <= p.starts_at:
        v.add(f"{prefix}.end_time", "after start_time")
    if len(p.exclusion_group) > 64:
        v.add(f"{prefix}.exclusion_group", "at most 64 characters")
    if not -1000 <= p.priority <= 1000:
        v.add(f"{prefix}.priority", "-1000 to 1000")
    try:
        zoneinfo.ZoneInfo(p.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        v.add(f"{prefix}.time_zone", "an IANA time zone such as Asia/Shanghai")
    if p.kind in PERCENT_KINDS and not 0 < p.percent_bps <= 10_000:
        v.add(f"{prefix}.percent_bps", "1 to 10000")
    if p.kind == PromotionKind.MEMBER_PRICE:
        if not p.scope.skus or p.scope.categories:
            v.add(f"{prefix}.skus", "a member price names its SKUs (and no categories)")
        if not 0 <= p.member_price <= MAX_UNIT_PRICE:
            v.add(f"{prefix}.member_price", f"0 to {MAX_UNIT_PRICE}")
    if p.kind == PromotionKind.SPEND_SAVE:
        if not 0 < p.threshold <= MAX_AMOUNT:
            v.add(f"{prefix}.threshold", "more than zero")
        if not 0 < p.save <= p.threshold:
            v.add(f"{prefix}.save", "more than zero and at most the threshold")
    if p.kind == PromotionKind.MEMBER_DAY:
        if not p.weekdays and not p.month_days:
            v.add(f"{prefix}.weekdays", "weekdays or month_days")
        if any(not 1 <= d <= 7 for d in p.weekdays):
            v.add(f"{prefix}.weekdays", "1 (Monday) to 7 (Sunday)")
        if any(not 1 <= d <= 31 for d in p.month_days):
            v.add(f"{prefix}.month_days", "1 to 31")
    if p.kind == PromotionKind.DOUBLE_POINTS:
        if not NO_MULTIPLIER < p.points_multiplier_bps <= MAX_MULTIPLIER_BPS:
            v.add(f"{prefix}.points_multiplier_bps", "10001 to 100000 (20000 = double)")
        if p.stacking == Stacking.EXCLUSIVE or p.exclusion_group:
            v.add(f"{prefix}.stacking", "double points change no price and do not stack")
    v.raise_if_any("the promotion has invalid fields")
    return p


# --- the member discount -------------------------------------------------------------


def member_discount(lines: Sequence[PricedLine], buyer: Buyer) -> list[PricedLine]:
    if not buyer.member_id:
        return list(lines)
    member = (buyer.member_discount_bps, Source.MEMBER, buyer.program_id, "member discount")
    tier_label = f"{buyer.tier_name or buyer.tier_id} tier discount"
    tier = (buyer.tier_discount_bps, Source.TIER, buyer.tier_id, tier_label)
    # The larger; on a tie the program's.
    bps, source, rule_id, label = tier if tier[0] > member[0] else member
    if not 0 < bps <= 10_000:
        return list(lines)
    return [
        p.plus(
            Discount(source, rule_id, f"{label}: {percent_text(bps)} off", p.net * bps // 10_000)
        )
        for p in lines
    ]


# --- promotions ------------------------------------------------------------------------


def spread(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` shared out in proportion to ``weights`` (each share at
    most its weight when total <= sum(weights)), exactly: floor shares, then
    the remainder one unit at a time to the largest fractional parts (the
    earlier line on a tie)."""
    whole = sum(weights)
    if whole <= 0 or total <= 0:
        return [0] * len(weights)
    total = min(total, whole)
    shares = [total * w // whole for w in weights]
    left = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in order:
        if left == 0:
            break
        if shares[i] < weights[i]:
            shares[i] += 1
            left -= 1
    return shares


def applies_now(p: Promotion, ctx: Context) -> bool:
    """In force at the store, for this buyer, today."""
    if not p.in_force(ctx.at) or not p.at_store(ctx.store_id, ctx.region_id):
        return False
    member = bool(ctx.buyer.member_id)
    if (p.kind in MEMBER_KINDS or p.members_only) and not member:
        return False
    if p.kind in (PromotionKind.MEMBER_PRICE, PromotionKind.SPEND_SAVE) and (
        p.currency != ctx.currency
    ):
        return False
    if p.kind == PromotionKind.MEMBER_DAY:
        local = p.local(ctx.at)
        return local.isoweekday() in p.weekdays or local.day in p.month_days
    if p.kind == PromotionKind.BIRTHDAY:
        return ctx.buyer.birthday_month == p.local(ctx.at).month
    return True


def apply_promotion(p: Promotion, lines: Sequence[PricedLine]) -> list[PricedLine]:
    """One promotion on the running nets."""
    covered = [i for i, pl in enumerate(lines) if p.scope.covers(pl.line) and pl.net > 0]
    out = list(lines)
    name = p.name
    if p.kind in PERCENT_KINDS:
        what = {
            PromotionKind.PERCENT_OFF: "off",
            PromotionKind.MEMBER_DAY: "off on member day",
            PromotionKind.BIRTHDAY: "off in your birthday month",
        }[p.kind]
        for i in covered:
            amount = out[i].net * p.percent_bps // 10_000
            text = f"{name}: {percent_text(p.percent_bps)} {what}"
            out[i] = out[i].plus(Discount(Source.PROMOTION, p.promotion_id, text, amount))
    elif p.kind == PromotionKind.MEMBER_PRICE:
        for i in covered:
            line = out[i].line
            target = line.quantity * p.member_price
            amount = max(0, out[i].net - target)
            text = f"{name}: member price {money_text(p.member_price, p.currency)} each"
            out[i] = out[i].plus(Discount(Source.PROMOTION, p.promotion_id, text, amount))
    elif p.kind == PromotionKind.SPEND_SAVE:
        nets = [out[i].net for i in covered]
        subtotal = sum(nets)
        if subtotal >= p.threshold:
            times = subtotal // p.threshold if p.repeating else 1
            save = min(subtotal, times * p.save)
            text = (
                f"{name}: spend {money_text(p.threshold, p.currency)}, "
                f"save {money_text(p.save, p.currency)}" + (f" (x{times})" if times > 1 else "")
            )
            for i, share in zip(covered, spread(save, nets), strict=True):
                out[i] = out[i].plus(Discount(Source.PROMOTION, p.promotion_id, text, share))
    return out


def _saving(before: Sequence[PricedLine], after: Sequence[PricedLine]) -> int:
    return sum(b.net for b in before) - sum(a.net for a in after)


# On equal priority: a member price (a price, not a discount) first, then
# the percentages, the day-based ones, and spend-X-save-Y last, on what the
# others left; the id only breaks ties between promotions of one kind.
_KIND_ORDER = {
    PromotionKind.MEMBER_PRICE: 0,
    PromotionKind.PERCENT_OFF: 1,
    PromotionKind.MEMBER_DAY: 2,
    PromotionKind.BIRTHDAY: 3,
    PromotionKind.SPEND_SAVE: 4,
}


def _order(p: Promotion) -> tuple[int, int, str]:
    return (-p.priority, _KIND_ORDER.get(p.kind, 5), p.promotion_id)


@dataclass(frozen=True)
class PromotionResult:
    lines: list[PricedLine]
    applied: tuple[str, ...]
    points_multiplier_bps: int = NO_MULTIPLIER
    points_promotion_id: str = ""


def apply_promotions(
    promotions: Iterable[Promotion], lines: Sequence[PricedLine], ctx: Context
) -> PromotionResult:
    live = sorted((p for p in promotions if applies_now(p, ctx)), key=_order)
    multiplier, points_id = NO_MULTIPLIER, ""
    for p in live:
        if p.kind == PromotionKind.DOUBLE_POINTS and p.points_multiplier_bps > multiplier:
            multiplier, points_id = p.points_multiplier_bps, p.promotion_id
    priced = [p for p in live if p.kind != PromotionKind.DOUBLE_POINTS]
    alone = {p.promotion_id: _saving(lines, apply_promotion(p, lines)) for p in priced}
    # Exclusion groups: the best alone wins.
    winners: dict[str, Promotion] = {}
    for p in priced:
        if not p.exclusion_group:
            continue
        best = winners.get(p.exclusion_group)
        if best is None or alone[p.promotion_id] > alone[best.promotion_id]:
            winners[p.exclusion_group] = p
    kept = [p for p in priced if not p.exclusion_group or winners[p.exclusion_group] is p]
    kept = [p for p in kept if alone[p.promotion_id] > 0]
    stacked = list(lines)
    stack_ids: list[str] = []
    for p in (p for p in kept if p.stacking == Stacking.COMBINABLE):
        after = apply_promotion(p, stacked)
        if _saving(stacked, after) > 0:
            stacked, stack_ids = after, [*stack_ids, p.promotion_id]
    best_exclusive: Promotion | None = None
    for p in (p for p in kept if p.stacking == Stacking.EXCLUSIVE):
        if best_exclusive is None or alone[p.promotion_id] > alone[best_exclusive.promotion_id]:
            best_exclusive = p
    if best_exclusive is not None and alone[best_exclusive.promotion_id] > _saving(lines, stacked):
        return PromotionResult(
            apply_promotion(best_exclusive, lines),
            (best_exclusive.promotion_id,),
            multiplier,
            points_id,
        )
    return PromotionResult(stacked, tuple(stack_ids), multiplier, points_id)


# --- coupons ----------------------------------------------------------------------------


class CouponKind(enum.StrEnum):
    AMOUNT_OFF = "amount_off"
    PERCENT_OFF = "percent_off"
    GIFT_ITEM = "gift_item"
    FREE_SERVICE = "free_service"


@dataclass(frozen=True)
class CouponTerms:
    """What a coupon gives and where: its template's terms."""

    template_id: str
    name: str
    kind: CouponKind
    currency: str
    amount_off: int = 0
    percent_bps: int = 0
    max_discount: int | None = None
    gift_sku: str = ""
    min_spend: int = 0
    store_ids: frozenset[str] = frozenset()
    scope: Scope = Scope()


@dataclass(frozen=True)
class CouponOutcome:
    lines: list[PricedLine]
    discount: int
    refusal: str = ""
    description: str = ""


def apply_coupon(  # noqa: PLR0911 - one answer a refusal
    terms: CouponTerms, coupon_id: str, lines: Sequence[PricedLine], ctx: Context
) -> CouponOutcome:
    """One coupon on the running nets (after promotions and the coupons
    before it). Amount off: at most the eligible lines' net, spread over
    them in proportion. Percent off: of the eligible net, at most the cap,
    spread likewise. Gift item and free service: one unit of the named SKU
    free (its net per unit, rounded up), when it is in the basket. The
    minimum spend counts the eligible lines' net after promotions."""
    if terms.store_ids and ctx.store_id not in terms.store_ids:
        return CouponOutcome(list(lines), 0, "COUPON_NOT_APPLICABLE", "not valid in this store")
    if terms.currency != ctx.currency:
        return CouponOutcome(list(lines), 0, "COUPON_NOT_APPLICABLE", "another currency")
    eligible = [i for i, pl in enumerate(lines) if terms.scope.covers(pl.line) and pl.net > 0]
    nets = [lines[i].net for i in eligible]
    subtotal = sum(nets)
    if subtotal <= 0:
        return CouponOutcome(
            list(lines), 0, "COUPON_NOT_APPLICABLE", "nothing in the basket it applies to"
        )
    if subtotal < terms.min_spend:
        return CouponOutcome(
            list(lines),
            0,
            "COUPON_MINIMUM_SPEND",
            f"needs {money_text(terms.min_spend, terms.currency)} of eligible items",
        )
    out = list(lines)
    if terms.kind in (CouponKind.GIFT_ITEM, CouponKind.FREE_SERVICE):
        gift = [i for i in eligible if lines[i].line.sku == terms.gift_sku]
        if not gift:
            return CouponOutcome(
                list(lines), 0, "COUPON_NOT_APPLICABLE", f"{terms.gift_sku} is not in the basket"
            )
        i = gift[0]
        line = lines[i]
        amount = min(line.net, -(-line.net // line.line.quantity))
        what = "free gift" if terms.kind == CouponKind.GIFT_ITEM else "free service"
        text = f"{terms.name}: one {terms.gift_sku} {what}"
        out[i] = line.plus(Discount(Source.COUPON, terms.template_id, text, amount, coupon_id))
        return CouponOutcome(out, amount, description=text)
    if terms.kind == CouponKind.AMOUNT_OFF:
        amount = min(terms.amount_off, subtotal)
        text = f"{terms.name}: {money_text(terms.amount_off, terms.currency)} off"
    else:
        amount = subtotal * terms.percent_bps // 10_000
        text = f"{terms.name}: {percent_text(terms.percent_bps)} off"
        if terms.max_discount is not None and amount > terms.max_discount:
            amount = terms.max_discount
            text += f", at most {money_text(terms.max_discount, terms.currency)}"
    for i, share in zip(eligible, spread(amount, nets), strict=True):
        out[i] = out[i].plus(Discount(Source.COUPON, terms.template_id, text, share, coupon_id))
    return CouponOutcome(out, amount, description=text)


# --- the whole basket ------------------------------------------------------------------------


@dataclass(frozen=True)
class PresentedCoupon:
    """A code as presented, with what the store knows of it: its coupon and
    terms, or why it cannot be used at all (not found, not yours, expired,
    used ...), decided before pricing."""

    code: str
    coupon_id: str = ""
    terms: CouponTerms | None = None
    refusal: str = ""
    refusal_text: str = ""


@dataclass(frozen=True)
class CouponUse:
    code: str
    coupon_id: str
    template_id: str
    accepted: bool
    discount: int
    refusal: str = ""
    description: str = ""


@dataclass(frozen=True)
class Priced:
    lines: tuple[PricedLine, ...]
    coupons: tuple[CouponUse, ...]
    promotions: tuple[str, ...]
    points_multiplier_bps: int = NO_MULTIPLIER
    points_promotion_id: str = ""
    currency: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def gross(self) -> int:
        return sum(p.line.gross for p in self.lines)

    @property
    def total(self) -> int:
        return sum(p.net for p in self.lines)

    @property
    def discount(self) -> int:
        return self.gross - self.total


def price(
    lines: Sequence[Line],
    ctx: Context,
    promotions: Iterable[Promotion] = (),
    coupons: Sequence[PresentedCoupon] = (),
) -> Priced:
    priced = member_discount([PricedLine(line) for line in lines], ctx.buyer)
    promoted = apply_promotions(promotions, priced, ctx)
    running = promoted.lines
    uses: list[CouponUse] = []
    seen: set[str] = set()
    for presented in coupons:
        terms = presented.terms
        if presented.coupon_id and presented.coupon_id in seen:
            uses.append(
                CouponUse(
                    presented.code,
                    presented.coupon_id,
                    terms.template_id if terms else "",
                    False,
                    0,
                    "COUPON_DUPLICATE",
                    "presented twice",
                )
            )
            continue
        seen.add(presented.coupon_id)
        if presented.refusal or terms is None:
            uses.append(
                CouponUse(
                    presented.code,
                    presented.coupon_id,
                    terms.template_id if terms else "",
                    False,
                    0,
                    presented.refusal or "COUPON_NOT_FOUND",
                    presented.refusal_text,
                )
            )
            continue
        outcome = apply_coupon(terms, presented.coupon_id, running, ctx)
        if outcome.refusal:
            uses.append(
                CouponUse(
                    presented.code,
                    presented.coupon_id,
                    terms.template_id,
                    False,
                    0,
                    outcome.refusal,
                    outcome.description,
                )
            )
            continue
        running = outcome.lines
        uses.append(
            CouponUse(
                presented.code,
                presented.coupon_id,
                terms.template_id,
                True,
                outcome.discount,
                description=outcome.description,
            )
        )
    return Priced(
        tuple(running),
        tuple(uses),
        promoted.applied,
        promoted.points_multiplier_bps,
        promoted.points_promotion_id,
        ctx.currency,
    )
