"""Member events' and referrals' gRPC edges (MemberEventsService,
ReferralsService), the referral consumers and the points worker. Proto <->
domain and authorisation; the rules are in domain/member_events.py and
domain/referrals.py, the reward writes in referral_rewards.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Awaitable, Callable, Sequence

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, ScopeLevel, current_principal
from chassis.db import is_unique_violation, utcnow
from chassis.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound, Violations
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import run_idempotent
from chassis.inbox import Subscription
from chassis.logs import get_logger
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.campaigns.v1 import (
    events_pb2,
    member_events_pb2,
    member_events_pb2_grpc,
    referrals_pb2,
    referrals_pb2_grpc,
)
from cornucopia.common.v1 import org_pb2
from services.campaigns import coupon_ledger, event_invitations, events
from services.campaigns.domain import member_events as domain
from services.campaigns.domain import referrals as referral_rules
from services.campaigns.domain.member_events import Answer, EventKind, InviteJobState, SeatMove
from services.campaigns.domain.referrals import ReferralState, RewardKind, Trigger
from services.campaigns.referral_rewards import (
    LoyaltyPoints,
    MembersReferrers,
    Referrals,
    ReferralWorker,
)
from services.campaigns.server.followups import members_client
from services.campaigns.server.segments import segment_not_found
from services.campaigns.store import coupons as coupon_store
from services.campaigns.store import followups as followup_store
from services.campaigns.store import member_events as store
from services.campaigns.store import referrals as referral_store
from services.campaigns.store import segments as segment_store

log = get_logger(__name__)

E = member_events_pb2
R = referrals_pb2
READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
CREATING_ROLES = (Role.HQ_ADMIN, Role.STORE_MANAGER)
RSVP_ROLES = (*STAFF_ROLES, Role.SERVICE)
DOOR_ROLES = (Role.HQ_ADMIN, Role.STORE_MANAGER, Role.STORE_OPERATOR)
DEFAULT_INVITE_JOB_INTERVAL_SECONDS = 2.0
# Segments are HQ's: only HQ admins invite one.
SEGMENT_INVITING_ROLES = (Role.HQ_ADMIN,)
INVITE_JOB_STATES = {
    InviteJobState.RUNNING: E.INVITE_JOB_STATE_RUNNING,
    InviteJobState.DONE: E.INVITE_JOB_STATE_DONE,
}

KINDS = {
    E.MEMBER_EVENT_KIND_VIP_EVENING: EventKind.VIP_EVENING,
    E.MEMBER_EVENT_KIND_CLASS: EventKind.CLASS,
    E.MEMBER_EVENT_KIND_CHARITY: EventKind.CHARITY,
    E.MEMBER_EVENT_KIND_OTHER: EventKind.OTHER,
}
KIND_PROTOS = {v: k for k, v in KINDS.items()}
ANSWERS = {E.RSVP_ANSWER_YES: Answer.YES, E.RSVP_ANSWER_NO: Answer.NO}
ANSWER_PROTOS = {Answer.YES: E.RSVP_ANSWER_YES, Answer.NO: E.RSVP_ANSWER_NO}
TRIGGERS = {
    R.REFERRAL_TRIGGER_ENROLL: Trigger.ENROLL,
    R.REFERRAL_TRIGGER_FIRST_PURCHASE: Trigger.FIRST_PURCHASE,
}
TRIGGER_PROTOS = {v: k for k, v in TRIGGERS.items()}
REFERRAL_STATE_PROTOS = {
    ReferralState.PENDING: R.REFERRAL_STATE_PENDING,
    ReferralState.REWARDED: R.REFERRAL_STATE_REWARDED,
    ReferralState.SKIPPED: R.REFERRAL_STATE_SKIPPED,
}


def _ts(at: dt.datetime | None) -> Timestamp | None:
    if at is None:
        return None
    out = Timestamp()
    out.FromDatetime(at)
    return out


def _time(ts: Timestamp, present: bool) -> dt.datetime | None:
    return ts.ToDatetime(dt.UTC) if present and (ts.seconds or ts.nanos) else None


def _stamp(principal: Principal, at: dt.datetime) -> org_pb2.AuditStamp:
    return org_pb2.AuditStamp(
        principal=principal.subject, store_id=principal.store_id, time=_ts(at)
    )


def event_to_proto(record: store.EventRecord) -> E.MemberEvent:
    e = record.event
    return E.MemberEvent(
        event_id=e.event_id,
        display_name=e.name,
        kind=KIND_PROTOS[e.kind],
        store_id=e.store_id,
        start_time=_ts(e.start_at),
        end_time=_ts(e.end_at),
        capacity=e.capacity,
        rsvp_deadline=_ts(e.rsvp_deadline),
        confirmed=record.confirmed,
        created_by=record.created_by,
        create_time=_ts(record.created_at),
    )


def guest_to_proto(g: store.Guest) -> E.Guest:
    return E.Guest(
        event_id=g.event_id,
        member_id=g.member_id,
        invited=g.invited,
        answer=ANSWER_PROTOS.get(g.answer, E.RSVP_ANSWER_UNSPECIFIED),
        answer_time=_ts(g.answered_at),
        check_in_time=_ts(g.checked_in_at),
        walk_in=g.walk_in,
        checked_in_by=g.checked_in_by,
    )


def invite_job_to_proto(job: store.InviteJobRecord) -> E.InviteJob:
    return E.InviteJob(
        job_id=job.job_id,
        event_id=job.event_id,
        segment_id=job.segment_id,
        segment_version=job.segment_version,
        state=INVITE_JOB_STATES[job.state],
        total=job.total,
        invited=job.invited,
        already_invited=job.already_invited,
        stop_reason=job.stop_reason,
        created=org_pb2.AuditStamp(
            principal=job.created_by, store_id=job.created_store_id, time=_ts(job.created_at)
        ),
        finish_time=_ts(job.finished_at),
    )


def invite_job_not_found(job_id: str) -> NotFound:
    return NotFound(
        "no invite job with this id", reason="INVITE_JOB_NOT_FOUND", metadata={"job_id": job_id}
    )


def event_not_found(event_id: str) -> NotFound:
    return NotFound(
        "no member event with this id", reason="EVENT_NOT_FOUND", metadata={"event_id": event_id}
    )


async def _region_of(session: AsyncSession, principal: Principal, store_id: str) -> str | None:
    if principal.scope.level != ScopeLevel.REGION:
        return None
    known = await followup_store.get_store(session, store_id)
    return known.region_id if known else None


async def require_store(session: AsyncSession, principal: Principal, store_id: str) -> None:
    principal.require_store(store_id, await _region_of(session, principal, store_id))


async def visible_stores(session: AsyncSession, principal: Principal) -> tuple[str, ...] | None:
    """The stores whose events the caller sees; None: every store."""
    level = principal.scope.level
    if level in (ScopeLevel.HQ, ScopeLevel.CALL_CENTER) or Role.SERVICE in principal.roles:
        return None
    if level == ScopeLevel.STORE:
        return (principal.scope.id,)
    if level == ScopeLevel.REGION:
        s = followup_store.followup_stores.c
        rows = await session.execute(sa.select(s.store_id).where(s.region_id == principal.scope.id))
        return tuple(row.store_id for row in rows)
    return ()


class MemberEventsServicer(member_events_pb2_grpc.MemberEventsServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db
        self.members = members_client(ctx)

    async def _visible_event(
        self, session: AsyncSession, principal: Principal, event_id: str
    ) -> store.EventRecord:
        if not event_id.strip():
            raise InvalidArgument([FieldViolation("event_id", "required")])
        record = await store.get_event(session, event_id.strip())
        if record is None:
            raise event_not_found(event_id)
        stores = await visible_stores(session, principal)
        if stores is not None and record.event.store_id not in stores:
            # Out of scope reads as missing.
            raise event_not_found(event_id)
        return record

    async def CreateMemberEvent(
        self, request: E.CreateMemberEventRequest, context: Context
    ) -> E.MemberEvent:
        principal = current_principal()
        principal.require_role(*CREATING_ROLES)
        m = request.event
        now = utcnow()
        event = domain.validate_event(
            domain.new_event_id(),
            m.display_name,
            KINDS.get(m.kind),  # type: ignore[call-overload]
            m.store_id.strip(),
            _time(m.start_time, m.HasField("start_time")),
            _time(m.end_time, m.HasField("end_time")),
            m.capacity,
            _time(m.rsvp_deadline, m.HasField("rsvp_deadline")),
            now,
        )
        async with self.db.sessions() as session:
            await require_store(session, principal, event.store_id)

        async def create(session: AsyncSession) -> E.MemberEvent:
            await store.insert_event(session, event, created_by=principal.subject, now=now)
            return E.MemberEvent(event_id=event.event_id)

        created = await run_idempotent(
            self.db,
            method="campaigns.CreateMemberEvent",
            request_id=request.request_id,
            request=request,
            response_type=E.MemberEvent,
            work=create,
        )
        async with self.db.sessions() as session:
            record = await store.get_event(session, created.event_id)
        assert record is not None
        return event_to_proto(record)

    async def GetMemberEvent(
        self, request: E.GetMemberEventRequest, context: Context
    ) -> E.MemberEvent:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        async with self.db.sessions() as session:
            return event_to_proto(await self._visible_event(session, principal, request.event_id))

    async def ListMemberEvents(
        self, request: E.ListMemberEventsRequest, context: Context
    ) -> E.ListMemberEventsResponse:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        size = page_size(request.page_size)
        key = decode_token(request.page_token)
        after = None
        if key is not None:
            try:
                after = (dt.datetime.fromisoformat(str(key["t"])), str(key["id"]))
            except (KeyError, ValueError):
                raise InvalidArgument(
                    [FieldViolation("page_token", "not a token this service issued")]
                ) from None
        async with self.db.sessions() as session:
            stores = await visible_stores(session, principal)
            wanted = request.store_id.strip()
            if wanted:
                stores = (wanted,) if stores is None or wanted in stores else ()
            records = await store.list_events(
                session,
                store_ids=stores,
                end_after=_time(request.end_after, request.HasField("end_after")),
                after=after,
                limit=size + 1,
            )
        response = E.ListMemberEventsResponse(events=[event_to_proto(r) for r in records[:size]])
        if len(records) > size:
            last = records[size - 1].event
            response.next_page_token = encode_token(
                {"t": last.start_at.isoformat(), "id": last.event_id}
            )
        return response

    async def InviteMembers(
        self, request: E.InviteMembersRequest, context: Context
    ) -> E.InviteMembersResponse:
        principal = current_principal()
        principal.require_role(*CREATING_ROLES)
        member_ids, segment_id = domain.invite_targets(list(request.member_ids), request.segment_id)
        if segment_id:
            principal.require_role(*SEGMENT_INVITING_ROLES)
        now = utcnow()
        async with self.db.sessions() as session:
            record = await self._visible_event(session, principal, request.event_id)
            await require_store(session, principal, record.event.store_id)
            segment = await segment_store.get_segment(session, segment_id) if segment_id else None
        event = record.event
        # Invitations go out while answers are taken.
        domain.require_rsvp_open(event, now)
        if segment_id:
            if segment is None:
                raise segment_not_found(segment_id)
            return await self._invite_segment(request, principal, event, segment, now)

        async def invite(session: AsyncSession) -> E.InviteMembersResponse:
            stamp = coupon_ledger.Stamp(principal.subject, principal.store_id, now)
            invited = await event_invitations.invite(session, event, member_ids, stamp)
            return E.InviteMembersResponse(
                invited=len(invited), already_invited=len(member_ids) - len(invited)
            )

        return await run_idempotent(
            self.db,
            method="campaigns.InviteMembers",
            request_id=request.request_id,
            request=request,
            response_type=E.InviteMembersResponse,
            work=invite,
        )

    async def _invite_segment(
        self,
        request: E.InviteMembersRequest,
        principal: Principal,
        event: domain.MemberEvent,
        segment: segment_store.SegmentRecord,
        now: dt.datetime,
    ) -> E.InviteMembersResponse:
        """An invite job for the segment, bound to the request id; run
        within the call when the segment is small."""
        count = await self.members.count_members(coupon_ledger.criteria_of(segment.criteria))

        async def create(session: AsyncSession) -> E.InviteMembersResponse:
            job = await store.get_invite_job(session, request_id=request.request_id)
            if job is None:
                job = store.InviteJobRecord(
                    job_id=domain.new_invite_job_id(),
                    request_id=request.request_id,
                    event_id=event.event_id,
                    segment_id=segment.segment_id,
                    segment_version=segment.version,
                    criteria=segment.criteria,
                    state=InviteJobState.RUNNING,
                    created_by=principal.subject,
                    created_store_id=principal.store_id,
                    created_at=now,
                )
                await store.insert_invite_job(session, job)
            return E.InviteMembersResponse(job=invite_job_to_proto(job))

        created = await run_idempotent(
            self.db,
            method="campaigns.InviteMembers",
            request_id=request.request_id,
            request=request,
            response_type=E.InviteMembersResponse,
            work=create,
        )
        job_id = created.job.job_id
        if count <= domain.INLINE_INVITE_LIMIT:
            await event_invitations.run_invite_job(self.db, job_id, self.members)
        async with self.db.sessions() as session:
            job = await store.get_invite_job(session, job_id=job_id)
        assert job is not None
        return E.InviteMembersResponse(
            invited=job.invited,
            already_invited=job.already_invited,
            job=invite_job_to_proto(job),
        )

    async def GetInviteJob(self, request: E.GetInviteJobRequest, context: Context) -> E.InviteJob:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        job_id = request.job_id.strip()
        if not job_id:
            raise InvalidArgument([FieldViolation("job_id", "required")])
        async with self.db.sessions() as session:
            job = await store.get_invite_job(session, job_id=job_id)
            if job is None:
                raise invite_job_not_found(job_id)
            try:
                await self._visible_event(session, principal, job.event_id)
            except NotFound:
                # Another store's event's job reads as missing too.
                raise invite_job_not_found(job_id) from None
        return invite_job_to_proto(job)

    async def Rsvp(self, request: E.RsvpRequest, context: Context) -> E.Guest:
        principal = current_principal()
        principal.require_role(*RSVP_ROLES)
        v = Violations()
        answer = ANSWERS.get(request.answer)  # type: ignore[call-overload]
        if answer is None:
            v.add("answer", "YES or NO")
        member_id = request.member_id.strip()
        if not domain.valid_member_id(member_id):
            v.add("member_id", "required: a member id")
        v.raise_if_any()
        assert answer is not None
        now = utcnow()
        async with self.db.sessions() as session:
            record = await self._visible_event(session, principal, request.event_id)
        event = record.event
        domain.require_rsvp_open(event, now)

        async def rsvp(session: AsyncSession) -> E.Guest:
            guest = await store.get_guest(session, event.event_id, member_id, for_update=True)
            if guest is None or not guest.invited:
                raise domain.not_invited(event.event_id, member_id)
            move = domain.seat_move(guest.answer, answer)
            if guest.answer != answer:
                if move == SeatMove.TAKE and not await store.take_seat(session, event.event_id):
                    raise domain.event_full(event)
                if move == SeatMove.GIVE_BACK:
                    await store.give_back_seat(session, event.event_id)
                # Read FOR UPDATE above (SQLite: one writer), so it is as read.
                changed = await store.set_answer(
                    session, event.event_id, member_id, before=guest.answer, after=answer, at=now
                )
                assert changed
                await events.publish(
                    session,
                    events.EVENT_RSVP,
                    events_pb2.EventRsvp(
                        event_id=event.event_id,
                        member_id=member_id,
                        store_id=event.store_id,
                        answer=answer.value,
                        previous_answer=guest.answer.value,
                        stamp=_stamp(principal, now),
                    ),
                )
            done = await store.get_guest(session, event.event_id, member_id)
            assert done is not None
            return guest_to_proto(done)

        return await run_idempotent(
            self.db,
            method="campaigns.Rsvp",
            request_id=request.request_id,
            request=request,
            response_type=E.Guest,
            work=rsvp,
        )

    async def CheckIn(self, request: E.CheckInRequest, context: Context) -> E.Guest:
        principal = current_principal()
        principal.require_role(*DOOR_ROLES)
        member_id = request.member_id.strip()
        if not domain.valid_member_id(member_id):
            raise InvalidArgument([FieldViolation("member_id", "required: a member id")])
        now = utcnow()
        async with self.db.sessions() as session:
            record = await self._visible_event(session, principal, request.event_id)
        event = record.event
        # At the door: the event's own store (or HQ), not its region.
        if principal.scope.level != ScopeLevel.HQ:
            principal.require_store(event.store_id)
        domain.require_door_open(event, now)

        async def check_in(session: AsyncSession) -> E.Guest:
            if await store.check_in(
                session, event.event_id, member_id, by=principal.subject, at=now
            ):
                guest = await store.get_guest(session, event.event_id, member_id)
                assert guest is not None
                await events.publish(
                    session,
                    events.EVENT_CHECKED_IN,
                    events_pb2.EventCheckedIn(
                        event_id=event.event_id,
                        member_id=member_id,
                        store_id=event.store_id,
                        walk_in=guest.walk_in,
                        stamp=_stamp(principal, now),
                    ),
                )
            done = await store.get_guest(session, event.event_id, member_id)
            assert done is not None
            return guest_to_proto(done)

        return await run_idempotent(
            self.db,
            method="campaigns.CheckIn",
            request_id=request.request_id,
            request=request,
            response_type=E.Guest,
            work=check_in,
        )

    async def GetAttendanceReport(
        self, request: E.GetAttendanceReportRequest, context: Context
    ) -> E.AttendanceReport:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        async with self.db.sessions() as session:
            record = await self._visible_event(session, principal, request.event_id)
            counts = await store.attendance(session, record.event.event_id)
        return E.AttendanceReport(
            event_id=record.event.event_id,
            capacity=record.event.capacity,
            invited=counts.invited,
            yes=counts.yes,
            no=counts.no,
            no_answer=counts.no_answer,
            checked_in=counts.checked_in,
            walk_ins=counts.walk_ins,
            no_shows=counts.no_shows,
        )


# --- referrals ----------------------------------------------------------------------------


def campaign_to_proto(record: referral_store.CampaignRecord) -> R.ReferralCampaign:
    c = record.campaign
    message = R.ReferralCampaign(
        campaign_id=c.campaign_id,
        display_name=c.name,
        trigger=TRIGGER_PROTOS[c.trigger],
        start_time=_ts(c.start_at),
        end_time=_ts(c.end_at),
        create_time=_ts(record.created_at),
    )
    if c.reward == RewardKind.COUPON:
        message.coupon_template_id = c.template_id
    else:
        message.points = c.points
    return message


def referral_to_proto(r: referral_store.Referral) -> R.Referral:
    return R.Referral(
        campaign_id=r.campaign_id,
        referrer_member_id=r.referrer_member_id,
        referred_member_id=r.referred_member_id,
        trigger=TRIGGER_PROTOS[r.trigger],
        state=REFERRAL_STATE_PROTOS[r.state],
        coupon_id=r.coupon_id,
        points=r.points,
        skip_reason=r.skip_reason,
        trigger_reference=r.trigger_reference,
        create_time=_ts(r.created_at),
        reward_time=_ts(r.rewarded_at),
    )


class ReferralsServicer(referrals_pb2_grpc.ReferralsServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db

    async def CreateReferralCampaign(
        self, request: R.CreateReferralCampaignRequest, context: Context
    ) -> R.ReferralCampaign:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        m = request.campaign
        campaign = referral_rules.validate_campaign(
            m.campaign_id.strip(),
            m.display_name,
            TRIGGERS.get(m.trigger),  # type: ignore[call-overload]
            m.coupon_template_id if m.WhichOneof("reward") == "coupon_template_id" else "",
            m.points if m.WhichOneof("reward") == "points" else 0,
            _time(m.start_time, m.HasField("start_time")),
            _time(m.end_time, m.HasField("end_time")),
        )
        now = utcnow()

        async def create(session: AsyncSession) -> R.ReferralCampaign:
            if campaign.reward == RewardKind.COUPON and (
                await coupon_store.get_template(session, campaign.template_id) is None
            ):
                raise InvalidArgument(
                    [FieldViolation("campaign.coupon_template_id", "no such coupon template")]
                )
            await referral_store.insert_campaign(
                session, campaign, created_by=principal.subject, now=now
            )
            return R.ReferralCampaign(campaign_id=campaign.campaign_id)

        try:
            await run_idempotent(
                self.db,
                method="campaigns.CreateReferralCampaign",
                request_id=request.request_id,
                request=request,
                response_type=R.ReferralCampaign,
                work=create,
            )
        except IntegrityError as exc:
            if is_unique_violation(exc):
                raise AlreadyExists(
                    "a referral campaign with this id exists",
                    reason="REFERRAL_CAMPAIGN_EXISTS",
                    metadata={"campaign_id": campaign.campaign_id},
                ) from None
            raise
        async with self.db.sessions() as session:
            record = await referral_store.get_campaign(session, campaign.campaign_id)
        assert record is not None
        return campaign_to_proto(record)

    async def ListReferralCampaigns(
        self, request: R.ListReferralCampaignsRequest, context: Context
    ) -> R.ListReferralCampaignsResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        after = str((decode_token(request.page_token) or {}).get("id", ""))
        async with self.db.sessions() as session:
            records = await referral_store.list_campaigns(session, after=after, limit=size + 1)
        response = R.ListReferralCampaignsResponse(
            campaigns=[campaign_to_proto(r) for r in records[:size]]
        )
        if len(records) > size:
            response.next_page_token = encode_token({"id": records[size - 1].campaign.campaign_id})
        return response

    async def ListReferrals(
        self, request: R.ListReferralsRequest, context: Context
    ) -> R.ListReferralsResponse:
        current_principal().require_role(*READING_ROLES)
        member_id = request.member_id.strip()
        if not domain.valid_member_id(member_id):
            raise InvalidArgument([FieldViolation("member_id", "required: a member id")])
        size = page_size(request.page_size)
        key = decode_token(request.page_token)
        after = None
        if key is not None:
            try:
                after = (dt.datetime.fromisoformat(str(key["t"])), str(key["c"]), str(key["m"]))
            except (KeyError, ValueError):
                raise InvalidArgument(
                    [FieldViolation("page_token", "not a token this service issued")]
                ) from None
        async with self.db.sessions() as session:
            found = await referral_store.referrals_of(
                session, member_id, after=after, limit=size + 1
            )
        response = R.ListReferralsResponse(referrals=[referral_to_proto(r) for r in found[:size]])
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = encode_token(
                {
                    "t": last.created_at.isoformat(),
                    "c": last.campaign_id,
                    "m": last.referred_member_id,
                }
            )
        return response


# --- wiring -------------------------------------------------------------------------------


def loyalty_points(ctx: ServiceContext) -> LoyaltyPoints:
    def make() -> LoyaltyPoints:
        client = LoyaltyPoints(ctx.settings)
        ctx.on_close(client.close)
        return client

    return ctx.shared("campaigns.referrals.loyalty", make)


def referrals(ctx: ServiceContext) -> Referrals:
    return ctx.shared(
        "campaigns.referrals",
        lambda: Referrals(MembersReferrers(members_client(ctx)), loyalty_points(ctx)),
    )


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=E.DESCRIPTOR.services_by_name["MemberEventsService"].full_name,
            servicer=MemberEventsServicer(ctx),
            add_to_server=member_events_pb2_grpc.add_MemberEventsServiceServicer_to_server,
        ),
        GrpcService(
            full_name=R.DESCRIPTOR.services_by_name["ReferralsService"].full_name,
            servicer=ReferralsServicer(ctx),
            add_to_server=referrals_pb2_grpc.add_ReferralsServiceServicer_to_server,
        ),
    ]


def _invite_job_interval() -> float:
    try:
        value = float(
            os.environ.get(
                "CAMPAIGNS_INVITE_JOB_INTERVAL_SECONDS", DEFAULT_INVITE_JOB_INTERVAL_SECONDS
            )
        )
    except ValueError:
        return DEFAULT_INVITE_JOB_INTERVAL_SECONDS
    return value if value > 0 else DEFAULT_INVITE_JOB_INTERVAL_SECONDS


def invite_job_worker(ctx: ServiceContext) -> Callable[[], Awaitable[None]]:
    """Runs the invite jobs too large for their call, and resumes those a
    restart interrupted."""
    db, members, interval = ctx.db, members_client(ctx), _invite_job_interval()

    async def run() -> None:
        while True:
            try:
                count = await event_invitations.run_invite_jobs(db, members)
                if count:
                    log.info("event invite jobs run", count=count)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event invite jobs pass failed; will retry")
            await asyncio.sleep(interval)

    return run


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [ReferralWorker(ctx.db, referrals(ctx)).run, invite_job_worker(ctx)]


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription]:
    return referrals(ctx).subscriptions()
