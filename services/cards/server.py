"""The cards gRPC edge. The service starts, migrates its database, joins the
bus and answers health and reflection; its methods arrive with the issue that
builds it."""

from __future__ import annotations

from pathlib import Path

from chassis.grpcserver import GrpcService
from chassis.service import ServiceContext, ServiceDefinition
from cornucopia.cards.v1 import cards_pb2, cards_pb2_grpc


class CardsServicer(cards_pb2_grpc.CardsServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db


definition = ServiceDefinition(
    name="cards",
    migrations_dir=Path(__file__).parent / "migrations",
    grpc_services=lambda ctx: [
        GrpcService(
            full_name=cards_pb2.DESCRIPTOR.services_by_name["CardsService"].full_name,
            servicer=CardsServicer(ctx),
            add_to_server=cards_pb2_grpc.add_CardsServiceServicer_to_server,
        )
    ],
)
