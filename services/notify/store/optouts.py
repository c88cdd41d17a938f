"""Opt-outs per member and channel: where they came from (an SMS reply, an
unsubscribe link, staff) and how far they go (marketing, or everything on
the channel). Kept as a history; the same opt-out twice is one row."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from chassis.direct import Direct
from services.notify.domain.messages import Channel
from services.notify.domain.optouts import Scope, Source
from services.notify.store.base import metadata

optouts = sa.Table(
    "notify_optouts",
    metadata,
    sa.Column("optout_id", sa.String(40), primary_key=True),
    sa.Column("member_id", sa.String(16), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("source", sa.String(20), nullable=False),
    sa.Column("recorded_by", sa.String(100), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("member_id", "channel", "scope", name="uq_notify_optouts_member"),
)


@dataclass(frozen=True)
class OptOutRecord:
    optout_id: str
    member_id: str
    channel: Channel
    scope: Scope
    source: Source
    recorded_by: str
    created_at: dt.datetime


def _record(row: Any) -> OptOutRecord:
    m = row._mapping
    return OptOutRecord(
        optout_id=m["optout_id"],
        member_id=m["member_id"],
        channel=Channel(m["channel"]),
        scope=Scope(m["scope"]),
        source=Source(m["source"]),
        recorded_by=m["recorded_by"],
        created_at=m["created_at"],
    )


async def find(
    session: AsyncSession, member_id: str, channel: Channel, scope: Scope
) -> OptOutRecord | None:
    c = optouts.c
    row = (
        await session.execute(
            sa.select(optouts).where(
                c.member_id == member_id, c.channel == channel.value, c.scope == scope.value
            )
        )
    ).first()
    return None if row is None else _record(row)


async def record(
    session: AsyncSession,
    *,
    optout_id: str,
    member_id: str,
    channel: Channel,
    scope: Scope,
    source: Source,
    recorded_by: str,
    now: dt.datetime,
) -> tuple[OptOutRecord, bool]:
    """The member's opt-out of that channel and scope, and whether this call
    added it (False: it was there already and is left as it was)."""
    existing = await find(session, member_id, channel, scope)
    if existing is not None:
        return existing, False
    await session.execute(
        sa.insert(optouts).values(
            optout_id=optout_id,
            member_id=member_id,
            channel=channel.value,
            scope=scope.value,
            source=source.value,
            recorded_by=recorded_by,
            created_at=now,
        )
    )
    added = await find(session, member_id, channel, scope)
    assert added is not None
    return added, True


_OF_MEMBER = Direct(
    sa.select(optouts)
    .where(optouts.c.member_id == sa.bindparam("key_member_id"))
    .order_by(optouts.c.created_at.desc(), optouts.c.optout_id.desc())
)


async def of_member(session: AsyncSession, member_id: str) -> list[OptOutRecord]:
    """Newest first."""
    return [_record(r) for r in await _OF_MEMBER.execute(session, {"key_member_id": member_id})]


async def of_members(
    session: AsyncSession, member_ids: Collection[str]
) -> dict[str, list[OptOutRecord]]:
    """``of_member`` for many members in one statement; a member without
    opt-outs is left out."""
    found: dict[str, list[OptOutRecord]] = {}
    if not member_ids:
        return found
    rows = await session.execute(
        sa.select(optouts)
        .where(optouts.c.member_id.in_(sorted(member_ids)))
        .order_by(optouts.c.created_at.desc(), optouts.c.optout_id.desc())
    )
    for row in rows:
        found.setdefault(row.member_id, []).append(_record(row))
    return found
