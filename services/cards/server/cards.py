"""The cards' gRPC edge: authorisation, proto <-> domain, idempotency. The
rules are in domain/cards.py; the writes in lifecycle.py."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from google.protobuf import struct_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, ScopeLevel, current_principal
from chassis.db import Database, utcnow
from chassis.direct import as_session
from chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from chassis.grpcserver import Context
from chassis.idempotency import check_request_id, run_idempotent
from chassis.paging import (
    decode_token,
    encode_token,
    newest_first_after,
    newest_first_token,
    page_size,
)
from chassis.service import ServiceContext
from cornucopia.cards.v1 import cards_pb2, cards_pb2_grpc
from cornucopia.common.v1 import money_pb2
from services.cards import lifecycle
from services.cards.convert import card_to_proto, history_to_proto
from services.cards.convert_stored_value import money
from services.cards.domain import cards as domain
from services.cards.domain import pins
from services.cards.domain.cards import Action, CardState, ProgramFacts
from services.cards.domain.cards import Role as CardRole
from services.cards.domain.programs import Holding, normalise_card_number
from services.cards.members_client import MembersClient
from services.cards.payment_pin import check_payment_pin, pin_refusal, try_pin
from services.cards.server.programs import program_not_found
from services.cards.server.stored_value import available_money
from services.cards.store import cards as store
from services.cards.store import programs as program_store
from services.cards.store import projections
from services.cards.store import stored_value as sv_store
from services.cards.store.cards import CardRecord, NewCard, Stamp
from services.cards.store.programs import ProgramRecord
from services.cards.store.projections import MemberStatus

# A card works in every store: any staff member may serve its holder.
ANY_STORE_ROLES = tuple(STAFF_ROLES)
READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
# Freezing, unfreezing and cancelling are management decisions.
MANAGING_ROLES = (Role.HQ_ADMIN, Role.REGION_MANAGER, Role.STORE_MANAGER)


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def _card_not_found(card_id: str) -> NotFound:
    return NotFound("no card with this id", reason="CARD_NOT_FOUND", metadata={"card_id": card_id})


def program_facts(record: ProgramRecord) -> ProgramFacts:
    p = record.program
    return ProgramFacts(
        program_id=p.program_id,
        holding=p.holding,
        stored_value=p.stored_value,
        allows_supplementary=p.allows_supplementary,
        max_supplementary_cards=p.max_supplementary_cards,
        max_group_holders=p.max_group_holders,
        allows_linking=p.allows_linking,
    )


def _stamp(principal: Principal, now: dt.datetime) -> Stamp:
    return Stamp(principal.subject, principal.store_id, now)


def _member_refusal(known: projections.KnownMember) -> FailedPrecondition | None:
    if known.status == MemberStatus.ACTIVE:
        return None
    if known.status == MemberStatus.MERGED:
        return FailedPrecondition(
            "this member was merged into another; issue to the survivor",
            reason="MEMBER_MERGED",
            metadata={"member_id": known.member_id, "survivor_member_id": known.merged_into},
        )
    return FailedPrecondition(
        f"this member is {known.status.value}",
        reason="MEMBER_NOT_ACTIVE",
        metadata={"member_id": known.member_id, "state": known.status.value},
    )


async def get_program(
    session: AsyncSession, program_id: str, *, for_update: bool = False
) -> ProgramRecord:
    record = await program_store.get_program(session, program_id, for_update=for_update)
    if record is None:
        raise program_not_found(program_id)
    return record


async def get_card(session: AsyncSession, card_id: str, *, for_update: bool = False) -> CardRecord:
    record = await store.get_card(session, card_id, for_update=for_update)
    if record is None:
        raise _card_not_found(card_id)
    return record


async def issue_card(
    session: AsyncSession,
    *,
    program_id: str,
    member_id: str,
    stamp: Stamp,
    principal_card_id: str = "",
    group_card_id: str = "",
    limit: domain.SpendingLimit | None = None,
    partner_reference: str | None = None,
    card_number: str = "",
) -> CardRecord:
    """Issues a card in the caller's transaction: a supplementary card on
    ``principal_card_id``, a holder joining ``group_card_id``, or a card of
    its own, with the program's next number or (a partner's card) the one
    given. Used by IssueCard and by the partners' IssueCobrandCard and
    LinkCobrandCard."""
    now = stamp.at
    program = await get_program(session, program_id, for_update=True)
    known = await projections.get_member(session, member_id)
    if known is not None and (refusal := _member_refusal(known)) is not None:
        raise refusal
    facts = program_facts(program)
    if principal_card_id:
        main = await get_card(session, principal_card_id, for_update=True)
        main_program = await get_program(session, main.program_id)
        domain.check_supplementary(
            main.facts,
            program_facts(main_program),
            facts,
            live_supplementaries=await store.count_live(session, principal_card_id=main.card_id),
        )
        role, account_id = CardRole.SUPPLEMENTARY, main.account_id
    elif group_card_id:
        group = await get_card(session, group_card_id, for_update=True)
        group_program = await get_program(session, group.program_id)
        domain.check_group_join(
            group.facts,
            program_facts(group_program),
            program.program.program_id,
            live_holders=await store.count_live(session, account_id=group.account_id),
            already_holder=bool(
                await store.count_live(session, account_id=group.account_id, member_id=member_id)
            ),
        )
        role, account_id = CardRole.GROUP_HOLDER, group.account_id
    else:
        domain.check_new_holder(
            facts,
            await store.count_live(
                session,
                program_id=program.program.program_id,
                member_id=member_id,
                exclude_roles=(CardRole.SUPPLEMENTARY,),
            ),
        )
        role = (
            CardRole.GROUP_HOLDER
            if program.program.holding == Holding.GROUP
            else CardRole.PRINCIPAL
        )
        account_id = domain.new_account_id()
    card_id = domain.new_card_id()
    return await lifecycle.issue(
        session,
        program,
        NewCard(
            card_id=card_id,
            card_number=card_number,
            program_id=program.program.program_id,
            member_id=member_id,
            account_id=account_id,
            role=role,
            lineage_id=card_id,
            expires_at=domain.expiry(now, program.program.validity_months),
            principal_card_id=principal_card_id,
            spending_limit=limit,
            partner_id=program.program.partner_id,
            partner_reference=partner_reference,
        ),
        stamp,
    )


async def learn_member(db: Database, members: MembersClient, member_id: str) -> None:
    """Makes sure the member is in the projection: an issue right after an
    enrollment may come before the enrollment's event."""
    async with db.sessions() as session:
        if await projections.get_member(session, member_id) is not None:
            return
    facts = await members.member_facts(member_id)
    if facts is None:
        raise NotFound(
            "no member with this id",
            reason="MEMBER_NOT_FOUND",
            metadata={"member_id": member_id},
        )
    async with db.transaction() as session:
        await projections.note_member(
            session, facts.member_id, facts.status, facts.as_of, merged_into=facts.merged_into
        )


async def link_cards(session: AsyncSession, first: str, second: str, stamp: Stamp) -> None:
    """Links two members' cards when both programs allow it."""
    # Locked in id order so that two opposite links cannot deadlock.
    locked = {cid: await get_card(session, cid, for_update=True) for cid in sorted({first, second})}
    card, other = locked[first], locked[second]
    domain.check_link(
        card.facts,
        program_facts(await get_program(session, card.program_id)),
        other.facts,
        program_facts(await get_program(session, other.program_id)),
    )
    for this, that in ((card, other), (other, card)):
        await store.update_card(session, this.card_id, linked_card_id=that.card_id)
        await store.record_history(session, this, Action.LINK, stamp, related_card_id=that.card_id)


class CardsServicer(cards_pb2_grpc.CardsServiceServicer):
    def __init__(self, ctx: ServiceContext, members: MembersClient) -> None:
        self.db = ctx.db
        self.members = members

    # --- helpers ---------------------------------------------------------

    async def _to_proto(self, session: AsyncSession, card: CardRecord) -> cards_pb2.Card:
        program = await program_store.get_program(session, card.program_id)
        return card_to_proto(card, program.program if program else None)

    async def _read(self, card_id: str) -> cards_pb2.Card:
        async with self.db.sessions() as session:
            return await self._to_proto(session, await get_card(session, card_id))

    @staticmethod
    async def _require_scope(session: AsyncSession, principal: Principal, card: CardRecord) -> None:
        """Management acts on the cards of the caller's own store (the store
        that issued the card), region or, for HQ, everywhere."""
        region = None
        if principal.scope.level == ScopeLevel.REGION and card.issued_store_id:
            region = await projections.region_of_store(session, card.issued_store_id)
        principal.require_store(card.issued_store_id, region)

    # --- issue and read --------------------------------------------------

    async def IssueCard(
        self, request: cards_pb2.IssueCardRequest, context: Context
    ) -> cards_pb2.Card:
        principal = current_principal()
        principal.require_role(*ANY_STORE_ROLES)
        check_request_id(request.request_id)
        violations = [
            FieldViolation(name, "required")
            for name in ("program_id", "member_id")
            if not getattr(request, name).strip()
        ]
        if request.principal_card_id and request.group_card_id:
            violations.append(
                FieldViolation("group_card_id", "a card is supplementary or a group card, not both")
            )
        if violations:
            raise InvalidArgument(violations)
        limit = None
        if request.HasField("spending_limit"):
            limit = domain.SpendingLimit(
                request.spending_limit.currency_code.strip().upper(),
                request.spending_limit.minor_units,
            )
        domain.check_spending_limit(limit, supplementary=bool(request.principal_card_id))
        member_id = request.member_id.strip()
        await learn_member(self.db, self.members, member_id)
        now = utcnow()
        stamp = _stamp(principal, now)

        async def issue(session: AsyncSession) -> cards_pb2.Card:
            created = await issue_card(
                session,
                program_id=request.program_id.strip(),
                member_id=member_id,
                stamp=stamp,
                principal_card_id=request.principal_card_id.strip(),
                group_card_id=request.group_card_id.strip(),
                limit=limit,
            )
            return cards_pb2.Card(card_id=created.card_id)

        issued = await run_idempotent(
            self.db,
            method="cards.IssueCard",
            request_id=request.request_id,
            request=request,
            response_type=cards_pb2.Card,
            work=issue,
        )
        return await self._read(issued.card_id)

    async def GetCard(self, request: cards_pb2.GetCardRequest, context: Context) -> cards_pb2.Card:
        current_principal().require_role(*READING_ROLES)
        return await self._read(_required(request.card_id, "card_id"))

    async def ListCards(
        self, request: cards_pb2.ListCardsRequest, context: Context
    ) -> cards_pb2.ListCardsResponse:
        current_principal().require_role(*READING_ROLES)
        if bool(request.member_id.strip()) == bool(request.account_id.strip()):
            raise InvalidArgument(
                [FieldViolation("member_id", "give a member_id or an account_id")]
            )
        size = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            member_id = request.member_id.strip()
            if member_id:
                member_id = await projections.survivor_of(session, member_id)
            records = await store.cards_of(
                session,
                member_id=member_id,
                account_id=request.account_id.strip(),
                after=after,
                limit=size + 1,
            )
            response = cards_pb2.ListCardsResponse(
                cards=[await self._to_proto(session, r) for r in records[:size]]
            )
        if len(records) > size:
            last = records[size - 1]
            response.next_page_token = newest_first_token(last.issued_at, last.card_id)
        return response

    async def ResolveCard(
        self, request: cards_pb2.ResolveCardRequest, context: Context
    ) -> cards_pb2.ResolveCardResponse:
        current_principal().require_role(*READING_ROLES)
        given = [f for f in ("card_number", "mobile", "member_id") if getattr(request, f).strip()]
        if len(given) != 1:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "card_number", "give exactly one of card_number, mobile, member_id"
                    )
                ]
            )
        by = given[0]
        member_id = ""
        if by == "card_number":
            number = normalise_card_number(request.card_number)
            if number is None:
                raise InvalidArgument([FieldViolation("card_number", "not a card number")])
        elif by == "mobile":
            member_id = await self.members.member_id_by_mobile(request.mobile.strip())
        else:
            member_id = request.member_id.strip()
        # A till's every checkout resolves a card by its number: two reads
        # of the driver's (chassis.direct), without a session around them.
        reads = self.db.direct_reads() if by == "card_number" else self.db.sessions()
        async with reads as session:
            # What the card has, for a till's receipt without GetBalance.
            available: money_pb2.Money | None
            if by == "card_number":
                found = await sv_store.card_by_number_with_account(session, number or "")
                if found is None:
                    raise NotFound("no card with this number", reason="CARD_NOT_FOUND")
                card, account = found
                available = (
                    None if account is None else money(account.currency, account.balances.available)
                )
            else:
                card = await self._members_card(as_session(session), member_id)
                available = await available_money(as_session(session), card.account_id)
            # Its settings never change: as kept for a while.
            program = await program_store.program_settings(session, card.program_id)
            if program is None:
                raise program_not_found(card.program_id)
            refusal = domain.payment_refusal(card.state, card.expires_at, utcnow())
            return cards_pb2.ResolveCardResponse(
                card=card_to_proto(card, program.program),
                resolved_by={
                    "card_number": cards_pb2.RESOLVED_BY_CARD_NUMBER,
                    "mobile": cards_pb2.RESOLVED_BY_MOBILE,
                    "member_id": cards_pb2.RESOLVED_BY_MEMBER_ID,
                }[by],
                can_pay=not refusal,
                refusal_reason=refusal,
                member_discount_bps=program.program.member_discount_bps,
                stored_value=program.program.stored_value,
                stored_value_available=available,
            )

    @staticmethod
    async def _members_card(session: AsyncSession, member_id: str) -> CardRecord:
        """The card a member's mobile or id stands for: their newest active
        card, else their newest card not replaced (so that a till sees it
        is lost or frozen rather than "no card")."""
        member_id = await projections.survivor_of(session, member_id)
        held = await store.cards_of(session, member_id=member_id, limit=100)
        for card in held:
            if card.state == CardState.ACTIVE:
                return card
        for card in held:
            if card.state != CardState.REPLACED:
                return card
        raise NotFound(
            "this member holds no card",
            reason="MEMBER_HAS_NO_CARD",
            metadata={"member_id": member_id},
        )

    # --- the lifecycle ---------------------------------------------------

    async def _move(
        self,
        request: Any,
        method: str,
        action: Action,
        *,
        managed: bool,
        reason_required: bool,
    ) -> cards_pb2.Card:
        principal = current_principal()
        principal.require_role(*(MANAGING_ROLES if managed else ANY_STORE_ROLES))
        check_request_id(request.request_id)
        card_id = _required(request.card_id, "card_id")
        reason = domain.check_reason(request.reason, required=reason_required)
        stamp = _stamp(principal, utcnow())

        async def work(session: AsyncSession) -> cards_pb2.Card:
            card = await get_card(session, card_id, for_update=True)
            if managed:
                await self._require_scope(session, principal, card)
            if action == Action.CANCEL:
                await lifecycle.cancel(session, card, stamp, reason)
            else:
                await lifecycle.move(session, card, action, stamp, reason)
            return cards_pb2.Card(card_id=card.card_id)

        done = await run_idempotent(
            self.db,
            method=f"cards.{method}",
            request_id=request.request_id,
            request=request,
            response_type=cards_pb2.Card,
            work=work,
        )
        return await self._read(done.card_id)

    async def ReportCardLost(
        self, request: cards_pb2.ReportCardLostRequest, context: Context
    ) -> cards_pb2.Card:
        return await self._move(
            request, "ReportCardLost", Action.REPORT_LOST, managed=False, reason_required=False
        )

    async def CancelCardLoss(
        self, request: cards_pb2.CancelCardLossRequest, context: Context
    ) -> cards_pb2.Card:
        return await self._move(
            request, "CancelCardLoss", Action.CANCEL_LOSS, managed=False, reason_required=False
        )

    async def FreezeCard(
        self, request: cards_pb2.FreezeCardRequest, context: Context
    ) -> cards_pb2.Card:
        return await self._move(
            request, "FreezeCard", Action.FREEZE, managed=True, reason_required=True
        )

    async def UnfreezeCard(
        self, request: cards_pb2.UnfreezeCardRequest, context: Context
    ) -> cards_pb2.Card:
        return await self._move(
            request, "UnfreezeCard", Action.UNFREEZE, managed=True, reason_required=True
        )

    async def CancelCard(
        self, request: cards_pb2.CancelCardRequest, context: Context
    ) -> cards_pb2.Card:
        return await self._move(
            request, "CancelCard", Action.CANCEL, managed=True, reason_required=True
        )

    async def ReplaceCard(
        self, request: cards_pb2.ReplaceCardRequest, context: Context
    ) -> cards_pb2.ReplaceCardResponse:
        principal = current_principal()
        principal.require_role(*ANY_STORE_ROLES)
        check_request_id(request.request_id)
        card_id = _required(request.card_id, "card_id")
        reason = domain.check_reason(request.reason, required=False)
        stamp = _stamp(principal, utcnow())

        async def work(session: AsyncSession) -> cards_pb2.ReplaceCardResponse:
            old = await get_card(session, card_id, for_update=True)
            program = await get_program(session, old.program_id)
            new = await lifecycle.replace(session, old, program, stamp, reason)
            return cards_pb2.ReplaceCardResponse(
                replaced_card=cards_pb2.Card(card_id=old.card_id),
                card=cards_pb2.Card(card_id=new.card_id),
            )

        done = await run_idempotent(
            self.db,
            method="cards.ReplaceCard",
            request_id=request.request_id,
            request=request,
            response_type=cards_pb2.ReplaceCardResponse,
            work=work,
        )
        return cards_pb2.ReplaceCardResponse(
            replaced_card=await self._read(done.replaced_card.card_id),
            card=await self._read(done.card.card_id),
        )

    # --- links -----------------------------------------------------------

    async def LinkCards(
        self, request: cards_pb2.LinkCardsRequest, context: Context
    ) -> cards_pb2.LinkCardsResponse:
        principal = current_principal()
        principal.require_role(*ANY_STORE_ROLES)
        check_request_id(request.request_id)
        first = _required(request.card_id, "card_id")
        second = _required(request.other_card_id, "other_card_id")
        stamp = _stamp(principal, utcnow())

        async def work(session: AsyncSession) -> cards_pb2.LinkCardsResponse:
            await link_cards(session, first, second, stamp)
            return cards_pb2.LinkCardsResponse(
                card=cards_pb2.Card(card_id=first), other_card=cards_pb2.Card(card_id=second)
            )

        done = await run_idempotent(
            self.db,
            method="cards.LinkCards",
            request_id=request.request_id,
            request=request,
            response_type=cards_pb2.LinkCardsResponse,
            work=work,
        )
        return cards_pb2.LinkCardsResponse(
            card=await self._read(done.card.card_id),
            other_card=await self._read(done.other_card.card_id),
        )

    async def UnlinkCard(
        self, request: cards_pb2.UnlinkCardRequest, context: Context
    ) -> cards_pb2.Card:
        principal = current_principal()
        principal.require_role(*ANY_STORE_ROLES)
        check_request_id(request.request_id)
        card_id = _required(request.card_id, "card_id")
        stamp = _stamp(principal, utcnow())

        async def work(session: AsyncSession) -> cards_pb2.Card:
            card = await get_card(session, card_id, for_update=True)
            if not card.linked_card_id:
                raise FailedPrecondition(
                    "this card is not linked",
                    reason="CARD_NOT_LINKED",
                    metadata={"card_id": card_id},
                )
            other = await get_card(session, card.linked_card_id, for_update=True)
            for this, that in ((card, other), (other, card)):
                await store.update_card(session, this.card_id, linked_card_id="")
                await store.record_history(
                    session, this, Action.UNLINK, stamp, related_card_id=that.card_id
                )
            return cards_pb2.Card(card_id=card_id)

        done = await run_idempotent(
            self.db,
            method="cards.UnlinkCard",
            request_id=request.request_id,
            request=request,
            response_type=cards_pb2.Card,
            work=work,
        )
        return await self._read(done.card_id)

    # --- history ---------------------------------------------------------

    async def ListCardHistory(
        self, request: cards_pb2.ListCardHistoryRequest, context: Context
    ) -> cards_pb2.ListCardHistoryResponse:
        current_principal().require_role(*READING_ROLES)
        card_id = _required(request.card_id, "card_id")
        size = page_size(request.page_size)
        key = decode_token(request.page_token) or {}
        try:
            after = int(key.get("seq", 0))
        except (TypeError, ValueError):
            raise InvalidArgument(
                [FieldViolation("page_token", "not a token this service issued")]
            ) from None
        async with self.db.sessions() as session:
            card = await get_card(session, card_id)
            entries = await store.history(session, card.lineage_id, after_seq=after, limit=size + 1)
        response = cards_pb2.ListCardHistoryResponse(
            entries=[history_to_proto(e) for e in entries[:size]]
        )
        if len(entries) > size:
            response.next_page_token = encode_token({"seq": entries[size - 1].seq})
        return response

    # --- the payment PIN -------------------------------------------------

    async def SetCardPin(
        self, request: cards_pb2.SetCardPinRequest, context: Context
    ) -> cards_pb2.Card:
        principal = current_principal()
        principal.require_role(*ANY_STORE_ROLES)
        check_request_id(request.request_id)
        card_id = _required(request.card_id, "card_id")
        pins.check_new_pin(request.new_pin)
        may_reset = principal.has_any(MANAGING_ROLES)
        now = utcnow()
        new_hash = await asyncio.to_thread(pins.hash_secret, request.new_pin)
        # The stored fingerprint must not be a cheap way back to the PINs.
        fingerprint = cards_pb2.SetCardPinRequest(
            request_id=request.request_id,
            card_id=card_id,
            new_pin=await asyncio.to_thread(
                pins.request_stand_in, request.new_pin, card_id, request.request_id
            ),
            current_pin=await asyncio.to_thread(
                pins.request_stand_in, request.current_pin, card_id, request.request_id
            ),
        )
        stamp = _stamp(principal, now)

        async def work(session: AsyncSession) -> struct_pb2.Struct:
            card = await get_card(session, card_id, for_update=True)
            domain.require_active(card.state, card.card_id, Action.SET_PIN)
            outcome: dict[str, Any] = {}
            if card.pin_hash is not None:
                if request.current_pin:
                    outcome = await try_pin(session, card, request.current_pin, now)
                elif not may_reset:
                    raise InvalidArgument(
                        [FieldViolation("current_pin", "required: the card has a PIN")]
                    )
            if not outcome:
                await store.update_card(
                    session,
                    card.card_id,
                    pin_hash=new_hash,
                    pin_wrong_tries=0,
                    pin_locked_until=None,
                )
                reason = "reset by a manager" if card.pin_hash and not request.current_pin else ""
                await store.record_history(session, card, Action.SET_PIN, stamp, reason=reason)
            # A refusal is an answer too: a retry under this request_id gets
            # it again instead of another try at the PIN.
            result = struct_pb2.Struct()
            result.update(outcome)
            return result

        outcome = await run_idempotent(
            self.db,
            method="cards.SetCardPin",
            request_id=request.request_id,
            request=fingerprint,
            response_type=struct_pb2.Struct,
            work=work,
        )
        if "refused" in outcome:
            raise pin_refusal(dict(outcome), card_id)
        return await self._read(card_id)

    async def VerifyCardPin(
        self, request: cards_pb2.VerifyCardPinRequest, context: Context
    ) -> cards_pb2.VerifyCardPinResponse:
        current_principal().require_role(*READING_ROLES)
        card_id = _required(request.card_id, "card_id")
        if not request.pin:
            raise InvalidArgument([FieldViolation("pin", "required")])
        await check_payment_pin(self.db, card_id, request.pin, utcnow(), required=True)
        return cards_pb2.VerifyCardPinResponse(verified=True)
