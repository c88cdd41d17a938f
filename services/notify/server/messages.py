"""NotifyService: message history, delivery and dead letters."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence

from chassis.auth import STAFF_ROLES, Role, current_principal
from chassis.errors import FieldViolation, InvalidArgument
from chassis.grpcserver import Context, GrpcService
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.notify.v1 import notify_pb2, notify_pb2_grpc
from services.notify import domain, events, store
from services.notify.channels import DevLogChannel
from services.notify.dispatch import Dispatcher

STATUSES_PROTO = {
    domain.MessageStatus.QUEUED: notify_pb2.MESSAGE_STATUS_QUEUED,
    domain.MessageStatus.SENT: notify_pb2.MESSAGE_STATUS_SENT,
    domain.MessageStatus.DELIVERED: notify_pb2.MESSAGE_STATUS_DELIVERED,
    domain.MessageStatus.FAILED: notify_pb2.MESSAGE_STATUS_FAILED,
    domain.MessageStatus.SUPPRESSED: notify_pb2.MESSAGE_STATUS_SUPPRESSED,
}

CATEGORIES_PROTO = {
    domain.Category.TRANSACTIONAL: notify_pb2.MESSAGE_CATEGORY_TRANSACTIONAL,
    domain.Category.MARKETING: notify_pb2.MESSAGE_CATEGORY_MARKETING,
}


def to_proto(record: store.MessageRecord) -> notify_pb2.Message:
    msg = notify_pb2.Message(
        message_id=record.message_id,
        member_id=record.member_id or "",
        staff_id=record.staff_id or "",
        template=record.template,
        channel=events.CHANNELS_PROTO[record.channel],
        locale=record.locale,
        body=record.body,
        status=STATUSES_PROTO[record.status],
        trigger_event_id=record.trigger_event_id or "",
        category=CATEGORIES_PROTO[record.category],
        subject=record.subject or "",
        attempts=record.attempts,
        status_reason=record.status_reason or "",
        last_error=record.last_error or "",
    )
    msg.create_time.FromDatetime(record.created_at)
    for stamp, when in (
        (msg.not_before_time, record.not_before),
        (msg.send_time, record.sent_at),
        (msg.deliver_time, record.delivered_at),
        (msg.fail_time, record.failed_at),
    ):
        if when is not None:
            stamp.FromDatetime(when)
    return msg


class NotifyServicer(notify_pb2_grpc.NotifyServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db

    async def ListMessages(
        self, request: notify_pb2.ListMessagesRequest, context: Context
    ) -> notify_pb2.ListMessagesResponse:
        current_principal().require_role(*STAFF_ROLES, Role.SERVICE)
        if not request.member_id:
            raise InvalidArgument([FieldViolation("member_id", "required")])
        limit = page_size(request.page_size)
        token = decode_token(request.page_token)
        after = None
        if token is not None:
            try:
                after = (dt.datetime.fromisoformat(token["c"]), str(token["id"]))
            except (KeyError, TypeError, ValueError):
                raise InvalidArgument(
                    [FieldViolation("page_token", "not a token this service issued")]
                ) from None
        async with self.db.sessions() as session:
            rows = await store.list_for_member(session, request.member_id, limit + 1, after)
        page, more = rows[:limit], len(rows) > limit
        next_token = ""
        if more:
            last = page[-1]
            next_token = encode_token({"c": last.created_at.isoformat(), "id": last.message_id})
        return notify_pb2.ListMessagesResponse(
            messages=[to_proto(r) for r in page], next_page_token=next_token
        )


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=notify_pb2.DESCRIPTOR.services_by_name["NotifyService"].full_name,
            servicer=NotifyServicer(ctx),
            add_to_server=notify_pb2_grpc.add_NotifyServiceServicer_to_server,
        )
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    dev = DevLogChannel(ctx.settings.var_dir / "notify" / "dev-channel.jsonl")
    return [Dispatcher(ctx.db, {domain.Channel.DEV_LOG: dev}).run]
