"""Earn rules and tiers in the loyalty service, on real databases (SQLite
and PostgreSQL) and real NATS, through gRPC: versioned rule sets in force
by time, evaluation with explanations, the ladder, upgrades at the sale
that crosses a threshold, refunds that do not move a member down, reviews
with grace and downgrades, idempotent reviews, and concurrent sales of one
member."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.auth import Role, Scope, ScopeLevel
from chassis.db import outbox_table, utcnow
from chassis.errors import Aborted
from chassis.service import ServiceDefinition, ServiceRuntime
from cornucopia.common.v1 import date_pb2, money_pb2
from cornucopia.loyalty.v1 import events_pb2, rules_pb2, rules_pb2_grpc
from services.loyalty import tiers
from services.loyalty.domain.tiers import TierStamp, last_ended_period
from services.loyalty.server import definition as loyalty_definition
from services.loyalty.server import rules as rules_server
from services.loyalty.store import earn_rules as rule_store
from services.loyalty.store import metadata
from services.loyalty.store import tiers as tier_store
from tests.integration.conftest import Suite, auth, eventually, rpc_details, token
from tests.integration.infra import DatabaseFactory, schema_drift

R = rules_pb2
HQ = auth()
OP_S001 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1"))
CHECKOUT = auth(token((Role.SERVICE,), Scope(ScopeLevel.HQ), "checkout"))

# The rules and tiers alone, on the loyalty service's database and
# migrations: these tests do not depend on the points and checkout servers.
# The review worker is driven by hand (its passes use the real time and
# would race the scenarios' explicit times), except where it is the subject.
RULES_AND_TIERS = ServiceDefinition(
    name="loyalty",
    migrations_dir=loyalty_definition.migrations_dir,
    grpc_services=rules_server.services,
)
WITH_WORKER = dataclasses.replace(RULES_AND_TIERS, workers=rules_server.workers)
MY_TABLES = {
    "earn_rule_sets",
    "tier_ladder",
    "member_tiers",
    "tier_activity",
    "tier_history",
    "tier_reviews",
}


class Loyalty:
    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.rules = rules_pb2_grpc.EarnRulesServiceStub(suite.channels["loyalty"])
        self.tiers = rules_pb2_grpc.TiersServiceStub(suite.channels["loyalty"])

    @property
    def runtime(self) -> ServiceRuntime:
        return self.suite.runtimes["loyalty"]


@pytest.fixture(autouse=True)
def _one_review_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the worker runs, one pass at start and none during the test."""
    monkeypatch.setenv("LOYALTY_TIER_REVIEW_INTERVAL_SECONDS", "3600")


async def start(
    suite: Suite, database_url: DatabaseFactory, definition: ServiceDefinition = RULES_AND_TIERS
) -> Loyalty:
    await suite.start(definition, await database_url("loyalty"))
    return Loyalty(suite)


def rid() -> str:
    return str(uuid.uuid4())


def cny(minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="CNY", minor_units=minor_units)


def ts(at: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def day(value: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


async def refused(call: Any, code: grpc.StatusCode) -> dict[str, Any]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return rpc_details(caught.value)


async def tier_events(lo: Loyalty) -> list[events_pb2.TierChanged]:
    async with lo.runtime.db.sessions() as session:
        rows = await session.execute(
            sa.select(outbox_table.c.payload)
            .where(outbox_table.c.subject == "loyalty.v1.tier.changed")
            .order_by(outbox_table.c.seq)
        )
        return [events_pb2.TierChanged.FromString(row.payload) for row in rows]


# -- earn rules ------------------------------------------------------------------------------

V1_RULES = [
    R.EarnRule(
        rule_id="BASE",
        kind=R.EARN_RULE_KIND_BASE_RATE,
        name="1 point per yuan",
        millipoints_per_unit=1000,
    ),
    R.EarnRule(
        rule_id="R3",
        kind=R.EARN_RULE_KIND_MULTIPLIER,
        name="double points on skincare",
        factor_bps=20_000,
        categories=["skincare"],
    ),
    R.EarnRule(
        rule_id="NOGIFT",
        kind=R.EARN_RULE_KIND_EXCLUSION,
        name="gift cards",
        categories=["gift_card"],
    ),
    R.EarnRule(rule_id="CAP", kind=R.EARN_RULE_KIND_CAP_PER_SALE, cap_points=5_000),
]
V2_RULES = [
    R.EarnRule(rule_id="BASE", kind=R.EARN_RULE_KIND_BASE_RATE, millipoints_per_unit=2000),
    R.EarnRule(rule_id="HALF", kind=R.EARN_RULE_KIND_ROUNDING, rounding=R.EARN_ROUNDING_HALF_UP),
]


def a_sale(**fields: Any) -> R.EvaluateEarnRequest:
    values: dict[str, Any] = {
        "program_id": "GOLD",
        "store_id": "S001",
        "terminal_id": "T1",
        "business_day": day(dt.date(2026, 12, 1)),
        "lines": [
            R.EarnLine(line_no=1, sku="CREAM", category="skincare", net=cny(12_050)),
            R.EarnLine(line_no=2, sku="LIP", category="makeup", net=cny(5_000)),
            R.EarnLine(line_no=3, sku="GC100", category="gift_card", net=cny(10_000)),
        ],
    }
    values.update(fields)
    return R.EvaluateEarnRequest(**values)


async def test_rule_sets_are_versioned_and_in_force_by_time(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    lo = await start(suite, database_url)
    built_in = await lo.rules.GetEarnRuleSet(R.GetEarnRuleSetRequest(), metadata=OP_S001)
    assert built_in.version == 0 and built_in.rules[0].millipoints_per_unit == 1000
    preview = await lo.rules.EvaluateEarn(a_sale(), metadata=OP_S001)
    assert (preview.points, preview.rule_set_version) == (270, 0)

    publish = R.PublishEarnRuleSetRequest(request_id="rules-v1", rules=V1_RULES)
    v1 = await lo.rules.PublishEarnRuleSet(publish, metadata=HQ)
    assert v1.version == 1 and v1.published_by.principal == "test-admin"
    # A retry is the same answer; the key with another body is refused.
    assert await lo.rules.PublishEarnRuleSet(publish, metadata=HQ) == v1
    other = R.PublishEarnRuleSetRequest(request_id="rules-v1", rules=V2_RULES)
    details = await refused(
        lo.rules.PublishEarnRuleSet(other, metadata=HQ), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"

    next_month = utcnow() + dt.timedelta(days=30)
    v2 = await lo.rules.PublishEarnRuleSet(
        R.PublishEarnRuleSetRequest(
            request_id=rid(), rules=V2_RULES, effective_time=ts(next_month)
        ),
        metadata=HQ,
    )
    assert v2.version == 2
    assert abs(v2.effective_time.ToDatetime(dt.UTC) - next_month) < dt.timedelta(seconds=1)

    # Now v1; from next month v2; before v1 the built-in set.
    now_in_force = await lo.rules.GetEarnRuleSet(R.GetEarnRuleSetRequest(), metadata=CHECKOUT)
    assert now_in_force.version == 1
    later = await lo.rules.GetEarnRuleSet(
        R.GetEarnRuleSetRequest(in_force_time=ts(next_month + dt.timedelta(hours=1))),
        metadata=CHECKOUT,
    )
    assert later.version == 2
    async with lo.runtime.db.sessions() as session:
        assert (await rule_store.rule_set_in_force(session, utcnow())).version == 1
        assert (await rule_store.rule_set_in_force(session, next_month)).version == 2
        past = await rule_store.rule_set_in_force(session, utcnow() - dt.timedelta(days=1))
        assert past.version == 0 and past.rules[0].millipoints_per_unit == 1000
    got = await lo.rules.GetEarnRuleSet(R.GetEarnRuleSetRequest(version=1), metadata=OP_S001)
    assert got == v1
    details = await refused(
        lo.rules.GetEarnRuleSet(R.GetEarnRuleSetRequest(version=9), metadata=OP_S001),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details["reason"] == "RULE_SET_NOT_FOUND"

    listed, page_token = [], ""
    while True:
        page = await lo.rules.ListEarnRuleSets(
            R.ListEarnRuleSetsRequest(page_size=1, page_token=page_token), metadata=OP_S001
        )
        listed.extend(s.version for s in page.rule_sets)
        page_token = page.next_page_token
        if not page_token:
            break
    assert listed == [2, 1]

    # Evaluating, with the explanation a cashier reads.
    result = await lo.rules.EvaluateEarn(a_sale(), metadata=OP_S001)
    assert (result.points, result.rule_set_version) == (241 + 50, 1)
    assert [(s.rule_id, s.kind, s.points_delta) for s in result.steps] == [
        ("NOGIFT", "EXCLUSION", 0),
        ("BASE", "BASE_RATE", 170),
        ("R3", "MULTIPLIER", 121),
    ]
    assert result.steps[0].explanation == "gift cards (rule NOGIFT): line 3 earn nothing"
    assert result.steps[2].explanation == (
        "double points on skincare (rule R3), line 1: 120.5 → 241"
    )
    assert sum(s.points_delta for s in result.steps) == result.points
    # The rules of next month, previewed.
    later_result = await lo.rules.EvaluateEarn(
        a_sale(evaluate_time=ts(next_month + dt.timedelta(days=1))), metadata=OP_S001
    )
    assert (later_result.points, later_result.rule_set_version) == (541, 2)
    # A tier's multiplier, from the ladder.
    vip = await lo.rules.EvaluateEarn(a_sale(tier_id="VIP"), metadata=CHECKOUT)
    assert (vip.points, vip.tier_multiplier_bps) == (436, 15_000)
    assert vip.steps[-2].explanation == "tier VIP ×1.5: 291 → 436.5"


async def test_bad_rule_sets_and_callers_are_refused(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    lo = await start(suite, database_url)
    no_default = [
        R.EarnRule(
            rule_id="P",
            kind=R.EARN_RULE_KIND_BASE_RATE,
            millipoints_per_unit=1000,
            program_ids=["GOLD"],
        ),
        R.EarnRule(rule_id="M", kind=R.EARN_RULE_KIND_MULTIPLIER, factor_bps=0, cap_points=3),
        R.EarnRule(
            rule_id="D",
            kind=R.EARN_RULE_KIND_PROMOTION,
            factor_bps=20_000,
            dates=[date_pb2.Date(year=2026, month=2, day=30)],
        ),
    ]
    details = await refused(
        lo.rules.PublishEarnRuleSet(
            R.PublishEarnRuleSetRequest(request_id=rid(), rules=no_default), metadata=HQ
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["violations"] == {"rules[2].dates[0]": "a calendar date with its year"}
    no_default = no_default[:2]
    details = await refused(
        lo.rules.PublishEarnRuleSet(
            R.PublishEarnRuleSetRequest(request_id=rid(), rules=no_default), metadata=HQ
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {
        "rules",
        "rules[1].factor_bps",
        "rules[1].cap_points",
    }
    past = R.PublishEarnRuleSetRequest(
        request_id=rid(),
        rules=V1_RULES,
        effective_time=ts(utcnow() - dt.timedelta(days=1)),
    )
    details = await refused(
        lo.rules.PublishEarnRuleSet(past, metadata=HQ), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "effective_time" in details["violations"]
    await refused(
        lo.rules.PublishEarnRuleSet(
            R.PublishEarnRuleSetRequest(request_id=rid(), rules=V1_RULES), metadata=OP_S001
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Nothing was published.
    listed = await lo.rules.ListEarnRuleSets(R.ListEarnRuleSetsRequest(), metadata=OP_S001)
    assert list(listed.rule_sets) == []

    details = await refused(
        lo.rules.EvaluateEarn(
            a_sale(
                business_day=date_pb2.Date(),
                paid_with_points=cny(10**9),
                lines=[
                    R.EarnLine(line_no=1, net=money_pb2.Money(currency_code="USD", minor_units=1))
                ],
            ),
            metadata=OP_S001,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"lines.net.currency_code", "business_day"}
    details = await refused(
        lo.rules.EvaluateEarn(a_sale(paid_with_points=cny(10**9)), metadata=OP_S001),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"paid_with_points"}
    await refused(lo.rules.EvaluateEarn(a_sale(), metadata=()), grpc.StatusCode.UNAUTHENTICATED)


# -- tiers -----------------------------------------------------------------------------------------


def stamp(at: dt.datetime | None = None) -> TierStamp:
    return TierStamp("checkout", "S001", at or utcnow())


async def sold(
    lo: Loyalty, member_id: str, sale_id: str, spend: int, on: dt.date
) -> tiers.TierProgress:
    async with lo.runtime.db.transaction() as session:
        return await tiers.after_sale(
            session,
            member_id,
            sale_id=sale_id,
            spend_minor_units=spend,
            business_day=on,
            stamp=stamp(),
        )


async def review(lo: Loyalty, as_of: dt.datetime, request_id: str | None = None) -> R.TierReview:
    return await lo.tiers.RunTierReview(
        R.RunTierReviewRequest(request_id=request_id or rid(), as_of=ts(as_of)), metadata=HQ
    )


async def history(lo: Loyalty, member_id: str) -> list[R.TierHistoryEntry]:
    found: list[R.TierHistoryEntry] = []
    page_token = ""
    while True:
        page = await lo.tiers.ListTierHistory(
            R.ListTierHistoryRequest(member_id=member_id, page_size=2, page_token=page_token),
            metadata=OP_S001,
        )
        found.extend(page.entries)
        page_token = page.next_page_token
        if not page_token:
            return found


SHANGHAI = dt.timezone(dt.timedelta(hours=8))


async def test_upgrade_at_the_sale_refund_grace_and_downgrade_at_reviews(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    lo = await start(suite, database_url)
    ladder = await lo.tiers.GetTierLadder(R.GetTierLadderRequest(), metadata=OP_S001)
    assert [t.tier_id for t in ladder.tiers] == ["NON_VIP", "QUASI_VIP", "VIP"]
    unknown = await lo.tiers.GetMemberTier(
        R.GetMemberTierRequest(member_id="M-NEW"), metadata=CHECKOUT
    )
    assert unknown.tier.tier_id == "NON_VIP" and not unknown.HasField("since")
    assert unknown.progress.next_tier_id == "QUASI_VIP"
    async with lo.runtime.db.sessions() as session:
        assert (await tiers.tier_of(session, "M-NEW")).tier_id == "NON_VIP"

    first = await sold(lo, "M-ANN", "SALE-1", 150_000, dt.date(2025, 1, 10))
    assert (first.tier.tier_id, first.changed_from) == ("NON_VIP", "")
    assert (first.spend_to_next_minor_units, first.visits_to_next) == (50_000, 5)
    # The sale that crosses the threshold moves the member up at once.
    second = await sold(lo, "M-ANN", "SALE-2", 60_000, dt.date(2025, 1, 11))
    assert (second.tier.tier_id, second.changed_from) == ("QUASI_VIP", "NON_VIP")
    assert (second.next_tier_id, second.spend_to_next_minor_units) == ("VIP", 790_000)
    assert (second.window_spend_minor_units, second.window_visits) == (210_000, 2)
    assert second.tier.discount_bps == 300 and second.tier.points_multiplier_bps == 12_000
    # A retried sale counts once and says the same.
    assert await sold(lo, "M-ANN", "SALE-2", 60_000, dt.date(2025, 1, 11)) == second
    third = await sold(lo, "M-ANN", "SALE-3", 800_000, dt.date(2025, 1, 20))
    assert (third.tier.tier_id, third.changed_from) == ("VIP", "QUASI_VIP")

    # The member's tier now prices and earns.
    vip = await lo.rules.EvaluateEarn(a_sale(member_id="M-ANN"), metadata=CHECKOUT)
    assert (vip.tier_id, vip.tier_multiplier_bps) == ("VIP", 15_000)

    # A refund of the big sale does not move the member down by itself (the
    # checkout passes what was given back as a negative amount).
    async with lo.runtime.db.transaction() as session:
        for _ in range(2):
            await tiers.after_refund(
                session,
                "M-ANN",
                sale_id="SALE-3",
                refund_id="REFUND-1",
                spend_minor_units=-800_000,
                business_day=dt.date(2025, 2, 1),
                stamp=stamp(),
            )
    member = await lo.tiers.GetMemberTier(
        R.GetMemberTierRequest(member_id="M-ANN"), metadata=OP_S001
    )
    assert member.tier.tier_id == "VIP" and not member.HasField("grace_end_time")

    # The review of the first quarter: no longer VIP (2,100.00 in the
    # window), so a grace period of 30 days from the end of the quarter.
    q1_end = dt.datetime(2025, 4, 1, tzinfo=SHANGHAI)
    done = await review(lo, q1_end, "review-q1")
    assert (done.period, done.already_reviewed) == ("2025-Q1", False)
    assert done.period_end_time.ToDatetime(dt.UTC) == q1_end
    assert (done.members_reviewed, done.entered_grace, done.downgraded) == (1, 1, 0)
    # Idempotent: the same request is the same answer; the period is not
    # reviewed twice.
    assert await review(lo, q1_end, "review-q1") == done
    again = await review(lo, q1_end + dt.timedelta(days=1))
    assert (again.period, again.already_reviewed, again.members_reviewed) == ("2025-Q1", True, 0)
    details = await refused(
        review(lo, q1_end + dt.timedelta(days=2), "review-q1"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"
    member = await lo.tiers.GetMemberTier(
        R.GetMemberTierRequest(member_id="M-ANN"), metadata=OP_S001
    )
    assert member.tier.tier_id == "VIP"
    assert member.grace_end_time.ToDatetime(dt.UTC) == dt.datetime(2025, 5, 1, tzinfo=SHANGHAI)

    # Grace not over yet: nothing happens.
    early = await review(lo, dt.datetime(2025, 4, 30, 23, tzinfo=SHANGHAI))
    assert (early.graces_ended, early.downgraded) == (0, 0)
    # Over: down to the highest tier the member qualifies for.
    ended = await review(lo, dt.datetime(2025, 5, 1, 0, 5, tzinfo=SHANGHAI))
    assert (ended.already_reviewed, ended.graces_ended, ended.downgraded) == (True, 1, 1)
    member = await lo.tiers.GetMemberTier(
        R.GetMemberTierRequest(member_id="M-ANN"), metadata=OP_S001
    )
    assert member.tier.tier_id == "QUASI_VIP" and not member.HasField("grace_end_time")

    entries = await history(lo, "M-ANN")
    assert [(e.kind, e.from_tier_id, e.to_tier_id) for e in entries] == [
        (R.TIER_HISTORY_KIND_DOWNGRADED, "VIP", "QUASI_VIP"),
        (R.TIER_HISTORY_KIND_GRACE_STARTED, "VIP", "QUASI_VIP"),
        (R.TIER_HISTORY_KIND_UPGRADED, "QUASI_VIP", "VIP"),
        (R.TIER_HISTORY_KIND_UPGRADED, "NON_VIP", "QUASI_VIP"),
    ]
    assert entries[1].period == "2025-Q1" and entries[3].sale_id == "SALE-2"
    assert entries[0].stamp.principal == "test-admin"
    changes = await tier_events(lo)
    assert [(e.from_tier_id, e.to_tier_id, e.upgrade) for e in changes] == [
        ("NON_VIP", "QUASI_VIP", True),
        ("QUASI_VIP", "VIP", True),
        ("VIP", "QUASI_VIP", False),
    ]
    assert changes[0].member_id == "M-ANN" and changes[0].stamp.store_id == "S001"

    # Reviews are HQ's, and only of periods that ended.
    await refused(
        lo.tiers.RunTierReview(R.RunTierReviewRequest(request_id=rid()), metadata=OP_S001),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    details = await refused(
        review(lo, utcnow() + dt.timedelta(days=1)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "as_of" in details["violations"]


async def test_a_member_who_qualifies_again_leaves_grace(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    lo = await start(suite, database_url)
    await sold(lo, "M-BOB", "B-1", 250_000, dt.date(2025, 1, 5))
    async with lo.runtime.db.transaction() as session:
        await tiers.after_refund(
            session,
            "M-BOB",
            sale_id="B-1",
            refund_id="B-R1",
            spend_minor_units=100_000,
            business_day=dt.date(2025, 1, 6),
            stamp=stamp(),
        )
    done = await review(lo, dt.datetime(2025, 4, 2, tzinfo=SHANGHAI))
    assert done.entered_grace == 1
    # A sale during the grace period that qualifies again ends it.
    back = await sold(lo, "M-BOB", "B-2", 60_000, dt.date(2025, 4, 10))
    assert back.tier.tier_id == "QUASI_VIP" and back.changed_from == ""
    member = await lo.tiers.GetMemberTier(
        R.GetMemberTierRequest(member_id="M-BOB"), metadata=OP_S001
    )
    assert not member.HasField("grace_end_time")
    assert [e.kind for e in await history(lo, "M-BOB")][:2] == [
        R.TIER_HISTORY_KIND_GRACE_ENDED,
        R.TIER_HISTORY_KIND_GRACE_STARTED,
    ]
    later = await review(lo, dt.datetime(2025, 6, 1, tzinfo=SHANGHAI))
    assert (later.graces_ended, later.downgraded) == (0, 0)


async def test_concurrent_sales_of_one_member_stay_consistent(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    lo = await start(suite, database_url)
    on = dt.date(2025, 3, 1)
    # Ten sales of 300.00 at once, one of them sent twice: 2,000.00 is
    # crossed once, by one of them.
    sales = [f"C-{i}" for i in range(10)] + ["C-0"]
    results = await asyncio.gather(*(sold(lo, "M-CAT", s, 30_000, on) for s in sales))
    assert sum(1 for r in results if r.changed_from == "NON_VIP") in (1, 2)  # C-0's retry
    async with lo.runtime.db.sessions() as session:
        activity = (
            await session.execute(
                sa.select(sa.func.count()).where(tier_store.tier_activity.c.member_id == "M-CAT")
            )
        ).scalar()
        assert activity == 10
        assert (await tiers.tier_of(session, "M-CAT")).tier_id == "QUASI_VIP"
        standing = await tier_store.standing(session, "M-CAT", on, on)
        assert (standing.spend, standing.visits) == (300_000, 1)
    upgrades = [e for e in await history(lo, "M-CAT") if e.kind == R.TIER_HISTORY_KIND_UPGRADED]
    assert len(upgrades) == 1
    assert len(await tier_events(lo)) == 1
    crossing = upgrades[0].sale_id
    assert {r.changed_from for r, s in zip(results, sales, strict=True) if s == crossing} == {
        "NON_VIP"
    }


async def test_the_ladder_is_the_chains_to_change(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    lo = await start(suite, database_url)
    current = await lo.tiers.GetTierLadder(R.GetTierLadderRequest(), metadata=HQ)
    ladder = R.TierLadder(
        currency_code="CNY",
        window_days=180,
        review_period=R.TIER_REVIEW_PERIOD_MONTH,
        time_zone="Asia/Shanghai",
        grace_days=15,
        tiers=[
            R.Tier(tier_id="BASIC", name="Basic", rank=0),
            R.Tier(
                tier_id="SILVER",
                name="Silver",
                rank=10,
                min_spend=cny(100_000),
                qualification=R.TIER_QUALIFICATION_SPEND_ONLY,
                benefits=R.TierBenefits(discount_bps=200),
            ),
            R.Tier(
                tier_id="GOLD",
                name="Gold",
                rank=20,
                min_spend=cny(500_000),
                min_visits=10,
                qualification=R.TIER_QUALIFICATION_SPEND_AND_VISITS,
                benefits=R.TierBenefits(discount_bps=500, points_multiplier_bps=20_000),
            ),
        ],
    )
    request = R.UpdateTierLadderRequest(request_id="ladder-1", ladder=ladder, etag=current.etag)
    updated = await lo.tiers.UpdateTierLadder(request, metadata=HQ)
    assert [t.tier_id for t in updated.tiers] == ["BASIC", "SILVER", "GOLD"]
    assert updated.tiers[1].benefits.points_multiplier_bps == 10_000
    assert updated.updated_by.principal == "test-admin" and updated.etag != current.etag
    assert await lo.tiers.UpdateTierLadder(request, metadata=HQ) == updated
    # A stale etag.
    details = await refused(
        lo.tiers.UpdateTierLadder(
            R.UpdateTierLadderRequest(request_id=rid(), ladder=ladder, etag=current.etag),
            metadata=HQ,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert details["reason"] == "ETAG_MISMATCH"
    # Bad fields: nothing changes.
    bad = R.TierLadder()
    bad.CopyFrom(ladder)
    bad.tiers[2].min_spend.minor_units = 50_000
    bad.review_period = R.TIER_REVIEW_PERIOD_UNSPECIFIED
    details = await refused(
        lo.tiers.UpdateTierLadder(
            R.UpdateTierLadderRequest(request_id=rid(), ladder=bad, etag=updated.etag), metadata=HQ
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"ladder.review_period"}
    bad.review_period = R.TIER_REVIEW_PERIOD_MONTH
    details = await refused(
        lo.tiers.UpdateTierLadder(
            R.UpdateTierLadderRequest(request_id=rid(), ladder=bad, etag=updated.etag), metadata=HQ
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["violations"] == {
        "ladder.tiers[2].min_spend": "more than tier SILVER's, which ranks lower"
    }
    await refused(
        lo.tiers.UpdateTierLadder(
            R.UpdateTierLadderRequest(request_id=rid(), ladder=ladder, etag=updated.etag),
            metadata=OP_S001,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )

    # Members reach the chain's tiers; a tier they hold cannot be removed.
    progress = await sold(lo, "M-DAN", "D-1", 120_000, dt.date(2025, 6, 1))
    assert (progress.tier.tier_id, progress.next_tier_id) == ("SILVER", "GOLD")
    assert progress.visits_to_next == 9
    without_silver = R.TierLadder()
    without_silver.CopyFrom(ladder)
    del without_silver.tiers[1]
    details = await refused(
        lo.tiers.UpdateTierLadder(
            R.UpdateTierLadderRequest(request_id=rid(), ladder=without_silver, etag=updated.etag),
            metadata=HQ,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert (details["reason"], details["metadata"]["tier_id"]) == ("TIER_IN_USE", "SILVER")
    usd = R.TierLadder()
    usd.CopyFrom(ladder)
    usd.currency_code = "USD"
    for tier in usd.tiers:
        tier.min_spend.currency_code = "USD"
    details = await refused(
        lo.tiers.UpdateTierLadder(
            R.UpdateTierLadderRequest(request_id=rid(), ladder=usd, etag=updated.etag), metadata=HQ
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "CURRENCY_FIXED"


async def test_the_worker_reviews_each_period_that_ended_once(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    lo = await start(suite, database_url, WITH_WORKER)
    db = lo.runtime.db
    async with db.sessions() as session:
        ladder = (await tier_store.get_ladder(session)).ladder

    async def last_review() -> tier_store.ReviewRecord | None:
        async with db.sessions() as session:
            return await tier_store.get_review(session, last_ended_period(ladder, utcnow()).key)

    # The pass at start reviewed the last period that ended.
    found = await eventually(last_review, lambda r: r is not None and r.state == tier_store.DONE)
    assert found is not None and found.requested_by == tiers.SYSTEM_PRINCIPAL

    # Members above the lowest tier whose spend left the window, reviewed by
    # two replicas at once: each member once, whoever does it.
    for i in range(3):
        await sold(lo, f"M-{i}", f"W-{i}", 300_000, dt.date(2023, 5, 1))
    one, two = tiers.TierReviewWorker(db), tiers.TierReviewWorker(db)
    as_of = dt.datetime(2024, 7, 1, tzinfo=SHANGHAI)
    outcomes = await asyncio.gather(
        one.run_once(as_of), two.run_once(as_of), return_exceptions=True
    )
    done = [o for o in outcomes if isinstance(o, tiers.ReviewOutcome)]
    assert all(isinstance(o, tiers.ReviewOutcome | Aborted) for o in outcomes)
    assert sum(o.counts.members_reviewed for o in done) == 3
    assert sum(o.counts.entered_grace for o in done) == 3
    assert {o.period.key for o in done} == {"2024-Q2"}
    # Later passes: the period is done; grace periods end when due.
    again = await one.run_once(as_of + dt.timedelta(days=1))
    assert again.already_reviewed and again.counts.entered_grace == 0
    ended = await two.run_once(dt.datetime(2024, 8, 1, tzinfo=SHANGHAI))
    assert (ended.counts.graces_ended, ended.counts.downgraded) == (3, 3)
    async with db.sessions() as session:
        assert {(await tiers.tier_of(session, f"M-{i}")).tier_id for i in range(3)} == {"NON_VIP"}


async def test_a_review_cut_short_is_taken_over_where_it_stopped(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    lo = await start(suite, database_url)
    db = lo.runtime.db
    for i in range(5):
        await sold(lo, f"M-{i}", f"X-{i}", 300_000, dt.date(2023, 1, 10))
    monkeypatch.setattr(tiers, "BATCH", 2)
    as_of = dt.datetime(2024, 4, 1, tzinfo=SHANGHAI)
    first = tiers.TierReviewWorker(db)
    period = last_ended_period((await tier_store_ladder(lo)), as_of)
    # The first worker claims the period and reviews one batch, then dies.
    stamp_ = TierStamp(tiers.SYSTEM_PRINCIPAL, "", as_of)
    assert await tiers._claim(db, period, as_of, stamp_, first.worker_id) == "new"
    counts = tiers.ReviewCounts()
    assert not await tiers._review_batch(db, period, stamp_, first.worker_id, counts)
    assert counts.entered_grace == 2
    # Another may not take it over while the claim holds...
    second = tiers.TierReviewWorker(db)
    with pytest.raises(Aborted):
        await second.run_once(as_of)
    # ...and resumes after the last member reviewed once it lapsed.
    async with db.transaction() as session:
        await tier_store.update_review(session, period.key, lease_until=utcnow())
    outcome = await second.run_once(as_of)
    assert (outcome.already_reviewed, outcome.counts.entered_grace) == (False, 3)
    async with db.sessions() as session:
        review_row = await tier_store.get_review(session, period.key)
    assert review_row is not None
    assert (review_row.state, review_row.members_reviewed, review_row.entered_grace) == (
        tier_store.DONE,
        5,
        5,
    )


async def tier_store_ladder(lo: Loyalty) -> Any:
    async with lo.runtime.db.sessions() as session:
        return (await tier_store.get_ladder(session)).ladder


async def test_the_migrations_make_the_tables_the_code_declares(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    lo = await start(suite, database_url)
    assert await schema_drift(lo.runtime.db, metadata, MY_TABLES) == []
