"""On real parts (the project's NATS with JetStream, members and notify
running in this process): when members changes a member's file, notify's
next contact lookup has the change at once, not after the cache's 60 s."""

from __future__ import annotations

import time
import uuid

import pytest
from google.protobuf import field_mask_pb2

from cornucopia.common.v1 import date_pb2
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc
from services.members.server import definition as members_definition
from services.notify.peers import CACHE_SECONDS, MembersPeer, shared_peers
from services.notify.server import definition as notify_definition
from tests.integration import conftest as integration
from tests.integration.conftest import Suite, auth, eventually, seed_organisation
from tests.integration.infra import DatabaseFactory

pytestmark = pytest.mark.integration

# The integration tests' fixtures: a NATS of the test's own, services in process.
nats = integration.nats
spans = integration.spans
suite = integration.suite

# Well inside the cache's time to live: an answer in time is an eviction's.
IN_TIME = 10.0


async def enroll(stub: members_pb2_grpc.MembersServiceStub, mobile: str) -> M.Member:
    member = M.Member(
        home_store_id="S001",
        given_name="娜",
        family_name="李",
        mobile=mobile,
        preferred_language="zh-CN",
        birthday=date_pb2.Date(year=1990, month=7, day=15),
    )
    created: M.Member = await stub.CreateMember(
        M.CreateMemberRequest(request_id=str(uuid.uuid4()), member=member), metadata=auth()
    )
    return created


async def mobile_of(contacts: MembersPeer, member_id: str) -> str | None:
    found = await contacts.contact(member_id)
    return None if found is None else found.mobile


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_changed_mobile_reaches_notify_without_waiting_for_the_cache(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    notify = await suite.start(notify_definition, await database_url("notify"))
    stub = members_pb2_grpc.MembersServiceStub(suite.channels["members"])
    contacts = shared_peers(notify.context).members
    assert contacts.contact_ttl == CACHE_SECONDS >= 60

    created = await enroll(stub, "+86 138 0013 8801")
    assert await mobile_of(contacts, created.member_id) == created.mobile
    assert created.member_id in contacts._files  # cached for the next minute

    started = time.monotonic()
    updated = await stub.UpdateMember(
        M.UpdateMemberRequest(
            member=M.Member(
                member_id=created.member_id, etag=created.etag, mobile="+86 139 0013 9901"
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["mobile"]),
        ),
        metadata=auth(),
    )
    assert updated.mobile != created.mobile
    # members.v1.member.updated reaches notify's own subscription, which
    # evicts the member: the next lookup asks members and has the new number.
    await eventually(
        lambda: mobile_of(contacts, created.member_id),
        lambda found: found == updated.mobile,
        timeout=IN_TIME,
        interval=0.05,
    )
    assert time.monotonic() - started < IN_TIME < contacts.contact_ttl

    # A merge evicts both: the duplicate has no contact left, the survivor
    # is asked again.
    survivor = await enroll(stub, "+86 138 0013 8802")
    duplicate = await enroll(stub, "+86 138 0013 8803")
    assert await mobile_of(contacts, survivor.member_id) == survivor.mobile
    assert await mobile_of(contacts, duplicate.member_id) == duplicate.mobile
    asked_before = dict(contacts._files)
    await stub.MergeMembers(
        M.MergeMembersRequest(
            request_id=str(uuid.uuid4()),
            survivor_member_id=survivor.member_id,
            duplicate_member_id=duplicate.member_id,
        ),
        metadata=auth(),
    )
    await eventually(
        lambda: contacts.contact(duplicate.member_id),
        lambda found: found is None,
        timeout=IN_TIME,
        interval=0.05,
    )

    async def survivor_cached_at() -> float | None:
        entry = contacts._files.get(survivor.member_id)
        return None if entry is None else entry[0]

    # The survivor's entry was dropped too (and perhaps asked again since).
    await eventually(
        survivor_cached_at,
        lambda at: at != asked_before[survivor.member_id][0],
        timeout=IN_TIME,
        interval=0.05,
    )
