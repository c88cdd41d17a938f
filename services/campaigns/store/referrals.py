"""Referral campaigns, what campaigns knows of who referred whom, and the
referrals (one per campaign and referred member: the UNIQUE key that makes
a reward happen once). Each function runs in the caller's unit of work."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import RowByKey, UTCDateTime
from services.campaigns.domain.referrals import (
    Campaign,
    ReferralState,
    RewardKind,
    Trigger,
)
from services.campaigns.store import metadata

referral_campaigns = sa.Table(
    "referral_campaigns",
    metadata,
    sa.Column("campaign_id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("reward", sa.String(8), nullable=False),
    sa.Column("template_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("points", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("start_at", UTCDateTime, nullable=False),
    sa.Column("end_at", UTCDateTime, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_referral_campaigns_trigger", "trigger", "start_at"),
)

# Who referred whom, from members' enrollment events (or asked of members
# for a member enrolled before campaigns listened), and each member's first
# sale seen: the FIRST_PURCHASE trigger.
referral_members = sa.Table(
    "referral_members",
    metadata,
    sa.Column("member_id", sa.String(16), primary_key=True),
    # "" when nobody referred the member.
    sa.Column("referrer_member_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("first_sale_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("first_sale_at", UTCDateTime, nullable=True),
)

referrals = sa.Table(
    "referrals",
    metadata,
    sa.Column("campaign_id", sa.String(40), primary_key=True),
    sa.Column("referred_member_id", sa.String(16), primary_key=True),
    sa.Column("referrer_member_id", sa.String(16), nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("trigger_reference", sa.String(64), nullable=False, server_default=""),
    sa.Column("reward", sa.String(8), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("coupon_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("points", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("skip_reason", sa.String(40), nullable=False, server_default=""),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("rewarded_at", UTCDateTime, nullable=True),
    sa.Index("ix_referrals_referrer", "referrer_member_id", "created_at"),
    sa.Index("ix_referrals_state", "state", "created_at"),
)


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


# --- campaigns -----------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignRecord:
    campaign: Campaign
    created_by: str
    created_at: dt.datetime


def _campaign(row: Any) -> CampaignRecord:
    return CampaignRecord(
        campaign=Campaign(
            campaign_id=row.campaign_id,
            name=row.name,
            trigger=Trigger(row.trigger),
            reward=RewardKind(row.reward),
            template_id=row.template_id,
            points=row.points,
            start_at=row.start_at,
            end_at=row.end_at,
        ),
        created_by=row.created_by,
        created_at=row.created_at,
    )


async def insert_campaign(
    session: AsyncSession, c: Campaign, *, created_by: str, now: dt.datetime
) -> None:
    await session.execute(
        sa.insert(referral_campaigns).values(
            campaign_id=c.campaign_id,
            name=c.name,
            trigger=c.trigger.value,
            reward=c.reward.value,
            template_id=c.template_id,
            points=c.points,
            start_at=c.start_at,
            end_at=c.end_at,
            created_by=created_by,
            created_at=now,
        )
    )


async def get_campaign(session: AsyncSession, campaign_id: str) -> CampaignRecord | None:
    c = referral_campaigns.c
    row = (
        await session.execute(sa.select(referral_campaigns).where(c.campaign_id == campaign_id))
    ).first()
    return None if row is None else _campaign(row)


async def list_campaigns(session: AsyncSession, *, after: str, limit: int) -> list[CampaignRecord]:
    c = referral_campaigns.c
    rows = await session.execute(
        sa.select(referral_campaigns)
        .where(c.campaign_id > after)
        .order_by(c.campaign_id)
        .limit(limit)
    )
    return [_campaign(row) for row in rows]


async def campaigns_covering(
    session: AsyncSession, trigger: Trigger, at: dt.datetime
) -> list[Campaign]:
    c = referral_campaigns.c
    rows = await session.execute(
        sa.select(referral_campaigns)
        .where(c.trigger == trigger.value, c.start_at <= at, c.end_at > at)
        .order_by(c.campaign_id)
    )
    return [_campaign(row).campaign for row in rows]


# --- who referred whom -----------------------------------------------------------------


@dataclass(frozen=True)
class KnownMember:
    member_id: str
    referrer_member_id: str
    first_sale_id: str


async def note_member(session: AsyncSession, member_id: str, referrer_member_id: str) -> bool:
    """Keeps who referred the member; the first word stays. True when this
    call kept it (the member was not known)."""
    m = referral_members.c
    result = await session.execute(
        _insert(session)(referral_members)
        .values(member_id=member_id, referrer_member_id=referrer_member_id)
        .on_conflict_do_nothing(index_elements=[m.member_id])
        .returning(m.member_id)
    )
    return result.first() is not None


_MEMBER = RowByKey(referral_members, "member_id")


async def get_member(session: AsyncSession, member_id: str) -> KnownMember | None:
    row = await _MEMBER.first(session, member_id)
    if row is None:
        return None
    return KnownMember(row.member_id, row.referrer_member_id, row.first_sale_id)


# Built once (see chassis.db.RowByKey): tried on every sale of a referred member.
_TAKE_FIRST_SALE = (
    sa.update(referral_members)
    .where(
        referral_members.c.member_id == sa.bindparam("key_member_id"),
        sa.or_(
            referral_members.c.first_sale_id == "",
            referral_members.c.first_sale_id == sa.bindparam("sale_id"),
        ),
    )
    .values(
        first_sale_id=sa.bindparam("sale_id"), first_sale_at=sa.bindparam("at", type_=UTCDateTime)
    )
    .returning(referral_members.c.member_id)
)


async def take_first_sale(
    session: AsyncSession, member_id: str, sale_id: str, at: dt.datetime
) -> bool:
    """True for the member's first sale seen (and again for a redelivery of
    that same sale, which the referrals' UNIQUE key then absorbs)."""
    result = await session.execute(
        _TAKE_FIRST_SALE, {"key_member_id": member_id, "sale_id": sale_id, "at": at}
    )
    return result.first() is not None


# --- referrals --------------------------------------------------------------------------


@dataclass(frozen=True)
class Referral:
    campaign_id: str
    referred_member_id: str
    referrer_member_id: str
    trigger: Trigger
    trigger_reference: str
    reward: RewardKind
    state: ReferralState
    coupon_id: str
    points: int
    skip_reason: str
    attempts: int
    created_at: dt.datetime
    rewarded_at: dt.datetime | None


def _referral(row: Any) -> Referral:
    return Referral(
        campaign_id=row.campaign_id,
        referred_member_id=row.referred_member_id,
        referrer_member_id=row.referrer_member_id,
        trigger=Trigger(row.trigger),
        trigger_reference=row.trigger_reference,
        reward=RewardKind(row.reward),
        state=ReferralState(row.state),
        coupon_id=row.coupon_id,
        points=row.points,
        skip_reason=row.skip_reason,
        attempts=row.attempts,
        created_at=row.created_at,
        rewarded_at=row.rewarded_at,
    )


async def insert_referral(
    session: AsyncSession,
    campaign: Campaign,
    *,
    referrer_member_id: str,
    referred_member_id: str,
    trigger_reference: str,
    now: dt.datetime,
) -> bool:
    """The referral, PENDING, once per (campaign, referred member): False
    when it exists (a redelivery, a second sale)."""
    r = referrals.c
    result = await session.execute(
        _insert(session)(referrals)
        .values(
            campaign_id=campaign.campaign_id,
            referred_member_id=referred_member_id,
            referrer_member_id=referrer_member_id,
            trigger=campaign.trigger.value,
            trigger_reference=trigger_reference[:64],
            reward=campaign.reward.value,
            state=ReferralState.PENDING.value,
            points=campaign.points,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=[r.campaign_id, r.referred_member_id])
        .returning(r.campaign_id)
    )
    return result.first() is not None


async def get_referral(
    session: AsyncSession, campaign_id: str, referred_member_id: str, *, for_update: bool = False
) -> Referral | None:
    r = referrals.c
    query = sa.select(referrals).where(
        r.campaign_id == campaign_id, r.referred_member_id == referred_member_id
    )
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _referral(row)


async def settle_referral(
    session: AsyncSession,
    campaign_id: str,
    referred_member_id: str,
    *,
    state: ReferralState,
    at: dt.datetime,
    coupon_id: str = "",
    skip_reason: str = "",
) -> bool:
    """PENDING to REWARDED or SKIPPED, once."""
    r = referrals.c
    result = await session.execute(
        sa.update(referrals)
        .where(
            r.campaign_id == campaign_id,
            r.referred_member_id == referred_member_id,
            r.state == ReferralState.PENDING.value,
        )
        .values(
            state=state.value,
            coupon_id=coupon_id,
            skip_reason=skip_reason,
            rewarded_at=at if state == ReferralState.REWARDED else None,
        )
        .returning(r.campaign_id)
    )
    return result.first() is not None


async def note_attempt(session: AsyncSession, campaign_id: str, referred_member_id: str) -> None:
    r = referrals.c
    await session.execute(
        sa.update(referrals)
        .where(r.campaign_id == campaign_id, r.referred_member_id == referred_member_id)
        .values(attempts=r.attempts + 1)
    )


async def pending_points(session: AsyncSession, limit: int) -> list[Referral]:
    r = referrals.c
    rows = await session.execute(
        sa.select(referrals)
        .where(r.state == ReferralState.PENDING.value, r.reward == RewardKind.POINTS.value)
        .order_by(r.created_at)
        .limit(limit)
    )
    return [_referral(row) for row in rows]


async def referrals_of(
    session: AsyncSession,
    referrer_member_id: str,
    *,
    after: tuple[dt.datetime, str, str] | None,
    limit: int,
) -> list[Referral]:
    """The member's referrals, newest first."""
    r = referrals.c
    query = sa.select(referrals).where(r.referrer_member_id == referrer_member_id)
    if after is not None:
        at, campaign_id, referred = after
        query = query.where(
            sa.or_(
                r.created_at < at,
                sa.and_(
                    r.created_at == at,
                    sa.tuple_(r.campaign_id, r.referred_member_id) < (campaign_id, referred),
                ),
            )
        )
    rows = await session.execute(
        query.order_by(
            r.created_at.desc(), r.campaign_id.desc(), r.referred_member_id.desc()
        ).limit(limit)
    )
    return [_referral(row) for row in rows]
