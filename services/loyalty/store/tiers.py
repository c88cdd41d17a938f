"""Tiers: the ladder (one row, a JSON document with an etag), each member's
tier and grace period, the qualifying activity (spend per sale and
refund), the history of changes and the review periods done."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import BigIntKey, Memo, RowByKey, UTCDateTime
from chassis.direct import DialectInsert, Direct, Executor, dialect_name
from chassis.documents import default_etag, document_table, read_document, write_document
from services.loyalty.domain.tiers import (
    HistoryKind,
    Ladder,
    Qualification,
    ReviewPeriod,
    Standing,
    Tier,
    default_ladder,
    standing_of,
)
from services.loyalty.store import SETTINGS_MEMO_SECONDS, metadata

_LADDER_KEY = {"ladder_id": 1}
SALE = "sale"
REFUND = "refund"

tier_ladder = document_table("tier_ladder", metadata, "ladder_id", autoincrement=False)

member_tiers = sa.Table(
    "member_tiers",
    metadata,
    sa.Column("member_id", sa.String(64), primary_key=True),
    sa.Column("tier_id", sa.String(32), nullable=False),
    # When the member reached the tier; null until the first change.
    sa.Column("since", UTCDateTime, nullable=True),
    # Set while the member is in a grace period.
    sa.Column("grace_until", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_member_tiers_grace_until", "grace_until"),
)

tier_activity = sa.Table(
    "tier_activity",
    metadata,
    # (sale, sale id) or (refund, refund id): each counted once.
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("reference", sa.String(64), primary_key=True),
    sa.Column("sale_id", sa.String(64), nullable=False),
    sa.Column("member_id", sa.String(64), nullable=False),
    # The sale's business day (a refund counts on its sale's day).
    sa.Column("business_day", sa.Date, nullable=False),
    # Negative for a refund.
    sa.Column("spend_minor_units", sa.BigInteger, nullable=False),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
    sa.Index("ix_tier_activity_member_day", "member_id", "business_day"),
    sa.Index("ix_tier_activity_sale", "sale_id"),
)

tier_history = sa.Table(
    "tier_history",
    metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("member_id", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("from_tier_id", sa.String(32), nullable=False),
    sa.Column("to_tier_id", sa.String(32), nullable=False),
    sa.Column("reason", sa.String(200), nullable=False, server_default=""),
    sa.Column("sale_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("period", sa.String(16), nullable=False, server_default=""),
    sa.Column("grace_until", UTCDateTime, nullable=True),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Index("ix_tier_history_member", "member_id", "seq"),
)

tier_reviews = sa.Table(
    "tier_reviews",
    metadata,
    sa.Column("period", sa.String(16), primary_key=True),
    sa.Column("period_end", UTCDateTime, nullable=False),
    # The time the review stands at (grace periods count from it).
    sa.Column("as_of", UTCDateTime, nullable=False),
    sa.Column("state", sa.String(8), nullable=False),
    # The last member reviewed: a review taken over resumes after it.
    sa.Column("cursor", sa.String(64), nullable=False, server_default=""),
    sa.Column("claimed_by", sa.String(64), nullable=False),
    sa.Column("lease_until", UTCDateTime, nullable=False),
    sa.Column("members_reviewed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("entered_grace", sa.Integer, nullable=False, server_default="0"),
    sa.Column("left_grace", sa.Integer, nullable=False, server_default="0"),
    sa.Column("downgraded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("requested_by", sa.String(100), nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
)


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


# --- the ladder -----------------------------------------------------------------------


def ladder_document(ladder: Ladder) -> dict[str, Any]:
    return {
        "currency": ladder.currency,
        "window_days": ladder.window_days,
        "review_period": ladder.review_period.value,
        "time_zone": ladder.time_zone,
        "grace_days": ladder.grace_days,
        "tiers": [
            {
                "tier_id": tier.tier_id,
                "name": tier.name,
                "rank": tier.rank,
                "min_spend": tier.min_spend,
                "min_visits": tier.min_visits,
                "qualification": tier.qualification.value,
                "discount_bps": tier.discount_bps,
                "points_multiplier_bps": tier.points_multiplier_bps,
            }
            for tier in ladder.tiers
        ],
    }


def ladder_from_document(doc: dict[str, Any]) -> Ladder:
    return Ladder(
        currency=doc["currency"],
        window_days=doc["window_days"],
        review_period=ReviewPeriod(doc["review_period"]),
        time_zone=doc["time_zone"],
        grace_days=doc["grace_days"],
        tiers=tuple(
            Tier(
                tier_id=t["tier_id"],
                name=t["name"],
                rank=t["rank"],
                min_spend=t["min_spend"],
                min_visits=t["min_visits"],
                qualification=Qualification(t["qualification"]),
                discount_bps=t["discount_bps"],
                points_multiplier_bps=t["points_multiplier_bps"],
            )
            for t in doc["tiers"]
        ),
    )


@dataclass(frozen=True)
class LadderRecord:
    ladder: Ladder
    etag: str
    updated_by: str
    updated_store_id: str
    updated_at: dt.datetime | None


# The ladder as every sale reads it (``current_ladder``).
_LADDER_MEMO: Memo[LadderRecord] = Memo(ttl=SETTINGS_MEMO_SECONDS)


async def current_ladder(session: Executor) -> LadderRecord:
    """The ladder, as kept for a few seconds (see ``chassis.db.Memo``)."""
    return await _LADDER_MEMO.get(session, lambda: get_ladder(session))


async def get_ladder(session: Executor, *, for_update: bool = False) -> LadderRecord:
    """The chain's ladder; the default one until HQ sets its own."""
    stored = await read_document(session, tier_ladder, _LADDER_KEY, for_update=for_update)
    if stored is None:
        return LadderRecord(
            default_ladder(), default_etag(ladder_document(default_ladder())), "", "", None
        )
    return LadderRecord(
        ladder_from_document(stored.document),
        stored.etag,
        stored.updated_by,
        stored.updated_store_id,
        stored.updated_at,
    )


async def save_ladder(
    session: AsyncSession, ladder: Ladder, *, principal: str, store_id: str, now: dt.datetime
) -> None:
    _LADDER_MEMO.forget(session)
    await write_document(
        session,
        tier_ladder,
        _LADDER_KEY,
        ladder_document(ladder),
        principal=principal,
        store_id=store_id,
        now=now,
        ensure_ascii=False,
    )


async def tier_held_outside(session: AsyncSession, tier_ids: Sequence[str]) -> str | None:
    """A tier some member holds that is not in ``tier_ids``, if any."""
    c = member_tiers.c
    row = (
        await session.execute(sa.select(c.tier_id).where(c.tier_id.not_in(list(tier_ids))).limit(1))
    ).first()
    return None if row is None else str(row.tier_id)


async def any_activity(session: AsyncSession) -> bool:
    row = (await session.execute(sa.select(tier_activity.c.reference).limit(1))).first()
    return row is not None


# --- members ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberTierRecord:
    member_id: str
    tier_id: str
    since: dt.datetime | None
    grace_until: dt.datetime | None


def _member(row: Any) -> MemberTierRecord:
    return MemberTierRecord(row.member_id, row.tier_id, row.since, row.grace_until)


_MEMBER = RowByKey(member_tiers, "member_id")


async def get_member(
    session: Executor, member_id: str, *, for_update: bool = False
) -> MemberTierRecord | None:
    row = await _MEMBER.first(session, member_id, for_update=for_update)
    return None if row is None else _member(row)


_ADD_MEMBER = DialectInsert(
    lambda insert: insert(member_tiers).on_conflict_do_nothing(index_elements=["member_id"])
)
# Sets the columns it is given (``update_member``).
_UPDATE_MEMBER = Direct(
    sa.update(member_tiers).where(member_tiers.c.member_id == sa.bindparam("key_member_id"))
)


async def locked_member(
    session: Executor, member_id: str, lowest_tier_id: str, now: dt.datetime
) -> MemberTierRecord:
    """The member's row, created at the lowest tier if missing, locked
    until the transaction ends: one member's tier changes happen one at a
    time (on PostgreSQL; SQLite serialises all writers)."""
    found = await get_member(session, member_id, for_update=True)
    if found is not None:
        return found
    await _ADD_MEMBER.execute(
        session, {"member_id": member_id, "tier_id": lowest_tier_id, "updated_at": now}
    )
    found = await get_member(session, member_id, for_update=True)
    assert found is not None  # inserted just now if it was missing
    return found


async def update_member(
    session: Executor,
    member_id: str,
    *,
    now: dt.datetime,
    **values: Any,
) -> None:
    """Sets ``tier_id``, ``since`` and/or ``grace_until``."""
    await _UPDATE_MEMBER.execute(session, {"key_member_id": member_id, "updated_at": now, **values})


async def members_to_review(
    session: AsyncSession, *, after: str, lowest_tier_id: str, limit: int
) -> list[MemberTierRecord]:
    """Members above the lowest tier or in grace, by member id after
    ``after``, locked."""
    c = member_tiers.c
    rows = await session.execute(
        sa.select(member_tiers)
        .where(
            c.member_id > after,
            sa.or_(c.tier_id != lowest_tier_id, c.grace_until.is_not(None)),
        )
        .order_by(c.member_id)
        .limit(limit)
        .with_for_update()
    )
    return [_member(row) for row in rows]


async def graces_due(session: AsyncSession, at: dt.datetime, limit: int) -> list[MemberTierRecord]:
    """Members whose grace period ended at or before ``at``, locked in
    member id order as the review's batches lock them, so that the two
    running at once cannot deadlock."""
    c = member_tiers.c
    rows = await session.execute(
        sa.select(member_tiers)
        .where(c.grace_until.is_not(None), c.grace_until <= at)
        .order_by(c.member_id)
        .limit(limit)
        .with_for_update()
    )
    return [_member(row) for row in rows]


# --- activity ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivityRecord:
    kind: str
    reference: str
    sale_id: str
    member_id: str
    business_day: dt.date
    spend_minor_units: int


_ACTIVITY = RowByKey(tier_activity, "kind", "reference")


async def get_activity(session: Executor, kind: str, reference: str) -> ActivityRecord | None:
    row = await _ACTIVITY.first(session, kind, reference)
    if row is None:
        return None
    return ActivityRecord(
        row.kind, row.reference, row.sale_id, row.member_id, row.business_day, row.spend_minor_units
    )


async def refunded_of_sale(session: AsyncSession, sale_id: str) -> int:
    """What the refunds of a sale took back so far (positive)."""
    c = tier_activity.c
    total = (
        await session.execute(
            sa.select(sa.func.coalesce(sa.func.sum(c.spend_minor_units), 0)).where(
                c.kind == REFUND, c.sale_id == sale_id
            )
        )
    ).scalar()
    return -int(total or 0)


_INSERT_ACTIVITY = Direct(sa.insert(tier_activity))


@dataclass(frozen=True)
class Activity:
    """What a sale (or a refund, negative) counts towards a member's tier,
    on the sale's business day; keyed by (kind, reference)."""

    kind: str
    reference: str
    sale_id: str
    member_id: str
    business_day: dt.date
    spend_minor_units: int

    def row(self, now: dt.datetime) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"recorded_at": now}


async def insert_activity(session: Executor, activity: Activity, now: dt.datetime) -> None:
    await _INSERT_ACTIVITY.execute(session, activity.row(now))


async def insert_activity_with_standing(
    session: Executor,
    activity: Activity,
    now: dt.datetime,
    *,
    first_day: dt.date,
    last_day: dt.date,
) -> Standing:
    """``insert_activity``, then the member's ``standing`` over the days
    from ``first_day`` to ``last_day`` with it counted: one statement on
    PostgreSQL, two on SQLite (whose statements cannot hold an insert)."""
    if dialect_name(session) != "postgresql":
        await insert_activity(session, activity, now)
        return await standing(session, activity.member_id, first_day, last_day)
    days = {"first_day": first_day, "last_day": last_day}
    rows = await _RECORDED_STANDING.execute(session, activity.row(now) | days)
    return standing_of([int(r.total) for r in rows])


async def standings(
    session: AsyncSession, member_ids: Sequence[str], first_day: dt.date, last_day: dt.date
) -> dict[str, Standing]:
    """Each member's spend and visits over the days from ``first_day`` to
    ``last_day``."""
    if not member_ids:
        return {}
    c = tier_activity.c
    rows = await session.execute(
        sa.select(c.member_id, c.business_day, sa.func.sum(c.spend_minor_units).label("total"))
        .where(
            c.member_id.in_(list(member_ids)),
            c.business_day >= first_day,
            c.business_day <= last_day,
        )
        .group_by(c.member_id, c.business_day)
    )
    days: dict[str, list[int]] = {member_id: [] for member_id in member_ids}
    for row in rows:
        days[row.member_id].append(int(row.total))
    return {member_id: standing_of(totals) for member_id, totals in days.items()}


def _standing_statement() -> Any:
    c = tier_activity.c
    return (
        sa.select(sa.func.sum(c.spend_minor_units).label("total"))
        .where(
            c.member_id == sa.bindparam("key_member_id"),
            c.business_day >= sa.bindparam("first_day", type_=c.business_day.type),
            c.business_day <= sa.bindparam("last_day", type_=c.business_day.type),
        )
        .group_by(c.business_day)
    )


# One member's days, built once (the checkout asks it at every sale).
_STANDING = Direct(_standing_statement())


_ACTIVITY_COLUMNS = (
    "kind",
    "reference",
    "sale_id",
    "member_id",
    "business_day",
    "spend_minor_units",
    "recorded_at",
)


def _recorded_standing_statement() -> Any:
    """On PostgreSQL, a sale's activity inserted and the member's days read
    with it in one statement: the read does not see the row its own insert
    writes (one snapshot), so the row comes in through ``RETURNING``."""
    c = tier_activity.c
    first_day = sa.bindparam("first_day", type_=c.business_day.type)
    last_day = sa.bindparam("last_day", type_=c.business_day.type)
    recorded = (
        sa.insert(tier_activity)
        .values({name: sa.bindparam(name, type_=c[name].type) for name in _ACTIVITY_COLUMNS})
        .returning(c.business_day, c.spend_minor_units)
        .cte("recorded")
    )
    days = sa.union_all(
        sa.select(c.business_day, c.spend_minor_units).where(
            c.member_id == sa.bindparam("member_id"),
            c.business_day >= first_day,
            c.business_day <= last_day,
        ),
        sa.select(recorded.c.business_day, recorded.c.spend_minor_units).where(
            recorded.c.business_day >= first_day, recorded.c.business_day <= last_day
        ),
    ).subquery("days")
    return sa.select(sa.func.sum(days.c.spend_minor_units).label("total")).group_by(
        days.c.business_day
    )


_RECORDED_STANDING = Direct(_recorded_standing_statement())


async def standing(
    session: Executor, member_id: str, first_day: dt.date, last_day: dt.date
) -> Standing:
    """``standings`` of one member."""
    rows = await _STANDING.execute(
        session, {"key_member_id": member_id, "first_day": first_day, "last_day": last_day}
    )
    return standing_of([int(row.total) for row in rows])


# --- history -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryRecord:
    seq: int
    member_id: str
    kind: HistoryKind
    from_tier_id: str
    to_tier_id: str
    reason: str
    sale_id: str
    period: str
    grace_until: dt.datetime | None
    principal: str
    store_id: str
    at: dt.datetime


_ADD_HISTORY = Direct(sa.insert(tier_history))


async def add_history(
    session: Executor,
    member_id: str,
    kind: HistoryKind,
    *,
    from_tier_id: str,
    to_tier_id: str,
    reason: str,
    principal: str,
    store_id: str,
    at: dt.datetime,
    sale_id: str = "",
    period: str = "",
    grace_until: dt.datetime | None = None,
) -> None:
    await _ADD_HISTORY.execute(
        session,
        {
            "member_id": member_id,
            "kind": kind.value,
            "from_tier_id": from_tier_id,
            "to_tier_id": to_tier_id,
            "reason": reason[:200],
            "sale_id": sale_id,
            "period": period,
            "grace_until": grace_until,
            "principal": principal,
            "store_id": store_id,
            "at": at,
        },
    )


def _history(row: Any) -> HistoryRecord:
    return HistoryRecord(
        seq=row.seq,
        member_id=row.member_id,
        kind=HistoryKind(row.kind),
        from_tier_id=row.from_tier_id,
        to_tier_id=row.to_tier_id,
        reason=row.reason,
        sale_id=row.sale_id,
        period=row.period,
        grace_until=row.grace_until,
        principal=row.principal,
        store_id=row.store_id,
        at=row.at,
    )


async def list_history(
    session: AsyncSession, member_id: str, *, before_seq: int | None, limit: int
) -> list[HistoryRecord]:
    """Newest first."""
    c = tier_history.c
    query = sa.select(tier_history).where(c.member_id == member_id)
    if before_seq is not None:
        query = query.where(c.seq < before_seq)
    rows = await session.execute(query.order_by(c.seq.desc()).limit(limit))
    return [_history(row) for row in rows]


_UPGRADE_BY_SALE = Direct(
    sa.select(tier_history)
    .where(
        tier_history.c.sale_id == sa.bindparam("sale_id"),
        tier_history.c.kind == HistoryKind.UPGRADED.value,
    )
    .limit(1)
)


async def upgrade_by_sale(session: Executor, sale_id: str) -> HistoryRecord | None:
    row = (await _UPGRADE_BY_SALE.execute(session, {"sale_id": sale_id})).first()
    return None if row is None else _history(row)


# --- reviews ---------------------------------------------------------------------------------

RUNNING = "running"
DONE = "done"


@dataclass(frozen=True)
class ReviewRecord:
    period: str
    period_end: dt.datetime
    as_of: dt.datetime
    state: str
    cursor: str
    claimed_by: str
    lease_until: dt.datetime
    members_reviewed: int
    entered_grace: int
    left_grace: int
    downgraded: int
    requested_by: str


def _review(row: Any) -> ReviewRecord:
    return ReviewRecord(
        row.period,
        row.period_end,
        row.as_of,
        row.state,
        row.cursor,
        row.claimed_by,
        row.lease_until,
        row.members_reviewed,
        row.entered_grace,
        row.left_grace,
        row.downgraded,
        row.requested_by,
    )


async def get_review(
    session: AsyncSession, period: str, *, for_update: bool = False
) -> ReviewRecord | None:
    query = sa.select(tier_reviews).where(tier_reviews.c.period == period)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _review(row)


async def start_review(
    session: AsyncSession,
    period: str,
    *,
    period_end: dt.datetime,
    as_of: dt.datetime,
    claimed_by: str,
    lease_until: dt.datetime,
    requested_by: str,
    now: dt.datetime,
) -> bool:
    """Claims the review of a period; False when it exists already."""
    result = await session.execute(
        _insert(session)(tier_reviews)
        .values(
            period=period,
            period_end=period_end,
            as_of=as_of,
            state=RUNNING,
            claimed_by=claimed_by,
            lease_until=lease_until,
            requested_by=requested_by,
            started_at=now,
        )
        .on_conflict_do_nothing(index_elements=["period"])
    )
    return bool(getattr(result, "rowcount", 0))


async def update_review(session: AsyncSession, period: str, **values: Any) -> None:
    await session.execute(
        sa.update(tier_reviews).where(tier_reviews.c.period == period).values(**values)
    )
