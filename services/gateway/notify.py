"""The notify service over HTTP: a member's or a staff member's message
history, the dead letters an operator lists and replays, the postal
mailing list a print shop downloads, and the SMS provider's delivery
receipt callback.

Staff routes forward the caller's token (notify decides who may do what).
The receipt callback has no user: the provider proves itself with its
shared secret (``notify_client.provider_secret``), and the gateway records
the receipt with a service token of its own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from chassis.grpcclient import bearer
from cornucopia.notify.v1 import notify_pb2
from services.gateway.cards_client import id_path
from services.gateway.deps import (
    READ_PROBLEMS,
    Key,
    PageSize,
    PageToken,
    Token,
    change_problems,
    problem_responses,
)
from services.gateway.downloads import XLSX, stream_file
from services.gateway.notify_client import (
    call_notify,
    gateway_token,
    notify,
    notify_failed,
    notify_lifespan,
    provider_secret,
)
from services.gateway.problems import FieldError, ProblemError
from services.gateway.schemas import enum_schema, from_proto, one_of, short_names

# FastAPI merges a router's lifespan into the app's: the channel to notify
# is closed on shutdown with the others.
router = APIRouter(lifespan=notify_lifespan)

EXPORT_TIMEOUT_SECONDS = 120.0
# The provider named on the receipts of this callback (notify's SMS channel).
SMS_PROVIDER = "sms"

CHANNELS = short_names(notify_pb2.Channel.DESCRIPTOR)
STATUSES = short_names(notify_pb2.MessageStatus.DESCRIPTOR)
CATEGORIES = short_names(notify_pb2.MessageCategory.DESCRIPTOR)
FORMATS = {"csv": notify_pb2.MAILING_LIST_FORMAT_CSV, "xlsx": notify_pb2.MAILING_LIST_FORMAT_XLSX}

MessageId = Annotated[str, id_path("A message_id, e.g. from the member's message history.")]
ChannelName = Annotated[str, one_of(CHANNELS), enum_schema(CHANNELS)]


# -- shapes ----------------------------------------------------------------------------


class Message(BaseModel):
    """One message to a member or a staff member, and what became of it."""

    message_id: str
    member_id: str = ""
    staff_id: str = ""
    template: str = Field(default="", examples=["welcome"])
    channel: Annotated[str, enum_schema(CHANNELS)] | None = None
    locale: str = Field(default="", examples=["zh-CN"])
    body: str = ""
    subject: str = ""
    status: Annotated[str, enum_schema(STATUSES)] | None = None
    category: Annotated[str, enum_schema(CATEGORIES)] | None = None
    trigger_event_id: str = ""
    attempts: int = 0
    status_reason: str = Field(
        default="", description="Why it failed (the provider's reason) or was suppressed."
    )
    last_error: str = Field(default="", description="The last failed try's error, while retrying.")
    create_time: datetime | None = None
    not_before_time: datetime | None = None
    send_time: datetime | None = None
    deliver_time: datetime | None = None
    fail_time: datetime | None = None


class MessagePage(BaseModel):
    messages: list[Message]
    next_page_token: str = Field(default="", description="Empty on the last page.")


class Receipt(BaseModel):
    """A delivery receipt as the SMS provider posts it."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"id": "SM7Q2K9X4TD", "status": "delivered"}]},
    )

    id: str = Field(min_length=1, max_length=100, description="The provider's id of the message.")
    status: str = Field(description="`delivered`, or `failed` (also `undelivered`, `rejected`).")
    reason: str = Field(default="", max_length=500)
    time: datetime | None = None


class ReceiptTaken(BaseModel):
    message_id: str
    status: Annotated[str, enum_schema(STATUSES)] | None = None


DELIVERED_WORDS = frozenset({"delivered", "delivrd", "success"})
FAILED_WORDS = frozenset({"failed", "undelivered", "undeliv", "rejected", "expired"})


# -- message history -------------------------------------------------------------------


@router.get(
    "/v1/notify/messages",
    tags=["notify"],
    summary="Message history",
    description="The messages to one member (`member_id`) or one staff member (`staff_id`), "
    "newest first, a page at a time, with their delivery state. Any staff member.",
    responses=READ_PROBLEMS,
    operation_id="listMessages",
)
async def list_messages(
    request: Request,
    token: Token,
    *,
    member_id: Annotated[str, Query(max_length=64)] = "",
    staff_id: Annotated[str, Query(max_length=64)] = "",
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> MessagePage:
    reply = await call_notify(
        notify(request).messages.ListMessages,
        notify_pb2.ListMessagesRequest(
            member_id=member_id, staff_id=staff_id, page_size=page_size, page_token=page_token
        ),
        token,
    )
    return from_proto(MessagePage, reply)


@router.get(
    "/v1/notify/messages/{message_id}",
    tags=["notify"],
    summary="A message",
    responses=READ_PROBLEMS,
    operation_id="getMessage",
)
async def get_message(message_id: MessageId, request: Request, token: Token) -> Message:
    reply = await call_notify(
        notify(request).messages.GetMessage,
        notify_pb2.GetMessageRequest(message_id=message_id),
        token,
    )
    return from_proto(Message, reply)


# -- dead letters ----------------------------------------------------------------------


@router.get(
    "/v1/notify/dead-letters",
    tags=["notify"],
    summary="Failed messages",
    description="The messages given up on (refused by the provider, or every retry failed), "
    "most recently failed first; optionally one channel's or template's. HQ admins.",
    responses=READ_PROBLEMS,
    operation_id="listFailedMessages",
)
async def list_failed_messages(
    request: Request,
    token: Token,
    *,
    channel: Annotated[ChannelName | None, Query(description="Only this channel's.")] = None,
    template: Annotated[str, Query(max_length=64, description="Only this template's.")] = "",
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> MessagePage:
    reply = await call_notify(
        notify(request).messages.ListFailedMessages,
        notify_pb2.ListFailedMessagesRequest(
            channel=CHANNELS[channel] if channel else 0,  # type: ignore[arg-type]
            template=template,
            page_size=page_size,
            page_token=page_token,
        ),
        token,
    )
    return from_proto(MessagePage, reply)


@router.post(
    "/v1/notify/dead-letters/{message_id}/replay",
    tags=["notify"],
    summary="Replay a failed message",
    description="Puts the message back in the queue with its attempts reset. HQ admins. "
    "Needs an `Idempotency-Key`.",
    responses=change_problems(
        "MESSAGE_NOT_FAILED (only a failed message is replayed), or an Idempotency-Key reused "
        "for a different request (IDEMPOTENCY_KEY_REUSED)."
    ),
    operation_id="replayMessage",
)
async def replay_message(
    message_id: MessageId, request: Request, token: Token, key: Key
) -> Message:
    reply = await call_notify(
        notify(request).messages.ReplayMessage,
        notify_pb2.ReplayMessageRequest(request_id=key, message_id=message_id),
        token,
    )
    return from_proto(Message, reply)


# -- the postal mailing list -----------------------------------------------------------


@router.get(
    "/v1/notify/mailing-list",
    tags=["notify"],
    summary="Download the postal mailing list",
    description="The letters waiting for the print shop, with the members' addresses, as "
    "CSV or XLSX; the rows are marked exported under the export id the file name carries. "
    "`export_id` downloads an earlier export again. HQ admins.",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                XLSX: {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "The file, as an attachment.",
        },
        **READ_PROBLEMS,
    },
    operation_id="exportMailingList",
)
async def export_mailing_list(
    request: Request,
    token: Token,
    *,
    file_format: Annotated[
        str, Query(alias="format", pattern="^(csv|xlsx)$", description="`csv` or `xlsx`.")
    ] = "csv",
    export_id: Annotated[str, Query(max_length=40)] = "",
) -> StreamingResponse:
    call = notify(request).messages.ExportMailingList(
        notify_pb2.ExportMailingListRequest(format=FORMATS[file_format], export_id=export_id),
        metadata=bearer(token),
        timeout=EXPORT_TIMEOUT_SECONDS,
    )
    return await stream_file(
        call,  # type: ignore[arg-type]
        notify_failed,
        f"mailing-list.{file_format}",
    )


# -- the SMS provider's receipts -------------------------------------------------------

RECEIPT_SECRET = provider_secret("INVALID_RECEIPT_SECRET", "the receipt secret is missing or wrong")


@router.post(
    "/v1/notify/providers/sms/receipts",
    tags=["notify"],
    summary="SMS delivery receipt (provider callback)",
    description="Where the SMS provider posts delivery receipts. Authenticated by the shared "
    "secret in `X-Receipt-Secret`. A receipt for an id no message carries is a 404, which "
    "providers retry later.",
    responses=problem_responses(400, 401, 404, 422, 500, 503, 504),
    operation_id="recordSmsReceipt",
    dependencies=[Depends(RECEIPT_SECRET)],
)
async def record_sms_receipt(body: Receipt, request: Request) -> ReceiptTaken:
    word = body.status.strip().lower()
    if word in DELIVERED_WORDS:
        outcome = notify_pb2.DELIVERY_OUTCOME_DELIVERED
    elif word in FAILED_WORDS:
        outcome = notify_pb2.DELIVERY_OUTCOME_FAILED
    else:
        raise ProblemError(
            400,
            "INVALID_FIELDS",
            "the request has invalid fields",
            errors=[FieldError(field="status", description="delivered or failed")],
        )
    call = notify_pb2.RecordDeliveryReceiptRequest(
        provider=SMS_PROVIDER, provider_message_id=body.id, outcome=outcome, reason=body.reason
    )
    if body.time is not None:
        call.event_time.FromDatetime(body.time)
    message = await call_notify(
        notify(request).messages.RecordDeliveryReceipt, call, gateway_token(request)
    )
    return ReceiptTaken(
        message_id=message.message_id,
        status=notify_pb2.MessageStatus.Name(message.status)
        .removeprefix("MESSAGE_STATUS_")
        .lower(),
    )
