"""Segments through a real members service and campaigns, on SQLite and
PostgreSQL: members' SelectMembers / CountMembers (criteria, keyset pages,
roles, validation), a segment created, previewed and issued to (each member
once, the template's quantity respected, idempotent by request_id), and a
segment job resumed from the page it recorded; a segment invited to a member
event (each member once, one event.invited each, within the call or by the
worker, resumed from its page, stopped when answers close)."""

from __future__ import annotations

import datetime as dt
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.auth import Role, Scope, ScopeLevel
from chassis.db import outbox_table, utcnow
from cornucopia.campaigns.v1 import (
    events_pb2,
    member_events_pb2_grpc,
    pricing_pb2_grpc,
    segments_pb2_grpc,
)
from cornucopia.campaigns.v1 import member_events_pb2 as E
from cornucopia.campaigns.v1 import pricing_pb2 as pb
from cornucopia.campaigns.v1 import segments_pb2 as S
from cornucopia.common.v1 import date_pb2, money_pb2
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc
from services.campaigns import coupon_ledger, event_invitations
from services.campaigns.domain import member_events as event_rules
from services.campaigns.domain.coupons import JobState
from services.campaigns.domain.member_events import InviteJobState
from services.campaigns.server.followups import members_client
from services.campaigns.store import coupons as coupon_store
from services.campaigns.store import member_events as event_store
from services.members.server import definition as members_definition
from tests.integration.conftest import (
    Suite,
    auth,
    eventually,
    rpc_details,
    seed_organisation,
    token,
)
from tests.integration.infra import DatabaseFactory
from tests.integration.test_campaigns_followups import start_campaigns

HQ = auth()
SERVICE = auth(token((Role.SERVICE,), Scope(ScopeLevel.HQ), "campaigns"))
STORE = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "mgr-1"))


def rid() -> str:
    return str(uuid.uuid4())


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_segment_previewed_and_issued_once_each(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    members = members_pb2_grpc.MembersServiceStub(suite.channels["members"])
    runtime = await start_campaigns(suite, await database_url("campaigns"))
    segments = segments_pb2_grpc.SegmentsServiceStub(suite.channels["campaigns"])
    coupons = pricing_pb2_grpc.CouponsServiceStub(suite.channels["campaigns"])

    async def enroll(n: int, store_id: str, month: int, *, sms: bool = False) -> str:
        created = await members.CreateMember(
            M.CreateMemberRequest(
                request_id=rid(),
                member=M.Member(
                    home_store_id=store_id,
                    given_name="娜",
                    mobile=f"+8613800{n:06d}",
                    preferred_language="zh-CN",
                    birthday=date_pb2.Date(year=1990, month=month, day=15),
                    consents=[M.Consent(channel=M.CONTACT_CHANNEL_SMS, granted=sms)],
                ),
            ),
            metadata=HQ,
        )
        return str(created.member_id)

    june_s001 = sorted([await enroll(i, "S001", 6, sms=i % 2 == 0) for i in range(5)])
    await enroll(10, "S001", 7)
    await enroll(11, "S002", 6)
    archived = await enroll(12, "S001", 6)
    await members.ArchiveMember(M.ArchiveMemberRequest(member_id=archived), metadata=HQ)

    # Members evaluates the rules: keyset pages in member_id order.
    june = M.MemberCriteria(home_store_ids=["S001"], birth_months=[6])
    seen: list[str] = []
    page_token = ""
    while True:
        page = await members.SelectMembers(
            M.SelectMembersRequest(criteria=june, page_size=2, page_token=page_token),
            metadata=SERVICE,
        )
        assert len(page.member_ids) <= 2
        seen.extend(page.member_ids)
        page_token = page.next_page_token
        if not page_token:
            break
    assert seen == june_s001
    count = await members.CountMembers(M.CountMembersRequest(criteria=june), metadata=SERVICE)
    assert count.count == 5
    by_region = M.MemberCriteria(region_ids=["WEST"], birth_months=[6])
    west = await members.CountMembers(M.CountMembersRequest(criteria=by_region), metadata=HQ)
    assert west.count == 1
    with_sms = M.MemberCriteria(home_store_ids=["S001"], consent_channels=[M.CONTACT_CHANNEL_SMS])
    sms = await members.CountMembers(M.CountMembersRequest(criteria=with_sms), metadata=HQ)
    assert sms.count == 3
    archived_too = M.MemberCriteria(
        birth_months=[6], states=[M.MEMBER_STATE_ACTIVE, M.MEMBER_STATE_ARCHIVED]
    )
    everyone = await members.CountMembers(M.CountMembersRequest(criteria=archived_too), metadata=HQ)
    assert everyone.count == 7
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await members.CountMembers(M.CountMembersRequest(criteria=june), metadata=STORE)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await members.SelectMembers(
            M.SelectMembersRequest(
                criteria=M.MemberCriteria(birth_months=[13], genders=[M.GENDER_UNSPECIFIED]),
                page_size=5001,
            ),
            metadata=SERVICE,
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"criteria.birth_months", "criteria.genders"} <= set(
        rpc_details(bad.value)["violations"]
    )

    # A segment in campaigns, checked by members, previewed.
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await segments.CreateSegment(
            S.CreateSegmentRequest(
                request_id=rid(),
                segment=S.Segment(
                    segment_id="BAD", name="bad", criteria=M.MemberCriteria(birth_months=[0])
                ),
            ),
            metadata=HQ,
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    created = await segments.CreateSegment(
        S.CreateSegmentRequest(
            request_id=rid(),
            segment=S.Segment(segment_id="JUNE-S001", name="June birthdays", criteria=june),
        ),
        metadata=HQ,
    )
    assert created.version == 1 and created.criteria == june
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await segments.CreateSegment(
            S.CreateSegmentRequest(
                request_id=rid(), segment=S.Segment(segment_id="JUNE-S001", name="x")
            ),
            metadata=HQ,
        )
    assert rpc_details(taken.value)["reason"] == "SEGMENT_EXISTS"
    preview = await segments.PreviewSegment(
        S.PreviewSegmentRequest(segment_id="JUNE-S001"), metadata=HQ
    )
    assert preview.size == 5 and list(preview.sample_member_ids) == june_s001
    assert preview.version == 1
    inline = await segments.PreviewSegment(S.PreviewSegmentRequest(criteria=by_region), metadata=HQ)
    assert inline.size == 1 and inline.version == 0
    listed = await segments.ListSegments(S.ListSegmentsRequest(), metadata=HQ)
    assert [s.segment_id for s in listed.segments] == ["JUNE-S001"]

    # Issued to the segment: each member once, never past the quantity.
    template = await coupons.CreateCouponTemplate(
        pb.CreateCouponTemplateRequest(
            request_id=rid(),
            template=pb.CouponTemplate(
                display_name="Birthday",
                kind=pb.COUPON_KIND_AMOUNT_OFF,
                currency_code="CNY",
                amount_off=money_pb2.Money(currency_code="CNY", minor_units=1_000),
                valid_days=30,
                total_quantity=4,
            ),
        ),
        metadata=HQ,
    )
    request = pb.IssueCouponsRequest(
        request_id=rid(), template_id=template.template_id, segment_id="JUNE-S001"
    )
    job = await coupons.IssueCoupons(request, metadata=HQ)
    assert job.state == pb.ISSUE_JOB_STATE_DONE
    assert (job.segment_id, job.segment_version) == ("JUNE-S001", 1)
    assert (job.total, job.processed, job.issued, job.skipped) == (5, 5, 4, 1)
    assert sorted(c.member_id for c in job.coupons) == june_s001[:4]
    assert [s.reason for s in job.skipped_members] == ["COUPON_QUANTITY_EXHAUSTED"]
    again = await coupons.IssueCoupons(request, metadata=HQ)
    assert again.job_id == job.job_id and again.issued == 4
    with pytest.raises(grpc.aio.AioRpcError) as both:
        await coupons.IssueCoupons(
            pb.IssueCouponsRequest(
                request_id=rid(),
                template_id=template.template_id,
                segment_id="JUNE-S001",
                member_ids=["M1"],
            ),
            metadata=HQ,
        )
    assert "segment_id" in rpc_details(both.value)["violations"]

    # The segment changes (version 2); a job resumes from its recorded page
    # and never issues twice to a member it already has.
    updated = await segments.UpdateSegment(
        S.UpdateSegmentRequest(
            segment=S.Segment(
                segment_id="JUNE-S001",
                name="June, any store",
                criteria=M.MemberCriteria(birth_months=[6]),
                version=1,
            )
        ),
        metadata=HQ,
    )
    assert updated.version == 2
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await segments.UpdateSegment(
            S.UpdateSegmentRequest(segment=S.Segment(segment_id="JUNE-S001", name="x", version=1)),
            metadata=HQ,
        )
    assert rpc_details(stale.value)["reason"] == "VERSION_MISMATCH"

    unlimited = await coupons.CreateCouponTemplate(
        pb.CreateCouponTemplateRequest(
            request_id=rid(),
            template=pb.CouponTemplate(
                display_name="June",
                kind=pb.COUPON_KIND_AMOUNT_OFF,
                currency_code="CNY",
                amount_off=money_pb2.Money(currency_code="CNY", minor_units=500),
                valid_days=30,
            ),
        ),
        metadata=HQ,
    )
    db = runtime.db
    # A job as the call would record it, stopped after its first page of 2.
    record = coupon_store.JobRecord(
        job_id="JRESUME0001",
        request_id=rid(),
        request_hash="x",
        template_id=unlimited.template_id,
        state=JobState.RUNNING,
        total=0,
        processed=0,
        issued=0,
        skipped=0,
        created_by="test-admin",
        created_store_id="",
        created_at=utcnow(),
        finished_at=None,
        segment_id="JUNE-S001",
        segment_version=2,
        criteria=coupon_ledger.criteria_json(updated.criteria),
        selecting=True,
    )
    async with db.transaction() as session:
        await coupon_store.insert_job(session, record, [])
    selector = members_client(runtime.context)
    first, cursor = await selector.select_members(updated.criteria, "", 2)
    async with db.transaction() as session:
        assert await coupon_store.add_selected_page(session, record.job_id, "", first, cursor)
        # A runner that lost the race for this page writes nothing.
        assert not await coupon_store.add_selected_page(session, record.job_id, "", first, cursor)
    await coupon_ledger.run_job(db, record.job_id, selector)
    resumed = await coupons.GetIssueJob(pb.GetIssueJobRequest(job_id=record.job_id), metadata=HQ)
    assert resumed.state == pb.ISSUE_JOB_STATE_DONE
    assert (resumed.total, resumed.issued, resumed.skipped) == (6, 6, 0)
    wallets = [c.member_id for c in resumed.coupons]
    assert len(wallets) == len(set(wallets)) == 6


def ts(at: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


async def enroll_june(suite: Suite, n: int, store_id: str = "S001") -> str:
    """A member of ``store_id`` born in June."""
    members = members_pb2_grpc.MembersServiceStub(suite.channels["members"])
    created = await members.CreateMember(
        M.CreateMemberRequest(
            request_id=rid(),
            member=M.Member(
                home_store_id=store_id,
                given_name="娜",
                mobile=f"+8613900{n:06d}",
                preferred_language="zh-CN",
                birthday=date_pb2.Date(year=1990, month=6, day=15),
            ),
        ),
        metadata=HQ,
    )
    return str(created.member_id)


async def invited_events(suite: Suite) -> list[str]:
    """The member ids of the campaigns.v1.event.invited events written."""
    db = suite.runtimes["campaigns"].db
    async with db.sessions() as session:
        rows = await session.execute(
            sa.select(outbox_table.c.payload)
            .where(outbox_table.c.subject == "campaigns.v1.event.invited")
            .order_by(outbox_table.c.seq)
        )
        return [events_pb2.EventInvited.FromString(r.payload).member_id for r in rows]


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_segment_invited_to_an_event_once_each(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAMPAIGNS_INVITE_JOB_INTERVAL_SECONDS", "0.2")
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    june = sorted([await enroll_june(suite, i) for i in range(5)])
    await enroll_june(suite, 9, "S002")
    runtime = await start_campaigns(suite, await database_url("campaigns"))
    segments = segments_pb2_grpc.SegmentsServiceStub(suite.channels["campaigns"])
    stub = member_events_pb2_grpc.MemberEventsServiceStub(suite.channels["campaigns"])
    criteria = M.MemberCriteria(home_store_ids=["S001"], birth_months=[6])
    await segments.CreateSegment(
        S.CreateSegmentRequest(
            request_id=rid(),
            segment=S.Segment(segment_id="JUNE", name="June birthdays", criteria=criteria),
        ),
        metadata=HQ,
    )
    start = utcnow() + dt.timedelta(days=2)
    event = await stub.CreateMemberEvent(
        E.CreateMemberEventRequest(
            request_id=rid(),
            event=E.MemberEvent(
                display_name="June class",
                kind=E.MEMBER_EVENT_KIND_CLASS,
                store_id="S001",
                start_time=ts(start),
                end_time=ts(start + dt.timedelta(hours=2)),
                capacity=2,
            ),
        ),
        metadata=HQ,
    )

    # One of them was invited by list before: the segment invites the others.
    await stub.InviteMembers(
        E.InviteMembersRequest(request_id=rid(), event_id=event.event_id, member_ids=[june[0]]),
        metadata=HQ,
    )
    request = E.InviteMembersRequest(request_id=rid(), event_id=event.event_id, segment_id="JUNE")
    answer = await stub.InviteMembers(request, metadata=HQ)
    job = answer.job
    assert job.state == E.INVITE_JOB_STATE_DONE  # five members: within the call
    assert (job.segment_id, job.segment_version, job.stop_reason) == ("JUNE", 1, "")
    assert (job.total, job.invited, job.already_invited) == (5, 4, 1)
    assert (answer.invited, answer.already_invited) == (4, 1)
    assert sorted(await invited_events(suite)) == june
    # The same request again: the same job, nothing more sent.
    again = await stub.InviteMembers(request, metadata=HQ)
    assert again.job.job_id == job.job_id and again.invited == 4
    # Another request for the same segment: nobody is invited twice.
    twice = await stub.InviteMembers(
        E.InviteMembersRequest(request_id=rid(), event_id=event.event_id, segment_id="JUNE"),
        metadata=HQ,
    )
    assert twice.job.job_id != job.job_id
    assert (twice.invited, twice.already_invited) == (0, 5)
    assert sorted(await invited_events(suite)) == june
    read = await stub.GetInviteJob(E.GetInviteJobRequest(job_id=job.job_id), metadata=HQ)
    assert read == job
    report = await stub.GetAttendanceReport(
        E.GetAttendanceReportRequest(event_id=event.event_id), metadata=HQ
    )
    assert report.invited == 5

    # Invitations take no seat; answers do, never past the capacity.
    outcomes = []
    for member_id in june[:3]:
        try:
            await stub.Rsvp(
                E.RsvpRequest(
                    request_id=rid(),
                    event_id=event.event_id,
                    member_id=member_id,
                    answer=E.RSVP_ANSWER_YES,
                ),
                metadata=HQ,
            )
            outcomes.append("OK")
        except grpc.aio.AioRpcError as exc:
            outcomes.append(str(rpc_details(exc)["reason"]))
    assert outcomes == ["OK", "OK", "EVENT_FULL"]

    # Refusals: both targets, an unknown segment, a store manager (segments
    # are HQ's), another store's event's job.
    both = await _fails(
        stub.InviteMembers(
            E.InviteMembersRequest(
                request_id=rid(), event_id=event.event_id, segment_id="JUNE", member_ids=["M1"]
            ),
            metadata=HQ,
        )
    )
    assert "segment_id" in rpc_details(both)["violations"]
    unknown = await _fails(
        stub.InviteMembers(
            E.InviteMembersRequest(request_id=rid(), event_id=event.event_id, segment_id="NONE"),
            metadata=HQ,
        )
    )
    assert rpc_details(unknown)["reason"] == "SEGMENT_NOT_FOUND"
    manager = await _fails(
        stub.InviteMembers(
            E.InviteMembersRequest(request_id=rid(), event_id=event.event_id, segment_id="JUNE"),
            metadata=STORE,
        )
    )
    assert manager.code() == grpc.StatusCode.PERMISSION_DENIED
    other_store = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S002"), "mgr-2"))
    hidden = await _fails(
        stub.GetInviteJob(E.GetInviteJobRequest(job_id=job.job_id), metadata=other_store)
    )
    assert rpc_details(hidden)["reason"] == "INVITE_JOB_NOT_FOUND"

    # A segment larger than the call's share: the worker invites it.
    monkeypatch.setattr(event_rules, "INLINE_INVITE_LIMIT", 2)
    second = await stub.CreateMemberEvent(
        E.CreateMemberEventRequest(
            request_id=rid(),
            event=E.MemberEvent(
                display_name="June evening",
                kind=E.MEMBER_EVENT_KIND_VIP_EVENING,
                store_id="S001",
                start_time=ts(start),
                end_time=ts(start + dt.timedelta(hours=2)),
                capacity=10,
            ),
        ),
        metadata=HQ,
    )
    background = await stub.InviteMembers(
        E.InviteMembersRequest(request_id=rid(), event_id=second.event_id, segment_id="JUNE"),
        metadata=HQ,
    )
    assert background.job.state == E.INVITE_JOB_STATE_RUNNING
    finished = await eventually(
        lambda: stub.GetInviteJob(E.GetInviteJobRequest(job_id=background.job.job_id), metadata=HQ),
        lambda j: j.state == E.INVITE_JOB_STATE_DONE,
    )
    assert (finished.total, finished.invited, finished.already_invited) == (5, 5, 0)
    assert finished.HasField("finish_time")
    assert sorted(await invited_events(suite)) == sorted(june * 2)

    # A job resumed from its recorded page (a page of 2 taken, then the
    # crash): the rest are invited, the first two not again.
    db = runtime.db
    third = await stub.CreateMemberEvent(
        E.CreateMemberEventRequest(
            request_id=rid(),
            event=E.MemberEvent(
                display_name="June talk",
                kind=E.MEMBER_EVENT_KIND_CHARITY,
                store_id="S001",
                start_time=ts(start),
                end_time=ts(start + dt.timedelta(hours=2)),
                capacity=10,
            ),
        ),
        metadata=HQ,
    )
    record = event_store.InviteJobRecord(
        job_id="IJRESUME000001",
        request_id=rid(),
        event_id=third.event_id,
        segment_id="JUNE",
        segment_version=1,
        criteria=coupon_ledger.criteria_json(criteria),
        state=InviteJobState.RUNNING,
        created_by="test-admin",
        created_store_id="",
        created_at=utcnow(),
    )
    async with db.transaction() as session:
        await event_store.insert_invite_job(session, record)
    selector = members_client(runtime.context)
    first, cursor = await selector.select_members(criteria, "", 2)
    async with db.transaction() as session:
        assert await event_store.take_invite_page(session, record.job_id, "", cursor)
        # A runner that lost the race for this page writes nothing.
        assert not await event_store.take_invite_page(session, record.job_id, "", cursor)
        events_of = await event_store.get_event(session, third.event_id)
        assert events_of is not None
        stamp = coupon_ledger.Stamp("test-admin", "", utcnow())
        invited = await event_invitations.invite(session, events_of.event, first, stamp)
        await event_store.count_invite_page(
            session, record.job_id, read=len(first), invited=len(invited)
        )
    await event_invitations.run_invite_job(db, record.job_id, selector)
    resumed = await stub.GetInviteJob(E.GetInviteJobRequest(job_id=record.job_id), metadata=HQ)
    assert resumed.state == E.INVITE_JOB_STATE_DONE
    assert (resumed.total, resumed.invited, resumed.already_invited) == (5, 5, 0)
    assert sorted(await invited_events(suite)) == sorted(june * 3)

    # Answers close while a job runs: it stops there, inviting nobody more.
    late = event_store.InviteJobRecord(
        job_id="IJCLOSED000001",
        request_id=rid(),
        event_id=third.event_id,
        segment_id="JUNE",
        segment_version=1,
        criteria=coupon_ledger.criteria_json(M.MemberCriteria(birth_months=[6])),
        state=InviteJobState.RUNNING,
        created_by="test-admin",
        created_store_id="",
        created_at=utcnow(),
    )
    async with db.transaction() as session:
        await event_store.insert_invite_job(session, late)
        await session.execute(
            sa.update(event_store.member_events)
            .where(event_store.member_events.c.event_id == third.event_id)
            .values(rsvp_deadline=utcnow() - dt.timedelta(seconds=1))
        )
    await event_invitations.run_invite_job(db, late.job_id, selector)
    stopped = await stub.GetInviteJob(E.GetInviteJobRequest(job_id=late.job_id), metadata=HQ)
    assert stopped.state == E.INVITE_JOB_STATE_DONE
    assert (stopped.stop_reason, stopped.total, stopped.invited) == ("RSVP_CLOSED", 0, 0)
    assert sorted(await invited_events(suite)) == sorted(june * 3)  # S002's member not invited
    closed = await _fails(
        stub.InviteMembers(
            E.InviteMembersRequest(request_id=rid(), event_id=third.event_id, segment_id="JUNE"),
            metadata=HQ,
        )
    )
    assert rpc_details(closed)["reason"] == "RSVP_CLOSED"


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value
