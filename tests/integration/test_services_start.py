"""Every service starts on its own database, joins the bus, answers health
and reflection, and stops cleanly."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.campaigns.server import definition as campaigns
from services.cards.server import definition as cards
from services.loyalty.server import definition as loyalty
from services.members.server import definition as members
from services.notify.server import definition as notify
from tests.integration.conftest import Suite
from tests.integration.infra import DatabaseFactory

ALL = {
    "members": (members, "cornucopia.members.v1.MembersService"),
    "cards": (cards, "cornucopia.cards.v1.CardsService"),
    "loyalty": (loyalty, "cornucopia.loyalty.v1.CheckoutService"),
    "campaigns": (campaigns, "cornucopia.campaigns.v1.PricingService"),
    "notify": (notify, "cornucopia.notify.v1.NotifyService"),
}


async def list_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for response in stub.ServerReflectionInfo(requests()):
        names.update(s.name for s in response.list_services_response.service)
    return names


async def test_every_service_serves_health_and_reflection(
    suite: Suite, database_url: DatabaseFactory, spans: InMemorySpanExporter
) -> None:
    for name, (definition, _) in ALL.items():
        await suite.start(definition, await database_url(name))
    spans.clear()
    for name, (_, full_name) in ALL.items():
        health = health_pb2_grpc.HealthStub(suite.channels[name])
        for service in ("", full_name):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, service)
        assert full_name in await list_services(suite.channels[name])
    # Probes every few seconds would bury the real traces: the services do
    # not trace them (this test's own channels trace every call they make).
    served = [s.name for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert not [name for name in served if "Health" in name]
    assert any("ServerReflection" in name for name in served)

    # Draining: after stop the health check says NOT_SERVING before the
    # server goes away, and the process's connections close.
    runtime = suite.runtimes["cards"]
    await suite.stop("cards")
    assert runtime.bus.nc_or_none is not None and runtime.bus.nc_or_none.is_closed


async def test_a_service_waits_for_nats_and_says_not_serving(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    """NATS unreachable at start: the service listens, reports NOT_SERVING,
    and takes writes into its outbox; it turns SERVING once NATS is there."""
    import asyncio

    from chassis.config import Settings
    from chassis.natsserver import NatsServer, free_port
    from chassis.service import ServiceRuntime

    port = free_port()
    settings = Settings(
        service="members",
        environment="test",
        var_dir=suite.var_dir,
        database_url=await database_url("members"),
        nats_url=f"nats://127.0.0.1:{port}",
        grpc_listen="127.0.0.1:0",
    )
    runtime = ServiceRuntime(members, settings)
    await runtime.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        server = NatsServer(suite.var_dir / "late-nats", port=port)
        server.start()
        try:
            await asyncio.wait_for(runtime.ready.wait(), timeout=30)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await runtime.stop(grace=1)
            server.stop()
    finally:
        await channel.close()
