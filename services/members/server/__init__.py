"""The members gRPC edge: one module per gRPC service, all served by one
process that owns the members database."""

from __future__ import annotations

from pathlib import Path

from chassis.grpcserver import GrpcService
from chassis.service import ServiceContext, ServiceDefinition
from cornucopia.members.v1 import (
    members_pb2,
    members_pb2_grpc,
    organisation_pb2,
    organisation_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
)
from services.members.server.members import MembersServicer
from services.members.server.organisation import OrganisationServicer
from services.members.server.transfers import ImportRunner, MemberTransfersServicer


def grpc_services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=members_pb2.DESCRIPTOR.services_by_name["MembersService"].full_name,
            servicer=MembersServicer(ctx),
            add_to_server=members_pb2_grpc.add_MembersServiceServicer_to_server,
        ),
        GrpcService(
            full_name=transfers_pb2.DESCRIPTOR.services_by_name["MemberTransfersService"].full_name,
            servicer=MemberTransfersServicer(ctx),
            add_to_server=transfers_pb2_grpc.add_MemberTransfersServiceServicer_to_server,
        ),
        GrpcService(
            full_name=organisation_pb2.DESCRIPTOR.services_by_name["OrganisationService"].full_name,
            servicer=OrganisationServicer(ctx),
            add_to_server=organisation_pb2_grpc.add_OrganisationServiceServicer_to_server,
        ),
    ]


definition = ServiceDefinition(
    name="members",
    migrations_dir=Path(__file__).parent.parent / "migrations",
    grpc_services=grpc_services,
    # Imports run in the background and resume after a restart.
    workers=lambda ctx: [ImportRunner(ctx).run],
)
