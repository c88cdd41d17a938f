"""The providers' send pace, shared by every replica: one row per rate-limited
channel holding its theoretical arrival time (``tat``, seconds since the Unix
epoch; see ``domain.delivery.SendPace``).

A reservation is one statement, atomic on SQLite and PostgreSQL alike: it
creates the row if the channel has none (two replicas creating it at once
both succeed, one inserting, the other updating what the first inserted) or
moves ``tat`` on by one interval from ``max(tat, now)``, and returns the new
``tat``. Concurrent reservations are serialised by the row's lock (SQLite's
writer lock), so each gets a slot of its own."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.direct import DialectInsert, Executor
from services.notify.store.base import metadata

send_pace = sa.Table(
    "send_pace",
    metadata,
    sa.Column("channel", sa.String(16), primary_key=True),
    # Seconds since the Unix epoch, as each replica's wall clock reads them.
    sa.Column("tat", sa.Double, nullable=False),
)


def _reservation(insert: Any) -> Any:
    now = sa.bindparam("now", type_=sa.Double)
    interval = sa.bindparam("interval", type_=sa.Double)
    return (
        insert(send_pace)
        .values(channel=sa.bindparam("channel"), tat=now + interval)
        .on_conflict_do_update(
            index_elements=[send_pace.c.channel],
            set_={"tat": sa.case((send_pace.c.tat > now, send_pace.c.tat), else_=now) + interval},
        )
        .returning(send_pace.c.tat)
    )


_RESERVE = DialectInsert(_reservation)


async def reserve_send(session: Executor, channel: str, *, now: float, interval: float) -> float:
    """Reserve the channel's next slot at ``now``; returns the new ``tat``
    (``domain.delivery.next_tat``), from which ``pace_wait`` tells how long
    to wait. Run it as a unit of work of its own (``single_statement``)
    and commit at once: the row stays locked until then, and every
    replica's sends queue behind it."""
    reserved = await _RESERVE.execute(
        session, {"channel": channel, "now": now, "interval": interval}
    )
    return float(reserved.scalar_one())


async def pace_of(session: AsyncSession, channel: str) -> float | None:
    """The channel's ``tat``, None before its first reservation."""
    result = await session.execute(sa.select(send_pace.c.tat).where(send_pace.c.channel == channel))
    value = result.scalar_one_or_none()
    return None if value is None else float(value)
