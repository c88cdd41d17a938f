"""Direct sends: the send itself (who asked, to whom, its state and
progress), the members of a listed audience, and the moves between states.

A send's audience is expanded by a worker holding a lease on it: a batch of
members (a listed one by position, a segment's by the members service's page
token) becomes notifications in one transaction that also moves the send's
cursor. Every notification's dedup key names the send and the member, so a
batch done again after a crash writes nothing new: one member never hears
twice from one send."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from services.notify.domain import Channel, MessageStatus
from services.notify.store.base import metadata
from services.notify.store.intents import notifications
from services.notify.store.messages import messages

# Marks a transaction that made a send ready to run, to wake the worker.
SENDS_READY = "cornucopia.notify.sends_ready"


class SendState(enum.StrEnum):
    PENDING_APPROVAL = "pending_approval"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    DONE = "done"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


OPEN_STATES = (SendState.PENDING_APPROVAL, SendState.SCHEDULED, SendState.RUNNING)

sends = sa.Table(
    "sends",
    metadata,
    sa.Column("send_id", sa.String(40), primary_key=True),
    sa.Column("trigger", sa.String(64), nullable=False),
    sa.Column("template", sa.String(64), nullable=True),
    sa.Column("channel", sa.String(16), nullable=True),
    # A segment's id and version, and its criteria (MemberCriteria as JSON)
    # as they were when the send was created: what was approved is sent.
    sa.Column("segment_id", sa.String(40), nullable=False, server_default=""),
    sa.Column("segment_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("criteria", sa.Text, nullable=True),
    sa.Column("schedule_at", UTCDateTime, nullable=True),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("approval_required", sa.Boolean, nullable=False),
    sa.Column("audience_size", sa.Integer, nullable=False),
    # Members gone through (a listed audience: the next position) and
    # notifications written; a segment's next page token.
    sa.Column("processed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("written", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cursor", sa.String(1024), nullable=False, server_default=""),
    sa.Column("claimed_by", sa.String(64), nullable=True),
    sa.Column("lease_until", UTCDateTime, nullable=True),
    # The trace of the call that created it: its notifications join it.
    sa.Column("trace_headers", sa.JSON, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("approved_by", sa.String(100), nullable=True),
    sa.Column("approved_at", UTCDateTime, nullable=True),
    sa.Column("rejected_by", sa.String(100), nullable=True),
    sa.Column("rejected_at", UTCDateTime, nullable=True),
    sa.Column("cancelled_by", sa.String(100), nullable=True),
    sa.Column("cancelled_at", UTCDateTime, nullable=True),
    sa.Column("reason", sa.String(500), nullable=False, server_default=""),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Index("ix_sends_state", "state", "created_at"),
    sa.Index("ix_sends_created", "created_at", "send_id"),
)

send_members = sa.Table(
    "send_members",
    metadata,
    sa.Column("send_id", sa.String(40), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("member_id", sa.String(64), nullable=False),
    sa.UniqueConstraint("send_id", "member_id", name="uq_send_members_member"),
)


@dataclass(frozen=True)
class SendRecord:
    send_id: str
    trigger: str
    template: str | None
    channel: Channel | None
    segment_id: str
    segment_version: int
    criteria: str | None
    schedule_at: dt.datetime | None
    state: SendState
    approval_required: bool
    audience_size: int
    processed: int
    written: int
    cursor: str
    claimed_by: str | None
    lease_until: dt.datetime | None
    trace_headers: dict[str, str]
    created_by: str
    created_store_id: str
    created_at: dt.datetime
    approved_by: str | None
    approved_at: dt.datetime | None
    rejected_by: str | None
    rejected_at: dt.datetime | None
    cancelled_by: str | None
    cancelled_at: dt.datetime | None
    reason: str
    finished_at: dt.datetime | None

    @property
    def selecting(self) -> bool:
        """A segment's send: its members come page by page."""
        return bool(self.segment_id)


def _send(row: Any) -> SendRecord:
    m = row._mapping
    return SendRecord(
        send_id=m["send_id"],
        trigger=m["trigger"],
        template=m["template"],
        channel=Channel(m["channel"]) if m["channel"] else None,
        segment_id=m["segment_id"],
        segment_version=m["segment_version"],
        criteria=m["criteria"],
        schedule_at=m["schedule_at"],
        state=SendState(m["state"]),
        approval_required=m["approval_required"],
        audience_size=m["audience_size"],
        processed=m["processed"],
        written=m["written"],
        cursor=m["cursor"],
        claimed_by=m["claimed_by"],
        lease_until=m["lease_until"],
        trace_headers=dict(m["trace_headers"] or {}),
        created_by=m["created_by"],
        created_store_id=m["created_store_id"],
        created_at=m["created_at"],
        approved_by=m["approved_by"],
        approved_at=m["approved_at"],
        rejected_by=m["rejected_by"],
        rejected_at=m["rejected_at"],
        cancelled_by=m["cancelled_by"],
        cancelled_at=m["cancelled_at"],
        reason=m["reason"],
        finished_at=m["finished_at"],
    )


async def insert_send(session: AsyncSession, send: SendRecord, member_ids: Sequence[str]) -> None:
    await session.execute(
        sa.insert(sends).values(
            send_id=send.send_id,
            trigger=send.trigger,
            template=send.template,
            channel=send.channel.value if send.channel else None,
            segment_id=send.segment_id,
            segment_version=send.segment_version,
            criteria=send.criteria,
            schedule_at=send.schedule_at,
            state=send.state.value,
            approval_required=send.approval_required,
            audience_size=send.audience_size,
            processed=0,
            written=0,
            cursor="",
            trace_headers=send.trace_headers,
            created_by=send.created_by,
            created_store_id=send.created_store_id,
            created_at=send.created_at,
            reason="",
        )
    )
    rows = [
        {"send_id": send.send_id, "position": i, "member_id": m} for i, m in enumerate(member_ids)
    ]
    for start in range(0, len(rows), 1000):
        await session.execute(sa.insert(send_members), rows[start : start + 1000])
    if send.state == SendState.RUNNING:
        session.info[SENDS_READY] = True


async def get_send(
    session: AsyncSession, send_id: str, *, for_update: bool = False
) -> SendRecord | None:
    query = sa.select(sends).where(sends.c.send_id == send_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _send(row)


async def list_sends(
    session: AsyncSession,
    *,
    state: SendState | None,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[SendRecord]:
    c = sends.c
    query = sa.select(sends)
    if state is not None:
        query = query.where(c.state == state.value)
    if after is not None:
        at, key = after
        query = query.where(sa.or_(c.created_at < at, sa.and_(c.created_at == at, c.send_id < key)))
    query = query.order_by(c.created_at.desc(), c.send_id.desc()).limit(limit)
    return [_send(r) for r in await session.execute(query)]


async def listed_members(session: AsyncSession, send_id: str) -> list[str]:
    c = send_members.c
    rows = await session.execute(
        sa.select(c.member_id).where(c.send_id == send_id).order_by(c.position)
    )
    return [r.member_id for r in rows]


async def members_from(session: AsyncSession, send_id: str, position: int, limit: int) -> list[str]:
    c = send_members.c
    rows = await session.execute(
        sa.select(c.member_id)
        .where(c.send_id == send_id, c.position >= position)
        .order_by(c.position)
        .limit(limit)
    )
    return [r.member_id for r in rows]


async def move(
    session: AsyncSession,
    send_id: str,
    from_states: Sequence[SendState],
    to_state: SendState,
    **values: Any,
) -> bool:
    """A send from one of ``from_states`` to ``to_state`` with ``values``;
    False when it was in none of them."""
    c = sends.c
    result = await session.execute(
        sa.update(sends)
        .where(c.send_id == send_id, c.state.in_([s.value for s in from_states]))
        .values(state=to_state.value, **values)
    )
    moved = bool(getattr(result, "rowcount", 0) == 1)
    if moved and to_state == SendState.RUNNING:
        session.info[SENDS_READY] = True
    return moved


async def start_due(session: AsyncSession, now: dt.datetime) -> int:
    """Scheduled sends whose time has come start running."""
    c = sends.c
    result = await session.execute(
        sa.update(sends)
        .where(
            c.state == SendState.SCHEDULED.value,
            sa.or_(c.schedule_at.is_(None), c.schedule_at <= now),
        )
        .values(state=SendState.RUNNING.value)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def running(session: AsyncSession, now: dt.datetime, limit: int = 20) -> list[str]:
    """Running sends nobody holds (or whose holder's lease ran out)."""
    c = sends.c
    rows = await session.execute(
        sa.select(c.send_id)
        .where(
            c.state == SendState.RUNNING.value,
            sa.or_(c.lease_until.is_(None), c.lease_until <= now),
        )
        .order_by(c.created_at, c.send_id)
        .limit(limit)
    )
    return [r.send_id for r in rows]


async def claim(
    session: AsyncSession, send_id: str, worker_id: str, now: dt.datetime, lease: dt.timedelta
) -> SendRecord | None:
    """The running send, held by ``worker_id`` until ``now + lease``; None
    when it is not running or another worker holds it."""
    c = sends.c
    result = await session.execute(
        sa.update(sends)
        .where(
            c.send_id == send_id,
            c.state == SendState.RUNNING.value,
            sa.or_(c.claimed_by.is_(None), c.claimed_by == worker_id, c.lease_until <= now),
        )
        .values(claimed_by=worker_id, lease_until=now + lease)
    )
    if getattr(result, "rowcount", 0) != 1:
        return None
    return await get_send(session, send_id)


async def held(session: AsyncSession, send_id: str, worker_id: str) -> SendRecord | None:
    """The send, locked, when ``worker_id`` still holds it running."""
    send = await get_send(session, send_id, for_update=True)
    if send is None or send.state != SendState.RUNNING or send.claimed_by != worker_id:
        return None
    return send


async def advance(
    session: AsyncSession,
    send: SendRecord,
    *,
    processed: int,
    written: int,
    cursor: str,
    done: bool,
    now: dt.datetime,
    lease: dt.timedelta,
) -> None:
    """Counts a batch of a send ``held`` in this transaction."""
    c = sends.c
    values: dict[str, Any] = {
        "processed": c.processed + processed,
        "written": c.written + written,
        "cursor": cursor,
        "lease_until": now + lease,
    }
    if done:
        values.update(state=SendState.DONE.value, finished_at=now, claimed_by=None)
    await session.execute(sa.update(sends).where(c.send_id == send.send_id).values(**values))


async def withdraw_unplanned(session: AsyncSession, send_id: str) -> int:
    """The send's notifications the planner has not planned yet, deleted."""
    c = notifications.c
    result = await session.execute(
        sa.delete(notifications).where(c.send_id == send_id, c.planned_at.is_(None))
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class Progress:
    queued: int = 0
    suppressed: int = 0
    sent: int = 0
    failed: int = 0


async def progress(session: AsyncSession, send_id: str) -> Progress:
    """What became of the send's notifications: its messages by status,
    found through the notifications' trigger ids (indexed on both sides)."""
    n = notifications.c
    m = messages.c
    ids = sa.select(n.trigger_event_id).where(n.send_id == send_id)
    rows = await session.execute(
        sa.select(m.status, sa.func.count()).where(m.trigger_event_id.in_(ids)).group_by(m.status)
    )
    counts = {MessageStatus(status): int(count) for status, count in rows}
    return Progress(
        queued=counts.get(MessageStatus.QUEUED, 0),
        suppressed=counts.get(MessageStatus.SUPPRESSED, 0),
        sent=counts.get(MessageStatus.SENT, 0) + counts.get(MessageStatus.DELIVERED, 0),
        failed=counts.get(MessageStatus.FAILED, 0),
    )
