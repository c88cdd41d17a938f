"""The gateway's routes against a real gRPC peer: JSON in and out, the
idempotency key and token forwarded, every error as problem+json."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from chassis.auth import Role, Scope, ScopeLevel
from chassis.config import Settings
from chassis.errors import Unavailable
from chassis.grpcclient import open_channel
from cornucopia.members.v1 import members_pb2
from services.gateway import server
from services.gateway.server import MEMBERS_SERVICE, create_app
from services.gateway.tests.conftest import Peer, gateway_settings, headers, token

ANA: dict[str, Any] = {
    "home_store_id": "S001",
    "given_name": "Ana",
    "family_name": "García",
    "mobile": "+34 612 345 678",
    "email": "ana@example.com",
    "gender": "female",
    "birthday": "1990-04-12",
    "enrollment_channel": "store",
    "preferred_language": "es",
}


def assert_problem(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["reason"] == reason
    assert problem["type"] == "https://cornucopia.dev/problems/" + reason.lower().replace("_", "-")
    assert problem["title"]
    assert problem["instance"] == response.request.url.path
    assert isinstance(problem["errors"], list)
    return problem


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- enrollment ------------------------------------------------------------------------


async def test_enrolling_returns_the_member_and_its_location(
    http: httpx.AsyncClient, members: Peer
) -> None:
    response = await http.post("/v1/members", json=ANA, headers=headers())

    assert response.status_code == 201, response.text
    member = response.json()
    assert member["member_id"] == "M000000001"
    assert response.headers["location"] == "/v1/members/M000000001"
    assert response.headers["etag"] == 'W/"1"'
    assert member["mobile"] == "+34612345678"
    assert member["given_name"] == "Ana"
    assert member["family_name"] == "García"
    assert member["gender"] == "female"
    assert member["enrollment_channel"] == "store"
    assert member["birthday"] == {"year": 1990, "month": 4, "day": 12}
    assert member["preferred_language"] == "es"
    assert member["create_time"].startswith("2026-11-22T09:30:00")
    assert member["enrolled_by"]["principal"] == "till-7"
    assert member["enrolled_by"]["store_id"] == "S001"

    sent = members.fake.create_requests[0].member
    assert sent.gender == members_pb2.GENDER_FEMALE
    assert sent.enrollment_channel == members_pb2.ENROLLMENT_CHANNEL_STORE
    assert (sent.birthday.year, sent.birthday.month, sent.birthday.day) == (1990, 4, 12)


async def test_the_idempotency_key_is_the_request_id_and_the_token_is_forwarded(
    http: httpx.AsyncClient, members: Peer
) -> None:
    bearer = token()
    first = await http.post("/v1/members", json=ANA, headers=headers("till-7-0042", bearer))
    again = await http.post("/v1/members", json=ANA, headers=headers("till-7-0042", bearer))

    assert first.status_code == again.status_code == 201
    assert again.json()["member_id"] == first.json()["member_id"]
    assert [r.request_id for r in members.fake.create_requests] == ["till-7-0042"] * 2
    assert members.fake.metadata[0]["authorization"] == f"Bearer {bearer}"
    assert "traceparent" in members.fake.metadata[0]


async def test_unspecified_enums_are_null_and_a_birthday_may_be_an_object(
    http: httpx.AsyncClient,
) -> None:
    body = {
        "home_store_id": "S001",
        "given_name": "Li",
        "mobile": "13800138000",
        "birthday": {"month": 2, "day": 29},
    }
    response = await http.post("/v1/members", json=body, headers=headers())

    assert response.status_code == 201, response.text
    member = response.json()
    assert member["gender"] is None
    assert member["enrollment_channel"] is None
    assert member["email"] == ""
    assert member["birthday"] == {"year": 0, "month": 2, "day": 29}


async def test_a_missing_idempotency_key_is_a_400(http: httpx.AsyncClient, members: Peer) -> None:
    response = await http.post("/v1/members", json=ANA, headers=headers(key=None))

    problem = assert_problem(response, 400, "IDEMPOTENCY_KEY_REQUIRED")
    assert problem["errors"] == [{"field": "Idempotency-Key", "description": "required"}]
    assert problem["domain"] == "gateway.cornucopia"
    assert members.fake.create_requests == []


async def test_a_blank_idempotency_key_is_a_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/members", json=ANA, headers=headers(key="  "))

    assert_problem(response, 400, "IDEMPOTENCY_KEY_REQUIRED")


async def test_a_missing_token_is_a_401(http: httpx.AsyncClient, members: Peer) -> None:
    response = await http.post("/v1/members", json=ANA, headers={"idempotency-key": "k1"})

    problem = assert_problem(response, 401, "MISSING_CREDENTIALS")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Bearer" in problem["detail"]
    assert members.fake.create_requests == []


async def test_a_forged_token_is_a_401_at_the_edge(http: httpx.AsyncClient, members: Peer) -> None:
    forged = token(secret="not-the-chain-secret-at-all-0123456789")
    response = await http.post("/v1/members", json=ANA, headers=headers(bearer=forged))

    assert_problem(response, 401, "TOKEN_INVALID")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert members.fake.create_requests == []


async def test_invalid_fields_are_a_400_naming_the_json_fields(http: httpx.AsyncClient) -> None:
    body = {**ANA, "mobile": "12", "given_name": "", "birthday": "1990-13-01"}
    response = await http.post("/v1/members", json=body, headers=headers())

    problem = assert_problem(response, 400, "INVALID_FIELDS")
    assert problem["domain"] == "members.cornucopia"
    assert problem["detail"] == "the request has invalid fields"
    fields = {e["field"]: e["description"] for e in problem["errors"]}
    assert fields == {
        "given_name": "required",
        "mobile": "not a valid phone number",
        "birthday": "not a real calendar day",
    }


async def test_a_home_store_not_in_the_organisation_is_a_400_naming_the_field(
    http: httpx.AsyncClient,
) -> None:
    hq = token((Role.HQ_ADMIN,), Scope(ScopeLevel.HQ))
    response = await http.post(
        "/v1/members", json={**ANA, "home_store_id": "S999"}, headers=headers(bearer=hq)
    )

    problem = assert_problem(response, 400, "INVALID_FIELDS")
    assert problem["errors"] == [{"field": "home_store_id", "description": "no such store"}]


async def test_a_mobile_in_use_is_a_409(http: httpx.AsyncClient) -> None:
    await http.post("/v1/members", json=ANA, headers=headers("k1"))
    response = await http.post(
        "/v1/members", json={**ANA, "given_name": "Anita"}, headers=headers("k2")
    )

    problem = assert_problem(response, 409, "MOBILE_IN_USE")
    assert problem["detail"] == "a member with this mobile number already exists"
    assert problem["domain"] == "members.cornucopia"


async def test_a_reused_idempotency_key_is_a_422(http: httpx.AsyncClient) -> None:
    await http.post("/v1/members", json=ANA, headers=headers("k1"))
    response = await http.post(
        "/v1/members", json={**ANA, "given_name": "Anita"}, headers=headers("k1")
    )

    problem = assert_problem(response, 422, "IDEMPOTENCY_KEY_REUSED")
    assert problem["errors"] == [
        {"field": "Idempotency-Key", "description": "already used for a different request"}
    ]


async def test_an_unexpected_error_is_a_500_that_tells_nothing(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/v1/members", json={**ANA, "given_name": "Boom"}, headers=headers())

    problem = assert_problem(response, 500, "INTERNAL")
    for leak in ("hunter2", "db-7", "RuntimeError", "password", "internal error"):
        assert leak not in response.text
    assert problem["errors"] == []
    assert len(problem["trace_id"]) == 32


@pytest.mark.parametrize(
    ("given_name", "status", "reason"),
    [
        ("Closed", 422, "STORE_CLOSED"),
        ("Racing", 409, "CONCURRENT_CHANGE"),
        ("Busy", 429, "RATE_LIMITED"),
    ],
)
async def test_service_errors_map_to_http_statuses(
    http: httpx.AsyncClient, given_name: str, status: int, reason: str
) -> None:
    response = await http.post(
        "/v1/members", json={**ANA, "given_name": given_name}, headers=headers()
    )

    assert_problem(response, status, reason)
    if status == 429:
        assert response.headers["retry-after"] == "3"


async def test_a_store_outside_the_tokens_scope_is_a_403(http: httpx.AsyncClient) -> None:
    other_store = token(scope=Scope(ScopeLevel.STORE, "S002"))
    response = await http.post("/v1/members", json=ANA, headers=headers(bearer=other_store))

    problem = assert_problem(response, 403, "OUT_OF_SCOPE")
    assert problem["domain"] == "members.cornucopia"


async def test_an_unavailable_service_is_a_503_with_its_retry_delay(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/v1/members", json={**ANA, "given_name": "Down"}, headers=headers())

    assert_problem(response, 503, "MAINTENANCE")
    assert response.headers["retry-after"] == "30"


async def test_a_slow_service_is_a_504(
    http: httpx.AsyncClient, members: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "CALL_TIMEOUT_SECONDS", 0.2)
    members.fake.delay = 2.0

    response = await http.post("/v1/members", json=ANA, headers=headers())

    problem = assert_problem(response, 504, "DEADLINE_EXCEEDED")
    assert problem["detail"] == "the members service did not answer in time; try again shortly"


async def test_an_unreachable_service_is_a_503_without_transport_text() -> None:
    target = f"127.0.0.1:{free_port()}"
    channel = open_channel(target, services=[MEMBERS_SERVICE])
    app = create_app(gateway_settings(target), members_channel=channel)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway"
        ) as http:
            response = await http.get("/v1/members/M000000001", headers=headers())
    finally:
        await channel.close()

    problem = assert_problem(response, 503, "UNAVAILABLE")
    assert response.headers["retry-after"] == "1"
    assert "127.0.0.1" not in response.text
    assert problem["detail"] == "the members service cannot be reached right now; try again shortly"


async def test_unavailable_is_retried_on_idempotent_methods(
    http: httpx.AsyncClient, members: Peer
) -> None:
    members.fake.fail_next = [Unavailable("warming up", reason="WARMING_UP")]
    created = await http.post("/v1/members", json=ANA, headers=headers("k-retry"))
    assert created.status_code == 201, created.text
    assert [r.request_id for r in members.fake.create_requests] == ["k-retry"] * 2

    members.fake.fail_next = [Unavailable("warming up", reason="WARMING_UP")]
    member_id = created.json()["member_id"]
    fetched = await http.get(f"/v1/members/{member_id}", headers=headers())
    assert fetched.status_code == 200, fetched.text
    assert members.fake.get_calls == 2


# -- request validation ----------------------------------------------------------------


async def test_malformed_json_is_a_400_problem(http: httpx.AsyncClient, members: Peer) -> None:
    response = await http.post(
        "/v1/members",
        content=b'{"home_store_id": "S001",',
        headers={**headers(), "content-type": "application/json"},
    )

    problem = assert_problem(response, 400, "MALFORMED_JSON")
    assert problem["errors"][0]["field"] == "body"
    assert "not valid JSON" in problem["errors"][0]["description"]
    assert members.fake.create_requests == []


async def test_wrong_types_and_unknown_fields_are_a_400_listing_each_field(
    http: httpx.AsyncClient, members: Peer
) -> None:
    body = {
        "home_store_id": "S001",
        "given_name": 42,
        "mobile": "+34 612 345 678",
        "gender": "robot",
        "birthday": {"year": "nineteen", "month": 4, "day": 12},
        "favourite_colour": "green",
    }
    response = await http.post("/v1/members", json=body, headers=headers())

    problem = assert_problem(response, 400, "INVALID_FIELDS")
    fields = {e["field"] for e in problem["errors"]}
    assert fields == {"given_name", "gender", "birthday.year", "favourite_colour"}
    assert "robot" not in response.text  # messages name the shape, not the value
    assert members.fake.create_requests == []


async def test_required_fields_and_bad_dates_are_reported(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/members", json={"given_name": "Ana", "birthday": "12/04/1990"}, headers=headers()
    )

    problem = assert_problem(response, 400, "INVALID_FIELDS")
    assert {e["field"] for e in problem["errors"]} == {"home_store_id", "mobile", "birthday"}


async def test_a_body_that_is_not_an_object_is_a_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/members", json=["Ana"], headers=headers())

    problem = assert_problem(response, 400, "INVALID_FIELDS")
    assert problem["errors"][0]["field"] == "body"


# -- reading ---------------------------------------------------------------------------


async def test_reading_a_member(http: httpx.AsyncClient) -> None:
    created = (await http.post("/v1/members", json=ANA, headers=headers())).json()

    response = await http.get(f"/v1/members/{created['member_id']}", headers=headers())

    assert response.status_code == 200
    assert response.json() == created
    assert response.headers["etag"] == 'W/"1"'


async def test_reading_an_unknown_member_is_a_404(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/members/MNOSUCHONE", headers=headers())

    problem = assert_problem(response, 404, "MEMBER_NOT_FOUND")
    assert problem["detail"] == "no member with this id"
    assert problem["domain"] == "members.cornucopia"


async def test_reading_needs_a_token(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/members/M000000001")

    assert_problem(response, 401, "MISSING_CREDENTIALS")


async def test_unknown_routes_and_methods_are_problems(http: httpx.AsyncClient) -> None:
    assert_problem(await http.get("/v1/nothing-here"), 404, "NOT_FOUND")
    response = await http.delete("/v1/members", headers=headers())
    assert_problem(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers["allow"] == "POST"


# -- health ----------------------------------------------------------------------------


async def test_liveness(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


OTHER_UPSTREAMS = ("cards", "loyalty", "campaigns", "notify")
ALL_SERVING = {name: "SERVING" for name in server.READINESS_SERVICES}


class SlowHealth(health_pb2_grpc.HealthServicer):
    """A health service that answers long after any probe gave up."""

    async def Check(  # type: ignore[override]
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        await asyncio.sleep(30)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Upstream:
    """A real grpc.aio server with the standard health service, standing in
    for one of the services behind the gateway."""

    name: str
    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set(self, status: int) -> None:
        await self.health.set(server.READINESS_SERVICES[self.name], status)


async def start_upstream(name: str, *, slow: bool = False) -> Upstream:
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    grpc_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(SlowHealth() if slow else servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    upstream = Upstream(name, grpc_server, servicer, port)
    await upstream.set(health_pb2.HealthCheckResponse.SERVING)
    return upstream


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, Upstream]]:
    """cards, loyalty, campaigns and notify, each SERVING under the name the
    gateway checks."""
    started = {name: await start_upstream(name) for name in OTHER_UPSTREAMS}
    yield started
    for upstream in started.values():
        await upstream.server.stop(grace=0)


@asynccontextmanager
async def gateway_to(targets: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway opening its own channels to ``targets`` (name: host:port)."""
    settings = Settings(service="gateway", environment="test", peers=targets)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http,
    ):
        yield http


def targets_of(members: Peer, upstreams: dict[str, Upstream]) -> dict[str, str]:
    return {"members": members.target} | {n: u.target for n, u in upstreams.items()}


async def test_readiness_follows_the_members_health_check(
    http: httpx.AsyncClient, members: Peer
) -> None:
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ok"
    assert body["checks"]["members"] == "SERVING"
    assert set(body["checks"]) == set(ALL_SERVING)

    await members.server.set_serving(False)
    not_ready = await http.get("/readyz")
    problem = assert_problem(not_ready, 503, "NOT_READY")
    assert "NOT_SERVING" in problem["detail"]
    assert problem["checks"]["members"] == "NOT_SERVING"


async def test_readiness_reports_every_upstream_when_all_are_serving(
    members: Peer, upstreams: dict[str, Upstream]
) -> None:
    async with gateway_to(targets_of(members, upstreams)) as http:
        response = await http.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {
            "members": "SERVING",
            "cards": "SERVING",
            "loyalty": "SERVING",
            "campaigns": "SERVING",
            "notify": "SERVING",
        },
    }


@pytest.mark.parametrize("down", OTHER_UPSTREAMS)
@pytest.mark.parametrize(
    ("how", "reported"), [("stopped", "UNREACHABLE"), ("not serving", "NOT_SERVING")]
)
async def test_another_upstream_down_is_reported_but_keeps_the_gateway_ready(
    members: Peer, upstreams: dict[str, Upstream], down: str, how: str, reported: str
) -> None:
    if how == "stopped":
        await upstreams[down].server.stop(grace=0)
    else:
        await upstreams[down].set(health_pb2.HealthCheckResponse.NOT_SERVING)

    async with gateway_to(targets_of(members, upstreams)) as http:
        response = await http.get("/readyz")

    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "checks": ALL_SERVING | {down: reported}}


async def test_members_not_serving_is_a_503_that_carries_every_check(
    members: Peer, upstreams: dict[str, Upstream]
) -> None:
    await members.server.set_serving(False)
    await upstreams["loyalty"].server.stop(grace=0)

    async with gateway_to(targets_of(members, upstreams)) as http:
        response = await http.get("/readyz")

    problem = assert_problem(response, 503, "NOT_READY")
    assert problem["detail"] == "the members service is NOT_SERVING"
    assert problem["checks"] == ALL_SERVING | {"members": "NOT_SERVING", "loyalty": "UNREACHABLE"}


async def test_members_unreachable_is_a_503_that_carries_every_check(
    members: Peer, upstreams: dict[str, Upstream]
) -> None:
    await members.server.stop(grace=0)

    async with gateway_to(targets_of(members, upstreams)) as http:
        response = await http.get("/readyz")

    problem = assert_problem(response, 503, "NOT_READY")
    assert problem["detail"] == "the members service cannot be checked (UNREACHABLE)"
    assert problem["checks"] == ALL_SERVING | {"members": "UNREACHABLE"}


async def test_the_checks_run_at_once_within_one_timeout(
    members: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout = 1.0
    monkeypatch.setattr(server, "READINESS_TIMEOUT_SECONDS", timeout)
    slow = {name: await start_upstream(name, slow=True) for name in OTHER_UPSTREAMS}
    try:
        async with gateway_to(targets_of(members, slow)) as http:
            started = time.monotonic()
            response = await http.get("/readyz")
            elapsed = time.monotonic() - started
    finally:
        for upstream in slow.values():
            await upstream.server.stop(grace=0)

    # One after the other, four silent services would take 4 x the timeout
    # (the rest of the bound is room for a busy machine).
    assert elapsed < 3 * timeout
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {
        "members": "SERVING",
        **{name: "DEADLINE_EXCEEDED" for name in OTHER_UPSTREAMS},
    }


async def test_a_silent_members_is_a_503_within_the_timeout(
    upstreams: dict[str, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout = 0.5
    monkeypatch.setattr(server, "READINESS_TIMEOUT_SECONDS", timeout)
    silent = await start_upstream("members", slow=True)
    try:
        targets = {"members": silent.target} | {n: u.target for n, u in upstreams.items()}
        async with gateway_to(targets) as http:
            started = time.monotonic()
            response = await http.get("/readyz")
            elapsed = time.monotonic() - started
    finally:
        await silent.server.stop(grace=0)

    # The silent service would hold the probe 30 s; the bound leaves a busy
    # machine room.
    assert elapsed < 10 * timeout
    problem = assert_problem(response, 503, "NOT_READY")
    assert problem["detail"] == "the members service cannot be checked (DEADLINE_EXCEEDED)"
    assert problem["checks"] == ALL_SERVING | {"members": "DEADLINE_EXCEEDED"}


async def test_readiness_without_members_is_a_503() -> None:
    target = f"127.0.0.1:{free_port()}"
    app = create_app(gateway_settings(target))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http,
    ):
        response = await http.get("/readyz")

    problem = assert_problem(response, 503, "NOT_READY")
    assert problem["checks"]["members"] == "UNREACHABLE"


async def test_the_openapi_document_describes_readiness(http: httpx.AsyncClient) -> None:
    doc = (await http.get("/openapi.json")).json()

    readyz = doc["paths"]["/readyz"]["get"]
    assert "Only members decides" in readyz["description"]
    not_ready = readyz["responses"]["503"]["content"]
    assert list(not_ready) == ["application/problem+json"]
    assert not_ready["application/problem+json"]["schema"]["$ref"].endswith("/NotReady")
    schemas = doc["components"]["schemas"]
    assert "checks" in schemas["NotReady"]["properties"]
    assert "reason" in schemas["NotReady"]["properties"]
    assert "checks" in schemas["Readiness"]["properties"]


async def test_the_gateway_opens_its_own_channel_from_settings(members: Peer) -> None:
    app = create_app(gateway_settings(members.target))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http,
    ):
        created = await http.post("/v1/members", json=ANA, headers=headers())
        ready = await http.get("/readyz")

    assert created.status_code == 201
    assert ready.status_code == 200


# -- traces ----------------------------------------------------------------------------


async def _finished(spans: InMemorySpanExporter, count: int) -> list[Any]:
    for _ in range(100):
        finished = list(spans.get_finished_spans())
        if len(finished) >= count:
            return finished
        await asyncio.sleep(0.01)
    return list(spans.get_finished_spans())


async def test_the_http_request_is_the_root_span_of_the_grpc_call(
    http: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    response = await http.post("/v1/members", json=ANA, headers=headers())
    assert response.status_code == 201

    # HTTP server span, gRPC client span, members' gRPC server span.
    finished = await _finished(spans, 3)
    root = next(s for s in finished if s.kind == SpanKind.SERVER and s.name.startswith("POST"))
    method = "/cornucopia.members.v1.MembersService/CreateMember"
    client = next(s for s in finished if s.kind == SpanKind.CLIENT and s.name == method)
    callee = next(s for s in finished if s.kind == SpanKind.SERVER and s.name == method)

    assert root.parent is None
    assert root.name == "POST /v1/members"
    assert root.attributes["http.request.method"] == "POST"
    assert root.attributes["url.path"] == "/v1/members"
    assert root.attributes["http.route"] == "/v1/members"
    assert root.attributes["http.response.status_code"] == 201
    assert client.parent is not None and client.parent.span_id == root.context.span_id
    assert callee.parent is not None and callee.parent.span_id == client.context.span_id
    assert client.context.trace_id == callee.context.trace_id == root.context.trace_id


async def test_a_callers_traceparent_is_continued_and_named_in_problems(
    http: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    spans.clear()
    response = await http.get(
        "/v1/members/MNOSUCHONE",
        headers={**headers(), "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )

    problem = assert_problem(response, 404, "MEMBER_NOT_FOUND")
    assert problem["trace_id"] == trace_id
    finished = await _finished(spans, 1)
    root = next(s for s in finished if s.name == "GET /v1/members/{member_id}")
    assert format(root.context.trace_id, "032x") == trace_id
    assert root.parent is not None and root.parent.is_remote
    assert root.attributes["http.response.status_code"] == 404


async def test_probes_are_not_traced(http: httpx.AsyncClient, spans: InMemorySpanExporter) -> None:
    spans.clear()
    assert (await http.get("/readyz")).status_code == 200
    assert (await http.get("/healthz")).status_code == 200
    await asyncio.sleep(0.05)

    # Members traces the health check it serves; the gateway adds nothing.
    names = [s.name for s in spans.get_finished_spans()]
    assert names == [] or set(names) == {"/grpc.health.v1.Health/Check"}
    assert all(s.kind == SpanKind.SERVER for s in spans.get_finished_spans())


# -- the document ----------------------------------------------------------------------


async def test_the_openapi_document_describes_routes_and_problems(
    http: httpx.AsyncClient,
) -> None:
    doc = (await http.get("/openapi.json")).json()
    assert (await http.get("/docs")).status_code == 200

    create = doc["paths"]["/v1/members"]["post"]
    assert create["tags"] == ["members"]
    assert create["summary"] == "Enroll a member"
    assert "Member" in create["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
    for status in ("400", "401", "409", "422", "503"):
        content = create["responses"][status]["content"]
        assert list(content) == ["application/problem+json"]
        assert content["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
    assert any(p["name"] == "Idempotency-Key" for p in create["parameters"])
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    read = doc["paths"]["/v1/members/{member_id}"]["get"]
    assert "422" not in read["responses"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    gender = doc["components"]["schemas"]["NewMember"]["properties"]["gender"]
    assert {"type": "string", "enum": ["female", "male", "other"]} in gender["anyOf"]
    assert doc["paths"]["/healthz"]["get"]["tags"] == ["health"]


async def test_what_a_role_may_do_is_left_to_the_service(http: httpx.AsyncClient) -> None:
    # The gateway checks that the token is genuine; what a role may do is
    # the service's business (the stand-in lets any role enroll).
    partner = token(roles=(Role.PARTNER,), scope=Scope(ScopeLevel.HQ))
    response = await http.post("/v1/members", json=ANA, headers=headers(bearer=partner))
    assert response.status_code == 201


async def test_an_oversized_body_is_a_413_problem(http: httpx.AsyncClient, members: Peer) -> None:
    huge = {**ANA, "family_name": "x" * (server.MAX_BODY_BYTES + 1)}
    response = await http.post("/v1/members", json=huge, headers=headers())
    assert_problem(response, 413, "CONTENT_TOO_LARGE")

    async def chunks() -> Any:
        yield b'{"given_name": "'
        for _ in range(server.MAX_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    streamed = await http.post(
        "/v1/members",
        content=chunks(),
        headers={**headers(), "content-type": "application/json"},
    )
    problem = assert_problem(streamed, 413, "CONTENT_TOO_LARGE")
    assert problem["detail"] == "the request body is larger than 64 KiB"
    assert members.fake.create_requests == []


async def test_a_bug_in_the_gateway_is_a_500_inside_the_trace(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(member: members_pb2.Member) -> Any:
        raise ValueError("member +34612345678 could not be shown")

    monkeypatch.setattr(server, "member_from_proto", broken)
    response = await http.post("/v1/members", json=ANA, headers=headers())

    problem = assert_problem(response, 500, "INTERNAL")
    assert "34612345678" not in response.text
    assert "ValueError" not in response.text
    assert len(problem["trace_id"]) == 32
