"""The campaigns service over HTTP, as store staff and terminals use it every
day: a member's coupon wallet and a presented code checked at the till, the
follow-up calls staff make (listed, completed, moved) and their statistics,
and member events (an invited member's answer, check-in at the door, the
attendance report), in front of the campaigns service's CouponsService,
FollowUpService and MemberEventsService.

As with the other routes, who may do what is the campaigns service's
business (staff see and work their own store's tasks; the event's store's
staff check in): the gateway checks the token is genuine, forwards it and
maps the answer. Another store's task or event reads as missing (404).
Every POST takes an Idempotency-Key as its request_id: a retry gets the
first answer.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime

from cornucopia.campaigns.v1 import followups_pb2, member_events_pb2, pricing_pb2
from services.gateway.campaigns_client import (
    COMPLETE_TIMEOUT_SECONDS,
    CouponCode,
    EventId,
    TaskId,
    call_campaigns,
)
from services.gateway.campaigns_schemas import (
    COUPON_STATES,
    FOLLOW_UP_TASK_STATES,
    AttendanceReport,
    Coupon,
    CouponPage,
    CouponStateName,
    FollowUpStatistics,
    FollowUpTask,
    FollowUpTaskPage,
    FollowUpTaskStateName,
    Guest,
    MemberEventPage,
    NewCheckIn,
    NewRsvp,
    TaskCompletion,
    TaskReschedule,
)
from services.gateway.card_schemas import MAX_ID_LENGTH
from services.gateway.deps import (
    READ_PROBLEMS,
    Key,
    PageSize,
    PageToken,
    Token,
    change_problems,
    peers_of,
    timestamp,
)
from services.gateway.loyalty_client import MemberId
from services.gateway.schemas import from_proto

router = APIRouter()

READ = READ_PROBLEMS
_KEY_422 = "an Idempotency-Key reused for a different request (IDEMPOTENCY_KEY_REUSED)"
TASK_CHANGE = change_problems(f"TASK_CLOSED (completed, skipped or cancelled), or {_KEY_422}.")
RSVP = change_problems(
    "EVENT_FULL (no seat left; the earlier answer stays), NOT_INVITED, RSVP_CLOSED (after the "
    f"deadline), or {_KEY_422}."
)
CHECK_IN = change_problems(
    "CHECK_IN_CLOSED (outside the door's hours: from two hours before the start to the end), "
    f"or {_KEY_422}."
)

StoreFilter = Annotated[
    str, Query(max_length=MAX_ID_LENGTH, description="Only this store's (within your scope).")
]


# -- coupons --------------------------------------------------------------------------


@router.get(
    "/v1/members/{member_id}/coupons",
    tags=["coupons"],
    summary="A member's coupons",
    description="The member's wallet, newest first, a page at a time; optionally only coupons "
    "in the given states (`state` repeated, e.g. `?state=issued&state=reserved`). Any staff "
    "member.",
    responses=READ,
    operation_id="listMemberCoupons",
)
async def list_member_coupons(
    member_id: MemberId,
    request: Request,
    token: Token,
    *,
    state: Annotated[
        list[CouponStateName] | None, Query(description="Only these states; none: every state.")
    ] = None,
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> CouponPage:
    reply = await call_campaigns(
        peers_of(request).coupons.ListMemberCoupons,
        pricing_pb2.ListMemberCouponsRequest(
            member_id=member_id,
            states=[COUPON_STATES[s] for s in state or ()],  # type: ignore[misc]
            page_size=page_size,
            page_token=page_token,
        ),
        token,
    )
    return from_proto(CouponPage, reply)


@router.get(
    "/v1/coupons/{code}",
    tags=["coupons"],
    summary="Check a presented coupon",
    description="The coupon a member shows at the till, by its code (any case; spaces and "
    "dashes ignored): whose it is, its state and validity. Any staff member.",
    responses=READ,
    operation_id="getCoupon",
)
async def get_coupon(code: CouponCode, request: Request, token: Token) -> Coupon:
    coupon = await call_campaigns(
        peers_of(request).coupons.GetCoupon, pricing_pb2.GetCouponRequest(code=code), token
    )
    return from_proto(Coupon, coupon)


# -- follow-up tasks ---------------------------------------------------------------------


@router.get(
    "/v1/follow-up-tasks",
    tags=["follow-ups"],
    summary="The calls to make",
    description="The follow-up tasks you may see, earliest due first, a page at a time: a "
    "store operator those assigned to them or to their store unassigned, a store manager all "
    "of the store's, region managers their region's. By default the open ones (`scheduled` "
    "and `due`); `due_before` (e.g. the end of today) leaves the later ones out.",
    responses=READ,
    operation_id="listFollowUpTasks",
)
async def list_follow_up_tasks(
    request: Request,
    token: Token,
    *,
    state: Annotated[
        list[FollowUpTaskStateName] | None,
        Query(description="Only these states; none: `scheduled` and `due`."),
    ] = None,
    due_before: Annotated[
        AwareDatetime | None,
        Query(
            description="RFC 3339, with its offset: only tasks due before it.",
            examples=["2026-12-01T00:00:00+08:00"],
        ),
    ] = None,
    store_id: StoreFilter = "",
    assignee_staff_id: Annotated[
        str, Query(max_length=MAX_ID_LENGTH, description="Only those assigned to this staff id.")
    ] = "",
    member_id: Annotated[
        str, Query(max_length=MAX_ID_LENGTH, description="Only this member's.")
    ] = "",
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> FollowUpTaskPage:
    reply = await call_campaigns(
        peers_of(request).followups.ListFollowUpTasks,
        followups_pb2.ListFollowUpTasksRequest(
            page_size=page_size,
            page_token=page_token,
            store_id=store_id,
            assignee_staff_id=assignee_staff_id,
            member_id=member_id,
            states=[FOLLOW_UP_TASK_STATES[s] for s in state or ()],  # type: ignore[misc]
            due_before=timestamp(due_before, "due_before"),
        ),
        token,
    )
    return from_proto(FollowUpTaskPage, reply)


@router.post(
    "/v1/follow-up-tasks/{task_id}/complete",
    tags=["follow-ups"],
    summary="Log a call's outcome",
    description="The call becomes a follow-up record on the member's file, recorded as you "
    "(the `note` is kept there only). Staff who may see the task. Needs an `Idempotency-Key`: "
    "a retry gets the same task.",
    responses=TASK_CHANGE,
    operation_id="completeFollowUpTask",
)
async def complete_follow_up_task(
    task_id: TaskId, body: TaskCompletion, request: Request, token: Token, key: Key
) -> FollowUpTask:
    task = await call_campaigns(
        peers_of(request).followups.CompleteFollowUpTask,
        body.to_proto(key, task_id),
        token,
        COMPLETE_TIMEOUT_SECONDS,
    )
    return from_proto(FollowUpTask, task)


@router.post(
    "/v1/follow-up-tasks/{task_id}/reschedule",
    tags=["follow-ups"],
    summary="Move a call",
    description="Moves an open task to another time, snapped to the start of the store's "
    "first call window at or after it (a time inside a window stays). Needs an "
    "`Idempotency-Key`.",
    responses=TASK_CHANGE,
    operation_id="rescheduleFollowUpTask",
)
async def reschedule_follow_up_task(
    task_id: TaskId, body: TaskReschedule, request: Request, token: Token, key: Key
) -> FollowUpTask:
    task = await call_campaigns(
        peers_of(request).followups.RescheduleFollowUpTask, body.to_proto(key, task_id), token
    )
    return from_proto(FollowUpTask, task)


@router.get(
    "/v1/follow-up-statistics",
    tags=["follow-ups"],
    summary="Follow-up statistics",
    description="The tasks due within [`start_time`, `end_time`) counted: created, completed "
    "(by outcome), skipped, overdue and open, and the completion rate; for one store or staff "
    "member, or for everything you may see.",
    responses=READ,
    operation_id="getFollowUpStatistics",
)
async def get_follow_up_statistics(
    request: Request,
    token: Token,
    *,
    start_time: Annotated[
        AwareDatetime,
        Query(description="RFC 3339, with its offset.", examples=["2026-11-01T00:00:00+08:00"]),
    ],
    end_time: Annotated[AwareDatetime, Query(description="RFC 3339, with its offset.")],
    store_id: StoreFilter = "",
    staff_id: Annotated[
        str, Query(max_length=MAX_ID_LENGTH, description="Only this staff member's tasks.")
    ] = "",
) -> FollowUpStatistics:
    reply = await call_campaigns(
        peers_of(request).followups.GetFollowUpStatistics,
        followups_pb2.GetFollowUpStatisticsRequest(
            store_id=store_id,
            staff_id=staff_id,
            start_time=timestamp(start_time, "start_time"),
            end_time=timestamp(end_time, "end_time"),
        ),
        token,
    )
    return from_proto(FollowUpStatistics, reply)


# -- member events ------------------------------------------------------------------------


@router.get(
    "/v1/member-events",
    tags=["member events"],
    summary="Member events",
    description="The events of the stores you may see, earliest start first, a page at a "
    "time; optionally one store's, or only those ending after `end_after` (e.g. now, for "
    "those to come).",
    responses=READ,
    operation_id="listMemberEvents",
)
async def list_member_events(
    request: Request,
    token: Token,
    *,
    store_id: StoreFilter = "",
    end_after: Annotated[
        AwareDatetime | None,
        Query(description="RFC 3339, with its offset: only events that end after it."),
    ] = None,
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> MemberEventPage:
    reply = await call_campaigns(
        peers_of(request).member_events.ListMemberEvents,
        member_events_pb2.ListMemberEventsRequest(
            store_id=store_id,
            end_after=timestamp(end_after, "end_after"),
            page_size=page_size,
            page_token=page_token,
        ),
        token,
    )
    return from_proto(MemberEventPage, reply)


@router.post(
    "/v1/member-events/{event_id}/rsvps",
    tags=["member events"],
    summary="Take a member's answer",
    description="An invited member's answer, until the RSVP deadline: `yes` takes a seat, "
    "`no` gives back one taken before. Staff of the event's store. Needs an "
    "`Idempotency-Key`.",
    responses=RSVP,
    operation_id="rsvpMemberEvent",
)
async def rsvp_member_event(
    event_id: EventId, body: NewRsvp, request: Request, token: Token, key: Key
) -> Guest:
    guest = await call_campaigns(
        peers_of(request).member_events.Rsvp, body.to_proto(key, event_id), token
    )
    return from_proto(Guest, guest)


@router.post(
    "/v1/member-events/{event_id}/check-ins",
    tags=["member events"],
    summary="Check a member in at the door",
    description="From two hours before the start to the end; once per member (a second "
    "check-in returns the first). A member who had not answered `yes` is a walk-in. Staff of "
    "the event's store. Needs an `Idempotency-Key`.",
    responses=CHECK_IN,
    operation_id="checkInMemberEvent",
)
async def check_in_member_event(
    event_id: EventId, body: NewCheckIn, request: Request, token: Token, key: Key
) -> Guest:
    guest = await call_campaigns(
        peers_of(request).member_events.CheckIn, body.to_proto(key, event_id), token
    )
    return from_proto(Guest, guest)


@router.get(
    "/v1/member-events/{event_id}/attendance",
    tags=["member events"],
    summary="An event's attendance",
    description="Counts of the event's guests: invited, answers, checked in, walk-ins and "
    "no-shows.",
    responses=READ,
    operation_id="getAttendanceReport",
)
async def get_attendance_report(
    event_id: EventId, request: Request, token: Token
) -> AttendanceReport:
    report = await call_campaigns(
        peers_of(request).member_events.GetAttendanceReport,
        member_events_pb2.GetAttendanceReportRequest(event_id=event_id),
        token,
    )
    return from_proto(AttendanceReport, report)
