"""The checkout saga on real services (members, cards, loyalty), real NATS
and both databases: receipts, refusals that leave nothing half done, the
same checkout twice, a crash after every step and a restart, refunds and
voids, sales history and its export."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import itertools
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration
from openpyxl import load_workbook
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from chassis.auth import Role, Scope, ScopeLevel
from chassis.config import Settings
from chassis.db import outbox_table
from chassis.idempotency import request_fingerprint
from chassis.service import ServiceRuntime
from cornucopia.cards.v1 import (
    cards_pb2,
    cards_pb2_grpc,
    stored_value_pb2,
    stored_value_pb2_grpc,
)
from cornucopia.common.v1 import money_pb2
from cornucopia.loyalty.v1 import checkout_pb2, checkout_pb2_grpc, rules_pb2, rules_pb2_grpc
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.campaigns.server import definition as campaigns_definition
from services.loyalty import points_ledger
from services.loyalty.domain.checkout import SagaStep
from services.loyalty.points_ledger import Stamp
from services.loyalty.saga import HOLD_TTL, Caller, Sagas, SimulatedCrash
from services.loyalty.server import definition as loyalty_definition
from services.loyalty.server.checkout import sagas_of
from services.loyalty.store import sales as sales_store
from services.members.server import definition as members_definition
from tests.integration.conftest import Suite, auth, rpc_details, seed_organisation, token
from tests.integration.infra import DatabaseFactory
from tests.integration.test_cards_lifecycle import create_program, program, start_cards

P, C, S = checkout_pb2, cards_pb2, stored_value_pb2
HQ = auth()
CASHIER = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1"))
OTHER_CASHIER = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S002"), "op-2"))
MANAGER = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "mgr-1"))


def cny(minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="CNY", minor_units=minor_units)


@dataclass
class Shop:
    suite: Suite
    database_url: str
    cards_port: int
    members_port: int
    campaigns_port: int
    loyalty: ServiceRuntime

    @property
    def checkout(self) -> checkout_pb2_grpc.CheckoutServiceStub:
        return checkout_pb2_grpc.CheckoutServiceStub(self.suite.channels["loyalty"])

    @property
    def cards(self) -> cards_pb2_grpc.CardsServiceStub:
        return cards_pb2_grpc.CardsServiceStub(self.suite.channels["cards"])

    @property
    def sv(self) -> stored_value_pb2_grpc.StoredValueServiceStub:
        return stored_value_pb2_grpc.StoredValueServiceStub(self.suite.channels["cards"])

    @property
    def sagas(self) -> Sagas:
        return sagas_of(self.loyalty.context)

    async def balance(self, card_id: str) -> S.Balance:
        return await self.sv.GetBalance(S.GetBalanceRequest(card_id=card_id), metadata=HQ)

    async def points(self, member_id: str) -> int:
        async with self.loyalty.db.sessions() as session:
            return await points_ledger.available(session, member_id)

    async def restart_loyalty(self) -> None:
        """As after a crash: the old process is gone (nothing of it runs
        any more), a new one starts on the same database."""
        await self.suite.stop("loyalty")
        self.loyalty = await start_loyalty(
            self.suite, self.database_url, self.cards_port, self.members_port, self.campaigns_port
        )


async def start_loyalty(
    suite: Suite, database_url: str, cards_port: int, members_port: int, campaigns_port: int
) -> ServiceRuntime:
    settings = Settings(
        service="loyalty",
        environment="test",
        var_dir=suite.var_dir,
        database_url=database_url,
        nats_url=suite.nats_url,
        grpc_listen="127.0.0.1:0",
        peers={
            "cards": f"127.0.0.1:{cards_port}",
            "members": f"127.0.0.1:{members_port}",
            "campaigns": f"127.0.0.1:{campaigns_port}",
        },
    )
    runtime = ServiceRuntime(loyalty_definition, settings)
    await runtime.start()
    await asyncio.wait_for(runtime.ready.wait(), timeout=20)
    suite.runtimes["loyalty"] = runtime
    suite.channels["loyalty"] = grpc.aio.insecure_channel(
        f"127.0.0.1:{runtime.port}", interceptors=aio_client_interceptors()
    )
    return runtime


async def open_shop(suite: Suite, database_url: DatabaseFactory) -> Shop:
    members = await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    cards = await start_cards(suite, database_url, members_port=members.port)
    await create_program(cards, program())  # GOLD: stored value, 5 % off
    campaigns = await suite.start(campaigns_definition, await database_url("campaigns"))
    url = await database_url("loyalty")
    loyalty = await start_loyalty(suite, url, cards.runtime.port, members.port, campaigns.port)
    return Shop(suite, url, cards.runtime.port, members.port, campaigns.port, loyalty)


async def enroll(
    shop: Shop, mobile: str, *, recharge: int = 0, pin: str = ""
) -> tuple[str, C.Card]:
    members = members_pb2_grpc.MembersServiceStub(shop.suite.channels["members"])
    member = await members.CreateMember(
        members_pb2.CreateMemberRequest(
            request_id=str(uuid.uuid4()),
            member=members_pb2.Member(
                home_store_id="S001", given_name="娜", mobile=mobile, preferred_language="zh-CN"
            ),
        ),
        metadata=CASHIER,
    )
    card = await shop.cards.IssueCard(
        C.IssueCardRequest(
            request_id=str(uuid.uuid4()), program_id="GOLD", member_id=member.member_id
        ),
        metadata=CASHIER,
    )
    if recharge:
        await shop.sv.Recharge(
            S.RechargeRequest(
                request_id=str(uuid.uuid4()),
                card_id=card.card_id,
                amount=cny(recharge),
                channel=S.RECHARGE_CHANNEL_STORE_TERMINAL,
            ),
            metadata=CASHIER,
        )
    if pin:
        await shop.cards.SetCardPin(
            C.SetCardPinRequest(request_id=str(uuid.uuid4()), card_id=card.card_id, new_pin=pin),
            metadata=CASHIER,
        )
    return member.member_id, card


def basket() -> list[P.BasketLine]:
    return [
        P.BasketLine(sku="SERUM-30", category="skincare", quantity=2, unit_price=cny(19_900)),
        P.BasketLine(sku="MASK-5", category="skincare", quantity=1, unit_price=cny(5_000)),
    ]


def checkout_request(checkout_id: str = "", **extra: Any) -> P.CheckoutRequest:
    extra.setdefault("lines", basket())
    return P.CheckoutRequest(
        checkout_id=checkout_id or str(uuid.uuid4()),
        store_id="S001",
        terminal_id="T1",
        **extra,
    )


def stored_value(amount: int, pin: str = "") -> P.Tender:
    return P.Tender(kind=P.TENDER_KIND_STORED_VALUE, amount=cny(amount), pin=pin)


def cash(amount: int) -> P.Tender:
    return P.Tender(kind=P.TENDER_KIND_CASH, amount=cny(amount))


async def refused(call: Any, code: grpc.StatusCode) -> dict[str, Any]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return rpc_details(caught.value)


async def subjects(shop: Shop) -> list[str]:
    async with shop.loyalty.db.sessions() as session:
        rows = await session.execute(sa.select(outbox_table.c.subject))
        return [r.subject for r in rows]


# Two serums at 199.00 and a mask at 50.00 = 448.00; GOLD takes 5 % off each line.
TOTAL = 37_810 + 4_750


async def test_a_checkout_and_its_receipt(suite: Suite, database_url: DatabaseFactory) -> None:
    shop = await open_shop(suite, database_url)
    member_id, card = await enroll(shop, "13800138001", recharge=100_000)
    request = checkout_request(
        card_number=card.card_number, tenders=[stored_value(40_000), cash(TOTAL - 40_000)]
    )
    receipt = await shop.checkout.Checkout(request, metadata=CASHIER)
    assert receipt.member_id == member_id and receipt.card_id == card.card_id
    assert [line.net.minor_units for line in receipt.lines] == [37_810, 4_750]
    assert receipt.lines[0].discounts[0].source == "MEMBER"
    assert (receipt.gross.minor_units, receipt.total.minor_units) == (44_800, TOTAL)
    assert {t.kind: t.amount.minor_units for t in receipt.tenders} == {
        P.TENDER_KIND_STORED_VALUE: 40_000,
        P.TENDER_KIND_CASH: TOTAL - 40_000,
    }
    assert receipt.points.earned > 0 and receipt.points.explanations
    assert receipt.points.balance == receipt.points.earned
    assert receipt.stored_value_balance.minor_units == 60_000
    assert receipt.tier.tier_id
    balance = await shop.balance(card.card_id)
    assert (balance.available.minor_units, balance.held.minor_units) == (60_000, 0)

    # The same checkout again: the same receipt, nothing taken twice.
    again = await shop.checkout.Checkout(request, metadata=CASHIER)
    assert again == receipt
    assert (await shop.balance(card.card_id)).available.minor_units == 60_000
    changed = P.CheckoutRequest()
    changed.CopyFrom(request)
    changed.tenders[1].amount.minor_units += 1
    details = await refused(
        shop.checkout.Checkout(changed, metadata=CASHIER), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"
    assert "loyalty.v1.sale.recorded" in await subjects(shop)

    # The sale in the histories.
    sale = await shop.checkout.GetSale(P.GetSaleRequest(sale_id=receipt.sale_id), metadata=CASHIER)
    assert sale.state == P.SALE_STATE_COMPLETED and sale.receipt == receipt
    by_member = await shop.checkout.ListSales(
        P.ListSalesRequest(member_id=member_id), metadata=CASHIER
    )
    by_store = await shop.checkout.ListSales(P.ListSalesRequest(store_id="S001"), metadata=CASHIER)
    assert [s.receipt.sale_id for s in by_member.sales] == [receipt.sale_id]
    assert [s.receipt.sale_id for s in by_store.sales] == [receipt.sale_id]
    await refused(
        shop.checkout.ListSales(P.ListSalesRequest(store_id="S001"), metadata=OTHER_CASHIER),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    chunks = [
        chunk
        async for chunk in shop.checkout.ExportSales(
            P.ExportSalesRequest(member_id=member_id), metadata=CASHIER
        )
    ]
    assert chunks[0].file_name.endswith(".xlsx")
    sheet = load_workbook(io.BytesIO(b"".join(c.data for c in chunks))).active
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[1][1] == receipt.sale_id and float(rows[1][7]) == TOTAL / 100

    # A guest pays cash and earns nothing.
    guest = await shop.checkout.Checkout(
        checkout_request(lines=basket()[:1], tenders=[cash(39_800)]), metadata=CASHIER
    )
    assert not guest.member_id and guest.points.earned == 0 and guest.total.minor_units == 39_800


async def test_a_checkout_is_one_trace_of_its_steps_and_a_replay_needs_no_card(
    suite: Suite, database_url: DatabaseFactory, spans: InMemorySpanExporter
) -> None:
    shop = await open_shop(suite, database_url)
    _, card = await enroll(shop, "13800138031", recharge=100_000)
    request = checkout_request(
        card_number=card.card_number, tenders=[stored_value(40_000), cash(TOTAL - 40_000)]
    )
    spans.clear()
    with trace.get_tracer("tests").start_as_current_span("the till sells") as root:
        receipt = await shop.checkout.Checkout(request, metadata=CASHIER)
    trace_id = root.get_span_context().trace_id

    # The saga's steps, one after the other inside the call; each call to
    # another service inside the step that makes it (the card is resolved
    # beside the read of the log, before the plan).
    ours = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]

    def only(name: str, kind: SpanKind) -> ReadableSpan:
        found = [s for s in ours if s.name == name and s.kind == kind]
        assert len(found) == 1, (name, [s.name for s in ours])
        return found[0]

    served = only("/cornucopia.loyalty.v1.CheckoutService/Checkout", SpanKind.SERVER)
    steps = [
        only(f"checkout {step}", SpanKind.INTERNAL) for step in ("plan", "start", "take", "commit")
    ]
    assert all(s.parent is not None and s.parent.span_id == served.context.span_id for s in steps)
    assert all((a.end_time or 0) <= (b.start_time or 0) for a, b in itertools.pairwise(steps))
    plan, _, take, _ = steps
    calls = {
        "/cornucopia.cards.v1.CardsService/ResolveCard": served,
        "/cornucopia.campaigns.v1.PricingService/PriceBasket": plan,
        "/cornucopia.cards.v1.StoredValueService/HoldStoredValue": take,
    }
    for name, step in calls.items():
        call = only(name, SpanKind.CLIENT)
        assert call.parent is not None and call.parent.span_id == step.context.span_id, name
    resolved = only("/cornucopia.cards.v1.CardsService/ResolveCard", SpanKind.CLIENT)
    assert (resolved.end_time or 0) <= (plan.start_time or 0)

    # Sent again while cards is down: the same receipt, from the log alone
    # (the card resolved on the way is of no account to a replay); a new
    # checkout, which needs the card, is refused with nothing taken.
    await shop.suite.stop("cards")
    assert await shop.checkout.Checkout(request, metadata=CASHIER) == receipt
    details = await refused(
        shop.checkout.Checkout(
            checkout_request(card_number=card.card_number, tenders=[cash(TOTAL)]),
            metadata=CASHIER,
        ),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert details["reason"] == "CARDS_UNAVAILABLE"
    assert await subjects(shop) == ["loyalty.v1.points.accrued", "loyalty.v1.sale.recorded"]


async def test_the_daily_cap_counts_what_the_member_earned_earlier_that_day(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    """A cap per day is read against the member's sales of the business
    day: a second sale earns what is left of it, a third nothing; another
    member's day starts afresh."""
    shop = await open_shop(suite, database_url)
    rules = rules_pb2_grpc.EarnRulesServiceStub(suite.channels["loyalty"])
    await rules.PublishEarnRuleSet(
        rules_pb2.PublishEarnRuleSetRequest(
            request_id=str(uuid.uuid4()),
            rules=[
                rules_pb2.EarnRule(
                    rule_id="BASE",
                    kind=rules_pb2.EARN_RULE_KIND_BASE_RATE,
                    millipoints_per_unit=1000,
                ),
                rules_pb2.EarnRule(
                    rule_id="DAY", kind=rules_pb2.EARN_RULE_KIND_CAP_PER_DAY, cap_points=600
                ),
            ],
        ),
        metadata=HQ,
    )
    _, card = await enroll(shop, "13800138011")
    _, other = await enroll(shop, "13800138012")

    async def earned(number: str) -> int:
        request = checkout_request(card_number=number, tenders=[cash(TOTAL)])
        receipt = await shop.checkout.Checkout(request, metadata=CASHIER)
        return receipt.points.earned

    first = await earned(card.card_number)
    assert 0 < first < 600
    assert await earned(card.card_number) == 600 - first
    assert await earned(card.card_number) == 0
    assert await earned(other.card_number) == first


async def test_refusals_leave_nothing_taken(suite: Suite, database_url: DatabaseFactory) -> None:
    shop = await open_shop(suite, database_url)
    member_id, card = await enroll(shop, "13800138002", recharge=10_000, pin="246813")

    async def attempt(*tenders: P.Tender, checkout_id: str = "") -> dict[str, Any]:
        return await refused(
            shop.checkout.Checkout(
                checkout_request(checkout_id, card_number=card.card_number, tenders=list(tenders)),
                metadata=CASHIER,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )

    assert (await attempt(stored_value(TOTAL, "246813")))["reason"] == "INSUFFICIENT_BALANCE"
    assert (await attempt(stored_value(5_000), cash(TOTAL - 5_000)))["reason"] == "PIN_REQUIRED"
    wrong = await attempt(stored_value(5_000, "111111"), cash(TOTAL - 5_000))
    assert wrong["reason"] == "PIN_INCORRECT"
    assert (await attempt(cash(TOTAL - 1)))["reason"] == "TENDERS_DO_NOT_MATCH_TOTAL"
    points = P.Tender(kind=P.TENDER_KIND_POINTS, points=100)
    assert (await attempt(points, cash(TOTAL - 100)))["reason"] == "POINTS_INSUFFICIENT"
    bad = await refused(
        shop.checkout.Checkout(
            checkout_request(
                lines=[P.BasketLine(sku="", quantity=0, unit_price=cny(-1))], tenders=[cash(1)]
            ),
            metadata=CASHIER,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(bad["violations"]) >= {"lines[0].sku", "lines[0].quantity"}
    # Another store's cashier cannot sell for S001.
    await refused(
        shop.checkout.Checkout(checkout_request(tenders=[cash(TOTAL)]), metadata=OTHER_CASHIER),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    balance = await shop.balance(card.card_id)
    assert (balance.available.minor_units, balance.held.minor_units) == (10_000, 0)
    assert await shop.points(member_id) == 0

    # A refused checkout may be sent again once the cause is fixed: the PIN.
    checkout_id = str(uuid.uuid4())
    first = await attempt(
        stored_value(5_000, "000000"), cash(TOTAL - 5_000), checkout_id=checkout_id
    )
    assert first["reason"] == "PIN_INCORRECT"
    receipt = await shop.checkout.Checkout(
        checkout_request(
            checkout_id,
            card_number=card.card_number,
            tenders=[stored_value(5_000, "246813"), cash(TOTAL - 5_000)],
        ),
        metadata=CASHIER,
    )
    assert receipt.checkout_id == checkout_id
    assert (await shop.balance(card.card_id)).available.minor_units == 5_000

    # A frozen card cannot pay.
    await shop.cards.FreezeCard(
        C.FreezeCardRequest(request_id=str(uuid.uuid4()), card_id=card.card_id, reason="check"),
        metadata=MANAGER,
    )
    frozen = await attempt(stored_value(1_000, "246813"), cash(TOTAL - 1_000))
    assert frozen["reason"] == "CARD_FROZEN"

    # Points as cash, within the chain's share.
    async with shop.loyalty.db.transaction() as session:
        await points_ledger.accrue(
            session,
            member_id,
            50_000,
            source=points_ledger.LotSource.BONUS,
            reference="welcome",
            stamp=Stamp("test", "", dt.datetime.now(dt.UTC)),
            request_id=f"bonus-{member_id}",
        )
    before = await shop.points(member_id)
    too_many = await attempt(
        P.Tender(kind=P.TENDER_KIND_POINTS, points=40_000), cash(TOTAL - 40_000)
    )
    assert too_many["reason"] == "POINTS_SHARE_EXCEEDED"
    paid = await shop.checkout.Checkout(
        checkout_request(
            card_number=card.card_number,
            tenders=[P.Tender(kind=P.TENDER_KIND_POINTS, points=10_000), cash(TOTAL - 10_000)],
        ),
        metadata=CASHIER,
    )
    assert paid.points.spent == 10_000
    assert await shop.points(member_id) == before - 10_000 + paid.points.earned


async def _lapse_leases(shop: Shop) -> None:
    """Time passes: a crashed driver's lease runs out."""
    async with shop.loyalty.db.transaction() as session:
        await session.execute(
            sa.update(sales_store.checkouts).values(
                lease_until=dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
            )
        )


async def _crash_at(
    shop: Shop, request: P.CheckoutRequest, step: SagaStep
) -> sales_store.CheckoutLog:
    """Sends the checkout through a driver that dies after ``step``; the
    log as it left it."""

    def crash(at: SagaStep) -> None:
        if at == step:
            raise SimulatedCrash(at.value)

    shop.sagas.crash_after = crash
    anonymous = P.CheckoutRequest.FromString(request.SerializeToString())
    with pytest.raises(SimulatedCrash):
        await shop.sagas.checkout(request, request_fingerprint(anonymous), Caller("op-1", "S001"))
    shop.sagas.crash_after = None
    async with shop.loyalty.db.sessions() as session:
        log_ = await sales_store.get_checkout(session, request.checkout_id)
    assert log_ is not None
    return log_


async def _sent_again_sold_once(
    shop: Shop, request: P.CheckoutRequest, card_id: str
) -> sales_store.CheckoutLog:
    """Once the dead driver's lease has run out, the till sends the
    checkout (300.00 of stored value from 1,000.00) again: it is sold, the
    card charged once, and the same checkout once more gives the same
    receipt. The log as the sale left it."""
    await _lapse_leases(shop)
    receipt = await shop.checkout.Checkout(request, metadata=CASHIER)
    assert receipt.checkout_id == request.checkout_id
    balance = await shop.balance(card_id)
    assert (balance.available.minor_units, balance.held.minor_units) == (70_000, 0)
    async with shop.loyalty.db.sessions() as session:
        log_ = await sales_store.get_checkout(session, request.checkout_id)
    assert log_ is not None and log_.step == SagaStep.COMMITTED
    assert await shop.checkout.Checkout(request, metadata=CASHIER) == receipt
    return log_


# Cards holds and captures in one call, so a checkout paid with stored value
# passes SV_HELD only when it finds a hold made without its capture (below).
CRASH_STEPS = [
    SagaStep.POINTS_HELD,
    SagaStep.SV_HOLDING,
    SagaStep.SV_CAPTURED,
    SagaStep.COMMITTED,
]


@pytest.mark.parametrize("step", CRASH_STEPS, ids=[s.value for s in CRASH_STEPS])
async def test_a_crash_after_any_step_is_finished_or_undone(
    suite: Suite, database_url: DatabaseFactory, step: SagaStep
) -> None:
    shop = await open_shop(suite, database_url)
    member_id, card = await enroll(shop, "13800138003", recharge=100_000)
    async with shop.loyalty.db.transaction() as session:
        await points_ledger.accrue(
            session,
            member_id,
            20_000,
            source=points_ledger.LotSource.BONUS,
            reference="welcome",
            stamp=Stamp("test", "", dt.datetime.now(dt.UTC)),
            request_id=f"bonus-{member_id}",
        )
    points_before = await shop.points(member_id)
    request = checkout_request(
        card_number=card.card_number,
        tenders=[
            stored_value(30_000),
            P.Tender(kind=P.TENDER_KIND_POINTS, points=5_000),
            cash(TOTAL - 30_000 - 5_000),
        ],
    )
    anonymous = P.CheckoutRequest.FromString(request.SerializeToString())

    def crash(at: SagaStep) -> None:
        if at == step:
            raise SimulatedCrash(at.value)

    shop.sagas.crash_after = crash
    with pytest.raises(SimulatedCrash):
        await shop.sagas.checkout(request, request_fingerprint(anonymous), Caller("op-1", "S001"))
    await shop.restart_loyalty()
    await _lapse_leases(shop)
    # The new process's recovery pass (its worker's, or this one) takes it.
    log_ = None
    for _ in range(100):
        await shop.sagas.recover()
        async with shop.loyalty.db.sessions() as session:
            log_ = await sales_store.get_checkout(session, request.checkout_id)
        if log_ is not None and log_.step in (SagaStep.COMMITTED, SagaStep.ABORTED):
            break
        await asyncio.sleep(0.1)
    assert log_ is not None
    balance = await shop.balance(card.card_id)
    assert balance.held.minor_units == 0
    if step in (SagaStep.SV_CAPTURED, SagaStep.COMMITTED):
        # Past the point of no return: completed, charged once.
        assert log_.step == SagaStep.COMMITTED
        assert balance.available.minor_units == 70_000
        receipt = await shop.checkout.Checkout(request, metadata=CASHIER)
        assert receipt.points.spent == 5_000
        assert await shop.points(member_id) == points_before - 5_000 + receipt.points.earned
    else:
        # Undone: nothing taken; the same checkout may be sent again.
        assert log_.step == SagaStep.ABORTED
        assert balance.available.minor_units == 100_000
        assert await shop.points(member_id) == points_before
        receipt = await shop.checkout.Checkout(request, metadata=CASHIER)
        assert (await shop.balance(card.card_id)).available.minor_units == 70_000
    again = await shop.checkout.Checkout(request, metadata=CASHIER)
    assert again == receipt
    sales = await shop.checkout.ListSales(P.ListSalesRequest(member_id=member_id), metadata=CASHIER)
    assert len(sales.sales) == 1
    assert (await shop.balance(card.card_id)).available.minor_units == 70_000


async def test_a_checkout_whose_driver_died_after_the_capture_is_finished_when_sent_again(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    """The hold and its capture are not written in the log: the log says
    SV_HOLDING, cards has the captured hold. The same checkout sent again
    once the lease has run out finds it and records the sale with that
    capture, charged once."""
    shop = await open_shop(suite, database_url)
    _, card = await enroll(shop, "13800138009", recharge=100_000)
    request = checkout_request(
        card_number=card.card_number, tenders=[stored_value(30_000), cash(TOTAL - 30_000)]
    )
    log_ = await _crash_at(shop, request, SagaStep.SV_CAPTURED)
    assert (log_.step, log_.sv_hold_id) == (SagaStep.SV_HOLDING, "")
    balance = await shop.balance(card.card_id)
    assert (balance.available.minor_units, balance.held.minor_units) == (70_000, 0)
    log_ = await _sent_again_sold_once(shop, request, card.card_id)
    hold = await shop.sv.GetHold(S.GetHoldRequest(hold_id=log_.sv_hold_id), metadata=HQ)
    assert hold.state == S.HOLD_STATE_CAPTURED
    assert log_.sv_movement_id == hold.capture_movement_id


async def test_a_hold_made_without_its_capture_is_captured_when_the_checkout_is_sent_again(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    """A log at SV_HOLDING whose hold cards made and did not capture (an
    earlier version's driver held and captured in two calls, and died
    between them): sent again, the checkout captures it once and records
    the sale."""
    shop = await open_shop(suite, database_url)
    _, card = await enroll(shop, "13800138010", recharge=100_000)
    request = checkout_request(
        card_number=card.card_number, tenders=[stored_value(30_000), cash(TOTAL - 30_000)]
    )
    log_ = await _crash_at(shop, request, SagaStep.SV_HOLDING)
    assert (await shop.balance(card.card_id)).held.minor_units == 0
    held = await shop.sv.HoldStoredValue(
        S.HoldStoredValueRequest(
            request_id=f"checkout:{request.checkout_id}:{log_.attempt}:hold",
            card_id=card.card_id,
            amount=money_pb2.Money(currency_code="CNY", minor_units=30_000),
            reference=request.checkout_id,
            ttl=Duration(seconds=int(HOLD_TTL.total_seconds())),
        ),
        metadata=HQ,
    )
    assert held.state == S.HOLD_STATE_HELD
    log_ = await _sent_again_sold_once(shop, request, card.card_id)
    assert log_.sv_hold_id == held.hold_id and log_.sv_movement_id


async def test_the_same_checkout_at_once_is_one_sale(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    shop = await open_shop(suite, database_url)
    _, card = await enroll(shop, "13800138004", recharge=100_000)
    request = checkout_request(card_number=card.card_number, tenders=[stored_value(TOTAL)])
    # The store's facts are fetched from members once, before the rush.
    await shop.checkout.PreviewCheckout(
        P.PreviewCheckoutRequest(store_id="S001", terminal_id="T1", lines=basket()),
        metadata=CASHIER,
    )

    async def send() -> str:
        try:
            return (await shop.checkout.Checkout(request, metadata=CASHIER)).sale_id
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
            return ""

    sale_ids = {s for s in await asyncio.gather(*(send() for _ in range(8))) if s}
    assert len(sale_ids) == 1
    assert (await shop.checkout.Checkout(request, metadata=CASHIER)).sale_id in sale_ids
    assert (await shop.balance(card.card_id)).available.minor_units == 100_000 - TOTAL


async def test_refunds_and_voids(suite: Suite, database_url: DatabaseFactory) -> None:
    shop = await open_shop(suite, database_url)
    member_id, card = await enroll(shop, "13800138005", recharge=100_000)
    receipt = await shop.checkout.Checkout(
        checkout_request(
            card_number=card.card_number, tenders=[stored_value(30_000), cash(TOTAL - 30_000)]
        ),
        metadata=CASHIER,
    )
    earned = receipt.points.earned
    # What loyalty knows of the store is old: a refund learns it again
    # (before its transaction: on SQLite a write inside one would wait for
    # itself).
    async with shop.loyalty.db.transaction() as session:
        await session.execute(
            sa.update(sales_store.store_facts).values(
                fetched_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
            )
        )
    await refused(
        shop.checkout.RefundSale(
            P.RefundSaleRequest(request_id="r0", sale_id=receipt.sale_id, reason="x"),
            metadata=CASHIER,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # One serum back.
    part = P.RefundSaleRequest(
        request_id="r1",
        sale_id=receipt.sale_id,
        lines=[P.RefundLine(line_no=1, quantity=1)],
        reason="changed her mind",
    )
    first = await shop.checkout.RefundSale(part, metadata=MANAGER)
    assert first.amount.minor_units == 18_905
    by_tender = {t.kind: t.amount.minor_units for t in first.tenders}
    assert sum(by_tender.values()) == 18_905 and by_tender[P.TENDER_KIND_STORED_VALUE] > 0
    assert first.points_reversed > 0
    assert await shop.checkout.RefundSale(part, metadata=MANAGER) == first
    details = await refused(
        shop.checkout.RefundSale(
            P.RefundSaleRequest(
                request_id="r2",
                sale_id=receipt.sale_id,
                lines=[P.RefundLine(line_no=1, quantity=2)],
                reason="again",
            ),
            metadata=MANAGER,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "REFUND_EXCEEDS_SALE"
    # The rest: everything given back exactly.
    rest = await shop.checkout.RefundSale(
        P.RefundSaleRequest(request_id="r3", sale_id=receipt.sale_id, reason="all of it"),
        metadata=MANAGER,
    )
    assert first.amount.minor_units + rest.amount.minor_units == TOTAL
    sv_back = sum(
        t.amount.minor_units
        for r in (first, rest)
        for t in r.tenders
        if t.kind == P.TENDER_KIND_STORED_VALUE
    )
    assert sv_back == 30_000
    assert (await shop.balance(card.card_id)).available.minor_units == 100_000
    assert first.points_reversed + rest.points_reversed == earned
    assert await shop.points(member_id) == 0
    sale = await shop.checkout.GetSale(P.GetSaleRequest(sale_id=receipt.sale_id), metadata=CASHIER)
    assert sale.state == P.SALE_STATE_REFUNDED and len(sale.refunds) == 2
    assert [line.quantity_refunded for line in sale.receipt.lines] == [2, 1]
    details = await refused(
        shop.checkout.VoidSale(
            P.VoidSaleRequest(request_id="v0", sale_id=receipt.sale_id, reason="x"),
            metadata=MANAGER,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "SALE_ALREADY_REFUNDED"

    # A void on the day gives everything back.
    other = await shop.checkout.Checkout(
        checkout_request(card_number=card.card_number, tenders=[stored_value(TOTAL)]),
        metadata=CASHIER,
    )
    voided = await shop.checkout.VoidSale(
        P.VoidSaleRequest(request_id="v1", sale_id=other.sale_id, reason="wrong basket"),
        metadata=MANAGER,
    )
    assert voided.void and voided.amount.minor_units == TOTAL
    assert (await shop.balance(card.card_id)).available.minor_units == 100_000
    sale = await shop.checkout.GetSale(P.GetSaleRequest(sale_id=other.sale_id), metadata=CASHIER)
    assert sale.state == P.SALE_STATE_VOIDED
    published = await subjects(shop)
    assert published.count("loyalty.v1.sale.refunded") == 2
    assert published.count("loyalty.v1.sale.voided") == 1


async def test_concurrent_checkouts_on_one_card_never_overdraw(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    shop = await open_shop(suite, database_url)
    _, card = await enroll(shop, "13800138006", recharge=6 * TOTAL + 100)

    async def pay() -> str:
        try:
            receipt = await shop.checkout.Checkout(
                checkout_request(card_number=card.card_number, tenders=[stored_value(TOTAL)]),
                metadata=CASHIER,
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
            assert rpc_details(exc)["reason"] == "INSUFFICIENT_BALANCE"
            return ""
        return receipt.sale_id

    sold = [s for s in await asyncio.gather(*(pay() for _ in range(10))) if s]
    assert len(sold) == 6
    balance = await shop.balance(card.card_id)
    assert (balance.available.minor_units, balance.held.minor_units) == (100, 0)
    async with shop.loyalty.db.sessions() as session:
        count = await session.execute(sa.select(sa.func.count()).select_from(sales_store.sales))
        assert count.scalar_one() == 6


async def test_promotions_and_coupons_at_the_till(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    """The pricing step: a promotion on top of the member discount, a coupon
    reserved at checkout and redeemed with the sale, a refused coupon that
    stops the sale with nothing taken, and the coupon back in the wallet
    after a whole refund."""
    from cornucopia.campaigns.v1 import pricing_pb2 as C_
    from cornucopia.campaigns.v1 import pricing_pb2_grpc

    shop = await open_shop(suite, database_url)
    member_id, card = await enroll(shop, "13800138007", recharge=100_000)
    pricing = pricing_pb2_grpc.PricingServiceStub(suite.channels["campaigns"])
    coupons = pricing_pb2_grpc.CouponsServiceStub(suite.channels["campaigns"])
    await pricing.CreatePromotion(
        C_.CreatePromotionRequest(
            request_id="masks-10",
            promotion=C_.Promotion(
                promotion_id="MASKS10",
                display_name="masks 10 % off",
                kind=C_.PROMOTION_KIND_PERCENT_OFF,
                skus=["MASK-5"],
                percent_bps=1_000,
                priority=1,
                stacking=C_.STACKING_COMBINABLE,
            ),
        ),
        metadata=HQ,
    )
    template = await coupons.CreateCouponTemplate(
        C_.CreateCouponTemplateRequest(
            request_id="ten-off",
            template=C_.CouponTemplate(
                display_name="10 off",
                kind=C_.COUPON_KIND_AMOUNT_OFF,
                currency_code="CNY",
                amount_off=cny(1_000),
                valid_days=30,
                min_spend=cny(10_000),
                restore_policy=C_.RESTORE_POLICY_ON_WHOLE_REFUND,
            ),
        ),
        metadata=HQ,
    )
    job = await coupons.IssueCoupons(
        C_.IssueCouponsRequest(
            request_id="give", template_id=template.template_id, member_ids=[member_id]
        ),
        metadata=HQ,
    )
    code = job.coupons[0].code

    preview = await shop.checkout.PreviewCheckout(
        P.PreviewCheckoutRequest(
            store_id="S001", terminal_id="T1", card_number=card.card_number, lines=basket()
        ),
        metadata=CASHIER,
    )
    mask = preview.lines[1]
    assert [d.source for d in mask.discounts] == ["MEMBER", "PROMOTION"]
    total = preview.total.minor_units - 1_000

    # A coupon nobody issued stops the sale; nothing is taken.
    details = await refused(
        shop.checkout.Checkout(
            checkout_request(
                card_number=card.card_number,
                coupon_codes=["NOSUCHCOUPON0000"],
                tenders=[stored_value(total)],
            ),
            metadata=CASHIER,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "COUPON_NOT_FOUND"
    assert (await shop.balance(card.card_id)).available.minor_units == 100_000

    receipt = await shop.checkout.Checkout(
        checkout_request(
            card_number=card.card_number, coupon_codes=[code], tenders=[stored_value(total)]
        ),
        metadata=CASHIER,
    )
    assert receipt.total.minor_units == total
    sources = [d.source for line in receipt.lines for d in line.discounts]
    assert "COUPON" in sources and "PROMOTION" in sources
    wallet = await coupons.ListMemberCoupons(
        C_.ListMemberCouponsRequest(member_id=member_id), metadata=HQ
    )
    assert wallet.coupons[0].state == C_.COUPON_STATE_REDEEMED
    assert wallet.coupons[0].sale_id == receipt.sale_id

    await shop.checkout.RefundSale(
        P.RefundSaleRequest(request_id="back", sale_id=receipt.sale_id, reason="all back"),
        metadata=MANAGER,
    )
    wallet = await coupons.ListMemberCoupons(
        C_.ListMemberCouponsRequest(member_id=member_id), metadata=HQ
    )
    assert wallet.coupons[0].state == C_.COUPON_STATE_ISSUED
    assert (await shop.balance(card.card_id)).available.minor_units == 100_000
