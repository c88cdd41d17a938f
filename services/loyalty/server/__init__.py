"""The loyalty gRPC edge: points and the gift catalogue, earn rules and
tiers, and the checkout with its sales, served by one process that owns the
loyalty database, with its workers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from chassis.grpcserver import GrpcService
from chassis.service import ServiceContext, ServiceDefinition
from services.loyalty.server import checkout, points, rules


def grpc_services(ctx: ServiceContext) -> list[GrpcService]:
    return [*points.services(ctx), *rules.services(ctx), *checkout.services(ctx)]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [*points.workers(ctx), *rules.workers(ctx), *checkout.workers(ctx)]


definition = ServiceDefinition(
    name="loyalty",
    migrations_dir=Path(__file__).parent.parent / "migrations",
    grpc_services=grpc_services,
    subscriptions=points.subscriptions,
    workers=workers,
)
