"""Pricing through real gRPC on SQLite and PostgreSQL: each promotion kind
priced with its explanation, stacking and exclusion groups, double points,
bad input."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.auth import Role, Scope, ScopeLevel
from cornucopia.campaigns.v1 import pricing_pb2 as pb
from cornucopia.campaigns.v1 import pricing_pb2_grpc
from cornucopia.common.v1 import money_pb2
from services.campaigns.server import definition as campaigns
from tests.integration.conftest import Suite, auth, rpc_details, token
from tests.integration.infra import DatabaseFactory

HQ = auth()
CHECKOUT = auth(token((Role.SERVICE,), Scope(ScopeLevel.HQ), "loyalty"))
AT = dt.datetime(2026, 6, 10, 4, tzinfo=dt.UTC)  # a Wednesday in Shanghai


def cny(minor: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="CNY", minor_units=minor)


def ts(value: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


def rid() -> str:
    return str(uuid.uuid4())


class Campaigns:
    def __init__(self, suite: Suite) -> None:
        channel = suite.channels["campaigns"]
        self.suite = suite
        self.pricing = pricing_pb2_grpc.PricingServiceStub(channel)
        self.coupons = pricing_pb2_grpc.CouponsServiceStub(channel)

    async def promotion(self, **fields: Any) -> pb.Promotion:
        fields.setdefault("start_time", ts(AT - dt.timedelta(days=1)))
        fields.setdefault("stacking", pb.STACKING_COMBINABLE)
        fields.setdefault("display_name", "Promo")
        return await self.pricing.CreatePromotion(
            pb.CreatePromotionRequest(request_id=rid(), promotion=pb.Promotion(**fields)),
            metadata=HQ,
        )

    async def price(self, lines: list[pb.BasketLine], **fields: Any) -> pb.PricedBasket:
        fields.setdefault("store_id", "S001")
        fields.setdefault("region_id", "EAST")
        fields.setdefault("at", ts(AT))
        return await self.pricing.PriceBasket(
            pb.PriceBasketRequest(lines=lines, **fields), metadata=CHECKOUT
        )


async def start(suite: Suite, database_url: DatabaseFactory) -> Campaigns:
    await suite.start(campaigns, await database_url("campaigns"))
    return Campaigns(suite)


def line(no: int, sku: str, category: str, qty: int, price: int) -> pb.BasketLine:
    return pb.BasketLine(
        line_no=no, sku=sku, category=category, quantity=qty, unit_price=cny(price)
    )


BASKET = [line(1, "LIP-1", "lipstick", 2, 10_000), line(2, "CRM-1", "cream", 1, 30_000)]


async def test_each_kind_priced_and_explained(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start(suite, database_url)
    member_price = await c.promotion(
        display_name="Lipstick member price",
        kind=pb.PROMOTION_KIND_MEMBER_PRICE,
        skus=["LIP-1"],
        member_price=cny(8_000),
    )
    cream = await c.promotion(
        display_name="Cream week",
        kind=pb.PROMOTION_KIND_PERCENT_OFF,
        categories=["cream"],
        percent_bps=1000,
    )
    spend = await c.promotion(
        display_name="Spend 400 save 30",
        kind=pb.PROMOTION_KIND_SPEND_SAVE,
        threshold=cny(40_000),
        save=cny(3_000),
        priority=10,
    )
    day = await c.promotion(
        display_name="Wednesday member day",
        kind=pb.PROMOTION_KIND_MEMBER_DAY,
        weekdays=[3],
        percent_bps=500,
        time_zone="Asia/Shanghai",
    )
    birthday = await c.promotion(
        display_name="Birthday", kind=pb.PROMOTION_KIND_BIRTHDAY, percent_bps=1000
    )
    points = await c.promotion(
        display_name="Double points",
        kind=pb.PROMOTION_KIND_DOUBLE_POINTS,
        points_multiplier_bps=20_000,
    )
    elsewhere = await c.promotion(
        display_name="West only",
        kind=pb.PROMOTION_KIND_PERCENT_OFF,
        percent_bps=5000,
        region_ids=["WEST"],
    )
    assert day.members_only and not cream.members_only

    priced = await c.price(
        BASKET,
        member_id="M1",
        program_id="GOLD",
        member_discount_bps=300,
        tier_id="T-GOLD",
        tier_name="Gold",
        tier_discount_bps=500,
        birthday_month=6,
    )
    rules = {d.rule_id for pl in priced.lines for d in pl.discounts}
    assert {member_price.promotion_id, cream.promotion_id, spend.promotion_id} <= rules
    assert {day.promotion_id, birthday.promotion_id, "T-GOLD"} <= rules
    assert elsewhere.promotion_id not in rules
    assert priced.points_multiplier_bps == 20_000
    assert priced.points_promotion_id == points.promotion_id
    assert priced.total.minor_units == sum(pl.net.minor_units for pl in priced.lines)
    assert priced.total.minor_units + priced.discount.minor_units == 50_000
    texts = [d.description for pl in priced.lines for d in pl.discounts]
    assert "Gold tier discount: 5% off" in texts
    assert any("member price 80.00 CNY each" in t for t in texts)
    assert any("spend 400.00 CNY, save 30.00 CNY" in t for t in texts)
    sources = {d.source for pl in priced.lines for d in pl.discounts}
    assert sources == {pb.DISCOUNT_SOURCE_TIER, pb.DISCOUNT_SOURCE_PROMOTION}

    guest = await c.price(BASKET)
    guest_rules = {d.rule_id for pl in guest.lines for d in pl.discounts}
    assert guest_rules == {cream.promotion_id, spend.promotion_id}
    assert guest.points_multiplier_bps == 10_000


async def test_stacking_and_exclusion(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start(suite, database_url)
    a = await c.promotion(kind=pb.PROMOTION_KIND_PERCENT_OFF, percent_bps=1000, priority=1)
    b = await c.promotion(kind=pb.PROMOTION_KIND_PERCENT_OFF, percent_bps=1000, priority=2)
    g1 = await c.promotion(kind=pb.PROMOTION_KIND_PERCENT_OFF, percent_bps=500, exclusion_group="g")
    g2 = await c.promotion(kind=pb.PROMOTION_KIND_PERCENT_OFF, percent_bps=800, exclusion_group="g")
    priced = await c.price(BASKET)
    order = [d.rule_id for d in priced.lines[0].discounts]
    assert order[:2] == [b.promotion_id, a.promotion_id]
    assert g2.promotion_id in order and g1.promotion_id not in order
    big = await c.promotion(
        kind=pb.PROMOTION_KIND_PERCENT_OFF, percent_bps=5000, stacking=pb.STACKING_EXCLUSIVE
    )
    alone = await c.price(BASKET)
    assert {d.rule_id for pl in alone.lines for d in pl.discounts} == {big.promotion_id}
    assert alone.total.minor_units == 25_000
    await c.pricing.EndPromotion(
        pb.EndPromotionRequest(request_id=rid(), promotion_id=big.promotion_id), metadata=HQ
    )
    listed = await c.pricing.ListPromotions(pb.ListPromotionsRequest(page_size=2), metadata=HQ)
    assert len(listed.promotions) == 2 and listed.next_page_token


async def test_bad_input(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start(suite, database_url)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await c.price([line(1, "", "x", 0, -1)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lines[0].sku" in rpc_details(caught.value)["violations"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await c.promotion(kind=pb.PROMOTION_KIND_SPEND_SAVE, threshold=cny(100), save=cny(500))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await c.pricing.CreatePromotion(
            pb.CreatePromotionRequest(request_id=rid(), promotion=pb.Promotion()),
            metadata=CHECKOUT,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
