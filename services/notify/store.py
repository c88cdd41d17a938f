"""Message tables and queries."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from chassis.paging import newest_first
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
    # 0002: the dispatcher pass that holds a queued message, and until when.
    # A claim that has expired (its dispatcher died) can be taken again.
    sa.Column("claim_token", sa.String(32), nullable=True),
    sa.Column("claim_expires_at", UTCDateTime, nullable=True),
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


def _claimable(now: dt.datetime) -> sa.ColumnElement[bool]:
    c = messages.c
    return sa.and_(
        c.status == MessageStatus.QUEUED.value,
        sa.or_(c.claim_expires_at.is_(None), c.claim_expires_at <= now),
    )


async def claim_queued(
    session: AsyncSession,
    *,
    limit: int,
    token: str,
    now: dt.datetime,
    lease: dt.timedelta,
    skip_locked: bool,
) -> list[MessageRecord]:
    """Claim up to ``limit`` queued messages nobody holds (oldest first) for
    the dispatcher pass ``token`` until ``now + lease``, and return them.
    Call it in a unit of work of its own, committed before sending.

    Two passes never hold the same message: on PostgreSQL the candidates are
    picked and locked with ``FOR UPDATE SKIP LOCKED`` (concurrent passes take
    different rows instead of waiting on the same ones), on SQLite the unit
    of work holds the file's write lock; and the claim itself checks the
    row is still claimable as it writes it."""
    c = messages.c
    candidates = (
        sa.select(c.message_id)
        .where(_claimable(now))
        .order_by(c.created_at, c.message_id)
        .limit(limit)
    )
    if skip_locked:
        candidates = candidates.with_for_update(skip_locked=True)
    # Two statements, not UPDATE ... IN (SELECT ... LIMIT ... SKIP LOCKED):
    # PostgreSQL may run such a subquery again for every row it updates,
    # each run skipping the rows the previous ones locked, and claim far
    # more than ``limit``.
    picked = list((await session.execute(candidates)).scalars())
    if not picked:
        return []
    await session.execute(
        sa.update(messages)
        .where(c.message_id.in_(picked), _claimable(now))
        .values(claim_token=token, claim_expires_at=now + lease)
    )
    rows = await session.execute(
        sa.select(messages)
        .where(c.claim_token == token, c.status == MessageStatus.QUEUED.value)
        .order_by(c.created_at, c.message_id)
    )
    return [_record(r) for r in rows]


def _held(message_id: str, token: str) -> sa.ColumnElement[bool]:
    c = messages.c
    return sa.and_(
        c.message_id == message_id,
        c.claim_token == token,
        c.status == MessageStatus.QUEUED.value,
    )


async def mark_sent(session: AsyncSession, message_id: str, now: dt.datetime, token: str) -> bool:
    """Mark a claimed message sent; False when the pass ``token`` no longer
    holds it (its claim expired and another pass took it over)."""
    result = await session.execute(
        sa.update(messages)
        .where(_held(message_id, token))
        .values(
            status=MessageStatus.SENT.value,
            sent_at=now,
            attempts=messages.c.attempts + 1,
            claim_token=None,
            claim_expires_at=None,
        )
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def mark_attempt_failed(
    session: AsyncSession, message_id: str, error: str, token: str
) -> bool:
    """Count a failed send and give the message back to the queue."""
    result = await session.execute(
        sa.update(messages)
        .where(_held(message_id, token))
        .values(
            attempts=messages.c.attempts + 1,
            last_error=error[:500],
            claim_token=None,
            claim_expires_at=None,
        )
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def release_claims(session: AsyncSession, token: str, message_ids: Sequence[str]) -> None:
    """Give back claimed messages this pass will not send."""
    if not message_ids:
        return
    c = messages.c
    await session.execute(
        sa.update(messages)
        .where(c.claim_token == token, c.message_id.in_(list(message_ids)))
        .values(claim_token=None, claim_expires_at=None)
    )


async def list_for_member(
    session: AsyncSession, member_id: str, limit: int, after: tuple[dt.datetime, str] | None
) -> list[MessageRecord]:
    query = newest_first(
        sa.select(messages).where(messages.c.member_id == member_id),
        messages.c.created_at,
        messages.c.message_id,
        after,
        limit,
    )
    return [_record(r) for r in await session.execute(query)]
