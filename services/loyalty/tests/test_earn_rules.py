"""Earn rules: what a sale earns under each kind of rule, the explanations,
the validation of a rule set, and properties of ``evaluate`` over random
rule sets and sales."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from services.loyalty.domain.earn_rules import (
    DEFAULT_RULE,
    EarnContext,
    EarnLine,
    EarnResult,
    EarnRule,
    EarnRuleSet,
    Rounding,
    RuleKind,
    check_context,
    check_rule_set,
    default_rule_set,
    evaluate,
    factor_text,
)

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
# A Tuesday, in December.
DAY = dt.date(2026, 12, 1)


def rule_set(*rules: EarnRule, default: EarnRule | None = DEFAULT_RULE) -> EarnRuleSet:
    return EarnRuleSet(1, NOW, ((default,) if default else ()) + rules)


def sale(*lines: tuple[str, str, int], **fields: Any) -> EarnContext:
    values: dict[str, Any] = {
        "program_id": "GOLD",
        "tier_id": "NON_VIP",
        "tier_multiplier_bps": 10_000,
        "store_id": "S001",
        "terminal_id": "T1",
        "business_day": DAY,
        "birthday_month": None,
        "currency_code": "CNY",
        "lines": tuple(
            EarnLine(i + 1, sku, category, amount)
            for i, (sku, category, amount) in enumerate(lines)
        ),
    }
    values.update(fields)
    return EarnContext(**values)


def rule(rule_id: str, kind: RuleKind, **fields: Any) -> EarnRule:
    return EarnRule(rule_id, kind, **fields)


def deltas_add_up(result: EarnResult) -> bool:
    return sum(step.points_delta for step in result.steps) == result.points


# -- base rates ------------------------------------------------------------------------


def test_the_built_in_set_earns_a_point_per_yuan_rounded_down() -> None:
    result = evaluate(default_rule_set(), sale(("A", "skincare", 35_678)))
    assert result.points == 356
    assert [s.kind for s in result.steps] == ["BASE_RATE", "ROUNDING"]
    assert result.steps[0].explanation == (
        "1 point per currency unit (rule DEFAULT): 1 point per 1.00 CNY on 356.78 CNY: 356.78"
    )
    assert result.steps[1].explanation == "356.78 points rounded down to 356"
    assert deltas_add_up(result)


def test_a_unit_is_one_of_the_currency_whatever_its_exponent() -> None:
    assert evaluate(default_rule_set(), sale(("A", "x", 1000), currency_code="JPY")).points == 1000
    assert evaluate(default_rule_set(), sale(("A", "x", 12_345), currency_code="KWD")).points == 12


def test_the_most_specific_base_rate_wins() -> None:
    rules = rule_set(
        rule(
            "PT",
            RuleKind.BASE_RATE,
            millipoints_per_unit=4000,
            program_ids=frozenset({"GOLD"}),
            tier_ids=frozenset({"VIP"}),
        ),
        rule("P", RuleKind.BASE_RATE, millipoints_per_unit=3000, program_ids=frozenset({"GOLD"})),
        rule("T", RuleKind.BASE_RATE, millipoints_per_unit=2000, tier_ids=frozenset({"VIP"})),
    )
    line = ("A", "x", 10_000)
    assert evaluate(rules, sale(line, tier_id="VIP")).points == 400
    assert evaluate(rules, sale(line)).points == 300
    assert evaluate(rules, sale(line, program_id="SILVER", tier_id="VIP")).points == 200
    assert evaluate(rules, sale(line, program_id="SILVER")).points == 100


def test_a_rate_below_one_point_per_unit() -> None:
    tenth = rule("TENTH", RuleKind.BASE_RATE, millipoints_per_unit=100)
    result = evaluate(rule_set(default=tenth), sale(("A", "x", 25_550)))
    assert result.points == 25
    assert "0.1 points per 1.00 CNY on 255.50 CNY" in result.steps[0].explanation


# -- multipliers and promotions ------------------------------------------------------------


def test_multipliers_apply_to_their_lines_and_the_largest_wins() -> None:
    rules = rule_set(
        rule(
            "R3",
            RuleKind.MULTIPLIER,
            name="double points on skincare",
            factor_bps=20_000,
            categories=frozenset({"skincare"}),
        ),
        rule("R4", RuleKind.MULTIPLIER, factor_bps=30_000, skus=frozenset({"SERUM"})),
        rule("R5", RuleKind.MULTIPLIER, factor_bps=15_000, store_ids=frozenset({"S001"})),
    )
    result = evaluate(
        rules,
        sale(
            ("CREAM", "skincare", 12_000), ("SERUM", "skincare", 10_000), ("LIP", "makeup", 5_000)
        ),
    )
    # 120 x2, 100 x3 (not x2 and x3), 50 x1.5 (the store's).
    assert result.points == 240 + 300 + 75
    explained = {s.rule_id: s.explanation for s in result.steps}
    assert explained["R3"] == "double points on skincare (rule R3), line 1: 120 → 240"
    assert explained["R4"] == "×3 points on SKU SERUM (rule R4), line 2: 100 → 300"
    assert explained["R5"] == "×1.5 points on store S001 (rule R5), line 3: 50 → 75"
    assert deltas_add_up(result)


def test_a_multiplier_must_match_every_scope_it_names() -> None:
    rules = rule_set(
        rule(
            "M",
            RuleKind.MULTIPLIER,
            factor_bps=20_000,
            categories=frozenset({"skincare"}),
            terminal_ids=frozenset({"T9"}),
        )
    )
    assert evaluate(rules, sale(("A", "skincare", 10_000))).points == 100
    assert evaluate(rules, sale(("A", "skincare", 10_000), terminal_id="T9")).points == 200


def test_promotions_by_date_weekday_and_birthday_month() -> None:
    rules = rule_set(
        rule(
            "DOUBLE12",
            RuleKind.PROMOTION,
            name="double twelve",
            factor_bps=20_000,
            dates=frozenset({dt.date(2026, 12, 12)}),
        ),
        rule("TUE", RuleKind.PROMOTION, factor_bps=12_000, weekdays=frozenset({2})),
        rule(
            "BDAY",
            RuleKind.PROMOTION,
            name="birthday month",
            factor_bps=30_000,
            birthday_month=True,
            store_ids=frozenset({"S001"}),
        ),
    )
    line = ("A", "x", 10_000)
    # 2026-12-01 is a Tuesday.
    assert evaluate(rules, sale(line)).points == 120
    assert evaluate(rules, sale(line, business_day=dt.date(2026, 12, 12))).points == 200
    assert evaluate(rules, sale(line, business_day=dt.date(2026, 12, 3))).points == 100
    # The largest promotion of the day, never two.
    birthday = evaluate(rules, sale(line, birthday_month=12))
    assert birthday.points == 300
    assert [s.rule_id for s in birthday.steps if s.kind == "PROMOTION"] == ["BDAY"]
    assert "birthday month (rule BDAY): 100 → 300" in birthday.steps[-1].explanation
    assert evaluate(rules, sale(line, birthday_month=12, store_id="S002")).points == 120
    assert evaluate(rules, sale(line, birthday_month=11)).points == 120


def test_the_tier_multiplier_comes_after_the_others() -> None:
    rules = rule_set(rule("M", RuleKind.MULTIPLIER, factor_bps=20_000))
    result = evaluate(rules, sale(("A", "x", 10_000), tier_id="VIP", tier_multiplier_bps=15_000))
    assert result.points == 300
    assert result.steps[-1].kind == "TIER"
    assert result.steps[-1].explanation == "tier VIP ×1.5: 200 → 300"
    # 0 is no multiplier.
    assert evaluate(rules, sale(("A", "x", 10_000), tier_multiplier_bps=0)).points == 200


# -- what earns nothing ----------------------------------------------------------------------


def test_excluded_lines_earn_nothing() -> None:
    rules = rule_set(
        rule("NOGIFT", RuleKind.EXCLUSION, name="gift cards", categories=frozenset({"gift_card"})),
        rule("M", RuleKind.MULTIPLIER, factor_bps=50_000),
    )
    result = evaluate(rules, sale(("A", "skincare", 10_000), ("GC", "gift_card", 50_000)))
    assert result.points == 500
    assert result.steps[0].explanation == "gift cards (rule NOGIFT): line 2 earn nothing"
    assert result.steps[0].points_delta == 0


def test_the_part_paid_with_points_earns_nothing() -> None:
    result = evaluate(
        default_rule_set(),
        sale(("A", "x", 30_000), ("B", "y", 10_000), paid_with_points_minor_units=10_000),
    )
    assert result.points == 300
    assert result.steps[0].kind == "POINTS_PAID"
    assert result.steps[0].explanation == "the 100.00 CNY paid with points earns nothing"
    everything = evaluate(
        default_rule_set(), sale(("A", "x", 30_000), paid_with_points_minor_units=30_000)
    )
    assert everything.points == 0


def test_the_points_paid_share_is_spread_over_every_line() -> None:
    rules = rule_set(
        rule("EX", RuleKind.EXCLUSION, categories=frozenset({"tobacco"})),
        rule("M", RuleKind.MULTIPLIER, factor_bps=20_000, categories=frozenset({"skincare"})),
    )
    # A quarter is paid with points: every line keeps three quarters.
    result = evaluate(
        rules,
        sale(
            ("A", "skincare", 20_000),
            ("B", "food", 10_000),
            ("C", "tobacco", 10_000),
            paid_with_points_minor_units=10_000,
        ),
    )
    assert result.points == 150 * 2 + 75


# -- rounding and caps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "points"), [(Rounding.DOWN, 12), (Rounding.HALF_UP, 13), (Rounding.UP, 13)]
)
def test_rounding(mode: Rounding, points: int) -> None:
    rules = rule_set(rule("RND", RuleKind.ROUNDING, rounding=mode))
    result = evaluate(rules, sale(("A", "x", 1_250)))
    assert result.points == points
    assert result.steps[-1].rule_id == "RND"
    assert deltas_add_up(result)
    assert evaluate(rules, sale(("A", "x", 1_249))).points == (13 if mode == Rounding.UP else 12)


def test_the_total_is_rounded_once_not_line_by_line() -> None:
    result = evaluate(default_rule_set(), sale(("A", "x", 150), ("B", "x", 150)))
    assert result.points == 3


def test_caps_per_sale_and_per_day() -> None:
    rules = rule_set(
        rule("C1", RuleKind.CAP_PER_SALE, cap_points=500),
        rule("C2", RuleKind.CAP_PER_DAY, cap_points=1000),
    )
    big = sale(("A", "x", 100_000))
    capped = evaluate(rules, big)
    assert capped.points == 500
    assert capped.steps[-1].explanation == "rule C1: at most 500 points a sale: 1000 → 500"
    assert capped.steps[-1].points_delta == -500
    today = evaluate(rules, dataclasses.replace(big, earned_today=800))
    assert today.points == 200
    assert today.steps[-1].explanation == (
        "rule C2: at most 1000 points a day, 800 earned today: 500 → 200"
    )
    assert evaluate(rules, dataclasses.replace(big, earned_today=5000)).points == 0
    assert deltas_add_up(today)


def test_factor_text() -> None:
    assert [factor_text(b) for b in (20_000, 15_000, 12_500, 10_000, 5_000)] == [
        "×2",
        "×1.5",
        "×1.25",
        "×1",
        "×0.5",
    ]


# -- validation ----------------------------------------------------------------------------------


def violations(rules: list[EarnRule]) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        check_rule_set(rules)
    return {v.field: v.description for v in caught.value.violations}


def test_a_set_needs_exactly_one_default_base_rate() -> None:
    only_program = rule(
        "P", RuleKind.BASE_RATE, millipoints_per_unit=1000, program_ids=frozenset({"GOLD"})
    )
    assert "rules" in violations([only_program])
    assert "rules" in violations([DEFAULT_RULE, dataclasses.replace(DEFAULT_RULE, rule_id="D2")])
    assert "rules" in violations([])
    assert check_rule_set([DEFAULT_RULE, only_program]) == (DEFAULT_RULE, only_program)


def test_base_rates_of_one_specificity_may_not_overlap() -> None:
    found = violations(
        [
            DEFAULT_RULE,
            rule(
                "P1", RuleKind.BASE_RATE, millipoints_per_unit=1, program_ids=frozenset({"A", "B"})
            ),
            rule("P2", RuleKind.BASE_RATE, millipoints_per_unit=2, program_ids=frozenset({"B"})),
        ]
    )
    assert found == {"rules[2].program_ids": "matches the same program and tier as rule P1"}
    # Another specificity is no overlap.
    check_rule_set(
        [
            DEFAULT_RULE,
            rule("P1", RuleKind.BASE_RATE, millipoints_per_unit=1, program_ids=frozenset({"B"})),
            rule(
                "PT",
                RuleKind.BASE_RATE,
                millipoints_per_unit=2,
                program_ids=frozenset({"B"}),
                tier_ids=frozenset({"VIP"}),
            ),
        ]
    )


def test_every_problem_of_every_rule_is_reported() -> None:
    found = violations(
        [
            DEFAULT_RULE,
            rule("bad id!", RuleKind.MULTIPLIER, factor_bps=0),
            rule("DEFAULT", RuleKind.PROMOTION, factor_bps=20_000, weekdays=frozenset({8})),
            rule("X", RuleKind.PROMOTION, factor_bps=20_000),
            rule("E", RuleKind.EXCLUSION),
            rule("C", RuleKind.CAP_PER_SALE, cap_points=0, categories=frozenset({"x"})),
            rule("C2", RuleKind.CAP_PER_SALE, cap_points=5),
            rule(
                "B",
                RuleKind.BASE_RATE,
                millipoints_per_unit=-1,
                factor_bps=20_000,
                program_ids=frozenset({"G"}),
            ),
            rule("N", RuleKind.ROUNDING, rounding=Rounding.UP, name="x" * 101),
        ]
    )
    assert found == {
        "rules[1].rule_id": "letters, digits, '-' and '_', 1 to 32 of them",
        "rules[1].factor_bps": "1 to 100000 (10000 is ×1)",
        "rules[2].rule_id": "used by another rule of the set",
        "rules[2].weekdays": "1 (Monday) to 7 (Sunday)",
        "rules[3].dates": "give dates, weekdays or birthday_month",
        "rules[4].categories": "give the categories or skus that earn nothing",
        "rules[5].categories": "only for MULTIPLIER and EXCLUSION rules",
        "rules[5].cap_points": "1 to 1000000000",
        "rules[7].factor_bps": "only for MULTIPLIER and PROMOTION rules",
        "rules[7].millipoints_per_unit": "0 to 1000000",
        "rules[8].name": "at most 100 characters",
        "rules": "at most one CAP_PER_SALE rule",
    }


def test_a_sale_to_evaluate_is_checked() -> None:
    good = sale(("A", "x", 100))
    assert check_context(good) is good
    with pytest.raises(InvalidArgument) as caught:
        check_context(
            sale(
                ("A", "x", -1),
                paid_with_points_minor_units=5,
                earned_today=-1,
                tier_multiplier_bps=200_000,
                birthday_month=13,
                currency_code="cny",
            )
        )
    assert {v.field for v in caught.value.violations} == {
        "lines[0].net",
        "paid_with_points",
        "earned_today",
        "tier_multiplier_bps",
        "birthday_month",
        "lines.net.currency_code",
    }
    with pytest.raises(InvalidArgument):
        check_context(sale())


# -- properties ------------------------------------------------------------------------------------

CATEGORIES = ("skincare", "makeup", "gift_card", "food")
SKUS = ("A", "B", "C", "D")
STORES = ("S001", "S002")


def subset(values: tuple[str, ...]) -> st.SearchStrategy[frozenset[str]]:
    return st.frozensets(st.sampled_from(values), max_size=2)


@st.composite
def rule_sets(draw: st.DrawFn) -> EarnRuleSet:
    rules: list[EarnRule] = [
        rule("BASE", RuleKind.BASE_RATE, millipoints_per_unit=draw(st.integers(0, 5_000)))
    ]
    if draw(st.booleans()):
        rules.append(
            rule(
                "GOLD",
                RuleKind.BASE_RATE,
                millipoints_per_unit=draw(st.integers(0, 5_000)),
                program_ids=frozenset({"GOLD"}),
            )
        )
    for i in range(draw(st.integers(0, 3))):
        rules.append(
            rule(
                f"M{i}",
                RuleKind.MULTIPLIER,
                factor_bps=draw(st.integers(1, 50_000)),
                categories=draw(subset(CATEGORIES)),
                skus=draw(subset(SKUS)),
                store_ids=draw(subset(STORES)),
            )
        )
    for i in range(draw(st.integers(0, 2))):
        rules.append(
            rule(
                f"P{i}",
                RuleKind.PROMOTION,
                factor_bps=draw(st.integers(1, 50_000)),
                weekdays=draw(st.frozensets(st.integers(1, 7), min_size=1, max_size=3)),
                birthday_month=draw(st.booleans()),
            )
        )
    if draw(st.booleans()):
        rules.append(
            rule(
                "EX",
                RuleKind.EXCLUSION,
                categories=draw(st.frozensets(st.sampled_from(CATEGORIES), min_size=1, max_size=2)),
            )
        )
    if draw(st.booleans()):
        rules.append(rule("CS", RuleKind.CAP_PER_SALE, cap_points=draw(st.integers(1, 5_000))))
    if draw(st.booleans()):
        rules.append(rule("CD", RuleKind.CAP_PER_DAY, cap_points=draw(st.integers(1, 5_000))))
    if draw(st.booleans()):
        rules.append(rule("RND", RuleKind.ROUNDING, rounding=draw(st.sampled_from(Rounding))))
    return EarnRuleSet(1, NOW, check_rule_set(rules))


@st.composite
def sales(draw: st.DrawFn) -> EarnContext:
    count = draw(st.integers(1, 6))
    lines = tuple(
        EarnLine(
            i + 1,
            draw(st.sampled_from(SKUS)),
            draw(st.sampled_from(CATEGORIES)),
            draw(st.integers(0, 2_000_000)),
        )
        for i in range(count)
    )
    gross = sum(line.net_minor_units for line in lines)
    return EarnContext(
        program_id=draw(st.sampled_from(("GOLD", "SILVER"))),
        tier_id="T",
        tier_multiplier_bps=draw(st.sampled_from((0, 10_000, 12_000, 15_000))),
        store_id=draw(st.sampled_from(STORES)),
        terminal_id="T1",
        business_day=draw(st.dates(dt.date(2025, 1, 1), dt.date(2027, 12, 31))),
        birthday_month=draw(st.none() | st.integers(1, 12)),
        currency_code=draw(st.sampled_from(("CNY", "JPY"))),
        lines=lines,
        paid_with_points_minor_units=draw(st.integers(0, gross)),
        earned_today=draw(st.integers(0, 6_000)),
    )


def caps(rules: EarnRuleSet, ctx: EarnContext) -> int | None:
    limits = [r.cap_points for r in rules.of_kind(RuleKind.CAP_PER_SALE)]
    limits += [max(0, r.cap_points - ctx.earned_today) for r in rules.of_kind(RuleKind.CAP_PER_DAY)]
    return min(limits) if limits else None


@settings(max_examples=300, deadline=None)
@given(rule_sets(), sales())
def test_points_are_never_negative_nor_above_the_caps_and_explained(
    rules: EarnRuleSet, ctx: EarnContext
) -> None:
    result = evaluate(rules, ctx)
    assert result.points >= 0
    limit = caps(rules, ctx)
    assert limit is None or result.points <= limit
    assert deltas_add_up(result)
    assert all(step.explanation for step in result.steps)


@settings(max_examples=200, deadline=None)
@given(rule_sets(), sales(), st.integers(0, 5), st.integers(1, 1_000_000))
def test_excluded_lines_never_earn(
    rules: EarnRuleSet, ctx: EarnContext, which: int, more: int
) -> None:
    """Without points paid (whose share all lines bear), an excluded line's
    amount changes nothing."""
    ctx = dataclasses.replace(ctx, paid_with_points_minor_units=0)
    index = which % len(ctx.lines)
    excluded = {
        line.line_no
        for line in ctx.lines
        for r in rules.of_kind(RuleKind.EXCLUSION)
        if line.category in r.categories or line.sku in r.skus
    }
    line = ctx.lines[index]
    if line.line_no not in excluded:
        return
    bigger = dataclasses.replace(line, net_minor_units=line.net_minor_units + more)
    lines = (*ctx.lines[:index], bigger, *ctx.lines[index + 1 :])
    assert (
        evaluate(rules, dataclasses.replace(ctx, lines=lines)).points == evaluate(rules, ctx).points
    )


@settings(max_examples=300, deadline=None)
@given(rule_sets(), sales(), st.integers(0, 5), st.integers(1, 1_000_000))
def test_a_line_earns_more_or_the_same_when_it_costs_more(
    rules: EarnRuleSet, ctx: EarnContext, which: int, more: int
) -> None:
    index = which % len(ctx.lines)
    line = ctx.lines[index]
    bigger = dataclasses.replace(line, net_minor_units=line.net_minor_units + more)
    lines = (*ctx.lines[:index], bigger, *ctx.lines[index + 1 :])
    assert (
        evaluate(rules, dataclasses.replace(ctx, lines=lines)).points >= evaluate(rules, ctx).points
    )


@settings(max_examples=300, deadline=None)
@given(rule_sets(), sales(), st.integers(1, 1_000_000))
def test_paying_more_with_points_never_earns_more(
    rules: EarnRuleSet, ctx: EarnContext, more: int
) -> None:
    gross = sum(line.net_minor_units for line in ctx.lines)
    paid = min(gross, ctx.paid_with_points_minor_units + more)
    assert evaluate(rules, dataclasses.replace(ctx, paid_with_points_minor_units=paid)).points <= (
        evaluate(rules, ctx).points
    )
