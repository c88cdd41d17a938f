"""Named member segments: their rules (members' MemberCriteria, kept as
JSON data) and a version that goes up with every change. Members evaluates
them; campaigns only keeps them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime, is_unique_violation
from services.campaigns.store import metadata

segments = sa.Table(
    "segments",
    metadata,
    sa.Column("segment_id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("criteria", sa.Text, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(100), nullable=False),
    sa.Column("updated_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class SegmentRecord:
    segment_id: str
    name: str
    # JSON of cornucopia.members.v1.MemberCriteria.
    criteria: str
    version: int
    created_by: str
    created_store_id: str
    created_at: dt.datetime
    updated_by: str
    updated_store_id: str
    updated_at: dt.datetime


class SegmentExists(Exception):
    pass


def _record(row: Any) -> SegmentRecord:
    return SegmentRecord(
        segment_id=row.segment_id,
        name=row.name,
        criteria=row.criteria,
        version=row.version,
        created_by=row.created_by,
        created_store_id=row.created_store_id,
        created_at=row.created_at,
        updated_by=row.updated_by,
        updated_store_id=row.updated_store_id,
        updated_at=row.updated_at,
    )


async def insert_segment(session: AsyncSession, segment: SegmentRecord) -> None:
    try:
        async with session.begin_nested():
            await session.execute(
                sa.insert(segments).values(
                    segment_id=segment.segment_id,
                    name=segment.name,
                    criteria=segment.criteria,
                    version=segment.version,
                    created_by=segment.created_by,
                    created_store_id=segment.created_store_id,
                    created_at=segment.created_at,
                    updated_by=segment.updated_by,
                    updated_store_id=segment.updated_store_id,
                    updated_at=segment.updated_at,
                )
            )
    except IntegrityError as exc:
        if is_unique_violation(exc):
            raise SegmentExists from exc
        raise


async def get_segment(session: AsyncSession, segment_id: str) -> SegmentRecord | None:
    row = (
        await session.execute(sa.select(segments).where(segments.c.segment_id == segment_id))
    ).first()
    return None if row is None else _record(row)


async def update_segment(
    session: AsyncSession,
    segment_id: str,
    *,
    version: int,
    name: str,
    criteria: str,
    by: str,
    store_id: str,
    at: dt.datetime,
) -> bool:
    """Replaces name and criteria if the segment is still at ``version``;
    False otherwise."""
    c = segments.c
    result = await session.execute(
        sa.update(segments)
        .where(c.segment_id == segment_id, c.version == version)
        .values(
            name=name,
            criteria=criteria,
            version=c.version + 1,
            updated_by=by,
            updated_store_id=store_id,
            updated_at=at,
        )
        .returning(c.segment_id)
    )
    return result.first() is not None


async def list_segments(session: AsyncSession, *, after: str, limit: int) -> list[SegmentRecord]:
    c = segments.c
    query = sa.select(segments)
    if after:
        query = query.where(c.segment_id > after)
    rows = await session.execute(query.order_by(c.segment_id).limit(limit))
    return [_record(row) for row in rows]
