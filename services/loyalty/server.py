"""The loyalty gRPC edge. The service starts, migrates its database, joins the
bus and answers health and reflection; its methods arrive with the issue that
builds it."""

from __future__ import annotations

from pathlib import Path

from chassis.grpcserver import GrpcService
from chassis.service import ServiceContext, ServiceDefinition
from cornucopia.loyalty.v1 import loyalty_pb2, loyalty_pb2_grpc


class LoyaltyServicer(loyalty_pb2_grpc.LoyaltyServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db


definition = ServiceDefinition(
    name="loyalty",
    migrations_dir=Path(__file__).parent / "migrations",
    grpc_services=lambda ctx: [
        GrpcService(
            full_name=loyalty_pb2.DESCRIPTOR.services_by_name["LoyaltyService"].full_name,
            servicer=LoyaltyServicer(ctx),
            add_to_server=loyalty_pb2_grpc.add_LoyaltyServiceServicer_to_server,
        )
    ],
)
