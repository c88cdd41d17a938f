"""Points conversions with partners: the terms HQ sets
(PartnerConversionService, on the ordinary port) and what a partner calls
on the loyalty service's partner port, over mutual TLS
(PartnerPointsService). A partner is known by its client certificate,
which the cards service's registry resolves at every call; it sees only
its own conversions. The unit of work is in services/loyalty/conversions.py,
the rules in domain/conversions.py."""

from __future__ import annotations

import dataclasses

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, current_principal
from chassis.db import Database, utcnow
from chassis.errors import Aborted, FieldViolation, InvalidArgument, NotFound
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, request_fingerprint, run_idempotent
from chassis.mtls import ClientCertificate, current_partner, principal_for_partner
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import PartnerEndpoint, ServiceContext
from cornucopia.loyalty.v1 import partner_points_pb2 as ppb
from cornucopia.loyalty.v1 import partner_points_pb2_grpc, points_pb2_grpc
from cornucopia.loyalty.v1 import points_pb2 as pb
from services.loyalty import conversions
from services.loyalty.conversions import ConversionRequest
from services.loyalty.domain import conversions as rules
from services.loyalty.domain import points as points_rules
from services.loyalty.domain.conversions import Direction, PartnerTerms, Rate, Terms
from services.loyalty.domain.points import Stamp
from services.loyalty.peers import CardsClient, MembersClient, cards_client, members_client
from services.loyalty.points_ledger import audit_stamp, timestamp
from services.loyalty.store import conversions as store
from services.loyalty.store import members as member_store
from services.loyalty.store.conversions import ConversionRecord, TermsRecord

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
MAX_CONVERSIONS_PAGE = 500

DIRECTIONS_PROTO = {
    Direction.TO_CHAIN: ppb.CONVERSION_DIRECTION_TO_CHAIN,
    Direction.TO_PARTNER: ppb.CONVERSION_DIRECTION_TO_PARTNER,
}


# --- proto <-> domain --------------------------------------------------------------------


def _terms_to_proto(terms: Terms) -> pb.ConversionTerms:
    return pb.ConversionTerms(
        rate=pb.ConversionRate(
            partner_points=terms.rate.partner_points, chain_points=terms.rate.chain_points
        ),
        min_points=terms.min_points,
        max_points=terms.max_points,
        daily_chain_points_per_member=terms.daily_cap,
    )


def _terms_from_proto(message: pb.ConversionTerms) -> Terms:
    return Terms(
        rate=Rate(message.rate.partner_points, message.rate.chain_points),
        min_points=message.min_points,
        max_points=message.max_points,
        daily_cap=message.daily_chain_points_per_member,
    )


def partner_conversion_to_proto(record: TermsRecord) -> pb.PartnerConversion:
    terms = record.terms
    message = pb.PartnerConversion(
        partner_id=terms.partner_id,
        enabled=terms.enabled,
        etag=record.etag,
        updated_by=audit_stamp(
            Stamp(record.updated_by, record.updated_store_id, record.updated_at)
        ),
    )
    if terms.to_chain is not None:
        message.to_chain.CopyFrom(_terms_to_proto(terms.to_chain))
    if terms.to_partner is not None:
        message.to_partner.CopyFrom(_terms_to_proto(terms.to_partner))
    return message


def partner_conversion_from_proto(message: pb.PartnerConversion) -> PartnerTerms:
    return rules.check_terms(
        PartnerTerms(
            partner_id=message.partner_id.strip(),
            enabled=message.enabled,
            to_chain=_terms_from_proto(message.to_chain) if message.HasField("to_chain") else None,
            to_partner=(
                _terms_from_proto(message.to_partner) if message.HasField("to_partner") else None
            ),
        )
    )


def conversion_to_proto(record: ConversionRecord) -> ppb.Conversion:
    return ppb.Conversion(
        conversion_id=record.conversion_id,
        sequence=record.sequence,
        request_id=record.request_id,
        direction=DIRECTIONS_PROTO[record.direction],
        member_id=record.member_id,
        requested_points=record.requested,
        partner_points=record.partner_points,
        chain_points=record.chain_points,
        rate=pb.ConversionRate(
            partner_points=record.rate.partner_points, chain_points=record.rate.chain_points
        ),
        partner_reference=record.partner_reference,
        balance_after=record.balance_after,
        create_time=timestamp(record.at),
    )


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def terms_not_found(partner_id: str) -> NotFound:
    return NotFound(
        "no conversion terms for this partner",
        reason="PARTNER_CONVERSION_NOT_FOUND",
        metadata={"partner_id": partner_id},
    )


# --- HQ: the terms ---------------------------------------------------------------------


class PartnerConversionServicer(points_pb2_grpc.PartnerConversionServiceServicer):
    def __init__(self, ctx: ServiceContext, cards: CardsClient) -> None:
        self.db = ctx.db
        self.cards = cards

    async def SetPartnerConversion(
        self, request: pb.SetPartnerConversionRequest, context: Context
    ) -> pb.PartnerConversion:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        terms = partner_conversion_from_proto(request.partner_conversion)
        if not await self.cards.partner_exists(terms.partner_id):
            raise NotFound(
                "no partner with this id in the cards service's registry",
                reason="PARTNER_NOT_FOUND",
                metadata={"partner_id": terms.partner_id},
            )
        now = utcnow()

        async def save(session: AsyncSession) -> pb.PartnerConversion:
            current = await store.get_terms(session, terms.partner_id, for_update=True)
            if request.etag and (current is None or current.etag != request.etag):
                raise Aborted(
                    "the partner's conversion changed since you read it; read it again",
                    reason="ETAG_MISMATCH",
                    metadata={"etag": current.etag if current else ""},
                )
            await store.save_terms(
                session, terms, principal=principal.subject, store_id=principal.store_id, now=now
            )
            saved = await store.get_terms(session, terms.partner_id)
            assert saved is not None  # written just now
            return partner_conversion_to_proto(saved)

        return await run_idempotent(
            self.db,
            method="loyalty.SetPartnerConversion",
            request_id=request.request_id,
            request=request,
            response_type=pb.PartnerConversion,
            work=save,
        )

    async def GetPartnerConversion(
        self, request: pb.GetPartnerConversionRequest, context: Context
    ) -> pb.PartnerConversion:
        current_principal().require_role(*READING_ROLES)
        partner_id = _required(request.partner_id, "partner_id")
        async with self.db.sessions() as session:
            record = await store.get_terms(session, partner_id)
        if record is None:
            raise terms_not_found(partner_id)
        return partner_conversion_to_proto(record)

    async def ListPartnerConversions(
        self, request: pb.ListPartnerConversionsRequest, context: Context
    ) -> pb.ListPartnerConversionsResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        after = str((decode_token(request.page_token) or {}).get("id", ""))
        async with self.db.sessions() as session:
            found = await store.list_terms(session, after=after, limit=size + 1)
        response = pb.ListPartnerConversionsResponse(
            partner_conversions=[partner_conversion_to_proto(r) for r in found[:size]]
        )
        if len(found) > size:
            response.next_page_token = encode_token({"id": found[size - 1].terms.partner_id})
        return response


# --- partners: converting ----------------------------------------------------------------


async def learn_member(db: Database, members: MembersClient, member_id: str) -> None:
    """Makes sure the member is in the projection: a conversion right after
    an enrollment may come before the enrollment's event. NOT_FOUND
    MEMBER_NOT_FOUND when members does not know them either."""
    async with db.sessions() as session:
        if await member_store.get_member(session, member_id) is not None:
            return
    facts = await members.member_facts(member_id)
    async with db.transaction() as session:
        await member_store.note_member(
            session, facts.member_id, facts.status, facts.as_of, merged_into=facts.merged_into
        )


class PartnerPointsServicer(partner_points_pb2_grpc.PartnerPointsServiceServicer):
    """What a partner calls, authenticated by its client certificate."""

    def __init__(self, ctx: ServiceContext, members: MembersClient) -> None:
        self.db = ctx.db
        self.members = members

    async def _convert(
        self,
        direction: Direction,
        request: ppb.ConvertToChainPointsRequest | ppb.ConvertToPartnerPointsRequest,
        points: int,
        points_field: str,
        *,
        reference_required: bool,
    ) -> ppb.Conversion:
        principal, partner_id = current_partner()
        check_request_id(request.request_id)
        if bool(request.member_id.strip()) == bool(request.mobile.strip()):
            raise InvalidArgument([FieldViolation("member_id", "give a member_id or a mobile")])
        points_rules.check_points(points, points_field)
        reference = points_rules.check_text(
            request.partner_reference,
            "partner_reference",
            rules.MAX_REFERENCE_LENGTH,
            required=reference_required,
        )
        stamp = Stamp(principal.subject, "", utcnow())
        asked = ConversionRequest(
            partner_id=partner_id,
            direction=direction,
            member_id=request.member_id.strip(),
            points=points,
            partner_reference=reference,
            request_id=request.request_id,
            request_hash=request_fingerprint(request),
        )
        # A retry is answered from what was done, without asking members.
        async with self.db.sessions() as session:
            done = await conversions.done_before(session, asked)
            terms = await store.get_terms(session, partner_id)
        if done is not None:
            return conversion_to_proto(done)
        conversions.enabled_terms(terms, partner_id, direction)
        if not asked.member_id:
            member_id = await self.members.member_id_by_mobile(request.mobile.strip())
            asked = dataclasses.replace(asked, member_id=member_id)
        await learn_member(self.db, self.members, asked.member_id)
        return conversion_to_proto(await conversions.convert(self.db, asked, stamp))

    async def ConvertToChainPoints(
        self, request: ppb.ConvertToChainPointsRequest, context: Context
    ) -> ppb.Conversion:
        return await self._convert(
            Direction.TO_CHAIN,
            request,
            request.partner_points,
            "partner_points",
            reference_required=True,
        )

    async def ConvertToPartnerPoints(
        self, request: ppb.ConvertToPartnerPointsRequest, context: Context
    ) -> ppb.Conversion:
        return await self._convert(
            Direction.TO_PARTNER,
            request,
            request.chain_points,
            "chain_points",
            reference_required=False,
        )

    async def GetConversion(
        self, request: ppb.GetConversionRequest, context: Context
    ) -> ppb.Conversion:
        _, partner_id = current_partner()
        conversion_id = _required(request.conversion_id, "conversion_id")
        async with self.db.sessions() as session:
            found = await store.get_conversion(session, conversion_id)
        # Another partner's conversion is as good as missing.
        if found is None or found.partner_id != partner_id:
            raise NotFound(
                "no conversion of yours with this id",
                reason="CONVERSION_NOT_FOUND",
                metadata={"conversion_id": conversion_id},
            )
        return conversion_to_proto(found)

    async def ListConversions(
        self, request: ppb.ListConversionsRequest, context: Context
    ) -> ppb.ListConversionsResponse:
        _, partner_id = current_partner()
        if request.after_sequence < 0:
            raise InvalidArgument([FieldViolation("after_sequence", "not negative")])
        size = page_size(request.page_size, default=100, maximum=MAX_CONVERSIONS_PAGE)
        async with self.db.sessions() as session:
            found = await store.list_conversions(
                session, partner_id, after_sequence=request.after_sequence, limit=size
            )
        return ppb.ListConversionsResponse(conversions=[conversion_to_proto(c) for c in found])


# --- what the loyalty definition asks for ----------------------------------------------


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["PartnerConversionService"].full_name,
            servicer=PartnerConversionServicer(ctx, cards_client(ctx)),
            add_to_server=points_pb2_grpc.add_PartnerConversionServiceServicer_to_server,
        )
    ]


def partner_endpoint(ctx: ServiceContext) -> PartnerEndpoint:
    """PartnerPointsService, on its own port behind mutual TLS. Who a
    certificate belongs to is asked of the cards service's registry at every
    call (nothing is cached), so a revoked certificate or a suspended
    partner is refused at once."""
    cards = cards_client(ctx)

    async def resolve(certificate: ClientCertificate) -> Principal:
        partner = await cards.certificate_partner(certificate.sha256_fingerprint)
        return principal_for_partner(
            partner.partner_id if partner else None,
            active=partner is not None and partner.active,
        )

    return PartnerEndpoint(
        grpc_services=[
            GrpcService(
                full_name=ppb.DESCRIPTOR.services_by_name["PartnerPointsService"].full_name,
                servicer=PartnerPointsServicer(ctx, members_client(ctx)),
                add_to_server=partner_points_pb2_grpc.add_PartnerPointsServiceServicer_to_server,
            )
        ],
        resolve=resolve,
    )
