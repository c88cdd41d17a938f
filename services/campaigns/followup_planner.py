"""Follow-up plans at work: the consumers that turn members' and loyalty's
events into tasks, and the periodic pass (birthdays, win-back, due tasks).

What campaigns needs of a member beyond events (phone consent, consultant,
birthday) is personal or not in any event: it is asked of members, with a
token of campaigns' own, at the moment a task is about to be created. A
member who refused phone contact gets a task recorded as SKIPPED, so that
statistics show it; no event is published for it.

Every task is inserted under UNIQUE(plan_id, member_id, occasion): a
redelivered event, a replayed sale or two replicas running the same pass
create it once, and only the insert that took publishes
``followup.task_created``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bus import STREAMS
from chassis.config import Settings
from chassis.db import Database, utcnow
from chassis.grpcclient import Peer, bearer, passed_on, rich_error
from chassis.inbox import Envelope, Subscription
from chassis.logs import get_logger
from cornucopia.campaigns.v1 import events_pb2
from cornucopia.loyalty.v1 import events_pb2 as loyalty_events
from cornucopia.members.v1 import events_pb2 as member_events
from cornucopia.members.v1 import (
    members_pb2,
    members_pb2_grpc,
    organisation_pb2,
    organisation_pb2_grpc,
)
from services.campaigns import events
from services.campaigns.domain import followups as domain
from services.campaigns.domain.followups import MemberFacts, Plan, PlanKind, TaskState
from services.campaigns.store import followups as store

log = get_logger(__name__)

SUBJECT = "campaigns"
CALL_TIMEOUT_SECONDS = 5.0
BATCH = 200
DEFAULT_INTERVAL_SECONDS = 900.0

MEMBER_SUBJECTS = (
    "members.v1.member.enrolled",
    "members.v1.member.merged",
    "members.v1.member.erased",
    "members.v1.member.consultant_changed",
    "members.v1.store.opened",
    "members.v1.store.reopened",
)
SALE_SUBJECTS = ("loyalty.v1.sale.recorded",)


# --- what campaigns asks members ----------------------------------------


@dataclass(frozen=True)
class StoreFacts:
    store_id: str
    region_id: str
    time_zone: str


class MembersDirectory(Protocol):
    async def member(self, member_id: str) -> MemberFacts | None: ...

    async def store(self, store_id: str) -> StoreFacts | None: ...


class MembersClient:
    """campaigns' channel to members: member facts and stores with a token
    of its own; follow-up records with the caller's token (they are the
    staff member's call, recorded from their store)."""

    def __init__(self, settings: Settings) -> None:
        self.peer = Peer(
            settings.peer("members"),
            [
                members_pb2.DESCRIPTOR.services_by_name["MembersService"],
                organisation_pb2.DESCRIPTOR.services_by_name["OrganisationService"],
            ],
            token_secret=settings.token_secret,
            subject=SUBJECT,
            timeout=CALL_TIMEOUT_SECONDS,
        )

    @property
    def _members(self) -> members_pb2_grpc.MembersServiceAsyncStub:
        return self.peer.stub(members_pb2_grpc.MembersServiceStub)  # type: ignore[return-value]

    @property
    def _organisation(self) -> organisation_pb2_grpc.OrganisationServiceAsyncStub:
        return self.peer.stub(organisation_pb2_grpc.OrganisationServiceStub)  # type: ignore[return-value]

    async def member(self, member_id: str) -> MemberFacts | None:
        found = await self.peer.call(
            self._members.GetMember,
            members_pb2.GetMemberRequest(member_id=member_id),
            missing_ok=True,
        )
        return None if found is None else facts_of(found)

    async def store(self, store_id: str) -> StoreFacts | None:
        found = await self.peer.call(
            self._organisation.GetStore,
            organisation_pb2.GetStoreRequest(store_id=store_id),
            missing_ok=True,
        )
        if found is None:
            return None
        return StoreFacts(found.store_id, found.region_id, found.time_zone)

    async def select_members(
        self, criteria: members_pb2.MemberCriteria, page_token: str, page_size: int
    ) -> tuple[list[str], str]:
        """One page of the members matching segment criteria, with the
        token of the next (empty on the last)."""
        found = await self.peer.call(
            self._members.SelectMembers,
            members_pb2.SelectMembersRequest(
                criteria=criteria, page_token=page_token, page_size=page_size
            ),
        )
        return list(found.member_ids), str(found.next_page_token)

    async def count_members(self, criteria: members_pb2.MemberCriteria) -> int:
        found = await self.peer.call(
            self._members.CountMembers, members_pb2.CountMembersRequest(criteria=criteria)
        )
        return int(found.count)

    async def record_follow_up(
        self,
        token: str,
        *,
        request_id: str,
        member_id: str,
        outcome: int,
        note: str,
        duration_seconds: int,
    ) -> str:
        """Records the call on the member's file as the caller; returns the
        follow-up's id. Idempotent by ``request_id``."""
        try:
            saved = await self._members.RecordFollowUp(
                members_pb2.RecordFollowUpRequest(
                    request_id=request_id,
                    follow_up=members_pb2.FollowUp(
                        member_id=member_id,
                        channel=members_pb2.FOLLOW_UP_CHANNEL_PHONE,
                        outcome=outcome,  # type: ignore[arg-type]
                        next_step=note,
                        duration_seconds=duration_seconds,
                    ),
                ),
                metadata=bearer(token),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            raise passed_on(rich_error(exc), peer="members") from None
        return str(saved.follow_up_id)

    async def close(self) -> None:
        await self.peer.close()


def facts_of(member: members_pb2.Member) -> MemberFacts:
    consent: bool | None = None
    for given in member.consents:
        if given.channel == members_pb2.CONTACT_CHANNEL_PHONE:
            consent = given.granted
    birthday: dt.date | None = None
    if member.HasField("birthday") and member.birthday.month and member.birthday.day:
        birthday = domain.birthday_in(
            member.birthday.year or 2000, member.birthday.month, member.birthday.day
        )
    return MemberFacts(
        member_id=member.member_id,
        home_store_id=member.home_store_id,
        consultant_id=member.consultant_id,
        phone_consent=domain.phone_allowed(consent),
        birthday=birthday,
        active=member.state
        in (members_pb2.MEMBER_STATE_ACTIVE, members_pb2.MEMBER_STATE_UNSPECIFIED),
    )


# --- creating tasks -----------------------------------------------------


def timestamp(at: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


async def store_of(
    session: AsyncSession, directory: MembersDirectory, store_id: str
) -> store.KnownStore:
    """The store's time zone from members' events, else asked and kept."""
    known = await store.get_store(session, store_id)
    if known is not None:
        return known
    found = await directory.store(store_id)
    if found is None:
        return store.KnownStore(store_id, "", "UTC")
    await store.note_store(session, found.store_id, found.region_id, found.time_zone)
    return store.KnownStore(found.store_id, found.region_id, found.time_zone)


@dataclass(frozen=True)
class Aim:
    """One call a plan wants: which occasion, why, and the local day aimed at
    (or an instant not to be before, for calls wanted as soon as possible)."""

    occasion: str
    reason: str
    day: dt.date
    not_before: dt.datetime | None = None


async def create_task(  # noqa: PLR0917
    session: AsyncSession,
    plan: Plan,
    facts: MemberFacts,
    known_store: store.KnownStore,
    aim: Aim,
    now: dt.datetime,
) -> store.Task | None:
    """Creates the plan's task for the occasion unless it exists; returns it
    when this call created it."""
    due = domain.due_time(
        aim.day, known_store.time_zone, plan.call_windows, not_before=aim.not_before
    )
    if not facts.phone_consent:
        state, skip = TaskState.SKIPPED, domain.SKIP_NO_PHONE_CONSENT
    else:
        state, skip = (TaskState.DUE if due <= now else TaskState.SCHEDULED), ""
    task = store.Task(
        task_id=f"T{uuid.uuid4().hex[:20].upper()}",
        plan_id=plan.plan_id,
        plan_kind=plan.kind,
        member_id=facts.member_id,
        store_id=known_store.store_id,
        assignee_staff_id=facts.consultant_id,
        reason=aim.reason,
        occasion=aim.occasion,
        state=state,
        due_time=due,
        skip_reason=skip,
        outcome=None,
        follow_up_id="",
        completed_by="",
        completed_at=None,
        created_at=now,
        reschedule_count=0,
    )
    if not await store.insert_task(session, task):
        return None
    if state != TaskState.SKIPPED:
        await events.publish(
            session,
            events.FOLLOWUP_TASK_CREATED,
            events_pb2.FollowUpTaskCreated(
                task_id=task.task_id,
                plan_id=task.plan_id,
                member_id=task.member_id,
                store_id=task.store_id,
                assignee_staff_id=task.assignee_staff_id,
                due_time=timestamp(due),
                reason=task.reason,
            ),
        )
    return task


async def _facts(
    session: AsyncSession, directory: MembersDirectory, member_id: str, fallback_store: str
) -> MemberFacts | None:
    """Asks members, and keeps the home store and birthday month."""
    facts = await directory.member(member_id)
    if facts is None or not facts.active:
        return None
    await store.note_member_facts(
        session,
        member_id,
        home_store_id=facts.home_store_id or fallback_store,
        birthday_month=facts.birthday.month if facts.birthday else 0,
    )
    return facts


class Planner:
    """The handlers of the consumers and the periodic pass."""

    def __init__(self, directory: MembersDirectory) -> None:
        self.directory = directory

    # -- loyalty ---------------------------------------------------------

    async def on_sale_recorded(
        self, session: AsyncSession, event: loyalty_events.SaleRecorded, envelope: Envelope
    ) -> None:
        if not event.member_id:
            return
        now = utcnow()
        if event.HasField("business_day") and event.business_day.year:
            day = dt.date(event.business_day.year, event.business_day.month, event.business_day.day)
        else:
            day = now.date()
        plans = await store.enabled_plans(session)
        # Whether the sale is the member's first matters to a 3+3+3 plan
        # only; without one the visit is recorded in a single statement.
        if any(plan.kind == PlanKind.THREE_THREE_THREE for plan in plans):
            first = await store.note_visit(session, event.member_id, day)
        else:
            await store.note_any_visit(session, event.member_id, day)
            first = False
        aims: list[tuple[Plan, Aim]] = []
        categories = {c.strip() for c in event.categories}
        for plan in plans:
            if plan.kind == PlanKind.THREE_THREE_THREE and first:
                aims += [
                    (plan, Aim(occasion, reason, target))
                    for occasion, reason, target in domain.three_three_three_days(day)
                ]
            elif plan.kind == PlanKind.POST_PURCHASE and plan.category in categories:
                aims.append(
                    (
                        plan,
                        Aim(
                            f"sale:{event.sale_id}"[:40],
                            f"bought {plan.category} +{plan.days} days"[:100],
                            day + dt.timedelta(days=plan.days),
                        ),
                    )
                )
        if not aims:
            return
        facts = await _facts(session, self.directory, event.member_id, event.store_id)
        if facts is None:
            return
        known_store = await store_of(session, self.directory, facts.home_store_id or event.store_id)
        for plan, aim in aims:
            await create_task(session, plan, facts, known_store, aim, now)

    # -- members ---------------------------------------------------------

    async def on_enrolled(
        self, session: AsyncSession, event: member_events.MemberEnrolled, _e: Envelope
    ) -> None:
        await store.ensure_member(session, event.member_id, event.home_store_id)

    async def on_erased(
        self, session: AsyncSession, event: member_events.MemberErased, _e: Envelope
    ) -> None:
        await store.set_member_state(session, event.member_id, "erased")
        await store.cancel_open_tasks(session, event.member_id)

    async def on_merged(
        self, session: AsyncSession, event: member_events.MemberMerged, _e: Envelope
    ) -> None:
        await store.set_member_state(session, event.duplicate_member_id, "merged")
        await store.cancel_open_tasks(session, event.duplicate_member_id)

    async def on_consultant_changed(
        self, session: AsyncSession, event: member_events.MemberConsultantChanged, _e: Envelope
    ) -> None:
        await store.reassign_open_tasks(
            session, event.member_id, event.from_consultant_id, event.to_consultant_id
        )

    async def on_store_opened(
        self, session: AsyncSession, event: member_events.StoreOpened, _e: Envelope
    ) -> None:
        await store.note_store(session, event.store_id, event.region_id, event.time_zone)

    async def on_store_reopened(
        self, session: AsyncSession, event: member_events.StoreReopened, _e: Envelope
    ) -> None:
        await store.note_store(session, event.store_id, event.region_id, event.time_zone)

    def subscriptions(self) -> list[Subscription]:
        return [
            Subscription(
                name="followup-sales",
                stream=STREAMS["loyalty"],
                subjects=SALE_SUBJECTS,
                handlers={loyalty_events.SaleRecorded: self.on_sale_recorded},
            ),
            Subscription(
                name="followup-members",
                stream=STREAMS["members"],
                subjects=MEMBER_SUBJECTS,
                handlers={
                    member_events.MemberEnrolled: self.on_enrolled,
                    member_events.MemberErased: self.on_erased,
                    member_events.MemberMerged: self.on_merged,
                    member_events.MemberConsultantChanged: self.on_consultant_changed,
                    member_events.StoreOpened: self.on_store_opened,
                    member_events.StoreReopened: self.on_store_reopened,
                },
            ),
        ]

    # -- the periodic pass ---------------------------------------------------

    async def run_pass(self, db: Database, now: dt.datetime | None = None) -> dict[str, int]:
        """Birthday and win-back tasks, then scheduled tasks whose time has
        come turned DUE. Safe to run on every replica at once and as often
        as wanted: each task is created once. Returns counts by kind."""
        at = now or utcnow()
        async with db.sessions() as session:
            plans = await store.enabled_plans(session)
        counts = {"birthday": 0, "win_back": 0, "due": 0}
        for plan in plans:
            if plan.kind == PlanKind.BIRTHDAY:
                counts["birthday"] += await self._birthdays(db, plan, at)
            elif plan.kind == PlanKind.WIN_BACK:
                counts["win_back"] += await self._win_back(db, plan, at)
        async with db.transaction() as session:
            counts["due"] = await store.mark_due(session, at)
        return counts

    async def _birthdays(self, db: Database, plan: Plan, now: dt.datetime) -> int:
        """Members whose birthday month has come (``days`` ahead): one task a
        year, due at the first call window of the birthday minus ``days``
        (or as soon as possible, when that day has passed already)."""
        ahead = now + dt.timedelta(days=plan.days)
        # Either side of the date line, the month may differ by a day.
        months = sorted({(ahead + dt.timedelta(hours=h)).month for h in (-14, 0, 14)})
        created, after = 0, ""
        while True:
            async with db.sessions() as session:
                batch = await store.birthday_members(
                    session, months=months, after=after, limit=BATCH
                )
            for member in batch:
                created += await self._birthday_of(db, plan, member, now)
            if len(batch) < BATCH:
                return created
            after = batch[-1].member_id

    async def _birthday_of(
        self, db: Database, plan: Plan, member: store.KnownMember, now: dt.datetime
    ) -> int:
        async with db.sessions() as session:
            known_store = await store.get_store(session, member.home_store_id)
        zone = domain.zone_of(known_store.time_zone if known_store else "UTC")
        ahead = domain.local_day(now, zone) + dt.timedelta(days=plan.days)
        if ahead.month != member.birthday_month:
            return 0
        occasion = str(ahead.year)
        async with db.sessions() as session:
            if await store.has_task(session, plan.plan_id, member.member_id, occasion):
                return 0
        async with db.transaction() as session:
            facts = await _facts(session, self.directory, member.member_id, member.home_store_id)
            if facts is None or facts.birthday is None:
                return 0
            birthday = domain.birthday_in(ahead.year, facts.birthday.month, facts.birthday.day)
            target = birthday - dt.timedelta(days=plan.days)
            known = await store_of(session, self.directory, facts.home_store_id)
            aim = Aim(occasion, "birthday", target, not_before=now)
            return 1 if await create_task(session, plan, facts, known, aim, now) else 0

    async def _win_back(self, db: Database, plan: Plan, now: dt.datetime) -> int:
        """Members whose last visit is ``days`` ago, once per lapse: a later
        visit starts a new lapse."""
        # A day of slack for the stores east of UTC; checked per store below.
        visited_by = now.date() - dt.timedelta(days=plan.days - 1)
        created, after = 0, ""
        while True:
            async with db.sessions() as session:
                batch = await store.lapsed_members(
                    session, visited_by=visited_by, after=after, limit=BATCH
                )
            for member in batch:
                created += await self._win_back_of(db, plan, member, now)
            if len(batch) < BATCH:
                return created
            after = batch[-1].member_id

    async def _win_back_of(
        self, db: Database, plan: Plan, member: store.KnownMember, now: dt.datetime
    ) -> int:
        if member.last_visit_day is None:
            return 0
        occasion = domain.win_back_occasion(member.last_visit_day)
        async with db.sessions() as session:
            known_store = await store.get_store(session, member.home_store_id)
            if await store.has_task(session, plan.plan_id, member.member_id, occasion):
                return 0
        today = domain.local_day(now, domain.zone_of(known_store.time_zone if known_store else ""))
        if not domain.win_back_due(member.last_visit_day, today, plan.days):
            return 0
        async with db.transaction() as session:
            facts = await _facts(session, self.directory, member.member_id, member.home_store_id)
            if facts is None:
                return 0
            known = await store_of(session, self.directory, facts.home_store_id)
            aim = Aim(occasion, f"no visit in {plan.days} days", today, not_before=now)
            return 1 if await create_task(session, plan, facts, known, aim, now) else 0


class FollowUpWorker:
    """Runs the pass every ``CAMPAIGNS_FOLLOWUP_INTERVAL_SECONDS``."""

    def __init__(
        self, db: Database, planner: Planner, interval_seconds: float | None = None
    ) -> None:
        self.db = db
        self.planner = planner
        self.interval = interval_seconds or float(
            os.environ.get("CAMPAIGNS_FOLLOWUP_INTERVAL_SECONDS", DEFAULT_INTERVAL_SECONDS)
        )

    async def run(self) -> None:
        while True:
            try:
                counts = await self.planner.run_pass(self.db)
                if any(counts.values()):
                    log.info("follow-up pass", **counts)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("follow-up pass failed; will retry")
            await asyncio.sleep(self.interval)
