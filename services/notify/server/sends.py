"""SendsService (direct sends by HQ) and the workers of the scheduled and
direct triggers: the sends worker, which expands a running send's audience
into notifications, and the schedule worker (birthdays, anniversaries, the
weekly digest; see services/notify/schedules.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import Role, current_principal
from chassis.db import Database, utcnow
from chassis.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, run_idempotent
from chassis.logs import get_logger
from chassis.paging import newest_first_after, newest_first_token, page_size
from chassis.service import ServiceContext
from chassis.telemetry import current_traceparent
from chassis.wakeup import Wakeup
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import members_pb2
from cornucopia.notify.v1 import notify_pb2, sends_pb2_grpc
from cornucopia.notify.v1 import sends_pb2 as pb
from services.notify import domain
from services.notify.domain.policy import NotifyPolicy
from services.notify.peers import Peers, shared_peers
from services.notify.schedules import Schedules, ScheduleWorker
from services.notify.store import intents
from services.notify.store import sends as store
from services.notify.store.policy import load_policy
from services.notify.store.sends import SendRecord, SendState

log = get_logger(__name__)

MARKETING = "marketing"
MAX_LISTED_MEMBERS = 10_000
MAX_MEMBER_ID_LENGTH = 16
MAX_TEMPLATE_LENGTH = 64
MAX_REASON_LENGTH = 500
MAX_SCHEDULE_AHEAD = dt.timedelta(days=366)
# A schedule time this far in the past is taken as "now" (the caller's
# clock may lag), further back it is a mistake.
SCHEDULE_LEEWAY = dt.timedelta(minutes=5)
WRITING_ROLES = (Role.HQ_ADMIN,)
READING_ROLES = (Role.HQ_ADMIN, Role.SERVICE)
# Members written per transaction of a listed send, and read per page of a
# segment's.
BATCH = 500
SELECT_PAGE = 1000
LEASE = dt.timedelta(minutes=5)
DEFAULT_POLL_SECONDS = 5.0

SEND_CHANNELS = {
    notify_pb2.CHANNEL_SMS: domain.Channel.SMS,
    notify_pb2.CHANNEL_EMAIL: domain.Channel.EMAIL,
    notify_pb2.CHANNEL_PUSH: domain.Channel.PUSH,
    notify_pb2.CHANNEL_POST: domain.Channel.POST,
}
CHANNELS_PROTO = {v: k for k, v in SEND_CHANNELS.items()}
STATES_PROTO = {
    SendState.PENDING_APPROVAL: pb.SEND_STATE_PENDING_APPROVAL,
    SendState.SCHEDULED: pb.SEND_STATE_SCHEDULED,
    SendState.RUNNING: pb.SEND_STATE_RUNNING,
    SendState.DONE: pb.SEND_STATE_DONE,
    SendState.REJECTED: pb.SEND_STATE_REJECTED,
    SendState.CANCELLED: pb.SEND_STATE_CANCELLED,
}
STATES = {v: k for k, v in STATES_PROTO.items()}


def criteria_json(criteria: members_pb2.MemberCriteria) -> str:
    return json_format.MessageToJson(criteria, indent=None, sort_keys=True)


def criteria_of(text: str) -> members_pb2.MemberCriteria:
    return json_format.Parse(text, members_pb2.MemberCriteria())


def new_send_id() -> str:
    return f"SND{uuid.uuid4().hex[:12].upper()}"


def _timestamp(at: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


def _stamp(principal: str | None, at: dt.datetime | None) -> org_pb2.AuditStamp | None:
    if principal is None or at is None:
        return None
    return org_pb2.AuditStamp(principal=principal, time=_timestamp(at))


def to_proto(
    send: SendRecord, member_ids: Sequence[str] = (), progress: store.Progress | None = None
) -> pb.Send:
    m = pb.Send(
        send_id=send.send_id,
        template=send.template or "",
        trigger=send.trigger,
        member_ids=list(member_ids),
        segment_id=send.segment_id,
        segment_version=send.segment_version,
        channel=CHANNELS_PROTO.get(send.channel, notify_pb2.CHANNEL_UNSPECIFIED)  # type: ignore[arg-type]
        if send.channel
        else notify_pb2.CHANNEL_UNSPECIFIED,
        state=STATES_PROTO[send.state],
        audience_size=send.audience_size,
        notifications_written=send.written,
        approval_required=send.approval_required,
        created=org_pb2.AuditStamp(
            principal=send.created_by,
            store_id=send.created_store_id,
            time=_timestamp(send.created_at),
        ),
        reason=send.reason,
    )
    if send.schedule_at is not None:
        m.schedule_time.CopyFrom(_timestamp(send.schedule_at))
    for target, principal, at in (
        (m.approved, send.approved_by, send.approved_at),
        (m.rejected, send.rejected_by, send.rejected_at),
        (m.cancelled, send.cancelled_by, send.cancelled_at),
    ):
        stamp = _stamp(principal, at)
        if stamp is not None:
            target.CopyFrom(stamp)
    if send.finished_at is not None:
        m.finish_time.CopyFrom(_timestamp(send.finished_at))
    if progress is not None:
        m.messages_queued = progress.queued
        m.messages_suppressed = progress.suppressed
        m.messages_sent = progress.sent
        m.messages_failed = progress.failed
    return m


def _send_not_found(send_id: str) -> NotFound:
    return NotFound("no send with this id", reason="SEND_NOT_FOUND", metadata={"send_id": send_id})


def _segment_not_found(segment_id: str) -> NotFound:
    return NotFound(
        "no segment with this id", reason="SEGMENT_NOT_FOUND", metadata={"segment_id": segment_id}
    )


def _required_id(value: str, field: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument([FieldViolation(field, "required")])
    if len(value) > 64:
        raise InvalidArgument([FieldViolation(field, "at most 64 characters")])
    return value


class NewSend:
    """A CreateSend request, checked: every problem reported at once."""

    def __init__(self, request: pb.CreateSendRequest, now: dt.datetime) -> None:
        s = request.send
        v = Violations()
        self.template = s.template.strip() or None
        if self.template is not None and (
            len(self.template) > MAX_TEMPLATE_LENGTH
            or not all(c.isascii() and (c.isalnum() or c in "_-.") for c in self.template)
        ):
            v.add("send.template", "a template name: letters, digits, '_', '-', '.'; at most 64")
        if s.trigger.strip() not in ("", MARKETING):
            v.add("send.trigger", "a direct send uses the 'marketing' trigger")
        self.segment_id = s.segment_id.strip()
        members = [m.strip() for m in s.member_ids]
        if self.segment_id and members:
            v.add("send.segment_id", "one of member_ids and segment_id, not both")
        elif not self.segment_id and not members:
            v.add("send.member_ids", "at least one member, or a segment_id")
        if len(members) > MAX_LISTED_MEMBERS:
            v.add("send.member_ids", f"at most {MAX_LISTED_MEMBERS}; use a segment for more")
        if any(not m or len(m) > MAX_MEMBER_ID_LENGTH for m in members):
            v.add("send.member_ids", f"each a member id of at most {MAX_MEMBER_ID_LENGTH}")
        if len(self.segment_id) > 40:
            v.add("send.segment_id", "at most 40 characters")
        # A member listed twice is sent to once.
        self.member_ids = list(dict.fromkeys(members))
        self.channel: domain.Channel | None = None
        if s.channel != notify_pb2.CHANNEL_UNSPECIFIED:
            channel = SEND_CHANNELS.get(s.channel)  # type: ignore[call-overload]
            if channel is None:
                v.add("send.channel", "sms, email, push or post; unspecified: the member's")
            self.channel = channel
        self.schedule_at: dt.datetime | None = None
        if s.HasField("schedule_time"):
            at = s.schedule_time.ToDatetime(dt.UTC)
            if at < now - SCHEDULE_LEEWAY:
                v.add("send.schedule_time", "in the past")
            elif at > now + MAX_SCHEDULE_AHEAD:
                v.add("send.schedule_time", "at most a year ahead")
            self.schedule_at = at if at > now else None
        v.raise_if_any()


class SendsServicer(sends_pb2_grpc.SendsServiceServicer):
    def __init__(self, ctx: ServiceContext, peers: Peers) -> None:
        self.db = ctx.db
        self.peers = peers

    async def CreateSend(self, request: pb.CreateSendRequest, context: Context) -> pb.Send:
        principal = current_principal()
        principal.require_role(*WRITING_ROLES)
        check_request_id(request.request_id)
        now = utcnow()
        new = NewSend(request, now)
        criteria: str | None = None
        segment_version = 0
        audience = len(new.member_ids)
        if new.segment_id:
            segment = await self.peers.campaigns.segment(new.segment_id)
            if segment is None:
                raise _segment_not_found(new.segment_id)
            criteria = criteria_json(segment.criteria)
            segment_version = segment.version
            audience = await self.peers.members.count_members(segment.criteria)
        trace = current_traceparent()

        async def create(session: AsyncSession) -> pb.Send:
            policy = await load_policy(session)
            approval = audience > policy.approval_threshold
            if approval:
                state = SendState.PENDING_APPROVAL
            elif new.schedule_at is not None:
                state = SendState.SCHEDULED
            else:
                state = SendState.RUNNING
            send = SendRecord(
                send_id=new_send_id(),
                trigger=MARKETING,
                template=new.template,
                channel=new.channel,
                segment_id=new.segment_id,
                segment_version=segment_version,
                criteria=criteria,
                schedule_at=new.schedule_at,
                state=state,
                approval_required=approval,
                audience_size=audience,
                processed=0,
                written=0,
                cursor="",
                claimed_by=None,
                lease_until=None,
                trace_headers=trace,
                created_by=principal.subject,
                created_store_id=principal.store_id,
                created_at=now,
                approved_by=None,
                approved_at=None,
                rejected_by=None,
                rejected_at=None,
                cancelled_by=None,
                cancelled_at=None,
                reason="",
                finished_at=None,
            )
            await store.insert_send(session, send, new.member_ids)
            return to_proto(send, new.member_ids)

        return await run_idempotent(
            self.db,
            method="notify.CreateSend",
            request_id=request.request_id,
            request=request,
            response_type=pb.Send,
            work=create,
        )

    async def GetSend(self, request: pb.GetSendRequest, context: Context) -> pb.Send:
        current_principal().require_role(*READING_ROLES)
        send_id = _required_id(request.send_id, "send_id")
        async with self.db.sessions() as session:
            send = await store.get_send(session, send_id)
            if send is None:
                raise _send_not_found(send_id)
            members = await store.listed_members(session, send_id)
            progress = await store.progress(session, send_id)
        return to_proto(send, members, progress)

    async def ListSends(
        self, request: pb.ListSendsRequest, context: Context
    ) -> pb.ListSendsResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        state: SendState | None = None
        if request.state != pb.SEND_STATE_UNSPECIFIED:
            state = STATES.get(request.state)  # type: ignore[call-overload]
            if state is None:
                raise InvalidArgument([FieldViolation("state", "unknown state")])
        async with self.db.sessions() as session:
            found = await store.list_sends(session, state=state, after=after, limit=size + 1)
        response = pb.ListSendsResponse(sends=[to_proto(s) for s in found[:size]])
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = newest_first_token(last.created_at, last.send_id)
        return response

    async def _change(
        self,
        method: str,
        request: pb.ApproveSendRequest | pb.RejectSendRequest | pb.CancelSendRequest,
        change: Callable[[AsyncSession, SendRecord, str, dt.datetime], Awaitable[None]],
    ) -> pb.Send:
        principal = current_principal()
        principal.require_role(*WRITING_ROLES)
        check_request_id(request.request_id)
        send_id = _required_id(request.send_id, "send_id")

        async def work(session: AsyncSession) -> pb.Send:
            send = await store.get_send(session, send_id, for_update=True)
            if send is None:
                raise _send_not_found(send_id)
            await change(session, send, principal.subject, utcnow())
            changed = await store.get_send(session, send_id)
            assert changed is not None
            return to_proto(changed, await store.listed_members(session, send_id))

        return await run_idempotent(
            self.db,
            method=method,
            request_id=request.request_id,
            request=request,
            response_type=pb.Send,
            work=work,
        )

    async def ApproveSend(self, request: pb.ApproveSendRequest, context: Context) -> pb.Send:
        async def approve(
            session: AsyncSession, send: SendRecord, who: str, now: dt.datetime
        ) -> None:
            if send.state != SendState.PENDING_APPROVAL:
                raise _not_pending(send)
            if who == send.created_by:
                raise PermissionDenied(
                    "a send is approved by another HQ admin than its creator",
                    reason="SELF_APPROVAL",
                    metadata={"send_id": send.send_id},
                )
            later = send.schedule_at is not None and send.schedule_at > now
            await store.move(
                session,
                send.send_id,
                [SendState.PENDING_APPROVAL],
                SendState.SCHEDULED if later else SendState.RUNNING,
                approved_by=who,
                approved_at=now,
            )

        return await self._change("notify.ApproveSend", request, approve)

    async def RejectSend(self, request: pb.RejectSendRequest, context: Context) -> pb.Send:
        reason = _reason(request.reason, required=True)

        async def reject(
            session: AsyncSession, send: SendRecord, who: str, now: dt.datetime
        ) -> None:
            if send.state != SendState.PENDING_APPROVAL:
                raise _not_pending(send)
            await store.move(
                session,
                send.send_id,
                [SendState.PENDING_APPROVAL],
                SendState.REJECTED,
                rejected_by=who,
                rejected_at=now,
                reason=reason,
                finished_at=now,
            )

        return await self._change("notify.RejectSend", request, reject)

    async def CancelSend(self, request: pb.CancelSendRequest, context: Context) -> pb.Send:
        reason = _reason(request.reason, required=False)

        async def cancel(
            session: AsyncSession, send: SendRecord, who: str, now: dt.datetime
        ) -> None:
            if send.state not in store.OPEN_STATES:
                raise FailedPrecondition(
                    f"the send is {send.state.value}",
                    reason="SEND_CLOSED",
                    metadata={"send_id": send.send_id, "state": send.state.value},
                )
            await store.move(
                session,
                send.send_id,
                store.OPEN_STATES,
                SendState.CANCELLED,
                cancelled_by=who,
                cancelled_at=now,
                reason=reason,
                finished_at=now,
                claimed_by=None,
            )
            withdrawn = await store.withdraw_unplanned(session, send.send_id)
            log.info("send cancelled", send_id=send.send_id, withdrawn=withdrawn)

        return await self._change("notify.CancelSend", request, cancel)


def _not_pending(send: SendRecord) -> FailedPrecondition:
    return FailedPrecondition(
        f"the send is {send.state.value}, not waiting for approval",
        reason="SEND_NOT_PENDING_APPROVAL",
        metadata={"send_id": send.send_id, "state": send.state.value},
    )


def _reason(text: str, *, required: bool) -> str:
    reason = text.strip()
    if required and not reason:
        raise InvalidArgument([FieldViolation("reason", "required: why, for the creator")])
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument([FieldViolation("reason", f"at most {MAX_REASON_LENGTH} characters")])
    return reason


# --- the sends worker ----------------------------------------------------------------


class SendsWorker:
    """Starts scheduled sends whose time has come and expands running ones
    into notifications, a batch per transaction, holding a lease on each
    send so that replicas share the work and a send whose worker died is
    taken over where it stopped."""

    def __init__(
        self,
        db: Database,
        peers: Peers,
        *,
        worker_id: str | None = None,
        poll_interval: float | None = None,
        batch: int = BATCH,
        select_page: int = SELECT_PAGE,
    ) -> None:
        self.db = db
        self.peers = peers
        self.worker_id = worker_id or f"sends-{uuid.uuid4()}"
        self.poll_interval = poll_interval or float(
            os.environ.get("NOTIFY_SENDS_POLL_SECONDS", DEFAULT_POLL_SECONDS)
        )
        self.batch = batch
        self.select_page = select_page
        self._wakeup = Wakeup(db, store.SENDS_READY)

    async def run(self) -> None:
        while True:
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sends pass failed; will retry")
            await self._wakeup.wait(self.poll_interval)

    async def run_pass(self, now: dt.datetime | None = None) -> int:
        """Starts what is due and expands every running send nobody holds;
        returns the notifications written."""
        at = now or utcnow()
        async with self.db.transaction() as session:
            await store.start_due(session, at)
        async with self.db.sessions() as session:
            running = await store.running(session, at)
        written = 0
        for send_id in running:
            written += await self.expand(send_id, now=at)
        return written

    async def expand(
        self, send_id: str, *, now: dt.datetime, max_batches: int | None = None
    ) -> int:
        """Writes the send's notifications from where it stands, until its
        audience is done (or ``max_batches``, for tests of a worker cut
        short); returns how many were written."""
        async with self.db.transaction() as session:
            send = await store.claim(session, send_id, self.worker_id, now, LEASE)
        written = 0
        batches = 0
        while send is not None and (max_batches is None or batches < max_batches):
            if send.selecting:
                assert send.criteria is not None
                ids, cursor = await self.peers.members.select_members(
                    criteria_of(send.criteria), send.cursor, self.select_page
                )
                done = not cursor
            else:
                async with self.db.sessions() as session:
                    ids = await store.members_from(session, send_id, send.processed, self.batch)
                cursor = ""
                done = send.processed + len(ids) >= send.audience_size
            async with self.db.transaction() as session:
                current = await store.held(session, send_id, self.worker_id)
                if (
                    current is None
                    or current.cursor != send.cursor
                    or current.processed != send.processed
                ):
                    # Cancelled, or taken over by another worker meanwhile.
                    return written
                added = 0
                for member_id in ids:
                    added += await _notify(session, send, member_id, now)
                await store.advance(
                    session,
                    send,
                    processed=len(ids),
                    written=added,
                    cursor=cursor,
                    done=done,
                    now=now,
                    lease=LEASE,
                )
            written += added
            batches += 1
            if done:
                log.info("send written", send_id=send_id, notifications=send.written + added)
                return written
            async with self.db.sessions() as session:
                send = await store.get_send(session, send_id)
        return written


async def _notify(session: AsyncSession, send: SendRecord, member_id: str, now: dt.datetime) -> int:
    key = f"send:{send.send_id}:{member_id}"
    added = await intents.add_notification(
        session,
        notification_id=str(uuid.uuid4()),
        dedup_key=key,
        trigger=send.trigger,
        category=domain.Category.MARKETING,
        variables={},
        created_at=now,
        trace_headers=send.trace_headers,
        member_id=member_id,
        channel=send.channel,
        template=send.template,
        send_id=send.send_id,
        # Its messages are found by it (the send's progress), and the
        # planner queues one message per member, channel and template.
        trigger_event_id=key,
    )
    return 1 if added else 0


# --- wiring --------------------------------------------------------------------------


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["SendsService"].full_name,
            servicer=SendsServicer(ctx, shared_peers(ctx)),
            add_to_server=sends_pb2_grpc.add_SendsServiceServicer_to_server,
        )
    ]


def schedules(ctx: ServiceContext) -> Schedules:
    async def policy() -> NotifyPolicy:
        async with ctx.db.sessions() as session:
            return await load_policy(session)

    return Schedules(ctx.db, shared_peers(ctx), policy)


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [SendsWorker(ctx.db, shared_peers(ctx)).run, ScheduleWorker(schedules(ctx)).run]
