"""Member events and their guests. Each function runs in the caller's unit
of work.

The seats taken (``confirmed``) change only by conditional updates whose
WHERE clause is the capacity itself, backed by a CHECK constraint: however
many answers arrive at once, no more YES are confirmed than seats."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from services.campaigns.domain.member_events import Answer, EventKind, InviteJobState, MemberEvent
from services.campaigns.store import metadata

member_events = sa.Table(
    "member_events",
    metadata,
    sa.Column("event_id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False),
    sa.Column("start_at", UTCDateTime, nullable=False),
    sa.Column("end_at", UTCDateTime, nullable=False),
    sa.Column("capacity", sa.Integer, nullable=False),
    sa.Column("rsvp_deadline", UTCDateTime, nullable=False),
    sa.Column("confirmed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.CheckConstraint(
        "confirmed >= 0 AND confirmed <= capacity", name="ck_member_events_confirmed"
    ),
    sa.Index("ix_member_events_store_start", "store_id", "start_at", "event_id"),
    sa.Index("ix_member_events_start", "start_at", "event_id"),
)

# One row per member with a place at an event: invited, answered, or
# checked in at the door (a walk-in may have no invitation).
member_event_guests = sa.Table(
    "member_event_guests",
    metadata,
    sa.Column("event_id", sa.String(16), primary_key=True),
    sa.Column("member_id", sa.String(16), primary_key=True),
    sa.Column("invited", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("invited_at", UTCDateTime, nullable=True),
    # "" no answer, "yes", "no".
    sa.Column("answer", sa.String(3), nullable=False, server_default=""),
    sa.Column("answered_at", UTCDateTime, nullable=True),
    sa.Column("checked_in_at", UTCDateTime, nullable=True),
    sa.Column("checked_in_by", sa.String(100), nullable=False, server_default=""),
    sa.Column("walk_in", sa.Boolean, nullable=False, server_default=sa.false()),
)

# 0008: inviting a segment's members, page by page. The criteria as they
# were at the call (JSON of members' MemberCriteria), the SelectMembers page
# token reached, and whether pages remain. A member is invited once per
# event whatever the job (the guests' primary key), so the job keeps only
# its counters.
member_event_invite_jobs = sa.Table(
    "member_event_invite_jobs",
    metadata,
    sa.Column("job_id", sa.String(16), primary_key=True),
    sa.Column("request_id", sa.String(220), nullable=False, unique=True),
    sa.Column("event_id", sa.String(16), nullable=False),
    sa.Column("segment_id", sa.String(40), nullable=False),
    sa.Column("segment_version", sa.BigInteger, nullable=False),
    sa.Column("criteria", sa.Text, nullable=False),
    sa.Column("cursor", sa.String(1024), nullable=False, server_default=""),
    sa.Column("selecting", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("invited", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("already_invited", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("stop_reason", sa.String(40), nullable=False, server_default=""),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Index("ix_member_event_invite_jobs_state", "state"),
)


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


@dataclass(frozen=True)
class EventRecord:
    event: MemberEvent
    confirmed: int
    created_by: str
    created_at: dt.datetime


@dataclass(frozen=True)
class Guest:
    event_id: str
    member_id: str
    invited: bool
    answer: Answer
    answered_at: dt.datetime | None
    checked_in_at: dt.datetime | None
    checked_in_by: str
    walk_in: bool


def _event(row: Any) -> EventRecord:
    return EventRecord(
        event=MemberEvent(
            event_id=row.event_id,
            name=row.name,
            kind=EventKind(row.kind),
            store_id=row.store_id,
            start_at=row.start_at,
            end_at=row.end_at,
            capacity=row.capacity,
            rsvp_deadline=row.rsvp_deadline,
        ),
        confirmed=row.confirmed,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def _guest(row: Any) -> Guest:
    return Guest(
        event_id=row.event_id,
        member_id=row.member_id,
        invited=bool(row.invited),
        answer=Answer(row.answer),
        answered_at=row.answered_at,
        checked_in_at=row.checked_in_at,
        checked_in_by=row.checked_in_by,
        walk_in=bool(row.walk_in),
    )


async def insert_event(
    session: AsyncSession, event: MemberEvent, *, created_by: str, now: dt.datetime
) -> None:
    await session.execute(
        sa.insert(member_events).values(
            event_id=event.event_id,
            name=event.name,
            kind=event.kind.value,
            store_id=event.store_id,
            start_at=event.start_at,
            end_at=event.end_at,
            capacity=event.capacity,
            rsvp_deadline=event.rsvp_deadline,
            confirmed=0,
            created_by=created_by,
            created_at=now,
        )
    )


async def get_event(session: AsyncSession, event_id: str) -> EventRecord | None:
    row = (
        await session.execute(sa.select(member_events).where(member_events.c.event_id == event_id))
    ).first()
    return None if row is None else _event(row)


async def list_events(
    session: AsyncSession,
    *,
    store_ids: tuple[str, ...] | None,
    end_after: dt.datetime | None,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[EventRecord]:
    """Earliest start first; ``store_ids`` None: every store."""
    c = member_events.c
    query = sa.select(member_events)
    if store_ids is not None:
        query = query.where(c.store_id.in_(store_ids))
    if end_after is not None:
        query = query.where(c.end_at > end_after)
    if after is not None:
        query = query.where(
            sa.or_(c.start_at > after[0], sa.and_(c.start_at == after[0], c.event_id > after[1]))
        )
    rows = await session.execute(query.order_by(c.start_at, c.event_id).limit(limit))
    return [_event(row) for row in rows]


async def invite(
    session: AsyncSession, event_id: str, member_ids: list[str], now: dt.datetime
) -> list[str]:
    """Invites the members not invited yet; returns those this call invited.
    A member who walked in (a row, not invited) is invited all the same."""
    if not member_ids:
        return []
    g = member_event_guests.c
    invited: list[str] = []
    for start in range(0, len(member_ids), 500):
        chunk = member_ids[start : start + 500]
        insert = _insert(session)(member_event_guests).values(
            [
                {"event_id": event_id, "member_id": m, "invited": True, "invited_at": now}
                for m in chunk
            ]
        )
        rows = await session.execute(
            insert.on_conflict_do_update(
                index_elements=[g.event_id, g.member_id],
                set_={"invited": True, "invited_at": now},
                where=member_event_guests.c.invited == sa.false(),
            ).returning(g.member_id)
        )
        invited += [row.member_id for row in rows]
    return invited


async def get_guest(
    session: AsyncSession, event_id: str, member_id: str, *, for_update: bool = False
) -> Guest | None:
    g = member_event_guests.c
    query = sa.select(member_event_guests).where(g.event_id == event_id, g.member_id == member_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _guest(row)


async def take_seat(session: AsyncSession, event_id: str) -> bool:
    """One more seat taken, unless none is left."""
    c = member_events.c
    result = await session.execute(
        sa.update(member_events)
        .where(c.event_id == event_id, c.confirmed < c.capacity)
        .values(confirmed=c.confirmed + 1)
        .returning(c.event_id)
    )
    return result.first() is not None


async def give_back_seat(session: AsyncSession, event_id: str) -> None:
    c = member_events.c
    await session.execute(
        sa.update(member_events)
        .where(c.event_id == event_id, c.confirmed > 0)
        .values(confirmed=c.confirmed - 1)
    )


async def set_answer(
    session: AsyncSession,
    event_id: str,
    member_id: str,
    *,
    before: Answer,
    after: Answer,
    at: dt.datetime,
) -> bool:
    """The answer changed from ``before``; False when it was not that any
    more (another request got there first)."""
    g = member_event_guests.c
    result = await session.execute(
        sa.update(member_event_guests)
        .where(g.event_id == event_id, g.member_id == member_id, g.answer == before.value)
        .values(answer=after.value, answered_at=at)
        .returning(g.member_id)
    )
    return result.first() is not None


async def check_in(
    session: AsyncSession, event_id: str, member_id: str, *, by: str, at: dt.datetime
) -> bool:
    """Checks the member in, once: False when they were already. A member
    without a row (not invited) gets one, as a walk-in."""
    g = member_event_guests.c
    await session.execute(
        _insert(session)(member_event_guests)
        .values(event_id=event_id, member_id=member_id, invited=False)
        .on_conflict_do_nothing(index_elements=[g.event_id, g.member_id])
    )
    result = await session.execute(
        sa.update(member_event_guests)
        .where(g.event_id == event_id, g.member_id == member_id, g.checked_in_at.is_(None))
        .values(
            checked_in_at=at,
            checked_in_by=by,
            walk_in=g.answer != Answer.YES.value,
        )
        .returning(g.member_id)
    )
    return result.first() is not None


@dataclass(frozen=True)
class Attendance:
    invited: int
    yes: int
    no: int
    no_answer: int
    checked_in: int
    walk_ins: int
    no_shows: int


async def attendance(session: AsyncSession, event_id: str) -> Attendance:
    g = member_event_guests.c

    def count(condition: Any) -> Any:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    checked = g.checked_in_at.is_not(None)
    row = (
        await session.execute(
            sa.select(
                count(g.invited == sa.true()).label("invited"),
                count(g.answer == Answer.YES.value).label("yes"),
                count(g.answer == Answer.NO.value).label("no"),
                count(sa.and_(g.invited == sa.true(), g.answer == "")).label("no_answer"),
                count(checked).label("checked_in"),
                count(sa.and_(checked, g.walk_in == sa.true())).label("walk_ins"),
                count(sa.and_(g.answer == Answer.YES.value, g.checked_in_at.is_(None))).label(
                    "no_shows"
                ),
            ).where(g.event_id == event_id)
        )
    ).one()
    return Attendance(
        invited=int(row.invited),
        yes=int(row.yes),
        no=int(row.no),
        no_answer=int(row.no_answer),
        checked_in=int(row.checked_in),
        walk_ins=int(row.walk_ins),
        no_shows=int(row.no_shows),
    )


# --- invite jobs ------------------------------------------------------------------------


@dataclass(frozen=True)
class InviteJobRecord:
    job_id: str
    request_id: str
    event_id: str
    segment_id: str
    segment_version: int
    criteria: str
    state: InviteJobState
    created_by: str
    created_store_id: str
    created_at: dt.datetime
    cursor: str = ""
    selecting: bool = True
    total: int = 0
    invited: int = 0
    already_invited: int = 0
    stop_reason: str = ""
    finished_at: dt.datetime | None = None


def _invite_job(row: Any) -> InviteJobRecord:
    return InviteJobRecord(
        job_id=row.job_id,
        request_id=row.request_id,
        event_id=row.event_id,
        segment_id=row.segment_id,
        segment_version=row.segment_version,
        criteria=row.criteria,
        state=InviteJobState(row.state),
        created_by=row.created_by,
        created_store_id=row.created_store_id,
        created_at=row.created_at,
        cursor=row.cursor,
        selecting=bool(row.selecting),
        total=row.total,
        invited=row.invited,
        already_invited=row.already_invited,
        stop_reason=row.stop_reason,
        finished_at=row.finished_at,
    )


async def insert_invite_job(session: AsyncSession, job: InviteJobRecord) -> None:
    await session.execute(
        sa.insert(member_event_invite_jobs).values(
            job_id=job.job_id,
            request_id=job.request_id,
            event_id=job.event_id,
            segment_id=job.segment_id,
            segment_version=job.segment_version,
            criteria=job.criteria,
            cursor=job.cursor,
            selecting=job.selecting,
            state=job.state.value,
            created_by=job.created_by,
            created_store_id=job.created_store_id,
            created_at=job.created_at,
        )
    )


async def get_invite_job(
    session: AsyncSession, *, job_id: str = "", request_id: str = ""
) -> InviteJobRecord | None:
    c = member_event_invite_jobs.c
    query = sa.select(member_event_invite_jobs).where(
        c.job_id == job_id if job_id else c.request_id == request_id
    )
    row = (await session.execute(query)).first()
    return None if row is None else _invite_job(row)


async def running_invite_jobs(session: AsyncSession) -> list[str]:
    c = member_event_invite_jobs.c
    rows = await session.execute(
        sa.select(c.job_id).where(c.state == InviteJobState.RUNNING.value).order_by(c.created_at)
    )
    return [row.job_id for row in rows]


async def take_invite_page(
    session: AsyncSession, job_id: str, cursor: str, next_cursor: str
) -> bool:
    """The job moves from the page at ``cursor`` to ``next_cursor`` (no
    page left when empty): False when it is no longer at ``cursor`` (another
    runner took this page, or the job stopped); nothing is written then."""
    c = member_event_invite_jobs.c
    moved = await session.execute(
        sa.update(member_event_invite_jobs)
        .where(
            c.job_id == job_id,
            c.cursor == cursor,
            c.selecting.is_(True),
            c.state == InviteJobState.RUNNING.value,
        )
        .values(cursor=next_cursor, selecting=bool(next_cursor))
        .returning(c.job_id)
    )
    return moved.first() is not None


async def count_invite_page(session: AsyncSession, job_id: str, *, read: int, invited: int) -> None:
    c = member_event_invite_jobs.c
    await session.execute(
        sa.update(member_event_invite_jobs)
        .where(c.job_id == job_id)
        .values(
            total=c.total + read,
            invited=c.invited + invited,
            already_invited=c.already_invited + (read - invited),
        )
    )


async def finish_invite_job(
    session: AsyncSession, job_id: str, now: dt.datetime, *, stop_reason: str = ""
) -> bool:
    """The job is DONE: every page read, or stopped (``stop_reason``) with
    pages left unread. False when it was done already."""
    c = member_event_invite_jobs.c
    done = await session.execute(
        sa.update(member_event_invite_jobs)
        .where(c.job_id == job_id, c.state == InviteJobState.RUNNING.value)
        .values(
            state=InviteJobState.DONE.value,
            selecting=False,
            stop_reason=stop_reason,
            finished_at=now,
        )
        .returning(c.job_id)
    )
    return done.first() is not None
