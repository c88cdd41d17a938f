"""What the gateway tests share: the real gateway app in front of real
members and cards services (the organisation seeded, a GOLD program
created), and of the loyalty service too for the checkout's tests, or of
members and campaigns for the campaigns routes' tests, a till's
HTTP client of it, the callers' tokens, and checks of the problems and the
OpenAPI document it answers with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from chassis.auth import Role, Scope, ScopeLevel
from chassis.config import Settings
from services.gateway.server import create_app
from services.members.server import definition as members_definition
from tests.integration.conftest import Organisation, Suite, seed_organisation, token
from tests.integration.infra import DatabaseFactory
from tests.integration.test_campaigns_followups import start_campaigns
from tests.integration.test_cards_lifecycle import create_program, program, start_cards
from tests.integration.test_loyalty_checkout import Shop, open_shop

PROBLEM_JSON = "application/problem+json"


def bearer(roles: tuple[Role, ...], store: str, subject: str) -> dict[str, str]:
    return {"authorization": "Bearer " + token(roles, Scope(ScopeLevel.STORE, store), subject)}


OPERATOR = bearer((Role.STORE_OPERATOR,), "S001", "op-1")
OTHER_STORE = bearer((Role.STORE_OPERATOR,), "S002", "op-2")
MANAGER = bearer((Role.STORE_MANAGER,), "S001", "mgr-1")


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@asynccontextmanager
async def _gateway(suite: Suite, **ports: int) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of a gateway whose peers listen on these ports
    (``members=…``, ``cards=…``, ``loyalty=…``, ``campaigns=…``)."""
    settings = Settings(
        service="gateway",
        environment="test",
        var_dir=suite.var_dir,
        nats_url=suite.nats_url,
        peers={name: f"127.0.0.1:{port}" for name, port in ports.items()},
    )
    app = create_app(settings)
    async with _client(app) as http:
        yield http
        await app.state.peers.close()


@asynccontextmanager
async def gateway_in_front_of_cards(
    suite: Suite, database_url: DatabaseFactory
) -> AsyncIterator[httpx.AsyncClient]:
    """Starts the members and cards services, seeds the organisation,
    creates the GOLD program, and yields an HTTP client of a gateway in
    front of them."""
    members = await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    cards = await start_cards(suite, database_url, members_port=members.port)
    await create_program(cards, program())
    async with _gateway(suite, members=members.port, cards=cards.runtime.port) as http:
        yield http


@asynccontextmanager
async def gateway_in_front_of_loyalty(
    suite: Suite, database_url: DatabaseFactory
) -> AsyncIterator[tuple[httpx.AsyncClient, Shop]]:
    """As gateway_in_front_of_cards, with the loyalty service as well (the
    checkout's shop of test_loyalty_checkout): yields the gateway's HTTP
    client and the shop, whose gRPC stubs set up what no route does."""
    shop = await open_shop(suite, database_url)
    async with _gateway(
        suite, members=shop.members_port, cards=shop.cards_port, loyalty=shop.loyalty.port
    ) as http:
        yield http, shop


@asynccontextmanager
async def gateway_in_front_of_campaigns(
    suite: Suite, database_url: DatabaseFactory
) -> AsyncIterator[tuple[httpx.AsyncClient, Organisation]]:
    """Starts the members service, seeds the organisation, starts the
    campaigns service in front of it (its follow-up plans record calls on
    the members' files), and yields an HTTP client of a gateway in front of
    both, with the organisation (its consultants). The tests' gRPC stubs of
    the campaigns service are in ``suite.channels["campaigns"]``."""
    members = await suite.start(members_definition, await database_url("members"))
    org = await seed_organisation(suite)
    campaigns = await start_campaigns(suite, await database_url("campaigns"))
    async with _gateway(suite, members=members.port, campaigns=campaigns.port) as http:
        yield http, org


@dataclass
class GatewayTill:
    """A till's HTTP client of the gateway."""

    http: httpx.AsyncClient

    async def post(
        self,
        path: str,
        key: str | None,
        body: Any = None,
        headers: dict[str, str] = OPERATOR,
    ) -> httpx.Response:
        """A POST with this Idempotency-Key (none when ``key`` is None)."""
        sent = dict(headers)
        if key is not None:
            sent["idempotency-key"] = key
        return await self.http.post(path, json=body, headers=sent)


def problem(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body: dict[str, Any] = response.json()
    assert (body["status"], body["reason"]) == (status, reason), body
    return body


def fields(body: dict[str, Any]) -> set[str]:
    return {e["field"] for e in body["errors"]}


def everything_logged(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    """All the test's log lines so far: structlog's on stdout and stderr, and
    the libraries' through logging (the gateway's access log included)."""
    captured = capsys.readouterr()
    return captured.out + captured.err + caplog.text


async def openapi_document() -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    """The gateway's OpenAPI document as it serves it, and its operation ids
    by method and path."""
    async with _client(create_app(Settings(service="gateway", environment="test"))) as http:
        doc: dict[str, Any] = (await http.get("/openapi.json")).json()
    operations = {
        (method.upper(), path): operation["operationId"]
        for path, item in doc["paths"].items()
        for method, operation in item.items()
    }
    return doc, operations
