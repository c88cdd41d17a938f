"""Notifications wanted, not yet planned into messages.

Whatever calls for a message (an event, a schedule, a direct send) writes a
notification here, in its own transaction and without any other I/O: which
trigger, for whom, with which values. The planner then looks the recipient
up (language, consent, home store), applies the policy and the template,
and turns each into queued or suppressed messages. An event delivered twice
writes one notification: ``dedup_key`` is unique."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from chassis.direct import DialectInsert, Direct, Executor
from services.notify.domain import Category, Channel
from services.notify.store.base import metadata

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("notification_id", sa.String(40), primary_key=True),
    # e.g. the triggering event's id, "birthday:M7Q2K9X4TD:2026", or a
    # direct send's id and the member's: the same key is one notification.
    sa.Column("dedup_key", sa.String(120), nullable=False, unique=True),
    # The trigger's name in the catalogue, e.g. "welcome", "birthday".
    sa.Column("trigger", sa.String(64), nullable=False),
    sa.Column("member_id", sa.String(16), nullable=True),
    sa.Column("staff_id", sa.String(16), nullable=True),
    sa.Column("category", sa.String(16), nullable=False),
    # The values the trigger gives its template (JSON object of strings).
    # No personal values: the planner fetches those when it renders.
    sa.Column("variables", sa.Text, nullable=False),
    # Only this channel, when the sender chose one (direct sends may).
    sa.Column("channel", sa.String(16), nullable=True),
    # A named template instead of the trigger's own (direct sends).
    sa.Column("template", sa.String(64), nullable=True),
    # The direct send it belongs to, if any.
    sa.Column("send_id", sa.String(40), nullable=True),
    sa.Column("not_before", UTCDateTime, nullable=True),
    sa.Column("trigger_event_id", sa.String(64), nullable=True),
    sa.Column("trace_headers", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Set when planned (into messages, or suppressed); NULL while pending.
    sa.Column("planned_at", UTCDateTime, nullable=True),
    # Planning attempts that failed (members unreachable...), and the last
    # error; retried with a growing delay from ``next_attempt_at``.
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UTCDateTime, nullable=True),
    sa.Column("last_error", sa.String(500), nullable=True),
    sa.CheckConstraint(
        "(member_id IS NULL) <> (staff_id IS NULL)", name="ck_notifications_one_recipient"
    ),
    sa.Index("ix_notifications_pending", "planned_at", "created_at"),
    sa.Index("ix_notifications_send", "send_id"),
)

# Notifications due later (a birthday greeting written a month ahead) are
# planned only this close to their time, so that consent, opt-outs and the
# weekly cap are those of the day, not of the day they were written.
PLAN_AHEAD = dt.timedelta(hours=1)

# Marks a transaction that added notifications, to wake the planner on commit.
NOTIFICATIONS_ADDED = "cornucopia.notify.notifications_added"


@dataclass(frozen=True)
class Notification:
    notification_id: str
    dedup_key: str
    trigger: str
    member_id: str | None
    staff_id: str | None
    category: Category
    variables: dict[str, str]
    channel: Channel | None
    template: str | None
    send_id: str | None
    not_before: dt.datetime | None
    trigger_event_id: str | None
    trace_headers: dict[str, str]
    created_at: dt.datetime
    attempts: int


def _notification(row: Any) -> Notification:
    m = row._mapping
    return Notification(
        notification_id=m["notification_id"],
        dedup_key=m["dedup_key"],
        trigger=m["trigger"],
        member_id=m["member_id"],
        staff_id=m["staff_id"],
        category=Category(m["category"]),
        variables=json.loads(m["variables"]),
        channel=Channel(m["channel"]) if m["channel"] else None,
        template=m["template"],
        send_id=m["send_id"],
        not_before=m["not_before"],
        trigger_event_id=m["trigger_event_id"],
        trace_headers=dict(m["trace_headers"] or {}),
        created_at=m["created_at"],
        attempts=m["attempts"],
    )


# An INSERT that leaves a notification with the same ``dedup_key`` alone,
# and says whether it wrote one: one statement, where a read first would be
# two (and a race between them an error).
_ADD = DialectInsert(
    lambda insert: (
        insert(notifications)
        .on_conflict_do_nothing(index_elements=[notifications.c.dedup_key])
        .returning(notifications.c.notification_id)
    )
)
_c = notifications.c
_PENDING = Direct(
    sa.select(notifications)
    .where(
        _c.planned_at.is_(None),
        sa.or_(_c.next_attempt_at.is_(None), _c.next_attempt_at <= sa.bindparam("now")),
        sa.or_(_c.not_before.is_(None), _c.not_before <= sa.bindparam("plan_until")),
    )
    .order_by(_c.created_at, _c.notification_id)
    .limit(sa.bindparam("batch"))
)


async def add_notification(
    session: Executor,
    *,
    notification_id: str,
    dedup_key: str,
    trigger: str,
    category: Category,
    variables: Mapping[str, str],
    created_at: dt.datetime,
    trace_headers: dict[str, str],
    member_id: str | None = None,
    staff_id: str | None = None,
    channel: Channel | None = None,
    template: str | None = None,
    send_id: str | None = None,
    not_before: dt.datetime | None = None,
    trigger_event_id: str | None = None,
) -> bool:
    """Add a notification unless one with the same ``dedup_key`` exists.
    True when added."""
    if (member_id is None) == (staff_id is None):
        raise ValueError("a notification goes to one member or one staff member")
    added = await _ADD.execute(
        session,
        {
            "notification_id": notification_id,
            "dedup_key": dedup_key,
            "trigger": trigger,
            "member_id": member_id,
            "staff_id": staff_id,
            "category": category.value,
            "variables": json.dumps(dict(variables), ensure_ascii=False, sort_keys=True),
            "channel": channel.value if channel else None,
            "template": template,
            "send_id": send_id,
            "not_before": not_before,
            "trigger_event_id": trigger_event_id,
            "trace_headers": trace_headers,
            "created_at": created_at,
            "attempts": 0,
        },
    )
    if added.first() is None:
        return False
    session.info[NOTIFICATIONS_ADDED] = True
    return True


async def pending(session: AsyncSession, *, now: dt.datetime, limit: int) -> list[Notification]:
    """Notifications due for planning (see ``PLAN_AHEAD``), oldest first."""
    rows = await _PENDING.execute(
        session, {"now": now, "plan_until": now + PLAN_AHEAD, "batch": limit}
    )
    return [_notification(r) for r in rows]


async def mark_planned(
    session: AsyncSession, notification_ids: Sequence[str], now: dt.datetime
) -> None:
    if notification_ids:
        c = notifications.c
        await session.execute(
            sa.update(notifications)
            .where(c.notification_id.in_(list(notification_ids)), c.planned_at.is_(None))
            .values(planned_at=now)
        )


async def mark_planning_failed(
    session: AsyncSession, notification_id: str, error: str, retry_at: dt.datetime
) -> None:
    c = notifications.c
    await session.execute(
        sa.update(notifications)
        .where(c.notification_id == notification_id)
        .values(attempts=c.attempts + 1, last_error=error[:500], next_attempt_at=retry_at)
    )
