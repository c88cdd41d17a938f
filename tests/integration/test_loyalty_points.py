"""Points on real databases (SQLite and PostgreSQL) and real NATS through
real gRPC: the checkout's ledger API inside a database transaction (accrue,
holds, spending, refund reversals), every PointsService call, adjustments
and transfers with their refusals, expiry and warnings with an explicit
clock, concurrent transfers, merges and erasures from members' events,
idempotent retries, role refusals, and the ledger's own check after each
test."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from chassis.auth import Role, Scope, ScopeLevel
from chassis.db import outbox_table, utcnow
from chassis.errors import FailedPrecondition, InvalidArgument, NotFound
from chassis.service import ServiceRuntime
from cornucopia.loyalty.v1 import events_pb2, points_pb2, points_pb2_grpc
from cornucopia.members.v1 import events_pb2 as member_events
from services.loyalty import points_ledger
from services.loyalty.domain.points import add_months
from services.loyalty.points_ledger import LotSource, Stamp
from services.loyalty.server import definition as loyalty_definition
from services.loyalty.store import buyers
from services.loyalty.store import members as member_store
from services.loyalty.store import points as points_store
from tests.integration.conftest import Suite, auth, eventually, token
from tests.integration.infra import DatabaseFactory, migrate, schema_drift
from tests.integration.test_cards_lifecycle import publish_member_event, refused

P = points_pb2
HQ = auth()
MGR_S001 = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "mgr-1"))
OP_S001 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1"))
OP_S002 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S002"), "op-2"))
CALL_CENTER = auth(token((Role.CALL_CENTER,), Scope(ScopeLevel.CALL_CENTER), "cc-1"))
CHECKOUT = auth(token((Role.SERVICE,), Scope(ScopeLevel.HQ), "checkout"))
PARTNER = auth(token((Role.PARTNER,), Scope(ScopeLevel.PARTNER, "BANK"), "bank"))
CHECKOUT_STAMP_STORE = "S001"
# Dates the tests earn points on: this year and the next, so that what they
# earn is never already past its expiry, whenever they run.
YEAR = utcnow().year


def rid() -> str:
    return str(uuid.uuid4())


class Loyalty:
    """Stubs of a running loyalty service, with shorthands."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.points = points_pb2_grpc.PointsServiceStub(suite.channels["loyalty"])
        self.gifts = points_pb2_grpc.GiftsServiceStub(suite.channels["loyalty"])

    @property
    def runtime(self) -> ServiceRuntime:
        return self.suite.runtimes["loyalty"]

    @property
    def db(self) -> Any:
        return self.runtime.db

    async def account(self, member_id: str) -> P.PointsAccount:
        return await self.points.GetPointsAccount(
            P.GetPointsAccountRequest(member_id=member_id), metadata=OP_S001
        )

    async def accrue(
        self,
        member_id: str,
        points: int,
        *,
        at: dt.datetime | None = None,
        reference: str = "sale-1",
        request_id: str | None = None,
        source: LotSource = LotSource.PURCHASE,
    ) -> points_ledger.Lot | None:
        """As the checkout does, inside a transaction of its own."""
        async with self.db.transaction() as session:
            return await points_ledger.accrue(
                session,
                member_id,
                points,
                source=source,
                reference=reference,
                stamp=Stamp("checkout", CHECKOUT_STAMP_STORE, at or utcnow()),
                request_id=request_id or rid(),
            )

    async def adjust(self, member_id: str, points: int, **extra: Any) -> P.AdjustPointsResponse:
        metadata = extra.pop("metadata", MGR_S001)
        extra.setdefault("request_id", rid())
        extra.setdefault("reason", "goodwill")
        return await self.points.AdjustPoints(
            P.AdjustPointsRequest(member_id=member_id, points=points, **extra), metadata=metadata
        )

    async def transfer(
        self, from_member: str, to_member: str, points: int, **extra: Any
    ) -> P.TransferPointsResponse:
        metadata = extra.pop("metadata", OP_S001)
        extra.setdefault("request_id", rid())
        return await self.points.TransferPoints(
            P.TransferPointsRequest(
                from_member_id=from_member, to_member_id=to_member, points=points, **extra
            ),
            metadata=metadata,
        )

    async def history(self, member_id: str) -> list[P.PointsMovement]:
        found: list[P.PointsMovement] = []
        page_token = ""
        while True:
            page = await self.points.ListPointsHistory(
                P.ListPointsHistoryRequest(member_id=member_id, page_size=2, page_token=page_token),
                metadata=OP_S001,
            )
            found.extend(page.movements)
            page_token = page.next_page_token
            if not page_token:
                return found

    async def lots(self, member_id: str, only_open: bool = False) -> list[P.PointsLot]:
        found: list[P.PointsLot] = []
        page_token = ""
        while True:
            page = await self.points.ListPointsLots(
                P.ListPointsLotsRequest(
                    member_id=member_id, only_open=only_open, page_size=2, page_token=page_token
                ),
                metadata=OP_S001,
            )
            found.extend(page.lots)
            page_token = page.next_page_token
            if not page_token:
                return found

    async def outbox(self, prefix: str = "loyalty.v1.") -> list[tuple[str, bytes]]:
        async with self.db.sessions() as session:
            rows = await session.execute(
                sa.select(outbox_table.c.subject, outbox_table.c.payload).order_by(
                    outbox_table.c.seq
                )
            )
            return [(r.subject, r.payload) for r in rows if r.subject.startswith(prefix)]

    async def problems(self) -> list[points_store.LedgerProblem]:
        async with self.db.sessions() as session:
            return await points_store.verify(session)


async def start_loyalty(suite: Suite, database_url: DatabaseFactory) -> Loyalty:
    await suite.start(loyalty_definition, await database_url("loyalty"))
    return Loyalty(suite)


@pytest.fixture
async def loyalty(suite: Suite, database_url: DatabaseFactory) -> AsyncIterator[Loyalty]:
    """A running loyalty service; after the test, the ledger must hold:
    every balance equals its open lots and its history, held its holds."""
    service = await start_loyalty(suite, database_url)
    yield service
    assert await service.problems() == []


async def known(service: Loyalty, member_id: str) -> member_store.KnownMember | None:
    async with service.db.sessions() as session:
        return await member_store.get_member(session, member_id)


async def enroll(service: Loyalty, *member_ids: str) -> None:
    for member_id in member_ids:
        await publish_member_event(
            service.suite,
            "members.v1.member.enrolled",
            member_events.MemberEnrolled(member_id=member_id, home_store_id="S001"),
        )
    for member_id in member_ids:
        await eventually(lambda m=member_id: known(service, m), lambda k: k is not None)


def events_of(outbox: list[tuple[str, bytes]], subject: str, cls: Any) -> list[Any]:
    return [cls.FromString(payload) for s, payload in outbox if s == subject]


# -- accrual and every points call ------------------------------------------------------


async def test_accrue_and_every_points_call(loyalty: Loyalty) -> None:
    lo = loyalty
    await enroll(lo, "M-ANN", "M-BOB")
    earned_at = utcnow()
    lot = await lo.accrue("M-ANN", 1_000, at=earned_at, request_id="sale-1:accrue")
    assert lot is not None and lot.points == 1_000
    # The end of next year in Shanghai (16:00 UTC), the default policy.
    local_year = earned_at.astimezone(dt.timezone(dt.timedelta(hours=8))).year
    assert lot.expires_at == dt.datetime(local_year + 1, 12, 31, 16, 0, tzinfo=dt.UTC)
    # The same request again is the same lot; nothing for 0 points.
    again = await lo.accrue("M-ANN", 1_000, at=earned_at, request_id="sale-1:accrue")
    assert again is not None and again.lot_id == lot.lot_id
    assert await lo.accrue("M-ANN", 0) is None
    with pytest.raises(InvalidArgument) as reused:
        await lo.accrue("M-ANN", 999, at=earned_at, request_id="sale-1:accrue")
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"
    await lo.accrue("M-ANN", 300, reference="sale-2", source=LotSource.BONUS)

    account = await lo.account("M-ANN")
    assert (account.balance, account.held, account.available) == (1_300, 0, 1_300)
    assert account.lifetime_earned == 1_300
    assert (
        account.available_cash_value.currency_code,
        account.available_cash_value.minor_units,
    ) == (
        "CNY",
        1_300,
    )
    assert (account.next_expiry_date.year, account.next_expiry_date.month) == (local_year + 1, 12)
    assert account.next_expiry_date.day == 31
    # Both lots end with next year.
    assert account.next_expiry_points == 1_300
    # A known member without points reads as zero; an unknown one is not found.
    bob = await lo.account("M-BOB")
    assert (bob.balance, bob.available, bob.HasField("next_expire_time")) == (0, 0, False)
    details = await refused(lo.account("M-NOBODY"), grpc.StatusCode.NOT_FOUND)
    assert details["reason"] == "MEMBER_NOT_FOUND"

    # Adjustments: audited, never below zero, HQ or a store manager only.
    plus = await lo.adjust("M-ANN", 200, reason="birthday gesture", request_id="adj-1")
    assert plus.movement.kind == P.POINTS_MOVEMENT_KIND_ADJUST
    assert plus.movement.points == 200 and plus.movement.balance_after == 1_500
    assert plus.movement.reason == "birthday gesture"
    assert (plus.movement.stamp.principal, plus.movement.stamp.store_id) == ("mgr-1", "S001")
    assert plus.account.balance == 1_500
    assert await lo.adjust("M-ANN", 200, reason="birthday gesture", request_id="adj-1") == plus
    details = await refused(
        lo.adjust("M-ANN", 201, reason="birthday gesture", request_id="adj-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"
    minus = await lo.adjust("M-ANN", -500, reason="wrong receipt", metadata=HQ)
    assert minus.account.balance == 1_000
    details = await refused(lo.adjust("M-ANN", -1_001), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "POINTS_INSUFFICIENT"
    assert details["metadata"] == {"available": "1000", "asked": "1001"}
    for bad in (
        {"reason": ""},
        {"reason": "x" * 201},
        {"points": 0},
        {"request_id": ""},
    ):
        fields = {"points": 5, **bad}
        await refused(lo.adjust("M-ANN", **fields), grpc.StatusCode.INVALID_ARGUMENT)
    for metadata in (OP_S001, CALL_CENTER, CHECKOUT, PARTNER):
        await refused(lo.adjust("M-ANN", 5, metadata=metadata), grpc.StatusCode.PERMISSION_DENIED)
    details = await refused(lo.adjust("M-NOBODY", 5), grpc.StatusCode.NOT_FOUND)
    assert details["reason"] == "MEMBER_NOT_FOUND"
    assert (await lo.account("M-ANN")).balance == 1_000

    # Lots in spend order, paged.
    lots = await lo.lots("M-ANN")
    assert [x.remaining for x in lots] == [500, 300, 200]
    assert [x.source for x in lots] == [
        events_pb2.POINTS_SOURCE_PURCHASE,
        events_pb2.POINTS_SOURCE_BONUS,
        events_pb2.POINTS_SOURCE_ADJUSTMENT,
    ]
    assert lots[0].points == 1_000
    # History, newest first, paged, with the balance after each.
    history = await lo.history("M-ANN")
    assert [m.kind for m in history] == [
        P.POINTS_MOVEMENT_KIND_ADJUST,
        P.POINTS_MOVEMENT_KIND_ADJUST,
        P.POINTS_MOVEMENT_KIND_ACCRUE,
        P.POINTS_MOVEMENT_KIND_ACCRUE,
    ]
    assert [m.balance_after for m in history] == [1_000, 1_500, 1_300, 1_000]
    assert history[-1].reference == "sale-1" and history[-1].lot_id == lot.lot_id
    await refused(
        lo.points.ListPointsHistory(
            P.ListPointsHistoryRequest(member_id="M-ANN", page_token="garbage"), metadata=OP_S001
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(
        lo.points.ListPointsLots(P.ListPointsLotsRequest(member_id="M-ANN"), metadata=PARTNER),
        grpc.StatusCode.PERMISSION_DENIED,
    )

    # Events.
    outbox = await lo.outbox()
    accrued = events_of(outbox, "loyalty.v1.points.accrued", events_pb2.PointsAccrued)
    assert [(e.points, e.source) for e in accrued] == [
        (1_000, events_pb2.POINTS_SOURCE_PURCHASE),
        (300, events_pb2.POINTS_SOURCE_BONUS),
    ]
    assert accrued[0].balance_after == 1_000 and accrued[0].stamp.principal == "checkout"
    adjusted = events_pb2.PointsAdjusted
    assert [
        (e.points, e.reason) for e in events_of(outbox, "loyalty.v1.points.adjusted", adjusted)
    ] == [
        (200, "birthday gesture"),
        (-500, "wrong receipt"),
    ]


async def test_the_policy(loyalty: Loyalty) -> None:
    lo = loyalty
    await enroll(lo, "M-ANN")
    current = await lo.points.GetPointsPolicy(P.GetPointsPolicyRequest(), metadata=OP_S001)
    assert current.expiry_rule == P.EXPIRY_RULE_END_OF_NEXT_YEAR
    assert (current.time_zone, current.warning_days, current.currency_code) == (
        "Asia/Shanghai",
        30,
        "CNY",
    )
    assert (current.cash_rate_points, current.cash_rate_minor_units) == (100, 100)
    assert current.max_cash_share_bps == 5_000 and current.etag
    wanted = P.PointsPolicy()
    wanted.CopyFrom(current)
    wanted.expiry_rule = P.EXPIRY_RULE_MONTHS_AFTER
    wanted.expiry_months = 6
    wanted.cash_rate_points = 200
    request = P.UpdatePointsPolicyRequest(request_id=rid(), policy=wanted, etag=current.etag)
    await refused(
        lo.points.UpdatePointsPolicy(request, metadata=MGR_S001), grpc.StatusCode.PERMISSION_DENIED
    )
    updated = await lo.points.UpdatePointsPolicy(request, metadata=HQ)
    assert updated.expiry_months == 6 and updated.etag != current.etag
    assert updated.updated_by.principal == "test-admin"
    assert await lo.points.UpdatePointsPolicy(request, metadata=HQ) == updated
    stale = P.UpdatePointsPolicyRequest(request_id=rid(), policy=wanted, etag=current.etag)
    details = await refused(
        lo.points.UpdatePointsPolicy(stale, metadata=HQ), grpc.StatusCode.ABORTED
    )
    assert details["reason"] == "ETAG_MISMATCH"
    bad = P.PointsPolicy()
    bad.CopyFrom(updated)
    bad.expiry_months = 0
    bad.time_zone = "Nowhere/Land"
    bad.max_cash_share_bps = 20_000
    details = await refused(
        lo.points.UpdatePointsPolicy(
            P.UpdatePointsPolicyRequest(request_id=rid(), policy=bad, etag=updated.etag),
            metadata=HQ,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {
        "policy.expiry_months",
        "policy.time_zone",
        "policy.max_cash_share_bps",
    }
    # New lots follow the new rule; 200 points are now worth 1.00.
    lot = await lo.accrue("M-ANN", 500, at=dt.datetime(YEAR + 1, 1, 31, 4, 0, tzinfo=dt.UTC))
    assert lot is not None
    assert lot.expires_at == dt.datetime(YEAR + 1, 7, 31, 16, 0, tzinfo=dt.UTC)
    account = await lo.account("M-ANN")
    assert account.available_cash_value.minor_units == 250
    async with lo.db.sessions() as session:
        policy = await points_ledger.policy(session)
    assert points_ledger.cash_value(policy, 500) == 250
    assert points_ledger.points_for_cash(policy, 251) == 502


# -- the checkout's ledger API ------------------------------------------------------------


async def spendable(db: Any, member_id: str, at: dt.datetime | None = None) -> int:
    """What the member can spend at ``at``, as ``available`` reads it; the
    checkout's one read of its buyer must give the same."""
    at = at or utcnow()
    async with db.sessions() as session:
        plain = await points_ledger.available(session, member_id, at=at)
        member = await buyers.buyer(session, member_id, at=at, business_day=at.date())
        assert await points_ledger.available_to_buyer(session, member_id, member, at=at) == plain
    return plain


async def test_holds_spending_and_refunds_in_the_checkouts_transaction(loyalty: Loyalty) -> None:
    lo = loyalty
    await enroll(lo, "M-ANN")
    now = utcnow()
    stamp = Stamp("checkout", "S001", now)
    await lo.accrue("M-ANN", 400, reference="sale-0")
    assert await spendable(lo.db, "M-ANN") == 400
    assert await spendable(lo.db, "M-NOBODY") == 0
    async with lo.db.transaction() as session:
        await points_ledger.hold(
            session,
            "M-ANN",
            150,
            hold_id="co-1",
            reference="checkout-1",
            expires_at=now + dt.timedelta(minutes=15),
            stamp=stamp,
        )
        # The same hold again changes nothing; another amount under its id is refused.
        await points_ledger.hold(
            session,
            "M-ANN",
            150,
            hold_id="co-1",
            reference="checkout-1",
            expires_at=now + dt.timedelta(minutes=15),
            stamp=stamp,
        )
        assert await points_ledger.available(session, "M-ANN") == 250
    with pytest.raises(InvalidArgument):
        async with lo.db.transaction() as session:
            await points_ledger.hold(
                session,
                "M-ANN",
                151,
                hold_id="co-1",
                reference="checkout-1",
                expires_at=now,
                stamp=stamp,
            )
    with pytest.raises(FailedPrecondition) as short:
        async with lo.db.transaction() as session:
            await points_ledger.hold(
                session,
                "M-ANN",
                251,
                hold_id="co-2",
                reference="checkout-2",
                expires_at=now + dt.timedelta(minutes=15),
                stamp=stamp,
            )
    assert short.value.reason == "POINTS_INSUFFICIENT"
    assert short.value.metadata == {"available": "250", "asked": "251"}
    with pytest.raises(FailedPrecondition):
        async with lo.db.transaction() as session:
            await points_ledger.hold(
                session,
                "M-NOBODY",
                1,
                hold_id="co-3",
                reference="x",
                expires_at=now,
                stamp=stamp,
            )
    account = await lo.account("M-ANN")
    assert (account.balance, account.held, account.available) == (400, 150, 250)

    async with lo.db.transaction() as session:
        spent = await points_ledger.spend_hold(session, "co-1", reference="sale-1", stamp=stamp)
        assert spent == 150
        # Spending again spends nothing more.
        assert (
            await points_ledger.spend_hold(session, "co-1", reference="sale-1", stamp=stamp) == 150
        )
        await points_ledger.release_hold(session, "co-1", stamp=stamp)
        await points_ledger.release_hold(session, "no-such-hold", stamp=stamp)
        earned = await points_ledger.accrue(
            session,
            "M-ANN",
            80,
            source=LotSource.PURCHASE,
            reference="sale-1",
            stamp=stamp,
            request_id="sale:sale-1",
        )
        assert earned is not None
    account = await lo.account("M-ANN")
    assert (account.balance, account.held, account.lifetime_earned) == (330, 0, 480)

    # A released hold cannot be spent; an unknown one is not found.
    async with lo.db.transaction() as session:
        await points_ledger.hold(
            session,
            "M-ANN",
            30,
            hold_id="co-4",
            reference="checkout-4",
            expires_at=now + dt.timedelta(minutes=15),
            stamp=stamp,
        )
        await points_ledger.release_hold(session, "co-4", stamp=stamp)
    with pytest.raises(FailedPrecondition) as released:
        async with lo.db.transaction() as session:
            await points_ledger.spend_hold(session, "co-4", reference="sale-4", stamp=stamp)
    assert released.value.reason == "POINTS_HOLD_RELEASED"
    with pytest.raises(NotFound):
        async with lo.db.transaction() as session:
            await points_ledger.spend_hold(session, "co-none", reference="x", stamp=stamp)

    # The sale is refunded: the 80 earned come back from the sale's own lot,
    # the 150 spent are given back as a new lot.
    async with lo.db.transaction() as session:
        assert await points_ledger.reverse_earned(
            session, "M-ANN", 80, sale_id="sale-1", stamp=stamp, request_id="refund-1:reverse"
        ) == (80, 0)
        assert await points_ledger.reverse_earned(
            session, "M-ANN", 80, sale_id="sale-1", stamp=stamp, request_id="refund-1:reverse"
        ) == (80, 0)
        returned = await points_ledger.return_spent(
            session, "M-ANN", 150, sale_id="sale-1", stamp=stamp, request_id="refund-1:return"
        )
        assert returned is not None and returned.source == LotSource.REFUND_REVERSAL
        again = await points_ledger.return_spent(
            session, "M-ANN", 150, sale_id="sale-1", stamp=stamp, request_id="refund-1:return"
        )
        assert again is not None and again.lot_id == returned.lot_id
        assert (
            await points_ledger.return_spent(
                session, "M-ANN", 0, sale_id="sale-1", stamp=stamp, request_id="r0"
            )
            is None
        )
    lots = {x.lot_id: x for x in await lo.lots("M-ANN")}
    assert lots[earned.lot_id].remaining == 0
    assert lots[returned.lot_id].source == events_pb2.POINTS_SOURCE_REFUND_REVERSAL
    account = await lo.account("M-ANN")
    assert (account.balance, account.lifetime_earned) == (400, 400)

    # Points earned on a sale the member has since spent: what is left is
    # taken back, never below zero; the rest is reported.
    await lo.accrue("M-ANN", 100, reference="sale-9", request_id="sale:sale-9")
    await lo.adjust("M-ANN", -450, reason="spent elsewhere")
    async with lo.db.transaction() as session:
        reversed_ = await points_ledger.reverse_earned(
            session, "M-ANN", 100, sale_id="sale-9", stamp=stamp, request_id="refund-9"
        )
    assert reversed_ == (50, 50)
    assert (await lo.account("M-ANN")).balance == 0

    # accrue creates the account of a member the checkout resolved through cards.
    async with lo.db.transaction() as session:
        walk_in = await points_ledger.accrue(
            session,
            "M-NEW",
            40,
            source=LotSource.PURCHASE,
            reference="sale-10",
            stamp=stamp,
            request_id="sale:sale-10",
        )
    assert walk_in is not None
    assert (await lo.account("M-NEW")).balance == 40
    # ... but an adjustment or a transfer refuses a member not known.
    await refused(lo.adjust("M-NEW", 5), grpc.StatusCode.NOT_FOUND)

    outbox = await lo.outbox()
    spent_events = events_of(outbox, "loyalty.v1.points.spent", events_pb2.PointsSpent)
    assert [(e.points, e.source, e.reference) for e in spent_events] == [
        (150, events_pb2.POINTS_SOURCE_SALE, "sale-1")
    ]
    reversed_events = events_of(outbox, "loyalty.v1.points.reversed", events_pb2.PointsReversed)
    assert [(e.points, e.points_not_reversed) for e in reversed_events] == [(80, 0), (50, 50)]
    history = await lo.history("M-ANN")
    kinds = [m.kind for m in reversed(history)]
    assert kinds == [
        P.POINTS_MOVEMENT_KIND_ACCRUE,
        P.POINTS_MOVEMENT_KIND_SPEND,
        P.POINTS_MOVEMENT_KIND_ACCRUE,
        P.POINTS_MOVEMENT_KIND_REVERSE,
        P.POINTS_MOVEMENT_KIND_RETURN,
        P.POINTS_MOVEMENT_KIND_ACCRUE,
        P.POINTS_MOVEMENT_KIND_ADJUST,
        P.POINTS_MOVEMENT_KIND_REVERSE,
    ]
    assert history[0].requested_points == 100 and history[0].points == -50


# -- transfers -------------------------------------------------------------------------------


async def test_transfers_keep_expiry_and_never_create_points(loyalty: Loyalty) -> None:
    lo = loyalty
    await enroll(lo, "M-ANN", "M-BOB", "M-OLD")
    first = await lo.accrue("M-ANN", 300, at=dt.datetime(YEAR, 2, 1, tzinfo=dt.UTC))
    second = await lo.accrue("M-ANN", 500, at=dt.datetime(YEAR + 1, 2, 1, tzinfo=dt.UTC))
    assert first is not None and second is not None
    done = await lo.transfer("M-ANN", "M-BOB", 400, note="for mum", request_id="t-1")
    assert done.sent.points == -400 and done.received.points == 400
    assert done.sent.kind == P.POINTS_MOVEMENT_KIND_TRANSFER_OUT
    assert done.sent.related_member_id == "M-BOB" and done.received.related_member_id == "M-ANN"
    assert done.sent.reason == "for mum" and done.transfer_id == done.sent.movement_id
    # The receiver's lots expire when the lots taken did: 300 + 100.
    received = sorted((x.expire_time.ToDatetime(dt.UTC), x.points) for x in done.lots)
    assert received == [(first.expires_at, 300), (second.expires_at, 100)]
    assert all(x.source == events_pb2.POINTS_SOURCE_TRANSFER for x in done.lots)
    assert await lo.transfer("M-ANN", "M-BOB", 400, note="for mum", request_id="t-1") == done
    details = await refused(
        lo.transfer("M-ANN", "M-BOB", 401, request_id="t-1"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"
    assert ((await lo.account("M-ANN")).balance, (await lo.account("M-BOB")).balance) == (400, 400)

    details = await refused(lo.transfer("M-ANN", "M-BOB", 401), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "POINTS_INSUFFICIENT"
    for bad in (
        lo.transfer("M-ANN", "M-ANN", 1),
        lo.transfer("M-ANN", "M-BOB", 0),
        lo.transfer("", "M-BOB", 1),
        lo.transfer("M-ANN", "M-BOB", 1, note="x" * 201),
    ):
        await refused(bad, grpc.StatusCode.INVALID_ARGUMENT)
    details = await refused(lo.transfer("M-ANN", "M-NOBODY", 1), grpc.StatusCode.NOT_FOUND)
    assert details["reason"] == "MEMBER_NOT_FOUND"
    await refused(
        lo.transfer("M-ANN", "M-BOB", 1, metadata=PARTNER), grpc.StatusCode.PERMISSION_DENIED
    )
    await publish_member_event(
        lo.suite,
        "members.v1.member.archived",
        member_events.MemberArchived(member_id="M-OLD"),
    )
    await eventually(
        lambda: known(lo, "M-OLD"),
        lambda k: k is not None and k.status == member_store.MemberStatus.ARCHIVED,
    )
    details = await refused(lo.transfer("M-ANN", "M-OLD", 1), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "MEMBER_ARCHIVED"
    # A service (the app on the member's behalf) may transfer too.
    await lo.transfer("M-BOB", "M-ANN", 50, metadata=CHECKOUT)
    assert (await lo.account("M-ANN")).balance + (await lo.account("M-BOB")).balance == 800
    outbox = await lo.outbox()
    spent = events_of(outbox, "loyalty.v1.points.spent", events_pb2.PointsSpent)
    assert [(e.member_id, e.points, e.source) for e in spent] == [
        ("M-ANN", 400, events_pb2.POINTS_SOURCE_TRANSFER),
        ("M-BOB", 50, events_pb2.POINTS_SOURCE_TRANSFER),
    ]


async def _total(lo: Loyalty, member_ids: tuple[str, ...]) -> int:
    return sum([(await lo.account(m)).balance for m in member_ids])


async def test_concurrent_transfers_keep_the_total(loyalty: Loyalty) -> None:
    """Fifty transfers at once back and forth between two members, then
    fifty in a ring of three: every one either moves its points whole or
    is refused, no balance goes below zero, the total never changes."""
    lo = loyalty
    await enroll(lo, "M-A", "M-B", "M-C")
    await lo.accrue("M-A", 600, at=dt.datetime(YEAR, 5, 1, tzinfo=dt.UTC))
    await lo.accrue("M-A", 400, at=dt.datetime(YEAR + 1, 5, 1, tzinfo=dt.UTC))
    await lo.accrue("M-B", 300)

    async def attempt(src: str, dst: str, points: int, n: int) -> str:
        try:
            await lo.transfer(src, dst, points, request_id=f"burst-{n}")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
            return "refused"
        return "moved"

    pairs = [("M-A", "M-B") if n % 2 else ("M-B", "M-A") for n in range(50)]
    outcomes = await asyncio.gather(
        *(attempt(src, dst, 70 + n, n) for n, (src, dst) in enumerate(pairs))
    )
    assert outcomes.count("moved") >= 1
    assert await _total(lo, ("M-A", "M-B")) == 1_300
    ring = ("M-A", "M-B", "M-C")
    outcomes = await asyncio.gather(
        *(attempt(ring[n % 3], ring[(n + 1) % 3], 90, 100 + n) for n in range(50))
    )
    assert await _total(lo, ring) == 1_300
    for member_id in ring:
        account = await lo.account(member_id)
        assert account.balance >= 0 and account.available >= 0
        assert sum(x.remaining for x in await lo.lots(member_id, only_open=True)) == account.balance
    # Retries of those that moved, all at once, move nothing more.
    moved_before = {m: (await lo.account(m)).balance for m in ring}
    retried = await asyncio.gather(
        *(
            attempt(ring[n % 3], ring[(n + 1) % 3], 90, 100 + n)
            for n, outcome in enumerate(outcomes)
            if outcome == "moved"
        )
    )
    assert set(retried) <= {"moved"}
    assert {m: (await lo.account(m)).balance for m in ring} == moved_before
    # No transfer ever extended validity: every received lot expires on a
    # date one of the first lots had.
    first_expiries = {
        dt.datetime(YEAR + 1, 12, 31, 16, tzinfo=dt.UTC),
        dt.datetime(YEAR + 2, 12, 31, 16, tzinfo=dt.UTC),
        (await lo.lots("M-B"))[0].expire_time.ToDatetime(dt.UTC),
    }
    for member_id in ring:
        for x in await lo.lots(member_id):
            assert x.expire_time.ToDatetime(dt.UTC) in first_expiries


# -- expiry and warnings -----------------------------------------------------------------


async def _set_policy(lo: Loyalty, **changes: Any) -> P.PointsPolicy:
    current = await lo.points.GetPointsPolicy(P.GetPointsPolicyRequest(), metadata=HQ)
    wanted = P.PointsPolicy()
    wanted.CopyFrom(current)
    for name, value in changes.items():
        setattr(wanted, name, value)
    return await lo.points.UpdatePointsPolicy(
        P.UpdatePointsPolicyRequest(request_id=rid(), policy=wanted, etag=current.etag),
        metadata=HQ,
    )


async def test_expiry_and_warnings_with_an_explicit_clock(loyalty: Loyalty) -> None:
    lo = loyalty
    await enroll(lo, "M-ANN", "M-BOB")
    await _set_policy(lo, expiry_rule=P.EXPIRY_RULE_MONTHS_AFTER, expiry_months=3, warning_days=10)
    # A clock of the test's own, a year ahead, at noon in Shanghai.
    ahead = utcnow() + dt.timedelta(days=365)
    t0 = dt.datetime(ahead.year, ahead.month, min(ahead.day, 28), 4, 0, tzinfo=dt.UTC)
    early = await lo.accrue("M-ANN", 100, at=t0)
    late = await lo.accrue("M-ANN", 200, at=t0 + dt.timedelta(days=20))
    bob = await lo.accrue("M-BOB", 50, at=t0)
    assert early is not None and late is not None and bob is not None
    # Three months after, to the end of that day in Shanghai (16:00 UTC).
    three_months = add_months(t0.date(), 3) + dt.timedelta(days=1)
    assert early.expires_at == dt.datetime.combine(three_months, dt.time(), dt.UTC) - dt.timedelta(
        hours=8
    )
    db = lo.db

    # Eleven days before: no warning yet; five days before: one per lot, once.
    assert await points_ledger.warn_expiring(db, early.expires_at - dt.timedelta(days=11)) == 0
    assert await points_ledger.warn_expiring(db, early.expires_at - dt.timedelta(days=5)) == 2
    assert await points_ledger.warn_expiring(db, early.expires_at - dt.timedelta(days=4)) == 0
    warnings = events_of(await lo.outbox(), "loyalty.v1.points.expiring", events_pb2.PointsExpiring)
    assert sorted((w.member_id, w.points, w.expiring_total) for w in warnings) == [
        ("M-ANN", 100, 100),
        ("M-BOB", 50, 50),
    ]
    assert (await lo.lots("M-ANN"))[0].HasField("warn_time")
    # Warned again for the later lot when its time comes, with the total then.
    assert await points_ledger.warn_expiring(db, late.expires_at - dt.timedelta(days=1)) == 1

    # Points held for a sale in progress do not expire while held.
    stamp = Stamp("checkout", "S001", early.expires_at - dt.timedelta(hours=1))
    async with db.transaction() as session:
        await points_ledger.hold(
            session,
            "M-ANN",
            40,
            hold_id="co-held",
            reference="checkout-x",
            expires_at=early.expires_at + dt.timedelta(minutes=30),
            stamp=stamp,
        )
    # Nothing is due a second before; at the expiry the unheld 60 of the
    # first lot and Bob's 50 expire.
    second_before = early.expires_at - dt.timedelta(seconds=1)
    assert await points_ledger.expire_due_points(db, second_before) == 0
    assert await points_ledger.expire_due_points(db, early.expires_at) == 110
    assert await points_ledger.expire_due_points(db, early.expires_at) == 0
    ann = await lo.account("M-ANN")
    assert (ann.balance, ann.held) == (240, 40)
    assert (await lo.account("M-BOB")).balance == 0
    assert await spendable(db, "M-ANN", at=early.expires_at) == 200

    # The hold is not spent in time: the hold expiry releases it, and the
    # next pass expires the 40 it kept.
    later = early.expires_at + dt.timedelta(hours=1)
    assert await points_ledger.expire_due_holds(db, later) == 1
    assert await points_ledger.expire_due_holds(db, later) == 0
    assert await points_ledger.expire_due_points(db, later) == 40
    ann = await lo.account("M-ANN")
    assert (ann.balance, ann.held, ann.available) == (200, 0, 200)
    assert ann.next_expiry_points == 200
    last_day = late.expires_at.astimezone(dt.timezone(dt.timedelta(hours=8))) - dt.timedelta(days=1)
    assert (ann.next_expiry_date.month, ann.next_expiry_date.day) == (last_day.month, last_day.day)
    with pytest.raises(FailedPrecondition):
        async with db.transaction() as session:
            await points_ledger.spend_hold(session, "co-held", reference="sale-x", stamp=stamp)

    # Past a lot's expiry, its points count as gone before the job passes,
    # and a change to the account expires them first: a sale cannot hold them.
    after_late = late.expires_at + dt.timedelta(minutes=1)
    assert await spendable(db, "M-ANN", at=after_late) == 0
    async with db.transaction() as session:
        with pytest.raises(FailedPrecondition) as caught:
            await points_ledger.hold(
                session,
                "M-ANN",
                1,
                hold_id="co-late",
                reference="x",
                expires_at=after_late,
                stamp=Stamp("checkout", "S001", after_late),
            )
    assert caught.value.metadata["available"] == "0"
    assert (await lo.account("M-ANN")).balance == 0

    outbox = await lo.outbox()
    expired = events_of(outbox, "loyalty.v1.points.expired", events_pb2.PointsExpired)
    assert sorted((e.member_id, e.lot_id, e.points) for e in expired) == sorted(
        [
            ("M-ANN", early.lot_id, 60),
            ("M-BOB", bob.lot_id, 50),
            ("M-ANN", early.lot_id, 40),
            ("M-ANN", late.lot_id, 200),
        ]
    )
    lots = {x.lot_id: x for x in await lo.lots("M-ANN")}
    assert lots[early.lot_id].remaining == 0 and lots[early.lot_id].HasField("expired_time")
    kinds = [m.kind for m in await lo.history("M-BOB")]
    assert kinds == [P.POINTS_MOVEMENT_KIND_EXPIRE, P.POINTS_MOVEMENT_KIND_ACCRUE]


# -- members' events ------------------------------------------------------------------------


async def test_merges_and_erasures(loyalty: Loyalty) -> None:
    lo = loyalty
    await enroll(lo, "M-DUP", "M-KEEP", "M-GONE")
    dup_lot = await lo.accrue("M-DUP", 300, at=dt.datetime(YEAR, 1, 5, tzinfo=dt.UTC))
    await lo.accrue("M-KEEP", 100)
    await lo.accrue("M-GONE", 70)
    now = utcnow()
    async with lo.db.transaction() as session:
        await points_ledger.hold(
            session,
            "M-DUP",
            50,
            hold_id="co-dup",
            reference="checkout-dup",
            expires_at=now + dt.timedelta(minutes=15),
            stamp=Stamp("checkout", "S001", now),
        )
    await publish_member_event(
        lo.suite,
        "members.v1.member.merged",
        member_events.MemberMerged(survivor_member_id="M-KEEP", duplicate_member_id="M-DUP"),
    )

    async def merged() -> P.PointsAccount:
        return await lo.account("M-DUP")

    dup = await eventually(merged, lambda a: a.closed)
    assert (dup.balance, dup.held, dup.merged_into_member_id) == (0, 0, "M-KEEP")
    keep = await lo.account("M-KEEP")
    assert (keep.balance, keep.held, keep.lifetime_earned) == (400, 0, 400)
    # The lots moved with their expiry.
    lots = {x.lot_id: x for x in await lo.lots("M-KEEP")}
    assert dup_lot is not None and lots[dup_lot.lot_id].remaining == 300
    assert lots[dup_lot.lot_id].expire_time.ToDatetime(dt.UTC) == dup_lot.expires_at
    assert (await lo.history("M-DUP"))[0].kind == P.POINTS_MOVEMENT_KIND_MERGE_OUT
    assert (await lo.history("M-KEEP"))[0].kind == P.POINTS_MOVEMENT_KIND_MERGE_IN
    details = await refused(lo.adjust("M-DUP", 5), grpc.StatusCode.FAILED_PRECONDITION)
    assert (details["reason"], details["metadata"]["survivor_member_id"]) == (
        "MEMBER_MERGED",
        "M-KEEP",
    )
    # The checkout's calls for the duplicate's id reach the survivor.
    assert await spendable(lo.db, "M-DUP") == 400
    later = await lo.accrue("M-DUP", 10)
    assert later is not None and later.member_id == "M-KEEP"

    await publish_member_event(
        lo.suite, "members.v1.member.erased", member_events.MemberErased(member_id="M-GONE")
    )

    async def erased() -> P.PointsAccount:
        return await lo.account("M-GONE")

    gone = await eventually(erased, lambda a: a.closed)
    assert (gone.balance, gone.available) == (0, 0)
    history = await lo.history("M-GONE")
    assert history[0].kind == P.POINTS_MOVEMENT_KIND_FORFEIT
    assert (history[0].points, history[0].reason) == (-70, "member erased")
    details = await refused(lo.transfer("M-KEEP", "M-GONE", 1), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "MEMBER_ERASED"
    with pytest.raises(FailedPrecondition) as refused_accrual:
        await lo.accrue("M-GONE", 5)
    assert refused_accrual.value.reason == "MEMBER_ERASED"
    expired = events_of(await lo.outbox(), "loyalty.v1.points.expired", events_pb2.PointsExpired)
    assert [(e.member_id, e.points) for e in expired] == [("M-GONE", 70)]


# -- the ledger's check and the migration ---------------------------------------------------


async def test_the_ledger_check_finds_a_tampered_balance(loyalty: Loyalty) -> None:
    lo = loyalty
    await enroll(lo, "M-ANN")
    await lo.accrue("M-ANN", 100)
    assert await lo.problems() == []
    accounts = points_store.points_accounts
    async with lo.db.transaction() as session:
        await session.execute(
            sa.update(accounts)
            .where(accounts.c.member_id == "M-ANN")
            .values(balance=accounts.c.balance + 1)
        )
    assert [(p.what, p.subject) for p in await lo.problems()] == [
        ("balance differs from lots", "M-ANN"),
        ("balance differs from history", "M-ANN"),
    ]
    # The database itself refuses a hold above the balance.
    with pytest.raises(sa.exc.IntegrityError):
        async with lo.db.transaction() as session:
            await session.execute(
                sa.update(accounts).where(accounts.c.member_id == "M-ANN").values(held=1_000)
            )
    async with lo.db.transaction() as session:
        await session.execute(
            sa.update(accounts)
            .where(accounts.c.member_id == "M-ANN")
            .values(balance=accounts.c.balance - 1)
        )


async def test_the_points_migration_matches_the_tables(database_url: DatabaseFactory) -> None:
    """The migrated schema of every points, gifts and members table is the
    one the code declares; 0002 rolls back and applies again."""
    from chassis.db import Database
    from services.loyalty.store import gifts, metadata, points  # noqa: F401

    db = Database(await database_url("loyalty"))
    migrations = loyalty_definition.migrations_dir
    mine = {
        "known_members",
        "points_policy",
        "points_accounts",
        "points_lots",
        "points_movements",
        "points_holds",
        "gifts",
        "gift_stock",
        "gift_stock_changes",
        "gift_redemptions",
    }
    try:
        await migrate(db, migrations, "loyalty", "0002")
        assert await schema_drift(db, metadata, mine) == []
        await migrate(db, migrations, "loyalty", "0001", down=True)
        async with db.engine.connect() as conn:
            assert not await conn.run_sync(lambda c: sa.inspect(c).has_table("points_lots"))
        await migrate(db, migrations, "loyalty", "0002")
        assert await schema_drift(db, metadata, mine) == []
    finally:
        await db.engine.dispose()
