"""NotifyService: message history, delivery receipts, dead letters and the
postal mailing list; and the dispatcher that sends, with the channels the
environment configures (``ChannelSettings``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Role, current_principal
from chassis.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    Violations,
)
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, run_idempotent
from chassis.logs import get_logger
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from chassis.spreadsheets import XLSX_CONTENT_TYPE, chunks
from cornucopia.notify.v1 import notify_pb2, notify_pb2_grpc
from services.notify import domain, events, store
from services.notify.channels import Channel
from services.notify.channels.call_task import CallTaskChannel
from services.notify.channels.config import ChannelSettings
from services.notify.channels.devlog import DevLogChannel
from services.notify.channels.email import EmailChannel
from services.notify.channels.post import PostChannel, row, write_csv, write_workbook
from services.notify.channels.push import PushChannel
from services.notify.channels.sms import SmsChannel
from services.notify.contacts import ContactsUnavailable, Directory
from services.notify.dispatch import Dispatcher, RateLimiter
from services.notify.peers import shared_peers
from services.notify.store import postal

log = get_logger(__name__)

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
CHANNELS = {v: k for k, v in events.CHANNELS_PROTO.items()}

# Who may read message history (bodies included): staff and services.
READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
# Dead letters and the print shop's list are operators' work.
OPERATOR_ROLES = (Role.HQ_ADMIN,)
RECEIPT_ROLES = (Role.SERVICE, Role.HQ_ADMIN)
# Letters in one mailing-list file.
MAX_LETTERS = 5000
MAX_ID_LENGTH = 100


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


def _after(page_token: str) -> tuple[dt.datetime, str] | None:
    token = decode_token(page_token)
    if token is None:
        return None
    try:
        return dt.datetime.fromisoformat(token["c"]), str(token["id"])
    except (KeyError, TypeError, ValueError):
        raise InvalidArgument(
            [FieldViolation("page_token", "not a token this service issued")]
        ) from None


def _next_token(at: dt.datetime | None, message_id: str) -> str:
    assert at is not None
    return encode_token({"c": at.isoformat(), "id": message_id})


def message_not_found(message_id: str) -> NotFound:
    return NotFound(
        "no message with this id", reason="MESSAGE_NOT_FOUND", metadata={"message_id": message_id}
    )


class NotifyServicer(notify_pb2_grpc.NotifyServiceServicer):
    def __init__(self, ctx: ServiceContext, contacts: Directory) -> None:
        self.db = ctx.db
        self.contacts = contacts

    async def ListMessages(
        self, request: notify_pb2.ListMessagesRequest, context: Context
    ) -> notify_pb2.ListMessagesResponse:
        current_principal().require_role(*READING_ROLES)
        member_id, staff_id = request.member_id.strip(), request.staff_id.strip()
        if bool(member_id) == bool(staff_id):
            raise InvalidArgument(
                [
                    FieldViolation(name, "exactly one of member_id and staff_id")
                    for name in ("member_id", "staff_id")
                ]
            )
        limit = page_size(request.page_size)
        after = _after(request.page_token)
        async with self.db.sessions() as session:
            rows = await store.list_for_recipient(
                session, limit + 1, after, member_id=member_id or None, staff_id=staff_id or None
            )
        page, more = rows[:limit], len(rows) > limit
        next_token = _next_token(page[-1].created_at, page[-1].message_id) if more else ""
        return notify_pb2.ListMessagesResponse(
            messages=[to_proto(r) for r in page], next_page_token=next_token
        )

    async def GetMessage(
        self, request: notify_pb2.GetMessageRequest, context: Context
    ) -> notify_pb2.Message:
        current_principal().require_role(*READING_ROLES)
        message_id = request.message_id.strip()
        if not message_id:
            raise InvalidArgument([FieldViolation("message_id", "required")])
        async with self.db.sessions() as session:
            record = await store.get_message(session, message_id)
        if record is None:
            raise message_not_found(message_id)
        return to_proto(record)

    async def ListFailedMessages(
        self, request: notify_pb2.ListFailedMessagesRequest, context: Context
    ) -> notify_pb2.ListFailedMessagesResponse:
        current_principal().require_role(*OPERATOR_ROLES, Role.SERVICE)
        channel = None
        if request.channel != notify_pb2.CHANNEL_UNSPECIFIED:
            channel = CHANNELS.get(request.channel)
            if channel is None:
                raise InvalidArgument([FieldViolation("channel", "unknown channel")])
        limit = page_size(request.page_size)
        after = _after(request.page_token)
        async with self.db.sessions() as session:
            rows = await store.list_failed(
                session,
                channel=channel,
                template=request.template.strip(),
                limit=limit + 1,
                after=after,
            )
        page, more = rows[:limit], len(rows) > limit
        next_token = _next_token(page[-1].failed_at, page[-1].message_id) if more else ""
        return notify_pb2.ListFailedMessagesResponse(
            messages=[to_proto(r) for r in page], next_page_token=next_token
        )

    async def ReplayMessage(
        self, request: notify_pb2.ReplayMessageRequest, context: Context
    ) -> notify_pb2.Message:
        current_principal().require_role(*OPERATOR_ROLES)
        violations = Violations()
        if not request.message_id.strip():
            violations.add("message_id", "required")
        if not request.request_id.strip():
            violations.add("request_id", "required: a key of your choosing, unique per operation")
        violations.raise_if_any()
        check_request_id(request.request_id)
        message_id = request.message_id.strip()
        now = dt.datetime.now(dt.UTC)

        async def replay(session: AsyncSession) -> notify_pb2.Message:
            record = await store.get_message(session, message_id)
            if record is None:
                raise message_not_found(message_id)
            if not await store.replay(session, message_id, now):
                raise FailedPrecondition(
                    "only a failed message can be replayed",
                    reason="MESSAGE_NOT_FAILED",
                    metadata={"message_id": message_id, "status": record.status.value},
                )
            replayed = await store.get_message(session, message_id)
            assert replayed is not None
            return to_proto(replayed)

        return await run_idempotent(
            self.db,
            method="notify.ReplayMessage",
            request_id=request.request_id,
            request=request,
            response_type=notify_pb2.Message,
            work=replay,
        )

    async def RecordDeliveryReceipt(
        self, request: notify_pb2.RecordDeliveryReceiptRequest, context: Context
    ) -> notify_pb2.Message:
        current_principal().require_role(*RECEIPT_ROLES)
        violations = Violations()
        provider, provider_id = request.provider.strip(), request.provider_message_id.strip()
        if not provider or len(provider) > 32:
            violations.add("provider", "required, at most 32 characters")
        if not provider_id or len(provider_id) > MAX_ID_LENGTH:
            violations.add("provider_message_id", f"required, at most {MAX_ID_LENGTH} characters")
        if request.outcome not in (
            notify_pb2.DELIVERY_OUTCOME_DELIVERED,
            notify_pb2.DELIVERY_OUTCOME_FAILED,
        ):
            violations.add("outcome", "DELIVERED or FAILED")
        if len(request.reason) > 500:
            violations.add("reason", "at most 500 characters")
        violations.raise_if_any()
        at = (
            request.event_time.ToDatetime(dt.UTC)
            if request.HasField("event_time")
            else dt.datetime.now(dt.UTC)
        )
        delivered = request.outcome == notify_pb2.DELIVERY_OUTCOME_DELIVERED
        async with self.db.transaction() as session:
            receipt = await store.record_receipt(
                session,
                provider=provider,
                provider_message_id=provider_id,
                delivered=delivered,
                reason=request.reason.strip(),
                at=at,
            )
            if receipt is None:
                raise NotFound(
                    "no message carries this provider id",
                    reason="MESSAGE_NOT_FOUND",
                    metadata={"provider": provider},
                )
            if receipt.changed:
                if delivered:
                    await events.message_delivered(session, receipt.message)
                else:
                    await events.message_failed(session, receipt.message)
        return to_proto(receipt.message)

    async def ExportMailingList(
        self, request: notify_pb2.ExportMailingListRequest, context: Context
    ) -> AsyncIterator[notify_pb2.ExportMailingListChunk]:
        current_principal().require_role(*OPERATOR_ROLES)
        xlsx = request.format == notify_pb2.MAILING_LIST_FORMAT_XLSX
        if request.format not in (
            notify_pb2.MAILING_LIST_FORMAT_UNSPECIFIED,
            notify_pb2.MAILING_LIST_FORMAT_CSV,
            notify_pb2.MAILING_LIST_FORMAT_XLSX,
        ):
            raise InvalidArgument([FieldViolation("format", "CSV or XLSX")])
        again = request.export_id.strip()
        if len(again) > 40:
            raise InvalidArgument([FieldViolation("export_id", "at most 40 characters")])
        async with self.db.sessions() as session:
            letters = await postal.letters(session, again or None, MAX_LETTERS)
        if again and not letters:
            raise NotFound(
                "no export with this id", reason="EXPORT_NOT_FOUND", metadata={"export_id": again}
            )
        rows: list[list[str]] = []
        written: list[str] = []
        missing = 0
        for letter in letters:
            try:
                # As the member's file says now, not as cached for sends.
                contact = await self.contacts.contact(letter.member_id, fresh=True)
            except ContactsUnavailable:
                raise Unavailable(
                    "the members service did not answer; try again",
                    reason="MEMBERS_UNAVAILABLE",
                    retry_after_seconds=1.0,
                ) from None
            if contact is None or contact.address is None:
                # Erased, or the address removed since: nothing to print;
                # the letter stays on the list, unexported.
                missing += 1
                continue
            rows.append(row(letter, contact.address))
            written.append(letter.message_id)
        export_id = again or f"X{uuid.uuid4().hex[:20].upper()}"
        if not again:
            async with self.db.transaction() as session:
                await postal.mark_exported(session, written, export_id, dt.datetime.now(dt.UTC))
        data = await asyncio.to_thread(write_workbook if xlsx else write_csv, rows)
        log.info("mailing list exported", export_id=export_id, letters=len(rows), skipped=missing)
        extension, content_type = ("xlsx", XLSX_CONTENT_TYPE) if xlsx else ("csv", "text/csv")
        for index, piece in enumerate(chunks(data)):
            chunk = notify_pb2.ExportMailingListChunk(data=piece)
            if index == 0:
                chunk.file_name = f"mailing-list-{export_id}.{extension}"
                chunk.content_type = content_type
                chunk.export_id = export_id
                chunk.letters = len(rows)
            yield chunk


# --- wiring -------------------------------------------------------------


def channels(ctx: ServiceContext, config: ChannelSettings) -> dict[domain.Channel, Channel]:
    """Every channel: configured ones for real, the others standing in on
    the development channel (said once at start-up)."""
    dev_path = ctx.settings.var_dir / "notify" / "dev-channel.jsonl"
    directory = shared_peers(ctx).members
    call_tasks = CallTaskChannel(ctx.settings)
    ctx.on_close(call_tasks.close)
    dev_log = DevLogChannel(dev_path)
    ctx.on_close(dev_log.close)
    made: dict[domain.Channel, Channel] = {
        domain.Channel.DEV_LOG: dev_log,
        domain.Channel.POST: PostChannel(ctx.db, directory),
        domain.Channel.CALL_TASK: call_tasks,
    }
    if config.sms is not None:
        sms = SmsChannel(config.sms)
        ctx.on_close(sms.close)
        made[domain.Channel.SMS] = sms
    if config.smtp is not None:
        made[domain.Channel.EMAIL] = EmailChannel(config.smtp)
    if config.push is not None:
        push = PushChannel(config.push)
        ctx.on_close(push.close)
        made[domain.Channel.PUSH] = push
    for name, setting in (
        (domain.Channel.SMS, "NOTIFY_SMS_URL"),
        (domain.Channel.EMAIL, "NOTIFY_SMTP_HOST"),
        (domain.Channel.PUSH, "NOTIFY_PUSH_URL"),
    ):
        if name not in made:
            log.warning(
                "channel not configured: its messages go to the development channel",
                channel=name.value,
                setting=setting,
                path=str(dev_path),
            )
            made[name] = standing_in = DevLogChannel(dev_path, standing_in_for=name.value)
            ctx.on_close(standing_in.close)
    return made


def dispatcher(ctx: ServiceContext, config: ChannelSettings | None = None) -> Dispatcher:
    settings = config or ChannelSettings.from_env()
    return Dispatcher(
        ctx.db,
        channels(ctx, settings),
        contacts=shared_peers(ctx).members,
        retry=settings.retry,
        limits={
            domain.Channel(name): RateLimiter(
                ctx.db, domain.Channel(name), rate, settings.burst.get(name, 1)
            )
            for name, rate in settings.rate_per_second.items()
        },
        concurrency=settings.concurrency,
        batch_size=settings.batch_size,
    )


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=notify_pb2.DESCRIPTOR.services_by_name["NotifyService"].full_name,
            servicer=NotifyServicer(ctx, shared_peers(ctx).members),
            add_to_server=notify_pb2_grpc.add_NotifyServiceServicer_to_server,
        )
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [dispatcher(ctx).run]
