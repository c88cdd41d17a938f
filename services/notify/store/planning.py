"""What the planner asks of the notify database besides templates and
opt-outs: taking a notification for planning, the member's recent marketing
(the weekly cap), and the record of a message not sent on purpose."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.direct import Direct
from services.notify.domain.messages import Category, Channel, MessageStatus
from services.notify.store.intents import notifications
from services.notify.store.messages import insert_once, messages

# Marketing that counts against the weekly cap: on its way or gone out.
_COUNTED = (
    MessageStatus.QUEUED.value,
    MessageStatus.SENT.value,
    MessageStatus.DELIVERED.value,
)


_TAKE = Direct(
    sa.update(notifications)
    .where(
        notifications.c.notification_id == sa.bindparam("key_notification_id"),
        notifications.c.planned_at.is_(None),
    )
    .values(planned_at=sa.bindparam("planned_at"))
)


async def take_all(
    session: AsyncSession, notification_ids: Sequence[str], now: dt.datetime
) -> set[str]:
    """``take`` for a pass's notifications in one statement: the ids this
    transaction has."""
    c = notifications.c
    result = await session.execute(
        sa.update(notifications)
        .where(c.notification_id.in_(notification_ids), c.planned_at.is_(None))
        .values(planned_at=now)
        .returning(c.notification_id)
    )
    return {row.notification_id for row in result}


async def take(session: AsyncSession, notification_id: str, now: dt.datetime) -> bool:
    """Marks the notification planned unless another pass did: True when
    this transaction has it (and writes its messages). On PostgreSQL the
    update locks the row, so a second replica waits and then finds it
    planned."""
    result = await _TAKE.execute(
        session, {"key_notification_id": notification_id, "planned_at": now}
    )
    return result.rowcount == 1


async def marketing_since(session: AsyncSession, member_id: str, since: dt.datetime) -> int:
    c = messages.c
    result = await session.execute(
        sa.select(sa.func.count())
        .select_from(messages)
        .where(
            c.member_id == member_id,
            c.category == Category.MARKETING.value,
            c.status.in_(_COUNTED),
            c.created_at >= since,
        )
    )
    return int(result.scalar_one())


async def record_suppressed(
    session: AsyncSession,
    *,
    message_id: str,
    template: str,
    channel: Channel,
    locale: str,
    category: Category,
    reason: str,
    created_at: dt.datetime,
    trace_headers: dict[str, str],
    member_id: str | None = None,
    staff_id: str | None = None,
    time_zone: str = "",
    trigger_event_id: str | None = None,
) -> bool:
    """Keeps a message that was not sent on purpose, with why, so that "why
    did this member not hear from us" has an answer. Its body is left
    empty: nothing was said. Once per trigger, template and channel."""
    return await insert_once(
        session,
        {
            "message_id": message_id,
            "member_id": member_id,
            "staff_id": staff_id,
            "template": template,
            "channel": channel.value,
            "locale": locale,
            "body": "",
            "status": MessageStatus.SUPPRESSED.value,
            "status_reason": reason[:500],
            "trigger_event_id": trigger_event_id,
            "trace_headers": trace_headers,
            "created_at": created_at,
            "attempts": 0,
            "category": category.value,
            "time_zone": time_zone,
        },
    )
