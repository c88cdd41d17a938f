"""The campaigns gRPC edge: pricing, promotions and coupons, follow-up
plans, member events and referrals, served by one process that owns the campaigns database, with its
consumers and workers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from chassis.grpcserver import GrpcService
from chassis.inbox import Subscription
from chassis.service import ServiceContext, ServiceDefinition
from services.campaigns.server import followups, lotteries, member_events, pricing


def grpc_services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        *pricing.services(ctx),
        *followups.services(ctx),
        *member_events.services(ctx),
        *lotteries.services(ctx),
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [
        *pricing.workers(ctx),
        *followups.workers(ctx),
        *member_events.workers(ctx),
        *lotteries.workers(ctx),
    ]


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription]:
    return [
        *pricing.subscriptions(ctx),
        *followups.subscriptions(ctx),
        *member_events.subscriptions(ctx),
        *lotteries.subscriptions(ctx),
    ]


definition = ServiceDefinition(
    name="campaigns",
    migrations_dir=Path(__file__).parent.parent / "migrations",
    grpc_services=grpc_services,
    subscriptions=subscriptions,
    workers=workers,
)
