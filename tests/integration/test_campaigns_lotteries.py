"""Points lotteries on SQLite and PostgreSQL with a real loyalty service
and a real campaigns service talking over gRPC: draws charge points and
give coupon, points and gift prizes; lotteries under concurrency (30 draws
against a prize with stock 3 give it exactly 3 times); too few points
change nothing; a draw campaigns cannot complete is refunded; the audit
recomputes every draw; a retried request returns the same draw."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from chassis.auth import Role, Scope, ScopeLevel
from chassis.config import Settings
from chassis.db import outbox_table, utcnow
from chassis.service import ServiceRuntime
from cornucopia.campaigns.v1 import events_pb2, lotteries_pb2, lotteries_pb2_grpc, pricing_pb2_grpc
from cornucopia.campaigns.v1 import pricing_pb2 as pricing_pb
from cornucopia.common.v1 import money_pb2
from services.campaigns import lottery_draws
from services.campaigns.server import definition as campaigns_definition
from services.campaigns.store import lotteries as lottery_store
from tests.integration.conftest import Suite, auth, eventually, token
from tests.integration.infra import DatabaseFactory
from tests.integration.test_cards_lifecycle import refused
from tests.integration.test_loyalty_points import Loyalty, enroll, start_loyalty

L = lotteries_pb2
HQ = auth()
STAFF = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1"))
SERVICE = auth(token((Role.SERVICE,), Scope(ScopeLevel.HQ), "gateway"))


def rid() -> str:
    return str(uuid.uuid4())


class Rig:
    def __init__(self, suite: Suite, loyalty: Loyalty) -> None:
        self.suite = suite
        self.loyalty = loyalty
        channel = suite.channels["campaigns"]
        self.lotteries = lotteries_pb2_grpc.LotteriesServiceStub(channel)
        self.coupons = pricing_pb2_grpc.CouponsServiceStub(channel)

    @property
    def db(self) -> Any:
        return self.suite.runtimes["campaigns"].db

    async def lottery(
        self, *prizes: L.LotteryPrize, no_prize: int = 0, cost: int = 10
    ) -> L.Lottery:
        now = utcnow()
        start, end = (now - dt.timedelta(hours=1)), (now + dt.timedelta(days=1))
        lottery = L.Lottery(
            display_name="Spring draw", cost_points=cost, prizes=prizes, no_prize_weight=no_prize
        )
        lottery.start_time.FromDatetime(start)
        lottery.end_time.FromDatetime(end)
        return await self.lotteries.CreateLottery(
            L.CreateLotteryRequest(request_id=rid(), lottery=lottery), metadata=HQ
        )

    async def draw(self, lottery_id: str, member_id: str, request_id: str = "") -> L.LotteryDraw:
        return await self.lotteries.Draw(
            L.DrawRequest(
                request_id=request_id or rid(), lottery_id=lottery_id, member_id=member_id
            ),
            metadata=STAFF,
        )

    async def balance(self, member_id: str) -> int:
        return (await self.loyalty.account(member_id)).balance

    async def outbox(self, subject: str) -> list[bytes]:
        async with self.db.sessions() as session:
            rows = await session.execute(
                sa.select(outbox_table.c.payload)
                .where(outbox_table.c.subject == subject)
                .order_by(outbox_table.c.seq)
            )
            return [r.payload for r in rows]


async def start_campaigns(suite: Suite, url: str) -> ServiceRuntime:
    settings = Settings(
        service="campaigns",
        environment="test",
        var_dir=suite.var_dir,
        database_url=url,
        nats_url=suite.nats_url,
        grpc_listen="127.0.0.1:0",
        peers={
            "loyalty": f"127.0.0.1:{suite.runtimes['loyalty'].port}",
            "members": "127.0.0.1:1",
        },
    )
    runtime = ServiceRuntime(campaigns_definition, settings)
    await runtime.start()
    await asyncio.wait_for(runtime.ready.wait(), timeout=20)
    suite.runtimes["campaigns"] = runtime
    suite.channels["campaigns"] = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    return runtime


@pytest.fixture
async def rig(suite: Suite, database_url: DatabaseFactory) -> Rig:
    loyalty = await start_loyalty(suite, database_url)
    await start_campaigns(suite, await database_url("campaigns"))
    return Rig(suite, loyalty)


def points_prize(prize_id: str, points: int, stock: int, weight: int = 1) -> L.LotteryPrize:
    return L.LotteryPrize(
        prize_id=prize_id, kind=L.PRIZE_KIND_POINTS, points=points, stock=stock, weight=weight
    )


async def audit_matches(r: Rig, draw_id: str) -> bool:
    audit = await r.lotteries.AuditDraw(L.AuditDrawRequest(draw_id=draw_id), metadata=STAFF)
    assert audit.table_matches, audit
    return audit.matches


async def test_draws_charge_points_and_give_prizes(rig: Rig) -> None:
    r = rig
    await enroll(r.loyalty, "M-ANN", "M-BOB")
    await r.loyalty.accrue("M-ANN", 1_000)
    await r.loyalty.accrue("M-BOB", 5)

    # A points prize: charged, drawn, then awarded at loyalty.
    lottery = await r.lottery(points_prize("P500", 500, stock=5), cost=100)
    assert lottery.table_version == 1 and lottery.prizes[0].initial_stock == 5
    got = await r.lotteries.GetLottery(
        L.GetLotteryRequest(lottery_id=lottery.lottery_id), metadata=STAFF
    )
    assert got == lottery
    first = await r.draw(lottery.lottery_id, "M-ANN", request_id="draw-1")
    assert first.state == L.DRAW_STATE_DRAWN and first.won and first.prize.prize_id == "P500"
    assert first.charge_movement_id and first.cost_points == 100
    assert first.fulfilment == L.PRIZE_FULFILMENT_POINTS_AWARDED and first.points_lot_id
    assert len(bytes.fromhex(first.randomness.seed_hex)) == 32
    assert first.randomness.algorithm == "hmac-sha256-v1"
    assert [x.prize_id for x in first.randomness.rounds] == ["P500"]
    assert await r.balance("M-ANN") == 1_000 - 100 + 500
    # The same request again is the same draw, charged once.
    again = await r.draw(lottery.lottery_id, "M-ANN", request_id="draw-1")
    assert again == first
    assert await r.balance("M-ANN") == 1_400
    await refused(
        r.draw(lottery.lottery_id, "M-BOB", request_id="draw-1"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert await audit_matches(r, first.draw_id)

    # Too few points: nothing happens.
    details = await refused(
        r.draw(lottery.lottery_id, "M-BOB"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "POINTS_INSUFFICIENT"
    assert await r.balance("M-BOB") == 5
    listed = await r.lotteries.ListDraws(L.ListDrawsRequest(member_id="M-BOB"), metadata=STAFF)
    assert list(listed.draws) == []
    stock = await r.lotteries.GetLottery(
        L.GetLotteryRequest(lottery_id=lottery.lottery_id), metadata=STAFF
    )
    assert stock.prizes[0].stock == 4

    # A coupon prize goes to the member's wallet through the coupon ledger.
    template = await r.coupons.CreateCouponTemplate(
        pricing_pb.CreateCouponTemplateRequest(
            request_id=rid(),
            template=pricing_pb.CouponTemplate(
                display_name="Ten off",
                kind=pricing_pb.COUPON_KIND_AMOUNT_OFF,
                currency_code="CNY",
                amount_off=money_pb2.Money(currency_code="CNY", minor_units=1_000),
                valid_days=30,
            ),
        ),
        metadata=HQ,
    )
    coupons = await r.lottery(
        L.LotteryPrize(
            prize_id="C10",
            kind=L.PRIZE_KIND_COUPON,
            coupon_template_id=template.template_id,
            stock=2,
            weight=1,
        ),
        L.LotteryPrize(prize_id="GIFT", kind=L.PRIZE_KIND_GIFT, gift_id="G-MUG", stock=0, weight=1),
    )
    won = await r.draw(coupons.lottery_id, "M-ANN")
    assert won.fulfilment == L.PRIZE_FULFILMENT_COUPON_ISSUED and won.coupon_id
    coupon = await r.coupons.GetCoupon(
        pricing_pb.GetCouponRequest(coupon_id=won.coupon_id), metadata=HQ
    )
    assert coupon.member_id == "M-ANN" and coupon.state == pricing_pb.COUPON_STATE_ISSUED
    # The gift had no stock: it was never in the table.
    assert [(e.prize_id, e.stock) for e in won.randomness.rounds[0].table] == [
        ("C10", 2),
        ("GIFT", 0),
    ]
    gifts = await r.lottery(
        L.LotteryPrize(prize_id="MUG", kind=L.PRIZE_KIND_GIFT, gift_id="G-MUG", stock=1, weight=1)
    )
    mug = await r.draw(gifts.lottery_id, "M-ANN")
    assert mug.fulfilment == L.PRIZE_FULFILMENT_GIFT_TO_COLLECT and mug.prize.gift_id == "G-MUG"
    # Out of stock and no "no prize" weight: a draw wins nothing.
    empty = await r.draw(gifts.lottery_id, "M-ANN")
    assert not empty.won and empty.fulfilment == L.PRIZE_FULFILMENT_NONE
    for d in (won, mug, empty):
        assert await audit_matches(r, d.draw_id)

    # Reads, and what staff may not do.
    mine = await r.lotteries.ListDraws(
        L.ListDrawsRequest(member_id="M-ANN", page_size=2), metadata=SERVICE
    )
    assert len(mine.draws) == 2 and mine.next_page_token
    await refused(
        r.lotteries.CreateLottery(L.CreateLotteryRequest(request_id=rid()), metadata=STAFF),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await refused(r.lottery(points_prize("X", 0, stock=1)), grpc.StatusCode.INVALID_ARGUMENT)
    drawn = [
        events_pb2.LotteryDrawn.FromString(p) for p in await r.outbox("campaigns.v1.lottery.drawn")
    ]
    assert [(e.draw_id, e.prize_id, e.prize_kind) for e in drawn] == [
        (first.draw_id, "P500", "points"),
        (won.draw_id, "C10", "coupon"),
        (mug.draw_id, "MUG", "gift"),
        (empty.draw_id, "", ""),
    ]


async def test_lotteries_under_concurrency(rig: Rig) -> None:
    """30 concurrent draws against a prize with stock 3 give it exactly 3
    times; every draw is charged once and audits."""
    r = rig
    members = [f"M-{i}" for i in range(10)]
    await enroll(r.loyalty, *members)
    for m in members:
        await r.loyalty.accrue(m, 30)
    lottery = await r.lottery(points_prize("RARE", 7, stock=3, weight=1_000), no_prize=1)

    async def draw(i: int) -> L.LotteryDraw:
        # As a client does: loyalty too slow to answer in time leaves the
        # draw CHARGING; the same request again finishes it.
        request_id = rid()
        for _ in range(5):
            try:
                return await r.draw(lottery.lottery_id, members[i % 10], request_id=request_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
        raise AssertionError("loyalty never answered")

    draws = await asyncio.gather(*(draw(i) for i in range(30)))
    assert sum(1 for d in draws if d.prize.prize_id == "RARE") == 3
    assert all(d.state == L.DRAW_STATE_DRAWN for d in draws)
    after = await r.lotteries.GetLottery(
        L.GetLotteryRequest(lottery_id=lottery.lottery_id), metadata=STAFF
    )
    assert after.prizes[0].stock == 0
    winners = [d.member_id for d in draws if d.won]
    for m in members:
        expected = 30 - 3 * 10 + 7 * winners.count(m)
        await eventually(lambda m=m: r.balance(m), lambda b, e=expected: b == e)
    for d in draws:
        assert await audit_matches(r, d.draw_id), d
    listed = await r.lotteries.ListDraws(
        L.ListDrawsRequest(lottery_id=lottery.lottery_id, page_size=100), metadata=STAFF
    )
    assert len(listed.draws) == 30


async def test_a_draw_campaigns_cannot_complete_is_refunded(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = rig
    await enroll(r.loyalty, "M-ANN")
    await r.loyalty.accrue("M-ANN", 100)
    lottery = await r.lottery(points_prize("P", 50, stock=5), cost=30)

    async def broken(*_: object, **__: object) -> bool:
        raise RuntimeError("the stock could not be taken")

    monkeypatch.setattr(lottery_store, "take_stock", broken)
    failed = await r.draw(lottery.lottery_id, "M-ANN", request_id="draw-x")
    assert failed.state == L.DRAW_STATE_REFUNDED and not failed.won
    assert failed.refund_lot_id and "could not be completed" in failed.refund_reason
    assert await r.balance("M-ANN") == 100
    history = await r.loyalty.history("M-ANN")
    assert "refund of lottery draw" in history[0].reason
    # Retrying returns the refunded draw; nothing is charged again.
    assert await r.draw(lottery.lottery_id, "M-ANN", request_id="draw-x") == failed
    assert await r.balance("M-ANN") == 100
    monkeypatch.undo()

    # A draw left charging (a crash) is finished by the worker's pass.
    async with r.db.transaction() as session:
        await lottery_store.insert_draw(
            session,
            draw_id="DLEFT",
            request_id="left",
            request_hash="x",
            lottery_id=lottery.lottery_id,
            member_id="M-ANN",
            cost_points=30,
            state="charging",
            table_version=1,
            principal="op-1",
            created_at=utcnow() - dt.timedelta(minutes=5),
        )
    loyalty_client = lottery_draws.LoyaltyClient(r.suite.runtimes["campaigns"].settings)
    try:
        assert await lottery_draws.finish_due(r.db, loyalty_client) == 1
    finally:
        await loyalty_client.close()
    left = await r.lotteries.GetDraw(L.GetDrawRequest(draw_id="DLEFT"), metadata=STAFF)
    assert left.state == L.DRAW_STATE_DRAWN and left.prize.prize_id == "P"
    assert await r.balance("M-ANN") == 100 - 30 + 50


async def test_the_migration_matches_the_code(rig: Rig) -> None:
    from tests.integration.infra import schema_drift

    tables = {"lotteries", "lottery_prizes", "lottery_draws"}
    assert await schema_drift(rig.db, lottery_store.metadata, tables) == []
