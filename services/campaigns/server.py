"""The campaigns gRPC edge. The service starts, migrates its database, joins the
bus and answers health and reflection; its methods arrive with the issue that
builds it."""

from __future__ import annotations

from pathlib import Path

from chassis.grpcserver import GrpcService
from chassis.service import ServiceContext, ServiceDefinition
from cornucopia.campaigns.v1 import campaigns_pb2, campaigns_pb2_grpc


class CampaignsServicer(campaigns_pb2_grpc.CampaignsServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db


definition = ServiceDefinition(
    name="campaigns",
    migrations_dir=Path(__file__).parent / "migrations",
    grpc_services=lambda ctx: [
        GrpcService(
            full_name=campaigns_pb2.DESCRIPTOR.services_by_name["CampaignsService"].full_name,
            servicer=CampaignsServicer(ctx),
            add_to_server=campaigns_pb2_grpc.add_CampaignsServiceServicer_to_server,
        )
    ],
)
