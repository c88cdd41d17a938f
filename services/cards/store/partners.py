"""Co-brand partners, the client certificates bound to them, and reading
the feed of their cards' changes."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from services.cards.domain.cards import Action, CardState
from services.cards.store import metadata
from services.cards.store.cards import cards, partner_card_changes
from services.cards.store.programs import card_programs


class PartnerState(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


partners = sa.Table(
    "partners",
    metadata,
    sa.Column("partner_id", sa.String(64), primary_key=True),
    sa.Column("display_name", sa.String(100), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("state_reason", sa.String(200), nullable=False, server_default=""),
    # The number of the partner's last card change (see cards.next_change_seq).
    sa.Column("change_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

partner_certificates = sa.Table(
    "partner_certificates",
    metadata,
    sa.Column("sha256_fingerprint", sa.String(64), primary_key=True),
    sa.Column("partner_id", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(300), nullable=False),
    sa.Column("not_after", UTCDateTime, nullable=False),
    sa.Column("added_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Index("ix_partner_certificates_partner", "partner_id"),
)


@dataclass(frozen=True)
class CertificateRecord:
    sha256_fingerprint: str
    partner_id: str
    subject: str
    not_after: dt.datetime
    added_at: dt.datetime
    revoked_at: dt.datetime | None


@dataclass(frozen=True)
class PartnerRecord:
    partner_id: str
    display_name: str
    state: PartnerState
    state_reason: str
    created_by: str
    created_store_id: str
    created_at: dt.datetime
    certificates: tuple[CertificateRecord, ...] = ()
    program_ids: tuple[str, ...] = ()


def _certificate(row: Any) -> CertificateRecord:
    return CertificateRecord(
        sha256_fingerprint=row.sha256_fingerprint,
        partner_id=row.partner_id,
        subject=row.subject,
        not_after=row.not_after,
        added_at=row.added_at,
        revoked_at=row.revoked_at,
    )


async def insert_partner(
    session: AsyncSession,
    partner_id: str,
    display_name: str,
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
) -> None:
    await session.execute(
        sa.insert(partners).values(
            partner_id=partner_id,
            display_name=display_name,
            state=PartnerState.ACTIVE.value,
            created_by=principal,
            created_store_id=store_id,
            created_at=now,
        )
    )


async def get_partner(
    session: AsyncSession, partner_id: str, *, for_update: bool = False
) -> PartnerRecord | None:
    query = sa.select(partners).where(partners.c.partner_id == partner_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    if row is None:
        return None
    certificates = await session.execute(
        sa.select(partner_certificates)
        .where(partner_certificates.c.partner_id == partner_id)
        .order_by(partner_certificates.c.added_at)
    )
    programs = await session.execute(
        sa.select(card_programs.c.program_id)
        .where(card_programs.c.partner_id == partner_id)
        .order_by(card_programs.c.program_id)
    )
    return PartnerRecord(
        partner_id=row.partner_id,
        display_name=row.display_name,
        state=PartnerState(row.state),
        state_reason=row.state_reason,
        created_by=row.created_by,
        created_store_id=row.created_store_id,
        created_at=row.created_at,
        certificates=tuple(_certificate(c) for c in certificates),
        program_ids=tuple(p.program_id for p in programs),
    )


async def partner_ids(session: AsyncSession, *, after: str, limit: int) -> list[str]:
    query = sa.select(partners.c.partner_id).order_by(partners.c.partner_id).limit(limit)
    if after:
        query = query.where(partners.c.partner_id > after)
    return [row.partner_id for row in await session.execute(query)]


async def set_state(
    session: AsyncSession, partner_id: str, state: PartnerState, reason: str
) -> None:
    await session.execute(
        sa.update(partners)
        .where(partners.c.partner_id == partner_id)
        .values(state=state.value, state_reason=reason)
    )


async def get_certificate(session: AsyncSession, fingerprint: str) -> CertificateRecord | None:
    row = (
        await session.execute(
            sa.select(partner_certificates).where(
                partner_certificates.c.sha256_fingerprint == fingerprint
            )
        )
    ).first()
    return None if row is None else _certificate(row)


async def add_certificate(
    session: AsyncSession,
    partner_id: str,
    fingerprint: str,
    *,
    subject: str,
    not_after: dt.datetime,
    now: dt.datetime,
) -> None:
    await session.execute(
        sa.insert(partner_certificates).values(
            sha256_fingerprint=fingerprint,
            partner_id=partner_id,
            subject=subject,
            not_after=not_after,
            added_at=now,
        )
    )


async def revoke_certificate(session: AsyncSession, fingerprint: str, now: dt.datetime) -> None:
    await session.execute(
        sa.update(partner_certificates)
        .where(
            partner_certificates.c.sha256_fingerprint == fingerprint,
            partner_certificates.c.revoked_at.is_(None),
        )
        .values(revoked_at=now)
    )


@dataclass(frozen=True)
class CardChange:
    seq: int
    card_id: str
    partner_reference: str | None
    action: Action
    state: CardState
    related_card_id: str
    at: dt.datetime


async def card_changes(
    session: AsyncSession, partner_id: str, *, after_seq: int, limit: int
) -> list[CardChange]:
    f = partner_card_changes.c
    rows = await session.execute(
        sa.select(
            f.seq,
            f.card_id,
            cards.c.partner_reference,
            f.action,
            f.state,
            f.related_card_id,
            f.at,
        )
        .join(cards, cards.c.card_id == f.card_id)
        .where(f.partner_id == partner_id, f.seq > after_seq)
        .order_by(f.seq)
        .limit(limit)
    )
    return [
        CardChange(
            seq=r.seq,
            card_id=r.card_id,
            partner_reference=r.partner_reference,
            action=Action(r.action),
            state=CardState(r.state),
            related_card_id=r.related_card_id,
            at=r.at,
        )
        for r in rows
    ]


async def card_by_reference(session: AsyncSession, partner_id: str, reference: str) -> str | None:
    row = (
        await session.execute(
            sa.select(cards.c.card_id).where(
                cards.c.partner_id == partner_id, cards.c.partner_reference == reference
            )
        )
    ).first()
    return None if row is None else str(row.card_id)
