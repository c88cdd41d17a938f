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
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from cornucopia.campaigns.v1 import followups_pb2, member_events_pb2, pricing_pb2
from services.gateway.card_schemas import Id, Money
from services.gateway.deps import timestamp
from services.gateway.schemas import Text, enum_schema, one_of, short_names

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
