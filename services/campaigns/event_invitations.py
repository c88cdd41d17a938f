"""Writing invitations to member events: a list of members within the
caller's unit of work, and a segment's members by an invite job, a page at
a time, one transaction a page.

A member is invited once per event whatever asks (the guests' primary key:
an insert that finds the member invited changes nothing), and only the
insert that took publishes ``campaigns.v1.event.invited``. A job's page is
invited in the transaction that moves the job's cursor past it, and the
cursor moves only from where the runner read it: a crash rolls the page
back whole and a restart reads it again; two runners never both take it.
Invitations take no seat (a YES does) and go out while answers are taken:
a job finding answers closed stops there."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, utcnow
from cornucopia.campaigns.v1 import events_pb2
from cornucopia.common.v1 import org_pb2
from services.campaigns import events
from services.campaigns.coupon_ledger import SELECT_PAGE, MemberSelector, Stamp, criteria_of
from services.campaigns.domain.member_events import (
    STOPPED_RSVP_CLOSED,
    InviteJobState,
    MemberEvent,
)
from services.campaigns.store import member_events as store


def _stamp_proto(stamp: Stamp) -> org_pb2.AuditStamp:
    message = org_pb2.AuditStamp(principal=stamp.principal, store_id=stamp.store_id)
    message.time.FromDatetime(stamp.at)
    return message


def _invited_event(event: MemberEvent, member_id: str, stamp: Stamp) -> events_pb2.EventInvited:
    message = events_pb2.EventInvited(
        event_id=event.event_id,
        member_id=member_id,
        store_id=event.store_id,
        kind=event.kind.value,
        stamp=_stamp_proto(stamp),
    )
    message.start_time.FromDatetime(event.start_at)
    message.rsvp_deadline.FromDatetime(event.rsvp_deadline)
    return message


async def invite(
    session: AsyncSession, event: MemberEvent, member_ids: list[str], stamp: Stamp
) -> list[str]:
    """Invites the members not invited yet, one event.invited each; returns
    those invited now."""
    invited = await store.invite(session, event.event_id, member_ids, stamp.at)
    for member_id in invited:
        await events.publish(session, events.EVENT_INVITED, _invited_event(event, member_id, stamp))
    return invited


async def _invite_page(
    db: Database, job: store.InviteJobRecord, member_ids: list[str], next_cursor: str
) -> None:
    """One page of the job's members, in one transaction with the cursor's
    move; nothing when another runner took the page first."""
    now = utcnow()
    async with db.transaction() as session:
        record = await store.get_event(session, job.event_id)
        if record is None or not record.event.rsvp_open(now):
            # Answers closed while the job ran: the rest are not invited.
            if await store.take_invite_page(session, job.job_id, job.cursor, ""):
                await store.finish_invite_job(
                    session, job.job_id, now, stop_reason=STOPPED_RSVP_CLOSED
                )
            return
        if not await store.take_invite_page(session, job.job_id, job.cursor, next_cursor):
            return
        unique = list(dict.fromkeys(member_ids))
        stamp = Stamp(job.created_by, job.created_store_id, now)
        invited = await invite(session, record.event, unique, stamp)
        await store.count_invite_page(session, job.job_id, read=len(unique), invited=len(invited))
        if not next_cursor:
            await store.finish_invite_job(session, job.job_id, now)


async def run_invite_job(db: Database, job_id: str, selector: MemberSelector) -> None:
    """Reads the job's segment a page at a time (from the page it
    recorded) and invites each page, until the last one or until answers
    close; safe to run again after a crash, and side by side with another
    runner."""
    while True:
        async with db.sessions() as session:
            job = await store.get_invite_job(session, job_id=job_id)
        assert job is not None
        if job.state != InviteJobState.RUNNING:
            return
        if not job.selecting:
            # No page left (the last page's transaction finishes the job
            # itself; this only mends a job left running without pages).
            async with db.transaction() as session:
                await store.finish_invite_job(session, job_id, utcnow())
            return
        member_ids, next_cursor = await selector.select_members(
            criteria_of(job.criteria), job.cursor, SELECT_PAGE
        )
        await _invite_page(db, job, member_ids, next_cursor)


async def run_invite_jobs(db: Database, selector: MemberSelector) -> int:
    """Runs (or resumes) every invite job still running; returns how many."""
    async with db.sessions() as session:
        running = await store.running_invite_jobs(session)
    for job_id in running:
        await run_invite_job(db, job_id, selector)
    return len(running)
