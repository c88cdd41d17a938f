"""What notify consumes and publishes."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import utcnow
from chassis.inbox import Subscription
from chassis.outbox import enqueue
from cornucopia.notify.v1 import events_pb2, notify_pb2
from services.notify import domain, store, triggers

SOURCE = "cornucopia/notify"
MESSAGE_SENT = "notify.v1.message.sent"
MESSAGE_QUEUED = store.MESSAGE_QUEUED  # published by store.queue_message
MESSAGE_DELIVERED = "notify.v1.message.delivered"
MESSAGE_FAILED = "notify.v1.message.failed"

CHANNELS_PROTO = {
    domain.Channel.DEV_LOG: notify_pb2.CHANNEL_DEV_LOG,
    domain.Channel.SMS: notify_pb2.CHANNEL_SMS,
    domain.Channel.EMAIL: notify_pb2.CHANNEL_EMAIL,
    domain.Channel.PUSH: notify_pb2.CHANNEL_PUSH,
    domain.Channel.CALL_TASK: notify_pb2.CHANNEL_CALL_TASK,
    domain.Channel.POST: notify_pb2.CHANNEL_POST,
}


def subscriptions() -> list[Subscription]:
    """The event triggers (see services.notify.triggers)."""
    return triggers.subscriptions()


async def message_sent(
    session: AsyncSession,
    record: store.MessageRecord,
    sent_at: dt.datetime,
    provider: str = "",
    provider_message_id: str = "",
) -> str:
    ts = Timestamp()
    ts.FromDatetime(sent_at)
    return await enqueue(
        session,
        source=SOURCE,
        subject=MESSAGE_SENT,
        message=events_pb2.MessageSent(
            message_id=record.message_id,
            member_id=record.member_id or "",
            staff_id=record.staff_id or "",
            template=record.template,
            channel=CHANNELS_PROTO[record.channel],
            send_time=ts,
            provider=provider,
            provider_message_id=provider_message_id,
        ),
    )


async def message_delivered(session: AsyncSession, record: store.MessageRecord) -> str:
    ts = Timestamp()
    ts.FromDatetime(record.delivered_at or utcnow())
    return await enqueue(
        session,
        source=SOURCE,
        subject=MESSAGE_DELIVERED,
        message=events_pb2.MessageDelivered(
            message_id=record.message_id,
            member_id=record.member_id or "",
            staff_id=record.staff_id or "",
            template=record.template,
            channel=CHANNELS_PROTO[record.channel],
            provider=record.provider or "",
            deliver_time=ts,
        ),
    )


async def message_failed(session: AsyncSession, record: store.MessageRecord) -> str:
    """A message given up on; ``reason`` is the provider's or the last
    retry's, never an address."""
    ts = Timestamp()
    ts.FromDatetime(record.failed_at or utcnow())
    return await enqueue(
        session,
        source=SOURCE,
        subject=MESSAGE_FAILED,
        message=events_pb2.MessageFailed(
            message_id=record.message_id,
            member_id=record.member_id or "",
            staff_id=record.staff_id or "",
            template=record.template,
            channel=CHANNELS_PROTO[record.channel],
            reason=record.status_reason or "",
            attempts=record.attempts,
            fail_time=ts,
        ),
    )


OPTOUT_RECORDED = "notify.v1.optout.recorded"


async def optout_recorded(  # noqa: PLR0917 - the event's fields
    session: AsyncSession,
    optout_id: str,
    member_id: str,
    channel: domain.Channel,
    scope: str,
    source: str,
    at: dt.datetime,
) -> str:
    ts = Timestamp()
    ts.FromDatetime(at)
    return await enqueue(
        session,
        source=SOURCE,
        subject=OPTOUT_RECORDED,
        message=events_pb2.OptOutRecorded(
            optout_id=optout_id,
            member_id=member_id,
            channel=CHANNELS_PROTO[channel],
            scope=scope,
            source=source,
            record_time=ts,
        ),
    )
