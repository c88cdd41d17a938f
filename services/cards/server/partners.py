"""Co-brand partners: the registry HQ keeps (PartnersService) and the
service partners call over mutual TLS (PartnerCardsService). A partner is
known by its client certificate; it sees only the cards of its own
programs."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, current_principal
from chassis.db import Database, utcnow
from chassis.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from chassis.grpcserver import Context
from chassis.idempotency import check_request_id, request_fingerprint, run_idempotent
from chassis.mtls import (
    ClientCertificate,
    certificate_info,
    current_partner,
    issued_by_any,
    principal_for_partner,
)
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.cards.v1 import partners_pb2 as pb
from cornucopia.cards.v1 import partners_pb2_grpc
from services.cards import ledger
from services.cards.convert import ACTIONS_PROTO, STATES_PROTO, audit_stamp, timestamp
from services.cards.convert_stored_value import money
from services.cards.domain import cards as card_rules
from services.cards.domain import stored_value as rules
from services.cards.domain.programs import fits, normalise_card_number
from services.cards.domain.stored_value import Channel
from services.cards.members_client import MembersClient
from services.cards.server.cards import get_card, get_program, issue_card, learn_member
from services.cards.store import cards as card_store
from services.cards.store import partners as store
from services.cards.store import stored_value as sv_store
from services.cards.store import stored_value_rules as rule_store
from services.cards.store.cards import CardRecord, Stamp
from services.cards.store.partners import PartnerRecord, PartnerState

PARTNER_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MAX_REFERENCE_LENGTH = 64
# How often an open WatchCardChanges stream looks for new changes.
WATCH_POLL_SECONDS = 1.0
MAX_CHANGES_PAGE = 500


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def partner_not_found(partner_id: str) -> NotFound:
    return NotFound(
        "no partner with this id", reason="PARTNER_NOT_FOUND", metadata={"partner_id": partner_id}
    )


def partner_to_proto(record: PartnerRecord) -> pb.Partner:
    return pb.Partner(
        partner_id=record.partner_id,
        display_name=record.display_name,
        state=(
            pb.PARTNER_STATE_ACTIVE
            if record.state == PartnerState.ACTIVE
            else pb.PARTNER_STATE_SUSPENDED
        ),
        certificates=[
            pb.PartnerCertificate(
                sha256_fingerprint=c.sha256_fingerprint,
                subject=c.subject,
                not_after=timestamp(c.not_after),
                revoke_time=timestamp(c.revoked_at) if c.revoked_at else None,
            )
            for c in record.certificates
        ],
        program_ids=list(record.program_ids),
        created_by=audit_stamp(
            Stamp(record.created_by, record.created_store_id, record.created_at)
        ),
    )


async def certificate_partner(db: Database, fingerprint: str) -> PartnerRecord | None:
    """The partner a certificate (by its SHA-256 fingerprint) is bound to,
    if the binding is in force: None for a certificate never registered or
    revoked. The partner may be suspended."""
    async with db.sessions() as session:
        bound = await store.get_certificate(session, fingerprint.strip().lower())
        if bound is None or bound.revoked_at is not None:
            return None
        return await store.get_partner(session, bound.partner_id)


async def partner_principal(db: Database, certificate: ClientCertificate) -> Principal:
    """Who a client certificate speaks for: the partner it is bound to, if
    the binding is in force and the partner active."""
    partner = await certificate_partner(db, certificate.sha256_fingerprint)
    return principal_for_partner(
        partner.partner_id if partner else None,
        active=partner is not None and partner.state == PartnerState.ACTIVE,
    )


class PartnersServicer(partners_pb2_grpc.PartnersServiceServicer):
    """The registry, for HQ."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db
        partner_grpc = ctx.settings.partner_grpc
        # With a partner endpoint, a certificate its handshake would refuse
        # is refused here already.
        self.client_ca = partner_grpc.tls.client_ca if partner_grpc else None

    async def _read(self, partner_id: str) -> pb.Partner:
        async with self.db.sessions() as session:
            record = await store.get_partner(session, partner_id)
        if record is None:
            raise partner_not_found(partner_id)
        return partner_to_proto(record)

    async def CreatePartner(self, request: pb.CreatePartnerRequest, context: Context) -> pb.Partner:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        partner_id = request.partner.partner_id.strip()
        name = request.partner.display_name.strip()
        violations = []
        if not PARTNER_ID.match(partner_id):
            violations.append(
                FieldViolation("partner.partner_id", "lower-case letters, digits and -, at most 64")
            )
        if not name or len(name) > 100:
            violations.append(
                FieldViolation("partner.display_name", "required, at most 100 characters")
            )
        if violations:
            raise InvalidArgument(violations)

        async def create(session: AsyncSession) -> pb.Partner:
            if await store.get_partner(session, partner_id) is not None:
                raise AlreadyExists(
                    "a partner with this id exists",
                    reason="PARTNER_EXISTS",
                    metadata={"partner_id": partner_id},
                )
            await store.insert_partner(
                session,
                partner_id,
                name,
                principal=principal.subject,
                store_id=principal.store_id,
                now=utcnow(),
            )
            return pb.Partner(partner_id=partner_id)

        await run_idempotent(
            self.db,
            method="cards.CreatePartner",
            request_id=request.request_id,
            request=request,
            response_type=pb.Partner,
            work=create,
        )
        return await self._read(partner_id)

    async def GetPartner(self, request: pb.GetPartnerRequest, context: Context) -> pb.Partner:
        current_principal().require_role(*STAFF_ROLES, Role.SERVICE)
        return await self._read(_required(request.partner_id, "partner_id"))

    async def ListPartners(
        self, request: pb.ListPartnersRequest, context: Context
    ) -> pb.ListPartnersResponse:
        current_principal().require_role(*STAFF_ROLES, Role.SERVICE)
        size = page_size(request.page_size)
        after = str((decode_token(request.page_token) or {}).get("id", ""))
        async with self.db.sessions() as session:
            ids = await store.partner_ids(session, after=after, limit=size + 1)
            found = [await store.get_partner(session, i) for i in ids[:size]]
        response = pb.ListPartnersResponse(
            partners=[partner_to_proto(p) for p in found if p is not None]
        )
        if len(ids) > size:
            response.next_page_token = encode_token({"id": ids[size - 1]})
        return response

    async def LookupPartnerCertificate(
        self, request: pb.LookupPartnerCertificateRequest, context: Context
    ) -> pb.Partner:
        current_principal().require_role(Role.SERVICE)
        fingerprint = _required(request.sha256_fingerprint, "sha256_fingerprint")
        partner = await certificate_partner(self.db, fingerprint)
        if partner is None:
            raise NotFound(
                "no partner certificate in force with this fingerprint",
                reason="CERTIFICATE_NOT_REGISTERED",
            )
        return partner_to_proto(partner)

    async def _update(
        self,
        method: str,
        request: pb.SuspendPartnerRequest
        | pb.ResumePartnerRequest
        | pb.AddPartnerCertificateRequest
        | pb.RevokePartnerCertificateRequest,
        change: Callable[[AsyncSession, PartnerRecord], Awaitable[None]],
    ) -> pb.Partner:
        current_principal().require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        partner_id = _required(request.partner_id, "partner_id")

        async def work(session: AsyncSession) -> pb.Partner:
            record = await store.get_partner(session, partner_id, for_update=True)
            if record is None:
                raise partner_not_found(partner_id)
            await change(session, record)
            return pb.Partner(partner_id=partner_id)

        await run_idempotent(
            self.db,
            method=f"cards.{method}",
            request_id=request.request_id,
            request=request,
            response_type=pb.Partner,
            work=work,
        )
        return await self._read(partner_id)

    async def SuspendPartner(
        self, request: pb.SuspendPartnerRequest, context: Context
    ) -> pb.Partner:
        reason = card_rules.check_reason(request.reason, required=True)

        async def suspend(session: AsyncSession, partner: PartnerRecord) -> None:
            await store.set_state(session, partner.partner_id, PartnerState.SUSPENDED, reason)

        return await self._update("SuspendPartner", request, suspend)

    async def ResumePartner(self, request: pb.ResumePartnerRequest, context: Context) -> pb.Partner:
        async def resume(session: AsyncSession, partner: PartnerRecord) -> None:
            await store.set_state(session, partner.partner_id, PartnerState.ACTIVE, "")

        return await self._update("ResumePartner", request, resume)

    async def AddPartnerCertificate(
        self, request: pb.AddPartnerCertificateRequest, context: Context
    ) -> pb.Partner:
        try:
            info = certificate_info(request.certificate_pem)
        except ValueError:
            raise InvalidArgument(
                [FieldViolation("certificate_pem", "not a PEM X.509 certificate")]
            ) from None
        now = utcnow()
        if info.not_after <= now:
            raise InvalidArgument([FieldViolation("certificate_pem", "the certificate expired")])
        if self.client_ca is not None:
            bundle = await asyncio.to_thread(self.client_ca.read_bytes)
            if not issued_by_any(info.pem, bundle):
                raise InvalidArgument(
                    [FieldViolation("certificate_pem", "not signed by the chain's partner CA")]
                )

        async def add(session: AsyncSession, partner: PartnerRecord) -> None:
            bound = await store.get_certificate(session, info.sha256_fingerprint)
            if bound is not None:
                raise AlreadyExists(
                    "this certificate is already registered",
                    reason="CERTIFICATE_EXISTS",
                    metadata={"partner_id": bound.partner_id},
                )
            await store.add_certificate(
                session,
                partner.partner_id,
                info.sha256_fingerprint,
                subject=info.subject[:300],
                not_after=info.not_after,
                now=now,
            )

        return await self._update("AddPartnerCertificate", request, add)

    async def RevokePartnerCertificate(
        self, request: pb.RevokePartnerCertificateRequest, context: Context
    ) -> pb.Partner:
        fingerprint = _required(request.sha256_fingerprint, "sha256_fingerprint").lower()

        async def revoke(session: AsyncSession, partner: PartnerRecord) -> None:
            bound = await store.get_certificate(session, fingerprint)
            if bound is None or bound.partner_id != partner.partner_id:
                raise NotFound(
                    "the partner has no certificate with this fingerprint",
                    reason="CERTIFICATE_NOT_FOUND",
                    metadata={"sha256_fingerprint": fingerprint},
                )
            await store.revoke_certificate(session, fingerprint, utcnow())

        return await self._update("RevokePartnerCertificate", request, revoke)


class PartnerCardsServicer(partners_pb2_grpc.PartnerCardsServiceServicer):
    """What a partner calls, authenticated by its client certificate."""

    def __init__(self, ctx: ServiceContext, members: MembersClient) -> None:
        self.db = ctx.db
        self.members = members

    @staticmethod
    def _partner() -> tuple[Principal, str]:
        return current_partner()

    @staticmethod
    async def _own_card(
        session: AsyncSession, partner_id: str, card_id: str, reference: str
    ) -> CardRecord:
        """The partner's card by id or by its reference; another's card is
        as good as missing."""
        if bool(card_id.strip()) == bool(reference.strip()):
            raise InvalidArgument(
                [FieldViolation("card_id", "give a card_id or a partner_reference")]
            )
        if reference.strip():
            found = await store.card_by_reference(session, partner_id, reference.strip())
            card_id = found or ""
        card = await card_store.get_card(session, card_id.strip()) if card_id else None
        if card is None or card.partner_id != partner_id:
            raise NotFound("no such card of yours", reason="CARD_NOT_FOUND")
        return card

    async def _cobrand(self, card_id: str) -> pb.CobrandCard:
        async with self.db.sessions() as session:
            card = await get_card(session, card_id)
            program = await get_program(session, card.program_id)
            account = await sv_store.get_account(session, card.account_id)
            policy = (await rule_store.get_policy(session)).policy
        message = pb.CobrandCard(
            card_id=card.card_id,
            card_number=card.card_number,
            program_id=card.program_id,
            member_id=card.member_id,
            state=STATES_PROTO[card.state],
            can_pay=not card_rules.payment_refusal(card.state, card.expires_at, utcnow()),
            partner_reference=card.partner_reference or "",
            linked_card_id=card.linked_card_id,
        )
        if card.expires_at is not None:
            message.expire_time.CopyFrom(timestamp(card.expires_at))
        if program.program.stored_value:
            available = account.balances.available if account else 0
            currency = account.currency if account else policy.currency
            message.available_balance.CopyFrom(money(currency, available))
        return message

    async def _give_card(
        self,
        method: str,
        request: pb.IssueCobrandCardRequest | pb.LinkCobrandCardRequest,
        card_number: str = "",
    ) -> pb.CobrandCard:
        """A card of one of the partner's programs for a member: a new one
        (IssueCobrandCard) or one the partner printed (LinkCobrandCard)."""
        principal, partner_id = self._partner()
        check_request_id(request.request_id)
        program_id = _required(request.program_id, "program_id")
        reference = _required(request.partner_reference, "partner_reference")
        if len(reference) > MAX_REFERENCE_LENGTH:
            raise InvalidArgument(
                [FieldViolation("partner_reference", f"at most {MAX_REFERENCE_LENGTH} characters")]
            )
        if bool(request.member_id.strip()) == bool(request.mobile.strip()):
            raise InvalidArgument([FieldViolation("member_id", "give a member_id or a mobile")])
        async with self.db.sessions() as session:
            program = await get_program(session, program_id)
        if program.program.partner_id != partner_id:
            raise PermissionDenied(
                "this program is not one of yours",
                reason="PROGRAM_NOT_PARTNERS",
                metadata={"program_id": program_id},
            )
        if card_number and not fits(program.program.number_format, card_number):
            raise InvalidArgument(
                [FieldViolation("card_number", "not a number of this program's format")]
            )
        member_id = request.member_id.strip()
        if not member_id:
            member_id = await self.members.member_id_by_mobile(request.mobile.strip())
        await learn_member(self.db, self.members, member_id)
        stamp = Stamp(principal.subject, "", utcnow())

        async def give(session: AsyncSession) -> pb.CobrandCard:
            if await store.card_by_reference(session, partner_id, reference) is not None:
                raise AlreadyExists(
                    "one of your cards already has this reference",
                    reason="PARTNER_REFERENCE_EXISTS",
                    metadata={"partner_reference": reference},
                )
            card = await issue_card(
                session,
                program_id=program_id,
                member_id=member_id,
                stamp=stamp,
                partner_reference=reference,
                card_number=card_number,
            )
            return pb.CobrandCard(card_id=card.card_id)

        done = await run_idempotent(
            self.db,
            # Partners choose request ids of their own: keep them apart.
            method=f"cards.{method}:{partner_id}",
            request_id=request.request_id,
            request=request,
            response_type=pb.CobrandCard,
            work=give,
        )
        return await self._cobrand(done.card_id)

    async def IssueCobrandCard(
        self, request: pb.IssueCobrandCardRequest, context: Context
    ) -> pb.CobrandCard:
        return await self._give_card("IssueCobrandCard", request)

    async def LinkCobrandCard(
        self, request: pb.LinkCobrandCardRequest, context: Context
    ) -> pb.CobrandCard:
        number = normalise_card_number(_required(request.card_number, "card_number"))
        if number is None:
            raise InvalidArgument([FieldViolation("card_number", "not a card number")])
        return await self._give_card("LinkCobrandCard", request, number)

    async def GetCobrandCard(
        self, request: pb.GetCobrandCardRequest, context: Context
    ) -> pb.CobrandCard:
        _, partner_id = self._partner()
        async with self.db.sessions() as session:
            card = await self._own_card(
                session, partner_id, request.card_id, request.partner_reference
            )
        return await self._cobrand(card.card_id)

    async def PushRecharge(
        self, request: pb.PushRechargeRequest, context: Context
    ) -> pb.PushRechargeResponse:
        principal, partner_id = self._partner()
        check_request_id(request.request_id)
        reference = rules.check_text(
            request.payment_reference,
            "payment_reference",
            rules.MAX_REFERENCE_LENGTH,
            required=True,
        )
        now = utcnow()
        async with self.db.sessions() as session:
            policy = (await rule_store.get_policy(session)).policy
        amount = rules.check_amount(
            request.amount.minor_units, request.amount.currency_code.strip().upper(), policy
        )
        command = ledger.Request(
            # Partners choose request ids of their own: keep them apart.
            f"{partner_id}:{request.request_id}",
            request_fingerprint(request),
            Stamp(principal.subject, "", now),
        )
        async with self.db.transaction() as session:
            card = await self._own_card(
                session, partner_id, request.card_id, request.partner_reference
            )
            movement = await ledger.recharge(
                session,
                card,
                await get_program(session, card.program_id),
                policy,
                command,
                amount=amount,
                channel=Channel.PARTNER_CARD,
                operator_id=principal.subject,
                reference=reference,
            )
        return pb.PushRechargeResponse(
            movement_id=movement.movement_id,
            bonus=money(movement.currency, movement.change.bonus),
            available_balance=money(movement.currency, movement.after.available),
        )

    async def _changes(self, partner_id: str, after: int, limit: int) -> list[pb.CardChange]:
        async with self.db.sessions() as session:
            found = await store.card_changes(session, partner_id, after_seq=after, limit=limit)
        return [
            pb.CardChange(
                sequence=c.seq,
                card_id=c.card_id,
                partner_reference=c.partner_reference or "",
                action=ACTIONS_PROTO[c.action],
                state=STATES_PROTO[c.state],
                time=timestamp(c.at),
                related_card_id=c.related_card_id,
            )
            for c in found
        ]

    async def ListCardChanges(
        self, request: pb.ListCardChangesRequest, context: Context
    ) -> pb.ListCardChangesResponse:
        _, partner_id = self._partner()
        if request.after_sequence < 0:
            raise InvalidArgument([FieldViolation("after_sequence", "not negative")])
        size = page_size(request.page_size, default=100, maximum=MAX_CHANGES_PAGE)
        return pb.ListCardChangesResponse(
            changes=await self._changes(partner_id, request.after_sequence, size)
        )

    async def WatchCardChanges(
        self, request: pb.WatchCardChangesRequest, context: Context
    ) -> AsyncIterator[pb.CardChange]:
        _, partner_id = self._partner()
        if request.after_sequence < 0:
            raise InvalidArgument([FieldViolation("after_sequence", "not negative")])
        after = request.after_sequence
        while True:
            changes = await self._changes(partner_id, after, MAX_CHANGES_PAGE)
            for change in changes:
                yield change
                after = change.sequence
            if len(changes) < MAX_CHANGES_PAGE:
                await asyncio.sleep(WATCH_POLL_SECONDS)
