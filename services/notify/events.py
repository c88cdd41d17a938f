"""What notify consumes and publishes."""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import utcnow
from chassis.inbox import Subscription
from chassis.outbox import enqueue
from cornucopia.notify.v1 import events_pb2, notify_pb2
from services.notify import domain, store, triggers
from services.notify.store.messages import timestamp

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


async def _publish(session: AsyncSession, subject: str, message: Message) -> str:
    return await enqueue(session, source=SOURCE, subject=subject, message=message)


def _about(record: store.MessageRecord) -> dict[str, Any]:
    """The fields every message event has."""
    return {
        "message_id": record.message_id,
        "member_id": record.member_id or "",
        "staff_id": record.staff_id or "",
        "template": record.template,
        "channel": CHANNELS_PROTO[record.channel],
    }


def message_sent(
    record: store.MessageRecord,
    sent_at: dt.datetime,
    provider: str = "",
    provider_message_id: str = "",
) -> tuple[str, str, Message]:
    """The ``notify.v1.message.sent`` event (source, subject, payload),
    written with the mark (``store.mark_sent_announced``)."""
    return (
        SOURCE,
        MESSAGE_SENT,
        events_pb2.MessageSent(
            **_about(record),
            send_time=timestamp(sent_at),
            provider=provider,
            provider_message_id=provider_message_id,
        ),
    )


async def message_delivered(session: AsyncSession, record: store.MessageRecord) -> str:
    return await _publish(
        session,
        MESSAGE_DELIVERED,
        events_pb2.MessageDelivered(
            **_about(record),
            provider=record.provider or "",
            deliver_time=timestamp(record.delivered_at or utcnow()),
        ),
    )


async def message_failed(session: AsyncSession, record: store.MessageRecord) -> str:
    """A message given up on; ``reason`` is the provider's or the last
    retry's, never an address."""
    return await _publish(
        session,
        MESSAGE_FAILED,
        events_pb2.MessageFailed(
            **_about(record),
            reason=record.status_reason or "",
            attempts=record.attempts,
            fail_time=timestamp(record.failed_at or utcnow()),
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
    return await _publish(
        session,
        OPTOUT_RECORDED,
        events_pb2.OptOutRecorded(
            optout_id=optout_id,
            member_id=member_id,
            channel=CHANNELS_PROTO[channel],
            scope=scope,
            source=source,
            record_time=timestamp(at),
        ),
    )
