"""The scheduled triggers: birthday greetings, anniversaries and the weekly
digest of calls for store managers. Each writes notifications (the planner
turns them into messages); none sends anything itself.

Greetings are planned a month at a time, a few days before the month
begins (``domain.schedules.months_to_plan``), in a run per kind and month
(``store.schedules``): the members are read from the members service page by
page with a service token, the page token kept as the run's cursor, so a run
cut short resumes where it stopped, on any replica, once its lease has run
out. Each greeting is a notification whose dedup key names the member and
the year: running a month again, or a page twice, writes nothing new.

- Birthdays: the member file keeps only the birth month in clear, so the
  month's members are selected by it (SelectMembers) and each is read
  (GetMember, which shows the service the day) - about N/12 reads a month
  for N members.
- Anniversaries (the member's own, and the day they enrolled): the dates
  are personal and selectable by nothing, so every active member is read
  once a month - N reads a month.
- The weekly digest: for each open store, once its week's digest time has
  come (store local time), each store manager gets one staff notification
  listing the open follow-up tasks due within the coming week.

Every job takes ``now``: the worker passes the clock, tests their own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from opentelemetry import trace

from chassis.db import Database, utcnow
from chassis.logs import get_logger
from chassis.telemetry import current_traceparent
from cornucopia.members.v1 import members_pb2
from services.notify.domain import Category
from services.notify.domain import schedules as rules
from services.notify.domain.policy import NotifyPolicy
from services.notify.peers import Peers, StoreFacts
from services.notify.store import intents
from services.notify.store import schedules as runs

log = get_logger(__name__)
_tracer = trace.get_tracer(__name__)

# Members read per page of a run, and at once from the members service.
PAGE = 200
READS_IN_FLIGHT = 8
# How long a run's claim holds without progress before another replica may
# take it over; every page renews it.
LEASE = dt.timedelta(minutes=5)
DEFAULT_INTERVAL_SECONDS = 600.0
MAX_DIGEST_TASKS = 1000
# The zone of a store that names none.
DEFAULT_TIME_ZONE = "UTC"


# --- what the jobs write -----------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """One notification a job wants written."""

    dedup_key: str
    trigger: str
    category: Category
    not_before: dt.datetime
    variables: dict[str, str] = field(default_factory=dict)
    member_id: str | None = None
    staff_id: str | None = None


async def write(
    db: Database, wanted: Sequence[Wanted], now: dt.datetime, trace: dict[str, str]
) -> int:
    """The notifications not yet written, in one transaction; how many."""
    written = 0
    async with db.transaction() as session:
        for w in wanted:
            written += await intents.add_notification(
                session,
                notification_id=str(uuid.uuid4()),
                dedup_key=w.dedup_key,
                trigger=w.trigger,
                category=w.category,
                variables=w.variables,
                created_at=now,
                trace_headers=trace,
                member_id=w.member_id,
                staff_id=w.staff_id,
                not_before=w.not_before,
                trigger_event_id=w.dedup_key,
            )
    return written


def _active(member: members_pb2.Member) -> bool:
    return member.state in (members_pb2.MEMBER_STATE_ACTIVE, members_pb2.MEMBER_STATE_UNSPECIFIED)


@dataclass(frozen=True)
class Month:
    """A month being planned, with the policy and the clock of the pass."""

    year: int
    month: int
    policy: NotifyPolicy
    now: dt.datetime


def birthday_wanted(member: members_pb2.Member, time_zone: str, m: Month) -> list[Wanted]:
    b = member.birthday
    if not _active(member) or b.month != m.month or not b.day:
        return []
    year = m.year
    greeting = rules.greeting_on(
        rules.BIRTHDAY,
        (b.year, b.month, b.day),
        year,
        at=m.policy.greeting_time,
        time_zone=time_zone,
        now=m.now,
    )
    if greeting is None:
        return []
    return [
        Wanted(
            dedup_key=f"birthday:{member.member_id}:{year}",
            trigger=rules.BIRTHDAY,
            category=Category.MARKETING,
            not_before=greeting.at,
            member_id=member.member_id,
        )
    ]


def anniversaries_wanted(member: members_pb2.Member, time_zone: str, m: Month) -> list[Wanted]:
    """The member's own anniversaries in the month (whose year is known:
    the greeting says how many years), and the day they enrolled."""
    if not _active(member):
        return []
    dates: list[tuple[str, tuple[int, int, int]]] = [
        (a.kind, (a.date.year, a.date.month, a.date.day))
        for a in member.anniversaries
        if a.kind and a.date.year and a.date.month == m.month and a.date.day
    ]
    if member.HasField("enroll_time"):
        enrolled = rules.local_day(member.enroll_time.ToDatetime(dt.UTC), time_zone)
        if enrolled.month == m.month:
            dates.append((rules.ENROLLMENT, (enrolled.year, enrolled.month, enrolled.day)))
    out: list[Wanted] = []
    for kind, original in dates:
        greeting = rules.greeting_on(
            kind, original, m.year, at=m.policy.greeting_time, time_zone=time_zone, now=m.now
        )
        if greeting is None or greeting.years is None:
            continue
        out.append(
            Wanted(
                dedup_key=f"anniversary:{member.member_id}:{kind}:{m.year}",
                trigger=rules.ANNIVERSARY,
                category=Category.MARKETING,
                not_before=greeting.at,
                variables={"kind": kind, "years": str(greeting.years)},
                member_id=member.member_id,
            )
        )
    return out


PlanMember = Callable[[members_pb2.Member, str, Month], list[Wanted]]


@dataclass
class RunOutcome:
    kind: str
    period: str
    claimed: bool = False
    members_read: int = 0
    written: int = 0
    done: bool = False


class Schedules:
    """The scheduled jobs. ``policy`` gives the chain's notify policy at the
    time of a pass."""

    def __init__(
        self,
        db: Database,
        peers: Peers,
        policy: Callable[[], Awaitable[NotifyPolicy]],
        *,
        worker_id: str | None = None,
        page_size: int = PAGE,
    ) -> None:
        self.db = db
        self.peers = peers
        self.policy = policy
        self.worker_id = worker_id or f"schedules-{uuid.uuid4()}"
        self.page_size = page_size
        # The stores' zones are kept for the life of the schedules: a store's
        # zone rarely changes, and a greeting a day off is the worst a stale
        # one does.
        self._zones: dict[str, str] = {}

    async def _members(self, ids: Sequence[str]) -> list[members_pb2.Member]:
        gate = asyncio.Semaphore(READS_IN_FLIGHT)

        async def read(member_id: str) -> members_pb2.Member | None:
            async with gate:
                return await self.peers.members.member(member_id)

        found = await asyncio.gather(*(read(m) for m in ids))
        return [m for m in found if m is not None]

    async def _zone(self, store_id: str) -> str:
        if store_id not in self._zones:
            facts = await self.peers.members.store(store_id) if store_id else None
            self._zones[store_id] = (facts.time_zone if facts else "") or DEFAULT_TIME_ZONE
        return self._zones[store_id]

    async def sweep(
        self,
        kind: str,
        month: tuple[int, int],
        criteria: members_pb2.MemberCriteria,
        plan: PlanMember,
        *,
        now: dt.datetime,
        max_pages: int | None = None,
    ) -> RunOutcome:
        """The run of ``kind`` for the month: claimed, then page after page
        until the last (or ``max_pages``, for tests of a run cut short).
        The run is one span: the notifications it writes carry its trace,
        and so do their messages."""
        with _tracer.start_as_current_span(
            f"notify schedule {kind}",
            attributes={
                "cornucopia.service": "notify",
                "cornucopia.period": rules.month_key(*month),
            },
        ):
            return await self._sweep(kind, month, criteria, plan, now=now, max_pages=max_pages)

    async def _sweep(
        self,
        kind: str,
        month: tuple[int, int],
        criteria: members_pb2.MemberCriteria,
        plan: PlanMember,
        *,
        now: dt.datetime,
        max_pages: int | None,
    ) -> RunOutcome:
        period = rules.month_key(*month)
        outcome = RunOutcome(kind, period)
        async with self.db.transaction() as session:
            run = await runs.claim_run(
                session, kind, period, worker_id=self.worker_id, now=now, lease=LEASE
            )
        if run is None:
            return outcome
        outcome.claimed = True
        planning = Month(*month, policy=await self.policy(), now=now)
        trace = current_traceparent()
        pages = 0
        while max_pages is None or pages < max_pages:
            ids, next_token = await self.peers.members.select_members(
                criteria, run.cursor, self.page_size
            )
            members = await self._members(ids)
            wanted: list[Wanted] = []
            for member in members:
                zone = await self._zone(member.home_store_id)
                wanted.extend(plan(member, zone, planning))
            written = await write(self.db, wanted, now, trace)
            async with self.db.transaction() as session:
                moved = await runs.advance_run(
                    session,
                    run,
                    worker_id=self.worker_id,
                    cursor=next_token,
                    members_read=len(ids),
                    written=written,
                    now=now,
                    lease=LEASE,
                    done=not next_token,
                )
                fresh = await runs.get_run(session, kind, period)
            outcome.members_read += len(ids)
            outcome.written += written
            pages += 1
            if not moved or fresh is None:
                log.info("schedule run taken over", kind=kind, period=period)
                return outcome
            run = fresh
            if not next_token:
                outcome.done = True
                return outcome
        return outcome

    async def birthdays(self, now: dt.datetime, max_pages: int | None = None) -> list[RunOutcome]:
        """The birthday greetings of the months due at ``now``."""
        return [
            await self.sweep(
                rules.BIRTHDAY,
                month,
                members_pb2.MemberCriteria(birth_months=[month[1]]),
                birthday_wanted,
                now=now,
                max_pages=max_pages,
            )
            for month in rules.months_to_plan(now)
        ]

    async def anniversaries(
        self, now: dt.datetime, max_pages: int | None = None
    ) -> list[RunOutcome]:
        """The anniversary greetings of the months due at ``now``: every
        active member is read (their dates are selectable by nothing)."""
        return [
            await self.sweep(
                rules.ANNIVERSARY,
                month,
                members_pb2.MemberCriteria(),
                anniversaries_wanted,
                now=now,
                max_pages=max_pages,
            )
            for month in rules.months_to_plan(now)
        ]

    async def digests(self, now: dt.datetime) -> list[RunOutcome]:
        """This week's digest of each open store whose digest time has come,
        once per store and week."""
        policy = await self.policy()
        outcomes = []
        for found in await self.peers.members.open_stores():
            facts = replace(found, time_zone=found.time_zone or DEFAULT_TIME_ZONE)
            self._zones[facts.store_id] = facts.time_zone
            due = rules.digest_due(now, facts.time_zone, policy.digest_weekday, policy.digest_time)
            if due is None:
                continue
            with _tracer.start_as_current_span(
                f"notify schedule {rules.WEEKLY_CALL_DIGEST}",
                attributes={"cornucopia.service": "notify", "cornucopia.store_id": facts.store_id},
            ):
                outcome = await self._digest(facts, due, now)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    async def _digest(
        self, facts: StoreFacts, due: rules.DigestDue, now: dt.datetime
    ) -> RunOutcome | None:
        period = f"{due.week}:{facts.store_id}"
        async with self.db.transaction() as session:
            run = await runs.claim_run(
                session,
                rules.WEEKLY_CALL_DIGEST,
                period,
                worker_id=self.worker_id,
                now=now,
                lease=LEASE,
            )
        if run is None:
            return None
        wanted: list[Wanted] = []
        managers = sorted(
            staff.staff_id
            for staff in await self.peers.members.store_managers(facts.store_id)
            if staff.store_id == facts.store_id
        )
        if managers:
            tasks, more = await self.peers.campaigns.open_tasks(
                facts.store_id, due.until, MAX_DIGEST_TASKS
            )
            if more:
                log.warning("digest cut short", store_id=facts.store_id, shown=len(tasks))
            lines = [
                rules.CallLine(t.due_time.ToDatetime(dt.UTC), t.member_id, t.reason) for t in tasks
            ]
            # Member numbers, times and reasons only: the notification
            # keeps no personal value, and the manager looks a member up.
            variables = {
                "store_id": facts.store_id,
                "store_name": facts.display_name,
                "task_count": str(len(tasks)),
                "week_start": due.day.isoformat(),
                "call_list": rules.call_list(lines, facts.time_zone),
            }
            wanted = [
                Wanted(
                    dedup_key=f"digest:{facts.store_id}:{due.week}:{staff_id}",
                    trigger=rules.WEEKLY_CALL_DIGEST,
                    category=Category.TRANSACTIONAL,
                    not_before=due.at,
                    variables=variables,
                    staff_id=staff_id,
                )
                for staff_id in managers
            ]
        written = await write(self.db, wanted, now, current_traceparent())
        async with self.db.transaction() as session:
            await runs.advance_run(
                session,
                run,
                worker_id=self.worker_id,
                cursor="",
                members_read=0,
                written=written,
                now=now,
                lease=LEASE,
                done=True,
            )
        return RunOutcome(
            rules.WEEKLY_CALL_DIGEST, period, claimed=True, written=written, done=True
        )

    async def run_pass(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Every job once; one failing does not stop the others. Returns the
        notifications written by job."""
        at = now or utcnow()
        counts = {rules.BIRTHDAY: 0, rules.ANNIVERSARY: 0, rules.WEEKLY_CALL_DIGEST: 0}
        jobs: list[tuple[str, Callable[[dt.datetime], Awaitable[list[RunOutcome]]]]] = [
            (rules.BIRTHDAY, self.birthdays),
            (rules.ANNIVERSARY, self.anniversaries),
            (rules.WEEKLY_CALL_DIGEST, self.digests),
        ]
        for kind, job in jobs:
            try:
                counts[kind] = sum(o.written for o in await job(at))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduled job failed; will retry", job=kind)
        return counts


class ScheduleWorker:
    """Runs the pass every ``NOTIFY_SCHEDULE_INTERVAL_SECONDS``."""

    def __init__(self, schedules: Schedules, interval_seconds: float | None = None) -> None:
        self.schedules = schedules
        self.interval = interval_seconds or float(
            os.environ.get("NOTIFY_SCHEDULE_INTERVAL_SECONDS", DEFAULT_INTERVAL_SECONDS)
        )

    async def run(self) -> None:
        while True:
            try:
                counts = await self.schedules.run_pass()
                if any(counts.values()):
                    log.info("scheduled notifications written", **counts)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("schedule pass failed; will retry")
            await asyncio.sleep(self.interval)
