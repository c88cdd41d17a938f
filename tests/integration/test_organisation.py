"""The organisation tree and the staff directory on the real members service
(SQLite and PostgreSQL): every RPC, the scope rules, the lockout, and staff
login through the real gateway."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc
import httpx
import pytest
import sqlalchemy as sa
from google.protobuf.field_mask_pb2 import FieldMask

from chassis.auth import Role, Scope, ScopeLevel, verify_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET, Settings
from chassis.db import outbox_table
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import events_pb2, organisation_pb2_grpc
from cornucopia.members.v1 import organisation_pb2 as pb
from services.gateway.server import create_app
from services.members.demo import DEMO_PASSWORD, load_demo_data
from services.members.server import definition as members_definition
from tests.integration.conftest import Suite, auth, rpc_details, token
from tests.integration.infra import DatabaseFactory

T = TypeVar("T")

HQ_ADMIN = token((Role.HQ_ADMIN,), Scope(ScopeLevel.HQ), "ST-HQ")
EAST_MANAGER = token((Role.REGION_MANAGER,), Scope(ScopeLevel.REGION, "EAST"), "ST-EAST")
S001_MANAGER = token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "ST-S001M")
S001_OPERATOR = token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "ST-S001O")
GATEWAY = token((Role.SERVICE,), Scope(ScopeLevel.HQ), "gateway")


async def start(
    suite: Suite, database_url: DatabaseFactory
) -> organisation_pb2_grpc.OrganisationServiceStub:
    await suite.start(members_definition, await database_url("members"))
    return organisation_pb2_grpc.OrganisationServiceStub(suite.channels["members"])


async def refused(call: Awaitable[T], code: grpc.StatusCode) -> dict[str, object]:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    assert exc.value.code() == code, exc.value.details()
    return rpc_details(exc.value)


def new_store(store_id: str, region_id: str = "EAST") -> pb.Store:
    return pb.Store(
        store_id=store_id,
        region_id=region_id,
        display_name=f"门店 {store_id}",
        address=pb.StoreAddress(
            province="江苏省",
            city="南京市",
            district="玄武区",
            street="中山路 1 号",
            postcode="210000",
        ),
        time_zone="Asia/Shanghai",
        currency_code="CNY",
    )


def staff(login_id: str, store_id: str, *roles: pb.StaffRole.ValueType) -> pb.StaffMember:
    return pb.StaffMember(
        login_id=login_id,
        display_name="测试员工",
        assignment=org_pb2.OrgUnitRef(level=org_pb2.ORG_LEVEL_STORE, id=store_id),
        roles=list(roles) or [pb.STAFF_ROLE_STORE_OPERATOR],
    )


async def subjects(suite: Suite) -> list[str]:
    async with suite.runtimes["members"].db.sessions() as session:
        rows = await session.execute(sa.select(outbox_table.c.subject).order_by(outbox_table.c.seq))
    return list(rows.scalars())


async def test_regions_and_stores(suite: Suite, database_url: DatabaseFactory) -> None:
    stub = await start(suite, database_url)
    md = auth(HQ_ADMIN)
    create = pb.CreateRegionRequest(
        request_id="r-east", region=pb.Region(region_id="EAST", display_name="华东区")
    )
    east = await stub.CreateRegion(create, metadata=md)
    assert east.state == pb.ORG_UNIT_STATE_OPEN
    assert east.created_by.principal == "ST-HQ"
    # A retry returns the first answer; a new key for the same code is refused.
    assert await stub.CreateRegion(create, metadata=md) == east
    details = await refused(
        stub.CreateRegion(
            pb.CreateRegionRequest(request_id="r-east-2", region=create.region), metadata=md
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details["reason"] == "REGION_EXISTS"
    details = await refused(
        stub.CreateRegion(
            pb.CreateRegionRequest(request_id="r-bad", region=pb.Region(region_id="east")),
            metadata=md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"region.region_id", "region.display_name"}  # type: ignore[arg-type]
    await stub.CreateRegion(
        pb.CreateRegionRequest(
            request_id="r-west", region=pb.Region(region_id="WEST", display_name="西部")
        ),
        metadata=md,
    )

    renamed = await stub.UpdateRegion(
        pb.UpdateRegionRequest(
            region=pb.Region(region_id="EAST", display_name="华东大区", etag=east.etag),
            update_mask=FieldMask(paths=["display_name"]),
        ),
        metadata=md,
    )
    assert renamed.display_name == "华东大区"
    assert renamed.etag != east.etag
    details = await refused(
        stub.UpdateRegion(
            pb.UpdateRegionRequest(
                region=pb.Region(region_id="EAST", display_name="旧", etag=east.etag),
                update_mask=FieldMask(paths=["display_name"]),
            ),
            metadata=md,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert details["reason"] == "ETAG_MISMATCH"
    assert (await stub.GetRegion(pb.GetRegionRequest(region_id="EAST"), metadata=md)) == renamed

    s1 = await stub.CreateStore(
        pb.CreateStoreRequest(request_id="s-1", store=new_store("S001")), metadata=md
    )
    assert (s1.time_zone, s1.currency_code, s1.state) == (
        "Asia/Shanghai",
        "CNY",
        pb.ORG_UNIT_STATE_OPEN,
    )
    for code, region in (("S002", "EAST"), ("S003", "WEST")):
        await stub.CreateStore(
            pb.CreateStoreRequest(request_id=f"s-{code}", store=new_store(code, region)),
            metadata=md,
        )
    details = await refused(
        stub.CreateStore(
            pb.CreateStoreRequest(request_id="s-x", store=new_store("S009", "NORTH")), metadata=md
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details["reason"] == "REGION_NOT_FOUND"
    bad = new_store("S010")
    bad.time_zone = "Asia/Beijing"
    bad.currency_code = "RMB"
    details = await refused(
        stub.CreateStore(pb.CreateStoreRequest(request_id="s-bad", store=bad), metadata=md),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"store.time_zone", "store.currency_code"}  # type: ignore[arg-type]

    # Paged, filtered lists.
    first = await stub.ListStores(pb.ListStoresRequest(page_size=2), metadata=md)
    assert [s.store_id for s in first.stores] == ["S001", "S002"]
    second = await stub.ListStores(
        pb.ListStoresRequest(page_size=2, page_token=first.next_page_token), metadata=md
    )
    assert [s.store_id for s in second.stores] == ["S003"]
    assert not second.next_page_token
    east_stores = await stub.ListStores(pb.ListStoresRequest(region_id="EAST"), metadata=md)
    assert [s.store_id for s in east_stores.stores] == ["S001", "S002"]

    moved = await stub.UpdateStore(
        pb.UpdateStoreRequest(
            store=pb.Store(store_id="S002", region_id="WEST", display_name="ignored"),
            update_mask=FieldMask(paths=["region_id"]),
        ),
        metadata=md,
    )
    assert (moved.region_id, moved.display_name) == ("WEST", "门店 S002")
    await refused(
        stub.UpdateStore(
            pb.UpdateStoreRequest(
                store=pb.Store(store_id="S002", time_zone="Nowhere/Land"),
                update_mask=FieldMask(paths=["time_zone"]),
            ),
            metadata=md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    # A region with open stores stays open.
    details = await refused(
        stub.CloseRegion(pb.CloseRegionRequest(region_id="EAST"), metadata=md),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "REGION_HAS_OPEN_STORES"
    closed = await stub.CloseStore(pb.CloseStoreRequest(store_id="S001"), metadata=md)
    assert closed.state == pb.ORG_UNIT_STATE_CLOSED
    assert (await stub.CloseStore(pb.CloseStoreRequest(store_id="S001"), metadata=md)) == closed
    region = await stub.CloseRegion(pb.CloseRegionRequest(region_id="EAST"), metadata=md)
    assert region.state == pb.ORG_UNIT_STATE_CLOSED
    details = await refused(
        stub.CreateStore(
            pb.CreateStoreRequest(request_id="s-4", store=new_store("S004")), metadata=md
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "REGION_CLOSED"
    open_regions = await stub.ListRegions(
        pb.ListRegionsRequest(state=pb.ORG_UNIT_STATE_OPEN), metadata=md
    )
    assert [r.region_id for r in open_regions.regions] == ["WEST"]
    closed_stores = await stub.ListStores(
        pb.ListStoresRequest(state=pb.ORG_UNIT_STATE_CLOSED), metadata=md
    )
    assert [s.store_id for s in closed_stores.stores] == ["S001"]

    assert await subjects(suite) == [
        "members.v1.store.opened",
        "members.v1.store.opened",
        "members.v1.store.opened",
        "members.v1.store.closed",
    ]
    async with suite.runtimes["members"].db.sessions() as session:
        payload = (
            (await session.execute(sa.select(outbox_table.c.payload).order_by(outbox_table.c.seq)))
            .scalars()
            .first()
        )
    opened = events_pb2.StoreOpened.FromString(payload)
    assert (opened.store_id, opened.region_id, opened.currency_code) == ("S001", "EAST", "CNY")


async def test_scope_rules(suite: Suite, database_url: DatabaseFactory) -> None:
    stub = await start(suite, database_url)
    await load_demo_data(suite.channels["members"], HQ_ADMIN)

    # A region manager of EAST opens stores in EAST only.
    east_md = auth(EAST_MANAGER)
    await stub.CreateStore(
        pb.CreateStoreRequest(request_id="e-1", store=new_store("S004", "EAST")), metadata=east_md
    )
    details = await refused(
        stub.CreateStore(
            pb.CreateStoreRequest(request_id="e-2", store=new_store("S005", "WEST")),
            metadata=east_md,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert details["reason"] == "OUT_OF_SCOPE"
    await refused(
        stub.UpdateStore(
            pb.UpdateStoreRequest(
                store=pb.Store(store_id="S003", display_name="不是我的"),
                update_mask=FieldMask(paths=["display_name"]),
            ),
            metadata=east_md,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await refused(
        stub.UpdateStore(
            pb.UpdateStoreRequest(
                store=pb.Store(store_id="S004", region_id="WEST"),
                update_mask=FieldMask(paths=["region_id"]),
            ),
            metadata=east_md,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Regions and closing stores are HQ's.
    await refused(
        stub.CloseStore(pb.CloseStoreRequest(store_id="S004"), metadata=east_md),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await refused(
        stub.CreateRegion(
            pb.CreateRegionRequest(
                request_id="e-3", region=pb.Region(region_id="NORTH", display_name="北")
            ),
            metadata=east_md,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )

    # A store manager of S001 adds operators to S001, not to S002, and
    # cannot make anyone a manager.
    s1_md = auth(S001_MANAGER)
    operator = await stub.CreateStaffMember(
        pb.CreateStaffMemberRequest(request_id="m-1", staff_member=staff("new.op", "S001")),
        metadata=s1_md,
    )
    assert operator.created_by.principal == "ST-S001M"
    assert operator.created_by.store_id == "S001"
    details = await refused(
        stub.CreateStaffMember(
            pb.CreateStaffMemberRequest(request_id="m-2", staff_member=staff("other.op", "S002")),
            metadata=s1_md,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert details["reason"] == "OUT_OF_SCOPE"
    details = await refused(
        stub.CreateStaffMember(
            pb.CreateStaffMemberRequest(
                request_id="m-3",
                staff_member=staff("boss.two", "S001", pb.STAFF_ROLE_STORE_MANAGER),
            ),
            metadata=s1_md,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert details["reason"] == "ROLE_NOT_GRANTABLE"
    # The region manager manages staff of the region's stores, not others'.
    await stub.CreateStaffMember(
        pb.CreateStaffMemberRequest(
            request_id="e-4", staff_member=staff("s002.boss", "S002", pb.STAFF_ROLE_STORE_MANAGER)
        ),
        metadata=east_md,
    )
    await refused(
        stub.CreateStaffMember(
            pb.CreateStaffMemberRequest(request_id="e-5", staff_member=staff("s003.op", "S003")),
            metadata=east_md,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # An operator manages no one, but reads the directory.
    op_md = auth(S001_OPERATOR)
    await refused(
        stub.MarkStaffLeft(pb.MarkStaffLeftRequest(staff_id=operator.staff_id), metadata=op_md),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    listed = await stub.ListStaff(pb.ListStaffRequest(store_id="S001"), metadata=op_md)
    assert {s.login_id for s in listed.staff} == {"s001.manager", "s001.operator", "new.op"}
    in_east = await stub.ListStaff(pb.ListStaffRequest(region_id="EAST"), metadata=op_md)
    assert {s.login_id for s in in_east.staff} == {
        "east.manager",
        "s001.manager",
        "s001.operator",
        "new.op",
        "s002.boss",
    }
    # Only a service checks credentials.
    await refused(
        stub.VerifyStaffCredentials(
            pb.VerifyStaffCredentialsRequest(login_id="new.op", password="x"), metadata=md_hq()
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


def md_hq() -> tuple[tuple[str, str], ...]:
    return auth(HQ_ADMIN)


async def test_staff_directory_and_credentials(suite: Suite, database_url: DatabaseFactory) -> None:
    stub = await start(suite, database_url)
    logins = await load_demo_data(suite.channels["members"], HQ_ADMIN)
    assert {login.login_id for login in logins} == {
        "hq.admin",
        "east.manager",
        "s001.manager",
        "s001.operator",
        "callcenter.agent",
    }
    # Loading again changes nothing.
    await load_demo_data(suite.channels["members"], HQ_ADMIN)
    every = await stub.ListStaff(pb.ListStaffRequest(page_size=2), metadata=md_hq())
    assert len(every.staff) == 2 and every.next_page_token
    service = auth(GATEWAY)

    async def verify(login_id: str, password: str) -> pb.VerifyStaffCredentialsResponse:
        return await stub.VerifyStaffCredentials(
            pb.VerifyStaffCredentialsRequest(login_id=login_id, password=password),
            metadata=service,
        )

    ok = await verify("S001.Operator", DEMO_PASSWORD)
    assert ok.scope == "store:S001"
    assert ok.store_id == "S001"
    assert list(ok.staff_member.roles) == [pb.STAFF_ROLE_STORE_OPERATOR]
    assert (await verify("callcenter.agent", DEMO_PASSWORD)).scope == "call_center"
    assert (await verify("east.manager", DEMO_PASSWORD)).scope == "region:EAST"
    assert (await verify("hq.admin", DEMO_PASSWORD)).scope == "hq"

    # Wrong login id and wrong password: the same answer.
    unknown = await refused(verify("nobody.here", DEMO_PASSWORD), grpc.StatusCode.UNAUTHENTICATED)
    wrong = await refused(
        verify("s001.operator", "wrong password"), grpc.StatusCode.UNAUTHENTICATED
    )
    assert unknown == wrong
    assert unknown["reason"] == "INVALID_CREDENTIALS"

    # Update with a field mask: roles and assignment must fit.
    operator_id = ok.staff_member.staff_id
    hq = md_hq()
    promoted = await stub.UpdateStaffMember(
        pb.UpdateStaffMemberRequest(
            staff_member=pb.StaffMember(
                staff_id=operator_id,
                roles=[pb.STAFF_ROLE_STORE_OPERATOR, pb.STAFF_ROLE_STORE_MANAGER],
                display_name="not in the mask",
            ),
            update_mask=FieldMask(paths=["roles"]),
        ),
        metadata=hq,
    )
    assert set(promoted.roles) == {pb.STAFF_ROLE_STORE_OPERATOR, pb.STAFF_ROLE_STORE_MANAGER}
    assert promoted.display_name == "李娜"
    details = await refused(
        stub.UpdateStaffMember(
            pb.UpdateStaffMemberRequest(
                staff_member=pb.StaffMember(
                    staff_id=operator_id,
                    assignment=org_pb2.OrgUnitRef(level=org_pb2.ORG_LEVEL_HQ),
                ),
                update_mask=FieldMask(paths=["assignment"]),
            ),
            metadata=hq,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "staff_member.roles" in details["violations"]  # type: ignore[operator]
    # The manager of S001 may no longer touch a peer manager.
    await refused(
        stub.SetStaffPassword(
            pb.SetStaffPasswordRequest(staff_id=operator_id, password="a brand new one"),
            metadata=auth(S001_MANAGER),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Staff set their own password.
    own = token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), operator_id)
    await stub.SetStaffPassword(
        pb.SetStaffPasswordRequest(staff_id=operator_id, password="my own password"),
        metadata=auth(own),
    )
    details = await refused(
        stub.SetStaffPassword(
            pb.SetStaffPasswordRequest(staff_id=operator_id, password="short"), metadata=auth(own)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "password" in details["violations"]  # type: ignore[operator]
    assert (await verify("s001.operator", "my own password")).staff_member.staff_id == operator_id

    # Five wrong passwords lock the account: then even the right one fails.
    for _ in range(5):
        await refused(verify("s001.operator", "guess guess"), grpc.StatusCode.UNAUTHENTICATED)
    locked = await refused(
        verify("s001.operator", "my own password"), grpc.StatusCode.UNAUTHENTICATED
    )
    assert locked == unknown
    # A new password set by a manager unlocks it.
    await stub.SetStaffPassword(
        pb.SetStaffPasswordRequest(staff_id=operator_id, password="reset by hq 1"), metadata=hq
    )
    await verify("s001.operator", "reset by hq 1")

    # Left staff cannot log in; the event names ids only.
    left = await stub.MarkStaffLeft(pb.MarkStaffLeftRequest(staff_id=operator_id), metadata=hq)
    assert left.state == pb.STAFF_STATE_LEFT
    assert not left.has_password
    assert left.HasField("leave_time")
    assert (
        await stub.MarkStaffLeft(pb.MarkStaffLeftRequest(staff_id=operator_id), metadata=hq)
    ) == left
    await refused(verify("s001.operator", "reset by hq 1"), grpc.StatusCode.UNAUTHENTICATED)
    details = await refused(
        stub.SetStaffPassword(
            pb.SetStaffPasswordRequest(staff_id=operator_id, password="let me back in"), metadata=hq
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "STAFF_LEFT"
    active = await stub.ListStaff(
        pb.ListStaffRequest(store_id="S001", state=pb.STAFF_STATE_ACTIVE), metadata=hq
    )
    assert [s.login_id for s in active.staff] == ["s001.manager"]
    got = await stub.GetStaffMember(pb.GetStaffMemberRequest(staff_id=operator_id), metadata=hq)
    assert got == left
    assert (await subjects(suite))[-1] == "members.v1.staff.left"
    async with suite.runtimes["members"].db.sessions() as session:
        payload = (
            await session.execute(
                sa.select(outbox_table.c.payload).where(
                    outbox_table.c.subject == "members.v1.staff.left"
                )
            )
        ).scalar_one()
    event = events_pb2.StaffLeft.FromString(payload)
    assert (event.staff_id, event.assignment) == (operator_id, "store:S001")

    # Creates are idempotent; a taken login id is refused.
    request = pb.CreateStaffMemberRequest(request_id="c-1", staff_member=staff("x.op", "S001"))
    first = await stub.CreateStaffMember(request, metadata=hq)
    assert await stub.CreateStaffMember(request, metadata=hq) == first
    details = await refused(
        stub.CreateStaffMember(
            pb.CreateStaffMemberRequest(request_id="c-2", staff_member=staff("x.op", "S002")),
            metadata=hq,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details["reason"] == "LOGIN_ID_IN_USE"


async def test_staff_login_through_the_gateway(suite: Suite, database_url: DatabaseFactory) -> None:
    members = await suite.start(members_definition, await database_url("members"))
    await load_demo_data(suite.channels["members"], HQ_ADMIN)
    settings = Settings(
        service="gateway",
        environment="test",
        var_dir=suite.var_dir,
        nats_url=suite.nats_url,
        peers={"members": f"127.0.0.1:{members.port}"},
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(settings)), base_url="http://gateway"
    ) as http:
        answer = await http.post(
            "/v1/auth/token", json={"login_id": "s001.manager", "password": DEMO_PASSWORD}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["token_type"] == "Bearer"
        assert body["scope"] == "store:S001"
        assert body["roles"] == ["store_manager"]
        assert answer.headers["cache-control"] == "no-store"
        principal = verify_token(DEVELOPMENT_TOKEN_SECRET, body["access_token"])
        assert principal.subject == body["staff_id"]
        assert principal.store_id == "S001"
        assert principal.scope == Scope(ScopeLevel.STORE, "S001")

        # The token works: the store manager adds an operator to S001.
        stub = organisation_pb2_grpc.OrganisationServiceStub(suite.channels["members"])
        added = await stub.CreateStaffMember(
            pb.CreateStaffMemberRequest(request_id="g-1", staff_member=staff("g.op", "S001")),
            metadata=auth(body["access_token"]),
        )
        assert added.created_by.principal == body["staff_id"]

        wrong = await http.post(
            "/v1/auth/token", json={"login_id": "s001.manager", "password": "not it at all"}
        )
        unknown = await http.post(
            "/v1/auth/token", json={"login_id": "who.is.this", "password": DEMO_PASSWORD}
        )
        for refusal in (wrong, unknown):
            assert refusal.status_code == 401
            assert refusal.headers["content-type"].startswith("application/problem+json")
            assert refusal.json()["reason"] == "INVALID_CREDENTIALS"
        assert wrong.json()["detail"] == unknown.json()["detail"]
        assert DEMO_PASSWORD not in wrong.text

        malformed = await http.post("/v1/auth/token", json={"login_id": "s001.manager"})
        assert malformed.status_code == 400
