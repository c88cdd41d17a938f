"""Runs of the scheduled jobs: one row per job and period (the birthdays of
March 2026, a store's digest of week 2026-W10), claimed by one worker at a
time with a lease, with the cursor it has reached. A run cut short (its
worker died) is taken over once the lease has run out and resumed at its
cursor; the notifications it writes are unique by their dedup key, so a page
done twice writes nothing the second time."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from services.notify.store.base import metadata

RUNNING = "running"
DONE = "done"

schedule_runs = sa.Table(
    "schedule_runs",
    metadata,
    # "birthday", "anniversary", "weekly_call_digest".
    sa.Column("kind", sa.String(32), primary_key=True),
    # "2026-03" for a month's greetings, "2026-W10:S001" for a digest.
    sa.Column("period", sa.String(80), primary_key=True),
    sa.Column("state", sa.String(12), nullable=False),
    # Where the run stands: the members service's next page token.
    sa.Column("cursor", sa.String(1024), nullable=False, server_default=""),
    sa.Column("claimed_by", sa.String(64), nullable=False),
    sa.Column("lease_until", UTCDateTime, nullable=False),
    sa.Column("members_read", sa.Integer, nullable=False, server_default="0"),
    sa.Column("written", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
)


@dataclass(frozen=True)
class Run:
    kind: str
    period: str
    state: str
    cursor: str
    claimed_by: str
    lease_until: dt.datetime
    members_read: int
    written: int
    started_at: dt.datetime
    finished_at: dt.datetime | None


def _run(row: Any) -> Run:
    m = row._mapping
    return Run(
        kind=m["kind"],
        period=m["period"],
        state=m["state"],
        cursor=m["cursor"],
        claimed_by=m["claimed_by"],
        lease_until=m["lease_until"],
        members_read=m["members_read"],
        written=m["written"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
    )


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


async def get_run(
    session: AsyncSession, kind: str, period: str, *, for_update: bool = False
) -> Run | None:
    c = schedule_runs.c
    query = sa.select(schedule_runs).where(c.kind == kind, c.period == period)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _run(row)


async def claim_run(
    session: AsyncSession,
    kind: str,
    period: str,
    *,
    worker_id: str,
    now: dt.datetime,
    lease: dt.timedelta,
) -> Run | None:
    """The run for this worker to do (new, its own, or one whose lease ran
    out); None when it is done or another worker holds it."""
    await session.execute(
        _insert(session)(schedule_runs)
        .values(
            kind=kind,
            period=period,
            state=RUNNING,
            cursor="",
            claimed_by=worker_id,
            lease_until=now + lease,
            members_read=0,
            written=0,
            started_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing()
    )
    run = await get_run(session, kind, period, for_update=True)
    assert run is not None  # inserted, or there already
    if run.state == DONE:
        return None
    if run.claimed_by != worker_id and run.lease_until > now:
        return None
    c = schedule_runs.c
    await session.execute(
        sa.update(schedule_runs)
        .where(c.kind == kind, c.period == period)
        .values(claimed_by=worker_id, lease_until=now + lease, updated_at=now)
    )
    return await get_run(session, kind, period)


async def advance_run(
    session: AsyncSession,
    run: Run,
    *,
    worker_id: str,
    cursor: str,
    members_read: int,
    written: int,
    now: dt.datetime,
    lease: dt.timedelta,
    done: bool,
) -> bool:
    """Moves a run held by ``worker_id`` from the cursor it was at to
    ``cursor``, counting the page; False (and nothing written) when the
    worker no longer holds it there (its lease ran out and another took
    it over)."""
    c = schedule_runs.c
    values: dict[str, Any] = {
        "cursor": cursor,
        "members_read": c.members_read + members_read,
        "written": c.written + written,
        "lease_until": now + lease,
        "updated_at": now,
    }
    if done:
        values.update(state=DONE, finished_at=now)
    result = await session.execute(
        sa.update(schedule_runs)
        .where(
            c.kind == run.kind,
            c.period == run.period,
            c.claimed_by == worker_id,
            c.cursor == run.cursor,
            c.state == RUNNING,
        )
        .values(**values)
    )
    return bool(getattr(result, "rowcount", 0) == 1)
