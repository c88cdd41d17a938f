"""A gRPC server for the unit costs: by default a bare grpc.aio server with
the health service (the floor for one gRPC round trip between two
processes on this machine) and a members ``GetMember`` that answers at
once; with ``--chassis`` the services' own server
(``chassis.grpcserver.GrpcServer``: tracing, the access log, the mapping of
errors and the token check around every call) serving the same
``GetMember``, to price that stack by itself.

    python -m bench.baseline_server 127.0.0.1:50999 [--chassis SECRET]
"""

import asyncio
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chassis.grpcserver import GrpcServer, GrpcService
from chassis.logs import configure_logging
from chassis.telemetry import configure_tracing
from cornucopia.members.v1 import members_pb2, members_pb2_grpc


class ConstantMembers(members_pb2_grpc.MembersServiceServicer):
    """A member file from memory: nothing but the serving is measured."""

    async def GetMember(
        self, request: members_pb2.GetMemberRequest, context: grpc.aio.ServicerContext
    ) -> members_pb2.Member:
        return members_pb2.Member(member_id=request.member_id, given_name="Ana")


async def bare(address: str) -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    members_pb2_grpc.add_MembersServiceServicer_to_server(ConstantMembers(), server)
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


async def chassis(address: str, token_secret: str) -> None:
    # As a service runs under make up: console logs at INFO, the tracer
    # provider installed.
    configure_logging("members", "INFO", False)
    configure_tracing("members")
    server = GrpcServer(
        "members",
        address,
        token_secret,
        [
            GrpcService(
                full_name=members_pb2.DESCRIPTOR.services_by_name["MembersService"].full_name,
                servicer=ConstantMembers(),
                add_to_server=members_pb2_grpc.add_MembersServiceServicer_to_server,
            )
        ],
    )
    await server.start()
    await server.set_serving(True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[2] == "--chassis":
        asyncio.run(chassis(sys.argv[1], sys.argv[3]))
    else:
        asyncio.run(bare(sys.argv[1]))
