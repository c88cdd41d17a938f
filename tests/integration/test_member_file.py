"""The member file end to end on real databases (SQLite and PostgreSQL):
the full static file, updates with a field mask and etag, look-ups, lists,
history, scope and masking, lifecycle, merge, consultants, the dynamic file,
data-subject rights, and that nothing personal leaks into the database or
the events."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from chassis.auth import Role, Scope, ScopeLevel
from chassis.db import idempotency_table, outbox_table
from cornucopia.members.v1 import events_pb2, members_pb2, members_pb2_grpc
from services.members.server import definition as members_definition
from services.members.store import metadata
from tests.integration.conftest import (
    Organisation,
    Suite,
    auth,
    rpc_details,
    seed_organisation,
    token,
)
from tests.integration.infra import DatabaseFactory, migrate, schema_drift

M = members_pb2
HQ = auth()
OP_S001 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1"))
MGR_S001 = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "mgr-1"))
OP_S002 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S002"), "op-2"))
MGR_S002 = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S002"), "mgr-2"))
REGION_EAST = auth(token((Role.REGION_MANAGER,), Scope(ScopeLevel.REGION, "EAST"), "rm-east"))
REGION_WEST = auth(token((Role.REGION_MANAGER,), Scope(ScopeLevel.REGION, "WEST"), "rm-west"))
CALL_CENTER = auth(token((Role.CALL_CENTER,), Scope(ScopeLevel.CALL_CENTER), "cc-1"))

MOBILE = "+8613800138000"


def full_member(
    mobile: str = MOBILE, store: str = "S001", consultant: str = ""
) -> members_pb2.Member:
    member = M.Member(
        home_store_id=store,
        given_name="娜",
        family_name="李",
        mobile=mobile,
        email="li.na@example.com",
        gender=M.GENDER_FEMALE,
        preferred_language="zh-CN",
        landline="010 6552 9988",
        address=M.PostalAddress(
            province="北京市",
            city="北京市",
            district="朝阳区",
            street="建国路 88 号",
            postcode="100022",
            coordinates=M.Coordinates(latitude=39.9, longitude=116.4),
        ),
        anniversaries=[M.Anniversary(kind="wedding", date={"year": 2015, "month": 5, "day": 20})],
        skin_type=M.SKIN_TYPE_COMBINATION,
        skin_concerns=["acne", "dryness"],
        occupation="teacher",
        income_band=M.INCOME_BAND_MIDDLE,
        brands_used=["Herborist"],
        preferences=["fragrance-free"],
        tags=["VIP", "spring-event"],
        preferred_contact_channel=M.CONTACT_CHANNEL_SMS,
        contact_windows=[M.ContactWindow(start_time="18:00", end_time="20:30")],
        consultant_id=consultant,
        consents=[
            M.Consent(channel=M.CONTACT_CHANNEL_SMS, granted=True, source="paper form"),
            M.Consent(channel=M.CONTACT_CHANNEL_EMAIL, granted=False),
        ],
        notes="prefers afternoon visits",
    )
    member.birthday.year, member.birthday.month, member.birthday.day = 1990, 3, 14
    return member


def stub(suite: Suite) -> members_pb2_grpc.MembersServiceStub:
    return members_pb2_grpc.MembersServiceStub(suite.channels["members"])


async def start_with_organisation(
    suite: Suite, database_url: DatabaseFactory
) -> tuple[members_pb2_grpc.MembersServiceStub, Organisation]:
    """The members service with the test chain (conftest) in it."""
    await suite.start(members_definition, await database_url("members"))
    return stub(suite), await seed_organisation(suite)


async def start(suite: Suite, database_url: DatabaseFactory) -> members_pb2_grpc.MembersServiceStub:
    return (await start_with_organisation(suite, database_url))[0]


async def create(
    s: members_pb2_grpc.MembersServiceStub,
    member: members_pb2.Member,
    metadata: Any = HQ,
) -> members_pb2.Member:
    return await s.CreateMember(
        M.CreateMemberRequest(request_id=str(uuid.uuid4()), member=member), metadata=metadata
    )


async def fails(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def outbox(suite: Suite) -> list[tuple[str, bytes]]:
    """The member files' events, in order (not the seeded stores')."""
    subject = outbox_table.c.subject
    async with suite.runtimes["members"].db.sessions() as session:
        rows = await session.execute(
            sa.select(subject, outbox_table.c.payload)
            .where(subject.not_like("members.v1.store.%"))
            .order_by(outbox_table.c.seq)
        )
        return [(r.subject, r.payload) for r in rows]


async def every_stored_byte(suite: Suite) -> bytes:
    """Every value in every table of the members database, as bytes."""
    chunks: list[bytes] = []
    tables = [*metadata.sorted_tables, outbox_table, idempotency_table]
    async with suite.runtimes["members"].db.sessions() as session:
        for table in tables:
            for row in await session.execute(sa.select(table)):
                for value in row:
                    if isinstance(value, bytes):
                        chunks.append(value)
                    elif value is not None:
                        chunks.append(json.dumps(value, default=str, ensure_ascii=False).encode())
                        chunks.append(str(value).encode())
    return b"\x00".join(chunks)


async def test_the_full_static_file_round_trips(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    s, org = await start_with_organisation(suite, database_url)
    await s.CreateAttributeDefinition(
        M.CreateAttributeDefinitionRequest(
            attribute_definition=M.AttributeDefinition(
                name="hair_type", type=M.ATTRIBUTE_TYPE_ENUM, allowed_values=["curly", "straight"]
            )
        ),
        metadata=HQ,
    )
    member = full_member(consultant=org.consultants[0])
    member.attributes["hair_type"] = "curly"
    created = await create(s, member, OP_S001)
    got = await s.GetMember(M.GetMemberRequest(member_id=created.member_id), metadata=OP_S001)
    assert got == created
    assert not got.masked
    assert (got.given_name, got.family_name, got.mobile) == ("娜", "李", MOBILE)
    assert got.landline == "+861065529988"
    assert got.address.postcode == "100022"
    assert got.address.coordinates.latitude == pytest.approx(39.9)
    assert got.anniversaries[0].kind == "wedding"
    assert got.anniversaries[0].date.day == 20
    assert list(got.tags) == ["spring-event", "vip"]
    assert got.skin_type == M.SKIN_TYPE_COMBINATION
    assert got.income_band == M.INCOME_BAND_MIDDLE
    assert list(got.skin_concerns) == ["acne", "dryness"]
    assert got.consultant_id == org.consultants[0]
    assert got.notes == "prefers afternoon visits"
    assert dict(got.attributes) == {"hair_type": "curly"}
    assert got.state == M.MEMBER_STATE_ACTIVE
    assert got.enroll_time.seconds > 0
    consents = {c.channel: c for c in got.consents}
    assert consents[M.CONTACT_CHANNEL_SMS].granted
    assert consents[M.CONTACT_CHANNEL_SMS].source == "paper form"
    assert consents[M.CONTACT_CHANNEL_SMS].recorded_by.store_id == "S001"
    assert not consents[M.CONTACT_CHANNEL_EMAIL].granted
    assert got.purchase_summary.purchase_count == 0

    listed = await s.ListAttributeDefinitions(M.ListAttributeDefinitionsRequest(), metadata=HQ)
    assert [d.name for d in listed.attribute_definitions] == ["hair_type"]
    denied = await fails(
        s.CreateAttributeDefinition(
            M.CreateAttributeDefinitionRequest(
                attribute_definition=M.AttributeDefinition(name="x", type=M.ATTRIBUTE_TYPE_STRING)
            ),
            metadata=MGR_S001,
        )
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    again = await fails(
        s.CreateAttributeDefinition(
            M.CreateAttributeDefinitionRequest(
                attribute_definition=M.AttributeDefinition(
                    name="hair_type", type=M.ATTRIBUTE_TYPE_STRING
                )
            ),
            metadata=HQ,
        )
    )
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_every_problem_is_a_field_violation_and_nothing_is_written(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    s = await start(suite, database_url)
    bad = full_member()
    bad.address.postcode = "!!"
    bad.address.coordinates.latitude = 100
    bad.landline = "12"
    bad.anniversaries[0].kind = "Wedding Day"
    bad.anniversaries[0].date.year = 2999
    bad.contact_windows[0].end_time = "17:00"
    bad.attributes["unknown"] = "x"
    bad.referrer_member_id = "M0000000000"
    error = await fails(
        s.CreateMember(M.CreateMemberRequest(request_id="r", member=bad), metadata=HQ)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(rpc_details(error)["violations"]) == {
        "member.address.postcode",
        "member.address.coordinates.latitude",
        "member.landline",
        "member.anniversaries[0].kind",
        "member.anniversaries[0].date",
        "member.contact_windows[0]",
        "member.attributes[unknown]",
    }
    assert "李" not in (error.details() or "")
    # The referrer is checked once the file itself is valid.
    bad = full_member()
    bad.referrer_member_id = "M0000000000"
    error = await fails(create(s, bad))
    assert set(rpc_details(error)["violations"]) == {"member.referrer_member_id"}
    assert await outbox(suite) == []


async def test_update_with_mask_and_etag_keeps_history(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    s, org = await start_with_organisation(suite, database_url)
    created = await create(s, full_member(consultant=org.consultants[0]))
    change = M.Member(
        member_id=created.member_id,
        etag=created.etag,
        email="NA.LI@Example.com",
        occupation="nurse",
        given_name="ignored because not in the mask",
        consultant_id=org.consultants[1],
    )
    updated = await s.UpdateMember(
        M.UpdateMemberRequest(
            member=change, update_mask=mask("email", "occupation", "consultant_id")
        ),
        metadata=OP_S001,
    )
    assert updated.email == "NA.LI@example.com"
    assert updated.occupation == "nurse"
    assert updated.given_name == "娜"
    assert updated.etag != created.etag

    stale = await fails(
        s.UpdateMember(
            M.UpdateMemberRequest(member=change, update_mask=mask("occupation")), metadata=HQ
        )
    )
    assert stale.code() == grpc.StatusCode.ABORTED
    assert rpc_details(stale)["reason"] == "ETAG_MISMATCH"

    not_updatable = await fails(
        s.UpdateMember(
            M.UpdateMemberRequest(
                member=M.Member(member_id=created.member_id), update_mask=mask("state", "consents")
            ),
            metadata=HQ,
        )
    )
    assert not_updatable.code() == grpc.StatusCode.INVALID_ARGUMENT
    invalid = await fails(
        s.UpdateMember(
            M.UpdateMemberRequest(
                member=M.Member(member_id=created.member_id, email="nope"),
                update_mask=mask("email"),
            ),
            metadata=HQ,
        )
    )
    assert set(rpc_details(invalid)["violations"]) == {"member.email"}

    # Taking another member's mobile is refused by name.
    other = await create(s, full_member("+8613900139000"))
    taken = await fails(
        s.UpdateMember(
            M.UpdateMemberRequest(
                member=M.Member(member_id=other.member_id, mobile="138 0013 8000"),
                update_mask=mask("mobile"),
            ),
            metadata=HQ,
        )
    )
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS
    assert rpc_details(taken)["metadata"]["member_id"] == created.member_id

    history = await s.ListMemberChanges(
        M.ListMemberChangesRequest(member_id=created.member_id), metadata=HQ
    )
    assert [c.operation for c in history.changes] == ["update", "create"]
    latest = history.changes[0]
    assert sorted(latest.fields) == ["consultant_id", "email", "occupation"]
    assert json.loads(latest.old_values["email"]) == "li.na@example.com"
    assert json.loads(latest.new_values["email"]) == "NA.LI@example.com"
    assert latest.changed_by.principal == "op-1"
    assert latest.changed_by.store_id == "S001"
    # Another store's staff see that it changed, not what it was.
    masked = await s.ListMemberChanges(
        M.ListMemberChangesRequest(member_id=created.member_id), metadata=OP_S002
    )
    assert masked.changes[0].fields == latest.fields
    assert not masked.changes[0].old_values
    paged = await s.ListMemberChanges(
        M.ListMemberChangesRequest(member_id=created.member_id, page_size=1), metadata=HQ
    )
    rest = await s.ListMemberChanges(
        M.ListMemberChangesRequest(
            member_id=created.member_id, page_size=1, page_token=paged.next_page_token
        ),
        metadata=HQ,
    )
    assert [paged.changes[0].operation, rest.changes[0].operation] == ["update", "create"]

    events = await outbox(suite)
    updated_events = [p for subject, p in events if subject == "members.v1.member.updated"]
    assert len(updated_events) == 1
    event = events_pb2.MemberUpdated.FromString(updated_events[0])
    assert sorted(event.fields) == ["consultant_id", "email", "occupation"]
    consultant = [p for subject, p in events if subject == "members.v1.member.consultant_changed"]
    changed = events_pb2.MemberConsultantChanged.FromString(consultant[0])
    assert (changed.from_consultant_id, changed.to_consultant_id) == org.consultants[:2]


async def test_scope_rules_and_masking(suite: Suite, database_url: DatabaseFactory) -> None:
    s = await start(suite, database_url)  # S001 in EAST, S002 in WEST
    member = await create(s, full_member(), OP_S001)
    mid = member.member_id

    def occupation(value: str) -> members_pb2.UpdateMemberRequest:
        return M.UpdateMemberRequest(
            member=M.Member(member_id=mid, occupation=value), update_mask=mask("occupation")
        )

    # Another store may not change the file...
    for caller in (OP_S002, MGR_S002, REGION_WEST):
        denied = await fails(s.UpdateMember(occupation("x"), metadata=caller))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rpc_details(denied)["reason"] == "OUT_OF_SCOPE"
    denied = await fails(s.ArchiveMember(M.ArchiveMemberRequest(member_id=mid), metadata=MGR_S002))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    # ...an operator may not archive even at home, the call center may update
    # but not archive...
    denied = await fails(s.ArchiveMember(M.ArchiveMemberRequest(member_id=mid), metadata=OP_S001))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    denied = await fails(
        s.ArchiveMember(M.ArchiveMemberRequest(member_id=mid), metadata=CALL_CENTER)
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    # ...the home store, its region, HQ and the call center may.
    for caller, value in (
        (OP_S001, "a"),
        (REGION_EAST, "b"),
        (HQ, "c"),
        (CALL_CENTER, "d"),
    ):
        assert (await s.UpdateMember(occupation(value), metadata=caller)).occupation == value

    # ...but any store may record a follow-up, feedback and a consent change.
    follow_up = await s.RecordFollowUp(
        M.RecordFollowUpRequest(
            request_id="f-1",
            follow_up=M.FollowUp(
                member_id=mid,
                channel=M.FOLLOW_UP_CHANNEL_PHONE,
                outcome=M.FOLLOW_UP_OUTCOME_REACHED,
                duration_seconds=95,
                next_step="call back with the new serum",
            ),
        ),
        metadata=OP_S002,
    )
    assert follow_up.store_id == "S002"
    assert follow_up.staff_id == "op-2"
    consent = await s.UpdateConsent(
        M.UpdateConsentRequest(member_id=mid, channel=M.CONTACT_CHANNEL_EMAIL, granted=True),
        metadata=OP_S002,
    )
    assert {c.channel: c.granted for c in consent.consents}[M.CONTACT_CHANNEL_EMAIL]

    # Reads are chain-wide, masked outside the home store.
    other = await s.GetMember(M.GetMemberRequest(member_id=mid), metadata=OP_S002)
    assert other.masked
    assert other.mobile == "+86138****8000"
    assert (other.given_name, other.family_name) == ("娜", "李")  # one character stays
    assert other.email == "l***@example.com"
    assert other.landline.endswith("9988") and "*" in other.landline
    assert other.address.city == "北京市" and other.address.street == ""
    assert not other.HasField("birthday")
    assert other.notes == ""
    assert other.occupation == "d"  # not personal
    for caller in (REGION_EAST, MGR_S002):
        assert (await s.GetMember(M.GetMemberRequest(member_id=mid), metadata=caller)).masked
    for caller in (OP_S001, HQ, CALL_CENTER):
        clear = await s.GetMember(M.GetMemberRequest(member_id=mid), metadata=caller)
        assert not clear.masked and clear.mobile == MOBILE
    # The number looked up with comes back in clear, the rest stays masked.
    looked_up = await s.LookupMember(
        M.LookupMemberRequest(mobile="138-0013-8000"), metadata=OP_S002
    )
    assert looked_up.member_id == mid
    assert looked_up.mobile == MOBILE
    assert looked_up.email == "l***@example.com"
    by_email = await s.LookupMember(
        M.LookupMemberRequest(email="li.na@EXAMPLE.com"), metadata=OP_S001
    )
    assert by_email.member_id == mid
    missing = await fails(s.LookupMember(M.LookupMemberRequest(mobile="13900000000"), metadata=HQ))
    assert missing.code() == grpc.StatusCode.NOT_FOUND

    follow_ups = await s.ListFollowUps(M.ListFollowUpsRequest(member_id=mid), metadata=OP_S001)
    assert follow_ups.follow_ups[0].next_step == "call back with the new serum"
    assert follow_ups.follow_ups[0].duration_seconds == 95
    hidden = await s.ListFollowUps(M.ListFollowUpsRequest(member_id=mid), metadata=MGR_S002)
    assert hidden.follow_ups[0].next_step == ""

    # Moving the home store needs the new store to exist and be in scope.
    moved = await fails(
        s.UpdateMember(
            M.UpdateMemberRequest(
                member=M.Member(member_id=mid, home_store_id="S999"),
                update_mask=mask("home_store_id"),
            ),
            metadata=HQ,
        )
    )
    assert set(rpc_details(moved)["violations"]) == {"member.home_store_id"}
    moved_ok = await s.UpdateMember(
        M.UpdateMemberRequest(
            member=M.Member(member_id=mid, home_store_id="S002"), update_mask=mask("home_store_id")
        ),
        metadata=HQ,
    )
    assert moved_ok.home_store_id == "S002"
    assert not (await s.GetMember(M.GetMemberRequest(member_id=mid), metadata=OP_S002)).masked

    listed = await s.ListMembers(M.ListMembersRequest(region_id="WEST"), metadata=HQ)
    assert [m.member_id for m in listed.members] == [mid]
    assert not (await s.ListMembers(M.ListMembersRequest(region_id="EAST"), metadata=HQ)).members


async def test_list_filters_and_paging(suite: Suite, database_url: DatabaseFactory) -> None:
    s, org = await start_with_organisation(suite, database_url)
    first_consultant, second_consultant, third_consultant = org.consultants
    ids = []
    for i in range(5):
        member = full_member(f"+861380013800{i}", store="S001" if i < 3 else "S002")
        member.gender = M.GENDER_MALE if i == 0 else M.GENDER_FEMALE
        member.birthday.year = 1980 + i * 5
        member.birthday.month = 3 if i % 2 == 0 else 7
        member.tags[:] = ["vip"] if i in (1, 2) else ["new"]
        member.consultant_id = first_consultant if i < 2 else second_consultant
        del member.consents[:]
        if i == 4:
            member.consents.add(channel=M.CONTACT_CHANNEL_APP, granted=True)
        ids.append((await create(s, member)).member_id)

    async def listed(**filters: Any) -> list[str]:
        response = await s.ListMembers(M.ListMembersRequest(**filters), metadata=HQ)
        return sorted(m.member_id for m in response.members)

    assert await listed(home_store_id="S002") == sorted(ids[3:])
    assert await listed(gender=M.GENDER_MALE) == [ids[0]]
    assert await listed(birth_month=7) == sorted([ids[1], ids[3]])
    assert await listed(tags=["vip"]) == sorted(ids[1:3])
    assert await listed(tags=["vip", "new"]) == []
    assert await listed(consultant_id=first_consultant) == sorted(ids[:2])
    assert await listed(consent_channel=M.CONTACT_CHANNEL_APP) == [ids[4]]
    # Born 1980..2000: in 2026 that is 46..26 years old, by year.
    import datetime as dt

    year = dt.datetime.now(dt.UTC).year
    assert await listed(min_age=year - 1990, max_age=year - 1985) == sorted(ids[1:3])
    first = await s.ListMembers(M.ListMembersRequest(), metadata=HQ)
    enrolled = first.members[2].enroll_time
    assert len(await listed(enrolled_before=enrolled)) == 2

    pages: list[str] = []
    token_ = ""
    while True:
        page = await s.ListMembers(
            M.ListMembersRequest(page_size=2, page_token=token_), metadata=HQ
        )
        pages.extend(m.member_id for m in page.members)
        token_ = page.next_page_token
        if not token_:
            break
    assert pages == [m.member_id for m in first.members]
    assert sorted(pages) == sorted(ids)

    archived = await s.ArchiveMember(
        M.ArchiveMemberRequest(member_id=ids[0], reason="no purchase in 3 years"),
        metadata=MGR_S001,
    )
    assert archived.state == M.MEMBER_STATE_ARCHIVED
    assert ids[0] not in await listed()
    assert await listed(state=M.MEMBER_STATE_ARCHIVED) == [ids[0]]
    refused = await fails(
        s.UpdateMember(
            M.UpdateMemberRequest(
                member=M.Member(member_id=ids[0], occupation="x"), update_mask=mask("occupation")
            ),
            metadata=HQ,
        )
    )
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    stale = await fails(
        s.ReactivateMember(M.ReactivateMemberRequest(member_id=ids[0], etag='W/"1"'), metadata=HQ)
    )
    assert stale.code() == grpc.StatusCode.ABORTED
    back = await s.ReactivateMember(
        M.ReactivateMemberRequest(member_id=ids[0], etag=archived.etag), metadata=HQ
    )
    assert back.state == M.MEMBER_STATE_ACTIVE
    subjects = [subject for subject, _ in await outbox(suite)]
    assert "members.v1.member.archived" in subjects
    assert "members.v1.member.reactivated" in subjects

    # Staff leaving: all of the second consultant's members in scope go to
    # the third.
    moved = await s.ReassignConsultant(
        M.ReassignConsultantRequest(
            request_id="re-1",
            from_consultant_id=second_consultant,
            to_consultant_id=third_consultant,
        ),
        metadata=MGR_S002,
    )
    assert sorted(moved.member_ids) == sorted(ids[3:])  # S001's member stays: out of scope
    moved = await s.ReassignConsultant(
        M.ReassignConsultantRequest(
            request_id="re-2",
            from_consultant_id=second_consultant,
            to_consultant_id=third_consultant,
            member_ids=[ids[2]],
        ),
        metadata=HQ,
    )
    assert list(moved.member_ids) == [ids[2]]
    assert await listed(consultant_id=third_consultant) == sorted(ids[2:])
    changed = [
        events_pb2.MemberConsultantChanged.FromString(p)
        for subject, p in await outbox(suite)
        if subject == "members.v1.member.consultant_changed"
    ]
    assert sorted(e.member_id for e in changed) == sorted(ids[2:])


async def test_merge_keeps_history_and_moves_the_dynamic_file(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    s = await start(suite, database_url)
    survivor_in = full_member()
    survivor_in.email = ""
    survivor_in.tags[:] = ["vip"]
    survivor = await create(s, survivor_in)
    duplicate_in = full_member("+8613900139000")
    duplicate_in.email = "other@example.com"
    duplicate_in.tags[:] = ["spring-event"]
    duplicate = await create(s, duplicate_in)
    await s.RecordFollowUp(
        M.RecordFollowUpRequest(
            request_id="f",
            follow_up=M.FollowUp(
                member_id=duplicate.member_id,
                channel=M.FOLLOW_UP_CHANNEL_VISIT,
                outcome=M.FOLLOW_UP_OUTCOME_REACHED,
                next_step="bring samples",
            ),
        ),
        metadata=OP_S001,
    )
    await s.RecordFeedback(
        M.RecordFeedbackRequest(
            request_id="b",
            feedback=M.Feedback(
                member_id=duplicate.member_id,
                subject=M.FEEDBACK_SUBJECT_PRODUCT,
                subject_ref="SKU-1",
                rating=5,
                text="lovely",
            ),
        ),
        metadata=OP_S001,
    )
    request = M.MergeMembersRequest(
        request_id="merge-1",
        survivor_member_id=survivor.member_id,
        duplicate_member_id=duplicate.member_id,
    )
    denied = await fails(s.MergeMembers(request, metadata=OP_S001))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    merged = await s.MergeMembers(request, metadata=MGR_S001)
    assert merged.member_id == survivor.member_id
    assert merged.mobile == MOBILE
    assert merged.email == "other@example.com"  # was empty, taken from the duplicate
    assert list(merged.tags) == ["spring-event", "vip"]
    assert (await s.MergeMembers(request, metadata=MGR_S001)).member_id == survivor.member_id

    shell = await s.GetMember(M.GetMemberRequest(member_id=duplicate.member_id), metadata=HQ)
    assert shell.state == M.MEMBER_STATE_MERGED
    assert shell.merged_into == survivor.member_id
    # The duplicate's mobile finds the survivor and cannot enroll a third file.
    found = await s.LookupMember(M.LookupMemberRequest(mobile="+8613900139000"), metadata=HQ)
    assert found.member_id == survivor.member_id
    taken = await fails(create(s, full_member("+8613900139000")))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS

    follow_ups = await s.ListFollowUps(
        M.ListFollowUpsRequest(member_id=survivor.member_id), metadata=HQ
    )
    assert [f.next_step for f in follow_ups.follow_ups] == ["bring samples"]
    feedback = await s.ListFeedback(
        M.ListFeedbackRequest(member_id=survivor.member_id), metadata=HQ
    )
    assert [(b.rating, b.text) for b in feedback.feedback] == [(5, "lovely")]
    history = await s.ListMemberChanges(
        M.ListMemberChangesRequest(member_id=duplicate.member_id), metadata=HQ
    )
    assert [c.operation for c in history.changes] == ["merge", "create"]
    survivor_history = await s.ListMemberChanges(
        M.ListMemberChangesRequest(member_id=survivor.member_id), metadata=HQ
    )
    assert json.loads(survivor_history.changes[0].new_values["merged_from"]) == duplicate.member_id

    again = await fails(
        s.MergeMembers(
            M.MergeMembersRequest(
                request_id="merge-2",
                survivor_member_id=survivor.member_id,
                duplicate_member_id=duplicate.member_id,
            ),
            metadata=HQ,
        )
    )
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    events = [
        events_pb2.MemberMerged.FromString(p)
        for subject, p in await outbox(suite)
        if subject == "members.v1.member.merged"
    ]
    assert [(e.survivor_member_id, e.duplicate_member_id) for e in events] == [
        (survivor.member_id, duplicate.member_id)
    ]


async def test_export_and_erase(suite: Suite, database_url: DatabaseFactory) -> None:
    s = await start(suite, database_url)
    created = await create(s, full_member())
    await s.RecordFollowUp(
        M.RecordFollowUpRequest(
            request_id="f",
            follow_up=M.FollowUp(
                member_id=created.member_id,
                channel=M.FOLLOW_UP_CHANNEL_PHONE,
                outcome=M.FOLLOW_UP_OUTCOME_NO_ANSWER,
                next_step="try on Friday",
            ),
        ),
        metadata=OP_S001,
    )
    denied = await fails(
        s.ExportMemberData(M.ExportMemberDataRequest(member_id=created.member_id), metadata=OP_S001)
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    exported = await s.ExportMemberData(
        M.ExportMemberDataRequest(member_id=created.member_id), metadata=CALL_CENTER
    )
    document = json.loads(exported.json)
    assert document["file"]["mobile"] == MOBILE
    assert document["file"]["address"]["street"] == "建国路 88 号"
    assert document["follow_ups"][0]["follow_up"]["next_step"] == "try on Friday"
    assert document["history"][0]["operation"] == "create"

    denied = await fails(
        s.EraseMember(M.EraseMemberRequest(member_id=created.member_id), metadata=MGR_S001)
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    erased = await s.EraseMember(M.EraseMemberRequest(member_id=created.member_id), metadata=HQ)
    assert erased.state == M.MEMBER_STATE_ERASED
    shell = await s.GetMember(M.GetMemberRequest(member_id=created.member_id), metadata=HQ)
    assert shell.state == M.MEMBER_STATE_ERASED
    assert (shell.given_name, shell.mobile, shell.email, shell.landline, shell.notes) == ("",) * 5
    assert not shell.HasField("address") and not shell.HasField("birthday")
    assert shell.home_store_id == "S001"
    follow_ups = await s.ListFollowUps(
        M.ListFollowUpsRequest(member_id=created.member_id), metadata=HQ
    )
    assert follow_ups.follow_ups[0].next_step == ""
    assert follow_ups.follow_ups[0].outcome == M.FOLLOW_UP_OUTCOME_NO_ANSWER
    assert (
        await s.EraseMember(M.EraseMemberRequest(member_id=created.member_id), metadata=HQ)
    ).state == M.MEMBER_STATE_ERASED

    missing = await fails(s.LookupMember(M.LookupMemberRequest(mobile=MOBILE), metadata=HQ))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    again = await create(s, full_member())
    assert again.member_id != created.member_id
    erased_events = [
        events_pb2.MemberErased.FromString(p).member_id
        for subject, p in await outbox(suite)
        if subject == "members.v1.member.erased"
    ]
    assert erased_events == [created.member_id]


async def test_a_referrer_is_an_active_member_and_the_enrollment_event_names_them(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    s = await start(suite, database_url)
    alice = await create(s, full_member("+8613800138301"))
    friend = full_member("+8613800138302")
    friend.referrer_member_id = alice.member_id
    bob = await create(s, friend)
    assert bob.referrer_member_id == alice.member_id
    enrolled = [
        events_pb2.MemberEnrolled.FromString(payload)
        for subject, payload in await outbox(suite)
        if subject == "members.v1.member.enrolled"
    ]
    assert [(e.member_id, e.referrer_member_id) for e in enrolled] == [
        (alice.member_id, ""),
        (bob.member_id, alice.member_id),
    ]
    # An archived member refers nobody new; a file that named them before
    # keeps them through later updates.
    await s.ArchiveMember(M.ArchiveMemberRequest(member_id=alice.member_id), metadata=HQ)
    late = full_member("+8613800138303")
    late.referrer_member_id = alice.member_id
    error = await fails(create(s, late))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(rpc_details(error)["violations"]) == {"member.referrer_member_id"}
    updated = await s.UpdateMember(
        M.UpdateMemberRequest(
            member=M.Member(member_id=bob.member_id, occupation="nurse"),
            update_mask=mask("occupation"),
        ),
        metadata=HQ,
    )
    assert updated.referrer_member_id == alice.member_id


async def test_concurrent_creation_of_one_mobile_has_one_winner(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    s = await start(suite, database_url)

    async def attempt(request_id: str) -> str:
        try:
            return (
                "OK:"
                + (
                    await s.CreateMember(
                        M.CreateMemberRequest(request_id=request_id, member=full_member()),
                        metadata=HQ,
                    )
                ).member_id
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    outcomes = await asyncio.gather(attempt("one"), attempt("two"))
    assert sorted(o.split(":")[0] for o in outcomes) == ["ALREADY_EXISTS", "OK"], outcomes


async def test_no_personal_value_in_the_database_or_the_events(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    s = await start(suite, database_url)
    member = full_member()
    member.given_name, member.family_name = "Meiling", "Ouyang"
    created = await create(s, member, OP_S001)
    mid = created.member_id
    await s.UpdateMember(
        M.UpdateMemberRequest(
            member=M.Member(member_id=mid, email="wang.fang@example.org", notes="secret note"),
            update_mask=mask("email", "notes"),
        ),
        metadata=OP_S001,
    )
    await s.RecordFollowUp(
        M.RecordFollowUpRequest(
            request_id="f",
            follow_up=M.FollowUp(
                member_id=mid,
                channel=M.FOLLOW_UP_CHANNEL_PHONE,
                outcome=M.FOLLOW_UP_OUTCOME_REACHED,
                next_step="private next step",
            ),
        ),
        metadata=OP_S002,
    )
    await s.RecordFeedback(
        M.RecordFeedbackRequest(
            request_id="b",
            feedback=M.Feedback(
                member_id=mid, subject=M.FEEDBACK_SUBJECT_SERVICE, rating=2, text="private text"
            ),
        ),
        metadata=OP_S002,
    )
    await s.UpdateConsent(
        M.UpdateConsentRequest(member_id=mid, channel=M.CONTACT_CHANNEL_POST, granted=True),
        metadata=OP_S002,
    )
    secrets = [
        "8613800138000",
        "13800138000",
        "li.na@example.com",
        "wang.fang@example.org",
        "65529988",
        "建国路",
        "100022",
        "朝阳区",
        "1990-03-14",
        "prefers afternoon",
        "secret note",
        "private next step",
        "private text",
        "Meiling",
        "Ouyang",
    ]
    stored = await every_stored_byte(suite)
    for secret in secrets:
        assert secret.encode() not in stored, secret
    events = await outbox(suite)
    assert {subject for subject, _ in events} == {
        "members.v1.member.enrolled",
        "members.v1.member.updated",
        "members.v1.followup.recorded",
        "members.v1.member.consent_changed",
    }
    payloads = b"".join(p for _, p in events)
    for secret in secrets:
        assert secret.encode() not in payloads, secret


async def test_migration_0003_upgrades_existing_files_and_matches_the_tables(
    database_url: DatabaseFactory,
) -> None:
    """0003 on a database holding files enrolled under 0001: they keep their
    values and get an enrollment time; the migrated schema is the one the
    code declares; and 0003 can be rolled back and applied again."""
    from chassis.db import Database, utcnow

    db = Database(await database_url("members"))
    migrations = members_definition.migrations_dir
    try:
        await migrate(db, migrations, "members", "0001")
        async with db.engine.begin() as conn:
            now = utcnow()
            await conn.execute(
                sa.text(
                    "INSERT INTO members (member_id, home_store_id, given_name_enc, mobile_enc,"
                    " mobile_index, gender, enrollment_channel, preferred_language, enrolled_by,"
                    " enrolled_from_store, created_at, updated_at, version) VALUES ('MOLD0000000',"
                    " 'S001', :b, :b, 'idx', '', 'store', 'en', 'x', '', :t, :t, 1)"
                ),
                {"b": b"sealed", "t": now if db.dialect != "sqlite" else now.replace(tzinfo=None)},
            )
        await migrate(db, migrations, "members", "head")
        from services.members.store.members import members as members_table

        async with db.sessions() as session:
            row = (await session.execute(sa.select(members_table))).one()
        assert row.enrolled_at is not None and row.state == "active"
        assert row.consultant_id == ""

        from services.members.store import members as member_tables

        mine = {
            t.name
            for t in metadata.sorted_tables
            if getattr(member_tables, t.name, None) is t
            or t.name in ("member_keys", "attribute_definitions")
        }

        assert await schema_drift(db, metadata, mine) == []
        await migrate(db, migrations, "members", "0002", down=True)
        await migrate(db, migrations, "members", "head")
    finally:
        await db.engine.dispose()
