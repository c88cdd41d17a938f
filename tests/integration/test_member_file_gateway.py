"""A store terminal works with a member file through the gateway: look-up
by a locally typed mobile, a change with If-Match, and a follow-up."""

from __future__ import annotations

import httpx

from chassis.auth import Role, Scope, ScopeLevel
from chassis.config import Settings
from services.gateway.server import create_app
from services.members.server import definition as members_definition
from tests.integration.conftest import Suite, seed_organisation, token
from tests.integration.infra import DatabaseFactory


async def test_lookup_patch_and_follow_up_through_the_gateway(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    members = await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    settings = Settings(
        service="gateway",
        environment="test",
        var_dir=suite.var_dir,
        nats_url=suite.nats_url,
        peers={"members": f"127.0.0.1:{members.port}"},
    )
    app = create_app(settings)
    home = {
        "authorization": "Bearer "
        + token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1")
    }
    other = {
        "authorization": "Bearer "
        + token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S002"), "op-2")
    }
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        created = await http.post(
            "/v1/members",
            json={
                "home_store_id": "S001",
                "given_name": "娜",
                "family_name": "李",
                "mobile": "13800138000",
                "email": "li.na@example.com",
            },
            headers={**home, "idempotency-key": "k-1"},
        )
        assert created.status_code == 201, created.text
        member_id = created.json()["member_id"]

        found = await http.get("/v1/members", params={"mobile": "138 0013 8000"}, headers=other)
        assert found.status_code == 200, found.text
        seen = found.json()
        assert seen["member_id"] == member_id
        assert seen["mobile"] == "+8613800138000"  # typed, so in clear
        assert seen["email"] == "l***@example.com"
        assert seen["masked"] is True
        etag = found.headers["etag"]
        missing = await http.get("/v1/members", params={"mobile": "13900000000"}, headers=home)
        assert missing.status_code == 404

        patch = {"occupation": "nurse", "tags": ["VIP"], "skin_type": "dry", "email": None}
        no_etag = await http.patch(f"/v1/members/{member_id}", json=patch, headers=home)
        assert no_etag.status_code == 428
        denied = await http.patch(
            f"/v1/members/{member_id}", json=patch, headers={**other, "if-match": etag}
        )
        assert denied.status_code == 403
        assert denied.json()["reason"] == "OUT_OF_SCOPE"
        bad = await http.patch(
            f"/v1/members/{member_id}",
            json={"skin_type": "scaly"},
            headers={**home, "if-match": etag},
        )
        assert bad.status_code == 400
        changed = await http.patch(
            f"/v1/members/{member_id}", json=patch, headers={**home, "if-match": etag}
        )
        assert changed.status_code == 200, changed.text
        body = changed.json()
        assert (body["occupation"], body["tags"], body["skin_type"], body["email"]) == (
            "nurse",
            ["vip"],
            "dry",
            "",
        )
        assert changed.headers["etag"] != etag
        stale = await http.patch(
            f"/v1/members/{member_id}",
            json={"occupation": "teacher"},
            headers={**home, "if-match": etag},
        )
        assert stale.status_code == 412
        assert stale.headers["content-type"].startswith("application/problem+json")
        invalid = await http.patch(
            f"/v1/members/{member_id}",
            json={"mobile": "12"},
            headers={**home, "if-match": changed.headers["etag"]},
        )
        assert invalid.status_code == 400
        assert [e["field"] for e in invalid.json()["errors"]] == ["mobile"]

        follow_up = {"channel": "phone", "outcome": "call_back", "next_step": "after 6pm"}
        recorded = await http.post(
            f"/v1/members/{member_id}/follow-ups",
            json=follow_up,
            headers={**other, "idempotency-key": "f-1"},
        )
        assert recorded.status_code == 201, recorded.text
        saved = recorded.json()
        assert (saved["store_id"], saved["outcome"], saved["next_step"]) == (
            "S002",
            "call_back",
            "after 6pm",
        )
        again = await http.post(
            f"/v1/members/{member_id}/follow-ups",
            json=follow_up,
            headers={**other, "idempotency-key": "f-1"},
        )
        assert again.json()["follow_up_id"] == saved["follow_up_id"]
        refused = await http.post(
            f"/v1/members/{member_id}/follow-ups",
            json={"channel": "phone", "outcome": "reached", "duration_seconds": 999999},
            headers={**other, "idempotency-key": "f-2"},
        )
        assert refused.status_code == 400
        assert [e["field"] for e in refused.json()["errors"]] == ["duration_seconds"]
