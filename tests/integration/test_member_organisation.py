"""Member files and the organisation tree on real databases (SQLite and
PostgreSQL): a home store must be a store of the tree and open, a consultant
an active staff member; staff who leave do not take their members with them;
a store closes only without active staff, and opens again."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.field_mask_pb2 import FieldMask

from chassis.auth import Role, Scope, ScopeLevel
from chassis.db import outbox_table
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import events_pb2, members_pb2, members_pb2_grpc, organisation_pb2_grpc
from cornucopia.members.v1 import organisation_pb2 as pb
from services.members.server import definition as members_definition
from services.members.store.members import members as members_table
from tests.integration.conftest import (
    Organisation,
    Suite,
    auth,
    rpc_details,
    seed_organisation,
    token,
)
from tests.integration.infra import DatabaseFactory

T = TypeVar("T")
M = members_pb2
HQ = auth()
REGION_EAST = auth(token((Role.REGION_MANAGER,), Scope(ScopeLevel.REGION, "EAST"), "rm-east"))
NO_SUCH_STAFF = "ST0000000000"


class Chain:
    """The members service with the test chain in it, and its two APIs."""

    def __init__(self, suite: Suite, org: Organisation) -> None:
        self.suite = suite
        self.org = org
        channel = suite.channels["members"]
        self.members = members_pb2_grpc.MembersServiceStub(channel)
        self.tree = organisation_pb2_grpc.OrganisationServiceStub(channel)

    async def enroll(
        self,
        mobile: str,
        store: str = "S001",
        consultant: str = "",
        metadata: Any = HQ,
        request_id: str | None = None,
    ) -> members_pb2.Member:
        return await self.members.CreateMember(
            M.CreateMemberRequest(
                request_id=request_id or str(uuid.uuid4()),
                member=new_member(mobile, store, consultant),
            ),
            metadata=metadata,
        )

    async def update(self, member_id: str, **fields: str) -> members_pb2.Member:
        return await self.members.UpdateMember(
            M.UpdateMemberRequest(
                member=M.Member(member_id=member_id, **fields),
                update_mask=FieldMask(paths=list(fields)),
            ),
            metadata=HQ,
        )

    async def get(self, member_id: str) -> members_pb2.Member:
        return await self.members.GetMember(M.GetMemberRequest(member_id=member_id), metadata=HQ)

    async def leave(self, staff_id: str) -> None:
        await self.tree.MarkStaffLeft(pb.MarkStaffLeftRequest(staff_id=staff_id), metadata=HQ)

    async def close(self, store_id: str) -> pb.Store:
        return await self.tree.CloseStore(pb.CloseStoreRequest(store_id=store_id), metadata=HQ)

    async def reopen(self, store_id: str, metadata: Any = HQ) -> pb.Store:
        return await self.tree.ReopenStore(
            pb.ReopenStoreRequest(store_id=store_id), metadata=metadata
        )

    async def member_count(self) -> int:
        async with self.suite.runtimes["members"].db.sessions() as session:
            query = sa.select(sa.func.count()).select_from(members_table)
            return int((await session.execute(query)).scalar_one())

    async def events(self, subject: str) -> list[bytes]:
        async with self.suite.runtimes["members"].db.sessions() as session:
            rows = await session.execute(
                sa.select(outbox_table.c.payload)
                .where(outbox_table.c.subject == subject)
                .order_by(outbox_table.c.seq)
            )
            return list(rows.scalars())


def new_member(mobile: str, store: str = "S001", consultant: str = "") -> members_pb2.Member:
    return M.Member(
        home_store_id=store,
        given_name="Li",
        family_name="Na",
        mobile=mobile,
        preferred_language="en",
        consultant_id=consultant,
    )


async def start(suite: Suite, database_url: DatabaseFactory) -> Chain:
    await suite.start(members_definition, await database_url("members"))
    return Chain(suite, await seed_organisation(suite))


async def refused(call: Awaitable[T], code: grpc.StatusCode) -> dict[str, Any]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return rpc_details(caught.value)


async def test_an_unknown_home_store_is_refused_and_nothing_is_written(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    chain = await start(suite, database_url)
    details = await refused(
        chain.enroll("+8613800138000", store="S999", request_id="enroll-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["reason"] == "INVALID_FIELDS"
    assert details["violations"] == {"member.home_store_id": "no such store"}
    # Every problem at once: an unknown consultant as well.
    details = await refused(
        chain.enroll("+8613800138000", store="S999", consultant=NO_SUCH_STAFF),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"member.home_store_id", "member.consultant_id"}
    assert await chain.member_count() == 0
    assert await chain.events("members.v1.member.enrolled") == []

    # The refused request left its idempotency key free for the corrected one.
    created = await chain.enroll("+8613800138000", store="S001", request_id="enroll-1")
    assert created.home_store_id == "S001"
    assert await chain.member_count() == 1

    # A region manager enrolls into the stores of their region only.
    east = await chain.enroll("+8613900139000", store="S001", metadata=REGION_EAST)
    assert east.enrolled_by.principal == "rm-east"
    details = await refused(
        chain.enroll("+8613700137000", store="S002", metadata=REGION_EAST),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert details["reason"] == "OUT_OF_SCOPE"


async def test_a_closed_store_takes_no_members(suite: Suite, database_url: DatabaseFactory) -> None:
    chain = await start(suite, database_url)
    before_closing = M.CreateMemberRequest(
        request_id="enroll-before-closing", member=new_member("+8613700137000", store="S002")
    )
    early = await chain.members.CreateMember(before_closing, metadata=HQ)
    resident = await chain.enroll("+8613800138000", store="S001")
    assert (await chain.close("S002")).state == pb.ORG_UNIT_STATE_CLOSED

    details = await refused(
        chain.enroll("+8613900139000", store="S002"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "STORE_CLOSED"
    assert details["metadata"] == {"store_id": "S002"}
    details = await refused(
        chain.update(resident.member_id, home_store_id="S002"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details["reason"] == "STORE_CLOSED"
    assert (await chain.get(resident.member_id)).home_store_id == "S001"
    details = await refused(
        chain.update(resident.member_id, home_store_id="S999"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(details["violations"]) == {"member.home_store_id"}
    assert await chain.member_count() == 2

    # An enrollment made before the store closed replays as it was; the
    # members of a closed store stay its members, and can move out.
    assert await chain.members.CreateMember(before_closing, metadata=HQ) == early
    moved = await chain.update(early.member_id, home_store_id="S001")
    assert moved.home_store_id == "S001"


async def test_a_consultant_is_an_active_staff_member(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    chain = await start(suite, database_url)
    first, second, third = chain.org.consultants
    await chain.leave(third)

    for consultant, problem in (
        (NO_SUCH_STAFF, "no such staff member"),
        (third, "this staff member has left"),
    ):
        details = await refused(
            chain.enroll("+8613800138000", consultant=consultant),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details["violations"] == {"member.consultant_id": problem}
    assert await chain.member_count() == 0

    member = await chain.enroll("+8613800138000", consultant=first)
    assert member.consultant_id == first
    for consultant in (NO_SUCH_STAFF, third):
        details = await refused(
            chain.update(member.member_id, consultant_id=consultant),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert set(details["violations"]) == {"member.consultant_id"}
    assert (await chain.get(member.member_id)).consultant_id == first
    assert (await chain.update(member.member_id, consultant_id=second)).consultant_id == second

    # A consultant who leaves does not lock their members' files...
    await chain.leave(second)
    assert (await chain.update(member.member_id, occupation="nurse")).occupation == "nurse"
    # ...and a member may be left without one.
    assert (await chain.update(member.member_id, consultant_id="")).consultant_id == ""


async def test_members_of_a_consultant_who_left_go_to_an_active_one(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    chain = await start(suite, database_url)
    leaving, gone, staying = chain.org.consultants
    ids = sorted(
        [
            (await chain.enroll("+8613800138000", consultant=leaving)).member_id,
            (await chain.enroll("+8613900139000", store="S002", consultant=leaving)).member_id,
        ]
    )
    await chain.leave(leaving)
    await chain.leave(gone)

    for target, reason in ((gone, "STAFF_LEFT"), (NO_SUCH_STAFF, "STAFF_NOT_FOUND")):
        details = await refused(
            chain.members.ReassignConsultant(
                M.ReassignConsultantRequest(
                    request_id=f"to-{target}", from_consultant_id=leaving, to_consultant_id=target
                ),
                metadata=HQ,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert details["reason"] == reason
        assert details["metadata"] == {"staff_id": target}
    for member_id in ids:
        assert (await chain.get(member_id)).consultant_id == leaving

    moved = await chain.members.ReassignConsultant(
        M.ReassignConsultantRequest(
            request_id="to-staying", from_consultant_id=leaving, to_consultant_id=staying
        ),
        metadata=HQ,
    )
    assert sorted(moved.member_ids) == ids
    for member_id in ids:
        assert (await chain.get(member_id)).consultant_id == staying
    changes = [
        events_pb2.MemberConsultantChanged.FromString(payload)
        for payload in await chain.events("members.v1.member.consultant_changed")
    ]
    assert sorted((e.member_id, e.from_consultant_id, e.to_consultant_id) for e in changes) == [
        (member_id, leaving, staying) for member_id in ids
    ]


async def test_a_store_with_active_staff_does_not_close(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    chain = await start(suite, database_url)
    member = await chain.enroll("+8613800138000", store="S001")
    details = await refused(chain.close("S001"), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "STORE_HAS_ACTIVE_STAFF"
    assert details["metadata"] == {"store_id": "S001", "active_staff": "3"}
    store = await chain.tree.GetStore(pb.GetStoreRequest(store_id="S001"), metadata=HQ)
    assert store.state == pb.ORG_UNIT_STATE_OPEN

    # Its staff move to another store or leave; then it closes.
    moving, *leaving = chain.org.consultants
    await chain.tree.UpdateStaffMember(
        pb.UpdateStaffMemberRequest(
            staff_member=pb.StaffMember(
                staff_id=moving,
                assignment=org_pb2.OrgUnitRef(level=org_pb2.ORG_LEVEL_STORE, id="S002"),
            ),
            update_mask=FieldMask(paths=["assignment"]),
        ),
        metadata=HQ,
    )
    await refused(chain.close("S001"), grpc.StatusCode.FAILED_PRECONDITION)
    for staff_id in leaving:
        await chain.leave(staff_id)
    closed = await chain.close("S001")
    assert closed.state == pb.ORG_UNIT_STATE_CLOSED
    assert [
        events_pb2.StoreClosed.FromString(p).store_id
        for p in await chain.events("members.v1.store.closed")
    ] == ["S001"]
    # Its members stay its members.
    assert (await chain.get(member.member_id)).home_store_id == "S001"


async def test_a_closed_store_reopens(suite: Suite, database_url: DatabaseFactory) -> None:
    chain = await start(suite, database_url)
    closed = await chain.close("S002")
    # HQ's decision, as closing is.
    details = await refused(chain.reopen("S002", REGION_EAST), grpc.StatusCode.PERMISSION_DENIED)
    assert details["reason"] == "ROLE_NOT_ALLOWED"
    details = await refused(chain.reopen("S404"), grpc.StatusCode.NOT_FOUND)
    assert details["reason"] == "STORE_NOT_FOUND"

    reopened = await chain.reopen("S002")
    assert reopened.state == pb.ORG_UNIT_STATE_OPEN
    assert reopened.etag != closed.etag
    assert (reopened.region_id, reopened.display_name) == (closed.region_id, closed.display_name)
    assert await chain.reopen("S002") == reopened  # already open: unchanged
    (payload,) = await chain.events("members.v1.store.reopened")
    event = events_pb2.StoreReopened.FromString(payload)
    assert (event.store_id, event.region_id, event.time_zone, event.currency_code) == (
        "S002",
        "WEST",
        "Asia/Shanghai",
        "CNY",
    )
    assert event.reopen_time.seconds > 0
    assert (await chain.enroll("+8613800138000", store="S002")).home_store_id == "S002"

    # Not into a closed region.
    await chain.close("S002")
    await chain.tree.CloseRegion(pb.CloseRegionRequest(region_id="WEST"), metadata=HQ)
    details = await refused(chain.reopen("S002"), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "REGION_CLOSED"
    store = await chain.tree.GetStore(pb.GetStoreRequest(store_id="S002"), metadata=HQ)
    assert store.state == pb.ORG_UNIT_STATE_CLOSED
