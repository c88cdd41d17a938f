"""The notify gRPC edge: message history and delivery (``messages``), served
by one process that owns the notify database, with its consumers and
workers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from chassis.grpcserver import GrpcService
from chassis.inbox import Subscription
from chassis.service import ServiceContext, ServiceDefinition
from services.notify import events, peers
from services.notify.server import messages, preferences, sends, templates


def grpc_services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        *messages.services(ctx),
        *sends.services(ctx),
        *templates.services(ctx),
        *preferences.services(ctx),
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [
        *messages.workers(ctx),
        *sends.workers(ctx),
        *templates.workers(ctx),
        # Every process's own: drops the contacts members has changed.
        peers.contact_evictions(ctx).run,
    ]


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription]:
    return events.subscriptions()


definition = ServiceDefinition(
    name="notify",
    migrations_dir=Path(__file__).parent.parent / "migrations",
    grpc_services=grpc_services,
    subscriptions=subscriptions,
    workers=workers,
)
