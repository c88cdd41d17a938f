"""A store terminal enrolls a member through the HTTP gateway: the real
gateway app in front of the real members and notify services."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chassis.config import Settings
from services.gateway.server import create_app
from services.members.server import definition as members_definition
from services.notify.server import definition as notify_definition
from tests.integration.conftest import (
    Suite,
    eventually,
    seed_organisation,
    token,
)
from tests.integration.infra import DatabaseFactory
from tests.integration.test_enrollment_slice import messages_for


async def test_store_enrolls_through_the_gateway(
    suite: Suite, database_url: DatabaseFactory, spans: InMemorySpanExporter
) -> None:
    members = await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    await suite.start(notify_definition, await database_url("notify"))
    settings = Settings(
        service="gateway",
        environment="test",
        var_dir=suite.var_dir,
        nats_url=suite.nats_url,
        peers={"members": f"127.0.0.1:{members.port}"},
    )
    app = create_app(settings)
    headers = {"authorization": f"Bearer {token()}", "idempotency-key": "till-7-0001"}
    body = {
        "home_store_id": "S001",
        "given_name": "Ana",
        "family_name": "García",
        "mobile": "+34 612 345 678",
        "preferred_language": "es",
        "birthday": "1990-04-12",
    }
    spans.clear()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        created = await http.post("/v1/members", json=body, headers=headers)
        assert created.status_code == 201, created.text
        member = created.json()
        assert member["mobile"] == "+34612345678"
        assert created.headers["location"] == f"/v1/members/{member['member_id']}"

        # A till that retries after a timeout gets the same member back.
        again = await http.post("/v1/members", json=body, headers=headers)
        assert again.json()["member_id"] == member["member_id"]

        fetched = await http.get(f"/v1/members/{member['member_id']}", headers=headers)
        assert fetched.status_code == 200
        assert fetched.json()["given_name"] == "Ana"

        refused = await http.post(
            "/v1/members",
            json={**body, "mobile": "12"},
            headers={**headers, "idempotency-key": "till-7-0002"},
        )
        assert refused.status_code == 400
        assert refused.headers["content-type"].startswith("application/problem+json")
        problem = refused.json()
        assert problem["reason"] == "INVALID_FIELDS"
        assert any("mobile" in e["field"] for e in problem["errors"])

        missing = await http.get("/v1/members/MNOSUCHMEMBER", headers=headers)
        assert missing.status_code == 404

    welcome = await eventually(
        lambda: messages_for(suite, member["member_id"]), lambda msgs: len(msgs) == 1
    )
    assert welcome[0].locale == "es"

    # The HTTP request is the root of the trace that reaches members.
    finished = spans.get_finished_spans()
    grpc_span = next(
        s for s in finished if s.name == "/cornucopia.members.v1.MembersService/CreateMember"
    )
    root = next(
        s for s in finished if s.context.trace_id == grpc_span.context.trace_id and s.parent is None
    )
    assert "POST" in root.name
