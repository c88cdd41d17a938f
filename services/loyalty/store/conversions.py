"""Conversions with partners: each partner's terms (one row, its two ways
as a JSON document with an etag, and the number of its last conversion)
and the conversions themselves, bound for good to the partner's request id
(``UNIQUE (partner_id, request_id)``) and numbered per partner with no
gaps, in commit order (``next_sequence``)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from services.loyalty.domain.conversions import Direction, PartnerTerms, Rate, Terms
from services.loyalty.store import metadata

conversion_terms = sa.Table(
    "conversion_terms",
    metadata,
    sa.Column("partner_id", sa.String(64), primary_key=True),
    sa.Column("enabled", sa.Boolean, nullable=False),
    # The two ways (to_chain, to_partner) as JSON.
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("etag", sa.String(32), nullable=False),
    # The number of the partner's last conversion (see next_sequence).
    sa.Column("last_sequence", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("updated_by", sa.String(100), nullable=False),
    sa.Column("updated_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

conversions = sa.Table(
    "conversions",
    metadata,
    sa.Column("conversion_id", sa.String(16), primary_key=True),
    sa.Column("partner_id", sa.String(64), nullable=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("request_id", sa.String(200), nullable=False),
    sa.Column("request_hash", sa.String(64), nullable=False),
    # "to_chain" or "to_partner".
    sa.Column("direction", sa.String(10), nullable=False),
    sa.Column("member_id", sa.String(32), nullable=False),
    # What the request named: partner points to the chain, chain points to
    # the partner.
    sa.Column("requested", sa.BigInteger, nullable=False),
    sa.Column("partner_points", sa.BigInteger, nullable=False),
    sa.Column("chain_points", sa.BigInteger, nullable=False),
    sa.Column("rate_partner_points", sa.BigInteger, nullable=False),
    sa.Column("rate_chain_points", sa.BigInteger, nullable=False),
    sa.Column("partner_reference", sa.String(100), nullable=False, server_default=""),
    # The member's points movement (ACCRUE or CONVERT_OUT).
    sa.Column("movement_id", sa.String(16), nullable=False),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    # The points policy's local day, for the daily caps.
    sa.Column("business_day", sa.Date, nullable=False),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("partner_id", "request_id", name="uq_conversions_request"),
    sa.UniqueConstraint("partner_id", "sequence", name="uq_conversions_sequence"),
    sa.CheckConstraint("partner_points > 0", name="ck_conversions_partner_points"),
    sa.CheckConstraint("chain_points > 0", name="ck_conversions_chain_points"),
    sa.Index("ix_conversions_member_day", "partner_id", "member_id", "direction", "business_day"),
)


# --- terms -----------------------------------------------------------------------


def _terms_document(terms: Terms | None) -> dict[str, int] | None:
    if terms is None:
        return None
    return {
        "rate_partner_points": terms.rate.partner_points,
        "rate_chain_points": terms.rate.chain_points,
        "min_points": terms.min_points,
        "max_points": terms.max_points,
        "daily_cap": terms.daily_cap,
    }


def _terms_from(doc: dict[str, Any] | None) -> Terms | None:
    if doc is None:
        return None
    return Terms(
        rate=Rate(int(doc["rate_partner_points"]), int(doc["rate_chain_points"])),
        min_points=int(doc["min_points"]),
        max_points=int(doc["max_points"]),
        daily_cap=int(doc["daily_cap"]),
    )


@dataclass(frozen=True)
class TermsRecord:
    terms: PartnerTerms
    etag: str
    updated_by: str
    updated_store_id: str
    updated_at: dt.datetime


def _terms_record(row: Any) -> TermsRecord:
    doc = json.loads(row.document)
    return TermsRecord(
        terms=PartnerTerms(
            partner_id=row.partner_id,
            enabled=bool(row.enabled),
            to_chain=_terms_from(doc.get(Direction.TO_CHAIN.value)),
            to_partner=_terms_from(doc.get(Direction.TO_PARTNER.value)),
        ),
        etag=row.etag,
        updated_by=row.updated_by,
        updated_store_id=row.updated_store_id,
        updated_at=row.updated_at,
    )


async def get_terms(
    session: AsyncSession, partner_id: str, *, for_update: bool = False
) -> TermsRecord | None:
    query = sa.select(conversion_terms).where(conversion_terms.c.partner_id == partner_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _terms_record(row)


async def list_terms(session: AsyncSession, *, after: str, limit: int) -> list[TermsRecord]:
    c = conversion_terms.c
    rows = await session.execute(
        sa.select(conversion_terms).where(c.partner_id > after).order_by(c.partner_id).limit(limit)
    )
    return [_terms_record(row) for row in rows]


async def save_terms(
    session: AsyncSession,
    terms: PartnerTerms,
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
) -> None:
    """Creates or replaces a partner's terms (its sequence is kept)."""
    text = json.dumps(
        {
            Direction.TO_CHAIN.value: _terms_document(terms.to_chain),
            Direction.TO_PARTNER.value: _terms_document(terms.to_partner),
        },
        sort_keys=True,
    )
    values = {
        "enabled": terms.enabled,
        "document": text,
        "etag": hashlib.sha256(f"{terms.enabled}{text}{now.isoformat()}".encode()).hexdigest()[:32],
        "updated_by": principal,
        "updated_store_id": store_id,
        "updated_at": now,
    }
    c = conversion_terms.c
    updated = await session.execute(
        sa.update(conversion_terms).where(c.partner_id == terms.partner_id).values(**values)
    )
    if getattr(updated, "rowcount", 0) == 0:
        await session.execute(
            sa.insert(conversion_terms).values(partner_id=terms.partner_id, **values)
        )


async def next_sequence(session: AsyncSession, partner_id: str) -> int:
    """The partner's next conversion number. The update locks the partner's
    terms row until this transaction ends, so numbers are handed out in
    commit order: a reader never sees a later conversion before an earlier
    one has committed."""
    c = conversion_terms.c
    row = (
        await session.execute(
            sa.update(conversion_terms)
            .where(c.partner_id == partner_id)
            .values(last_sequence=c.last_sequence + 1)
            .returning(c.last_sequence)
        )
    ).first()
    if row is None:
        raise LookupError(f"no conversion terms for partner {partner_id}")
    return int(row.last_sequence)


# --- conversions -------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionRecord:
    conversion_id: str
    partner_id: str
    sequence: int
    request_id: str
    request_hash: str
    direction: Direction
    member_id: str
    requested: int
    partner_points: int
    chain_points: int
    rate: Rate
    partner_reference: str
    movement_id: str
    balance_after: int
    business_day: dt.date
    principal: str
    at: dt.datetime


def _conversion(row: Any) -> ConversionRecord:
    return ConversionRecord(
        conversion_id=row.conversion_id,
        partner_id=row.partner_id,
        sequence=int(row.sequence),
        request_id=row.request_id,
        request_hash=row.request_hash,
        direction=Direction(row.direction),
        member_id=row.member_id,
        requested=int(row.requested),
        partner_points=int(row.partner_points),
        chain_points=int(row.chain_points),
        rate=Rate(int(row.rate_partner_points), int(row.rate_chain_points)),
        partner_reference=row.partner_reference,
        movement_id=row.movement_id,
        balance_after=int(row.balance_after),
        business_day=row.business_day,
        principal=row.principal,
        at=row.at,
    )


async def insert_conversion(session: AsyncSession, record: ConversionRecord) -> None:
    await session.execute(
        sa.insert(conversions).values(
            conversion_id=record.conversion_id,
            partner_id=record.partner_id,
            sequence=record.sequence,
            request_id=record.request_id,
            request_hash=record.request_hash,
            direction=record.direction.value,
            member_id=record.member_id,
            requested=record.requested,
            partner_points=record.partner_points,
            chain_points=record.chain_points,
            rate_partner_points=record.rate.partner_points,
            rate_chain_points=record.rate.chain_points,
            partner_reference=record.partner_reference,
            movement_id=record.movement_id,
            balance_after=record.balance_after,
            business_day=record.business_day,
            principal=record.principal,
            at=record.at,
        )
    )


async def conversion_by_request(
    session: AsyncSession, partner_id: str, request_id: str
) -> ConversionRecord | None:
    c = conversions.c
    row = (
        await session.execute(
            sa.select(conversions).where(c.partner_id == partner_id, c.request_id == request_id)
        )
    ).first()
    return None if row is None else _conversion(row)


async def get_conversion(session: AsyncSession, conversion_id: str) -> ConversionRecord | None:
    row = (
        await session.execute(
            sa.select(conversions).where(conversions.c.conversion_id == conversion_id)
        )
    ).first()
    return None if row is None else _conversion(row)


async def list_conversions(
    session: AsyncSession, partner_id: str, *, after_sequence: int, limit: int
) -> list[ConversionRecord]:
    c = conversions.c
    rows = await session.execute(
        sa.select(conversions)
        .where(c.partner_id == partner_id, c.sequence > after_sequence)
        .order_by(c.sequence)
        .limit(limit)
    )
    return [_conversion(row) for row in rows]


async def chain_points_on(
    session: AsyncSession, partner_id: str, member_id: str, direction: Direction, day: dt.date
) -> int:
    """The chain points a member converted one way through a partner on a
    local day."""
    c = conversions.c
    result = await session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(c.chain_points), 0)).where(
            c.partner_id == partner_id,
            c.member_id == member_id,
            c.direction == direction.value,
            c.business_day == day,
        )
    )
    return int(result.scalar_one())
