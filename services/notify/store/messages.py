"""The message table: one row per message to one member or staff member,
from queued to sent, delivered, failed or suppressed."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from chassis.direct import DialectInsert, Direct, Executor, as_session
from chassis.outbox import ChangeWithEvent, enqueue
from chassis.paging import newest_first
from cornucopia.notify.v1 import events_pb2, notify_pb2
from services.notify.domain import Category, Channel, MessageStatus
from services.notify.store.base import metadata

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("message_id", sa.String(40), primary_key=True),
    # Exactly one of member_id and staff_id names the recipient (0003).
    sa.Column("member_id", sa.String(16), nullable=True),
    sa.Column("staff_id", sa.String(16), nullable=True),
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
    # 0003: what kind of message (consent and quiet hours depend on it),
    # the e-mail subject, the recipient's local zone (quiet hours are
    # checked again at send time), when it may go at the earliest, when the
    # next try is due after a failed one, the provider's own id for it
    # (delivery receipts name it), and why it failed or was suppressed.
    sa.Column("category", sa.String(16), nullable=False, server_default="transactional"),
    sa.Column("subject", sa.String(200), nullable=True),
    sa.Column("time_zone", sa.String(64), nullable=False, server_default=""),
    sa.Column("not_before", UTCDateTime, nullable=True),
    sa.Column("next_attempt_at", UTCDateTime, nullable=True),
    sa.Column("provider", sa.String(32), nullable=True),
    sa.Column("provider_message_id", sa.String(100), nullable=True),
    sa.Column("delivered_at", UTCDateTime, nullable=True),
    sa.Column("failed_at", UTCDateTime, nullable=True),
    sa.Column("status_reason", sa.String(500), nullable=True),
    sa.CheckConstraint(
        "(member_id IS NULL) <> (staff_id IS NULL)", name="ck_messages_one_recipient"
    ),
    sa.UniqueConstraint("trigger_event_id", "template", "channel", name="uq_messages_trigger"),
    sa.Index("ix_messages_member", "member_id", "created_at"),
    sa.Index("ix_messages_status", "status", "created_at"),
    sa.Index("ix_messages_staff", "staff_id", "created_at"),
    sa.Index("ix_messages_provider_id", "provider", "provider_message_id"),
    # 0005: the dead letters, listed newest failure first.
    sa.Index("ix_messages_failed", "status", "failed_at"),
)

# Marks a transaction that queued messages, to wake the dispatcher on commit.
MESSAGES_QUEUED = "cornucopia.notify.messages_queued"

SOURCE = "cornucopia/notify"
MESSAGE_QUEUED = "notify.v1.message.queued"


def channel_proto(channel: Channel) -> notify_pb2.Channel.ValueType:
    return notify_pb2.Channel.Value(f"CHANNEL_{channel.name}")


def timestamp(at: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


async def _message_queued(
    session: AsyncSession,
    *,
    message_id: str,
    member_id: str | None,
    staff_id: str | None,
    template: str,
    channel: Channel,
    trigger_event_id: str | None,
    at: dt.datetime,
) -> None:
    # Here rather than in services.notify.events, which imports the store:
    # the event goes out in the transaction that queues the message.
    await enqueue(
        session,
        source=SOURCE,
        subject=MESSAGE_QUEUED,
        message=events_pb2.MessageQueued(
            message_id=message_id,
            member_id=member_id or "",
            staff_id=staff_id or "",
            template=template,
            channel=channel_proto(channel),
            trigger_event_id=trigger_event_id or "",
            queue_time=timestamp(at),
        ),
    )


@dataclass(frozen=True)
class MessageRecord:
    message_id: str
    member_id: str | None
    staff_id: str | None
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
    category: Category
    subject: str | None
    time_zone: str
    not_before: dt.datetime | None
    next_attempt_at: dt.datetime | None
    provider: str | None
    provider_message_id: str | None
    delivered_at: dt.datetime | None
    failed_at: dt.datetime | None
    status_reason: str | None
    last_error: str | None


def _record(row: Any) -> MessageRecord:
    m = row._mapping
    return MessageRecord(
        message_id=m["message_id"],
        member_id=m["member_id"],
        staff_id=m["staff_id"],
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
        category=Category(m["category"]),
        subject=m["subject"],
        time_zone=m["time_zone"],
        not_before=m["not_before"],
        next_attempt_at=m["next_attempt_at"],
        provider=m["provider"],
        provider_message_id=m["provider_message_id"],
        delivered_at=m["delivered_at"],
        failed_at=m["failed_at"],
        status_reason=m["status_reason"],
        last_error=m["last_error"],
    )


# An INSERT that leaves alone a message the same trigger already queued
# (or suppressed) on the same template and channel, and says whether it
# wrote one (``uq_messages_trigger``; a message without a trigger never
# conflicts).
_QUEUE = DialectInsert(
    lambda insert: (
        insert(messages)
        .on_conflict_do_nothing(
            index_elements=[messages.c.trigger_event_id, messages.c.template, messages.c.channel]
        )
        .returning(messages.c.message_id)
    )
)


async def insert_once(session: AsyncSession, values: Mapping[str, Any]) -> bool:
    """Writes a message row (queued or suppressed) unless its trigger
    already has one on its template and channel; True when written."""
    written = await _QUEUE.execute(session, values)
    return written.first() is not None


async def queue_message(
    session: AsyncSession,
    *,
    message_id: str,
    template: str,
    channel: Channel,
    locale: str,
    body: str,
    created_at: dt.datetime,
    trace_headers: dict[str, str],
    member_id: str | None = None,
    staff_id: str | None = None,
    category: Category = Category.TRANSACTIONAL,
    subject: str | None = None,
    time_zone: str = "",
    not_before: dt.datetime | None = None,
    trigger_event_id: str | None = None,
) -> bool:
    """Queue one message, or nothing when the same trigger already queued
    this template on this channel (an event delivered twice gives one
    message). True when it was queued."""
    if (member_id is None) == (staff_id is None):
        raise ValueError("a message goes to one member or one staff member")
    values: dict[str, Any] = {
        "message_id": message_id,
        "member_id": member_id,
        "staff_id": staff_id,
        "template": template,
        "channel": channel.value,
        "locale": locale,
        "body": body,
        "status": MessageStatus.QUEUED.value,
        "trigger_event_id": trigger_event_id,
        "trace_headers": trace_headers,
        "created_at": created_at,
        "attempts": 0,
        "category": category.value,
        "subject": subject,
        "time_zone": time_zone,
        "not_before": not_before,
    }
    if not await insert_once(session, values):
        return False
    await _message_queued(
        session,
        message_id=message_id,
        member_id=member_id,
        staff_id=staff_id,
        template=template,
        channel=channel,
        trigger_event_id=trigger_event_id,
        at=created_at,
    )
    session.info[MESSAGES_QUEUED] = True
    return True


def _claimable(now: Any) -> sa.ColumnElement[bool]:
    c = messages.c
    return sa.and_(
        c.status == MessageStatus.QUEUED.value,
        sa.or_(c.claim_expires_at.is_(None), c.claim_expires_at <= now),
        sa.or_(c.not_before.is_(None), c.not_before <= now),
        sa.or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now),
    )


def _claim_statement() -> Direct:
    """PostgreSQL's claim in one statement: the candidates are picked and
    locked with ``FOR UPDATE SKIP LOCKED`` (concurrent passes take different
    rows instead of waiting on the same ones) in a materialised CTE, which
    runs once, then written and returned. Not ``UPDATE ... IN (SELECT ...
    LIMIT ... SKIP LOCKED)``: PostgreSQL may run such a subquery again for
    every row it updates, each run skipping the rows the previous ones
    locked, and claim far more than the limit."""
    c = messages.c
    now = sa.bindparam("now", type_=UTCDateTime)
    picked = (
        sa.select(c.message_id)
        .where(_claimable(now))
        .order_by(c.created_at, c.message_id)
        .limit(sa.bindparam("batch"))
        .with_for_update(skip_locked=True)
        .cte("picked")
        .prefix_with("MATERIALIZED")
    )
    return Direct(
        sa.update(messages)
        .where(c.message_id == picked.c.message_id, _claimable(now))
        .values(claim_token=sa.bindparam("token"), claim_expires_at=sa.bindparam("until"))
        .returning(*messages.c)
    )


_CLAIM = _claim_statement()


async def claim_queued(
    session: Executor,
    *,
    limit: int,
    token: str,
    now: dt.datetime,
    lease: dt.timedelta,
    skip_locked: bool,
) -> list[MessageRecord]:
    """Claim up to ``limit`` queued messages nobody holds (oldest first) for
    the dispatcher pass ``token`` until ``now + lease``, and return them.
    Call it in a unit of work of its own, committed before sending (on
    PostgreSQL one statement: ``single_statement``).

    Two passes never hold the same message: on PostgreSQL (``skip_locked``)
    the candidates are locked as they are picked (``_claim_statement``), on
    SQLite the unit of work holds the file's write lock; and the claim
    itself checks the row is still claimable as it writes it."""
    if skip_locked:
        rows = await _CLAIM.execute(
            session, {"now": now, "batch": limit, "token": token, "until": now + lease}
        )
        claimed = [_record(r) for r in rows]
        claimed.sort(key=lambda m: (m.created_at, m.message_id))
        return claimed
    c = messages.c
    session = as_session(session)
    picked = list(
        (
            await session.execute(
                sa.select(c.message_id)
                .where(_claimable(now))
                .order_by(c.created_at, c.message_id)
                .limit(limit)
            )
        ).scalars()
    )
    if not picked:
        return []
    await session.execute(
        sa.update(messages)
        .where(c.message_id.in_(picked), _claimable(now))
        .values(claim_token=token, claim_expires_at=now + lease)
    )
    held = await session.execute(
        sa.select(messages)
        .where(c.claim_token == token, c.status == MessageStatus.QUEUED.value)
        .order_by(c.created_at, c.message_id)
    )
    return [_record(r) for r in held]


def _held(message_id: str, token: str) -> sa.ColumnElement[bool]:
    c = messages.c
    return sa.and_(
        c.message_id == message_id,
        c.claim_token == token,
        c.status == MessageStatus.QUEUED.value,
    )


_MARK_SENT_STATEMENT = (
    sa.update(messages)
    .where(
        messages.c.message_id == sa.bindparam("key_message_id"),
        messages.c.claim_token == sa.bindparam("key_token"),
        messages.c.status == MessageStatus.QUEUED.value,
    )
    .values(
        status=MessageStatus.SENT.value,
        sent_at=sa.bindparam("sent_at"),
        attempts=messages.c.attempts + 1,
        claim_token=None,
        claim_expires_at=None,
        next_attempt_at=None,
        provider=sa.bindparam("provider"),
        provider_message_id=sa.bindparam("provider_message_id"),
    )
)
_MARK_SENT = Direct(_MARK_SENT_STATEMENT)
_MARK_SENT_ANNOUNCED = ChangeWithEvent(_MARK_SENT_STATEMENT)


def _sent_params(
    message_id: str,
    now: dt.datetime,
    token: str,
    provider: str | None,
    provider_message_id: str | None,
) -> dict[str, Any]:
    return {
        "key_message_id": message_id,
        "key_token": token,
        "sent_at": now,
        "provider": provider,
        "provider_message_id": (provider_message_id or "")[:100] or None,
    }


async def mark_sent(
    session: AsyncSession,
    message_id: str,
    now: dt.datetime,
    token: str,
    *,
    provider: str | None = None,
    provider_message_id: str | None = None,
) -> bool:
    """Mark a claimed message sent, with the provider's name and its id of
    the message (delivery receipts name it); False when the pass ``token``
    no longer holds it (its claim expired and another pass took it over)."""
    params = _sent_params(message_id, now, token, provider, provider_message_id)
    return (await _MARK_SENT.execute(session, params)).rowcount == 1


async def mark_sent_announced(
    session: Executor,
    message_id: str,
    now: dt.datetime,
    token: str,
    *,
    provider: str | None = None,
    provider_message_id: str | None = None,
    event: tuple[str, str, Message],
) -> bool:
    """``mark_sent`` with its event (source, subject, payload), written
    only when the message was marked: on PostgreSQL one statement
    (``chassis.outbox.ChangeWithEvent``)."""
    source, subject, message = event
    params = _sent_params(message_id, now, token, provider, provider_message_id)
    return await _MARK_SENT_ANNOUNCED.execute(
        session, params, source=source, subject=subject, message=message
    )


async def mark_attempt_failed(
    session: AsyncSession,
    message_id: str,
    error: str,
    token: str,
    next_attempt_at: dt.datetime | None = None,
) -> bool:
    """Count a failed send and give the message back to the queue, to be
    tried again from ``next_attempt_at`` (at once when None)."""
    result = await session.execute(
        sa.update(messages)
        .where(_held(message_id, token))
        .values(
            attempts=messages.c.attempts + 1,
            last_error=error[:500],
            next_attempt_at=next_attempt_at,
            claim_token=None,
            claim_expires_at=None,
        )
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def mark_failed(
    session: AsyncSession,
    message_id: str,
    reason: str,
    token: str,
    now: dt.datetime,
    *,
    attempted: bool = True,
) -> MessageRecord | None:
    """Give a claimed message up: FAILED with ``reason`` (the provider's, or
    the last error of the last retry), a dead letter. ``attempted`` counts
    the send that failed. None when the pass no longer holds it."""
    values: dict[str, Any] = {
        "status": MessageStatus.FAILED.value,
        "failed_at": now,
        "status_reason": reason[:500],
        "next_attempt_at": None,
        "claim_token": None,
        "claim_expires_at": None,
    }
    if attempted:
        values["attempts"] = messages.c.attempts + 1
        values["last_error"] = reason[:500]
    result = await session.execute(
        sa.update(messages).where(_held(message_id, token)).values(**values)
    )
    if getattr(result, "rowcount", 0) != 1:
        return None
    return await get_message(session, message_id)


async def postpone(session: AsyncSession, message_id: str, token: str, until: dt.datetime) -> bool:
    """Give a claimed message back unsent, not to go before ``until``
    (quiet hours began while it waited); no attempt is counted."""
    result = await session.execute(
        sa.update(messages)
        .where(_held(message_id, token))
        .values(not_before=until, claim_token=None, claim_expires_at=None)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def get_message(session: AsyncSession, message_id: str) -> MessageRecord | None:
    row = (
        await session.execute(sa.select(messages).where(messages.c.message_id == message_id))
    ).first()
    return None if row is None else _record(row)


@dataclass(frozen=True)
class Receipt:
    """What a delivery receipt did: the message it names as it is now, and
    whether the receipt changed it (False for the same receipt again)."""

    message: MessageRecord
    changed: bool


async def record_receipt(
    session: AsyncSession,
    *,
    provider: str,
    provider_message_id: str,
    delivered: bool,
    reason: str,
    at: dt.datetime,
) -> Receipt | None:
    """A provider's receipt: a SENT message turns DELIVERED, or FAILED with
    the provider's reason. A message already delivered or failed stays as
    it is (receipts repeat, and arrive out of order). None when no message
    carries the provider's id."""
    c = messages.c
    row = (
        await session.execute(
            sa.select(messages)
            .where(c.provider == provider, c.provider_message_id == provider_message_id)
            .order_by(c.created_at.desc())
            .limit(1)
        )
    ).first()
    if row is None:
        return None
    record = _record(row)
    if record.status is not MessageStatus.SENT:
        return Receipt(record, changed=False)
    if delivered:
        values: dict[str, Any] = {"status": MessageStatus.DELIVERED.value, "delivered_at": at}
    else:
        values = {
            "status": MessageStatus.FAILED.value,
            "failed_at": at,
            "status_reason": (reason or "undeliverable")[:500],
        }
    result = await session.execute(
        sa.update(messages)
        .where(c.message_id == record.message_id, c.status == MessageStatus.SENT.value)
        .values(**values)
    )
    updated = await get_message(session, record.message_id)
    assert updated is not None
    return Receipt(updated, changed=getattr(result, "rowcount", 0) == 1)


async def replay(session: AsyncSession, message_id: str, now: dt.datetime) -> bool:
    """A failed message back in the queue, as if new: attempts, errors and
    the provider's id of the failed try cleared (a late receipt of it then
    matches nothing). False when the message is not FAILED."""
    c = messages.c
    result = await session.execute(
        sa.update(messages)
        .where(c.message_id == message_id, c.status == MessageStatus.FAILED.value)
        .values(
            status=MessageStatus.QUEUED.value,
            attempts=0,
            last_error=None,
            status_reason=None,
            failed_at=None,
            next_attempt_at=None,
            not_before=None,
            provider=None,
            provider_message_id=None,
            sent_at=None,
            claim_token=None,
            claim_expires_at=None,
        )
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    record = await get_message(session, message_id)
    assert record is not None
    await _message_queued(
        session,
        message_id=record.message_id,
        member_id=record.member_id,
        staff_id=record.staff_id,
        template=record.template,
        channel=record.channel,
        trigger_event_id=record.trigger_event_id,
        at=now,
    )
    session.info[MESSAGES_QUEUED] = True
    return True


_RELEASE_CLAIM = Direct(
    sa.update(messages)
    .where(
        messages.c.claim_token == sa.bindparam("token"),
        messages.c.message_id == sa.bindparam("release_id"),
    )
    .values(claim_token=None, claim_expires_at=None)
)


async def release_claims(session: Executor, token: str, message_ids: Sequence[str]) -> None:
    """Give back claimed messages this pass will not send (one round trip
    on PostgreSQL)."""
    await _RELEASE_CLAIM.execute_many(
        session, [{"token": token, "release_id": message_id} for message_id in message_ids]
    )


async def list_for_recipient(
    session: AsyncSession,
    limit: int,
    after: tuple[dt.datetime, str] | None,
    *,
    member_id: str | None = None,
    staff_id: str | None = None,
) -> list[MessageRecord]:
    """The messages to a member, or else to a staff member, newest first."""
    c = messages.c
    whose = c.member_id == member_id if member_id is not None else c.staff_id == staff_id
    query = newest_first(sa.select(messages).where(whose), c.created_at, c.message_id, after, limit)
    return [_record(r) for r in await session.execute(query)]


async def list_failed(
    session: AsyncSession,
    *,
    channel: Channel | None,
    template: str,
    limit: int,
    after: tuple[dt.datetime, str] | None,
) -> list[MessageRecord]:
    """The dead letters, most recently failed first."""
    c = messages.c
    query = sa.select(messages).where(c.status == MessageStatus.FAILED.value)
    if channel is not None:
        query = query.where(c.channel == channel.value)
    if template:
        query = query.where(c.template == template)
    return [
        _record(r)
        for r in await session.execute(newest_first(query, c.failed_at, c.message_id, after, limit))
    ]
