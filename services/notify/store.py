"""Message tables and queries."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from services.notify.domain import Channel, MessageStatus

metadata = sa.MetaData()

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("message_id", sa.String(40), primary_key=True),
    sa.Column("member_id", sa.String(16), nullable=False),
    sa.Column("template", sa.String(64), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("locale", sa.String(10), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("trigger_event_id", sa.String(64), nullable=True),
    # The trace of the event that caused the message, so the send joins it.
    sa.Column("trace_headers", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.String(500), nullable=True),
    sa.UniqueConstraint("trigger_event_id", "template", "channel", name="uq_messages_trigger"),
    sa.Index("ix_messages_member", "member_id", "created_at"),
    sa.Index("ix_messages_status", "status", "created_at"),
)

# Marks a transaction that queued messages, to wake the dispatcher on commit.
MESSAGES_QUEUED = "cornucopia.notify.messages_queued"


@dataclass(frozen=True)
class MessageRecord:
    message_id: str
    member_id: str
    template: str
    channel: Channel
    locale: str
    body: str
    status: MessageStatus
    trigger_event_id: str | None
    trace_headers: dict[str, str]
    created_at: dt.datetime
    sent_at: dt.datetime | None
    attempts: int


def _record(row: Any) -> MessageRecord:
    m = row._mapping
    return MessageRecord(
        message_id=m["message_id"],
        member_id=m["member_id"],
        template=m["template"],
        channel=Channel(m["channel"]),
        locale=m["locale"],
        body=m["body"],
        status=MessageStatus(m["status"]),
        trigger_event_id=m["trigger_event_id"],
        trace_headers=dict(m["trace_headers"] or {}),
        created_at=m["created_at"],
        sent_at=m["sent_at"],
        attempts=m["attempts"],
    )


async def queue_message(session: AsyncSession, **values: Any) -> None:
    await session.execute(
        sa.insert(messages).values(status=MessageStatus.QUEUED.value, attempts=0, **values)
    )
    session.info[MESSAGES_QUEUED] = True


async def queued(session: AsyncSession, limit: int) -> list[MessageRecord]:
    rows = await session.execute(
        sa.select(messages)
        .where(messages.c.status == MessageStatus.QUEUED.value)
        .order_by(messages.c.created_at, messages.c.message_id)
        .limit(limit)
    )
    return [_record(r) for r in rows]


async def mark_sent(session: AsyncSession, message_id: str, now: dt.datetime) -> None:
    await session.execute(
        sa.update(messages)
        .where(messages.c.message_id == message_id)
        .values(status=MessageStatus.SENT.value, sent_at=now, attempts=messages.c.attempts + 1)
    )


async def mark_attempt_failed(session: AsyncSession, message_id: str, error: str) -> None:
    await session.execute(
        sa.update(messages)
        .where(messages.c.message_id == message_id)
        .values(attempts=messages.c.attempts + 1, last_error=error[:500])
    )


async def list_for_member(
    session: AsyncSession, member_id: str, limit: int, after: tuple[dt.datetime, str] | None
) -> list[MessageRecord]:
    query = sa.select(messages).where(messages.c.member_id == member_id)
    if after is not None:
        created, message_id = after
        query = query.where(
            sa.or_(
                messages.c.created_at < created,
                sa.and_(messages.c.created_at == created, messages.c.message_id < message_id),
            )
        )
    query = query.order_by(messages.c.created_at.desc(), messages.c.message_id.desc()).limit(limit)
    return [_record(r) for r in await session.execute(query)]
