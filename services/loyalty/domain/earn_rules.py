"""Earn rules: how many points a sale earns, and why. Pure.

A chain publishes its rules as a set (versioned and immutable; the store
keeps them). ``evaluate`` applies a set to one sale:

1. EXCLUSION rules: lines of excluded categories or SKUs earn nothing.
2. The part of the sale paid with points earns nothing: every line's
   earnable amount is reduced in proportion to the points-paid share of
   the sale (all lines, excluded ones too, share the points payment).
3. BASE_RATE: the most specific base rate matching the program and the
   tier (program and tier > program > tier > the default) gives points per
   1.00 of the currency, i.e. per 10^exponent minor units.
4. MULTIPLIER: per line, the largest of the multipliers matching it; they
   never stack.
5. PROMOTION: the largest promotion of the day, on the whole sale.
6. The member's tier points multiplier (passed in by the caller).
7. ROUNDING of the sale's total (DOWN unless a rule says otherwise).
8. CAP_PER_SALE, then CAP_PER_DAY against what was earned that day.

Everything up to the rounding is exact (fractions), so the result does not
depend on the order of the lines. Each step that applied becomes an
``EarnStep`` with a sentence a cashier can read; a step's ``points_delta``
is how much it moved the rounded running total, so the deltas add up to
the result.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from chassis.errors import Violations
from chassis.spreadsheets import amount_value, minor_unit_digits

MAX_RULES = 200
MAX_SCOPE_VALUES = 1000
MAX_SCOPE_VALUE_LENGTH = 64
MAX_NAME_LENGTH = 100
MAX_FACTOR_BPS = 100_000
MAX_MILLIPOINTS_PER_UNIT = 1_000_000
MAX_CAP_POINTS = 10**9
MAX_LINES = 500
# As stored value: large enough for any real sale, small enough that sums
# of many never leave a 64-bit integer.
MAX_AMOUNT = 10**12
ONE_BPS = 10_000
RULE_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class RuleKind(enum.StrEnum):
    BASE_RATE = "BASE_RATE"
    MULTIPLIER = "MULTIPLIER"
    PROMOTION = "PROMOTION"
    CAP_PER_SALE = "CAP_PER_SALE"
    CAP_PER_DAY = "CAP_PER_DAY"
    EXCLUSION = "EXCLUSION"
    ROUNDING = "ROUNDING"


class Rounding(enum.StrEnum):
    DOWN = "DOWN"
    HALF_UP = "HALF_UP"
    UP = "UP"


# Steps that are not a rule of the set.
STEP_TIER = "TIER"
STEP_POINTS_PAID = "POINTS_PAID"

_ROUNDING_WORDS = {Rounding.DOWN: "down", Rounding.HALF_UP: "half up", Rounding.UP: "up"}
_WEEKDAYS = ("Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays", "Saturdays", "Sundays")


@dataclass(frozen=True)
class EarnRule:
    """One rule; only the fields of its kind are set (see ``check_rule_set``)."""

    rule_id: str
    kind: RuleKind
    name: str = ""
    # BASE_RATE: thousandths of a point per 1.00 of the currency.
    millipoints_per_unit: int = 0
    program_ids: frozenset[str] = frozenset()
    tier_ids: frozenset[str] = frozenset()
    # MULTIPLIER, PROMOTION: 20000 is x2.
    factor_bps: int = 0
    store_ids: frozenset[str] = frozenset()
    terminal_ids: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    skus: frozenset[str] = frozenset()
    # PROMOTION
    dates: frozenset[dt.date] = frozenset()
    # ISO weekdays, 1 (Monday) to 7 (Sunday).
    weekdays: frozenset[int] = frozenset()
    birthday_month: bool = False
    # CAP_PER_SALE, CAP_PER_DAY
    cap_points: int = 0
    # ROUNDING
    rounding: Rounding | None = None

    @property
    def label(self) -> str:
        """How explanations name the rule: its name, or what it does."""
        what = self.name or self._description()
        return f"{what} (rule {self.rule_id})" if what else f"rule {self.rule_id}"

    def _description(self) -> str:
        if self.kind == RuleKind.MULTIPLIER:
            scope = _scope_words(self)
            return f"{factor_text(self.factor_bps)} points" + (f" on {scope}" if scope else "")
        if self.kind == RuleKind.PROMOTION:
            return f"{factor_text(self.factor_bps)} points day"
        if self.kind == RuleKind.EXCLUSION:
            return f"no points on {_scope_words(self)}"
        if self.kind == RuleKind.BASE_RATE:
            return "base rate"
        return ""


def _scope_words(rule: EarnRule) -> str:
    parts = []
    for noun, values in (
        ("category", rule.categories),
        ("SKU", rule.skus),
        ("store", rule.store_ids),
        ("terminal", rule.terminal_ids),
    ):
        if values:
            shown = ", ".join(sorted(values)[:3]) + (", ..." if len(values) > 3 else "")
            parts.append(f"{noun} {shown}")
    return "; ".join(parts)


@dataclass(frozen=True)
class EarnRuleSet:
    """A published version of the rules (version 0: the built-in set)."""

    version: int
    effective_at: dt.datetime
    rules: tuple[EarnRule, ...]

    def of_kind(self, kind: RuleKind) -> list[EarnRule]:
        return [rule for rule in self.rules if rule.kind == kind]

    @property
    def rounding(self) -> tuple[Rounding, EarnRule | None]:
        for rule in self.of_kind(RuleKind.ROUNDING):
            return rule.rounding or Rounding.DOWN, rule
        return Rounding.DOWN, None


DEFAULT_RULE = EarnRule(
    "DEFAULT", RuleKind.BASE_RATE, name="1 point per currency unit", millipoints_per_unit=1000
)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def default_rule_set() -> EarnRuleSet:
    """What is in force until a chain publishes its own: one point per 1.00
    of the currency, rounded down."""
    return EarnRuleSet(version=0, effective_at=EPOCH, rules=(DEFAULT_RULE,))


# --- a sale ---------------------------------------------------------------------


@dataclass(frozen=True)
class EarnLine:
    line_no: int
    sku: str
    category: str
    # After discounts.
    net_minor_units: int


@dataclass(frozen=True)
class EarnContext:
    program_id: str
    tier_id: str
    # The tier's points multiplier; 10000 (or 0) is x1.
    tier_multiplier_bps: int
    store_id: str
    terminal_id: str
    # The store's local day of the sale.
    business_day: dt.date
    birthday_month: int | None
    currency_code: str
    lines: tuple[EarnLine, ...]
    # The part of the sale paid with points (points used as cash).
    paid_with_points_minor_units: int = 0
    # Points the member already earned on this business day.
    earned_today: int = 0
    # A double-points promotion of the campaigns service in force for this
    # sale (10000 is x1, 0 none): it competes with the promotion rules here,
    # the larger wins.
    campaign_multiplier_bps: int = 0
    campaign_promotion_id: str = ""

    @property
    def weekday(self) -> int:
        """ISO: 1 is Monday."""
        return self.business_day.isoweekday()


@dataclass(frozen=True)
class EarnStep:
    rule_id: str
    kind: str
    explanation: str
    points_delta: int


@dataclass(frozen=True)
class EarnResult:
    points: int
    steps: tuple[EarnStep, ...]


# --- formatting -------------------------------------------------------------------


def factor_text(bps: int) -> str:
    """20000 -> 'x2', 15000 -> 'x1.5' (with the multiplication sign)."""
    value = (Decimal(bps) / ONE_BPS).normalize()
    return f"×{value:f}"


def _show(value: Fraction) -> str:
    """Points for reading: whole, or with at most two decimals."""
    if value.denominator == 1:
        return str(value.numerator)
    shown = (Decimal(value.numerator) / Decimal(value.denominator)).quantize(
        Decimal("0.01"), rounding=ROUND_HALF_UP
    )
    return f"{shown.normalize():f}"


def _money(minor_units: Fraction | int, currency: str) -> str:
    whole = math.floor(Fraction(minor_units) + Fraction(1, 2))
    return f"{amount_value(whole, currency)} {currency}"


def _lines_text(line_nos: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in line_nos[:10]) + (", ..." if len(line_nos) > 10 else "")
    return ("line " if len(line_nos) == 1 else "lines ") + shown


def _rate_text(millipoints: int, currency: str) -> str:
    points = (Decimal(millipoints) / 1000).normalize()
    noun = "point" if points == 1 else "points"
    unit = amount_value(10 ** minor_unit_digits(currency), currency)
    return f"{points:f} {noun} per {unit} {currency}"


# --- matching -----------------------------------------------------------------------


def _base_level(rule: EarnRule, ctx: EarnContext) -> int | None:
    """How specific a base rate is for this sale (3: program and tier, 2:
    program, 1: tier, 0: default), or None when it does not match."""
    if rule.program_ids and ctx.program_id not in rule.program_ids:
        return None
    if rule.tier_ids and ctx.tier_id not in rule.tier_ids:
        return None
    return (2 if rule.program_ids else 0) + (1 if rule.tier_ids else 0)


def base_rate_for(rule_set: EarnRuleSet, ctx: EarnContext) -> EarnRule | None:
    best: tuple[int, EarnRule] | None = None
    for rule in rule_set.of_kind(RuleKind.BASE_RATE):
        level = _base_level(rule, ctx)
        if level is not None and (best is None or level > best[0]):
            best = (level, rule)
    return None if best is None else best[1]


def _in(values: frozenset[str], value: str) -> bool:
    return not values or value in values


def multiplier_matches(rule: EarnRule, ctx: EarnContext, line: EarnLine) -> bool:
    return (
        _in(rule.store_ids, ctx.store_id)
        and _in(rule.terminal_ids, ctx.terminal_id)
        and _in(rule.categories, line.category)
        and _in(rule.skus, line.sku)
    )


def excludes(rule: EarnRule, line: EarnLine) -> bool:
    return line.category in rule.categories or line.sku in rule.skus


def promotion_matches(rule: EarnRule, ctx: EarnContext) -> bool:
    if not _in(rule.store_ids, ctx.store_id):
        return False
    day = ctx.business_day
    birthday = (
        rule.birthday_month and ctx.birthday_month is not None and ctx.birthday_month == day.month
    )
    return day in rule.dates or ctx.weekday in rule.weekdays or bool(birthday)


def _largest(rules: Iterable[EarnRule]) -> EarnRule | None:
    """The rule with the largest factor; the first of the set on a tie."""
    best: EarnRule | None = None
    for rule in rules:
        if best is None or rule.factor_bps > best.factor_bps:
            best = rule
    return best


def _rounder(mode: Rounding) -> Callable[[Fraction], int]:
    if mode == Rounding.UP:
        return math.ceil
    if mode == Rounding.HALF_UP:
        return lambda value: math.floor(value + Fraction(1, 2))
    return math.floor


# --- evaluation ---------------------------------------------------------------------


class _Steps:
    """The explanation, keeping the exact running total and the rounded
    one: a step's delta is the move of the rounded total."""

    def __init__(self, round_: Callable[[Fraction], int]) -> None:
        self.round = round_
        self.exact = Fraction(0)
        self.points = 0
        self.items: list[EarnStep] = []

    def note(self, rule_id: str, kind: str, text: str) -> None:
        self.items.append(EarnStep(rule_id, kind, text, 0))

    def to(self, exact: Fraction, rule_id: str, kind: str, text: str) -> None:
        rounded = self.round(exact)
        self.items.append(EarnStep(rule_id, kind, text, rounded - self.points))
        self.exact, self.points = exact, rounded

    def cap(self, limit: int, rule_id: str, kind: str, text: str) -> None:
        if self.points > limit:
            self.items.append(EarnStep(rule_id, kind, text, limit - self.points))
            self.points = limit


def _excluded(rule_set: EarnRuleSet, lines: Sequence[EarnLine], steps: _Steps) -> set[int]:
    """Indices of the lines the EXCLUSION rules take out, explained."""
    out: set[int] = set()
    for rule in rule_set.of_kind(RuleKind.EXCLUSION):
        hit = [i for i, line in enumerate(lines) if i not in out and excludes(rule, line)]
        if hit:
            out.update(hit)
            which = _lines_text([lines[i].line_no for i in hit])
            steps.note(rule.rule_id, RuleKind.EXCLUSION, f"{rule.label}: {which} earn nothing")
    return out


def evaluate(rule_set: EarnRuleSet, ctx: EarnContext) -> EarnResult:
    """The points ``ctx`` earns under ``rule_set``, with the steps that
    explain them. Never negative, never above the caps."""
    mode, rounding_rule = rule_set.rounding
    steps = _Steps(_rounder(mode))
    currency = ctx.currency_code
    lines = list(ctx.lines)
    amounts = [max(0, line.net_minor_units) for line in lines]
    gross = sum(amounts)
    excluded = _excluded(rule_set, lines, steps)

    paid = min(max(0, ctx.paid_with_points_minor_units), gross)
    keep = Fraction(gross - paid, gross) if gross else Fraction(0)
    if paid:
        steps.note(
            "",
            STEP_POINTS_PAID,
            f"the {_money(paid, currency)} paid with points earns nothing",
        )
    earnable = {
        i: amounts[i] * keep for i in range(len(lines)) if i not in excluded and amounts[i] > 0
    }

    base_rule = base_rate_for(rule_set, ctx)
    millipoints = base_rule.millipoints_per_unit if base_rule else 0
    rate = Fraction(millipoints, 1000 * 10 ** minor_unit_digits(currency))
    base = {i: amount * rate for i, amount in earnable.items()}
    base_total = sum(base.values(), Fraction(0))
    on = _money(sum(earnable.values(), Fraction(0)), currency)
    if base_rule is None:
        steps.to(base_total, "", RuleKind.BASE_RATE, f"no base rate applies: {on} earns nothing")
    else:
        steps.to(
            base_total,
            base_rule.rule_id,
            RuleKind.BASE_RATE,
            f"{base_rule.label}: {_rate_text(millipoints, currency)} on {on}: {_show(base_total)}",
        )

    _apply_multipliers(rule_set, ctx, lines, base, steps)
    _apply_promotion(rule_set, ctx, steps)
    _apply_tier(ctx, steps)

    if steps.exact.denominator != 1:
        steps.note(
            rounding_rule.rule_id if rounding_rule else "",
            RuleKind.ROUNDING,
            f"{_show(steps.exact)} points rounded {_ROUNDING_WORDS[mode]} to {steps.points}"
            + (f" ({rounding_rule.label})" if rounding_rule else ""),
        )
    _apply_caps(rule_set, ctx, steps)
    return EarnResult(steps.points, tuple(steps.items))


def _apply_multipliers(
    rule_set: EarnRuleSet,
    ctx: EarnContext,
    lines: Sequence[EarnLine],
    base: dict[int, Fraction],
    steps: _Steps,
) -> None:
    multipliers = rule_set.of_kind(RuleKind.MULTIPLIER)
    won: dict[str, list[int]] = {}
    for i in base:
        best = _largest(rule for rule in multipliers if multiplier_matches(rule, ctx, lines[i]))
        if best is not None:
            won.setdefault(best.rule_id, []).append(i)
    for rule in multipliers:
        hit = won.get(rule.rule_id)
        if not hit:
            continue
        before = sum((base[i] for i in hit), Fraction(0))
        after = before * Fraction(rule.factor_bps, ONE_BPS)
        which = _lines_text([lines[i].line_no for i in hit])
        steps.to(
            steps.exact + after - before,
            rule.rule_id,
            RuleKind.MULTIPLIER,
            f"{rule.label}, {which}: {_show(before)} → {_show(after)}",
        )


def _apply_promotion(rule_set: EarnRuleSet, ctx: EarnContext, steps: _Steps) -> None:
    promotion = _largest(
        rule for rule in rule_set.of_kind(RuleKind.PROMOTION) if promotion_matches(rule, ctx)
    )
    campaign = ctx.campaign_multiplier_bps
    if campaign > ONE_BPS and (promotion is None or campaign > promotion.factor_bps):
        after = steps.exact * Fraction(campaign, ONE_BPS)
        steps.to(
            after,
            ctx.campaign_promotion_id,
            RuleKind.PROMOTION,
            f"points promotion {ctx.campaign_promotion_id} {factor_text(campaign)}: "
            f"{_show(steps.exact)} → {_show(after)}",
        )
        return
    if promotion is None:
        return
    after = steps.exact * Fraction(promotion.factor_bps, ONE_BPS)
    steps.to(
        after,
        promotion.rule_id,
        RuleKind.PROMOTION,
        f"{promotion.label}: {_show(steps.exact)} → {_show(after)}",
    )


def _apply_tier(ctx: EarnContext, steps: _Steps) -> None:
    bps = ctx.tier_multiplier_bps if ctx.tier_multiplier_bps > 0 else ONE_BPS
    if bps == ONE_BPS:
        return
    after = steps.exact * Fraction(bps, ONE_BPS)
    steps.to(
        after,
        ctx.tier_id,
        STEP_TIER,
        f"tier {ctx.tier_id or '(none)'} {factor_text(bps)}: {_show(steps.exact)} → {_show(after)}",
    )


def _apply_caps(rule_set: EarnRuleSet, ctx: EarnContext, steps: _Steps) -> None:
    for rule in rule_set.of_kind(RuleKind.CAP_PER_SALE):
        steps.cap(
            rule.cap_points,
            rule.rule_id,
            RuleKind.CAP_PER_SALE,
            f"{rule.label}: at most {rule.cap_points} points a sale: "
            f"{steps.points} → {min(steps.points, rule.cap_points)}",
        )
    for rule in rule_set.of_kind(RuleKind.CAP_PER_DAY):
        earned = max(0, ctx.earned_today)
        left = max(0, rule.cap_points - earned)
        steps.cap(
            left,
            rule.rule_id,
            RuleKind.CAP_PER_DAY,
            f"{rule.label}: at most {rule.cap_points} points a day, {earned} earned today: "
            f"{steps.points} → {min(steps.points, left)}",
        )


# --- validation ---------------------------------------------------------------------

# The fields each kind may set; any other field set is a mistake.
_KIND_FIELDS: dict[RuleKind, frozenset[str]] = {
    RuleKind.BASE_RATE: frozenset({"millipoints_per_unit", "program_ids", "tier_ids"}),
    RuleKind.MULTIPLIER: frozenset(
        {"factor_bps", "store_ids", "terminal_ids", "categories", "skus"}
    ),
    RuleKind.PROMOTION: frozenset(
        {"factor_bps", "dates", "weekdays", "birthday_month", "store_ids"}
    ),
    RuleKind.CAP_PER_SALE: frozenset({"cap_points"}),
    RuleKind.CAP_PER_DAY: frozenset({"cap_points"}),
    RuleKind.EXCLUSION: frozenset({"categories", "skus"}),
    RuleKind.ROUNDING: frozenset({"rounding"}),
}
_COMMON_FIELDS = frozenset({"rule_id", "kind", "name"})
# At most one rule of these kinds in a set.
_SINGLE_KINDS = (RuleKind.CAP_PER_SALE, RuleKind.CAP_PER_DAY, RuleKind.ROUNDING)


def _kinds_of(field_name: str) -> str:
    kinds = [kind.value for kind, names in _KIND_FIELDS.items() if field_name in names]
    return " and ".join(kinds)


def _check_values(v: Violations, name: str, values: frozenset[str]) -> None:
    if len(values) > MAX_SCOPE_VALUES:
        v.add(name, f"at most {MAX_SCOPE_VALUES} values")
    if any(not value.strip() or len(value) > MAX_SCOPE_VALUE_LENGTH for value in values):
        v.add(name, f"each value not blank, at most {MAX_SCOPE_VALUE_LENGTH} characters")


def _check_rule(v: Violations, rule: EarnRule, name: str) -> None:
    if not RULE_ID.match(rule.rule_id):
        v.add(f"{name}.rule_id", "letters, digits, '-' and '_', 1 to 32 of them")
    if len(rule.name) > MAX_NAME_LENGTH:
        v.add(f"{name}.name", f"at most {MAX_NAME_LENGTH} characters")
    allowed = _KIND_FIELDS[rule.kind] | _COMMON_FIELDS
    for f in fields(rule):
        if f.name not in allowed and getattr(rule, f.name) not in (None, 0, False, frozenset()):
            v.add(f"{name}.{f.name}", f"only for {_kinds_of(f.name)} rules")
    for scope in ("program_ids", "tier_ids", "store_ids", "terminal_ids", "categories", "skus"):
        _check_values(v, f"{name}.{scope}", getattr(rule, scope))
    _check_kind_values(v, rule, name)


def _check_kind_values(v: Violations, rule: EarnRule, name: str) -> None:
    kind = rule.kind
    if (
        kind == RuleKind.BASE_RATE
        and not 0 <= rule.millipoints_per_unit <= MAX_MILLIPOINTS_PER_UNIT
    ):
        v.add(f"{name}.millipoints_per_unit", f"0 to {MAX_MILLIPOINTS_PER_UNIT}")
    if kind in (RuleKind.MULTIPLIER, RuleKind.PROMOTION) and not (
        0 < rule.factor_bps <= MAX_FACTOR_BPS
    ):
        v.add(f"{name}.factor_bps", f"1 to {MAX_FACTOR_BPS} (10000 is ×1)")
    if kind == RuleKind.PROMOTION:
        if not (rule.dates or rule.weekdays or rule.birthday_month):
            v.add(f"{name}.dates", "give dates, weekdays or birthday_month")
        if any(not 1 <= day <= 7 for day in rule.weekdays):
            v.add(f"{name}.weekdays", "1 (Monday) to 7 (Sunday)")
        if len(rule.dates) > MAX_SCOPE_VALUES:
            v.add(f"{name}.dates", f"at most {MAX_SCOPE_VALUES} dates")
    if kind in (RuleKind.CAP_PER_SALE, RuleKind.CAP_PER_DAY) and not (
        0 < rule.cap_points <= MAX_CAP_POINTS
    ):
        v.add(f"{name}.cap_points", f"1 to {MAX_CAP_POINTS}")
    if kind == RuleKind.EXCLUSION and not (rule.categories or rule.skus):
        v.add(f"{name}.categories", "give the categories or skus that earn nothing")


def _base_keys(rule: EarnRule) -> set[tuple[str, str]]:
    """The (program, tier) cells a base rate claims at its specificity."""
    programs = sorted(rule.program_ids) or ["*"]
    tiers = sorted(rule.tier_ids) or ["*"]
    return {(p, t) for p in programs for t in tiers}


def _check_base_rates(v: Violations, rules: Sequence[EarnRule]) -> None:
    claimed: dict[tuple[str, str], str] = {}
    defaults = 0
    for index, rule in enumerate(rules):
        if rule.kind != RuleKind.BASE_RATE:
            continue
        if not rule.program_ids and not rule.tier_ids:
            defaults += 1
            continue
        for key in sorted(_base_keys(rule)):
            other = claimed.setdefault(key, rule.rule_id)
            if other != rule.rule_id:
                v.add(
                    f"rules[{index}].program_ids",
                    f"matches the same program and tier as rule {other}",
                )
                break
    if defaults != 1:
        v.add(
            "rules",
            "exactly one default BASE_RATE rule (without program_ids and tier_ids) is needed",
        )


def check_rule_set(rules: Sequence[EarnRule]) -> tuple[EarnRule, ...]:
    """The rules, or INVALID_ARGUMENT with every problem at once."""
    v = Violations()
    if not rules:
        v.add("rules", "required")
    if len(rules) > MAX_RULES:
        v.add("rules", f"at most {MAX_RULES} rules")
    seen: set[str] = set()
    for index, rule in enumerate(rules):
        name = f"rules[{index}]"
        _check_rule(v, rule, name)
        if rule.rule_id in seen:
            v.add(f"{name}.rule_id", "used by another rule of the set")
        seen.add(rule.rule_id)
    for kind in _SINGLE_KINDS:
        if sum(1 for rule in rules if rule.kind == kind) > 1:
            v.add("rules", f"at most one {kind.value} rule")
    _check_base_rates(v, rules)
    v.raise_if_any("the rule set has invalid fields")
    return tuple(rules)


def check_context(ctx: EarnContext) -> EarnContext:
    """A sale to evaluate, as a caller sent it: INVALID_ARGUMENT otherwise."""
    v = Violations()
    if not ctx.lines:
        v.add("lines", "at least one line")
    if len(ctx.lines) > MAX_LINES:
        v.add("lines", f"at most {MAX_LINES} lines")
    for index, line in enumerate(ctx.lines):
        if not 0 <= line.net_minor_units <= MAX_AMOUNT:
            v.add(f"lines[{index}].net", f"0 to {MAX_AMOUNT} minor units")
        if len(line.sku) > MAX_SCOPE_VALUE_LENGTH or len(line.category) > MAX_SCOPE_VALUE_LENGTH:
            v.add(f"lines[{index}].sku", f"sku and category at most {MAX_SCOPE_VALUE_LENGTH}")
    gross = sum(line.net_minor_units for line in ctx.lines)
    if not 0 <= ctx.paid_with_points_minor_units <= max(gross, 0):
        v.add("paid_with_points", "not negative, and not more than the lines")
    if ctx.earned_today < 0:
        v.add("earned_today", "not negative")
    if not 0 <= ctx.tier_multiplier_bps <= MAX_FACTOR_BPS:
        v.add("tier_multiplier_bps", f"0 to {MAX_FACTOR_BPS} (10000 is ×1)")
    if ctx.birthday_month is not None and not 1 <= ctx.birthday_month <= 12:
        v.add("birthday_month", "1 to 12, or 0 when not known")
    code = ctx.currency_code
    if not (len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()):
        v.add("lines.net.currency_code", "an ISO 4217 code such as CNY")
    v.raise_if_any("the sale has invalid fields")
    return ctx
