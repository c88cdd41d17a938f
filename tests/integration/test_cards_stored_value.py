"""Stored value on real databases (SQLite and PostgreSQL) and real NATS:
recharges with bonuses under the chain's policy, holds, captures, voids,
debits and refunds, limits, PINs, idempotent retries, concurrency on one
account, hold expiry, cancellation with its settlement, statements, the
events and the ledger's own check."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration

from chassis.auth import Role, Scope, ScopeLevel
from chassis.cli import verify_ledger
from chassis.db import utcnow
from cornucopia.cards.v1 import (
    cards_pb2,
    events_pb2,
    programs_pb2,
    stored_value_pb2,
    stored_value_pb2_grpc,
)
from cornucopia.common.v1 import money_pb2
from services.cards.expiry import expire_due
from services.cards.hold_expiry import expire_due_holds
from services.cards.server import definition as cards_definition
from services.cards.store import stored_value as sv_store
from tests.integration.conftest import Suite, auth, token
from tests.integration.infra import DatabaseFactory, migrate, schema_drift
from tests.integration.test_cards_lifecycle import (
    CHECKOUT,
    HQ,
    MGR_S001,
    OP_S001,
    OP_S002,
    Cards,
    create_program,
    enroll,
    issue,
    outbox,
    program,
    refused,
    rid,
    start_cards,
)

C, S = cards_pb2, stored_value_pb2
OP2_S001 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-9"))
PAYMENTS = auth(token((Role.SERVICE,), Scope(ScopeLevel.HQ), "payments"))


def cny(minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="CNY", minor_units=minor_units)


class Wallet:
    """The stored-value stub of a running cards service, with shorthands."""

    def __init__(self, cards: Cards) -> None:
        self.c = cards
        self.sv = stored_value_pb2_grpc.StoredValueServiceStub(cards.suite.channels["cards"])

    async def recharge(
        self, card_id: str, amount: int, metadata: Any = OP_S001, **extra: Any
    ) -> S.RechargeResponse:
        extra.setdefault("channel", S.RECHARGE_CHANNEL_STORE_TERMINAL)
        extra.setdefault("request_id", rid())
        return await self.sv.Recharge(
            S.RechargeRequest(card_id=card_id, amount=cny(amount), **extra), metadata=metadata
        )

    async def balance(self, card_id: str) -> S.Balance:
        return await self.sv.GetBalance(S.GetBalanceRequest(card_id=card_id), metadata=OP_S001)

    async def debit(
        self, card_id: str, amount: int, metadata: Any = CHECKOUT, **extra: Any
    ) -> S.MovementResponse:
        extra.setdefault("request_id", rid())
        return await self.sv.Debit(
            S.DebitRequest(card_id=card_id, amount=cny(amount), **extra), metadata=metadata
        )

    async def hold(self, card_id: str, amount: int, **extra: Any) -> S.Hold:
        extra.setdefault("request_id", rid())
        return await self.sv.HoldStoredValue(
            S.HoldStoredValueRequest(card_id=card_id, amount=cny(amount), **extra),
            metadata=CHECKOUT,
        )

    async def policy(self, **changes: Any) -> S.StoredValuePolicy:
        current = await self.sv.GetStoredValuePolicy(S.GetStoredValuePolicyRequest(), metadata=HQ)
        wanted = S.StoredValuePolicy()
        wanted.CopyFrom(current)
        for name, value in changes.items():
            if name == "channels":
                del wanted.channels[:]
                wanted.channels.extend(value)
            elif isinstance(value, money_pb2.Money | Duration):
                getattr(wanted, name).CopyFrom(value)
            else:
                setattr(wanted, name, value)
        return await self.sv.UpdateStoredValuePolicy(
            S.UpdateStoredValuePolicyRequest(request_id=rid(), policy=wanted, etag=current.etag),
            metadata=HQ,
        )


async def setup(suite: Suite, database_url: DatabaseFactory) -> tuple[Cards, Wallet]:
    c = await start_cards(suite, database_url)
    await create_program(c, program())
    await create_program(
        c,
        program(
            "PLAIN",
            "7700",
            stored_value=False,
            allows_supplementary=False,
            max_supplementary_cards=0,
        ),
    )
    await create_program(
        c, program("FORFEIT", "6600", cancel_settlement=programs_pb2.CANCEL_SETTLEMENT_FORFEIT)
    )
    for member_id in ("M-ANN", "M-BOB", "M-KID"):
        await enroll(c, member_id)
    return c, Wallet(c)


async def movements(w: Wallet, **where: Any) -> list[S.Movement]:
    found: list[S.Movement] = []
    token_ = ""
    while True:
        page = await w.sv.ListMovements(
            S.ListMovementsRequest(page_size=3, page_token=token_, **where), metadata=OP_S001
        )
        found.extend(page.movements)
        token_ = page.next_page_token
        if not token_:
            return found


async def ledger_problems(c: Cards) -> list[sv_store.LedgerProblem]:
    async with c.runtime.db.sessions() as session:
        return await sv_store.verify(session)


# -- recharge, policy and bonuses ---------------------------------------------------


async def test_recharge_with_bonus_rules_and_the_policy(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    c, w = await setup(suite, database_url)
    card = await issue(c, "M-ANN")
    await w.sv.CreateBonusRule(
        S.CreateBonusRuleRequest(
            request_id="bonus-1000",
            bonus_rule=S.BonusRule(
                name="充1000送100", threshold=cny(100_000), fixed_bonus=cny(10_000)
            ),
        ),
        metadata=HQ,
    )
    await w.sv.CreateBonusRule(
        S.CreateBonusRuleRequest(
            request_id="bonus-5pc",
            bonus_rule=S.BonusRule(
                name="5%", threshold=cny(50_000), bonus_bps=500, max_bonus=cny(8_000)
            ),
        ),
        metadata=HQ,
    )
    quote = await w.sv.QuoteRecharge(
        S.QuoteRechargeRequest(
            card_id=card.card_id, amount=cny(100_000), channel=S.RECHARGE_CHANNEL_STORE_TERMINAL
        ),
        metadata=OP_S001,
    )
    assert quote.bonus.minor_units == 10_000 and quote.bonus_rule_name == "充1000送100"
    done = await w.recharge(card.card_id, 100_000, request_id="r-1")
    assert done.movement.paid.minor_units == 100_000
    assert done.movement.bonus.minor_units == 10_000
    assert done.movement.bonus_rule_id == quote.bonus_rule_id
    assert done.balance.available.minor_units == 110_000
    # 600 gets 5 % (30), under its cap; 100 gets nothing.
    assert (await w.recharge(card.card_id, 60_000)).movement.bonus.minor_units == 3_000
    assert (await w.recharge(card.card_id, 10_000)).movement.bonus.minor_units == 0
    balance = await w.balance(card.card_id)
    assert (balance.paid.minor_units, balance.bonus.minor_units) == (170_000, 13_000)

    # The same request again is the same movement; another under its id is refused.
    again = await w.recharge(card.card_id, 100_000, request_id="r-1")
    assert again.movement.movement_id == done.movement.movement_id
    assert (await w.balance(card.card_id)).available.minor_units == 183_000
    details = await refused(
        w.recharge(card.card_id, 5_000, request_id="r-1"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"

    # Designated stores and logins.
    await w.policy(
        channels=[
            S.ChannelRule(
                channel=S.RECHARGE_CHANNEL_STORE_TERMINAL,
                enabled=True,
                store_ids=["S001"],
                operator_ids=["op-1"],
                max_amount=cny(500_000),
            ),
            S.ChannelRule(channel=S.RECHARGE_CHANNEL_ONLINE_SELF_SERVICE, enabled=True),
        ]
    )
    for metadata in (OP_S002, OP2_S001):
        details = await refused(
            w.recharge(card.card_id, 1_000, metadata), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert details["reason"] == "RECHARGE_CHANNEL_NOT_ALLOWED"
    details = await refused(w.recharge(card.card_id, 600_000), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "RECHARGE_AMOUNT_OUT_OF_RANGE"
    details = await refused(
        w.recharge(
            card.card_id, 1_000, channel=S.RECHARGE_CHANNEL_BANK_CARD, payment_reference="acq-1"
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "RECHARGE_CHANNEL_NOT_ALLOWED"
    # Online payments come from the payment service, with its reference.
    await refused(
        w.recharge(card.card_id, 1_000, channel=S.RECHARGE_CHANNEL_ONLINE_SELF_SERVICE),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    details = await refused(
        w.recharge(card.card_id, 1_000, PAYMENTS, channel=S.RECHARGE_CHANNEL_ONLINE_SELF_SERVICE),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "payment_reference" in details["violations"]
    online = await w.recharge(
        card.card_id,
        1_000,
        PAYMENTS,
        channel=S.RECHARGE_CHANNEL_ONLINE_SELF_SERVICE,
        payment_reference="pay-778",
    )
    assert online.movement.reference == "pay-778"
    details = await refused(
        w.recharge(card.card_id, 1_000, channel=S.RECHARGE_CHANNEL_PARTNER_CARD),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "channel" in details["violations"]

    # Bad input changes nothing.
    before = await w.balance(card.card_id)
    for amount in (cny(0), cny(-5), money_pb2.Money(currency_code="USD", minor_units=100)):
        await refused(
            w.sv.Recharge(
                S.RechargeRequest(
                    request_id=rid(),
                    card_id=card.card_id,
                    amount=amount,
                    channel=S.RECHARGE_CHANNEL_STORE_TERMINAL,
                ),
                metadata=OP_S001,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    plain = await issue(c, "M-BOB", program_id="PLAIN")
    details = await refused(w.recharge(plain.card_id, 1_000), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "STORED_VALUE_NOT_OFFERED"
    await c.cards.FreezeCard(
        C.FreezeCardRequest(request_id=rid(), card_id=card.card_id, reason="check"),
        metadata=MGR_S001,
    )
    details = await refused(w.recharge(card.card_id, 1_000), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "CARD_FROZEN"
    assert await w.balance(card.card_id) == before

    # The policy: only HQ, with the etag last read, and a currency fixed once used.
    await refused(
        w.sv.UpdateStoredValuePolicy(
            S.UpdateStoredValuePolicyRequest(request_id=rid(), policy=S.StoredValuePolicy()),
            metadata=MGR_S001,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    current = await w.sv.GetStoredValuePolicy(S.GetStoredValuePolicyRequest(), metadata=HQ)
    stale = S.UpdateStoredValuePolicyRequest(request_id=rid(), policy=current, etag="stale")
    await refused(w.sv.UpdateStoredValuePolicy(stale, metadata=HQ), grpc.StatusCode.ABORTED)
    usd = S.StoredValuePolicy()
    usd.CopyFrom(current)
    usd.currency_code = "USD"
    del usd.channels[:]
    details = await refused(
        w.sv.UpdateStoredValuePolicy(
            S.UpdateStoredValuePolicyRequest(request_id=rid(), policy=usd, etag=current.etag),
            metadata=HQ,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "CURRENCY_FIXED"
    assert await ledger_problems(c) == []


# -- paying -------------------------------------------------------------------------


async def test_hold_capture_void_debit_and_refund(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    c, w = await setup(suite, database_url)
    card = await issue(c, "M-ANN")
    await w.sv.CreateBonusRule(
        S.CreateBonusRuleRequest(
            request_id=rid(),
            bonus_rule=S.BonusRule(name="10%", threshold=cny(10_000), bonus_bps=1_000),
        ),
        metadata=HQ,
    )
    await w.recharge(card.card_id, 10_000)  # 100.00 paid + 10.00 bonus

    # Bonus funds go first (the default order).
    held = await w.hold(card.card_id, 3_000, reference="checkout-1")
    assert held.state == S.HOLD_STATE_HELD
    assert (held.bonus.minor_units, held.paid.minor_units) == (1_000, 2_000)
    balance = await w.balance(card.card_id)
    assert (balance.available.minor_units, balance.held.minor_units) == (8_000, 3_000)
    # Capture part: the rest goes back in the hold's mix.
    captured = await w.sv.CaptureHold(
        S.CaptureHoldRequest(request_id=rid(), hold_id=held.hold_id, amount=cny(2_400)),
        metadata=CHECKOUT,
    )
    assert captured.state == S.HOLD_STATE_CAPTURED and captured.captured.minor_units == 2_400
    balance = await w.balance(card.card_id)
    assert (balance.available.minor_units, balance.held.minor_units) == (8_600, 0)
    # The capture's reply and ResolveCard's carry what the card has left
    # (a till's receipt asks no GetBalance); a hold's reply does not.
    assert captured.available_after == balance.available
    assert not held.HasField("available_after")
    resolved = await c.cards.ResolveCard(
        cards_pb2.ResolveCardRequest(card_number=card.card_number), metadata=CHECKOUT
    )
    assert resolved.stored_value_available == balance.available
    details = await refused(
        w.sv.VoidHold(S.VoidHoldRequest(request_id=rid(), hold_id=held.hold_id), metadata=CHECKOUT),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "HOLD_CAPTURED"

    voided_hold = await w.hold(card.card_id, 1_000)
    voided = await w.sv.VoidHold(
        S.VoidHoldRequest(request_id=rid(), hold_id=voided_hold.hold_id, reason="cancelled"),
        metadata=CHECKOUT,
    )
    assert voided.state == S.HOLD_STATE_VOIDED
    details = await refused(
        w.sv.CaptureHold(
            S.CaptureHoldRequest(request_id=rid(), hold_id=voided_hold.hold_id), metadata=CHECKOUT
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "HOLD_VOIDED"
    assert (await w.balance(card.card_id)).available.minor_units == 8_600

    debit = await w.debit(card.card_id, 5_000, reference="sale-2")
    assert debit.balance.available.minor_units == 3_600
    details = await refused(w.debit(card.card_id, 3_601), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "INSUFFICIENT_BALANCE"

    # Refunds give back into the funds that paid, in parts or whole.
    part = await w.sv.Refund(
        S.RefundRequest(
            request_id=rid(), movement_id=debit.movement.movement_id, amount=cny(2_000)
        ),
        metadata=CHECKOUT,
    )
    assert part.movement.refunds_movement_id == debit.movement.movement_id
    rest = await w.sv.Refund(
        S.RefundRequest(request_id=rid(), movement_id=debit.movement.movement_id),
        metadata=CHECKOUT,
    )
    assert part.movement.amount.minor_units + rest.movement.amount.minor_units == 5_000
    details = await refused(
        w.sv.Refund(
            S.RefundRequest(
                request_id=rid(), movement_id=debit.movement.movement_id, amount=cny(1)
            ),
            metadata=CHECKOUT,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "REFUND_EXCEEDS_PAYMENT"
    capture_refund = await w.sv.Refund(
        S.RefundRequest(request_id=rid(), movement_id=captured.capture_movement_id),
        metadata=CHECKOUT,
    )
    assert capture_refund.movement.amount.minor_units == 2_400
    balance = await w.balance(card.card_id)
    assert (balance.paid.minor_units, balance.bonus.minor_units) == (10_000, 1_000)

    # A card that cannot pay, and a PIN.
    await c.cards.ReportCardLost(
        C.ReportCardLostRequest(request_id=rid(), card_id=card.card_id), metadata=OP_S001
    )
    details = await refused(w.debit(card.card_id, 100), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "CARD_LOST"
    await c.cards.CancelCardLoss(
        C.CancelCardLossRequest(request_id=rid(), card_id=card.card_id), metadata=OP_S001
    )
    await c.cards.SetCardPin(
        C.SetCardPinRequest(request_id=rid(), card_id=card.card_id, new_pin="246813"),
        metadata=OP_S001,
    )
    details = await refused(w.debit(card.card_id, 100), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "PIN_REQUIRED"
    details = await refused(
        w.debit(card.card_id, 100, pin="111111"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "PIN_INCORRECT"
    with_pin = await w.debit(card.card_id, 100, pin="246813", request_id="pin-debit")
    # A retry is not asked for the PIN again.
    retried = await w.debit(card.card_id, 100, pin="", request_id="pin-debit")
    assert retried.movement.movement_id == with_pin.movement.movement_id

    statement = await movements(w, card_id=card.card_id)
    kinds = [m.kind for m in reversed(statement)]
    assert kinds == [
        S.MOVEMENT_KIND_RECHARGE,
        S.MOVEMENT_KIND_HOLD,
        S.MOVEMENT_KIND_CAPTURE,
        S.MOVEMENT_KIND_RELEASE,
        S.MOVEMENT_KIND_HOLD,
        S.MOVEMENT_KIND_RELEASE,
        S.MOVEMENT_KIND_DEBIT,
        S.MOVEMENT_KIND_REFUND,
        S.MOVEMENT_KIND_REFUND,
        S.MOVEMENT_KIND_REFUND,
        S.MOVEMENT_KIND_DEBIT,
    ]
    assert statement[0].paid_after.minor_units + statement[0].bonus_after.minor_units == 10_900
    subjects = [s for s, _ in await outbox(c) if s.startswith("cards.v1.stored_value.")]
    assert subjects.count("cards.v1.stored_value.recharged") == 1
    assert subjects.count("cards.v1.stored_value.held") == 2
    assert subjects.count("cards.v1.stored_value.captured") == 1
    assert subjects.count("cards.v1.stored_value.voided") == 2
    assert subjects.count("cards.v1.stored_value.debited") == 2
    assert subjects.count("cards.v1.stored_value.refunded") == 3
    recharged = next(
        events_pb2.StoredValueRecharged.FromString(p)
        for s, p in await outbox(c)
        if s == "cards.v1.stored_value.recharged"
    )
    assert recharged.movement.member_id == "M-ANN"
    assert recharged.movement.available_after.minor_units == 11_000
    assert await ledger_problems(c) == []


async def test_a_hold_captured_as_it_is_made(suite: Suite, database_url: DatabaseFactory) -> None:
    """HoldStoredValue with ``capture``: the hold and its capture in one
    call, both under the request's id, found again by the same id with or
    without the capture and without the PIN, refunded like any capture."""
    c, w = await setup(suite, database_url)
    card = await issue(c, "M-ANN")
    await w.recharge(card.card_id, 10_000)
    await c.cards.SetCardPin(
        C.SetCardPinRequest(request_id=rid(), card_id=card.card_id, new_pin="246813"),
        metadata=OP_S001,
    )
    details = await refused(
        w.hold(card.card_id, 3_000, pin="111111", capture=True), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "PIN_INCORRECT"
    details = await refused(
        w.hold(card.card_id, 10_001, pin="246813", capture=True),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "INSUFFICIENT_BALANCE"
    balance = await w.balance(card.card_id)
    assert (balance.available.minor_units, balance.held.minor_units) == (10_000, 0)

    taken = await w.hold(
        card.card_id, 3_000, pin="246813", capture=True, request_id="sale-1", reference="sale-1"
    )
    assert taken.state == S.HOLD_STATE_CAPTURED
    assert taken.captured.minor_units == 3_000 and taken.capture_movement_id
    balance = await w.balance(card.card_id)
    assert (balance.available.minor_units, balance.held.minor_units) == (7_000, 0)
    assert taken.available_after == balance.available
    # Asked again, with the capture or without it, and without the PIN: the
    # same hold, nothing taken twice.
    again = await w.hold(card.card_id, 3_000, capture=True, request_id="sale-1", reference="sale-1")
    found = await w.hold(card.card_id, 3_000, request_id="sale-1", reference="sale-1")
    for reply in (again, found):
        assert (reply.hold_id, reply.state, reply.capture_movement_id) == (
            taken.hold_id,
            S.HOLD_STATE_CAPTURED,
            taken.capture_movement_id,
        )
    assert (await w.balance(card.card_id)).available.minor_units == 7_000
    # Another amount under the same id is another request.
    details = await refused(
        w.hold(card.card_id, 2_000, pin="246813", request_id="sale-1", reference="sale-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"
    # A hold made without the capture stays so when asked again with it.
    held = await w.hold(card.card_id, 1_000, pin="246813", request_id="sale-2")
    kept = await w.hold(card.card_id, 1_000, capture=True, request_id="sale-2")
    assert (kept.hold_id, kept.state) == (held.hold_id, S.HOLD_STATE_HELD)
    assert (await w.balance(card.card_id)).held.minor_units == 1_000

    refund = await w.sv.Refund(
        S.RefundRequest(request_id=rid(), movement_id=taken.capture_movement_id),
        metadata=CHECKOUT,
    )
    assert refund.movement.amount.minor_units == 3_000
    assert (await w.balance(card.card_id)).available.minor_units == 9_000
    kinds = [m.kind for m in reversed(await movements(w, card_id=card.card_id))]
    assert kinds == [
        S.MOVEMENT_KIND_RECHARGE,
        S.MOVEMENT_KIND_HOLD,
        S.MOVEMENT_KIND_CAPTURE,
        S.MOVEMENT_KIND_HOLD,
        S.MOVEMENT_KIND_REFUND,
    ]
    # Written together, each movement keeps the balances after it.
    held_then, captured_then = list(reversed(await movements(w, card_id=card.card_id)))[1:3]
    assert (held_then.paid_after.minor_units, held_then.held_after.minor_units) == (7_000, 3_000)
    assert (captured_then.paid_after.minor_units, captured_then.held_after.minor_units) == (
        7_000,
        0,
    )
    subjects = [s for s, _ in await outbox(c) if s.startswith("cards.v1.stored_value.")]
    # In the order the movements were made, the capture right after its hold.
    assert [subject.rsplit(".", 1)[1] for subject in subjects] == [
        "recharged",
        "held",
        "captured",
        "held",
        "refunded",
    ]
    assert await ledger_problems(c) == []


async def test_limits_supplementary_cards_and_hold_expiry(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    c, w = await setup(suite, database_url)
    main = await issue(c, "M-ANN")
    kid = await issue(c, "M-KID", principal_card_id=main.card_id, spending_limit=cny(3_000))
    assert kid.account_id == main.account_id
    await w.recharge(main.card_id, 20_000)
    await w.policy(daily_spend_limit=cny(10_000))

    # The supplementary card spends the shared funds, up to its own limit.
    await w.debit(kid.card_id, 2_000)
    details = await refused(w.debit(kid.card_id, 1_500), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "SPENDING_LIMIT_EXCEEDED"
    kid_balance = await w.sv.GetBalance(S.GetBalanceRequest(card_id=kid.card_id), metadata=OP_S001)
    assert kid_balance.spendable_this_month.minor_units == 1_000
    assert kid_balance.available.minor_units == 18_000

    # The main card's daily limit; a voided hold gives its room back.
    held = await w.hold(main.card_id, 8_000)
    details = await refused(w.debit(main.card_id, 2_500), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "DAILY_LIMIT_EXCEEDED"
    await w.sv.VoidHold(
        S.VoidHoldRequest(request_id=rid(), hold_id=held.hold_id), metadata=CHECKOUT
    )
    assert (await w.balance(main.card_id)).spendable_today.minor_units == 10_000
    await w.debit(main.card_id, 2_500)

    # A hold nobody captures expires and gives its funds back.
    stale = await w.hold(main.card_id, 1_000, ttl=Duration(seconds=60))
    assert (await w.balance(main.card_id)).held.minor_units == 1_000
    assert await expire_due_holds(c.runtime.db, utcnow() + dt.timedelta(minutes=2)) == 1
    expired = await w.sv.GetHold(S.GetHoldRequest(hold_id=stale.hold_id), metadata=OP_S001)
    assert expired.state == S.HOLD_STATE_EXPIRED
    assert (await w.balance(main.card_id)).held.minor_units == 0
    assert await expire_due_holds(c.runtime.db, utcnow() + dt.timedelta(minutes=2)) == 0
    await refused(
        w.hold(main.card_id, 1_000, ttl=Duration(seconds=30 * 86_400)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    # Replacing the card keeps the account and its balance.
    replaced = await c.cards.ReplaceCard(
        C.ReplaceCardRequest(request_id=rid(), card_id=main.card_id), metadata=OP_S001
    )
    new_balance = await w.balance(replaced.card.card_id)
    assert new_balance.available.minor_units == 15_500
    assert await ledger_problems(c) == []


async def test_cancelling_settles_the_account(suite: Suite, database_url: DatabaseFactory) -> None:
    c, w = await setup(suite, database_url)
    await w.sv.CreateBonusRule(
        S.CreateBonusRuleRequest(
            request_id=rid(),
            bonus_rule=S.BonusRule(name="送10", threshold=cny(1_000), fixed_bonus=cny(1_000)),
        ),
        metadata=HQ,
    )
    main = await issue(c, "M-ANN")
    kid = await issue(c, "M-KID", principal_card_id=main.card_id)
    await w.recharge(main.card_id, 5_000)
    held = await w.hold(main.card_id, 500)

    cancel = C.CancelCardRequest(request_id=rid(), card_id=main.card_id, reason="moving away")
    details = await refused(
        c.cards.CancelCard(cancel, metadata=MGR_S001), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "STORED_VALUE_ON_HOLD"
    await w.sv.VoidHold(
        S.VoidHoldRequest(request_id=rid(), hold_id=held.hold_id), metadata=CHECKOUT
    )
    await c.cards.CancelCard(
        C.CancelCardRequest(request_id=rid(), card_id=main.card_id, reason="moving away"),
        metadata=MGR_S001,
    )
    kid_now = await c.cards.GetCard(C.GetCardRequest(card_id=kid.card_id), metadata=OP_S001)
    assert kid_now.state == C.CARD_STATE_CANCELLED
    balance = await w.balance(main.card_id)
    assert balance.closed and balance.available.minor_units == 0
    settled = await movements(w, account_id=main.account_id)
    by_kind = {m.kind: m.amount.minor_units for m in settled}
    # The paid funds are paid out (the program's rule), the bonus forfeited.
    assert by_kind[S.MOVEMENT_KIND_PAYOUT] == 5_000
    assert by_kind[S.MOVEMENT_KIND_FORFEIT] == 1_000
    assert any(s == "cards.v1.stored_value.settled" for s, _ in await outbox(c))
    details = await refused(w.debit(main.card_id, 1), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "CARD_CANCELLED"

    # A forfeiting program keeps the paid funds too.
    other = await issue(c, "M-BOB", program_id="FORFEIT")
    await w.recharge(other.card_id, 2_000)
    await c.cards.CancelCard(
        C.CancelCardRequest(request_id=rid(), card_id=other.card_id, reason="fraud"),
        metadata=MGR_S001,
    )
    forfeited = await movements(w, account_id=other.account_id)
    assert forfeited[0].kind == S.MOVEMENT_KIND_FORFEIT
    assert forfeited[0].amount.minor_units == 3_000

    # What is left on a card that expired is settled when it is cancelled.
    late = await issue(c, "M-KID")
    await w.recharge(late.card_id, 700)
    await expire_due(c.runtime.db, utcnow() + dt.timedelta(days=800))
    details = await refused(w.debit(late.card_id, 100), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "CARD_EXPIRED"
    assert (await w.balance(late.card_id)).available.minor_units == 700
    await c.cards.CancelCard(
        C.CancelCardRequest(request_id=rid(), card_id=late.card_id, reason="expired, paid out"),
        metadata=MGR_S001,
    )
    paid_out = await movements(w, account_id=late.account_id)
    assert (paid_out[0].kind, paid_out[0].amount.minor_units) == (S.MOVEMENT_KIND_PAYOUT, 700)
    assert await ledger_problems(c) == []


# -- concurrency and the ledger's check -------------------------------------------------


async def test_fifty_concurrent_debits_never_overdraw(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    c, w = await setup(suite, database_url)
    card = await issue(c, "M-ANN")
    await w.recharge(card.card_id, 3_000)

    async def attempt(n: int) -> str:
        try:
            await w.debit(card.card_id, 100, request_id=f"spree-{n}")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            return "refused"
        return "paid"

    outcomes = await asyncio.gather(*(attempt(n) for n in range(50)))
    assert outcomes.count("paid") == 30 and outcomes.count("refused") == 20
    assert (await w.balance(card.card_id)).available.minor_units == 0
    # Retries of all fifty, at once, charge nothing more.
    again = await asyncio.gather(*(attempt(n) for n in range(50)))
    assert again.count("paid") >= 30
    debits = [
        m for m in await movements(w, card_id=card.card_id) if m.kind == S.MOVEMENT_KIND_DEBIT
    ]
    assert len(debits) == 30
    assert await ledger_problems(c) == []


async def test_the_ledger_check_finds_a_tampered_balance(
    suite: Suite, database_url: DatabaseFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    c, w = await setup(suite, database_url)
    card = await issue(c, "M-ANN")
    await w.recharge(card.card_id, 1_000)
    await w.debit(card.card_id, 300)
    assert await ledger_problems(c) == []
    assert await verify_ledger(c.runtime.settings) == 0
    assert "ledger consistent: 1 accounts, 2 movements" in capsys.readouterr().out
    async with c.runtime.db.transaction() as session:
        await session.execute(
            sa.update(sv_store.sv_accounts)
            .where(sv_store.sv_accounts.c.account_id == card.account_id)
            .values(paid=sv_store.sv_accounts.c.paid + 1)
        )
    problems = await ledger_problems(c)
    assert [(p.what, p.subject) for p in problems] == [
        ("balance differs from journal", card.account_id)
    ]
    assert await verify_ledger(c.runtime.settings) == 1
    assert f"balance differs from journal: {card.account_id} paid" in capsys.readouterr().err
    # And the database itself refuses a negative balance.
    async with c.runtime.db.sessions() as session:
        try:
            await session.execute(
                sa.update(sv_store.sv_accounts)
                .where(sv_store.sv_accounts.c.account_id == card.account_id)
                .values(paid=-1)
            )
            await session.commit()
        except sa.exc.IntegrityError:
            await session.rollback()
        else:
            raise AssertionError("a negative balance was accepted")


async def test_migrations_match_the_tables_and_roll_back(database_url: DatabaseFactory) -> None:
    """The migrated schema of every cards table is the one the code
    declares; 0003 rolls back to the cards of 0002 and applies again."""
    from chassis.db import Database

    # Importing every store module registers every table, as the migrations' env does.
    from services.cards.store import (  # noqa: F401
        batches,
        cards,
        metadata,
        partners,
        programs,
        projections,
        stored_value,
        stored_value_rules,
    )

    db = Database(await database_url("cards"))
    migrations = cards_definition.migrations_dir
    mine = set(metadata.tables)
    try:
        await migrate(db, migrations, "cards", "head")
        assert await schema_drift(db, metadata, mine) == []
        await migrate(db, migrations, "cards", "0002", down=True)
        async with db.engine.connect() as conn:
            assert not await conn.run_sync(lambda c: sa.inspect(c).has_table("sv_accounts"))
        await migrate(db, migrations, "cards", "head")
        assert await schema_drift(db, metadata, mine) == []
    finally:
        await db.engine.dispose()
