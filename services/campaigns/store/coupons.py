"""Coupon templates with their counters, issued coupons, issue jobs and
redemptions. Each function runs in the caller's unit of work.

The template's counters (coupons issued, budget used) and the per-member
counts change only by conditional updates whose WHERE clause is the limit
itself, backed by CHECK constraints: concurrent issues can never pass a
quantity, a budget or a member's limit."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import BigIntKey, RowByKey, UTCDateTime
from chassis.direct import Direct
from chassis.paging import newest_first
from services.campaigns.domain.coupons import (
    CouponFacts,
    CouponState,
    JobState,
    RestorePolicy,
    Template,
)
from services.campaigns.domain.pricing import CouponKind
from services.campaigns.store import metadata

coupon_templates = sa.Table(
    "coupon_templates",
    metadata,
    sa.Column("template_id", sa.String(16), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("per_member_limit", sa.Integer, nullable=False, server_default="0"),
    # NULL: no limit.
    sa.Column("total_quantity", sa.BigInteger, nullable=True),
    sa.Column("budget", sa.BigInteger, nullable=True),
    sa.Column("cost", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("issued_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("budget_used", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.CheckConstraint(
        "total_quantity IS NULL OR issued_count <= total_quantity",
        name="ck_coupon_templates_quantity",
    ),
    sa.CheckConstraint(
        "budget IS NULL OR budget_used <= budget", name="ck_coupon_templates_budget"
    ),
    sa.Index("ix_coupon_templates_created", "created_at", "template_id"),
)

coupon_member_counts = sa.Table(
    "coupon_member_counts",
    metadata,
    sa.Column("template_id", sa.String(16), primary_key=True),
    sa.Column("member_id", sa.String(64), primary_key=True),
    sa.Column("issued", sa.Integer, nullable=False, server_default="0"),
)

coupons = sa.Table(
    "coupons",
    metadata,
    sa.Column("coupon_id", sa.String(16), primary_key=True),
    sa.Column("code", sa.String(32), nullable=False, unique=True),
    sa.Column("template_id", sa.String(16), nullable=False),
    sa.Column("member_id", sa.String(64), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("issued_at", UTCDateTime, nullable=False),
    sa.Column("issued_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("issued_by", sa.String(100), nullable=False),
    sa.Column("job_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("valid_from", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    # The checkout that holds it (or last held it, until released by it).
    sa.Column("reservation_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("reserved_until", UTCDateTime, nullable=True),
    sa.Column("reserved_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("reserved_discount", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reserved_basket_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("sale_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("redeemed_at", UTCDateTime, nullable=True),
    sa.Column("expired_at", UTCDateTime, nullable=True),
    sa.Index("ix_coupons_member", "member_id", "issued_at", "coupon_id"),
    sa.Index("ix_coupons_due", "state", "expires_at"),
    sa.Index("ix_coupons_reserved", "state", "reserved_until"),
    sa.Index("ix_coupons_reservation", "reservation_id"),
    sa.Index("ix_coupons_sale", "sale_id"),
    sa.Index("ix_coupons_template_issued", "template_id", "issued_at"),
)

# One row per redemption; a refund that gives the coupon back marks it
# reversed, so statistics count what stayed redeemed.
coupon_redemptions = sa.Table(
    "coupon_redemptions",
    metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("coupon_id", sa.String(16), nullable=False),
    sa.Column("template_id", sa.String(16), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("sale_id", sa.String(64), nullable=False),
    sa.Column("discount", sa.BigInteger, nullable=False),
    sa.Column("sales", sa.BigInteger, nullable=False),
    sa.Column("redeemed_at", UTCDateTime, nullable=False),
    sa.Column("reversed_by", sa.String(64), nullable=False, server_default=""),
    sa.UniqueConstraint("coupon_id", "sale_id", name="uq_coupon_redemptions_sale"),
    sa.Index("ix_coupon_redemptions_template", "template_id", "redeemed_at"),
)

coupon_issue_jobs = sa.Table(
    "coupon_issue_jobs",
    metadata,
    sa.Column("job_id", sa.String(16), primary_key=True),
    sa.Column("request_id", sa.String(220), nullable=False, unique=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("template_id", sa.String(16), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("total", sa.BigInteger, nullable=False),
    sa.Column("processed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("issued", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("skipped", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    # 0007: a segment's job. The criteria as they were at the call (JSON of
    # members' MemberCriteria), the SelectMembers page token reached, and
    # whether pages remain to be read (the job is done only once none do).
    sa.Column("segment_id", sa.String(40), nullable=False, server_default=""),
    sa.Column("segment_version", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("criteria", sa.Text, nullable=True),
    sa.Column("cursor", sa.String(1024), nullable=False, server_default=""),
    sa.Column("selecting", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_coupon_issue_jobs_state", "state"),
)

# A job's members: never twice the same member in one run.
coupon_issue_job_members = sa.Table(
    "coupon_issue_job_members",
    metadata,
    sa.Column("job_id", sa.String(16), primary_key=True),
    sa.Column("member_id", sa.String(64), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    # "" pending, "issued", or the reason it was skipped.
    sa.Column("outcome", sa.String(40), nullable=False, server_default=""),
    sa.Column("coupon_id", sa.String(16), nullable=False, server_default=""),
    sa.Index("ix_coupon_issue_job_members_pending", "job_id", "outcome", "position"),
)


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def _ts(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


# --- templates ------------------------------------------------------------------------


def _template_document(t: Template) -> str:
    return json.dumps(
        {
            "name": t.name,
            "description": t.description,
            "amount_off": t.amount_off,
            "percent_bps": t.percent_bps,
            "max_discount": t.max_discount,
            "gift_sku": t.gift_sku,
            "face_value": t.face_value,
            "valid_from": _ts(t.valid_from),
            "valid_until": _ts(t.valid_until),
            "valid_days": t.valid_days,
            "min_spend": t.min_spend,
            "store_ids": sorted(t.store_ids),
            "categories": sorted(t.categories),
            "skus": sorted(t.skus),
            "restore_policy": t.restore_policy.value,
        },
        sort_keys=True,
        ensure_ascii=False,
    )


@dataclass(frozen=True)
class TemplateRecord:
    template: Template
    issued_count: int
    budget_used: int
    created_by: str
    created_store_id: str
    created_at: dt.datetime


def _template(row: Any) -> TemplateRecord:
    d = json.loads(row.document)
    template = Template(
        template_id=row.template_id,
        name=d["name"],
        kind=CouponKind(row.kind),
        currency=row.currency,
        amount_off=d["amount_off"],
        percent_bps=d["percent_bps"],
        max_discount=d["max_discount"],
        gift_sku=d["gift_sku"],
        face_value=d["face_value"],
        valid_from=_dt(d["valid_from"]),
        valid_until=_dt(d["valid_until"]),
        valid_days=d["valid_days"],
        min_spend=d["min_spend"],
        store_ids=frozenset(d["store_ids"]),
        categories=frozenset(d["categories"]),
        skus=frozenset(d["skus"]),
        per_member_limit=row.per_member_limit,
        total_quantity=row.total_quantity or 0,
        budget=row.budget,
        restore_policy=RestorePolicy(d["restore_policy"]),
        description=d["description"],
    )
    return TemplateRecord(
        template,
        row.issued_count,
        row.budget_used,
        row.created_by,
        row.created_store_id,
        row.created_at,
    )


async def insert_template(
    session: AsyncSession, t: Template, *, principal: str, store_id: str, now: dt.datetime
) -> None:
    await session.execute(
        sa.insert(coupon_templates).values(
            template_id=t.template_id,
            kind=t.kind.value,
            currency=t.currency,
            document=_template_document(t),
            per_member_limit=t.per_member_limit,
            total_quantity=t.total_quantity or None,
            budget=t.budget,
            cost=t.cost,
            created_by=principal,
            created_store_id=store_id,
            created_at=now,
        )
    )


async def get_template(session: AsyncSession, template_id: str) -> TemplateRecord | None:
    row = (
        await session.execute(
            sa.select(coupon_templates).where(coupon_templates.c.template_id == template_id)
        )
    ).first()
    return None if row is None else _template(row)


async def templates_by_id(session: AsyncSession, ids: set[str]) -> dict[str, TemplateRecord]:
    if not ids:
        return {}
    rows = await session.execute(
        sa.select(coupon_templates).where(coupon_templates.c.template_id.in_(sorted(ids)))
    )
    return {row.template_id: _template(row) for row in rows}


async def list_templates(
    session: AsyncSession, *, after: tuple[dt.datetime, str] | None, limit: int
) -> list[TemplateRecord]:
    c = coupon_templates.c
    query = newest_first(sa.select(coupon_templates), c.created_at, c.template_id, after, limit)
    return [_template(row) for row in await session.execute(query)]


async def take_from_template(session: AsyncSession, template_id: str) -> bool:
    """One more coupon issued: False when the quantity or the budget would
    be passed (nothing changed)."""
    c = coupon_templates.c
    result = await session.execute(
        sa.update(coupon_templates)
        .where(
            c.template_id == template_id,
            sa.or_(c.total_quantity.is_(None), c.issued_count < c.total_quantity),
            sa.or_(c.budget.is_(None), c.budget_used + c.cost <= c.budget),
        )
        .values(issued_count=c.issued_count + 1, budget_used=c.budget_used + c.cost)
        .returning(c.issued_count)
    )
    return result.first() is not None


async def take_member_count(
    session: AsyncSession, template_id: str, member_id: str, limit: int
) -> bool:
    """One more coupon of the template for the member: False when their
    limit is reached. Bound to the member id, not to a phone or an e-mail."""
    await session.execute(
        _insert(session)(coupon_member_counts)
        .values(template_id=template_id, member_id=member_id, issued=0)
        .on_conflict_do_nothing(index_elements=["template_id", "member_id"])
    )
    c = coupon_member_counts.c
    conditions = [c.template_id == template_id, c.member_id == member_id]
    if limit:
        conditions.append(c.issued < limit)
    result = await session.execute(
        sa.update(coupon_member_counts)
        .where(*conditions)
        .values(issued=c.issued + 1)
        .returning(c.issued)
    )
    return result.first() is not None


# --- coupons ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CouponRecord:
    coupon_id: str
    code: str
    template_id: str
    member_id: str
    state: CouponState
    issued_at: dt.datetime
    issued_store_id: str
    job_id: str
    valid_from: dt.datetime
    expires_at: dt.datetime
    reservation_id: str
    reserved_until: dt.datetime | None
    reserved_store_id: str
    reserved_discount: int
    reserved_basket_total: int
    sale_id: str
    redeemed_at: dt.datetime | None

    @property
    def facts(self) -> CouponFacts:
        return CouponFacts(
            self.coupon_id,
            self.member_id,
            self.state,
            self.valid_from,
            self.expires_at,
            self.reservation_id,
        )


def _coupon(row: Any) -> CouponRecord:
    return CouponRecord(
        coupon_id=row.coupon_id,
        code=row.code,
        template_id=row.template_id,
        member_id=row.member_id,
        state=CouponState(row.state),
        issued_at=row.issued_at,
        issued_store_id=row.issued_store_id,
        job_id=row.job_id,
        valid_from=row.valid_from,
        expires_at=row.expires_at,
        reservation_id=row.reservation_id,
        reserved_until=row.reserved_until,
        reserved_store_id=row.reserved_store_id,
        reserved_discount=row.reserved_discount,
        reserved_basket_total=row.reserved_basket_total,
        sale_id=row.sale_id,
        redeemed_at=row.redeemed_at,
    )


async def insert_coupon(session: AsyncSession, **values: Any) -> None:
    await session.execute(sa.insert(coupons).values(**values))


_COUPON = RowByKey(coupons, "coupon_id")
_COUPON_BY_CODE = RowByKey(coupons, "code")


async def get_coupon(
    session: AsyncSession,
    *,
    coupon_id: str = "",
    code: str = "",
    for_update: bool = False,
) -> CouponRecord | None:
    if coupon_id:
        row = await _COUPON.first(session, coupon_id, for_update=for_update)
    else:
        row = await _COUPON_BY_CODE.first(session, code, for_update=for_update)
    return None if row is None else _coupon(row)


async def coupons_by_code(
    session: AsyncSession, codes: list[str], *, for_update: bool = False
) -> dict[str, CouponRecord]:
    if not codes:
        return {}
    query = sa.select(coupons).where(coupons.c.code.in_(sorted(set(codes))))
    if for_update:
        query = query.order_by(coupons.c.coupon_id).with_for_update()
    return {row.code: _coupon(row) for row in await session.execute(query)}


async def coupons_where(
    session: AsyncSession, *conditions: Any, for_update: bool = False
) -> list[CouponRecord]:
    query = sa.select(coupons).where(*conditions).order_by(coupons.c.coupon_id)
    if for_update:
        query = query.with_for_update()
    return [_coupon(row) for row in await session.execute(query)]


# Built once (see chassis.db.RowByKey): read on every checkout's pricing.
_RESERVED_FOR = (
    sa.select(coupons)
    .where(
        coupons.c.reservation_id == sa.bindparam("reservation_id"),
        coupons.c.state == CouponState.RESERVED.value,
    )
    .order_by(coupons.c.coupon_id)
)
_RESERVED_FOR_LOCKED = Direct(_RESERVED_FOR.with_for_update())
_RESERVED_FOR_PLAIN = Direct(_RESERVED_FOR)


async def reserved_for(
    session: AsyncSession, reservation_id: str, *, for_update: bool = False
) -> list[CouponRecord]:
    """The coupons the checkout holds reserved, in coupon id order."""
    statement = _RESERVED_FOR_LOCKED if for_update else _RESERVED_FOR_PLAIN
    rows = await statement.execute(session, {"reservation_id": reservation_id})
    return [_coupon(row) for row in rows]


async def update_coupon(
    session: AsyncSession, coupon_id: str, *conditions: Any, **values: Any
) -> bool:
    """A conditional move: False when the row was not in the expected state."""
    result = await session.execute(
        sa.update(coupons)
        .where(coupons.c.coupon_id == coupon_id, *conditions)
        .values(**values)
        .returning(coupons.c.coupon_id)
    )
    return result.first() is not None


async def member_coupons(
    session: AsyncSession,
    member_id: str,
    states: list[CouponState],
    *,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[CouponRecord]:
    c = coupons.c
    query = sa.select(coupons).where(c.member_id == member_id)
    if states:
        query = query.where(c.state.in_([s.value for s in states]))
    query = newest_first(query, c.issued_at, c.coupon_id, after, limit)
    return [_coupon(row) for row in await session.execute(query)]


async def due_ids(session: AsyncSession, *conditions: Any, limit: int) -> list[str]:
    rows = await session.execute(
        sa.select(coupons.c.coupon_id).where(*conditions).order_by(coupons.c.coupon_id).limit(limit)
    )
    return [row.coupon_id for row in rows]


# --- redemptions ----------------------------------------------------------------------------


async def record_redemption(
    session: AsyncSession, coupon: CouponRecord, *, sale_id: str, sales: int, at: dt.datetime
) -> None:
    await session.execute(
        _insert(session)(coupon_redemptions)
        .values(
            coupon_id=coupon.coupon_id,
            template_id=coupon.template_id,
            store_id=coupon.reserved_store_id,
            sale_id=sale_id,
            discount=coupon.reserved_discount,
            sales=sales,
            redeemed_at=at,
        )
        .on_conflict_do_nothing(index_elements=["coupon_id", "sale_id"])
    )


async def reverse_redemption(
    session: AsyncSession, coupon_id: str, sale_id: str, refund_id: str
) -> None:
    c = coupon_redemptions.c
    await session.execute(
        sa.update(coupon_redemptions)
        .where(c.coupon_id == coupon_id, c.sale_id == sale_id, c.reversed_by == "")
        .values(reversed_by=refund_id)
    )


# --- issue jobs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    request_id: str
    request_hash: str
    template_id: str
    state: JobState
    total: int
    processed: int
    issued: int
    skipped: int
    created_by: str
    created_store_id: str
    created_at: dt.datetime
    finished_at: dt.datetime | None
    segment_id: str = ""
    segment_version: int = 0
    criteria: str | None = None
    cursor: str = ""
    selecting: bool = False


def _job(row: Any) -> JobRecord:
    return JobRecord(
        job_id=row.job_id,
        request_id=row.request_id,
        request_hash=row.request_hash,
        template_id=row.template_id,
        state=JobState(row.state),
        total=row.total,
        processed=row.processed,
        issued=row.issued,
        skipped=row.skipped,
        created_by=row.created_by,
        created_store_id=row.created_store_id,
        created_at=row.created_at,
        finished_at=row.finished_at,
        segment_id=row.segment_id,
        segment_version=row.segment_version,
        criteria=row.criteria,
        cursor=row.cursor,
        selecting=row.selecting,
    )


async def insert_job(session: AsyncSession, job: JobRecord, member_ids: list[str]) -> None:
    await session.execute(
        sa.insert(coupon_issue_jobs).values(
            job_id=job.job_id,
            request_id=job.request_id,
            request_hash=job.request_hash,
            template_id=job.template_id,
            state=job.state.value,
            total=job.total,
            created_by=job.created_by,
            created_store_id=job.created_store_id,
            created_at=job.created_at,
            segment_id=job.segment_id,
            segment_version=job.segment_version,
            criteria=job.criteria,
            cursor=job.cursor,
            selecting=job.selecting,
        )
    )
    rows = [{"job_id": job.job_id, "member_id": m, "position": i} for i, m in enumerate(member_ids)]
    for start in range(0, len(rows), 1000):
        await session.execute(sa.insert(coupon_issue_job_members), rows[start : start + 1000])


async def get_job(
    session: AsyncSession, *, job_id: str = "", request_id: str = ""
) -> JobRecord | None:
    c = coupon_issue_jobs.c
    query = sa.select(coupon_issue_jobs).where(
        c.job_id == job_id if job_id else c.request_id == request_id
    )
    row = (await session.execute(query)).first()
    return None if row is None else _job(row)


async def running_jobs(session: AsyncSession) -> list[str]:
    c = coupon_issue_jobs.c
    rows = await session.execute(
        sa.select(c.job_id).where(c.state == JobState.RUNNING.value).order_by(c.created_at)
    )
    return [row.job_id for row in rows]


async def pending_members(session: AsyncSession, job_id: str, limit: int) -> list[str]:
    c = coupon_issue_job_members.c
    rows = await session.execute(
        sa.select(c.member_id)
        .where(c.job_id == job_id, c.outcome == "")
        .order_by(c.position)
        .limit(limit)
    )
    return [row.member_id for row in rows]


async def settle_member(
    session: AsyncSession, job_id: str, member_id: str, outcome: str, coupon_id: str = ""
) -> bool:
    """Marks a job's member done, once: False when it already was (another
    worker got there first), and then nothing else may happen for it."""
    c = coupon_issue_job_members.c
    result = await session.execute(
        sa.update(coupon_issue_job_members)
        .where(c.job_id == job_id, c.member_id == member_id, c.outcome == "")
        .values(outcome=outcome, coupon_id=coupon_id)
        .returning(c.member_id)
    )
    if result.first() is None:
        return False
    j = coupon_issue_jobs.c
    await session.execute(
        sa.update(coupon_issue_jobs)
        .where(j.job_id == job_id)
        .values(
            processed=j.processed + 1,
            issued=j.issued + (1 if outcome == "issued" else 0),
            skipped=j.skipped + (0 if outcome == "issued" else 1),
        )
    )
    return True


async def finish_job(session: AsyncSession, job_id: str, now: dt.datetime) -> None:
    c = coupon_issue_jobs.c
    await session.execute(
        sa.update(coupon_issue_jobs)
        .where(
            c.job_id == job_id,
            c.state == JobState.RUNNING.value,
            c.processed >= c.total,
            c.selecting.is_(False),
        )
        .values(state=JobState.DONE.value, finished_at=now)
    )


async def add_selected_page(
    session: AsyncSession, job_id: str, cursor: str, member_ids: list[str], next_cursor: str
) -> bool:
    """A segment job's next page of members: added once each (a member
    already in the job is left as is: never twice in one run) and the page
    reached recorded with them. False when the job is no longer at
    ``cursor`` (another runner took this page); nothing is written then."""
    j = coupon_issue_jobs.c
    moved = await session.execute(
        sa.update(coupon_issue_jobs)
        .where(j.job_id == job_id, j.cursor == cursor, j.selecting.is_(True))
        .values(cursor=next_cursor, selecting=bool(next_cursor))
        .returning(j.total)
    )
    row = moved.first()
    if row is None:
        return False
    base = int(row.total)
    added = 0
    if member_ids:
        statement = (
            _insert(session)(coupon_issue_job_members)
            .values(
                [
                    {"job_id": job_id, "member_id": m, "position": base + i}
                    for i, m in enumerate(member_ids)
                ]
            )
            .on_conflict_do_nothing()
            .returning(coupon_issue_job_members.c.member_id)
        )
        added = len((await session.execute(statement)).all())
    if added:
        await session.execute(
            sa.update(coupon_issue_jobs).where(j.job_id == job_id).values(total=j.total + added)
        )
    return True


async def job_results(
    session: AsyncSession, job: JobRecord, limit: int, *, with_coupons: bool
) -> tuple[list[CouponRecord], list[tuple[str, str]]]:
    """The job's first coupons (``with_coupons``) and first skipped members,
    in the job's order. Both are read through the job's own rows (its
    members' index by outcome and position), so that reading a job costs
    the same whatever the size of the job or of the coupons table."""
    m = coupon_issue_job_members.c
    issued: list[CouponRecord] = []
    if with_coupons and job.issued:
        rows = await session.execute(
            sa.select(coupons)
            .join(coupon_issue_job_members, m.coupon_id == coupons.c.coupon_id)
            .where(m.job_id == job.job_id, m.outcome == "issued")
            .order_by(m.position)
            .limit(limit)
        )
        issued = [_coupon(row) for row in rows]
    skipped: list[tuple[str, str]] = []
    if job.skipped:
        rows = await session.execute(
            sa.select(m.member_id, m.outcome)
            .where(m.job_id == job.job_id, m.outcome != "", m.outcome != "issued")
            .order_by(m.position)
            .limit(limit)
        )
        skipped = [(row.member_id, row.outcome) for row in rows]
    return issued, skipped


# --- statistics ----------------------------------------------------------------------------


@dataclass
class StatisticsRow:
    template_id: str
    store_id: str
    issued: int = 0
    redeemed: int = 0
    expired: int = 0
    discount: int = 0
    sales: int = 0


async def statistics(
    session: AsyncSession,
    *,
    template_id: str,
    store_id: str,
    start: dt.datetime,
    end: dt.datetime,
) -> list[StatisticsRow]:
    """Per (template, store) over [start, end): coupons issued (by the
    issuing store), expired (likewise), and the redemptions that stand (by
    the redeeming store) with their discount and sales."""
    c, r = coupons.c, coupon_redemptions.c
    rows: dict[tuple[str, str], StatisticsRow] = {}

    def row(template: str, store: str) -> StatisticsRow:
        return rows.setdefault((template, store), StatisticsRow(template, store))

    for column, attribute in ((c.issued_at, "issued"), (c.expired_at, "expired")):
        query = sa.select(c.template_id, c.issued_store_id, sa.func.count()).where(
            column >= start, column < end
        )
        if template_id:
            query = query.where(c.template_id == template_id)
        if store_id:
            query = query.where(c.issued_store_id == store_id)
        query = query.group_by(c.template_id, c.issued_store_id)
        for template, store, count in await session.execute(query):
            setattr(row(template, store), attribute, count)
    query = sa.select(
        r.template_id, r.store_id, sa.func.count(), sa.func.sum(r.discount), sa.func.sum(r.sales)
    ).where(r.redeemed_at >= start, r.redeemed_at < end, r.reversed_by == "")
    if template_id:
        query = query.where(r.template_id == template_id)
    if store_id:
        query = query.where(r.store_id == store_id)
    query = query.group_by(r.template_id, r.store_id)
    for template, store, count, discount, sales in await session.execute(query):
        found = row(template, store)
        found.redeemed, found.discount, found.sales = count, int(discount or 0), int(sales or 0)
    return [rows[key] for key in sorted(rows)]
