"""The cards gRPC edge: card programs and cards, served by one process that
owns the cards database, with the members consumer and the expiry worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from chassis.grpcserver import GrpcService
from chassis.service import ServiceContext, ServiceDefinition
from cornucopia.cards.v1 import cards_pb2, cards_pb2_grpc, programs_pb2, programs_pb2_grpc
from services.cards.consumers import subscriptions
from services.cards.expiry import ExpiryWorker
from services.cards.members_client import MembersClient
from services.cards.server.cards import CardsServicer
from services.cards.server.programs import CardProgramsServicer


def grpc_services(ctx: ServiceContext) -> list[GrpcService]:
    members = MembersClient(ctx.settings)
    ctx.on_close(members.close)
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
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [ExpiryWorker(ctx.db).run]


definition = ServiceDefinition(
    name="cards",
    migrations_dir=Path(__file__).parent.parent / "migrations",
    grpc_services=grpc_services,
    subscriptions=lambda _ctx: subscriptions(),
    workers=workers,
)
