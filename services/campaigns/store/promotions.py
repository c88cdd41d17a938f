"""Promotions: one row each, the rule as a JSON document (only what its
kind uses) beside the columns queries filter on."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Memo, RowByKey, UTCDateTime, utcnow
from chassis.paging import newest_first
from services.campaigns.domain.pricing import Promotion, PromotionKind, Scope, Stacking
from services.campaigns.store import SETTINGS_MEMO_SECONDS, metadata

promotions = sa.Table(
    "promotions",
    metadata,
    sa.Column("promotion_id", sa.String(16), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("starts_at", UTCDateTime, nullable=False),
    sa.Column("ends_at", UTCDateTime, nullable=True),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_promotions_window", "starts_at", "ends_at"),
    sa.Index("ix_promotions_created", "created_at", "promotion_id"),
)


def _document(p: Promotion) -> str:
    return json.dumps(
        {
            "name": p.name,
            "description": p.description,
            "currency": p.currency,
            "store_ids": sorted(p.store_ids),
            "region_ids": sorted(p.region_ids),
            "skus": sorted(p.scope.skus),
            "categories": sorted(p.scope.categories),
            "priority": p.priority,
            "stacking": p.stacking.value,
            "exclusion_group": p.exclusion_group,
            "percent_bps": p.percent_bps,
            "member_price": p.member_price,
            "threshold": p.threshold,
            "save": p.save,
            "repeating": p.repeating,
            "weekdays": sorted(p.weekdays),
            "month_days": sorted(p.month_days),
            "points_multiplier_bps": p.points_multiplier_bps,
            "time_zone": p.time_zone,
            "members_only": p.members_only,
        },
        sort_keys=True,
        ensure_ascii=False,
    )


def _promotion(row: Any) -> Promotion:
    d = json.loads(row.document)
    return Promotion(
        promotion_id=row.promotion_id,
        name=d["name"],
        kind=PromotionKind(row.kind),
        starts_at=row.starts_at,
        ends_at=row.ends_at,
        currency=d["currency"],
        store_ids=frozenset(d["store_ids"]),
        region_ids=frozenset(d["region_ids"]),
        scope=Scope(frozenset(d["skus"]), frozenset(d["categories"])),
        priority=d["priority"],
        stacking=Stacking(d["stacking"]),
        exclusion_group=d["exclusion_group"],
        percent_bps=d["percent_bps"],
        member_price=d["member_price"],
        threshold=d["threshold"],
        save=d["save"],
        repeating=d["repeating"],
        weekdays=frozenset(d["weekdays"]),
        month_days=frozenset(d["month_days"]),
        points_multiplier_bps=d["points_multiplier_bps"],
        time_zone=d["time_zone"],
        members_only=d["members_only"],
        description=d["description"],
    )


@dataclass(frozen=True)
class PromotionRecord:
    promotion: Promotion
    created_by: str
    created_store_id: str
    created_at: dt.datetime


def _record(row: Any) -> PromotionRecord:
    return PromotionRecord(_promotion(row), row.created_by, row.created_store_id, row.created_at)


async def insert_promotion(
    session: AsyncSession, p: Promotion, *, principal: str, store_id: str, now: dt.datetime
) -> None:
    _CANDIDATES_MEMO.forget(session)
    await session.execute(
        sa.insert(promotions).values(
            promotion_id=p.promotion_id,
            kind=p.kind.value,
            starts_at=p.starts_at,
            ends_at=p.ends_at,
            document=_document(p),
            created_by=principal,
            created_store_id=store_id,
            created_at=now,
        )
    )


_PROMOTION = RowByKey(promotions, "promotion_id")


async def get_promotion(
    session: AsyncSession, promotion_id: str, *, for_update: bool = False
) -> PromotionRecord | None:
    row = await _PROMOTION.first(session, promotion_id, for_update=for_update)
    return None if row is None else _record(row)


async def end_promotion(session: AsyncSession, promotion_id: str, at: dt.datetime) -> None:
    _CANDIDATES_MEMO.forget(session)
    await session.execute(
        sa.update(promotions).where(promotions.c.promotion_id == promotion_id).values(ends_at=at)
    )


def _in_force(at: Any) -> Any:
    c = promotions.c
    return sa.and_(c.starts_at <= at, sa.or_(c.ends_at.is_(None), c.ends_at > at))


# Built once (see chassis.db.RowByKey): read on every checkout.
_IN_FORCE_AT = (
    sa.select(promotions)
    .where(_in_force(sa.bindparam("at", type_=UTCDateTime)))
    .order_by(promotions.c.promotion_id)
)
_NOT_ENDED_BY = (
    sa.select(promotions)
    .where(
        sa.or_(
            promotions.c.ends_at.is_(None),
            promotions.c.ends_at > sa.bindparam("since", type_=UTCDateTime),
        )
    )
    .order_by(promotions.c.promotion_id)
)

# The candidates reach back this far before they were read: a checkout's
# time is its caller's clock, taken a moment before the call (or on another
# host), and should still find them.
CANDIDATES_REACH_BACK = dt.timedelta(minutes=15)


@dataclass(frozen=True)
class _Candidates:
    """Every promotion not ended by ``since`` (started or yet to start), in
    promotion id order: those in force at any time from ``since`` on."""

    since: dt.datetime
    promotions: tuple[Promotion, ...]


# Kept rather than the promotions in force at one instant: windows open and
# close between reads, so each call filters the candidates by its own time.
_CANDIDATES_MEMO: Memo[_Candidates] = Memo(ttl=SETTINGS_MEMO_SECONDS)


async def _candidates(session: AsyncSession, now: dt.datetime) -> _Candidates:
    since = now - CANDIDATES_REACH_BACK
    rows = await session.execute(_NOT_ENDED_BY, {"since": since})
    return _Candidates(since, tuple(_promotion(row) for row in rows))


async def promotions_in_force(session: AsyncSession, at: dt.datetime) -> list[Promotion]:
    """Every promotion in its window at ``at``; store, region and buyer are
    the domain's to check. The candidates are kept for a few seconds (see
    ``chassis.db.Memo``); a time before them (a repriced old sale) is read
    from the table."""
    kept = await _CANDIDATES_MEMO.get(session, lambda: _candidates(session, utcnow()))
    if at < kept.since:
        rows = await session.execute(_IN_FORCE_AT, {"at": at})
        return [_promotion(row) for row in rows]
    # The same window as _in_force's, checked here.
    return [p for p in kept.promotions if p.in_force(at)]


async def list_promotions(
    session: AsyncSession,
    *,
    in_force_at: dt.datetime | None,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[PromotionRecord]:
    query = sa.select(promotions)
    if in_force_at is not None:
        query = query.where(_in_force(in_force_at))
    query = newest_first(query, promotions.c.created_at, promotions.c.promotion_id, after, limit)
    return [_record(row) for row in await session.execute(query)]
