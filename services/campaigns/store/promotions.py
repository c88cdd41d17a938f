"""Promotions: one row each, the rule as a JSON document (only what its
kind uses) beside the columns queries filter on."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from chassis.paging import newest_first
from services.campaigns.domain.pricing import Promotion, PromotionKind, Scope, Stacking
from services.campaigns.store import metadata

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


async def get_promotion(
    session: AsyncSession, promotion_id: str, *, for_update: bool = False
) -> PromotionRecord | None:
    query = sa.select(promotions).where(promotions.c.promotion_id == promotion_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _record(row)


async def end_promotion(session: AsyncSession, promotion_id: str, at: dt.datetime) -> None:
    await session.execute(
        sa.update(promotions).where(promotions.c.promotion_id == promotion_id).values(ends_at=at)
    )


def _in_force(at: dt.datetime) -> Any:
    c = promotions.c
    return sa.and_(c.starts_at <= at, sa.or_(c.ends_at.is_(None), c.ends_at > at))


async def promotions_in_force(session: AsyncSession, at: dt.datetime) -> list[Promotion]:
    """Every promotion in its window at ``at``; store, region and buyer are
    the domain's to check."""
    rows = await session.execute(
        sa.select(promotions).where(_in_force(at)).order_by(promotions.c.promotion_id)
    )
    return [_promotion(row) for row in rows]


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
