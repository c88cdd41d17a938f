"""The postal mailing list: messages sent on the post channel wait here
until an export hands them to a print shop. No addresses: those are read
from the members service when the file is written, and never kept."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from services.notify.store.base import metadata
from services.notify.store.messages import messages

postal_mailings = sa.Table(
    "postal_mailings",
    metadata,
    sa.Column("message_id", sa.String(40), primary_key=True),
    sa.Column("member_id", sa.String(16), nullable=False),
    sa.Column("template", sa.String(64), nullable=False),
    sa.Column("locale", sa.String(10), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Set when a file with the letter was written; NULL while waiting.
    sa.Column("export_id", sa.String(40), nullable=True),
    sa.Column("exported_at", UTCDateTime, nullable=True),
    sa.Index("ix_postal_mailings_export", "export_id", "created_at"),
)


@dataclass(frozen=True)
class Letter:
    message_id: str
    member_id: str
    template: str
    locale: str
    created_at: dt.datetime
    # The message's text, as it is printed.
    subject: str
    body: str


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


async def add_letter(
    session: AsyncSession,
    *,
    message_id: str,
    member_id: str,
    template: str,
    locale: str,
    now: dt.datetime,
) -> None:
    """Put a message on the list; a second send of the same message (a
    retry after a crash) changes nothing."""
    await session.execute(
        _insert(session)(postal_mailings)
        .values(
            message_id=message_id,
            member_id=member_id,
            template=template,
            locale=locale,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["message_id"])
    )


async def letters(session: AsyncSession, export_id: str | None, limit: int) -> list[Letter]:
    """The letters waiting (``export_id`` None) or those of an export,
    oldest first."""
    c = postal_mailings.c
    where = c.export_id.is_(None) if export_id is None else c.export_id == export_id
    m = messages.c
    rows = await session.execute(
        sa.select(postal_mailings, m.subject, m.body)
        .join(messages, m.message_id == c.message_id)
        .where(where)
        .order_by(c.created_at, c.message_id)
        .limit(limit)
    )
    return [
        Letter(
            r.message_id, r.member_id, r.template, r.locale, r.created_at, r.subject or "", r.body
        )
        for r in rows
    ]


async def mark_exported(
    session: AsyncSession, message_ids: list[str], export_id: str, now: dt.datetime
) -> None:
    if message_ids:
        c = postal_mailings.c
        await session.execute(
            sa.update(postal_mailings)
            .where(c.message_id.in_(message_ids), c.export_id.is_(None))
            .values(export_id=export_id, exported_at=now)
        )
