"""Tiers: qualification over windows, upgrades at a sale, grace and
downgrades at reviews, review periods in the ladder's time zone, progress,
and the validation of a ladder."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from services.loyalty.domain.tiers import (
    Action,
    Ladder,
    Qualification,
    ReviewPeriod,
    Standing,
    Tier,
    check_ladder,
    decide_after_sale,
    decide_at_grace_end,
    decide_at_review,
    default_ladder,
    grace_end,
    last_ended_period,
    period_of,
    progress,
    standing_of,
)

LADDER = default_ladder()
NON_VIP, QUASI, VIP = LADDER.tiers
UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(UTC)


# -- the default ladder and qualification --------------------------------------------------


def test_the_default_ladder() -> None:
    assert check_ladder(LADDER) == LADDER
    assert [t.tier_id for t in LADDER.tiers] == ["NON_VIP", "QUASI_VIP", "VIP"]
    assert (QUASI.min_spend, QUASI.min_visits, QUASI.discount_bps) == (200_000, 6, 300)
    assert (QUASI.points_multiplier_bps, VIP.points_multiplier_bps) == (12_000, 15_000)
    assert (VIP.min_spend, VIP.min_visits, VIP.discount_bps) == (1_000_000, 24, 800)
    assert (LADDER.window_days, LADDER.review_period, LADDER.grace_days) == (
        365,
        ReviewPeriod.QUARTER,
        30,
    )
    assert LADDER.time_zone == "Asia/Shanghai"


@pytest.mark.parametrize(
    ("standing", "tier_id"),
    [
        (Standing(0, 0), "NON_VIP"),
        (Standing(199_999, 5), "NON_VIP"),
        (Standing(200_000, 0), "QUASI_VIP"),
        (Standing(0, 6), "QUASI_VIP"),
        (Standing(999_999, 23), "QUASI_VIP"),
        (Standing(1_000_000, 0), "VIP"),
        (Standing(10, 24), "VIP"),
    ],
)
def test_spend_or_visits(standing: Standing, tier_id: str) -> None:
    assert LADDER.qualified(standing).tier_id == tier_id


def test_the_other_qualifications() -> None:
    tier = Tier("T", "T", 1, min_spend=100, min_visits=3)
    both = dataclasses.replace(tier, qualification=Qualification.SPEND_AND_VISITS)
    assert not both.qualifies(Standing(100, 2)) and both.qualifies(Standing(100, 3))
    spend = dataclasses.replace(tier, qualification=Qualification.SPEND_ONLY, min_visits=0)
    assert spend.qualifies(Standing(100, 0)) and not spend.qualifies(Standing(99, 99))
    visits = dataclasses.replace(tier, qualification=Qualification.VISITS_ONLY, min_spend=0)
    assert visits.qualifies(Standing(0, 3)) and not visits.qualifies(Standing(10**9, 2))


def test_a_standing_counts_net_spend_and_days_with_positive_spend() -> None:
    # A day whose sale was refunded in full is no visit.
    assert standing_of([10_000, 0, 5_000, -0]) == Standing(15_000, 2)
    assert standing_of([]) == Standing(0, 0)


def test_the_window_ends_on_the_day() -> None:
    first, last = LADDER.window(dt.date(2026, 3, 31))
    assert (first, last) == (dt.date(2025, 4, 1), dt.date(2026, 3, 31))
    assert (last - first).days + 1 == 365
    week = dataclasses.replace(LADDER, window_days=7)
    assert week.window(dt.date(2026, 1, 3)) == (dt.date(2025, 12, 28), dt.date(2026, 1, 3))


# -- progress ------------------------------------------------------------------------------


def test_progress_to_the_next_tier() -> None:
    shown = progress(LADDER, NON_VIP, None, Standing(150_000, 4))
    assert (shown.next_tier_id, shown.next_tier_name) == ("QUASI_VIP", "Quasi-VIP")
    assert (shown.spend_to_next_minor_units, shown.visits_to_next) == (50_000, 2)
    assert (shown.window_spend_minor_units, shown.window_visits) == (150_000, 4)
    assert shown.tier.tier_id == "NON_VIP" and shown.changed_from == ""
    top = progress(LADDER, VIP, None, Standing(2_000_000, 40), changed_from="QUASI_VIP")
    assert (top.next_tier_id, top.spend_to_next_minor_units, top.visits_to_next) == ("", 0, 0)
    assert top.changed_from == "QUASI_VIP"
    assert top.tier.discount_bps == 800 and top.tier.points_multiplier_bps == 15_000


# -- at a sale -----------------------------------------------------------------------------


def test_a_sale_that_crosses_a_threshold_moves_up_at_once() -> None:
    assert decide_after_sale(LADDER, NON_VIP, False, Standing(199_999, 1)).upgrade_to is None
    assert decide_after_sale(LADDER, NON_VIP, False, Standing(200_000, 1)).upgrade_to == QUASI
    # Straight to the highest tier qualified.
    assert decide_after_sale(LADDER, NON_VIP, False, Standing(1_000_000, 1)).upgrade_to == VIP


def test_a_sale_never_moves_down_and_ends_a_grace_it_requalifies_for() -> None:
    assert decide_after_sale(LADDER, VIP, False, Standing(0, 0)).upgrade_to is None
    assert not decide_after_sale(LADDER, VIP, True, Standing(500_000, 1)).leave_grace
    assert decide_after_sale(LADDER, VIP, True, Standing(1_000_000, 1)).leave_grace


# -- at a review -----------------------------------------------------------------------------

Q1_2026 = period_of(LADDER, dt.date(2026, 2, 1))
REVIEWED = Q1_2026.end


def test_a_member_who_still_qualifies_keeps_the_tier() -> None:
    decision = decide_at_review(
        LADDER, VIP, None, Standing(1_000_000, 0), period=Q1_2026, at=REVIEWED
    )
    assert decision.action == Action.KEEP


def test_one_who_no_longer_qualifies_enters_grace_from_the_end_of_the_period() -> None:
    decision = decide_at_review(
        LADDER, VIP, None, Standing(300_000, 2), period=Q1_2026, at=REVIEWED
    )
    assert decision.action == Action.ENTER_GRACE
    assert decision.grace_until == at("2026-04-30T16:00:00+00:00")
    # A late review does not shorten the grace.
    late = decide_at_review(
        LADDER, VIP, None, Standing(0, 0), period=Q1_2026, at=REVIEWED + dt.timedelta(days=10)
    )
    assert late.grace_until == at("2026-05-10T16:00:00+00:00")
    assert grace_end(LADDER, Q1_2026, REVIEWED) == decision.grace_until


def test_in_grace_a_member_moves_down_only_once_it_ended() -> None:
    grace = at("2026-04-30T16:00:00+00:00")
    still = decide_at_review(LADDER, VIP, grace, Standing(300_000, 2), period=Q1_2026, at=REVIEWED)
    assert still.action == Action.KEEP
    q2 = period_of(LADDER, dt.date(2026, 5, 1))
    down = decide_at_review(LADDER, VIP, grace, Standing(300_000, 2), period=q2, at=q2.end)
    assert (down.action, down.to_tier) == (Action.DOWNGRADE, QUASI)
    back = decide_at_review(LADDER, VIP, grace, Standing(0, 30), period=q2, at=q2.end)
    assert back.action == Action.LEAVE_GRACE


def test_without_grace_days_a_review_moves_down_at_once() -> None:
    ladder = dataclasses.replace(LADDER, grace_days=0)
    decision = decide_at_review(ladder, VIP, None, Standing(0, 0), period=Q1_2026, at=REVIEWED)
    assert (decision.action, decision.to_tier) == (Action.DOWNGRADE, NON_VIP)


def test_at_the_end_of_a_grace_period() -> None:
    assert decide_at_grace_end(LADDER, VIP, Standing(0, 6)).to_tier == QUASI
    assert decide_at_grace_end(LADDER, VIP, Standing(0, 6)).action == Action.DOWNGRADE
    assert decide_at_grace_end(LADDER, QUASI, Standing(0, 6)).action == Action.LEAVE_GRACE


# -- periods ------------------------------------------------------------------------------------


def test_quarters_in_the_ladders_time_zone() -> None:
    q1 = period_of(LADDER, dt.date(2026, 3, 31))
    assert (q1.key, q1.first_day, q1.last_day) == (
        "2026-Q1",
        dt.date(2026, 1, 1),
        dt.date(2026, 3, 31),
    )
    # Midnight in Shanghai is 16:00 UTC the day before.
    assert q1.start == at("2025-12-31T16:00:00+00:00")
    assert q1.end == at("2026-03-31T16:00:00+00:00")
    assert last_ended_period(LADDER, at("2026-03-31T15:59:59+00:00")).key == "2025-Q4"
    assert last_ended_period(LADDER, at("2026-03-31T16:00:00+00:00")).key == "2026-Q1"
    assert period_of(LADDER, dt.date(2026, 12, 31)).key == "2026-Q4"
    assert period_of(LADDER, dt.date(2026, 12, 31)).end == at("2026-12-31T16:00:00+00:00")


def test_months_and_years() -> None:
    monthly = dataclasses.replace(LADDER, review_period=ReviewPeriod.MONTH)
    feb = period_of(monthly, dt.date(2028, 2, 10))
    assert (feb.key, feb.last_day) == ("2028-02", dt.date(2028, 2, 29))
    assert last_ended_period(monthly, at("2026-01-01T00:00:00+08:00")).key == "2025-12"
    yearly = dataclasses.replace(LADDER, review_period=ReviewPeriod.YEAR)
    assert last_ended_period(yearly, at("2026-06-01T00:00:00+00:00")).key == "2025"
    assert period_of(yearly, dt.date(2026, 6, 1)).end == at("2026-12-31T16:00:00+00:00")


def test_a_period_ends_at_local_midnight_whatever_the_daylight_saving() -> None:
    new_york = dataclasses.replace(
        LADDER, review_period=ReviewPeriod.MONTH, time_zone="America/New_York"
    )
    march = period_of(new_york, dt.date(2026, 3, 15))
    assert march.start == at("2026-03-01T05:00:00+00:00")  # EST
    assert march.end == at("2026-04-01T04:00:00+00:00")  # EDT


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(ReviewPeriod)),
    st.sampled_from(["Asia/Shanghai", "Europe/Madrid", "America/New_York", "UTC"]),
    st.datetimes(dt.datetime(2020, 1, 1), dt.datetime(2035, 1, 1), timezones=st.just(UTC)),
)
def test_the_last_ended_period_ended_at_or_before_and_the_next_did_not(
    kind: ReviewPeriod, zone: str, moment: dt.datetime
) -> None:
    ladder = dataclasses.replace(LADDER, review_period=kind, time_zone=zone)
    ended = last_ended_period(ladder, moment)
    assert ended.end <= moment
    following = period_of(ladder, ended.last_day + dt.timedelta(days=1))
    assert following.start == ended.end
    assert following.end > moment
    assert ended.first_day <= ended.last_day


# -- qualification properties ---------------------------------------------------------------------

standings = st.builds(Standing, st.integers(0, 3_000_000), st.integers(0, 60))


@settings(max_examples=300, deadline=None)
@given(standings, st.integers(0, 1_000_000), st.integers(0, 30))
def test_more_spend_or_visits_never_qualifies_lower(
    standing: Standing, spend: int, visits: int
) -> None:
    more = Standing(standing.spend + spend, standing.visits + visits)
    assert LADDER.qualified(more).rank >= LADDER.qualified(standing).rank
    assert LADDER.qualified(standing).qualifies(standing)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(LADDER.tiers), st.booleans(), standings)
def test_a_sale_only_moves_up_and_a_review_only_down(
    current: Tier, in_grace: bool, standing: Standing
) -> None:
    decision = decide_after_sale(LADDER, current, in_grace, standing)
    if decision.upgrade_to is not None:
        assert decision.upgrade_to.rank > current.rank
        assert decision.upgrade_to.qualifies(standing)
    grace = REVIEWED - dt.timedelta(days=1) if in_grace else None
    review = decide_at_review(LADDER, current, grace, standing, period=Q1_2026, at=REVIEWED)
    if review.to_tier is not None:
        assert review.to_tier.rank < current.rank
        assert review.to_tier == LADDER.qualified(standing)


# -- validation ---------------------------------------------------------------------------------


def violations(ladder: Ladder) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        check_ladder(ladder)
    return {v.field: v.description for v in caught.value.violations}


def test_a_chains_own_ladder_is_sorted_by_rank() -> None:
    ladder = Ladder(
        "CNY",
        (
            Tier("GOLD", "Gold", 20, min_spend=500_000, qualification=Qualification.SPEND_ONLY),
            Tier("BASIC", "Basic", 0),
            Tier("SILVER", "Silver", 10, min_spend=100_000, qualification=Qualification.SPEND_ONLY),
            Tier(
                "PLATINUM",
                "Platinum",
                30,
                min_spend=2_000_000,
                min_visits=40,
                qualification=Qualification.SPEND_AND_VISITS,
                discount_bps=1000,
                points_multiplier_bps=20_000,
            ),
        ),
    )
    assert [t.tier_id for t in check_ladder(ladder).tiers] == [
        "BASIC",
        "SILVER",
        "GOLD",
        "PLATINUM",
    ]


def test_ranks_thresholds_and_the_lowest_tier_are_checked() -> None:
    found = violations(
        Ladder(
            "CNY",
            (
                Tier("A", "A", 0),
                Tier("B", "B", 1, min_spend=500, min_visits=5),
                Tier("C", "C", 1, min_spend=400, min_visits=9),
                Tier("D", "D", 2),
            ),
        )
    )
    assert found["ladder.tiers[1].rank"] == "used by another tier"
    assert found["ladder.tiers[2].rank"] == "used by another tier"
    assert found["ladder.tiers"] == "exactly one tier without thresholds (the lowest) is needed"
    found = violations(
        Ladder(
            "CNY",
            (
                Tier("A", "A", 1),
                Tier("B", "B", 0, min_spend=500, min_visits=5),
                Tier("C", "C", 2, min_spend=400, min_visits=5),
            ),
        )
    )
    assert found == {
        "ladder.tiers[0].rank": "the tier without thresholds is the lowest",
        "ladder.tiers[2].min_spend": "more than tier B's, which ranks lower",
        "ladder.tiers[2].min_visits": "more than tier B's, which ranks lower",
    }


def test_benefits_qualifications_and_settings_are_checked() -> None:
    found = violations(
        Ladder(
            "yuan",
            (
                Tier("A", "", 0, discount_bps=-1),
                Tier(
                    "B!",
                    "B",
                    1,
                    min_spend=500,
                    qualification=Qualification.SPEND_OR_VISITS,
                    discount_bps=10_001,
                    points_multiplier_bps=9_999,
                ),
                Tier(
                    "C",
                    "C",
                    2,
                    min_spend=900,
                    min_visits=9,
                    qualification=Qualification.SPEND_ONLY,
                    points_multiplier_bps=100_001,
                ),
            ),
            window_days=0,
            grace_days=400,
            time_zone="Mars/Olympus",
        )
    )
    assert found == {
        "ladder.tiers.min_spend.currency_code": "an ISO 4217 code such as CNY",
        "ladder.tiers[0].name": "required, at most 50 characters",
        "ladder.tiers[0].benefits.discount_bps": "0 to 10000",
        "ladder.tiers[1].tier_id": "letters, digits, '-' and '_', 1 to 32 of them",
        "ladder.tiers[1].benefits.discount_bps": "0 to 10000",
        "ladder.tiers[1].benefits.points_multiplier_bps": "10000 (×1) to 100000 (×10)",
        "ladder.tiers[1].min_visits": "required by the qualification",
        "ladder.tiers[2].benefits.points_multiplier_bps": "10000 (×1) to 100000 (×10)",
        "ladder.tiers[2].min_visits": "not used by SPEND_ONLY",
        "ladder.window_days": "1 to 1096",
        "ladder.grace_days": "0 to 366",
        "ladder.time_zone": "an IANA time zone such as Asia/Shanghai",
    }
