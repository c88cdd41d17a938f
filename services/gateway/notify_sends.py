"""Direct sends over HTTP, for HQ: a marketing template sent to a list of
members or to a campaigns segment, the approval a second HQ admin gives to
a large one, and the list of sends with their progress; in front of the
notify service's SendsService.

The caller's token is forwarded (notify decides who may do what: HQ admins;
the creator of a send may not approve it). Every POST takes an
Idempotency-Key as its request_id: a retry gets the first answer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from cornucopia.notify.v1 import notify_pb2
from cornucopia.notify.v1 import sends_pb2 as pb
from services.gateway.cards_client import id_path
from services.gateway.deps import (
    READ_PROBLEMS,
    Key,
    PageSize,
    PageToken,
    Token,
    change_problems,
    timestamp,
)
from services.gateway.notify_client import call_notify, notify, notify_field, notify_lifespan
from services.gateway.schemas import AuditStamp, enum_schema, from_proto, one_of, short_names

# The router's lifespan is merged into the app's: the channel is closed on
# shutdown with the others.
router = APIRouter(lifespan=notify_lifespan)

CALL_TIMEOUT_SECONDS = 10.0
SEND_STATES = short_names(pb.SendState.DESCRIPTOR)
SEND_CHANNELS = {
    name: number
    for name, number in short_names(notify_pb2.Channel.DESCRIPTOR).items()
    if name in ("sms", "email", "push", "post")
}
SendId = Annotated[str, id_path("e.g. SND7Q2K9X4TD3M")]
SendStateName = Annotated[str, one_of(SEND_STATES), enum_schema(SEND_STATES)]
SendChannelName = Annotated[str, one_of(SEND_CHANNELS), enum_schema(SEND_CHANNELS)]

SEND_CHANGE = change_problems(
    "SEND_NOT_PENDING_APPROVAL (approve or reject a send that is not waiting), SEND_CLOSED "
    "(cancel a send that finished), or an Idempotency-Key reused for a different request."
)


def _field(name: str) -> str:
    """The service's field names as the HTTP body spells them."""
    return notify_field(name).removeprefix("send.")


async def _call(method: Any, message: Any, token: str) -> Any:
    return await call_notify(method, message, token, rename=_field, timeout=CALL_TIMEOUT_SECONDS)


# -- shapes ----------------------------------------------------------------------------


class NewSend(BaseModel):
    """A direct send: a template to a list of members or to a segment."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"template": "spring_offer", "segment_id": "JUNE-S001", "channel": "sms"},
                {"member_ids": ["M7Q2K9X4TD", "M3RW1P8M2Q"]},
            ]
        },
    )

    template: str = Field(
        default="",
        max_length=64,
        description="A saved template's name; empty: the `marketing` trigger's own.",
    )
    member_ids: list[Annotated[str, Field(min_length=1, max_length=16)]] = Field(
        default_factory=list, max_length=10_000, description="The members; or a segment_id."
    )
    segment_id: str = Field(
        default="", max_length=40, description="A campaigns segment; its members now."
    )
    channel: SendChannelName | None = Field(
        default=None, description="Only this channel; none: each member's own choice."
    )
    schedule_time: AwareDatetime | None = Field(
        default=None, description="RFC 3339 with its offset: not before then; none: at once."
    )

    def to_proto(self, key: str) -> pb.CreateSendRequest:
        send = pb.Send(
            template=self.template,
            trigger="marketing",
            member_ids=self.member_ids,
            segment_id=self.segment_id,
            channel=SEND_CHANNELS[self.channel] if self.channel else 0,  # type: ignore[arg-type]
        )
        stamp = timestamp(self.schedule_time, "schedule_time")
        if stamp is not None:
            send.schedule_time.CopyFrom(stamp)
        return pb.CreateSendRequest(request_id=key, send=send)


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500, description="Why (no personal data).")


class Send(BaseModel):
    """A direct send: its audience, state and progress."""

    send_id: str
    template: str = ""
    trigger: str = "marketing"
    member_ids: list[str] = Field(default_factory=list)
    segment_id: str = ""
    segment_version: int = 0
    channel: Annotated[str, enum_schema(SEND_CHANNELS)] | None = None
    schedule_time: datetime | None = None
    state: Annotated[str, enum_schema(SEND_STATES)] | None = None
    audience_size: int = 0
    approval_required: bool = Field(
        default=False, description="Larger than the chain's approval threshold."
    )
    notifications_written: int = 0
    messages_queued: int = 0
    messages_suppressed: int = 0
    messages_sent: int = 0
    messages_failed: int = 0
    created: AuditStamp | None = None
    approved: AuditStamp | None = None
    rejected: AuditStamp | None = None
    cancelled: AuditStamp | None = None
    reason: str = ""
    finish_time: datetime | None = None


class SendPage(BaseModel):
    sends: list[Send]
    next_page_token: str = Field(default="", description="Empty on the last page.")


# -- routes ----------------------------------------------------------------------------


@router.post(
    "/v1/notify/sends",
    tags=["notify"],
    summary="Send a template to members or a segment",
    description="A marketing send (consent, opt-outs, quiet hours and the weekly cap apply to "
    "each member). Larger than the chain's approval threshold, it waits for another HQ admin "
    "to approve it; otherwise it starts at once or at `schedule_time`. HQ admins. Needs an "
    "`Idempotency-Key`.",
    status_code=201,
    responses=change_problems("SEGMENT_NOT_FOUND, or an Idempotency-Key reused."),
    operation_id="createSend",
)
async def create_send(body: NewSend, request: Request, token: Token, key: Key) -> Send:
    send = await _call(notify(request).sends.CreateSend, body.to_proto(key), token)
    return from_proto(Send, send)


@router.get(
    "/v1/notify/sends",
    tags=["notify"],
    summary="Direct sends",
    description="Newest first, a page at a time; optionally in one state. HQ admins.",
    responses=READ_PROBLEMS,
    operation_id="listSends",
)
async def list_sends(
    request: Request,
    token: Token,
    *,
    state: Annotated[SendStateName | None, Query(description="Only sends in this state.")] = None,
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> SendPage:
    reply = await _call(
        notify(request).sends.ListSends,
        pb.ListSendsRequest(
            state=SEND_STATES[state] if state else 0,  # type: ignore[arg-type]
            page_size=page_size,
            page_token=page_token,
        ),
        token,
    )
    return from_proto(SendPage, reply)


@router.get(
    "/v1/notify/sends/{send_id}",
    tags=["notify"],
    summary="A direct send and its progress",
    responses=READ_PROBLEMS,
    operation_id="getSend",
)
async def get_send(send_id: SendId, request: Request, token: Token) -> Send:
    send = await _call(notify(request).sends.GetSend, pb.GetSendRequest(send_id=send_id), token)
    return from_proto(Send, send)


@router.post(
    "/v1/notify/sends/{send_id}/approve",
    tags=["notify"],
    summary="Approve a large send",
    description="Another HQ admin than the send's creator. Needs an `Idempotency-Key`.",
    responses=SEND_CHANGE,
    operation_id="approveSend",
)
async def approve_send(send_id: SendId, request: Request, token: Token, key: Key) -> Send:
    send = await _call(
        notify(request).sends.ApproveSend,
        pb.ApproveSendRequest(request_id=key, send_id=send_id),
        token,
    )
    return from_proto(Send, send)


@router.post(
    "/v1/notify/sends/{send_id}/reject",
    tags=["notify"],
    summary="Reject a large send",
    description="Nothing is sent; `reason` (required) tells the creator why. HQ admins. "
    "Needs an `Idempotency-Key`.",
    responses=SEND_CHANGE,
    operation_id="rejectSend",
)
async def reject_send(
    send_id: SendId, body: Reason, request: Request, token: Token, key: Key
) -> Send:
    send = await _call(
        notify(request).sends.RejectSend,
        pb.RejectSendRequest(request_id=key, send_id=send_id, reason=body.reason),
        token,
    )
    return from_proto(Send, send)


@router.post(
    "/v1/notify/sends/{send_id}/cancel",
    tags=["notify"],
    summary="Cancel a send",
    description="Stops a send not finished: nothing more is written, and its notifications "
    "not yet planned are withdrawn (messages already queued still go). HQ admins. Needs an "
    "`Idempotency-Key`.",
    responses=SEND_CHANGE,
    operation_id="cancelSend",
)
async def cancel_send(
    send_id: SendId, body: Reason, request: Request, token: Token, key: Key
) -> Send:
    send = await _call(
        notify(request).sends.CancelSend,
        pb.CancelSendRequest(request_id=key, send_id=send_id, reason=body.reason),
        token,
    )
    return from_proto(Send, send)
