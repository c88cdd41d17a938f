"""The gRPC edge every service shares: a grpc.aio server with the standard
health service, reflection, graceful shutdown, and interceptors for tracing,
logging, error mapping and authentication.

Errors: a ``ServiceError`` raised anywhere below the edge becomes its status
code with ``google.rpc`` details (always ``ErrorInfo``; ``BadRequest`` for
field violations; ``RetryInfo`` when a retry makes sense). Anything else is
logged with its trace id and becomes INTERNAL with no exception text.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
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

from chassis.auth import reset_current_principal, set_current_principal, verify_token
from chassis.errors import Code, ServiceError, Unauthenticated
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
    "/grpc.health.v1.Health/",
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


class _WrappingInterceptor(ServerInterceptor):
    """Wraps unary-unary handlers with ``around(call, request, context, method)``."""

    async def around(
        self,
        call: Callable[[Any, Context], Awaitable[Any]],
        request: Any,
        context: Context,
        method: str,
    ) -> Any:
        raise NotImplementedError  # each interceptor defines its behaviour

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = details.method

        async def wrapped(request: Any, context: Context) -> Any:
            return await self.around(inner, request, context, method)  # type: ignore[arg-type]

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class AccessLogInterceptor(_WrappingInterceptor):
    """One log line per call: method, status code, duration, principal."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def around(self, call: Any, request: Any, context: Any, method: str) -> Any:
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            return await call(request, context)
        started = time.perf_counter()
        code = "OK"
        with structlog.contextvars.bound_contextvars(rpc=method):
            try:
                return await call(request, context)
            except BaseException:
                code = _code_name(context)
                raise
            finally:
                if code == "OK":
                    code = _code_name(context)
                log.info(
                    "rpc",
                    code=code,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )


def _code_name(context: Any) -> str:
    try:
        code = context.code()
    except Exception:
        return "UNKNOWN"
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class ErrorInterceptor(_WrappingInterceptor):
    """Domain errors become statuses with details; the unexpected becomes
    INTERNAL with nothing of the exception sent to the caller."""

    def __init__(self, service: str) -> None:
        self.domain = error_domain(service)

    async def around(self, call: Any, request: Any, context: Any, method: str) -> Any:
        try:
            return await call(request, context)
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


class AuthInterceptor(_WrappingInterceptor):
    """Verifies the bearer token and makes the principal current for the
    call. Authorisation (which role, which store) is decided by each method."""

    def __init__(self, token_secret: str) -> None:
        self.token_secret = token_secret

    async def around(self, call: Any, request: Any, context: Any, method: str) -> Any:
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            return await call(request, context)
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "send 'authorization: Bearer <token>'", reason="MISSING_CREDENTIALS"
            )
        principal = verify_token(self.token_secret, token.strip())
        reset = set_current_principal(principal)
        try:
            with structlog.contextvars.bound_contextvars(
                principal=principal.subject, scope=str(principal.scope)
            ):
                return await call(request, context)
        finally:
            reset_current_principal(reset)


@dataclass(frozen=True)
class GrpcService:
    """A servicer and how to register it."""

    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


class GrpcServer:
    def __init__(
        self,
        service: str,
        listen: str,
        token_secret: str,
        services: Sequence[GrpcService],
        *,
        extra_interceptors: Iterable[ServerInterceptor] = (),
    ) -> None:
        self.service = service
        self.listen = listen
        self.services = tuple(services)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        # Order matters: tracing outermost so the span covers everything;
        # the access log sees the final code; errors map what auth and the
        # handler raise.
        interceptors: list[ServerInterceptor] = [
            aio_server_interceptor(),  # type: ignore[no-untyped-call]
            AccessLogInterceptor(service),
            ErrorInterceptor(service),
            AuthInterceptor(token_secret),
            *extra_interceptors,
        ]
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
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
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        await self.set_serving(False)
        self.port = self.server.add_insecure_port(self.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.listen}")
        await self.server.start()
        log.info("grpc listening", listen=self.listen, port=self.port)
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
