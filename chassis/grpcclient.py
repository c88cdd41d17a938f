"""The client side of the gRPC edge: channels to peer services, bearer
metadata, and the google.rpc details of a failed call read back.

Channels carry the OpenTelemetry client interceptors (the caller's span is
the parent of the call's span, and ``traceparent`` travels in the metadata),
keepalives that notice a dead peer, and a service config that retries
UNAVAILABLE on idempotent methods only. A method counts as idempotent when
its proto says so (``option idempotency_level``), when it is a standard read
(Get, List, BatchGet, Search), or when its request carries a ``request_id``:
the platform's rule is that such a mutation returns the first answer to a
repeated id, so resending it is safe.

``rich_error`` decodes what ``chassis.grpcserver`` puts in a status
(``ErrorInfo`` always; ``BadRequest`` and ``RetryInfo`` when they apply).
Only a status with ``ErrorInfo`` was written by a Cornucopia service on
purpose; anything else (a refused connection, a deadline, a proxy's error)
carries transport text that must not be shown to an end user.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from chassis.auth import service_token
from chassis.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

DETAILS_METADATA_KEY = "grpc-status-details-bin"

# Deadline of a service's call to a peer, unless the peer or the call says.
CALL_TIMEOUT_SECONDS = 5.0

Q = TypeVar("Q")
R = TypeVar("R")
S = TypeVar("S")

# Retries of UNAVAILABLE: a few quick attempts with jittered exponential
# backoff, bounded in any case by the call's deadline; the throttle stops
# retries when most calls to the peer fail, so a sick peer is not stormed.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
RETRY_THROTTLING: dict[str, Any] = {"maxTokens": 10, "tokenRatio": 0.1}

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Keepalive pings every 30 s, even between calls, so that a peer that went
# away without closing the connection is noticed before the next request.
# chassis.grpcserver accepts pings every 10 s without data.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
    # Reconnect to a restarted peer within seconds, not gRPC's default two
    # minutes of backoff.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

_READ_PREFIXES = ("Get", "List", "BatchGet", "Search")
_IDEMPOTENT_LEVELS = (
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
HEALTH_METHOD_PREFIX = f"/{HEALTH_SERVICE.full_name}/"


def traced(details: grpc.HandlerCallDetails | grpc.aio.ClientCallDetails) -> bool:
    """Whether a call is traced, on the client's side as on the server's:
    all but health checks, which probes make every few seconds and would
    bury real traces. (The instrumentation's own filters do the same
    through a generic method-name parser that costs some tens of
    microseconds on every call.)"""
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return not method.startswith(HEALTH_METHOD_PREFIX)


def is_idempotent(method: MethodDescriptor) -> bool:
    level = method.GetOptions().idempotency_level
    if level in _IDEMPOTENT_LEVELS:
        return True
    if method.name.startswith(_READ_PREFIXES):
        return True
    return "request_id" in method.input_type.fields_by_name


def retry_service_config(services: Iterable[ServiceDescriptor] = ()) -> dict[str, Any]:
    """A gRPC service config retrying UNAVAILABLE on the idempotent methods
    of ``services`` and on the health check (which every peer serves)."""
    names: list[dict[str, str]] = [{"service": HEALTH_SERVICE.full_name, "method": "Check"}]
    for service in services:
        names.extend(
            {"service": service.full_name, "method": method.name}
            for method in service.methods
            if is_idempotent(method) and service.full_name != HEALTH_SERVICE.full_name
        )
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}],
        "retryThrottling": RETRY_THROTTLING,
    }


def open_channel(
    target: str,
    *,
    services: Iterable[ServiceDescriptor] = (),
    options: Iterable[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An insecure (cluster-internal) channel to a peer at ``target``
    (``host:port`` or any gRPC target URI).

    ``services`` are the descriptors of the services to be called on it,
    e.g. ``members_pb2.DESCRIPTOR.services_by_name["MembersService"]``: their
    idempotent methods are retried on UNAVAILABLE. Extra ``options`` override
    the defaults. Health checks are not traced (``traced``)."""
    merged: dict[str, Any] = dict(CHANNEL_OPTIONS)
    merged["grpc.service_config"] = json.dumps(retry_service_config(services))
    merged.update(options)
    interceptors = aio_client_interceptors(filter_=traced)  # type: ignore[no-untyped-call]
    return grpc.aio.insecure_channel(
        target, options=list(merged.items()), interceptors=interceptors
    )


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying a bearer token, for ``metadata=``."""
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class RpcProblem:
    """A failed call as the callee described it."""

    code: grpc.StatusCode
    message: str
    # From ErrorInfo; empty when the status has none (not a Cornucopia
    # service's deliberate error: transport, deadline, proxy).
    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: tuple[FieldViolation, ...] = ()
    # From RetryInfo, in seconds.
    retry_delay: float | None = None

    @property
    def from_service(self) -> bool:
        """True when a Cornucopia service chose this error (it carries
        ErrorInfo), so its message is meant for the caller."""
        return bool(self.reason)


def _details_status(trailing: Any) -> status_pb2.Status | None:
    for key, value in trailing or ():
        if key == DETAILS_METADATA_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a malformed trailer is as good as none
                return None
            return status
    return None


def rich_error(exc: grpc.aio.AioRpcError) -> RpcProblem:
    """Decode ``grpc-status-details-bin`` of a failed call. The code and
    message are the call's own; the details add reason, domain, metadata,
    field violations and retry delay when the callee sent them."""
    code = exc.code()
    message = exc.details() or ""
    status = _details_status(exc.trailing_metadata())
    if status is None:
        return RpcProblem(code=code, message=message)
    reason = ""
    domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToMilliseconds() / 1000
    return RpcProblem(
        code=code,
        message=message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        violations=tuple(violations),
        retry_delay=retry_delay,
    )


_VERSION = re.compile(r"v\d+((alpha|beta)\d*)?")


def peer_name(target: str, services: Iterable[ServiceDescriptor] = ()) -> str:
    """What a peer is called in errors: the proto package of its first
    service without the version (``cornucopia.members.v1`` is ``members``),
    or else the host of its target."""
    for service in services:
        parts = [p for p in service.file.package.split(".") if not _VERSION.fullmatch(p)]
        if parts:
            return parts[-1]
    host = target.rpartition("/")[2].rsplit(":", 1)[0].strip("[]")
    return host or "peer"


class Stubs:
    """Stubs made once each, by their class: making one builds a callable
    for every method of its service, which costs more than the call it is
    made for. ``clear`` when their channel closes."""

    def __init__(self) -> None:
        self._made: dict[Callable[[grpc.aio.Channel], Any], Any] = {}

    def on(self, channel: grpc.aio.Channel, stub_class: Callable[[grpc.aio.Channel], S]) -> S:
        made = self._made.get(stub_class)
        if made is None:
            made = self._made[stub_class] = stub_class(channel)
        return made  # type: ignore[no-any-return]

    def clear(self) -> None:
        self._made.clear()


class Peer:
    """A service's channel to a peer service, opened on first use inside
    the running loop and closed when the service stops, and the metadata of
    the service's own short-lived token: a service calls a peer on its own
    behalf, since the peer masks and scopes what staff may see.

    ``name`` is what the peer is called in the errors of ``call`` (its
    ``<NAME>_UNAVAILABLE``); by default the proto package of its first
    service, e.g. ``members``."""

    def __init__(
        self,
        target: str,
        services: Iterable[ServiceDescriptor],
        *,
        token_secret: str,
        subject: str,
        name: str | None = None,
        timeout: float = CALL_TIMEOUT_SECONDS,
    ) -> None:
        self.target = target
        self.services = tuple(services)
        self.token_secret = token_secret
        self.subject = subject
        self.name = name or peer_name(target, self.services)
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stubs = Stubs()

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = open_channel(self.target, services=self.services)
            self._stubs.clear()
        return self._channel

    def stub(self, stub_class: Callable[[grpc.aio.Channel], S]) -> S:
        """The stub of ``stub_class`` on this peer's channel, made once:
        making one builds a callable for every method of its service, which
        costs more than the call it is made for."""
        return self._stubs.on(self.channel, stub_class)

    def metadata(self) -> tuple[tuple[str, str]]:
        return bearer(service_token(self.token_secret, self.subject))

    @overload
    async def call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Q, R],
        request: Q,
        *,
        timeout: float | None = None,
        missing_ok: Literal[False] = False,
    ) -> R: ...

    @overload
    async def call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Q, R],
        request: Q,
        *,
        timeout: float | None = None,
        missing_ok: bool,
    ) -> R | None: ...

    async def call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Q, R],
        request: Q,
        *,
        timeout: float | None = None,
        missing_ok: bool = False,
    ) -> R | None:
        """One unary call of ``method`` (a stub's, on ``self.channel``) with
        the service's token, within ``timeout`` (the peer's by default).

        A failure is raised as this service's own error (``passed_on``);
        with ``missing_ok``, NOT_FOUND is None instead."""
        try:
            return await method(
                request,
                metadata=self.metadata(),
                timeout=self.timeout if timeout is None else timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if missing_ok and exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise passed_on(rich_error(exc), peer=self.name) from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
            self._stubs.clear()


# What a peer refused because of what the caller asked: passed on as it is.
_CALLERS_MISTAKES: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def passed_on(problem: RpcProblem, *, peer: str) -> ServiceError:
    """A peer's refusal as this service's own error: a refusal the peer
    meant for the caller (it carries ErrorInfo) keeps its code, reason,
    metadata and field violations; anything else (the peer down, a
    deadline, our token refused) is UNAVAILABLE, ``<PEER>_UNAVAILABLE``."""
    if problem.from_service and problem.code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(
            problem.violations,
            message=problem.message,
            reason=problem.reason,
            metadata=problem.metadata,
        )
    kind = _CALLERS_MISTAKES.get(problem.code)
    if problem.from_service and kind is not None:
        return kind(
            problem.message,
            reason=problem.reason,
            metadata=problem.metadata,
            violations=problem.violations,
            retry_after_seconds=problem.retry_delay,
        )
    return Unavailable(
        f"the {peer} service did not answer; try again",
        reason=f"{peer.upper()}_UNAVAILABLE",
        retry_after_seconds=1.0,
    )
