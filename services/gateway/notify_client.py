"""What the notify routes share in calling the notify service: one channel
for its four gRPC services (messages, sends, templates and preferences),
opened on first use and closed at shutdown; one call with a token, whose
failure is the problem the caller gets; and the check of the SMS provider's
shared secret.

Staff routes forward the caller's token (notify decides who may do what).
A route with no user (the provider's callbacks, the public unsubscribe
link) calls with a service token of the gateway's own. The provider proves
itself with the shared secret ``NOTIFY_RECEIPT_SECRET`` in the
``X-Receipt-Secret`` header, compared in constant time; without the secret
set, its routes are closed."""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import grpc
from fastapi import Header, Request

from chassis.auth import service_token
from chassis.grpcclient import bearer, open_channel, rich_error
from cornucopia.notify.v1 import (
    notify_pb2,
    notify_pb2_grpc,
    preferences_pb2,
    preferences_pb2_grpc,
    sends_pb2,
    sends_pb2_grpc,
    templates_pb2,
    templates_pb2_grpc,
)
from services.gateway.problems import ProblemError, from_rpc

T = TypeVar("T")

NOTIFY_SERVICES = (
    notify_pb2.DESCRIPTOR.services_by_name["NotifyService"],
    sends_pb2.DESCRIPTOR.services_by_name["SendsService"],
    templates_pb2.DESCRIPTOR.services_by_name["TemplatesService"],
    preferences_pb2.DESCRIPTOR.services_by_name["PreferencesService"],
)
# Deadline of each call to the notify service; past it the caller gets a 504.
CALL_TIMEOUT_SECONDS = 5.0
GATEWAY_SUBJECT = "gateway"
PROVIDER_SECRET_HEADER = "X-Receipt-Secret"  # noqa: S105 - a header name
PROVIDER_SECRET_ENV = "NOTIFY_RECEIPT_SECRET"  # noqa: S105 - a variable name


# -- the channel ------------------------------------------------------------------------


@dataclass(frozen=True)
class NotifyStubs:
    """The stubs of notify's services, on one channel."""

    channel: grpc.aio.Channel
    # False for a channel a test or an embedder gave the app: theirs to close.
    owned: bool
    messages: notify_pb2_grpc.NotifyServiceAsyncStub
    sends: sends_pb2_grpc.SendsServiceAsyncStub
    templates: templates_pb2_grpc.TemplatesServiceAsyncStub
    preferences: preferences_pb2_grpc.PreferencesServiceAsyncStub

    @classmethod
    def on(cls, channel: grpc.aio.Channel, *, owned: bool) -> NotifyStubs:
        return cls(
            channel,
            owned,
            notify_pb2_grpc.NotifyServiceStub(channel),  # type: ignore[arg-type]
            sends_pb2_grpc.SendsServiceStub(channel),  # type: ignore[arg-type]
            templates_pb2_grpc.TemplatesServiceStub(channel),  # type: ignore[arg-type]
            preferences_pb2_grpc.PreferencesServiceStub(channel),  # type: ignore[arg-type]
        )


def notify(request: Request) -> NotifyStubs:
    """The notify service's stubs, on a channel opened on first use and
    kept with the app (or the one a test or embedder put on the app as
    ``state.notify_channel``)."""
    state = request.app.state
    stubs: NotifyStubs | None = getattr(state, "notify_stubs", None)
    if stubs is None:
        given = getattr(state, "notify_channel", None)
        if given is not None:
            stubs = NotifyStubs.on(given, owned=False)
        else:
            channel = open_channel(state.settings.peer("notify"), services=NOTIFY_SERVICES)
            stubs = NotifyStubs.on(channel, owned=True)
        state.notify_stubs = stubs
    return stubs


async def close_notify(app: Any) -> None:
    """Closes the channel to notify the gateway opened, if it did."""
    stubs: NotifyStubs | None = getattr(app.state, "notify_stubs", None)
    app.state.notify_stubs = None
    if stubs is not None and stubs.owned:
        await stubs.channel.close(None)


@asynccontextmanager
async def notify_lifespan(app: Any) -> AsyncIterator[None]:
    """The notify routers' lifespan, merged into the app's: the channel is
    closed on shutdown with the others (once, whichever routers share it)."""
    yield
    await close_notify(app)


# -- calls --------------------------------------------------------------------------------


def notify_field(name: str) -> str:
    """The notify service's field names as the HTTP request spells them."""
    return "Idempotency-Key" if name == "request_id" else name


def notify_failed(
    exc: grpc.aio.AioRpcError, rename: Callable[[str], str] = notify_field
) -> ProblemError:
    """A failed call to the notify service as the caller's problem."""
    return from_rpc(rich_error(exc), peer="notify", rename=rename)


async def call_notify(
    method: Callable[..., Awaitable[T]],
    message: Any,
    token: str,
    *,
    rename: Callable[[str], str] = notify_field,
    timeout: float = CALL_TIMEOUT_SECONDS,
) -> T:
    """One call to the notify service with ``token``; a failure is the
    problem the caller gets, its field names spelled by ``rename``."""
    try:
        return await method(message, metadata=bearer(token), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise notify_failed(exc, rename) from None


def gateway_token(request: Request) -> str:
    """A service token of the gateway's own, for a route with no user."""
    return service_token(request.app.state.settings.token_secret, GATEWAY_SUBJECT)


# -- the SMS provider's shared secret -------------------------------------------------------


def provider_secret_matches(given: str | None, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest((given or "").encode(), expected.encode())


def provider_secret(reason: str, detail: str) -> Callable[[str | None], None]:
    """A route dependency: the request carries the provider's shared secret,
    or it is a 401 with ``reason``."""

    def check(
        secret: Annotated[
            str | None,
            Header(alias=PROVIDER_SECRET_HEADER, description="The provider's shared secret."),
        ] = None,
    ) -> None:
        if not provider_secret_matches(secret, os.environ.get(PROVIDER_SECRET_ENV, "")):
            raise ProblemError(401, reason, detail)

    return check
