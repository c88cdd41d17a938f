"""What a checkout reads of its buyer before anything is taken, in one
statement: what is known of the member (merged, erased), their tier, their
points account, how many of their lots are past their expiry and not yet
expired, and the points their sales earned on the business day (for the
daily cap). Each was a read and a round trip of its own on every checkout
and preview."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from chassis.db import UTCDateTime
from chassis.direct import Direct, Executor
from services.loyalty.store.members import KnownMember, MemberStatus, known_members
from services.loyalty.store.points import AccountRecord, points_accounts, points_lots
from services.loyalty.store.sales import sales
from services.loyalty.store.tiers import MemberTierRecord, member_tiers

# A sale of a business day was sold at most this long before the day began
# in UTC (no zone is more than 14 hours ahead): the bound lets the daily
# sum use the member's index on sold_at instead of all their sales.
_DAY_STARTS_AFTER_SALES = dt.timedelta(hours=15)


@dataclass(frozen=True)
class BuyerRecord:
    known: KnownMember | None
    tier: MemberTierRecord | None
    account: AccountRecord | None
    # Open lots whose expiry is at or before the moment asked about.
    lots_due: int
    earned_on_day: int


def _buyer_statement() -> sa.Select[tuple[object, ...]]:
    me = sa.select(sa.bindparam("member_id", type_=sa.String(64)).label("member_id")).subquery("me")
    k, t, a, lots = known_members.c, member_tiers.c, points_accounts.c, points_lots.c
    due = (
        sa.select(sa.func.count())
        .where(
            lots.member_id == me.c.member_id,
            lots.remaining > 0,
            lots.expires_at <= sa.bindparam("due_by", type_=UTCDateTime),
        )
        .scalar_subquery()
    )
    earned = (
        sa.select(sa.func.coalesce(sa.func.sum(sales.c.points_earned - sales.c.points_reversed), 0))
        .where(
            sales.c.member_id == me.c.member_id,
            sales.c.sold_at >= sa.bindparam("sold_since", type_=UTCDateTime),
            sales.c.business_day == sa.bindparam("day", type_=sa.Date),
        )
        .scalar_subquery()
    )
    return sa.select(
        me.c.member_id,
        k.member_id.label("known_member_id"),
        k.state,
        k.merged_into.label("known_merged_into"),
        k.as_of,
        t.member_id.label("tier_member_id"),
        t.tier_id,
        t.since,
        t.grace_until,
        a.member_id.label("account_member_id"),
        a.balance,
        a.held,
        a.lifetime_earned,
        a.opened_at,
        a.closed_at,
        a.closed_reason,
        a.merged_into.label("account_merged_into"),
        due.label("lots_due"),
        earned.label("earned_on_day"),
    ).select_from(
        me.outerjoin(known_members, k.member_id == me.c.member_id)
        .outerjoin(member_tiers, t.member_id == me.c.member_id)
        .outerjoin(points_accounts, a.member_id == me.c.member_id)
    )


_BUYER = Direct(_buyer_statement())


async def buyer(
    session: Executor, member_id: str, *, at: dt.datetime, business_day: dt.date
) -> BuyerRecord:
    """The member as a checkout at ``at`` on the store's ``business_day``
    sees them (``lots_due``: due by ``at``)."""
    day_start = dt.datetime.combine(business_day, dt.time(), dt.UTC)
    row = (
        await _BUYER.execute(
            session,
            {
                "member_id": member_id,
                "due_by": at,
                "day": business_day,
                "sold_since": day_start - _DAY_STARTS_AFTER_SALES,
            },
        )
    ).one()
    known = (
        KnownMember(member_id, MemberStatus(row.state), row.known_merged_into, row.as_of)
        if row.known_member_id is not None
        else None
    )
    tier = (
        MemberTierRecord(member_id, row.tier_id, row.since, row.grace_until)
        if row.tier_member_id is not None
        else None
    )
    account = (
        AccountRecord(
            member_id=member_id,
            balance=int(row.balance),
            held=int(row.held),
            lifetime_earned=int(row.lifetime_earned),
            opened_at=row.opened_at,
            closed_at=row.closed_at,
            closed_reason=row.closed_reason,
            merged_into=row.account_merged_into,
        )
        if row.account_member_id is not None
        else None
    )
    return BuyerRecord(known, tier, account, int(row.lots_due), int(row.earned_on_day))
