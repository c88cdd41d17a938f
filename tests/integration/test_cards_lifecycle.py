"""The cards service on real databases (SQLite and PostgreSQL) and real
NATS: programs, issuing, every move of the lifecycle and its refusals,
replacement, supplementary, group and linked cards, PINs, expiry, the
members events it consumes and the events it publishes."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.message import Message

from chassis.auth import Role, Scope, ScopeLevel
from chassis.bus import STREAMS, Bus, cloudevent_headers
from chassis.config import Settings
from chassis.db import outbox_table, utcnow
from chassis.service import ServiceRuntime
from cornucopia.cards.v1 import (
    cards_pb2,
    cards_pb2_grpc,
    events_pb2,
    partners_pb2,
    partners_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
)
from cornucopia.common.v1 import money_pb2
from cornucopia.members.v1 import events_pb2 as member_events
from services.cards.expiry import expire_due
from services.cards.server import definition as cards_definition
from services.cards.store import projections
from services.cards.store.cards import cards as cards_table
from tests.integration.conftest import Suite, auth, eventually, rpc_details, token
from tests.integration.infra import DatabaseFactory

C, P = cards_pb2, programs_pb2
HQ = auth()
OP_S001 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1"))
OP_S002 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S002"), "op-2"))
MGR_S001 = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "mgr-1"))
MGR_S002 = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S002"), "mgr-2"))
EAST = auth(token((Role.REGION_MANAGER,), Scope(ScopeLevel.REGION, "EAST"), "rm-east"))
WEST = auth(token((Role.REGION_MANAGER,), Scope(ScopeLevel.REGION, "WEST"), "rm-west"))
CALL_CENTER = auth(token((Role.CALL_CENTER,), Scope(ScopeLevel.CALL_CENTER), "cc-1"))
CHECKOUT = auth(token((Role.SERVICE,), Scope(ScopeLevel.HQ), "loyalty"))


class Cards:
    """Stubs of a running cards service."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.programs = programs_pb2_grpc.CardProgramsServiceStub(suite.channels["cards"])
        self.cards = cards_pb2_grpc.CardsServiceStub(suite.channels["cards"])
        self.partners = partners_pb2_grpc.PartnersServiceStub(suite.channels["cards"])

    @property
    def runtime(self) -> ServiceRuntime:
        return self.suite.runtimes["cards"]


async def start_cards(
    suite: Suite, database_url: DatabaseFactory, members_port: int | None = None
) -> Cards:
    """Starts cards as the suite would, with the address of a members
    service (or of nothing, when the test needs none)."""
    settings = Settings(
        service="cards",
        environment="test",
        var_dir=suite.var_dir,
        database_url=await database_url("cards"),
        nats_url=suite.nats_url,
        grpc_listen="127.0.0.1:0",
        peers={"members": f"127.0.0.1:{members_port or 1}"},
    )
    runtime = ServiceRuntime(cards_definition, settings)
    await runtime.start()
    await asyncio.wait_for(runtime.ready.wait(), timeout=20)
    suite.runtimes["cards"] = runtime
    suite.channels["cards"] = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    return Cards(suite)


async def publish_member_event(suite: Suite, subject: str, message: Message) -> None:
    """Publishes as the members service's relay would."""
    bus = Bus(suite.nats_url, "test-members")
    await bus.connect()
    try:
        await bus.ensure_stream(STREAMS["members"])
        event_id = str(uuid.uuid4())
        headers = cloudevent_headers(
            event_id=event_id,
            event_type=message.DESCRIPTOR.full_name,
            source="cornucopia/members",
            time=utcnow(),
            subject=subject,
        )
        await bus.publish(subject, message.SerializeToString(), headers)
    finally:
        await bus.close()


async def known_member(c: Cards, member_id: str) -> projections.KnownMember | None:
    async with c.runtime.db.sessions() as session:
        return await projections.get_member(session, member_id)


async def enroll(c: Cards, member_id: str) -> None:
    await publish_member_event(
        c.suite,
        "members.v1.member.enrolled",
        member_events.MemberEnrolled(member_id=member_id, home_store_id="S001"),
    )
    await eventually(lambda: known_member(c, member_id), lambda m: m is not None)


def program(
    program_id: str = "GOLD", prefix: str = "8816", length: int = 16, **extra: Any
) -> P.CardProgram:
    values: dict[str, Any] = {
        "program_id": program_id,
        "display_name": f"{program_id} 卡",
        "form": P.CARD_FORM_PHYSICAL,
        "number_format": P.NumberFormat(prefix=prefix, length=length, luhn_check_digit=True),
        "validity_months": 24,
        "stored_value": True,
        "member_discount_bps": 500,
        "holding": P.CARD_HOLDING_PERSONAL,
        "allows_supplementary": True,
        "max_supplementary_cards": 2,
        "allows_linking": True,
    }
    values.update(extra)
    return P.CardProgram(**values)


async def create_program(c: Cards, message: P.CardProgram) -> P.CardProgram:
    return await c.programs.CreateCardProgram(
        P.CreateCardProgramRequest(request_id=str(uuid.uuid4()), card_program=message), metadata=HQ
    )


async def issue(c: Cards, member_id: str, metadata: Any = OP_S001, **fields: Any) -> C.Card:
    fields.setdefault("program_id", "GOLD")
    return await c.cards.IssueCard(
        C.IssueCardRequest(request_id=str(uuid.uuid4()), member_id=member_id, **fields),
        metadata=metadata,
    )


async def refused(call: Any, code: grpc.StatusCode) -> dict[str, Any]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return rpc_details(caught.value)


async def outbox(c: Cards) -> list[tuple[str, bytes]]:
    async with c.runtime.db.sessions() as session:
        rows = await session.execute(
            sa.select(outbox_table.c.subject, outbox_table.c.payload).order_by(outbox_table.c.seq)
        )
        return [(r.subject, r.payload) for r in rows]


def rid() -> str:
    return str(uuid.uuid4())


# -- programs ---------------------------------------------------------------------


async def test_programs(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start_cards(suite, database_url)
    request = P.CreateCardProgramRequest(request_id="p-gold", card_program=program())
    gold = await c.programs.CreateCardProgram(request, metadata=HQ)
    assert gold.number_capacity == 10**11
    assert gold.numbers_issued == 0
    assert gold.created_by.principal == "test-admin"
    # A retry returns the first answer; the same key with another body is refused.
    assert await c.programs.CreateCardProgram(request, metadata=HQ) == gold
    changed = P.CreateCardProgramRequest(
        request_id="p-gold", card_program=program(display_name="x")
    )
    details = await refused(
        c.programs.CreateCardProgram(changed, metadata=HQ), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"
    details = await refused(create_program(c, program(prefix="9")), grpc.StatusCode.ALREADY_EXISTS)
    assert details["reason"] == "PROGRAM_EXISTS"
    details = await refused(
        create_program(c, program("SILVER", prefix="88161")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert (details["reason"], details["metadata"]["program_id"]) == (
        "NUMBER_RANGE_OVERLAP",
        "GOLD",
    )
    details = await refused(
        create_program(
            c,
            program("bad id", prefix="x", form=P.CARD_FORM_UNSPECIFIED, member_discount_bps=-1),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"card_program.form"}
    details = await refused(
        create_program(c, program("bad id", prefix="x", member_discount_bps=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {
        "card_program.program_id",
        "card_program.number_format.prefix",
        "card_program.member_discount_bps",
    }
    await refused(
        c.programs.CreateCardProgram(
            P.CreateCardProgramRequest(request_id="p-2", card_program=program("VIP", "77")),
            metadata=MGR_S001,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    bank = program("BANK", "6200", partner_id="icbc", form=P.CARD_FORM_VIRTUAL)
    details = await refused(create_program(c, bank), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "PARTNER_NOT_FOUND"
    await c.partners.CreatePartner(
        partners_pb2.CreatePartnerRequest(
            request_id="partner-icbc",
            partner=partners_pb2.Partner(partner_id="icbc", display_name="ICBC"),
        ),
        metadata=HQ,
    )
    await create_program(c, bank)
    await create_program(
        c,
        program(
            "FAMILY",
            "5500",
            holding=P.CARD_HOLDING_GROUP,
            max_group_holders=3,
            allows_supplementary=False,
            max_supplementary_cards=0,
        ),
    )
    got = await c.programs.GetCardProgram(
        P.GetCardProgramRequest(program_id="GOLD"), metadata=OP_S002
    )
    assert got == gold
    await refused(
        c.programs.GetCardProgram(P.GetCardProgramRequest(program_id="NONE"), metadata=HQ),
        grpc.StatusCode.NOT_FOUND,
    )
    first = await c.programs.ListCardPrograms(P.ListCardProgramsRequest(page_size=2), metadata=HQ)
    assert [p.program_id for p in first.card_programs] == ["BANK", "FAMILY"]
    second = await c.programs.ListCardPrograms(
        P.ListCardProgramsRequest(page_size=2, page_token=first.next_page_token), metadata=HQ
    )
    assert [p.program_id for p in second.card_programs] == ["GOLD"]
    assert not second.next_page_token
    partner = await c.programs.ListCardPrograms(
        P.ListCardProgramsRequest(partner_id="icbc"), metadata=HQ
    )
    assert [p.program_id for p in partner.card_programs] == ["BANK"]


# -- issue and the lifecycle --------------------------------------------------------


async def test_issue_resolve_and_every_move(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start_cards(suite, database_url)
    gold = await create_program(c, program())
    await enroll(c, "M1")
    request = C.IssueCardRequest(request_id="issue-1", program_id="GOLD", member_id="M1")
    card = await c.cards.IssueCard(request, metadata=OP_S001)
    assert card.state == C.CARD_STATE_ACTIVE
    assert card.role == C.CARD_ROLE_PRINCIPAL
    assert card.form == P.CARD_FORM_PHYSICAL
    assert card.card_number.startswith("8816") and len(card.card_number) == 16
    assert card.issued_by.principal == "op-1" and card.issued_by.store_id == "S001"
    assert card.expire_time.ToDatetime().year == card.issue_time.ToDatetime().year + 2
    assert card.account_id.startswith("A")
    # Idempotent: the same request gives the same card and no second one.
    assert await c.cards.IssueCard(request, metadata=OP_S001) == card
    details = await refused(issue(c, "M1"), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "CARD_ALREADY_HELD"
    details = await refused(issue(c, "M1", program_id="NONE"), grpc.StatusCode.NOT_FOUND)
    assert details["reason"] == "PROGRAM_NOT_FOUND"
    details = await refused(issue(c, ""), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(details["violations"]) == {"member_id"}
    # A member members never heard of (members unreachable here): UNAVAILABLE.
    details = await refused(issue(c, "M404"), grpc.StatusCode.UNAVAILABLE)
    assert details["reason"] == "MEMBERS_UNAVAILABLE"

    async def resolve(**by: str) -> C.ResolveCardResponse:
        return await c.cards.ResolveCard(C.ResolveCardRequest(**by), metadata=CHECKOUT)

    spaced = " ".join(card.card_number[i : i + 4] for i in range(0, 16, 4))
    found = await resolve(card_number=spaced)
    assert (found.card, found.can_pay, found.resolved_by) == (
        card,
        True,
        C.RESOLVED_BY_CARD_NUMBER,
    )
    assert (found.member_discount_bps, found.stored_value) == (500, True)
    assert (await resolve(member_id="M1")).card.card_id == card.card_id
    await refused(resolve(card_number="8816000000000000"), grpc.StatusCode.NOT_FOUND)
    await refused(resolve(card_number="abc"), grpc.StatusCode.INVALID_ARGUMENT)
    await refused(
        resolve(card_number=card.card_number, member_id="M1"), grpc.StatusCode.INVALID_ARGUMENT
    )
    await refused(resolve(member_id="M2"), grpc.StatusCode.NOT_FOUND)

    async def move(name: str, metadata: Any, reason: str = "", request_id: str = "") -> C.Card:
        request_type = getattr(C, f"{name}Request")
        fields = {"request_id": request_id or rid(), "card_id": card.card_id}
        if reason or "reason" in request_type.DESCRIPTOR.fields_by_name:
            fields["reason"] = reason
        return await getattr(c.cards, name)(request_type(**fields), metadata=metadata)

    # Lost at another store, found again.
    lost = await move("ReportCardLost", OP_S002, "left on the bus", "lost-1")
    assert lost.state == C.CARD_STATE_LOST
    assert (lost.state_changed_by.principal, lost.state_changed_by.store_id) == ("op-2", "S002")
    assert lost.state_reason == "left on the bus"
    assert await move("ReportCardLost", OP_S002, "left on the bus", "lost-1") == lost
    found = await resolve(card_number=card.card_number)
    assert (found.can_pay, found.refusal_reason) == (False, "CARD_LOST")
    details = await refused(move("ReportCardLost", OP_S001), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "CARD_LOST"
    details = await refused(move("FreezeCard", MGR_S001, "x"), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "CARD_LOST"
    assert (await move("CancelCardLoss", CALL_CENTER)).state == C.CARD_STATE_ACTIVE
    details = await refused(move("CancelCardLoss", OP_S001), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "CARD_NOT_LOST"
    details = await refused(
        move("UnfreezeCard", MGR_S001, "x"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "CARD_NOT_FROZEN"

    # Freezing: managers of the issuing store, its region, HQ; with a reason.
    await refused(move("FreezeCard", OP_S001, "fraud"), grpc.StatusCode.PERMISSION_DENIED)
    details = await refused(
        move("FreezeCard", MGR_S002, "fraud"), grpc.StatusCode.PERMISSION_DENIED
    )
    assert details["reason"] == "OUT_OF_SCOPE"
    details = await refused(move("FreezeCard", MGR_S001, " "), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(details["violations"]) == {"reason"}
    # The region manager's scope needs the store's region: from members' event.
    await refused(move("FreezeCard", EAST, "fraud"), grpc.StatusCode.PERMISSION_DENIED)
    await publish_member_event(
        suite,
        "members.v1.store.opened",
        member_events.StoreOpened(store_id="S001", region_id="EAST"),
    )

    async def region_known() -> str | None:
        async with c.runtime.db.sessions() as session:
            return await projections.region_of_store(session, "S001")

    await eventually(region_known, lambda r: r == "EAST")
    await refused(move("FreezeCard", WEST, "fraud"), grpc.StatusCode.PERMISSION_DENIED)
    frozen = await move("FreezeCard", EAST, "fraud suspected")
    assert frozen.state == C.CARD_STATE_FROZEN
    assert (await resolve(member_id="M1")).refusal_reason == "CARD_FROZEN"
    for name, metadata in (("ReportCardLost", OP_S001), ("ReplaceCard", OP_S001)):
        details = await refused(move(name, metadata), grpc.StatusCode.FAILED_PRECONDITION)
        assert details["reason"] == "CARD_FROZEN"
    assert (await move("UnfreezeCard", MGR_S001, "cleared")).state == C.CARD_STATE_ACTIVE

    # Cancelled is final.
    cancelled = await move("CancelCard", HQ, "member asked")
    assert cancelled.state == C.CARD_STATE_CANCELLED
    for name, metadata in (
        ("ReportCardLost", OP_S001),
        ("CancelCardLoss", OP_S001),
        ("FreezeCard", HQ),
        ("UnfreezeCard", HQ),
        ("ReplaceCard", OP_S001),
        ("CancelCard", HQ),
    ):
        details = await refused(move(name, metadata, "x"), grpc.StatusCode.FAILED_PRECONDITION)
        assert details["reason"] == "CARD_CANCELLED"
    assert (await resolve(member_id="M1")).refusal_reason == "CARD_CANCELLED"
    # A new card of the program may now be issued; the old number stays taken.
    second = await issue(c, "M1")
    assert second.card_number != card.card_number
    assert (await resolve(member_id="M1")).card.card_id == second.card_id

    history = await c.cards.ListCardHistory(
        C.ListCardHistoryRequest(card_id=card.card_id), metadata=OP_S002
    )
    assert [(e.action, e.to_state, e.stamp.principal) for e in history.entries] == [
        (C.CARD_ACTION_ISSUE, C.CARD_STATE_ACTIVE, "op-1"),
        (C.CARD_ACTION_REPORT_LOST, C.CARD_STATE_LOST, "op-2"),
        (C.CARD_ACTION_CANCEL_LOSS, C.CARD_STATE_ACTIVE, "cc-1"),
        (C.CARD_ACTION_FREEZE, C.CARD_STATE_FROZEN, "rm-east"),
        (C.CARD_ACTION_UNFREEZE, C.CARD_STATE_ACTIVE, "mgr-1"),
        (C.CARD_ACTION_CANCEL, C.CARD_STATE_CANCELLED, "test-admin"),
    ]
    assert history.entries[3].reason == "fraud suspected"
    paged = await c.cards.ListCardHistory(
        C.ListCardHistoryRequest(card_id=card.card_id, page_size=4), metadata=HQ
    )
    rest = await c.cards.ListCardHistory(
        C.ListCardHistoryRequest(card_id=card.card_id, page_token=paged.next_page_token),
        metadata=HQ,
    )
    assert len(paged.entries) + len(rest.entries) == 6
    listed = await c.cards.ListCards(C.ListCardsRequest(member_id="M1"), metadata=HQ)
    assert [x.card_id for x in listed.cards] == [second.card_id, card.card_id]
    program_now = await c.programs.GetCardProgram(
        P.GetCardProgramRequest(program_id="GOLD"), metadata=HQ
    )
    assert program_now.numbers_issued == gold.numbers_issued + 2

    # Every move was published, without a card number or a reason's text.
    events = await outbox(c)
    assert [subject for subject, _ in events] == [
        "cards.v1.card.issued",
        "cards.v1.card.reported_lost",
        "cards.v1.card.loss_cancelled",
        "cards.v1.card.frozen",
        "cards.v1.card.unfrozen",
        "cards.v1.card.cancelled",
        "cards.v1.card.issued",
    ]
    for _, payload in events:
        assert card.card_number.encode() not in payload
        assert b"fraud" not in payload
    frozen_event = events_pb2.CardFrozen.FromString(events[3][1])
    assert (frozen_event.card_id, frozen_event.member_id, frozen_event.stamp.principal) == (
        card.card_id,
        "M1",
        "rm-east",
    )
    cancelled_event = events_pb2.CardCancelled.FromString(events[5][1])
    assert cancelled_event.cause == events_pb2.CANCEL_CAUSE_STAFF
    bus = Bus(suite.nats_url, "test-reader")
    await bus.connect()
    try:

        async def last_cancelled() -> Any:
            try:
                return await bus.js.get_last_msg("CARDS", "cards.v1.card.cancelled")
            except Exception:
                return None

        stored = await eventually(last_cancelled, lambda m: m is not None)
        assert events_pb2.CardCancelled.FromString(stored.data).card_id == card.card_id
        assert stored.headers["ce-type"] == "cornucopia.cards.v1.CardCancelled"
    finally:
        await bus.close()


async def test_replacement_moves_history_and_relations(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    c = await start_cards(suite, database_url)
    await create_program(c, program())
    for member in ("M1", "M2", "M3"):
        await enroll(c, member)
    principal = await issue(c, "M1")
    supplementary = await issue(
        c,
        "M2",
        principal_card_id=principal.card_id,
        spending_limit=money_pb2.Money(currency_code="cny", minor_units=50_000),
    )
    assert supplementary.role == C.CARD_ROLE_SUPPLEMENTARY
    assert supplementary.account_id == principal.account_id
    assert supplementary.spending_limit.currency_code == "CNY"
    linked = await issue(c, "M3")
    await c.cards.LinkCards(
        C.LinkCardsRequest(
            request_id=rid(), card_id=principal.card_id, other_card_id=linked.card_id
        ),
        metadata=OP_S001,
    )
    await c.cards.SetCardPin(
        C.SetCardPinRequest(request_id=rid(), card_id=principal.card_id, new_pin="284751"),
        metadata=OP_S001,
    )
    # A damaged (active) card is replaced; a lost one too.
    request = C.ReplaceCardRequest(request_id="rep-1", card_id=principal.card_id, reason="damaged")
    replaced = await c.cards.ReplaceCard(request, metadata=OP_S002)
    assert await c.cards.ReplaceCard(request, metadata=OP_S002) == replaced
    old, new = replaced.replaced_card, replaced.card
    assert old.state == C.CARD_STATE_REPLACED and old.replaced_by_card_id == new.card_id
    assert new.replaces_card_id == old.card_id
    assert new.card_number != old.card_number
    assert (new.member_id, new.account_id, new.role) == ("M1", old.account_id, old.role)
    assert new.expire_time == old.expire_time
    assert new.pin_set
    assert new.linked_card_id == linked.card_id

    async def get(card_id: str) -> C.Card:
        return await c.cards.GetCard(C.GetCardRequest(card_id=card_id), metadata=HQ)

    assert (await get(linked.card_id)).linked_card_id == new.card_id
    assert (await get(supplementary.card_id)).principal_card_id == new.card_id
    # The old number is dead for good.
    dead = await c.cards.ResolveCard(
        C.ResolveCardRequest(card_number=old.card_number), metadata=OP_S001
    )
    assert (dead.card.card_id, dead.can_pay, dead.refusal_reason) == (
        old.card_id,
        False,
        "CARD_REPLACED",
    )
    # The history moved with the card.
    history = await c.cards.ListCardHistory(
        C.ListCardHistoryRequest(card_id=new.card_id), metadata=HQ
    )
    assert [e.action for e in history.entries] == [
        C.CARD_ACTION_ISSUE,
        C.CARD_ACTION_LINK,
        C.CARD_ACTION_SET_PIN,
        C.CARD_ACTION_ISSUE,
        C.CARD_ACTION_REPLACE,
    ]
    lost = await c.cards.ReportCardLost(
        C.ReportCardLostRequest(request_id=rid(), card_id=new.card_id), metadata=OP_S001
    )
    third = await c.cards.ReplaceCard(
        C.ReplaceCardRequest(request_id=rid(), card_id=lost.card_id), metadata=OP_S001
    )
    assert third.card.state == C.CARD_STATE_ACTIVE
    subjects = [s for s, _ in await outbox(c)]
    assert subjects.count("cards.v1.card.replaced") == 2
    replaced_event = events_pb2.CardReplaced.FromString(
        next(p for s, p in await outbox(c) if s == "cards.v1.card.replaced")
    )
    assert replaced_event.new_card_id == new.card_id


async def test_supplementary_group_and_linked_cards(
    suite: Suite, database_url: DatabaseFactory
) -> None:
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
            allows_linking=False,
        ),
    )
    await create_program(
        c,
        program(
            "FAMILY",
            "5500",
            holding=P.CARD_HOLDING_GROUP,
            max_group_holders=2,
            allows_supplementary=False,
            max_supplementary_cards=0,
        ),
    )
    for member in ("M1", "M2", "M3", "M4"):
        await enroll(c, member)
    principal = await issue(c, "M1")
    for member in ("M2", "M3"):
        await issue(c, member, principal_card_id=principal.card_id)
    details = await refused(
        issue(c, "M4", principal_card_id=principal.card_id), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "SUPPLEMENTARY_LIMIT_REACHED"
    plain = await issue(c, "M4", program_id="PLAIN")
    details = await refused(
        issue(c, "M1", program_id="PLAIN", principal_card_id=plain.card_id),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "SUPPLEMENTARY_NOT_ALLOWED"
    details = await refused(
        issue(c, "M4", spending_limit=money_pb2.Money(currency_code="CNY", minor_units=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"spending_limit"}
    accounts = await c.cards.ListCards(
        C.ListCardsRequest(account_id=principal.account_id), metadata=HQ
    )
    assert len(accounts.cards) == 3

    group = await issue(c, "M1", program_id="FAMILY")
    assert group.role == C.CARD_ROLE_GROUP_HOLDER
    second = await issue(c, "M2", program_id="FAMILY", group_card_id=group.card_id)
    assert second.account_id == group.account_id and second.member_id == "M2"
    details = await refused(
        issue(c, "M3", program_id="FAMILY", group_card_id=group.card_id),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "GROUP_FULL"
    details = await refused(
        issue(c, "M3", program_id="GOLD", group_card_id=principal.card_id),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "NOT_A_GROUP_CARD"

    m4_gold = await issue(c, "M4")
    link = C.LinkCardsRequest(
        request_id="link-1", card_id=principal.card_id, other_card_id=m4_gold.card_id
    )
    linked = await c.cards.LinkCards(link, metadata=OP_S002)
    assert linked.card.linked_card_id == m4_gold.card_id
    assert linked.other_card.linked_card_id == principal.card_id
    assert await c.cards.LinkCards(link, metadata=OP_S002) == linked
    details = await refused(
        c.cards.LinkCards(
            C.LinkCardsRequest(
                request_id=rid(), card_id=principal.card_id, other_card_id=plain.card_id
            ),
            metadata=OP_S001,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "LINKING_NOT_ALLOWED"
    unlinked = await c.cards.UnlinkCard(
        C.UnlinkCardRequest(request_id=rid(), card_id=m4_gold.card_id), metadata=OP_S001
    )
    assert not unlinked.linked_card_id
    details = await refused(
        c.cards.UnlinkCard(
            C.UnlinkCardRequest(request_id=rid(), card_id=principal.card_id), metadata=OP_S001
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "CARD_NOT_LINKED"


async def test_concurrent_issues_never_share_a_number(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    c = await start_cards(suite, database_url)
    # A range of a hundred numbers: five digits of prefix, two, a check digit.
    tiny = await create_program(
        c,
        program(
            "TINY",
            "99999",
            8,
            allows_supplementary=False,
            max_supplementary_cards=0,
        ),
    )
    assert tiny.number_capacity == 100
    members = [f"M{i:03d}" for i in range(110)]
    async with c.runtime.db.transaction() as session:
        for member in members:
            await projections.note_member(
                session, member, projections.MemberStatus.ACTIVE, utcnow()
            )
    results = await asyncio.gather(
        *(issue(c, m, program_id="TINY") for m in members), return_exceptions=True
    )
    issued = [r for r in results if isinstance(r, C.Card)]
    failures = [r for r in results if not isinstance(r, C.Card)]
    assert len(issued) == 100
    numbers = {card.card_number for card in issued}
    assert len(numbers) == 100
    assert all(n.startswith("99999") and len(n) == 8 for n in numbers)
    assert len(failures) == 10
    for failure in failures:
        assert isinstance(failure, grpc.aio.AioRpcError)
        assert failure.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rpc_details(failure)["reason"] == "NUMBER_RANGE_EXHAUSTED"
    async with c.runtime.db.sessions() as session:
        stored = (
            await session.execute(sa.select(sa.func.count()).select_from(cards_table))
        ).scalar_one()
    assert stored == 100


async def test_concurrent_retries_of_one_issue_give_one_card(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    c = await start_cards(suite, database_url)
    await create_program(c, program())
    await enroll(c, "M1")
    request = C.IssueCardRequest(request_id="same", program_id="GOLD", member_id="M1")
    results = await asyncio.gather(
        *(c.cards.IssueCard(request, metadata=OP_S001) for _ in range(8))
    )
    assert len({r.card_id for r in results}) == 1
    listed = await c.cards.ListCards(C.ListCardsRequest(member_id="M1"), metadata=HQ)
    assert len(listed.cards) == 1


async def test_payment_pin(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start_cards(suite, database_url)
    await create_program(c, program())
    await enroll(c, "M1")
    card = await issue(c, "M1")

    async def verify(pin: str) -> C.VerifyCardPinResponse:
        return await c.cards.VerifyCardPin(
            C.VerifyCardPinRequest(card_id=card.card_id, pin=pin), metadata=CHECKOUT
        )

    details = await refused(verify("284751"), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "PIN_NOT_SET"
    details = await refused(
        c.cards.SetCardPin(
            C.SetCardPinRequest(request_id=rid(), card_id=card.card_id, new_pin="123456"),
            metadata=OP_S001,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"new_pin"}
    first = C.SetCardPinRequest(request_id="pin-1", card_id=card.card_id, new_pin="284751")
    assert (await c.cards.SetCardPin(first, metadata=OP_S001)).pin_set
    assert await c.cards.SetCardPin(first, metadata=OP_S001)
    assert (await verify("284751")).verified
    # Changing it needs the current PIN, unless a manager resets it.
    details = await refused(
        c.cards.SetCardPin(
            C.SetCardPinRequest(request_id=rid(), card_id=card.card_id, new_pin="395862"),
            metadata=OP_S001,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"current_pin"}
    wrong = C.SetCardPinRequest(
        request_id="pin-wrong", card_id=card.card_id, new_pin="395862", current_pin="000001"
    )
    details = await refused(
        c.cards.SetCardPin(wrong, metadata=OP_S001), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (details["reason"], details["metadata"]["tries_left"]) == ("PIN_INCORRECT", "2")
    # A retry of the same request gets the same answer, not another try.
    details = await refused(
        c.cards.SetCardPin(wrong, metadata=OP_S001), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["metadata"]["tries_left"] == "2"
    details = await refused(verify("000002"), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["metadata"]["tries_left"] == "1"
    details = await refused(verify("000003"), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "PIN_LOCKED"
    # Locked: even the right PIN is refused for now.
    details = await refused(verify("284751"), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "PIN_LOCKED"
    reset = await c.cards.SetCardPin(
        C.SetCardPinRequest(request_id=rid(), card_id=card.card_id, new_pin="395862"),
        metadata=MGR_S002,
    )
    assert reset.pin_set
    assert (await verify("395862")).verified
    async with c.runtime.db.sessions() as session:
        row = (await session.execute(sa.select(cards_table.c.pin_hash))).scalar_one()
    assert "395862" not in row and row.startswith("scrypt$")


async def test_cards_expire_at_the_end_of_validity(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    c = await start_cards(suite, database_url)
    await create_program(c, program(validity_months=1))
    await create_program(c, program("FOREVER", "7700", validity_months=0))
    for member in ("M1", "M2"):
        await enroll(c, member)
    card = await issue(c, "M1")
    lost = await issue(c, "M2")
    await c.cards.ReportCardLost(
        C.ReportCardLostRequest(request_id=rid(), card_id=lost.card_id), metadata=OP_S001
    )
    forever = await issue(c, "M1", program_id="FOREVER")
    assert not forever.HasField("expire_time")
    later = card.expire_time.ToDatetime(dt.UTC) + dt.timedelta(seconds=1)
    assert (
        await expire_due(c.runtime.db, card.expire_time.ToDatetime(dt.UTC) - dt.timedelta(days=1))
        == 0
    )
    assert await expire_due(c.runtime.db, later) == 2
    assert await expire_due(c.runtime.db, later) == 0
    for card_id in (card.card_id, lost.card_id):
        got = await c.cards.GetCard(C.GetCardRequest(card_id=card_id), metadata=HQ)
        assert got.state == C.CARD_STATE_EXPIRED
    got = await c.cards.GetCard(C.GetCardRequest(card_id=forever.card_id), metadata=HQ)
    assert got.state == C.CARD_STATE_ACTIVE
    expired = [p for s, p in await outbox(c) if s == "cards.v1.card.expired"]
    assert {events_pb2.CardExpired.FromString(p).card_id for p in expired} == {
        card.card_id,
        lost.card_id,
    }


async def test_members_lifecycle_events(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start_cards(suite, database_url)
    await create_program(c, program())
    await create_program(c, program("SILVER", "7700"))
    for member in ("M1", "M2", "M3"):
        await enroll(c, member)
    survivor_card = await issue(c, "M1")
    duplicate_card = await issue(c, "M2", program_id="SILVER")
    await issue(c, "M3")

    # Archived: no new card.
    await publish_member_event(
        suite, "members.v1.member.archived", member_events.MemberArchived(member_id="M3")
    )
    await eventually(
        lambda: known_member(c, "M3"),
        lambda m: m is not None and m.status == projections.MemberStatus.ARCHIVED,
    )
    details = await refused(
        issue(c, "M3", program_id="SILVER"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "MEMBER_NOT_ACTIVE"

    # Merged: the duplicate's cards follow the survivor.
    await publish_member_event(
        suite,
        "members.v1.member.merged",
        member_events.MemberMerged(survivor_member_id="M1", duplicate_member_id="M2"),
    )

    async def holder() -> str:
        got = await c.cards.GetCard(C.GetCardRequest(card_id=duplicate_card.card_id), metadata=HQ)
        return got.member_id

    await eventually(holder, lambda m: m == "M1")
    details = await refused(
        issue(c, "M2", program_id="SILVER"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (details["reason"], details["metadata"]["survivor_member_id"]) == ("MEMBER_MERGED", "M1")
    by_old_id = await c.cards.ResolveCard(C.ResolveCardRequest(member_id="M2"), metadata=OP_S001)
    assert by_old_id.card.member_id == "M1"
    history = await c.cards.ListCardHistory(
        C.ListCardHistoryRequest(card_id=duplicate_card.card_id), metadata=HQ
    )
    assert history.entries[-1].action == C.CARD_ACTION_CHANGE_HOLDER

    # Erased: every live card is cancelled for good.
    await publish_member_event(
        suite, "members.v1.member.erased", member_events.MemberErased(member_id="M1")
    )

    async def state(card_id: str) -> int:
        got = await c.cards.GetCard(C.GetCardRequest(card_id=card_id), metadata=HQ)
        return got.state

    for card_id in (survivor_card.card_id, duplicate_card.card_id):
        await eventually(lambda cid=card_id: state(cid), lambda s: s == C.CARD_STATE_CANCELLED)
    cancelled = [
        events_pb2.CardCancelled.FromString(p)
        for s, p in await outbox(c)
        if s == "cards.v1.card.cancelled"
    ]
    assert {e.card_id for e in cancelled} == {survivor_card.card_id, duplicate_card.card_id}
    assert {e.cause for e in cancelled} == {events_pb2.CANCEL_CAUSE_MEMBER_ERASED}
