"""The loyalty gRPC edge: points and the gift catalogue, earn rules and
tiers, the checkout with its sales, and conversions with partners, served
by one process that owns the loyalty database, with its workers. Partners
convert points on a port of their own, over mutual TLS (served where
LOYALTY_PARTNER_GRPC_LISTEN and its TLS files are set)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from chassis.grpcserver import GrpcService
from chassis.service import ServiceContext, ServiceDefinition
from services.loyalty.server import checkout, partner_points, points, rules


def grpc_services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        *points.services(ctx),
        *rules.services(ctx),
        *checkout.services(ctx),
        *partner_points.services(ctx),
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [*points.workers(ctx), *rules.workers(ctx), *checkout.workers(ctx)]


definition = ServiceDefinition(
    name="loyalty",
    migrations_dir=Path(__file__).parent.parent / "migrations",
    grpc_services=grpc_services,
    subscriptions=points.subscriptions,
    workers=workers,
    partner_endpoint=partner_points.partner_endpoint,
)
