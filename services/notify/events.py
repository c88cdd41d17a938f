"""What notify consumes and publishes."""

from __future__ import annotations

import datetime as dt
import uuid

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bus import STREAMS
from chassis.db import utcnow
from chassis.inbox import Envelope, Subscription
from chassis.outbox import enqueue
from chassis.telemetry import current_traceparent
from cornucopia.members.v1 import events_pb2 as member_events
from cornucopia.notify.v1 import events_pb2, notify_pb2
from services.notify import domain, store

SOURCE = "cornucopia/notify"
MESSAGE_SENT = "notify.v1.message.sent"

CHANNELS_PROTO = {
    domain.Channel.DEV_LOG: notify_pb2.CHANNEL_DEV_LOG,
    domain.Channel.SMS: notify_pb2.CHANNEL_SMS,
    domain.Channel.EMAIL: notify_pb2.CHANNEL_EMAIL,
    domain.Channel.PUSH: notify_pb2.CHANNEL_PUSH,
    domain.Channel.CALL_TASK: notify_pb2.CHANNEL_CALL_TASK,
    domain.Channel.POST: notify_pb2.CHANNEL_POST,
}


async def on_member_enrolled(
    session: AsyncSession, event: member_events.MemberEnrolled, envelope: Envelope
) -> None:
    """A new member gets a welcome message, once per enrollment event."""
    locale = domain.choose_locale(event.preferred_language)
    await store.queue_message(
        session,
        message_id=str(uuid.uuid4()),
        member_id=event.member_id,
        template=domain.WELCOME.name,
        channel=domain.Channel.DEV_LOG,
        locale=locale,
        body=domain.WELCOME.render(locale, {"member_id": event.member_id}),
        trigger_event_id=envelope.event_id,
        trace_headers=current_traceparent(),
        created_at=utcnow(),
    )


def subscriptions() -> list[Subscription]:
    return [
        Subscription(
            name="member-events",
            stream=STREAMS["members"],
            subjects=("members.v1.member.enrolled",),
            handlers={member_events.MemberEnrolled: on_member_enrolled},
        )
    ]


async def message_sent(
    session: AsyncSession, record: store.MessageRecord, sent_at: dt.datetime
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
            template=record.template,
            channel=CHANNELS_PROTO[record.channel],
            send_time=ts,
        ),
    )
