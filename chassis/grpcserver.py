"""The gRPC edge every service shares: a grpc.aio server with the standard
health service, reflection, graceful shutdown, and interceptors for tracing,
logging, error mapping and authentication. The interceptors wrap all four
kinds of method (unary and streaming requests and responses) alike.

Errors: a ``ServiceError`` raised anywhere below the edge becomes its status
code with ``google.rpc`` details (always ``ErrorInfo``; ``BadRequest`` for
field violations; ``RetryInfo`` when a retry makes sense). Anything else is
logged with its trace id and becomes INTERNAL with no exception text.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from chassis.auth import Principal, reset_current_principal, set_current_principal, verify_token
from chassis.config import GrpcConnections
from chassis.errors import Code, ServiceError, Unauthenticated
from chassis.grpcclient import HEALTH_METHOD_PREFIX, HEALTH_SERVICE, traced
from chassis.logs import get_logger

log = get_logger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Context = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler
    ServerInterceptor = grpc.aio.ServerInterceptor

# What an interceptor wraps a call in, given the call's context.
_Scope = Callable[[Context], AbstractAsyncContextManager[None]]

_RPC_CODES = {
    Code.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    Code.NOT_FOUND: code_pb2.NOT_FOUND,
    Code.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    Code.ABORTED: code_pb2.ABORTED,
    Code.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    Code.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    Code.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: code_pb2.UNAVAILABLE,
}

# Methods anyone may call: health checks and reflection (so that `buf curl`
# and Kubernetes probes work without a token).
PUBLIC_METHOD_PREFIXES = (
    HEALTH_METHOD_PREFIX,
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def error_domain(service: str) -> str:
    return f"{service}.cornucopia"


def to_grpc_status(err: ServiceError, domain: str) -> grpc.Status:
    status = status_pb2.Status(code=_RPC_CODES[err.code], message=err.message)
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=domain, metadata=err.metadata)
    status.details.add().Pack(info)
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in err.violations
            ]
        )
        status.details.add().Pack(bad)
    if err.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(err.retry_after_seconds * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    result: grpc.Status = rpc_status.to_status(status)
    return result


def internal_status(domain: str) -> grpc.Status:
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=domain))
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _wrap_unary_response(
    behaviour: Callable[..., Any], scope: _Scope
) -> Callable[[Any, Context], Awaitable[Any]]:
    """unary-unary and stream-unary: the request (or the request iterator,
    passed on untouched) goes to the handler inside the scope."""

    async def call(request_or_iterator: Any, context: Context) -> Any:
        async with scope(context):
            outcome = behaviour(request_or_iterator, context)
            if inspect.isawaitable(outcome):
                outcome = await outcome
            return outcome

    return call


def _wrap_stream_response(
    behaviour: Callable[..., Any], scope: _Scope
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    """unary-stream and stream-stream: an async generator (so grpc.aio
    sends what it yields) that stays inside the scope until the last
    message, so an error raised mid-stream is still mapped and the access
    log sees the whole call."""

    async def call(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
        async with scope(context):
            outcome = behaviour(request_or_iterator, context)
            if inspect.isawaitable(outcome):
                # The reader/writer API: the handler sends with context.write.
                await outcome
                return
            if not hasattr(outcome, "__aiter__"):
                for response in outcome:
                    yield response
                return
            try:
                async for response in outcome:
                    yield response
            finally:
                # Closed here, not whenever it is collected: the handler's
                # own clean-up runs while the principal is still current.
                aclose = getattr(outcome, "aclose", None)
                if aclose is not None:
                    await aclose()

    return call


def _wrap(handler: Handler, scope: _Scope) -> Handler:
    """The same handler, of whichever of the four kinds, run inside ``scope``."""
    codec: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(handler.unary_unary, scope), **codec
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(handler.stream_unary, scope), **codec
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(handler.unary_stream, scope), **codec
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(handler.stream_stream, scope), **codec
        )
    return handler


class WrappingInterceptor(ServerInterceptor):
    """Runs every call, of any of the four kinds, inside ``scope(context,
    method)``: an async context manager entered before the handler is called
    and left once its response, or its last streamed message, has been
    produced, or the exception it raised has gone through it."""

    @abstractmethod
    def scope(self, context: Context, method: str) -> AbstractAsyncContextManager[None]:
        """What the interceptor does around one call."""

    async def around(
        self,
        call: Callable[[Any, Context], Awaitable[Any]],
        request: Any,
        context: Context,
        method: str,
    ) -> Any:
        """One unary call through this interceptor alone."""
        async with self.scope(context, method):
            return await call(request, context)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method

        def scope(context: Context) -> AbstractAsyncContextManager[None]:
            return self.scope(context, method)

        return _wrap(handler, scope)


class AccessLogInterceptor(WrappingInterceptor):
    """One log line per call, whatever its kind, when it ends: method,
    status code and duration (of the whole stream for a streaming call)."""

    def __init__(self, service: str) -> None:
        self.service = service

    @contextlib.asynccontextmanager
    async def scope(self, context: Context, method: str) -> AsyncIterator[None]:
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            yield
            return
        started = time.perf_counter()
        code = "OK"
        with structlog.contextvars.bound_contextvars(rpc=method):
            try:
                yield
            except (asyncio.CancelledError, GeneratorExit):
                # The caller went away (or the server is stopping).
                code = "CANCELLED"
                raise
            except BaseException:
                code = _code_name(context, failed=True)
                raise
            else:
                code = _code_name(context)
            finally:
                log.info(
                    "rpc",
                    code=code,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )


def _code_name(context: Any, *, failed: bool = False) -> str:
    try:
        code = context.code()
    except Exception:
        return "UNKNOWN"
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class ErrorInterceptor(WrappingInterceptor):
    """Domain errors become statuses with details; the unexpected becomes
    INTERNAL with nothing of the exception sent to the caller. For a
    streaming call this holds mid-stream too: the messages already sent
    stay sent and the status ends the stream."""

    def __init__(self, service: str) -> None:
        self.domain = error_domain(service)

    @contextlib.asynccontextmanager
    async def scope(self, context: Context, method: str) -> AsyncIterator[None]:
        try:
            yield
        except ServiceError as err:
            status = to_grpc_status(err, self.domain)
            trace.get_current_span().set_attribute("cornucopia.error.reason", err.reason)
            await context.abort(status.code, status.details, status.trailing_metadata)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error", rpc=method)
            status = internal_status(self.domain)
            await context.abort(status.code, status.details, status.trailing_metadata)


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[None]:
    """Makes ``principal`` the current one, and names it in log lines, for
    the rest of a call: what every authenticating interceptor does once it
    knows who calls."""
    reset = set_current_principal(principal)
    try:
        with structlog.contextvars.bound_contextvars(
            principal=principal.subject, scope=str(principal.scope)
        ):
            yield
    finally:
        # A stream the caller abandoned may be closed from another
        # context, where the token cannot be reset (nor needs to be).
        with contextlib.suppress(ValueError):
            reset_current_principal(reset)


class AuthInterceptor(WrappingInterceptor):
    """Verifies the bearer token before the handler is called (before a
    streaming call reads its first message) and makes the principal current
    for the call. Authorisation (which role, which store) is decided by each
    method."""

    def __init__(self, token_secret: str) -> None:
        self.token_secret = token_secret

    @contextlib.asynccontextmanager
    async def scope(self, context: Context, method: str) -> AsyncIterator[None]:
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            yield
            return
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "send 'authorization: Bearer <token>'", reason="MISSING_CREDENTIALS"
            )
        with acting_as(verify_token(self.token_secret, token.strip())):
            yield


def server_options(connections: GrpcConnections) -> list[tuple[str, int]]:
    """The grpc.aio server's channel arguments."""

    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        # Ping a silent caller, and drop it when the ping goes unanswered.
        ("grpc.keepalive_time_ms", ms(connections.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", ms(connections.keepalive_timeout_seconds)),
        # Let callers ping (chassis.grpcclient does every 30 s), idle or not.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if connections.max_age_seconds > 0:
        # Callers reconnect now and then, and so find pods added since.
        options += [
            ("grpc.max_connection_age_ms", ms(connections.max_age_seconds)),
            ("grpc.max_connection_age_grace_ms", ms(connections.max_age_grace_seconds)),
        ]
    return options


@dataclass(frozen=True)
class GrpcService:
    """A servicer and how to register it."""

    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


class GrpcServer:
    """One listening port. By default in plain text, with callers
    authenticated by bearer token; ``credentials`` serve it over TLS, and
    ``auth`` authenticates callers another way (by client certificate, see
    ``chassis.mtls``) in place of the token check."""

    def __init__(
        self,
        service: str,
        listen: str,
        token_secret: str,
        services: Sequence[GrpcService],
        *,
        extra_interceptors: Iterable[ServerInterceptor] = (),
        connections: GrpcConnections | None = None,
        credentials: grpc.ServerCredentials | None = None,
        auth: ServerInterceptor | None = None,
    ) -> None:
        self.service = service
        self.listen = listen
        self.services = tuple(services)
        self.credentials = credentials
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        # Order matters: tracing outermost so the span covers everything;
        # the access log sees the final code; errors map what auth and the
        # handler raise.
        interceptors: list[ServerInterceptor] = [
            # Health probes (every few seconds from each kubelet and
            # balancer) are not traced: they would bury the real traces.
            aio_server_interceptor(  # type: ignore[no-untyped-call]
                filter_=traced
            ),
            AccessLogInterceptor(service),
            ErrorInterceptor(service),
            AuthInterceptor(token_secret) if auth is None else auth,
            *extra_interceptors,
        ]
        self.server = grpc.aio.server(
            interceptors=interceptors, options=server_options(connections or GrpcConnections())
        )
        self.port = 0

    async def start(self) -> int:
        for svc in self.services:
            svc.add_to_server(svc.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [svc.full_name for svc in self.services]
        reflection.enable_server_reflection(
            [
                *names,
                HEALTH_SERVICE.full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        await self.set_serving(False)
        if self.credentials is None:
            self.port = self.server.add_insecure_port(self.listen)
        else:
            self.port = self.server.add_secure_port(self.listen, self.credentials)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.listen}")
        await self.server.start()
        log.info(
            "grpc listening", listen=self.listen, port=self.port, tls=self.credentials is not None
        )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        for svc in self.services:
            await self.health.set(svc.full_name, status)

    async def stop(self, grace: float = 10.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
