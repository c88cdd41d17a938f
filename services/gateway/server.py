"""The store-facing HTTP/JSON gateway: FastAPI in front of the gRPC services.

It holds nothing durable. A request is checked for shape, the caller's
bearer token is checked and forwarded as it is, and the service's answer
(or its google.rpc error details) is translated to JSON (or RFC 9457
problem+json). Each request is the root span of its trace; the gRPC calls
it makes are its children.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import quote

import grpc
import structlog
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.openapi.utils import get_openapi
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chassis.config import Settings
from chassis.grpcclient import bearer, rich_error
from chassis.heap import settle_heap
from chassis.logs import configure_logging, get_logger
from chassis.telemetry import configure_tracing, shutdown_tracing
from cornucopia.members.v1 import members_pb2
from services.gateway import campaigns, cards, checkout, points, staff, stored_value, transfers
from services.gateway import notify as notify_routes
from services.gateway import notify_sends as send_routes
from services.gateway import notify_templates as template_routes
from services.gateway.deps import (
    CARDS_SERVICE,
    CHECKOUT_SERVICE,
    MEMBERS_SERVICE,
    PRICING_SERVICE,
    Peers,
    caller_token,
    idempotency_key,
    peers_of,
    problem_responses,
)
from services.gateway.notify_client import NOTIFY_SERVICES
from services.gateway.notify_client import notify as notify_stubs
from services.gateway.problems import (
    PROBLEM_JSON,
    FieldError,
    ProblemError,
    from_rpc,
    install_problem_handlers,
    internal_error,
    problem_response,
)
from services.gateway.schemas import (
    FollowUp,
    Health,
    Member,
    MemberPatch,
    NewFollowUp,
    NewMember,
    NotReady,
    Readiness,
    follow_up_from_proto,
    member_field,
    member_from_proto,
)

SERVICE = "gateway"
log = get_logger(__name__)
tracer = trace.get_tracer("services.gateway")

# Deadlines of the calls a request makes; past them the caller gets a 504.
CALL_TIMEOUT_SECONDS = 5.0
READINESS_TIMEOUT_SECONDS = 2.0
# An enrollment is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
SHUTDOWN_GRACE_SECONDS = 10
# Probes are neither traced nor logged: every few seconds they would bury
# the requests that matter.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


def _call_failed(exc: grpc.aio.AioRpcError, rename: Callable[[str], str] = str) -> ProblemError:
    return from_rpc(rich_error(exc), peer="members", rename=rename)


# -- routes -------------------------------------------------------------------------

router = APIRouter()


@router.get(
    "/healthz",
    tags=["health"],
    summary="Liveness",
    description="200 while the process runs.",
    operation_id="healthz",
)
async def healthz() -> Health:
    return Health()


# The services /readyz checks, with the name each answers health for (all
# the names of a process share one status). Only members gates readiness.
READINESS_SERVICES = {
    "members": MEMBERS_SERVICE.full_name,
    "cards": CARDS_SERVICE.full_name,
    "loyalty": CHECKOUT_SERVICE.full_name,
    "campaigns": PRICING_SERVICE.full_name,
    "notify": NOTIFY_SERVICES[0].full_name,  # NotifyService
}
# The answers of a health check that are a status the service reported;
# any other answer is a check that failed.
_HEALTH_STATUSES = frozenset(health_pb2.HealthCheckResponse.ServingStatus.keys())
_FAILED_CHECKS = {
    grpc.StatusCode.UNAVAILABLE: "UNREACHABLE",
    # What the standard health servicer answers for a name it does not know.
    grpc.StatusCode.NOT_FOUND: "SERVICE_UNKNOWN",
}


def _readiness_channels(request: Request) -> dict[str, grpc.aio.Channel]:
    peers = peers_of(request)
    return {
        "members": peers.members_channel,
        "cards": peers.cards_channel,
        "loyalty": peers.loyalty_channel,
        "campaigns": peers.campaigns_channel,
        "notify": notify_stubs(request).channel,
    }


async def _health_check(channel: grpc.aio.Channel, service: str) -> str:
    """The health status ``service`` reports on ``channel`` (``SERVING``,
    ``NOT_SERVING``...), or why it could not be had (``UNREACHABLE``,
    ``DEADLINE_EXCEEDED``...); never raises for a failed call."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=READINESS_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        return _FAILED_CHECKS.get(exc.code(), exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@router.get(
    "/readyz",
    tags=["health"],
    summary="Readiness",
    description="Checks the gRPC health of every service the gateway calls (members, cards, "
    f"loyalty, campaigns and notify) at once, each within {READINESS_TIMEOUT_SECONDS:g} s, "
    "and reports each answer in `checks`. Only members decides: 200 when it reports "
    "`SERVING`, else 503 `NOT_READY` (with the same `checks`). Staff login and the "
    "organisation live in members, so no store request works without it; another "
    "service being down does not make the gateway unready, since taking every replica "
    "out of the Service would also stop member lookups and enrolment. Its routes "
    "answer 503 or 504 meanwhile.",
    responses={
        503: {
            "model": NotReady,
            "description": "The members service is not `SERVING` or cannot be checked.",
        }
    },
    operation_id="readyz",
)
async def readyz(request: Request) -> Readiness:
    channels = _readiness_channels(request)
    # Concurrently: the whole check takes one timeout at most, not one per service.
    answers = await asyncio.gather(
        *(_health_check(channels[name], service) for name, service in READINESS_SERVICES.items())
    )
    checks = dict(zip(READINESS_SERVICES, answers, strict=True))
    members = checks["members"]
    if members != "SERVING":
        detail = (
            f"the members service is {members}"
            if members in _HEALTH_STATUSES
            else f"the members service cannot be checked ({members})"
        )
        raise ProblemError(503, "NOT_READY", detail, extensions={"checks": checks})
    return Readiness(checks=checks)


@router.post(
    "/v1/members",
    tags=["members"],
    summary="Enroll a member",
    description="Creates a member file. Needs an `Idempotency-Key`: a till that retries "
    "after a timeout gets the member created the first time. A mobile already in use "
    "is a 409 whose `reason` is `MOBILE_IN_USE`.",
    status_code=201,
    response_description="The new member; `Location` names it.",
    responses=problem_responses(400, 401, 403, 409, 422, 429, 500, 503, 504),
    operation_id="createMember",
)
async def create_member(
    body: NewMember,
    request: Request,
    response: Response,
    token: Annotated[str, Depends(caller_token)],
    key: Annotated[str, Depends(idempotency_key)],
) -> Member:
    call = members_pb2.CreateMemberRequest(request_id=key, member=body.to_proto())
    try:
        member = await peers_of(request).members.CreateMember(
            call, metadata=bearer(token), timeout=CALL_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        raise _call_failed(exc, member_field) from None
    response.headers["Location"] = f"/v1/members/{quote(member.member_id, safe='')}"
    if member.etag:
        response.headers["ETag"] = member.etag
    return member_from_proto(member)


@router.get(
    "/v1/members/{member_id}",
    tags=["members"],
    summary="Read a member",
    responses=problem_responses(400, 401, 403, 404, 429, 500, 503, 504),
    operation_id="getMember",
)
async def get_member(
    member_id: Annotated[str, Path(min_length=1, max_length=64, description="e.g. M7Q2K9X4TD")],
    request: Request,
    response: Response,
    token: Annotated[str, Depends(caller_token)],
) -> Member:
    try:
        member = await peers_of(request).members.GetMember(
            members_pb2.GetMemberRequest(member_id=member_id),
            metadata=bearer(token),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    except grpc.aio.AioRpcError as exc:
        raise _call_failed(exc) from None
    if member.etag:
        response.headers["ETag"] = member.etag
    return member_from_proto(member)


@router.get(
    "/v1/members",
    tags=["members"],
    summary="Look a member up by mobile or e-mail",
    description="Exactly one of `mobile` (any usual format, e.g. `138 0013 8000`) or `email`. "
    "The identifier you looked up with comes back in clear; other personal fields are "
    "masked unless your role may read this member's file.",
    responses=problem_responses(400, 401, 403, 404, 429, 500, 503, 504),
    operation_id="lookupMember",
)
async def lookup_member(
    request: Request,
    response: Response,
    token: Annotated[str, Depends(caller_token)],
    mobile: Annotated[str | None, Query(max_length=40)] = None,
    email: Annotated[str | None, Query(max_length=254)] = None,
) -> Member:
    try:
        member = await peers_of(request).members.LookupMember(
            members_pb2.LookupMemberRequest(mobile=mobile or "", email=email or ""),
            metadata=bearer(token),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    except grpc.aio.AioRpcError as exc:
        raise _call_failed(exc) from None
    if member.etag:
        response.headers["ETag"] = member.etag
    return member_from_proto(member)


@router.patch(
    "/v1/members/{member_id}",
    tags=["members"],
    summary="Change a member file",
    description="Changes the fields sent (a field sent as null is cleared). Send the "
    "`ETag` you read as `If-Match`: a file changed since is a 412. Only the member's "
    "home store, its region, HQ and the call center may change a file.",
    responses=problem_responses(400, 401, 403, 404, 409, 412, 422, 428, 429, 500, 503, 504),
    operation_id="updateMember",
)
async def update_member(
    *,
    member_id: Annotated[str, Path(min_length=1, max_length=64, description="e.g. M7Q2K9X4TD")],
    body: MemberPatch,
    request: Request,
    response: Response,
    token: Annotated[str, Depends(caller_token)],
    if_match: Annotated[
        str | None,
        Header(description="The ETag of the file as you read it."),
    ] = None,
) -> Member:
    if if_match is None or not if_match.strip():
        raise ProblemError(
            428,
            "PRECONDITION_REQUIRED",
            "send the member's ETag as If-Match so that no change is lost",
            errors=[FieldError(field="If-Match", description="required")],
        )
    member, paths = body.to_proto(member_id, if_match.strip())
    call = members_pb2.UpdateMemberRequest(
        member=member, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    try:
        updated = await peers_of(request).members.UpdateMember(
            call, metadata=bearer(token), timeout=CALL_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        problem = rich_error(exc)
        if problem.reason == "ETAG_MISMATCH":
            raise ProblemError(
                412, "ETAG_MISMATCH", "the member file changed since you read it; read it again"
            ) from None
        raise from_rpc(problem, peer="members", rename=member_field) from None
    if updated.etag:
        response.headers["ETag"] = updated.etag
    return member_from_proto(updated)


@router.post(
    "/v1/members/{member_id}/follow-ups",
    tags=["members"],
    summary="Record a follow-up",
    description="A call, message or visit with a member; any store may record one. Needs "
    "an `Idempotency-Key`.",
    status_code=201,
    responses=problem_responses(400, 401, 403, 404, 422, 429, 500, 503, 504),
    operation_id="recordFollowUp",
)
async def record_follow_up(
    member_id: Annotated[str, Path(min_length=1, max_length=64, description="e.g. M7Q2K9X4TD")],
    body: NewFollowUp,
    request: Request,
    token: Annotated[str, Depends(caller_token)],
    key: Annotated[str, Depends(idempotency_key)],
) -> FollowUp:
    call = members_pb2.RecordFollowUpRequest(request_id=key, follow_up=body.to_proto(member_id))

    def rename(name: str) -> str:
        return "Idempotency-Key" if name == "request_id" else name.removeprefix("follow_up.")

    try:
        saved = await peers_of(request).members.RecordFollowUp(
            call, metadata=bearer(token), timeout=CALL_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        raise _call_failed(exc, rename) from None
    return follow_up_from_proto(saved)


# -- tracing and access log -----------------------------------------------------------


class RequestTracing:
    """Makes each request the SERVER span of its trace (continuing the
    caller's ``traceparent`` when it sends one), writes one access log line,
    and answers an unhandled error with a 500 problem inside the span."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method: str = scope["method"]
        path: str = scope["path"]
        started = time.perf_counter()
        status = 0

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with tracer.start_as_current_span(
            method,
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await self.app(scope, receive, send_with_status)
            except Exception as exc:
                span.record_exception(exc)
                log.exception("unhandled error", method=method, path=path)
                if status:
                    raise  # the response has begun; nothing sensible to add
                await problem_response(internal_error(), path)(scope, receive, send_with_status)
            finally:
                route = _route_template(scope)
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
                log.info(
                    "http",
                    method=method,
                    route=route or path,
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )
                # Bound by caller_token for this request's lines only.
                structlog.contextvars.unbind_contextvars("principal")


TOO_LARGE_DETAIL = f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB"


class BodyTooLarge(StarletteHTTPException):
    def __init__(self) -> None:
        super().__init__(413, TOO_LARGE_DETAIL)


class LimitBody:
    """Refuses request bodies over MAX_BODY_BYTES with a 413 problem: at
    once when Content-Length says so, else as soon as the bytes read pass
    the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in transfers.UPLOAD_PATHS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            error = ProblemError(413, "CONTENT_TOO_LARGE", TOO_LARGE_DETAIL)
            await problem_response(error, scope["path"])(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    # FastAPI passes HTTPExceptions raised while it reads
                    # the body on to the handlers.
                    raise BodyTooLarge()
            return message

        await self.app(scope, receive_limited, send)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    template = getattr(route, "path", "")
    return template if isinstance(template, str) else ""


# -- the app --------------------------------------------------------------------------

TAGS = [
    {"name": "members", "description": "Member files: enrollment and lookup."},
    {
        "name": "cards",
        "description": "Member cards: issuing, resolving at the till, the lifecycle "
        "(lost, frozen, replaced, cancelled), links, history and the payment PIN.",
    },
    {"name": "card programs", "description": "The chain's card types."},
    {
        "name": "stored value",
        "description": "Money on cards: balances, recharges, holds, debits, refunds, "
        "statements, the chain's policy and its bonus rules.",
    },
    {
        "name": "checkout",
        "description": "What a POS terminal calls to sell, and to price a basket first.",
    },
    {
        "name": "sales",
        "description": "The sales checkouts recorded: receipts, lists by member and store, "
        "XLSX downloads, refunds and voids.",
    },
    {
        "name": "points",
        "description": "Members' points: accounts, history, lots, adjustments, transfers.",
    },
    {"name": "gifts", "description": "The gift catalogue and redemptions for points."},
    {"name": "tiers", "description": "Members' tiers, their progress and history."},
    {"name": "coupons", "description": "Members' coupon wallets, and a presented code checked."},
    {
        "name": "follow-ups",
        "description": "The calls store staff make to members: tasks, outcomes, statistics.",
    },
    {
        "name": "member events",
        "description": "Events for members: answers (RSVPs), check-in at the door, attendance.",
    },
    {"name": "auth", "description": "Staff login: a token for a login id and password."},
    {"name": "health", "description": "Liveness and readiness probes."},
]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    peers: Peers = app.state.peers
    await peers.close(grace=SHUTDOWN_GRACE_SECONDS / 2)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with errors as problem+json and without the
    422 validation body FastAPI documents but the gateway never sends."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses: dict[str, Any] = operation.get("responses", {})
            for code in list(responses):
                content: dict[str, Any] = responses[code].get("content", {})
                if "HTTPValidationError" in str(content):
                    del responses[code]
                elif int(code) >= 400 and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
    components: dict[str, Any] = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    app.openapi_schema = schema
    return schema


def create_app(
    settings: Settings,
    members_channel: grpc.aio.Channel | None = None,
    cards_channel: grpc.aio.Channel | None = None,
    loyalty_channel: grpc.aio.Channel | None = None,
    campaigns_channel: grpc.aio.Channel | None = None,
) -> FastAPI:
    """The gateway app. ``members_channel``, ``cards_channel``,
    ``loyalty_channel`` and ``campaigns_channel`` are for tests and
    embedders; by default a channel to ``settings.peer("members")``
    (``"cards"``, ``"loyalty"``, ``"campaigns"``) is opened on first use."""
    app = FastAPI(
        title="Cornucopia gateway",
        version="1",
        description="The HTTP/JSON API for stores. Errors are RFC 9457 `application/problem+json`.",
        openapi_tags=TAGS,
        lifespan=_lifespan,
        # The gateway makes its own server span (RequestTracing); FastAPI's
        # native telemetry would add a second one and log request values.
        telemetry={
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        },
    )
    app.state.settings = settings
    app.state.peers = Peers(
        settings, members_channel, cards_channel, loyalty_channel, campaigns_channel
    )
    install_problem_handlers(app)
    # Before the member routes: /v1/members/export is not a member id.
    app.include_router(transfers.router)
    app.include_router(router)
    app.include_router(cards.router)
    app.include_router(stored_value.router)
    app.include_router(checkout.router)
    app.include_router(points.router)
    app.include_router(staff.router)
    app.include_router(campaigns.router)
    app.include_router(notify_routes.router)
    app.include_router(send_routes.router)
    app.include_router(template_routes.router)
    # The last added is the outermost: the span covers the size check.
    app.add_middleware(LimitBody)
    app.add_middleware(RequestTracing)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080``, ``:8080`` for every interface)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"HTTP_LISTEN must be host:port, not {listen!r}")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":port" asks for every interface
    return host, int(port)


def main() -> None:
    settings = Settings.from_env(SERVICE)
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    configure_tracing(SERVICE)
    host, port = split_listen(settings.http_listen)
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        # Our logging pipeline (JSON, trace ids, redaction) and our own
        # access log line with the route and trace id.
        log_config=None,
        access_log=False,
        server_header=False,
        # SIGTERM: stop accepting, let requests in flight finish (at most
        # this long), then run the shutdown that closes the channels.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    settle_heap()
    log.info("http listening", listen=settings.http_listen)
    try:
        server.run()
    finally:
        shutdown_tracing()
    if not server.started:
        raise SystemExit(3)
