"""The cards gRPC edge: card programs, cards and stored value, served by one
process that owns the cards database, with the members consumer and the
workers (card expiry, hold expiry, enterprise batch recharges)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from chassis.auth import Principal
from chassis.grpcserver import GrpcService
from chassis.mtls import ClientCertificate
from chassis.service import PartnerEndpoint, ServiceContext, ServiceDefinition
from cornucopia.cards.v1 import (
    cards_pb2,
    cards_pb2_grpc,
    partners_pb2,
    partners_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    stored_value_pb2,
    stored_value_pb2_grpc,
)
from services.cards.batches import BatchRecharges
from services.cards.consumers import subscriptions
from services.cards.expiry import ExpiryWorker
from services.cards.hold_expiry import HoldExpiryWorker
from services.cards.members_client import MembersClient
from services.cards.server.cards import CardsServicer
from services.cards.server.partners import (
    PartnerCardsServicer,
    PartnersServicer,
    partner_principal,
)
from services.cards.server.programs import CardProgramsServicer
from services.cards.server.stored_value import StoredValueServicer


def members_client(ctx: ServiceContext) -> MembersClient:
    """One client of members per service, for the token and partner ports."""

    def make() -> MembersClient:
        client = MembersClient(ctx.settings)
        ctx.on_close(client.close)
        return client

    return ctx.shared("cards.members", make)


def grpc_services(ctx: ServiceContext) -> list[GrpcService]:
    members = members_client(ctx)
    return [
        GrpcService(
            full_name=programs_pb2.DESCRIPTOR.services_by_name["CardProgramsService"].full_name,
            servicer=CardProgramsServicer(ctx),
            add_to_server=programs_pb2_grpc.add_CardProgramsServiceServicer_to_server,
        ),
        GrpcService(
            full_name=cards_pb2.DESCRIPTOR.services_by_name["CardsService"].full_name,
            servicer=CardsServicer(ctx, members),
            add_to_server=cards_pb2_grpc.add_CardsServiceServicer_to_server,
        ),
        GrpcService(
            full_name=stored_value_pb2.DESCRIPTOR.services_by_name["StoredValueService"].full_name,
            servicer=StoredValueServicer(ctx, BatchRecharges(ctx.db)),
            add_to_server=stored_value_pb2_grpc.add_StoredValueServiceServicer_to_server,
        ),
        GrpcService(
            full_name=partners_pb2.DESCRIPTOR.services_by_name["PartnersService"].full_name,
            servicer=PartnersServicer(ctx),
            add_to_server=partners_pb2_grpc.add_PartnersServiceServicer_to_server,
        ),
    ]


def partner_endpoint(ctx: ServiceContext) -> PartnerEndpoint:
    """PartnerCardsService, on its own port behind mutual TLS."""
    members = members_client(ctx)

    async def resolve(certificate: ClientCertificate) -> Principal:
        return await partner_principal(ctx.db, certificate)

    return PartnerEndpoint(
        grpc_services=[
            GrpcService(
                full_name=partners_pb2.DESCRIPTOR.services_by_name["PartnerCardsService"].full_name,
                servicer=PartnerCardsServicer(ctx, members),
                add_to_server=partners_pb2_grpc.add_PartnerCardsServiceServicer_to_server,
            )
        ],
        resolve=resolve,
    )


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [ExpiryWorker(ctx.db).run, HoldExpiryWorker(ctx.db).run, BatchRecharges(ctx.db).run]


definition = ServiceDefinition(
    name="cards",
    migrations_dir=Path(__file__).parent.parent / "migrations",
    grpc_services=grpc_services,
    subscriptions=lambda _ctx: subscriptions(),
    workers=workers,
    partner_endpoint=partner_endpoint,
)
