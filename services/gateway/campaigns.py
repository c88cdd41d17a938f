"""The campaigns service over HTTP, as store staff and terminals use it every
day: a member's coupon wallet and a presented code checked at the till, the
follow-up calls staff make (listed, completed, moved) and their statistics,
and member events (an invited member's answer, check-in at the door, the
attendance report), in front of the campaigns service's CouponsService,
FollowUpService and MemberEventsService.

And the HQ side: coupon templates, issuing them (to a list or a segment) and
their statistics; promotions; follow-up plans; creating member events and
inviting members (a list or a segment); segments, in front of the same
services and PricingService and SegmentsService.

As with the other routes, who may do what is the campaigns service's
business (staff see and work their own store's tasks; the event's store's
staff check in; HQ admins manage templates, promotions, plans and
segments): the gateway checks the token is genuine, forwards it and maps
the answer. Another store's task or event reads as missing (404). Every
POST and PATCH that changes something takes an Idempotency-Key as its
request_id: a retry gets the first answer.
"""

from __future__ import annotations

from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime

from chassis.grpcclient import bearer
from cornucopia.campaigns.v1 import followups_pb2, member_events_pb2, pricing_pb2, segments_pb2
from services.gateway.campaigns_client import (
    COMPLETE_TIMEOUT_SECONDS,
    CouponCode,
    EventId,
    InviteJobId,
    IssueJobId,
    PlanId,
    PromotionId,
    SegmentId,
    TaskId,
    TemplateId,
    call_campaigns,
    campaigns_failed,
)
from services.gateway.campaigns_schemas import (
    COUPON_STATES,
    FOLLOW_UP_TASK_STATES,
    AttendanceReport,
    Coupon,
    CouponPage,
    CouponStateName,
    CouponStatistics,
    CouponTemplate,
    CouponTemplatePage,
    CriteriaPreview,
    FollowUpPlan,
    FollowUpPlanPage,
    FollowUpPlanPatch,
    FollowUpStatistics,
    FollowUpTask,
    FollowUpTaskPage,
    FollowUpTaskStateName,
    Guest,
    Invitations,
    InviteJob,
    IssueJob,
    MemberEvent,
    MemberEventPage,
    NewCheckIn,
    NewCouponTemplate,
    NewFollowUpPlan,
    NewInvitation,
    NewIssue,
    NewMemberEvent,
    NewPromotion,
    NewRsvp,
    NewSegment,
    Promotion,
    PromotionPage,
    Segment,
    SegmentPage,
    SegmentPreview,
    SegmentUpdate,
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
    problem_responses,
    timestamp,
)
from services.gateway.downloads import WORKBOOK_RESPONSES, stream_file
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

CREATE = change_problems(f"An Idempotency-Key reused for a different request ({_KEY_422}).")
CREATE_NAMED = problem_responses(
    400,
    401,
    403,
    404,
    409,
    422,
    429,
    500,
    503,
    504,
    overrides={
        409: "The id is taken (PLAN_EXISTS, SEGMENT_EXISTS).",
        422: f"An Idempotency-Key reused for a different request ({_KEY_422}).",
    },
)
ISSUE = change_problems(
    f"COUPON_TEMPLATE_ENDED or another refusal of the whole issue, or {_KEY_422}. Members "
    "who cannot have a coupon (their limit, the quantity, the budget) are skipped, not refused."
)
INVITE = change_problems(f"RSVP_CLOSED (answers are closed: no more invitations), or {_KEY_422}.")
SEGMENT_UPDATE = problem_responses(
    400,
    401,
    403,
    404,
    409,
    429,
    500,
    503,
    504,
    overrides={409: "VERSION_MISMATCH: the segment changed since you read it (its version)."},
)
# A statistics download may take a while to write.
EXPORT_TIMEOUT_SECONDS = 30.0

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


# -- coupon templates, issuing, statistics (HQ) ------------------------------------------


@router.post(
    "/v1/coupon-templates",
    tags=["coupon templates"],
    summary="Create a coupon template",
    description="A kind of coupon: what it takes off (`amount_off`, `percent_off` with a "
    "`max_discount`, a gift item or a free service), where and on what, how long it is valid "
    "(fixed dates and/or `valid_days` after issue) and its limits (per member, quantity, "
    "budget). HQ admins. Needs an `Idempotency-Key`.",
    responses=CREATE,
    operation_id="createCouponTemplate",
)
async def create_coupon_template(
    body: NewCouponTemplate, request: Request, token: Token, key: Key
) -> CouponTemplate:
    template = await call_campaigns(
        peers_of(request).coupons.CreateCouponTemplate, body.to_proto(key), token
    )
    return from_proto(CouponTemplate, template)


@router.get(
    "/v1/coupon-templates",
    tags=["coupon templates"],
    summary="Coupon templates",
    description="Newest first, a page at a time, with what was issued of each. Staff and services.",
    responses=READ,
    operation_id="listCouponTemplates",
)
async def list_coupon_templates(
    request: Request, token: Token, *, page_size: PageSize = 0, page_token: PageToken = ""
) -> CouponTemplatePage:
    reply = await call_campaigns(
        peers_of(request).coupons.ListCouponTemplates,
        pricing_pb2.ListCouponTemplatesRequest(page_size=page_size, page_token=page_token),
        token,
    )
    return from_proto(CouponTemplatePage, reply)


@router.get(
    "/v1/coupon-templates/{template_id}",
    tags=["coupon templates"],
    summary="A coupon template",
    responses=READ,
    operation_id="getCouponTemplate",
)
async def get_coupon_template(
    template_id: TemplateId, request: Request, token: Token
) -> CouponTemplate:
    template = await call_campaigns(
        peers_of(request).coupons.GetCouponTemplate,
        pricing_pb2.GetCouponTemplateRequest(template_id=template_id),
        token,
    )
    return from_proto(CouponTemplate, template)


@router.post(
    "/v1/coupon-templates/{template_id}/issues",
    tags=["coupon templates"],
    summary="Issue coupons",
    description="Issues the template's coupons to a list of members (`member_ids`, at most "
    "100,000) or to a segment (`segment_id`), never twice to a member in one issue. Up to "
    "100 members are issued within the call (the job comes back `done` with the coupons); "
    "more in the background: follow it with `getIssueJob`. Members past their limit, or "
    "beyond the template's quantity or budget, are skipped with the reason. HQ admins. Needs "
    "an `Idempotency-Key`: the same key gives the same job.",
    responses=ISSUE,
    operation_id="issueCoupons",
)
async def issue_coupons(
    template_id: TemplateId, body: NewIssue, request: Request, token: Token, key: Key
) -> IssueJob:
    job = await call_campaigns(
        peers_of(request).coupons.IssueCoupons, body.to_proto(key, template_id), token
    )
    return from_proto(IssueJob, job)


@router.get(
    "/v1/coupon-issue-jobs/{job_id}",
    tags=["coupon templates"],
    summary="An issue's progress",
    responses=READ,
    operation_id="getIssueJob",
)
async def get_issue_job(job_id: IssueJobId, request: Request, token: Token) -> IssueJob:
    job = await call_campaigns(
        peers_of(request).coupons.GetIssueJob, pricing_pb2.GetIssueJobRequest(job_id=job_id), token
    )
    return from_proto(IssueJob, job)


StatisticsStart = Annotated[
    AwareDatetime,
    Query(description="RFC 3339, with its offset.", examples=["2026-11-01T00:00:00+08:00"]),
]
StatisticsEnd = Annotated[AwareDatetime, Query(description="RFC 3339, with its offset.")]
TemplateFilter = Annotated[
    str, Query(max_length=MAX_ID_LENGTH, description="Only this template's.")
]


def _statistics_fields(
    start_time: AwareDatetime, end_time: AwareDatetime, template_id: str, store_id: str
) -> dict[str, Any]:
    return {
        "template_id": template_id,
        "store_id": store_id,
        "start_time": timestamp(start_time, "start_time"),
        "end_time": timestamp(end_time, "end_time"),
    }


@router.get(
    "/v1/coupon-statistics",
    tags=["coupon templates"],
    summary="Coupon statistics",
    description="Per template and store over [`start_time`, `end_time`): coupons issued and "
    "expired (by the issuing store, empty for HQ), redemptions that stand with the discount "
    "given and the sales attributed (by the redeeming store), and the redemption rate. HQ "
    "admins and region managers see every store, a store manager their own.",
    responses=READ,
    operation_id="getCouponStatistics",
)
async def get_coupon_statistics(
    request: Request,
    token: Token,
    *,
    start_time: StatisticsStart,
    end_time: StatisticsEnd,
    template_id: TemplateFilter = "",
    store_id: StoreFilter = "",
) -> CouponStatistics:
    reply = await call_campaigns(
        peers_of(request).coupons.GetCouponStatistics,
        pricing_pb2.GetCouponStatisticsRequest(
            **_statistics_fields(start_time, end_time, template_id, store_id)
        ),
        token,
    )
    return from_proto(CouponStatistics, reply)


@router.get(
    "/v1/coupon-statistics.xlsx",
    tags=["coupon templates"],
    summary="Download coupon statistics",
    description="The rows of `getCouponStatistics` as an XLSX workbook, streamed as an "
    "attachment. An error before the first chunk is a problem.",
    response_class=StreamingResponse,
    responses=WORKBOOK_RESPONSES,
    operation_id="exportCouponStatistics",
)
async def export_coupon_statistics(
    request: Request,
    token: Token,
    *,
    start_time: StatisticsStart,
    end_time: StatisticsEnd,
    template_id: TemplateFilter = "",
    store_id: StoreFilter = "",
) -> StreamingResponse:
    call: grpc.aio.UnaryStreamCall[Any, pricing_pb2.ExportCouponStatisticsChunk] = peers_of(
        request
    ).coupons.ExportCouponStatistics(
        pricing_pb2.ExportCouponStatisticsRequest(
            **_statistics_fields(start_time, end_time, template_id, store_id)
        ),
        metadata=bearer(token),
        timeout=EXPORT_TIMEOUT_SECONDS,
    )
    return await stream_file(call, campaigns_failed, "coupon-statistics.xlsx")


# -- promotions (HQ) -----------------------------------------------------------------------


@router.post(
    "/v1/promotions",
    tags=["promotions"],
    summary="Create a promotion",
    description="A member price, percent off, spend-and-save, member day, birthday month or "
    "double points, in force from `start_time` (to `end_time`, or open-ended) in the stores "
    "and regions named (empty: everywhere) on the SKUs and categories named (empty: every "
    "line), stacking with the others or alone. HQ admins. Needs an `Idempotency-Key`.",
    responses=CREATE,
    operation_id="createPromotion",
)
async def create_promotion(
    body: NewPromotion, request: Request, token: Token, key: Key
) -> Promotion:
    promotion = await call_campaigns(
        peers_of(request).pricing.CreatePromotion, body.to_proto(key), token
    )
    return from_proto(Promotion, promotion)


@router.get(
    "/v1/promotions",
    tags=["promotions"],
    summary="Promotions",
    description="A page at a time; `in_force_only` leaves out those ended or not begun. Staff "
    "and services.",
    responses=READ,
    operation_id="listPromotions",
)
async def list_promotions(
    request: Request,
    token: Token,
    *,
    in_force_only: Annotated[bool, Query(description="Only those in force now.")] = False,
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> PromotionPage:
    reply = await call_campaigns(
        peers_of(request).pricing.ListPromotions,
        pricing_pb2.ListPromotionsRequest(
            page_size=page_size, page_token=page_token, in_force_only=in_force_only
        ),
        token,
    )
    return from_proto(PromotionPage, reply)


@router.get(
    "/v1/promotions/{promotion_id}",
    tags=["promotions"],
    summary="A promotion",
    responses=READ,
    operation_id="getPromotion",
)
async def get_promotion(promotion_id: PromotionId, request: Request, token: Token) -> Promotion:
    promotion = await call_campaigns(
        peers_of(request).pricing.GetPromotion,
        pricing_pb2.GetPromotionRequest(promotion_id=promotion_id),
        token,
    )
    return from_proto(Promotion, promotion)


@router.post(
    "/v1/promotions/{promotion_id}/end",
    tags=["promotions"],
    summary="End a promotion now",
    description="Its end time becomes now (unless it is already past); baskets priced from "
    "then on no longer get it. A promotion is otherwise not changed: end it and create "
    "another. HQ admins. Needs an `Idempotency-Key`.",
    responses=CREATE,
    operation_id="endPromotion",
)
async def end_promotion(
    promotion_id: PromotionId, request: Request, token: Token, key: Key
) -> Promotion:
    promotion = await call_campaigns(
        peers_of(request).pricing.EndPromotion,
        pricing_pb2.EndPromotionRequest(request_id=key, promotion_id=promotion_id),
        token,
    )
    return from_proto(Promotion, promotion)


# -- follow-up plans (HQ) ------------------------------------------------------------------


@router.post(
    "/v1/follow-up-plans",
    tags=["follow-ups"],
    summary="Create a follow-up plan",
    description="A rule that creates call tasks: `three_three_three`, `birthday`, `win_back` "
    "(`days` without a visit) or `post_purchase` (`days` after a purchase of `category`), "
    "with its call windows. HQ admins. Needs an `Idempotency-Key`; a `plan_id` in use is a "
    "409 (PLAN_EXISTS).",
    responses=CREATE_NAMED,
    operation_id="createFollowUpPlan",
)
async def create_follow_up_plan(
    body: NewFollowUpPlan, request: Request, token: Token, key: Key
) -> FollowUpPlan:
    plan = await call_campaigns(
        peers_of(request).followups.CreateFollowUpPlan, body.to_proto(key), token
    )
    return from_proto(FollowUpPlan, plan)


@router.patch(
    "/v1/follow-up-plans/{plan_id}",
    tags=["follow-ups"],
    summary="Change a follow-up plan",
    description="Changes the fields sent (`display_name`, `enabled`, `days`, `category`, "
    "`call_windows`; null or empty clears one); the kind never changes, and tasks already "
    "created stay. HQ admins. Needs an `Idempotency-Key`.",
    responses=CREATE,
    operation_id="updateFollowUpPlan",
)
async def update_follow_up_plan(
    plan_id: PlanId, body: FollowUpPlanPatch, request: Request, token: Token, key: Key
) -> FollowUpPlan:
    plan = await call_campaigns(
        peers_of(request).followups.UpdateFollowUpPlan, body.to_proto(key, plan_id), token
    )
    return from_proto(FollowUpPlan, plan)


@router.get(
    "/v1/follow-up-plans",
    tags=["follow-ups"],
    summary="Follow-up plans",
    description="In plan_id order, a page at a time. Any staff member.",
    responses=READ,
    operation_id="listFollowUpPlans",
)
async def list_follow_up_plans(
    request: Request, token: Token, *, page_size: PageSize = 0, page_token: PageToken = ""
) -> FollowUpPlanPage:
    reply = await call_campaigns(
        peers_of(request).followups.ListFollowUpPlans,
        followups_pb2.ListFollowUpPlansRequest(page_size=page_size, page_token=page_token),
        token,
    )
    return from_proto(FollowUpPlanPage, reply)


# -- member events: creating and inviting (HQ, store managers) ----------------------------


@router.post(
    "/v1/member-events",
    tags=["member events"],
    summary="Create a member event",
    description="An event at a store with a capacity and an RSVP deadline (by default the "
    "start). HQ admins for any store, store managers for their own. Needs an "
    "`Idempotency-Key`.",
    responses=CREATE,
    operation_id="createMemberEvent",
)
async def create_member_event(
    body: NewMemberEvent, request: Request, token: Token, key: Key
) -> MemberEvent:
    event = await call_campaigns(
        peers_of(request).member_events.CreateMemberEvent, body.to_proto(key), token
    )
    return from_proto(MemberEvent, event)


@router.get(
    "/v1/member-events/{event_id}",
    tags=["member events"],
    summary="A member event",
    description="With the seats taken. Another store's event reads as missing.",
    responses=READ,
    operation_id="getMemberEvent",
)
async def get_member_event(event_id: EventId, request: Request, token: Token) -> MemberEvent:
    event = await call_campaigns(
        peers_of(request).member_events.GetMemberEvent,
        member_events_pb2.GetMemberEventRequest(event_id=event_id),
        token,
    )
    return from_proto(MemberEvent, event)


@router.post(
    "/v1/member-events/{event_id}/invitations",
    tags=["member events"],
    summary="Invite members",
    description="Invites a list of members (`member_ids`, at most 1000) or a segment "
    "(`segment_id`, HQ admins only); each member is invited once per event, and each newly "
    "invited member gets a message. Invitations take no seat (a `yes` does). A segment is an "
    "invite job: within the call for up to 1000 members (`job.state` is `done`), else in the "
    "background (follow it with `getInviteJob`). HQ admins, and the event's store's manager "
    "for lists. Needs an `Idempotency-Key`: the same key gives the same answer (or job).",
    responses=INVITE,
    operation_id="inviteMembers",
)
async def invite_members(
    event_id: EventId, body: NewInvitation, request: Request, token: Token, key: Key
) -> Invitations:
    reply = await call_campaigns(
        peers_of(request).member_events.InviteMembers, body.to_proto(key, event_id), token
    )
    return from_proto(Invitations, reply)


@router.get(
    "/v1/member-event-invite-jobs/{job_id}",
    tags=["member events"],
    summary="A segment invitation's progress",
    responses=READ,
    operation_id="getInviteJob",
)
async def get_invite_job(job_id: InviteJobId, request: Request, token: Token) -> InviteJob:
    job = await call_campaigns(
        peers_of(request).member_events.GetInviteJob,
        member_events_pb2.GetInviteJobRequest(job_id=job_id),
        token,
    )
    return from_proto(InviteJob, job)


# -- segments (HQ) ----------------------------------------------------------------------------


@router.post(
    "/v1/segments",
    tags=["segments"],
    summary="Create a segment",
    description="Named rules over the member file, kept by campaigns and evaluated by the "
    "members service whenever the segment is previewed, issued to or invited: the members "
    "matching at that moment. The rules are checked by members (a 400 names "
    "`criteria.<field>`). HQ admins. Needs an `Idempotency-Key`; a `segment_id` in use is a "
    "409 (SEGMENT_EXISTS).",
    responses=CREATE_NAMED,
    operation_id="createSegment",
)
async def create_segment(body: NewSegment, request: Request, token: Token, key: Key) -> Segment:
    segment = await call_campaigns(
        peers_of(request).segments.CreateSegment, body.to_proto(key), token
    )
    return from_proto(Segment, segment)


@router.put(
    "/v1/segments/{segment_id}",
    tags=["segments"],
    summary="Change a segment",
    description="Replaces its name and rules; its version goes up by one. Send the `version` "
    "you read: if it changed since, the change is refused (409 VERSION_MISMATCH). HQ admins.",
    responses=SEGMENT_UPDATE,
    operation_id="updateSegment",
)
async def update_segment(
    segment_id: SegmentId, body: SegmentUpdate, request: Request, token: Token
) -> Segment:
    segment = await call_campaigns(
        peers_of(request).segments.UpdateSegment, body.to_proto(segment_id), token
    )
    return from_proto(Segment, segment)


@router.get(
    "/v1/segments",
    tags=["segments"],
    summary="Segments",
    description="In segment_id order, a page at a time. HQ admins.",
    responses=READ,
    operation_id="listSegments",
)
async def list_segments(
    request: Request, token: Token, *, page_size: PageSize = 0, page_token: PageToken = ""
) -> SegmentPage:
    reply = await call_campaigns(
        peers_of(request).segments.ListSegments,
        segments_pb2.ListSegmentsRequest(page_size=page_size, page_token=page_token),
        token,
    )
    return from_proto(SegmentPage, reply)


@router.get(
    "/v1/segments/{segment_id}",
    tags=["segments"],
    summary="A segment",
    responses=READ,
    operation_id="getSegment",
)
async def get_segment(segment_id: SegmentId, request: Request, token: Token) -> Segment:
    segment = await call_campaigns(
        peers_of(request).segments.GetSegment,
        segments_pb2.GetSegmentRequest(segment_id=segment_id),
        token,
    )
    return from_proto(Segment, segment)


@router.get(
    "/v1/segments/{segment_id}/preview",
    tags=["segments"],
    summary="Preview a segment",
    description="How many members it selects now, with up to 20 of their ids. HQ admins.",
    responses=READ,
    operation_id="previewSegment",
)
async def preview_segment(segment_id: SegmentId, request: Request, token: Token) -> SegmentPreview:
    preview = await call_campaigns(
        peers_of(request).segments.PreviewSegment,
        segments_pb2.PreviewSegmentRequest(segment_id=segment_id),
        token,
    )
    return from_proto(SegmentPreview, preview)


@router.post(
    "/v1/segment-previews",
    tags=["segments"],
    summary="Preview rules",
    description="How many members these rules select now, with up to 20 of their ids, "
    "without keeping the rules. Writes nothing: no `Idempotency-Key`. HQ admins.",
    responses=READ,
    operation_id="previewCriteria",
)
async def preview_criteria(body: CriteriaPreview, request: Request, token: Token) -> SegmentPreview:
    preview = await call_campaigns(
        peers_of(request).segments.PreviewSegment, body.to_proto(), token
    )
    return from_proto(SegmentPreview, preview)
