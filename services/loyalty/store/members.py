"""What the loyalty service keeps of the members service's facts: whether
a member exists, is active or archived, was merged (into whom) or erased.
Filled from members' events (services/loyalty/consumers.py); never read
from members' tables."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import RowByKey, UTCDateTime
from chassis.direct import Executor
from services.loyalty.store import metadata

known_members = sa.Table(
    "known_members",
    metadata,
    sa.Column("member_id", sa.String(32), primary_key=True),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("merged_into", sa.String(32), nullable=False, server_default=""),
    # When the fact held: an older fact arriving late changes nothing.
    sa.Column("as_of", UTCDateTime, nullable=False),
)


class MemberStatus(enum.StrEnum):
    ACTIVE = "active"
    ARCHIVED = "archived"
    MERGED = "merged"
    ERASED = "erased"


# A merge or an erasure is never undone.
FINAL = frozenset({MemberStatus.MERGED, MemberStatus.ERASED})


@dataclass(frozen=True)
class KnownMember:
    member_id: str
    status: MemberStatus
    merged_into: str
    as_of: dt.datetime


_MEMBER = RowByKey(known_members, "member_id")


async def get_member(session: Executor, member_id: str) -> KnownMember | None:
    row = await _MEMBER.first(session, member_id)
    if row is None:
        return None
    return KnownMember(row.member_id, MemberStatus(row.state), row.merged_into, row.as_of)


async def note_member(
    session: AsyncSession,
    member_id: str,
    status: MemberStatus,
    as_of: dt.datetime,
    *,
    merged_into: str = "",
) -> bool:
    """Records what is known of a member unless something newer (or final)
    is known already. Returns whether it changed anything."""
    current = await get_member(session, member_id)
    if current is None:
        insert = (
            postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        )
        result = await session.execute(
            insert(known_members)
            .values(member_id=member_id, state=status.value, merged_into=merged_into, as_of=as_of)
            .on_conflict_do_nothing(index_elements=["member_id"])
        )
        if getattr(result, "rowcount", 0) == 1:
            return True
        current = await get_member(session, member_id)
        if current is None:
            return False
    if current.status in FINAL or (current.as_of > as_of and status not in FINAL):
        return False
    await session.execute(
        sa.update(known_members)
        .where(known_members.c.member_id == member_id)
        .values(state=status.value, merged_into=merged_into, as_of=as_of)
    )
    return True


async def survivor_of(session: Executor, member_id: str) -> str:
    """The member a possibly merged member id now stands for."""
    for _ in range(5):
        known = await get_member(session, member_id)
        if known is None or known.status != MemberStatus.MERGED or not known.merged_into:
            break
        member_id = known.merged_into
    return member_id
