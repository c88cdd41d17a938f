"""The JSON shapes of the store-facing campaigns routes (members' coupon
wallets, follow-up tasks, member events) and their translation to and from
the campaigns service's messages, in the manner of loyalty_schemas.py: the
gateway checks shapes, the campaigns service the rules (an outcome given, a
due time not in the past, a seat left) and reports every violation at once.

Enum values are the lower-case short names of the proto enums
(``COUPON_STATE_ISSUED`` is ``"issued"``, ``RSVP_ANSWER_YES`` is ``"yes"``);
money is ``{"currency_code", "minor_units"}``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, TypeVar, cast

from google.protobuf.descriptor import Descriptor
from google.protobuf.json_format import ParseDict, ParseError
from google.protobuf.message import Message
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from cornucopia.campaigns.v1 import followups_pb2, member_events_pb2, pricing_pb2, segments_pb2
from cornucopia.members.v1 import members_pb2
from services.gateway.card_schemas import Id, Money, Stamp
from services.gateway.deps import timestamp
from services.gateway.problems import FieldError, ProblemError
from services.gateway.schemas import Text, enum_schema, expand_enums, one_of, short_names

COUPON_STATES = short_names(pricing_pb2.CouponState.DESCRIPTOR)
COUPON_KINDS = short_names(pricing_pb2.CouponKind.DESCRIPTOR)
FOLLOW_UP_PLAN_KINDS = short_names(followups_pb2.FollowUpPlanKind.DESCRIPTOR)
FOLLOW_UP_TASK_STATES = short_names(followups_pb2.FollowUpTaskState.DESCRIPTOR)
FOLLOW_UP_TASK_OUTCOMES = short_names(followups_pb2.FollowUpTaskOutcome.DESCRIPTOR)
MEMBER_EVENT_KINDS = short_names(member_events_pb2.MemberEventKind.DESCRIPTOR)
RSVP_ANSWERS = short_names(member_events_pb2.RsvpAnswer.DESCRIPTOR)

# Bounds only keep the numbers inside the proto's integers.
MAX_INT32 = 2**31 - 1

CouponStateName = Annotated[str, one_of(COUPON_STATES), enum_schema(COUPON_STATES)]
FollowUpTaskStateName = Annotated[
    str, one_of(FOLLOW_UP_TASK_STATES), enum_schema(FOLLOW_UP_TASK_STATES)
]
OutcomeName = Annotated[str, one_of(FOLLOW_UP_TASK_OUTCOMES), enum_schema(FOLLOW_UP_TASK_OUTCOMES)]
RsvpAnswerName = Annotated[str, one_of(RSVP_ANSWERS), enum_schema(RSVP_ANSWERS)]


# -- coupons ------------------------------------------------------------------------


class Coupon(BaseModel):
    """A coupon of a member's wallet."""

    coupon_id: str
    code: str = Field(default="", description="What the member shows at the till.")
    template_id: str = ""
    display_name: str = ""
    kind: Annotated[str, enum_schema(COUPON_KINDS)] | None = None
    member_id: str = ""
    state: Annotated[str, enum_schema(COUPON_STATES)] | None = None
    issue_time: datetime | None = None
    valid_from: datetime | None = None
    expire_time: datetime | None = None
    issue_job_id: str = ""
    reservation_id: str = Field(default="", description="Set while a checkout holds it.")
    reservation_expire_time: datetime | None = None
    sale_id: str = Field(default="", description="The sale that redeemed it.")
    discount: Money | None = Field(default=None, description="What it took off that sale.")
    redeem_time: datetime | None = None
    store_id: str = Field(default="", description="Where it was redeemed.")


class CouponPage(BaseModel):
    coupons: list[Coupon] = Field(description="Newest first.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


# -- follow-up tasks ----------------------------------------------------------------


class FollowUpTask(BaseModel):
    """A call to make to a member."""

    task_id: str
    plan_id: str = ""
    plan_kind: Annotated[str, enum_schema(FOLLOW_UP_PLAN_KINDS)] | None = None
    member_id: str = ""
    store_id: str = Field(default="", description="The member's home store: whose staff call.")
    assignee_staff_id: str = Field(
        default="", description="The consultant it is assigned to; empty for the store's staff."
    )
    reason: str = Field(default="", examples=["first purchase +3 days"])
    occasion: str = Field(default="", description="Which call of the plan.", examples=["3d"])
    state: Annotated[str, enum_schema(FOLLOW_UP_TASK_STATES)] | None = None
    due_time: datetime | None = Field(
        default=None, description="When to call: in one of the store's call windows."
    )
    skip_reason: str = ""
    outcome: Annotated[str, enum_schema(FOLLOW_UP_TASK_OUTCOMES)] | None = None
    follow_up_id: str = Field(
        default="", description="The follow-up record the call became on the member's file."
    )
    completed_by: str = ""
    complete_time: datetime | None = None
    create_time: datetime | None = None
    reschedule_count: int = 0


class FollowUpTaskPage(BaseModel):
    tasks: list[FollowUpTask] = Field(description="Earliest due first.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


class TaskCompletion(BaseModel):
    """The outcome of a task's call."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"outcome": "reached", "note": "likes the serum"}]},
    )

    outcome: OutcomeName
    note: Text | None = Field(
        default=None,
        description="What was said or agreed; kept on the member's follow-up record only.",
    )
    duration_seconds: int | None = Field(
        default=None, description="How long the call took.", ge=0, le=MAX_INT32
    )

    def to_proto(self, request_id: str, task_id: str) -> followups_pb2.CompleteFollowUpTaskRequest:
        return followups_pb2.CompleteFollowUpTaskRequest(
            request_id=request_id,
            task_id=task_id,
            outcome=FOLLOW_UP_TASK_OUTCOMES[self.outcome],  # type: ignore[arg-type]
            note=self.note or "",
            duration_seconds=self.duration_seconds or 0,
        )


class TaskReschedule(BaseModel):
    """Another time for an open task's call."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"due_time": "2026-12-04T13:05:00+08:00"}]},
    )

    due_time: AwareDatetime = Field(
        description="RFC 3339, with its offset; not in the past. Snapped to the start of the "
        "store's first call window at or after it (a time inside a window stays)."
    )

    def to_proto(
        self, request_id: str, task_id: str
    ) -> followups_pb2.RescheduleFollowUpTaskRequest:
        return followups_pb2.RescheduleFollowUpTaskRequest(
            request_id=request_id, task_id=task_id, due_time=timestamp(self.due_time, "due_time")
        )


class OutcomeCount(BaseModel):
    outcome: Annotated[str, enum_schema(FOLLOW_UP_TASK_OUTCOMES)] | None = None
    count: int = 0


class FollowUpStatistics(BaseModel):
    """Tasks due within the period, counted."""

    created: int = Field(default=0, description="Every task of the period, skipped ones too.")
    completed: int = 0
    by_outcome: list[OutcomeCount] = Field(default_factory=list)
    skipped: int = Field(default=0, description="Members who refused phone contact.")
    overdue: int = Field(default=0, description="Open, and due more than a day ago.")
    open: int = 0
    completion_rate_bps: int = Field(
        default=0, description="completed / (created - skipped), in basis points."
    )


# -- member events ------------------------------------------------------------------


class MemberEvent(BaseModel):
    """A VIP evening, a class, a charity talk."""

    event_id: str
    display_name: str = ""
    kind: Annotated[str, enum_schema(MEMBER_EVENT_KINDS)] | None = None
    store_id: str = Field(default="", description="The store that holds it.")
    start_time: datetime | None = None
    end_time: datetime | None = None
    capacity: int = Field(default=0, description="Seats.")
    rsvp_deadline: datetime | None = Field(default=None, description="Answers are taken until.")
    confirmed: int = Field(default=0, description="Seats taken by yes answers.")
    created_by: str = ""
    create_time: datetime | None = None


class MemberEventPage(BaseModel):
    events: list[MemberEvent] = Field(description="Earliest start first.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


class NewRsvp(BaseModel):
    """An invited member's answer."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"member_id": "M7Q2K9X4TD", "answer": "yes"}]},
    )

    member_id: Id
    answer: RsvpAnswerName = Field(
        description="`yes` takes a seat (EVENT_FULL when none is left); `no` gives one back."
    )

    def to_proto(self, request_id: str, event_id: str) -> member_events_pb2.RsvpRequest:
        return member_events_pb2.RsvpRequest(
            request_id=request_id,
            event_id=event_id,
            member_id=self.member_id,
            answer=RSVP_ANSWERS[self.answer],  # type: ignore[arg-type]
        )


class NewCheckIn(BaseModel):
    """A member at the door."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"member_id": "M7Q2K9X4TD"}]}
    )

    member_id: Id

    def to_proto(self, request_id: str, event_id: str) -> member_events_pb2.CheckInRequest:
        return member_events_pb2.CheckInRequest(
            request_id=request_id, event_id=event_id, member_id=self.member_id
        )


class Guest(BaseModel):
    """One member's place at an event."""

    event_id: str
    member_id: str = ""
    invited: bool = False
    answer: Annotated[str, enum_schema(RSVP_ANSWERS)] | None = Field(
        default=None, description="Null: no answer yet."
    )
    answer_time: datetime | None = None
    check_in_time: datetime | None = None
    walk_in: bool = Field(default=False, description="Checked in without having answered yes.")
    checked_in_by: str = ""


class AttendanceReport(BaseModel):
    """Counts of an event's guests."""

    event_id: str
    capacity: int = 0
    invited: int = 0
    yes: int = 0
    no: int = 0
    no_answer: int = Field(default=0, description="Invited, no answer.")
    checked_in: int = 0
    walk_ins: int = Field(default=0, description="Checked in without a yes (among checked_in).")
    no_shows: int = Field(default=0, description="Answered yes and did not come (so far).")


# -- the HQ side: shared ------------------------------------------------------------

PROMOTION_KINDS = short_names(pricing_pb2.PromotionKind.DESCRIPTOR)
STACKINGS = short_names(pricing_pb2.Stacking.DESCRIPTOR)
RESTORE_POLICIES = short_names(pricing_pb2.RestorePolicy.DESCRIPTOR)
ISSUE_JOB_STATES = short_names(pricing_pb2.IssueJobState.DESCRIPTOR)
INVITE_JOB_STATES = short_names(member_events_pb2.InviteJobState.DESCRIPTOR)
GENDERS = short_names(members_pb2.Gender.DESCRIPTOR)
MEMBER_STATES = short_names(members_pb2.MemberState.DESCRIPTOR)
CONTACT_CHANNELS = short_names(members_pb2.ContactChannel.DESCRIPTOR)

CouponKindName = Annotated[str, one_of(COUPON_KINDS), enum_schema(COUPON_KINDS)]
PromotionKindName = Annotated[str, one_of(PROMOTION_KINDS), enum_schema(PROMOTION_KINDS)]
StackingName = Annotated[str, one_of(STACKINGS), enum_schema(STACKINGS)]
RestorePolicyName = Annotated[str, one_of(RESTORE_POLICIES), enum_schema(RESTORE_POLICIES)]
PlanKindName = Annotated[str, one_of(FOLLOW_UP_PLAN_KINDS), enum_schema(FOLLOW_UP_PLAN_KINDS)]
EventKindName = Annotated[str, one_of(MEMBER_EVENT_KINDS), enum_schema(MEMBER_EVENT_KINDS)]
GenderName = Annotated[str, one_of(GENDERS), enum_schema(GENDERS)]
MemberStateName = Annotated[str, one_of(MEMBER_STATES), enum_schema(MEMBER_STATES)]
ContactChannelName = Annotated[str, one_of(CONTACT_CHANNELS), enum_schema(CONTACT_CHANNELS)]
Count = Annotated[int, Field(ge=0, le=MAX_INT32)]
Bps = Annotated[int, Field(ge=0, le=MAX_INT32, description="Basis points: 1000 is 10 %.")]
# Member ids of a list: as many as a call takes (the service says how many).
MemberIds = Annotated[list[Id], Field(max_length=100_000)]

Msg = TypeVar("Msg", bound=Message)


def parse_body(body: BaseModel, message: Msg) -> Msg:
    """A request body as the service's message: the fields sent (null is
    not sent), enums by their short names, times as RFC 3339."""
    data = body.model_dump(exclude_none=True, mode="json")
    try:
        ParseDict(expand_enums(data, cast(Descriptor, message.DESCRIPTOR)), message)
    except ParseError:
        # Only a time pydantic takes and a Timestamp does not (year 1 with
        # an offset) gets here.
        raise ProblemError(
            400,
            "INVALID_FIELDS",
            "the request has invalid fields",
            errors=[FieldError(field="body", description="a time out of range")],
        ) from None
    return message


# -- coupon templates and issuing ---------------------------------------------------


class NewCouponTemplate(BaseModel):
    """A kind of coupon HQ issues: what it takes off, where, for how long,
    and its limits. The campaigns service checks the combination (the
    fields a kind needs, a currency, a validity) and reports every fault."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "display_name": "20 off 200",
                    "kind": "amount_off",
                    "currency_code": "CNY",
                    "amount_off": {"currency_code": "CNY", "minor_units": 2000},
                    "min_spend": {"currency_code": "CNY", "minor_units": 20000},
                    "valid_days": 30,
                    "per_member_limit": 1,
                }
            ]
        },
    )

    display_name: Text = Field(max_length=200)
    kind: CouponKindName
    currency_code: Text = Field(max_length=3, examples=["CNY"])
    amount_off: Money | None = Field(default=None, description="`amount_off` coupons.")
    percent_bps: Bps | None = Field(default=None, description="`percent_off` coupons.")
    max_discount: Money | None = Field(
        default=None, description="`percent_off`: at most this much off."
    )
    gift_sku: Text | None = Field(
        default=None, max_length=64, description="`gift_item` and `free_service` coupons."
    )
    face_value: Money | None = Field(
        default=None, description="What one gift or service is worth (counted in the budget)."
    )
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None
    valid_days: Count | None = Field(
        default=None, description="Valid this many days after issue (the earlier end wins)."
    )
    min_spend: Money | None = None
    store_ids: list[Id] = Field(default_factory=list, description="Empty: every store.")
    categories: list[Id] = Field(default_factory=list)
    skus: list[Id] = Field(default_factory=list)
    per_member_limit: Count | None = Field(default=None, description="0 or null: no limit.")
    total_quantity: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="0 or null: no limit."
    )
    budget: Money | None = Field(default=None, description="Null: no budget.")
    restore_policy: RestorePolicyName | None = Field(
        default=None, description="What a refund does to a redeemed coupon; `never` when null."
    )
    description: Text | None = Field(default=None, max_length=2000)

    def to_proto(self, request_id: str) -> pricing_pb2.CreateCouponTemplateRequest:
        return pricing_pb2.CreateCouponTemplateRequest(
            request_id=request_id, template=parse_body(self, pricing_pb2.CouponTemplate())
        )


class CouponTemplate(BaseModel):
    """A coupon template, with what was issued of it."""

    template_id: str
    display_name: str = ""
    kind: Annotated[str, enum_schema(COUPON_KINDS)] | None = None
    currency_code: str = ""
    amount_off: Money | None = None
    percent_bps: int = 0
    max_discount: Money | None = None
    gift_sku: str = ""
    face_value: Money | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    valid_days: int = 0
    min_spend: Money | None = None
    store_ids: list[str] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list)
    skus: list[str] = Field(default_factory=list)
    per_member_limit: int = 0
    total_quantity: int = 0
    budget: Money | None = None
    restore_policy: Annotated[str, enum_schema(RESTORE_POLICIES)] | None = None
    issued_count: int = Field(default=0, description="Coupons issued so far.")
    budget_used: Money | None = None
    created: Stamp | None = None
    description: str = ""


class CouponTemplatePage(BaseModel):
    templates: list[CouponTemplate] = Field(description="Newest first.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


class NewIssue(BaseModel):
    """Whom to issue a template's coupons to: a list of members or a
    segment, one of the two."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"segment_id": "JUNE-BIRTHDAYS"}]}
    )

    member_ids: MemberIds = Field(default_factory=list, description="At most 100,000.")
    segment_id: Id | None = None

    def to_proto(self, request_id: str, template_id: str) -> pricing_pb2.IssueCouponsRequest:
        return pricing_pb2.IssueCouponsRequest(
            request_id=request_id,
            template_id=template_id,
            member_ids=self.member_ids,
            segment_id=self.segment_id or "",
        )


class SkippedMember(BaseModel):
    member_id: str = ""
    reason: str = Field(default="", examples=["PER_MEMBER_LIMIT_REACHED"])


class IssueJob(BaseModel):
    """An issue of a template's coupons: done within the call for up to 100
    members, else in the background."""

    job_id: str
    template_id: str = ""
    state: Annotated[str, enum_schema(ISSUE_JOB_STATES)] | None = None
    total: int = Field(default=0, description="Members to issue to (a segment's: read so far).")
    processed: int = 0
    issued: int = 0
    skipped: int = 0
    coupons: list[Coupon] = Field(
        default_factory=list, description="The coupons, for a job of up to 100 members."
    )
    skipped_members: list[SkippedMember] = Field(
        default_factory=list, description="The first 100 skipped."
    )
    created: Stamp | None = None
    finish_time: datetime | None = None
    segment_id: str = ""
    segment_version: int = 0


class CouponStatisticsRow(BaseModel):
    template_id: str = ""
    display_name: str = ""
    store_id: str = Field(
        default="",
        description="The issuing store for issued and expired (empty: HQ), the redeeming one "
        "for the rest.",
    )
    issued: int = 0
    redeemed: int = 0
    expired: int = 0
    redemption_rate_bps: int = 0
    discount_given: Money | None = None
    sales_attributed: Money | None = None


class CouponStatistics(BaseModel):
    rows: list[CouponStatisticsRow] = Field(default_factory=list)
    start_time: datetime | None = None
    end_time: datetime | None = None


# -- promotions ----------------------------------------------------------------------


class NewPromotion(BaseModel):
    """A promotion: what it takes off, where, on what, when, and how it
    stacks with others. Which fields a kind needs is the campaigns
    service's rule (see docs/campaigns.md)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "display_name": "Skincare week",
                    "kind": "percent_off",
                    "start_time": "2026-12-01T00:00:00+08:00",
                    "end_time": "2026-12-08T00:00:00+08:00",
                    "categories": ["skincare"],
                    "percent_bps": 1500,
                    "stacking": "combinable",
                }
            ]
        },
    )

    display_name: Text = Field(max_length=200)
    kind: PromotionKindName
    start_time: AwareDatetime
    end_time: AwareDatetime | None = Field(default=None, description="Null: open-ended.")
    store_ids: list[Id] = Field(default_factory=list, description="Empty (both): everywhere.")
    region_ids: list[Id] = Field(default_factory=list)
    skus: list[Id] = Field(default_factory=list, description="Empty (both): every line.")
    categories: list[Id] = Field(default_factory=list)
    priority: int | None = Field(default=None, ge=-MAX_INT32, le=MAX_INT32)
    stacking: StackingName | None = None
    exclusion_group: Text | None = Field(default=None, max_length=64)
    percent_bps: Bps | None = None
    member_price: Money | None = None
    threshold: Money | None = None
    save: Money | None = None
    repeating: bool | None = None
    weekdays: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] = Field(
        default_factory=list, description="ISO weekdays, 1 Monday to 7 Sunday."
    )
    month_days: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] = Field(default_factory=list)
    points_multiplier_bps: Bps | None = None
    time_zone: Text | None = Field(default=None, max_length=64, examples=["Asia/Shanghai"])
    members_only: bool | None = None
    description: Text | None = Field(default=None, max_length=2000)

    def to_proto(self, request_id: str) -> pricing_pb2.CreatePromotionRequest:
        return pricing_pb2.CreatePromotionRequest(
            request_id=request_id, promotion=parse_body(self, pricing_pb2.Promotion())
        )


class Promotion(BaseModel):
    promotion_id: str
    display_name: str = ""
    kind: Annotated[str, enum_schema(PROMOTION_KINDS)] | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    store_ids: list[str] = Field(default_factory=list)
    region_ids: list[str] = Field(default_factory=list)
    skus: list[str] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list)
    priority: int = 0
    stacking: Annotated[str, enum_schema(STACKINGS)] | None = None
    exclusion_group: str = ""
    percent_bps: int = 0
    member_price: Money | None = None
    threshold: Money | None = None
    save: Money | None = None
    repeating: bool = False
    weekdays: list[int] = Field(default_factory=list)
    month_days: list[int] = Field(default_factory=list)
    points_multiplier_bps: int = 0
    time_zone: str = ""
    members_only: bool = False
    description: str = ""
    created: Stamp | None = None


class PromotionPage(BaseModel):
    promotions: list[Promotion]
    next_page_token: str = Field(default="", description="Empty on the last page.")


# -- follow-up plans -----------------------------------------------------------------


class CallWindow(BaseModel):
    """A call window, in the store's local time."""

    model_config = ConfigDict(extra="forbid")

    start_time: Text = Field(max_length=5, examples=["11:00"])
    end_time: Text = Field(max_length=5, examples=["12:00"])


class NewFollowUpPlan(BaseModel):
    """A rule that creates call tasks for store staff."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "plan_id": "serum-care",
                    "kind": "post_purchase",
                    "display_name": "Serum aftercare",
                    "enabled": True,
                    "days": 7,
                    "category": "skincare",
                }
            ]
        },
    )

    plan_id: Id = Field(description="Lower-case letters, digits, '-' and '_', at most 40.")
    kind: PlanKindName
    display_name: Text = Field(max_length=200)
    enabled: bool = True
    days: Count | None = Field(
        default=None, description="Win-back, post-purchase and birthday plans: see the kind."
    )
    category: Text | None = Field(
        default=None, max_length=64, description="Post-purchase plans: required."
    )
    call_windows: list[CallWindow] = Field(
        default_factory=list, description="Empty: 11:00-12:00 and 16:00-17:00."
    )

    def to_proto(self, request_id: str) -> followups_pb2.CreateFollowUpPlanRequest:
        return followups_pb2.CreateFollowUpPlanRequest(
            request_id=request_id, plan=parse_body(self, followups_pb2.FollowUpPlan())
        )


class FollowUpPlanPatch(BaseModel):
    """The fields of a plan to change (only those sent); its kind never
    changes. Tasks already created stay as they are."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"enabled": False}, {"days": 120}]}
    )

    display_name: Text | None = Field(default=None, max_length=200)
    enabled: bool | None = None
    days: Count | None = None
    category: Text | None = Field(default=None, max_length=64)
    call_windows: list[CallWindow] | None = None

    def to_proto(self, request_id: str, plan_id: str) -> followups_pb2.UpdateFollowUpPlanRequest:
        sent = sorted(self.model_dump(exclude_unset=True))
        plan = parse_body(self, followups_pb2.FollowUpPlan(plan_id=plan_id))
        request = followups_pb2.UpdateFollowUpPlanRequest(request_id=request_id, plan=plan)
        request.update_mask.paths.extend(sent)
        return request


class FollowUpPlan(BaseModel):
    plan_id: str
    kind: Annotated[str, enum_schema(FOLLOW_UP_PLAN_KINDS)] | None = None
    display_name: str = ""
    enabled: bool = False
    days: int = 0
    category: str = ""
    call_windows: list[CallWindow] = Field(default_factory=list)
    create_time: datetime | None = None
    update_time: datetime | None = None


class FollowUpPlanPage(BaseModel):
    plans: list[FollowUpPlan] = Field(description="In plan_id order.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


# -- member events: creating and inviting --------------------------------------------


class NewMemberEvent(BaseModel):
    """A VIP evening, a class or a charity talk at a store."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "display_name": "VIP 之夜",
                    "kind": "vip_evening",
                    "store_id": "S001",
                    "start_time": "2026-12-12T19:00:00+08:00",
                    "end_time": "2026-12-12T22:00:00+08:00",
                    "capacity": 40,
                    "rsvp_deadline": "2026-12-10T12:00:00+08:00",
                }
            ]
        },
    )

    display_name: Text = Field(max_length=200)
    kind: EventKindName
    store_id: Id
    start_time: AwareDatetime = Field(description="In the future.")
    end_time: AwareDatetime = Field(description="After the start, within 31 days of it.")
    capacity: Count = Field(description="Seats, 1 to 100,000.")
    rsvp_deadline: AwareDatetime | None = Field(
        default=None, description="At or before the start; null: the start."
    )

    def to_proto(self, request_id: str) -> member_events_pb2.CreateMemberEventRequest:
        return member_events_pb2.CreateMemberEventRequest(
            request_id=request_id, event=parse_body(self, member_events_pb2.MemberEvent())
        )


class NewInvitation(BaseModel):
    """Whom to invite: a list of members (at most 1000) or a segment (HQ
    admins), one of the two."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"member_ids": ["M7Q2K9X4TD", "M3RW1P8M3Q"]}, {"segment_id": "VIP-S001"}]
        },
    )

    member_ids: MemberIds = Field(default_factory=list, description="At most 1000.")
    segment_id: Id | None = None

    def to_proto(self, request_id: str, event_id: str) -> member_events_pb2.InviteMembersRequest:
        return member_events_pb2.InviteMembersRequest(
            request_id=request_id,
            event_id=event_id,
            member_ids=self.member_ids,
            segment_id=self.segment_id or "",
        )


class InviteJob(BaseModel):
    """A segment's members invited to an event, page by page."""

    job_id: str
    event_id: str = ""
    segment_id: str = ""
    segment_version: int = 0
    state: Annotated[str, enum_schema(INVITE_JOB_STATES)] | None = None
    total: int = Field(default=0, description="Members of the segment read so far.")
    invited: int = Field(default=0, description="Newly invited by the job.")
    already_invited: int = 0
    stop_reason: str = Field(
        default="", description="RSVP_CLOSED when answers closed before the last page."
    )
    created: Stamp | None = None
    finish_time: datetime | None = None


class Invitations(BaseModel):
    """What an invitation did."""

    invited: int = Field(default=0, description="Members invited now (not invited before).")
    already_invited: int = 0
    job: InviteJob | None = Field(default=None, description="For a segment: its invite job.")


# -- segments ------------------------------------------------------------------------


class MemberCriteria(BaseModel):
    """Rules over the member file: fields AND together, values within a
    field OR (every consent channel and every tag must hold)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"home_store_ids": ["S001"], "birth_months": [6]}]},
    )

    home_store_ids: list[Id] = Field(default_factory=list)
    region_ids: list[Id] = Field(default_factory=list)
    birth_months: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] = Field(
        default_factory=list, description="Each 1 to 12."
    )
    genders: list[GenderName] = Field(default_factory=list)
    enrolled_after: AwareDatetime | None = Field(default=None, description="At or after.")
    enrolled_before: AwareDatetime | None = Field(default=None, description="Strictly before.")
    states: list[MemberStateName] = Field(default_factory=list, description="Empty: active.")
    consent_channels: list[ContactChannelName] = Field(
        default_factory=list, description="Marketing consent granted on every one of these."
    )
    tags: list[Id] = Field(default_factory=list, description="Every one of these.")


class NewSegment(BaseModel):
    """A named segment: its rules, kept by campaigns, evaluated by members."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "segment_id": "JUNE-S001",
                    "name": "June birthdays at S001",
                    "criteria": {"home_store_ids": ["S001"], "birth_months": [6]},
                }
            ]
        },
    )

    segment_id: Id = Field(description="Upper-case letters, digits, '-' and '_', 1 to 40.")
    name: Text = Field(max_length=200)
    criteria: MemberCriteria = Field(default_factory=MemberCriteria)

    def to_proto(self, request_id: str) -> segments_pb2.CreateSegmentRequest:
        return segments_pb2.CreateSegmentRequest(
            request_id=request_id, segment=parse_body(self, segments_pb2.Segment())
        )


class SegmentUpdate(BaseModel):
    """A segment's new name and rules (both replaced)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "June, any store", "criteria": {"birth_months": [6]}, "version": 1}
            ]
        },
    )

    name: Text = Field(max_length=200)
    criteria: MemberCriteria = Field(default_factory=MemberCriteria)
    version: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description="The version you read: another is refused (409 VERSION_MISMATCH). Null: "
        "whatever the current one.",
    )

    def to_proto(self, segment_id: str) -> segments_pb2.UpdateSegmentRequest:
        segment = parse_body(self, segments_pb2.Segment(segment_id=segment_id))
        return segments_pb2.UpdateSegmentRequest(segment=segment)


class CriteriaPreview(BaseModel):
    """Rules to preview without keeping them."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"criteria": {"region_ids": ["EAST"], "tags": ["vip"]}}]},
    )

    criteria: MemberCriteria

    def to_proto(self) -> segments_pb2.PreviewSegmentRequest:
        request = segments_pb2.PreviewSegmentRequest()
        parse_body(self.criteria, request.criteria)
        return request


class MemberCriteriaView(BaseModel):
    """A segment's rules as kept."""

    home_store_ids: list[str] = Field(default_factory=list)
    region_ids: list[str] = Field(default_factory=list)
    birth_months: list[int] = Field(default_factory=list)
    genders: list[Annotated[str, enum_schema(GENDERS)] | None] = Field(default_factory=list)
    enrolled_after: datetime | None = None
    enrolled_before: datetime | None = None
    states: list[Annotated[str, enum_schema(MEMBER_STATES)] | None] = Field(default_factory=list)
    consent_channels: list[Annotated[str, enum_schema(CONTACT_CHANNELS)] | None] = Field(
        default_factory=list
    )
    tags: list[str] = Field(default_factory=list)


class Segment(BaseModel):
    segment_id: str
    name: str = ""
    criteria: MemberCriteriaView | None = None
    version: int = Field(default=0, description="1 at creation, +1 at every update.")
    created: Stamp | None = None
    updated: Stamp | None = None


class SegmentPage(BaseModel):
    segments: list[Segment] = Field(description="In segment_id order.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


class SegmentPreview(BaseModel):
    size: int = Field(default=0, description="Members the rules select now.")
    sample_member_ids: list[str] = Field(
        default_factory=list, description="Up to 20, the first by member_id."
    )
    version: int = Field(default=0, description="The segment's version (0 for bare criteria).")
    preview_time: datetime | None = None
