"""The gift catalogue on real databases (SQLite and PostgreSQL) and real
NATS through real gRPC: gifts and their updates, stock per store and
chain-wide with its roles, redemptions (store stock first, then
chain-wide), their refusals and retries, concurrent redemptions that never
oversell, and the ledger's check after each test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from chassis.auth import Role, Scope, ScopeLevel
from cornucopia.loyalty.v1 import events_pb2, points_pb2
from tests.integration.conftest import Suite, auth, token
from tests.integration.infra import DatabaseFactory
from tests.integration.test_cards_lifecycle import refused
from tests.integration.test_loyalty_points import (
    CALL_CENTER,
    CHECKOUT,
    HQ,
    MGR_S001,
    OP_S001,
    OP_S002,
    Loyalty,
    enroll,
    events_of,
    rid,
    start_loyalty,
)

P = points_pb2
MGR_S002 = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S002"), "mgr-2"))


@pytest.fixture
async def loyalty(suite: Suite, database_url: DatabaseFactory) -> AsyncIterator[Loyalty]:
    service = await start_loyalty(suite, database_url)
    yield service
    assert await service.problems() == []


async def create_gift(
    lo: Loyalty, gift_id: str, price: int, metadata: Any = HQ, **extra: Any
) -> P.Gift:
    return await lo.gifts.CreateGift(
        P.CreateGiftRequest(
            request_id=extra.pop("request_id", rid()),
            gift=P.Gift(
                gift_id=gift_id,
                name=extra.pop("name", f"gift {gift_id}"),
                points_price=price,
                active=extra.pop("active", True),
            ),
        ),
        metadata=metadata,
    )


async def add_stock(
    lo: Loyalty, gift_id: str, store_id: str, delta: int, metadata: Any = HQ, **extra: Any
) -> P.GiftStock:
    return await lo.gifts.AddGiftStock(
        P.AddGiftStockRequest(
            request_id=extra.pop("request_id", rid()),
            gift_id=gift_id,
            store_id=store_id,
            delta=delta,
        ),
        metadata=metadata,
    )


async def redeem(
    lo: Loyalty,
    member_id: str,
    gift_id: str,
    quantity: int = 1,
    metadata: Any = OP_S001,
    **extra: Any,
) -> P.GiftRedemption:
    extra.setdefault("request_id", rid())
    return await lo.gifts.RedeemGift(
        P.RedeemGiftRequest(member_id=member_id, gift_id=gift_id, quantity=quantity, **extra),
        metadata=metadata,
    )


async def gift(lo: Loyalty, gift_id: str, store_id: str = "", metadata: Any = HQ) -> P.Gift:
    return await lo.gifts.GetGift(
        P.GetGiftRequest(gift_id=gift_id, store_id=store_id), metadata=metadata
    )


async def test_the_catalogue_and_its_stock(loyalty: Loyalty) -> None:
    lo = loyalty
    mug = await create_gift(lo, "MUG", 1_200, name="保温杯", request_id="gift-mug")
    assert (mug.gift_id, mug.name, mug.points_price, mug.active) == ("MUG", "保温杯", 1_200, True)
    assert mug.created_by.principal == "test-admin" and mug.etag
    assert await create_gift(lo, "MUG", 1_200, name="保温杯", request_id="gift-mug") == mug
    details = await refused(create_gift(lo, "MUG", 99), grpc.StatusCode.ALREADY_EXISTS)
    assert details["reason"] == "GIFT_EXISTS"
    details = await refused(create_gift(lo, "bad id", 0, name=""), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(details["violations"]) == {"gift.gift_id", "gift.name", "gift.points_price"}
    await refused(create_gift(lo, "PEN", 10, metadata=MGR_S001), grpc.StatusCode.PERMISSION_DENIED)
    await create_gift(lo, "BAG", 5_000, active=False)

    # Updates by mask; a stale etag is refused; the mask is required.
    updated = await lo.gifts.UpdateGift(
        P.UpdateGiftRequest(
            request_id=rid(),
            gift=P.Gift(gift_id="MUG", points_price=1_000, name="ignored", etag=mug.etag),
            update_mask=FieldMask(paths=["points_price"]),
        ),
        metadata=HQ,
    )
    assert (updated.name, updated.points_price) == ("保温杯", 1_000)
    assert updated.etag != mug.etag
    details = await refused(
        lo.gifts.UpdateGift(
            P.UpdateGiftRequest(
                request_id=rid(),
                gift=P.Gift(gift_id="MUG", name="x", etag=mug.etag),
                update_mask=FieldMask(paths=["name"]),
            ),
            metadata=HQ,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert details["reason"] == "ETAG_MISMATCH"
    for mask, gift_id in ((["gift_id"], "MUG"), ([], "MUG"), (["name"], "")):
        await refused(
            lo.gifts.UpdateGift(
                P.UpdateGiftRequest(
                    request_id=rid(),
                    gift=P.Gift(gift_id=gift_id, name="x"),
                    update_mask=FieldMask(paths=mask),
                ),
                metadata=HQ,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    await refused(
        lo.gifts.UpdateGift(
            P.UpdateGiftRequest(
                request_id=rid(),
                gift=P.Gift(gift_id="NONE", name="x"),
                update_mask=FieldMask(paths=["name"]),
            ),
            metadata=HQ,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        lo.gifts.UpdateGift(
            P.UpdateGiftRequest(
                request_id=rid(),
                gift=P.Gift(gift_id="MUG", points_price=0),
                update_mask=FieldMask(paths=["points_price"]),
            ),
            metadata=HQ,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    # Stock: HQ chain-wide and anywhere, a store manager only their own store.
    assert (await add_stock(lo, "MUG", "", 10)).quantity == 10
    same = await add_stock(lo, "MUG", "S001", 3, MGR_S001, request_id="stock-1")
    assert await add_stock(lo, "MUG", "S001", 3, MGR_S001, request_id="stock-1") == same
    assert same.quantity == 3
    await add_stock(lo, "MUG", "S002", 4, HQ)
    await refused(add_stock(lo, "MUG", "S002", 1, MGR_S001), grpc.StatusCode.PERMISSION_DENIED)
    await refused(add_stock(lo, "MUG", "", 1, MGR_S001), grpc.StatusCode.PERMISSION_DENIED)
    await refused(add_stock(lo, "MUG", "S001", 1, OP_S001), grpc.StatusCode.PERMISSION_DENIED)
    details = await refused(
        add_stock(lo, "MUG", "S001", -4, MGR_S001), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (details["reason"], details["metadata"]["quantity"]) == ("GIFT_STOCK_INSUFFICIENT", "3")
    await refused(add_stock(lo, "MUG", "S001", 0), grpc.StatusCode.INVALID_ARGUMENT)
    await refused(add_stock(lo, "NONE", "S001", 1), grpc.StatusCode.NOT_FOUND)

    # What each store sees: its own stock and the chain-wide one.
    seen = await gift(lo, "MUG", metadata=OP_S001)
    assert (seen.store_id, seen.store_quantity, seen.chain_quantity) == ("S001", 3, 10)
    seen = await gift(lo, "MUG", "S002")
    assert (seen.store_quantity, seen.chain_quantity) == (4, 10)
    await refused(gift(lo, "MUG", "S002", metadata=OP_S001), grpc.StatusCode.PERMISSION_DENIED)
    await refused(gift(lo, "NONE"), grpc.StatusCode.NOT_FOUND)
    listed = await lo.gifts.ListGifts(P.ListGiftsRequest(page_size=1), metadata=OP_S002)
    assert [g.gift_id for g in listed.gifts] == ["BAG"] and listed.next_page_token
    rest = await lo.gifts.ListGifts(
        P.ListGiftsRequest(page_size=1, page_token=listed.next_page_token), metadata=OP_S002
    )
    assert [(g.gift_id, g.store_quantity, g.chain_quantity) for g in rest.gifts] == [("MUG", 4, 10)]
    active = await lo.gifts.ListGifts(P.ListGiftsRequest(active_only=True), metadata=CALL_CENTER)
    assert [(g.gift_id, g.store_id) for g in active.gifts] == [("MUG", "")]


async def test_redemptions(loyalty: Loyalty) -> None:
    lo = loyalty
    await enroll(lo, "M-ANN", "M-BOB", "M-NEW")
    await lo.accrue("M-ANN", 10_000)
    await create_gift(lo, "MUG", 1_000)
    await create_gift(lo, "BAG", 5_000)
    await add_stock(lo, "MUG", "", 5)
    await add_stock(lo, "MUG", "S001", 3)
    await add_stock(lo, "BAG", "", 1)

    # The store's own stock first, then the chain-wide stock.
    first = await redeem(lo, "M-ANN", "MUG", 2, request_id="red-1")
    assert (first.store_id, first.stock_store_id, first.points, first.quantity) == (
        "S001",
        "S001",
        2_000,
        2,
    )
    assert first.balance_after == 8_000 and first.stamp.principal == "op-1"
    assert await redeem(lo, "M-ANN", "MUG", 2, request_id="red-1") == first
    details = await refused(
        redeem(lo, "M-ANN", "MUG", 1, request_id="red-1"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"
    second = await redeem(lo, "M-ANN", "MUG", 2)
    assert second.stock_store_id == ""
    seen = await gift(lo, "MUG", "S001")
    assert (seen.store_quantity, seen.chain_quantity) == (1, 3)
    # HQ or a service names the store, or takes the chain-wide stock.
    central = await redeem(lo, "M-ANN", "MUG", 1, metadata=CHECKOUT)
    assert (central.store_id, central.stock_store_id) == ("", "")
    at_store = await redeem(lo, "M-ANN", "MUG", 1, metadata=HQ, store_id="S001")
    assert at_store.stock_store_id == "S001"
    await refused(redeem(lo, "M-ANN", "MUG", 1, store_id="S002"), grpc.StatusCode.PERMISSION_DENIED)

    # Refusals change nothing.
    before = (await lo.account("M-ANN")).balance
    details = await refused(redeem(lo, "M-ANN", "MUG", 3), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "GIFT_OUT_OF_STOCK"
    details = await refused(redeem(lo, "M-BOB", "BAG"), grpc.StatusCode.FAILED_PRECONDITION)
    assert (details["reason"], details["metadata"]) == (
        "POINTS_INSUFFICIENT",
        {"available": "0", "asked": "5000"},
    )
    await lo.gifts.UpdateGift(
        P.UpdateGiftRequest(
            request_id=rid(),
            gift=P.Gift(gift_id="BAG", active=False),
            update_mask=FieldMask(paths=["active"]),
        ),
        metadata=HQ,
    )
    details = await refused(redeem(lo, "M-ANN", "BAG"), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "GIFT_INACTIVE"
    details = await refused(redeem(lo, "M-ANN", "NONE"), grpc.StatusCode.NOT_FOUND)
    assert details["reason"] == "GIFT_NOT_FOUND"
    details = await refused(redeem(lo, "M-NOBODY", "MUG"), grpc.StatusCode.NOT_FOUND)
    assert details["reason"] == "MEMBER_NOT_FOUND"
    for bad in ({"quantity": 0}, {"quantity": 101}, {"request_id": ""}):
        fields = {"quantity": 1, **bad}
        await refused(redeem(lo, "M-ANN", "MUG", **fields), grpc.StatusCode.INVALID_ARGUMENT)
    await refused(
        redeem(
            lo,
            "M-ANN",
            "MUG",
            metadata=auth(token((Role.PARTNER,), Scope(ScopeLevel.PARTNER, "B"), "b")),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert (await lo.account("M-ANN")).balance == before
    assert (await gift(lo, "BAG")).chain_quantity == 1

    # The member's redemptions, newest first, and the history and events.
    page = await lo.gifts.ListRedemptions(
        P.ListRedemptionsRequest(member_id="M-ANN", page_size=3), metadata=OP_S001
    )
    rest = await lo.gifts.ListRedemptions(
        P.ListRedemptionsRequest(member_id="M-ANN", page_size=3, page_token=page.next_page_token),
        metadata=OP_S001,
    )
    ids = [r.redemption_id for r in [*page.redemptions, *rest.redemptions]]
    assert ids == [
        at_store.redemption_id,
        central.redemption_id,
        second.redemption_id,
        first.redemption_id,
    ]
    history = await lo.history("M-ANN")
    assert [(m.kind, m.points, m.source) for m in history[:2]] == [
        (P.POINTS_MOVEMENT_KIND_REDEEM, -1_000, events_pb2.POINTS_SOURCE_GIFT),
        (P.POINTS_MOVEMENT_KIND_REDEEM, -1_000, events_pb2.POINTS_SOURCE_GIFT),
    ]
    outbox = await lo.outbox()
    redeemed = events_of(outbox, "loyalty.v1.gift.redeemed", events_pb2.GiftRedeemed)
    assert [(e.gift_id, e.quantity, e.points) for e in redeemed] == [
        ("MUG", 2, 2_000),
        ("MUG", 2, 2_000),
        ("MUG", 1, 1_000),
        ("MUG", 1, 1_000),
    ]
    spent = events_of(outbox, "loyalty.v1.points.spent", events_pb2.PointsSpent)
    assert {e.source for e in spent} == {events_pb2.POINTS_SOURCE_GIFT}
    assert (await lo.account("M-ANN")).balance == 4_000


async def test_concurrent_redemptions_never_oversell(loyalty: Loyalty) -> None:
    """Thirty members, and one member thirty times, redeem at once from a
    stock of ten: exactly ten succeed each time, the stock ends at zero."""
    lo = loyalty
    members = [f"M-{n:02d}" for n in range(30)]
    await enroll(lo, *members)
    for member_id in members:
        await lo.accrue(member_id, 500)
    await create_gift(lo, "PEN", 300)
    await add_stock(lo, "PEN", "", 6)
    await add_stock(lo, "PEN", "S001", 4)

    async def attempt(member_id: str, n: int) -> str:
        try:
            await redeem(lo, member_id, "PEN", request_id=f"pen-{n}")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
            return str(exc.details())
        return "redeemed"

    outcomes = await asyncio.gather(*(attempt(m, n) for n, m in enumerate(members)))
    assert outcomes.count("redeemed") == 10
    seen = await gift(lo, "PEN", "S001")
    assert (seen.store_quantity, seen.chain_quantity) == (0, 0)
    balances = [(await lo.account(m)).balance for m in members]
    assert sorted(balances) == [200] * 10 + [500] * 20

    await lo.accrue("M-00", 10_000)
    await add_stock(lo, "PEN", "", 10)
    outcomes = await asyncio.gather(*(attempt("M-00", 100 + n) for n in range(30)))
    assert outcomes.count("redeemed") == 10
    assert (await gift(lo, "PEN")).chain_quantity == 0
