"""What campaigns keeps per process and writes in fewer statements, on real
databases (SQLite and PostgreSQL): the promotions in force and the enabled
follow-up plans as kept for a few seconds, seen at once when changed through
this process and filtered by each call's own time; a checkout priced again
without its coupon; a sale's visit days; who referred a member."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from chassis.auth import (
    Principal,
    Role,
    Scope,
    ScopeLevel,
    reset_current_principal,
    set_current_principal,
)
from chassis.db import Database, utcnow
from cornucopia.campaigns.v1 import pricing_pb2 as pb
from cornucopia.common.v1 import money_pb2
from services.campaigns.domain.coupons import CouponState, Template
from services.campaigns.domain.followups import PlanKind
from services.campaigns.domain.pricing import CouponKind, Promotion, PromotionKind
from services.campaigns.server.pricing import PricingServicer
from services.campaigns.store import coupons, followups, promotions, referrals
from tests.integration.infra import DatabaseFactory, migrated

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
HOUR = dt.timedelta(hours=1)


@pytest.fixture
async def db(database_url: DatabaseFactory) -> AsyncIterator[Database]:
    database = Database(await migrated(database_url, MIGRATIONS, "campaigns"))
    yield database
    await database.dispose()


def promotion(promotion_id: str, starts_at: dt.datetime, ends_at: dt.datetime | None) -> Promotion:
    return Promotion(
        promotion_id=promotion_id,
        name=promotion_id,
        kind=PromotionKind.PERCENT_OFF,
        starts_at=starts_at,
        ends_at=ends_at,
        currency="CNY",
        percent_bps=1000,
    )


async def in_force(db: Database, at: dt.datetime) -> list[str]:
    async with db.sessions() as session:
        return [p.promotion_id for p in await promotions.promotions_in_force(session, at)]


async def read_in_force(db: Database, at: dt.datetime) -> list[str]:
    """What the table says, not kept."""
    async with db.sessions() as session:
        rows = await session.execute(promotions._IN_FORCE_AT, {"at": at})
        return [row.promotion_id for row in rows]


async def test_promotions_kept_are_filtered_by_the_time_of_each_call(db: Database) -> None:
    now = utcnow()
    async with db.transaction() as session:
        for p in (
            promotion("P-ENDED", now - 48 * HOUR, now - 24 * HOUR),
            promotion("P-NOW", now - HOUR, None),
            promotion("P-SOON", now + HOUR, now + 3 * HOUR),
            promotion("P-ENDING", now - HOUR, now + 2 * HOUR),
        ):
            await promotions.insert_promotion(
                session, p, principal="hq", store_id="", now=now - 48 * HOUR
            )
    assert await in_force(db, now) == ["P-ENDING", "P-NOW"]
    # Kept: later calls see windows open and close at their own time.
    assert await in_force(db, now + 90 * dt.timedelta(minutes=1)) == [
        "P-ENDING",
        "P-NOW",
        "P-SOON",
    ]
    assert await in_force(db, now + 150 * dt.timedelta(minutes=1)) == ["P-NOW", "P-SOON"]
    # A time before what is kept (an old sale priced again) is read.
    assert await in_force(db, now - 30 * HOUR) == ["P-ENDED"]
    for hours in range(-50, 5):
        at = now + hours * HOUR
        assert await in_force(db, at) == await read_in_force(db, at)


async def test_promotions_changed_through_this_process_are_seen_at_once(db: Database) -> None:
    now = utcnow()
    assert await in_force(db, now) == []
    async with db.transaction() as session:
        await promotions.insert_promotion(
            session, promotion("P1", now - HOUR, None), principal="hq", store_id="", now=now
        )
    assert await in_force(db, now) == ["P1"]
    async with db.transaction() as session:
        await promotions.end_promotion(session, "P1", now - dt.timedelta(minutes=1))
    assert await in_force(db, now) == []


async def test_a_checkout_priced_again_without_its_coupon_releases_it(db: Database) -> None:
    now = utcnow()
    template = Template("T1", "Ten off", CouponKind.AMOUNT_OFF, "CNY", amount_off=1_000)
    async with db.transaction() as session:
        await coupons.insert_template(session, template, principal="hq", store_id="", now=now)
        await coupons.insert_coupon(
            session,
            coupon_id="C1",
            code="C0DE0NE1234",
            template_id="T1",
            member_id="M1",
            state=CouponState.ISSUED.value,
            issued_at=now,
            issued_by="hq",
            valid_from=now - HOUR,
            expires_at=now + 24 * HOUR,
        )
    servicer = PricingServicer(SimpleNamespace(db=db))  # type: ignore[arg-type]
    line = pb.BasketLine(
        line_no=1,
        sku="LIP-1",
        category="lipstick",
        quantity=1,
        unit_price=money_pb2.Money(currency_code="CNY", minor_units=10_000),
    )

    async def price(*codes: str) -> pb.PricedBasket:
        request = pb.PriceBasketRequest(
            store_id="S001", member_id="M1", lines=[line], coupon_codes=codes, reservation_id="K1"
        )
        return await servicer.PriceBasket(request, context=None)  # type: ignore[arg-type]

    async def state() -> CouponState:
        async with db.sessions() as session:
            found = await coupons.get_coupon(session, coupon_id="C1")
        assert found is not None
        return found.state

    token = set_current_principal(
        Principal("loyalty", frozenset({Role.SERVICE}), Scope(ScopeLevel.HQ))
    )
    try:
        reserved = await price("C0DE0NE1234")
        assert reserved.coupons[0].accepted and reserved.HasField("reservation_expire_time")
        assert await state() == CouponState.RESERVED
        # The cashier took the coupon off: priced again, it goes back.
        without = await price()
        assert not without.coupons and not without.HasField("reservation_expire_time")
        assert without.total.minor_units == 10_000
        assert await state() == CouponState.ISSUED
        assert await price() == without
    finally:
        reset_current_principal(token)


async def test_enabled_plans_changed_through_this_process_are_seen_at_once(
    db: Database,
) -> None:
    async with db.sessions() as session:
        plans = await followups.enabled_plans(session)
        assert [p.plan_id for p in plans] == ["birthday", "three-three-three", "win-back"]
        kind = await followups.enabled_plans(session, PlanKind.WIN_BACK)
        assert [p.plan_id for p in kind] == ["win-back"]
    now = utcnow()
    three = next(p for p in plans if p.kind == PlanKind.THREE_THREE_THREE)
    async with db.transaction() as session:
        await followups.update_plan(session, replace(three, enabled=False), now)
    async with db.sessions() as session:
        plans = await followups.enabled_plans(session)
        assert [p.plan_id for p in plans] == ["birthday", "win-back"]
    async with db.transaction() as session:
        await followups.insert_plan(
            session,
            replace(three, plan_id="after-skincare", kind=PlanKind.POST_PURCHASE, days=7),
            now,
        )
    async with db.sessions() as session:
        plans = await followups.enabled_plans(session)
        assert [p.plan_id for p in plans] == ["after-skincare", "birthday", "win-back"]


async def visit_days(db: Database, member_id: str) -> tuple[dt.date | None, dt.date | None]:
    async with db.sessions() as session:
        known = await followups.get_member(session, member_id)
    assert known is not None
    return known.first_purchase_day, known.last_visit_day


@pytest.mark.parametrize("first_wanted", [True, False])
async def test_visits_move_the_first_day_earlier_and_the_last_day_later(
    db: Database, first_wanted: bool
) -> None:
    day = dt.date(2026, 11, 30)

    async def visit(member_id: str, on: dt.date) -> bool | None:
        async with db.transaction() as session:
            if first_wanted:
                return await followups.note_visit(session, member_id, on)
            await followups.note_any_visit(session, member_id, on)
            return None

    first = True if first_wanted else None
    later = False if first_wanted else None
    assert await visit("M1", day) is first
    assert await visit_days(db, "M1") == (day, day)
    assert await visit("M1", day) is later
    assert await visit("M1", day + dt.timedelta(days=3)) is later
    assert await visit_days(db, "M1") == (day, day + dt.timedelta(days=3))
    # A sale recorded late: an earlier first purchase, the last visit stays.
    assert await visit("M1", day - dt.timedelta(days=2)) is later
    assert await visit_days(db, "M1") == (day - dt.timedelta(days=2), day + dt.timedelta(days=3))
    # Known from an enrollment, never seen buying: the first purchase.
    async with db.transaction() as session:
        await followups.ensure_member(session, "M2", "S001")
    assert await visit("M2", day) is first
    assert await visit_days(db, "M2") == (day, day)
    async with db.sessions() as session:
        known = await followups.get_member(session, "M2")
    assert known is not None and known.home_store_id == "S001" and known.state == "active"


async def test_member_facts_are_kept_for_known_and_new_members(db: Database) -> None:
    async with db.transaction() as session:
        await followups.ensure_member(session, "M1", "S001")
        await followups.note_member_facts(session, "M1", home_store_id="", birthday_month=7)
        await followups.note_member_facts(session, "M2", home_store_id="S002", birthday_month=3)
        await followups.note_member_facts(session, "M3", home_store_id="", birthday_month=0)
    async with db.sessions() as session:
        got = [await followups.get_member(session, m) for m in ("M1", "M2", "M3")]
    assert [(k.home_store_id, k.birthday_month) for k in got if k] == [
        ("S001", 7),
        ("S002", 3),
        ("", 0),
    ]


async def test_the_first_word_on_who_referred_a_member_stays(db: Database) -> None:
    async with db.transaction() as session:
        assert await referrals.note_member(session, "M1", "R1")
        assert not await referrals.note_member(session, "M1", "R2")
        known = await referrals.get_member(session, "M1")
    assert known == referrals.KnownMember("M1", "R1", "")
