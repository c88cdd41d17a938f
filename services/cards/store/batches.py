"""Enterprise batch recharges and their rows (migration 0003).

A batch is written once, with every row of its file checked, in the
transaction that starts it. A RUNNING batch is then worked by one worker
at a time: the worker holds a lease (``lease_owner``, ``lease_until``)
that every row's transaction checks and renews; once a lease lapses (its
replica died) another worker may claim the batch and go on. A row is
marked RECHARGED, with its movement, in the transaction that makes the
movement, and the batch's counters move in that transaction too: a
restart resumes at the first row still VALID and never recharges one
twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from services.cards.domain.cards import CardState
from services.cards.store import metadata
from services.cards.store.cards import cards

# Batch states.
RUNNING = "running"
DONE = "done"
CHECKED = "checked"

# Row outcomes.
PENDING = "pending"
VALID = "valid"
INVALID = "invalid"
RECHARGED = "recharged"
FAILED = "failed"
PROBLEMS = (INVALID, FAILED)

sv_batches = sa.Table(
    "sv_batches",
    metadata,
    sa.Column("batch_id", sa.String(16), primary_key=True),
    sa.Column("file_name", sa.String(200), nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("payment_reference", sa.String(100), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rows", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_invalid", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_recharged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_by", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("lease_owner", sa.String(64), nullable=False, server_default=""),
    sa.Column("lease_until", UTCDateTime, nullable=True),
    sa.Index("ix_sv_batches_state", "state", "started_at"),
)

sv_batch_rows = sa.Table(
    "sv_batch_rows",
    metadata,
    sa.Column("batch_id", sa.String(16), primary_key=True),
    sa.Column("row_number", sa.Integer, primary_key=True),
    sa.Column("card_number", sa.String(32), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("note", sa.String(200), nullable=False, server_default=""),
    sa.Column("outcome", sa.String(10), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False, server_default=""),
    sa.Column("message", sa.String(300), nullable=False, server_default=""),
    sa.Column("movement_id", sa.String(16), nullable=False, server_default=""),
)

# Rows per INSERT and numbers per IN (...) lookup: well below the bind
# parameter limits of SQLite (32766) and PostgreSQL (32767).
_CHUNK = 500


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str
    file_name: str
    dry_run: bool
    state: str
    payment_reference: str
    currency: str
    total: int
    rows: int
    rows_invalid: int
    rows_recharged: int
    rows_failed: int
    started_by: str
    store_id: str
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    lease_owner: str = ""
    lease_until: dt.datetime | None = None


@dataclass(frozen=True)
class RowRecord:
    row_number: int
    card_number: str
    amount: int
    note: str
    outcome: str
    reason: str = ""
    message: str = ""
    movement_id: str = ""


def _batch(row: Any) -> BatchRecord:
    return BatchRecord(
        batch_id=row.batch_id,
        file_name=row.file_name,
        dry_run=bool(row.dry_run),
        state=row.state,
        payment_reference=row.payment_reference,
        currency=row.currency,
        total=row.total,
        rows=row.rows,
        rows_invalid=row.rows_invalid,
        rows_recharged=row.rows_recharged,
        rows_failed=row.rows_failed,
        started_by=row.started_by,
        store_id=row.store_id,
        started_at=row.started_at,
        finished_at=row.finished_at,
        lease_owner=row.lease_owner,
        lease_until=row.lease_until,
    )


def _row(row: Any) -> RowRecord:
    return RowRecord(
        row_number=row.row_number,
        card_number=row.card_number,
        amount=row.amount,
        note=row.note,
        outcome=row.outcome,
        reason=row.reason,
        message=row.message,
        movement_id=row.movement_id,
    )


# --- what the start checks against ----------------------------------------------


@dataclass(frozen=True)
class CardBrief:
    """What checking a batch row needs of a card."""

    card_id: str
    card_number: str
    program_id: str
    state: CardState
    expires_at: dt.datetime | None


async def cards_by_number(session: AsyncSession, numbers: Iterable[str]) -> dict[str, CardBrief]:
    """The cards with these numbers, a query per few hundred numbers
    rather than one per row (a file has up to 20,000)."""
    wanted = sorted(set(numbers))
    found: dict[str, CardBrief] = {}
    c = cards.c
    for start in range(0, len(wanted), _CHUNK):
        rows = await session.execute(
            sa.select(c.card_id, c.card_number, c.program_id, c.state, c.expires_at).where(
                c.card_number.in_(wanted[start : start + _CHUNK])
            )
        )
        for row in rows:
            found[row.card_number] = CardBrief(
                row.card_id, row.card_number, row.program_id, CardState(row.state), row.expires_at
            )
    return found


# --- writing a batch --------------------------------------------------------------


async def insert_batch(
    session: AsyncSession, batch: BatchRecord, rows: Sequence[RowRecord]
) -> None:
    await session.execute(
        sa.insert(sv_batches).values(
            batch_id=batch.batch_id,
            file_name=batch.file_name,
            dry_run=batch.dry_run,
            state=batch.state,
            payment_reference=batch.payment_reference,
            currency=batch.currency,
            total=batch.total,
            rows=batch.rows,
            rows_invalid=batch.rows_invalid,
            rows_recharged=batch.rows_recharged,
            rows_failed=batch.rows_failed,
            started_by=batch.started_by,
            store_id=batch.store_id,
            started_at=batch.started_at,
            finished_at=batch.finished_at,
        )
    )
    for start in range(0, len(rows), _CHUNK):
        await session.execute(
            sa.insert(sv_batch_rows),
            [
                {
                    "batch_id": batch.batch_id,
                    "row_number": r.row_number,
                    "card_number": r.card_number[:32],
                    "amount": r.amount,
                    "note": r.note[:200],
                    "outcome": r.outcome,
                    "reason": r.reason[:64],
                    "message": r.message[:300],
                    "movement_id": r.movement_id,
                }
                for r in rows[start : start + _CHUNK]
            ],
        )


async def get_batch(session: AsyncSession, batch_id: str) -> BatchRecord | None:
    row = (
        await session.execute(sa.select(sv_batches).where(sv_batches.c.batch_id == batch_id))
    ).first()
    return None if row is None else _batch(row)


async def list_rows(
    session: AsyncSession,
    batch_id: str,
    *,
    after_row: int = 0,
    limit: int = 100,
    problems_only: bool = False,
) -> list[RowRecord]:
    """In file order, after ``after_row``."""
    c = sv_batch_rows.c
    query = sa.select(sv_batch_rows).where(c.batch_id == batch_id, c.row_number > after_row)
    if problems_only:
        query = query.where(c.outcome.in_(PROBLEMS))
    query = query.order_by(c.row_number).limit(limit)
    return [_row(row) for row in await session.execute(query)]


# --- the worker's side -------------------------------------------------------------


def _claimable(owner: str, now: dt.datetime) -> sa.ColumnElement[bool]:
    c = sv_batches.c
    return sa.and_(
        c.state == RUNNING,
        sa.or_(
            c.lease_owner == owner,
            c.lease_owner == "",
            c.lease_until.is_(None),
            c.lease_until < now,
        ),
    )


async def claimable_batch_ids(session: AsyncSession, owner: str, now: dt.datetime) -> list[str]:
    """RUNNING batches nobody else holds a live lease on, oldest first."""
    result = await session.execute(
        sa.select(sv_batches.c.batch_id)
        .where(_claimable(owner, now))
        .order_by(sv_batches.c.started_at, sv_batches.c.batch_id)
    )
    return list(result.scalars())


async def claim(
    session: AsyncSession, batch_id: str, *, owner: str, now: dt.datetime, until: dt.datetime
) -> bool:
    """Take (or extend) the lease on a RUNNING batch: True when ``owner``
    now holds it. Another owner's lease is taken only once it has lapsed."""
    result = await session.execute(
        sa.update(sv_batches)
        .where(sv_batches.c.batch_id == batch_id, _claimable(owner, now))
        .values(lease_owner=owner, lease_until=until)
    )
    return getattr(result, "rowcount", 0) == 1


async def renew(session: AsyncSession, batch_id: str, *, owner: str, until: dt.datetime) -> bool:
    """A row's first statement: the batch is still RUNNING and ``owner``
    still holds it (False when another worker took it over), and the lease
    runs on. Being a write, it also takes the batch's row lock (PostgreSQL)
    or the write lock (SQLite) for the row's transaction, so a takeover
    waits for a row in flight and then sees the lease it renewed."""
    c = sv_batches.c
    result = await session.execute(
        sa.update(sv_batches)
        .where(c.batch_id == batch_id, c.state == RUNNING, c.lease_owner == owner)
        .values(lease_until=until)
    )
    return getattr(result, "rowcount", 0) == 1


async def release(session: AsyncSession, batch_id: str, *, owner: str) -> None:
    """Give the lease up (a worker shutting down), so that another worker
    need not wait for it to lapse."""
    c = sv_batches.c
    await session.execute(
        sa.update(sv_batches)
        .where(c.batch_id == batch_id, c.lease_owner == owner)
        .values(lease_owner="", lease_until=None)
    )


async def valid_rows(session: AsyncSession, batch_id: str, limit: int) -> list[RowRecord]:
    """The next rows still to recharge, in file order."""
    c = sv_batch_rows.c
    result = await session.execute(
        sa.select(sv_batch_rows)
        .where(c.batch_id == batch_id, c.outcome == VALID)
        .order_by(c.row_number)
        .limit(limit)
    )
    return [_row(row) for row in result]


async def get_row(session: AsyncSession, batch_id: str, row_number: int) -> RowRecord | None:
    c = sv_batch_rows.c
    row = (
        await session.execute(
            sa.select(sv_batch_rows).where(c.batch_id == batch_id, c.row_number == row_number)
        )
    ).first()
    return None if row is None else _row(row)


async def mark_row(
    session: AsyncSession,
    batch_id: str,
    row_number: int,
    outcome: str,
    *,
    reason: str = "",
    message: str = "",
    movement_id: str = "",
) -> bool:
    """A VALID row's end (RECHARGED or FAILED), and the batch's counter of
    it, in the transaction of its movement. False (and nothing changed)
    when the row was not VALID any more."""
    c = sv_batch_rows.c
    result = await session.execute(
        sa.update(sv_batch_rows)
        .where(c.batch_id == batch_id, c.row_number == row_number, c.outcome == VALID)
        .values(
            outcome=outcome,
            reason=reason[:64],
            message=message[:300],
            movement_id=movement_id,
        )
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    b = sv_batches.c
    counter = b.rows_recharged if outcome == RECHARGED else b.rows_failed
    await session.execute(
        sa.update(sv_batches).where(b.batch_id == batch_id).values({counter.name: counter + 1})
    )
    return True


async def outcome_counts(session: AsyncSession, batch_id: str) -> dict[str, int]:
    c = sv_batch_rows.c
    result = await session.execute(
        sa.select(c.outcome, sa.func.count()).where(c.batch_id == batch_id).group_by(c.outcome)
    )
    return {outcome: int(count) for outcome, count in result}


async def finish(session: AsyncSession, batch_id: str, *, owner: str, now: dt.datetime) -> bool:
    """DONE, once no row is left VALID, with the counters recounted from
    the rows; False when the batch was not this owner's to end or a row is
    still to do."""
    counts = await outcome_counts(session, batch_id)
    if counts.get(VALID, 0) or counts.get(PENDING, 0):
        return False
    c = sv_batches.c
    result = await session.execute(
        sa.update(sv_batches)
        .where(c.batch_id == batch_id, c.state == RUNNING, c.lease_owner == owner)
        .values(
            state=DONE,
            finished_at=now,
            lease_owner="",
            lease_until=None,
            rows=sum(counts.values()),
            rows_invalid=counts.get(INVALID, 0),
            rows_recharged=counts.get(RECHARGED, 0),
            rows_failed=counts.get(FAILED, 0),
        )
    )
    return getattr(result, "rowcount", 0) == 1
