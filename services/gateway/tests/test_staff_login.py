"""Staff login at the gateway, in front of a real grpc.aio server (with the
chassis's auth and error interceptors) standing in for the members
service's VerifyStaffCredentials."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from chassis.auth import Role, Scope, ScopeLevel, current_principal, verify_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET
from chassis.errors import ServiceError, Unauthenticated, Unavailable
from chassis.grpcclient import open_channel
from chassis.grpcserver import GrpcServer, GrpcService
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import organisation_pb2 as pb
from services.gateway.server import create_app
from services.gateway.staff import ORGANISATION_SERVICE, STAFF_TOKEN_TTL_SECONDS
from services.gateway.tests.conftest import gateway_settings

PASSWORD = "till password 7"


@dataclass
class FakeDirectory:
    """One staff member, one password; records who called."""

    callers: list[tuple[str, frozenset[Role]]] = field(default_factory=list)
    fail_next: list[ServiceError] = field(default_factory=list)

    async def VerifyStaffCredentials(
        self, request: pb.VerifyStaffCredentialsRequest, context: Any
    ) -> pb.VerifyStaffCredentialsResponse:
        principal = current_principal()
        self.callers.append((principal.subject, principal.roles))
        principal.require_role(Role.SERVICE)
        if self.fail_next:
            raise self.fail_next.pop(0)
        if request.login_id != "s001.manager" or request.password != PASSWORD:
            raise Unauthenticated(
                "the login id or the password is wrong", reason="INVALID_CREDENTIALS"
            )
        return pb.VerifyStaffCredentialsResponse(
            staff_member=pb.StaffMember(
                staff_id="STQ2K9X4TD7M",
                login_id="s001.manager",
                assignment=org_pb2.OrgUnitRef(level=org_pb2.ORG_LEVEL_STORE, id="S001"),
                roles=[pb.STAFF_ROLE_STORE_MANAGER, pb.STAFF_ROLE_STORE_OPERATOR],
                state=pb.STAFF_STATE_ACTIVE,
            ),
            scope="store:S001",
            store_id="S001",
        )


def _register(servicer: FakeDirectory, server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        ORGANISATION_SERVICE.full_name,
        {
            "VerifyStaffCredentials": grpc.unary_unary_rpc_method_handler(
                servicer.VerifyStaffCredentials,
                request_deserializer=pb.VerifyStaffCredentialsRequest.FromString,
                response_serializer=pb.VerifyStaffCredentialsResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


@dataclass
class Directory:
    fake: FakeDirectory
    http: httpx.AsyncClient


@pytest.fixture
async def directory() -> AsyncIterator[Directory]:
    fake = FakeDirectory()
    server = GrpcServer(
        "members",
        "127.0.0.1:0",
        DEVELOPMENT_TOKEN_SECRET,
        [GrpcService(ORGANISATION_SERVICE.full_name, fake, _register)],
    )
    await server.start()
    await server.set_serving(True)
    target = f"127.0.0.1:{server.port}"
    channel = open_channel(target, services=[ORGANISATION_SERVICE])
    app = create_app(gateway_settings(target), members_channel=channel)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        yield Directory(fake, client)
    await channel.close()
    await server.stop(grace=0)


async def login(http: httpx.AsyncClient, login_id: str, password: str) -> httpx.Response:
    return await http.post("/v1/auth/token", json={"login_id": login_id, "password": password})


async def test_login_returns_a_token_for_the_staff_member(directory: Directory) -> None:
    answer = await login(directory.http, "s001.manager", PASSWORD)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == STAFF_TOKEN_TTL_SECONDS
    assert body["roles"] == ["store_manager", "store_operator"]
    assert body["scope"] == "store:S001"
    assert answer.headers["cache-control"] == "no-store"
    principal = verify_token(DEVELOPMENT_TOKEN_SECRET, body["access_token"])
    assert principal.subject == "STQ2K9X4TD7M"
    assert principal.roles == frozenset({Role.STORE_MANAGER, Role.STORE_OPERATOR})
    assert principal.scope == Scope(ScopeLevel.STORE, "S001")
    assert principal.store_id == "S001"
    # The gateway called as itself, with a short-lived service token.
    assert directory.fake.callers == [("gateway", frozenset({Role.SERVICE}))]


async def test_wrong_password_and_unknown_login_look_the_same(directory: Directory) -> None:
    wrong = await login(directory.http, "s001.manager", "not the password")
    unknown = await login(directory.http, "nobody", PASSWORD)
    for answer in (wrong, unknown):
        assert answer.status_code == 401
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.json()["reason"] == "INVALID_CREDENTIALS"
    assert wrong.json()["detail"] == unknown.json()["detail"]
    assert "not the password" not in wrong.text


@pytest.mark.parametrize(
    "body",
    [{}, {"login_id": "s001.manager"}, {"login_id": "", "password": "x"}, {"password": "x" * 200}],
)
async def test_malformed_logins_are_400(directory: Directory, body: dict[str, str]) -> None:
    answer = await directory.http.post("/v1/auth/token", json=body)
    assert answer.status_code == 400
    assert answer.json()["reason"] == "INVALID_FIELDS"
    assert directory.fake.callers == []


async def test_members_refusing_the_gateway_is_our_fault_not_the_callers(
    directory: Directory,
) -> None:
    directory.fake.fail_next.append(
        Unauthenticated("the token is not valid", reason="TOKEN_INVALID")
    )
    answer = await login(directory.http, "s001.manager", PASSWORD)
    assert answer.status_code == 500
    assert answer.json()["reason"] == "INTERNAL"


async def test_members_unavailable_is_503(directory: Directory) -> None:
    directory.fake.fail_next.append(
        Unavailable("the database is unavailable; try again", reason="DATABASE_UNAVAILABLE")
    )
    answer = await login(directory.http, "s001.manager", PASSWORD)
    assert answer.status_code == 503
    assert "retry-after" in answer.headers


async def test_login_is_in_the_openapi_document(directory: Directory) -> None:
    document = (await directory.http.get("/openapi.json")).json()
    operation = document["paths"]["/v1/auth/token"]["post"]
    assert operation["operationId"] == "staffLogin"
    assert "application/problem+json" in operation["responses"]["401"]["content"]
