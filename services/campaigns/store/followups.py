"""Follow-up plans' tables and queries: the plans, the tasks they create,
and what campaigns keeps of members' and loyalty's facts to create them
(members' home stores and birthday months, first purchase and last visit
days, stores' time zones). Filled from events and from calls to members;
never read from another service's tables."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Memo, RowByKey, UTCDateTime, upsert
from chassis.direct import Direct
from services.campaigns.domain.followups import (
    OPEN_STATES,
    CallWindow,
    Outcome,
    Plan,
    PlanKind,
    TaskState,
    parse_time,
)
from services.campaigns.store import SETTINGS_MEMO_SECONDS, metadata

followup_plans = sa.Table(
    "followup_plans",
    metadata,
    sa.Column("plan_id", sa.String(40), primary_key=True),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("display_name", sa.String(100), nullable=False, server_default=""),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("days", sa.Integer, nullable=False, server_default="0"),
    sa.Column("category", sa.String(64), nullable=False, server_default=""),
    # "HH:MM-HH:MM,HH:MM-HH:MM"; empty for the chain's default windows.
    sa.Column("call_windows", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

followup_members = sa.Table(
    "followup_members",
    metadata,
    sa.Column("member_id", sa.String(16), primary_key=True),
    sa.Column("home_store_id", sa.String(32), nullable=False, server_default=""),
    # The month alone (members keeps it in clear for birthday campaigns); 0
    # when unknown.
    sa.Column("birthday_month", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_purchase_day", sa.Date, nullable=True),
    sa.Column("last_visit_day", sa.Date, nullable=True),
    # active, erased or merged: only active members are called.
    sa.Column("state", sa.String(10), nullable=False, server_default="active"),
    sa.Index("ix_followup_members_last_visit", "last_visit_day"),
    sa.Index("ix_followup_members_birthday_month", "birthday_month"),
)

followup_stores = sa.Table(
    "followup_stores",
    metadata,
    sa.Column("store_id", sa.String(32), primary_key=True),
    sa.Column("region_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("time_zone", sa.String(64), nullable=False),
)

followup_tasks = sa.Table(
    "followup_tasks",
    metadata,
    sa.Column("task_id", sa.String(40), primary_key=True),
    sa.Column("plan_id", sa.String(40), nullable=False),
    sa.Column("plan_kind", sa.String(20), nullable=False),
    sa.Column("member_id", sa.String(16), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False),
    sa.Column("assignee_staff_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("reason", sa.String(100), nullable=False, server_default=""),
    sa.Column("occasion", sa.String(40), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("due_time", UTCDateTime, nullable=False),
    sa.Column("skip_reason", sa.String(40), nullable=False, server_default=""),
    sa.Column("outcome", sa.String(20), nullable=False, server_default=""),
    sa.Column("follow_up_id", sa.String(40), nullable=False, server_default=""),
    sa.Column("completed_by", sa.String(64), nullable=False, server_default=""),
    sa.Column("completed_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("reschedule_count", sa.Integer, nullable=False, server_default="0"),
    # One task per member, plan and occasion: events redelivered, sales
    # replayed and replicas racing create it once.
    sa.UniqueConstraint("plan_id", "member_id", "occasion", name="uq_followup_tasks_occasion"),
    sa.Index("ix_followup_tasks_store_due", "store_id", "state", "due_time"),
    sa.Index("ix_followup_tasks_assignee_due", "assignee_staff_id", "state", "due_time"),
    sa.Index("ix_followup_tasks_state_due", "state", "due_time"),
    sa.Index("ix_followup_tasks_member", "member_id"),
)


def windows_text(windows: Sequence[CallWindow]) -> str:
    return ",".join(str(w) for w in windows)


def windows_of(text: str) -> tuple[CallWindow, ...]:
    windows: list[CallWindow] = []
    for part in filter(None, text.split(",")):
        start, _, end = part.partition("-")
        start_time, end_time = parse_time(start), parse_time(end)
        if start_time is not None and end_time is not None:
            windows.append(CallWindow(start_time, end_time))
    return tuple(windows)


@dataclass(frozen=True)
class PlanRecord:
    plan: Plan
    created_at: dt.datetime
    updated_at: dt.datetime


def _plan(row: Any) -> PlanRecord:
    return PlanRecord(
        Plan(
            plan_id=row.plan_id,
            kind=PlanKind(row.kind),
            display_name=row.display_name,
            enabled=bool(row.enabled),
            days=int(row.days),
            category=row.category,
            windows=windows_of(row.call_windows),
        ),
        row.created_at,
        row.updated_at,
    )


def plan_values(plan: Plan) -> dict[str, Any]:
    return {
        "kind": plan.kind.value,
        "display_name": plan.display_name,
        "enabled": plan.enabled,
        "days": plan.days,
        "category": plan.category,
        "call_windows": windows_text(plan.windows),
    }


_PLAN = RowByKey(followup_plans, "plan_id")


async def get_plan(
    session: AsyncSession, plan_id: str, *, for_update: bool = False
) -> PlanRecord | None:
    row = await _PLAN.first(session, plan_id, for_update=for_update)
    return None if row is None else _plan(row)


async def insert_plan(session: AsyncSession, plan: Plan, now: dt.datetime) -> None:
    _ENABLED_MEMO.forget(session)
    await session.execute(
        sa.insert(followup_plans).values(
            plan_id=plan.plan_id, created_at=now, updated_at=now, **plan_values(plan)
        )
    )


async def update_plan(session: AsyncSession, plan: Plan, now: dt.datetime) -> None:
    _ENABLED_MEMO.forget(session)
    await session.execute(
        sa.update(followup_plans)
        .where(followup_plans.c.plan_id == plan.plan_id)
        .values(updated_at=now, **plan_values(plan))
    )


async def list_plans(session: AsyncSession, *, after: str, limit: int) -> list[PlanRecord]:
    rows = await session.execute(
        sa.select(followup_plans)
        .where(followup_plans.c.plan_id > after)
        .order_by(followup_plans.c.plan_id)
        .limit(limit)
    )
    return [_plan(r) for r in rows]


_ENABLED = (
    sa.select(followup_plans)
    .where(followup_plans.c.enabled.is_(True))
    .order_by(followup_plans.c.plan_id)
)

# The enabled plans, read on every sale and changed seldom (see
# ``chassis.db.Memo``).
_ENABLED_MEMO: Memo[tuple[Plan, ...]] = Memo(ttl=SETTINGS_MEMO_SECONDS)


async def _enabled(session: AsyncSession) -> tuple[Plan, ...]:
    return tuple(_plan(r).plan for r in await session.execute(_ENABLED))


async def enabled_plans(session: AsyncSession, kind: PlanKind | None = None) -> list[Plan]:
    """The enabled plans (of ``kind``), in plan id order."""
    plans = await _ENABLED_MEMO.get(session, lambda: _enabled(session))
    return [plan for plan in plans if kind is None or plan.kind == kind]


# --- stores -------------------------------------------------------------


@dataclass(frozen=True)
class KnownStore:
    store_id: str
    region_id: str
    time_zone: str


async def note_store(session: AsyncSession, store_id: str, region_id: str, time_zone: str) -> None:
    await upsert(
        session,
        followup_stores,
        {"store_id": store_id},
        {"region_id": region_id, "time_zone": time_zone},
    )


_STORE = RowByKey(followup_stores, "store_id")


async def get_store(session: AsyncSession, store_id: str) -> KnownStore | None:
    row = await _STORE.first(session, store_id)
    return None if row is None else KnownStore(row.store_id, row.region_id, row.time_zone)


# --- members ------------------------------------------------------------


@dataclass(frozen=True)
class KnownMember:
    member_id: str
    home_store_id: str
    birthday_month: int
    first_purchase_day: dt.date | None
    last_visit_day: dt.date | None
    state: str


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


_MEMBER = RowByKey(followup_members, "member_id")


async def get_member(
    session: AsyncSession, member_id: str, *, for_update: bool = False
) -> KnownMember | None:
    row = await _MEMBER.first(session, member_id, for_update=for_update)
    if row is None:
        return None
    return KnownMember(
        row.member_id,
        row.home_store_id,
        int(row.birthday_month),
        row.first_purchase_day,
        row.last_visit_day,
        row.state,
    )


async def ensure_member(session: AsyncSession, member_id: str, home_store_id: str = "") -> None:
    await session.execute(
        _insert(session)(followup_members)
        .values(member_id=member_id, home_store_id=home_store_id)
        .on_conflict_do_nothing(index_elements=["member_id"])
    )


@dataclass(frozen=True)
class _VisitStatements:
    """A sale's visit, built once per dialect (see chassis.db.RowByKey):
    written on every sale. Each changes the row only when a day moves: the
    first purchase day never later, the last visit day never earlier."""

    # The member's first purchase: inserts the row, or fills the first
    # purchase day of one that has none (from an enrollment). Returns a row
    # only then; a row that conflicts is locked either way.
    first: Direct
    # Any visit, whether or not it is the first.
    any: Direct


_m = followup_members.c
_DAY = sa.bindparam("day", type_=sa.Date)
_EARLIER_FIRST = sa.case(
    (sa.or_(_m.first_purchase_day.is_(None), _m.first_purchase_day > _DAY), _DAY),
    else_=_m.first_purchase_day,
)
_LATER_LAST = sa.case(
    (sa.or_(_m.last_visit_day.is_(None), _m.last_visit_day < _DAY), _DAY),
    else_=_m.last_visit_day,
)
_DAYS_MOVE = sa.or_(
    _m.first_purchase_day.is_(None),
    _m.first_purchase_day > _DAY,
    _m.last_visit_day.is_(None),
    _m.last_visit_day < _DAY,
)


def _visit_statements(insert: Any) -> _VisitStatements:
    new_row = insert(followup_members).values(
        member_id=sa.bindparam("key_member_id"), first_purchase_day=_DAY, last_visit_day=_DAY
    )
    return _VisitStatements(
        first=Direct(
            new_row.on_conflict_do_update(
                index_elements=[_m.member_id],
                set_={"first_purchase_day": _DAY, "last_visit_day": _LATER_LAST},
                where=_m.first_purchase_day.is_(None),
            ).returning(_m.member_id)
        ),
        any=Direct(
            new_row.on_conflict_do_update(
                index_elements=[_m.member_id],
                set_={"first_purchase_day": _EARLIER_FIRST, "last_visit_day": _LATER_LAST},
                where=_DAYS_MOVE,
            )
        ),
    )


_VISITS = {
    "postgresql": _visit_statements(postgresql.insert),
    "sqlite": _visit_statements(sqlite.insert),
}
# A visit of a member whose first purchase is known (and row locked).
_LATER_VISIT = Direct(
    sa.update(followup_members)
    .where(_m.member_id == sa.bindparam("key_member_id"), _DAYS_MOVE)
    .values(first_purchase_day=_EARLIER_FIRST, last_visit_day=_LATER_LAST)
)


async def note_visit(session: AsyncSession, member_id: str, day: dt.date) -> bool:
    """Records a purchase day; returns True when it is the member's first
    purchase campaigns has seen."""
    params = {"key_member_id": member_id, "day": day}
    visits = _VISITS[session.get_bind().dialect.name]
    if (await visits.first.execute(session, params)).first() is not None:
        return True
    await _LATER_VISIT.execute(session, params)
    return False


async def note_any_visit(session: AsyncSession, member_id: str, day: dt.date) -> None:
    """Records a purchase day, in one statement, where whether it is the
    member's first does not matter."""
    visits = _VISITS[session.get_bind().dialect.name]
    await visits.any.execute(session, {"key_member_id": member_id, "day": day})


async def note_member_facts(
    session: AsyncSession, member_id: str, *, home_store_id: str, birthday_month: int
) -> None:
    values: dict[str, Any] = {"birthday_month": birthday_month}
    if home_store_id:
        values["home_store_id"] = home_store_id
    await upsert(session, followup_members, {"member_id": member_id}, values)


async def set_member_state(session: AsyncSession, member_id: str, state: str) -> None:
    await ensure_member(session, member_id)
    await session.execute(
        sa.update(followup_members)
        .where(followup_members.c.member_id == member_id)
        .values(state=state)
    )


async def lapsed_members(
    session: AsyncSession, *, visited_by: dt.date, after: str, limit: int
) -> list[KnownMember]:
    """Active members whose last visit is on or before ``visited_by``."""
    rows = await session.execute(
        sa.select(followup_members)
        .where(
            followup_members.c.state == "active",
            followup_members.c.last_visit_day <= visited_by,
            followup_members.c.member_id > after,
        )
        .order_by(followup_members.c.member_id)
        .limit(limit)
    )
    return [
        KnownMember(
            r.member_id,
            r.home_store_id,
            int(r.birthday_month),
            r.first_purchase_day,
            r.last_visit_day,
            r.state,
        )
        for r in rows
    ]


async def birthday_members(
    session: AsyncSession, *, months: Sequence[int], after: str, limit: int
) -> list[KnownMember]:
    rows = await session.execute(
        sa.select(followup_members)
        .where(
            followup_members.c.state == "active",
            followup_members.c.birthday_month.in_(list(months)),
            followup_members.c.member_id > after,
        )
        .order_by(followup_members.c.member_id)
        .limit(limit)
    )
    return [
        KnownMember(
            r.member_id,
            r.home_store_id,
            int(r.birthday_month),
            r.first_purchase_day,
            r.last_visit_day,
            r.state,
        )
        for r in rows
    ]


# --- tasks --------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    task_id: str
    plan_id: str
    plan_kind: PlanKind
    member_id: str
    store_id: str
    assignee_staff_id: str
    reason: str
    occasion: str
    state: TaskState
    due_time: dt.datetime
    skip_reason: str
    outcome: Outcome | None
    follow_up_id: str
    completed_by: str
    completed_at: dt.datetime | None
    created_at: dt.datetime
    reschedule_count: int

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES


def _task(row: Any) -> Task:
    return Task(
        task_id=row.task_id,
        plan_id=row.plan_id,
        plan_kind=PlanKind(row.plan_kind),
        member_id=row.member_id,
        store_id=row.store_id,
        assignee_staff_id=row.assignee_staff_id,
        reason=row.reason,
        occasion=row.occasion,
        state=TaskState(row.state),
        due_time=row.due_time,
        skip_reason=row.skip_reason,
        outcome=Outcome(row.outcome) if row.outcome else None,
        follow_up_id=row.follow_up_id,
        completed_by=row.completed_by,
        completed_at=row.completed_at,
        created_at=row.created_at,
        reschedule_count=int(row.reschedule_count),
    )


async def insert_task(session: AsyncSession, task: Task) -> bool:
    """Inserts the task unless the member has one for the plan's occasion;
    returns whether it was inserted."""
    result = await session.execute(
        _insert(session)(followup_tasks)
        .values(
            task_id=task.task_id,
            plan_id=task.plan_id,
            plan_kind=task.plan_kind.value,
            member_id=task.member_id,
            store_id=task.store_id,
            assignee_staff_id=task.assignee_staff_id,
            reason=task.reason,
            occasion=task.occasion,
            state=task.state.value,
            due_time=task.due_time,
            skip_reason=task.skip_reason,
            created_at=task.created_at,
        )
        .on_conflict_do_nothing(index_elements=["plan_id", "member_id", "occasion"])
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def has_task(session: AsyncSession, plan_id: str, member_id: str, occasion: str) -> bool:
    c = followup_tasks.c
    row = await session.execute(
        sa.select(c.task_id).where(
            c.plan_id == plan_id, c.member_id == member_id, c.occasion == occasion
        )
    )
    return row.first() is not None


async def find_task(
    session: AsyncSession, plan_id: str, member_id: str, occasion: str
) -> Task | None:
    """The member's task for a plan's occasion, if there is one."""
    c = followup_tasks.c
    row = (
        await session.execute(
            sa.select(followup_tasks).where(
                c.plan_id == plan_id, c.member_id == member_id, c.occasion == occasion
            )
        )
    ).first()
    return None if row is None else _task(row)


async def get_task(session: AsyncSession, task_id: str, *, for_update: bool = False) -> Task | None:
    query = sa.select(followup_tasks).where(followup_tasks.c.task_id == task_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _task(row)


async def complete_task(
    session: AsyncSession,
    task_id: str,
    *,
    outcome: Outcome,
    follow_up_id: str,
    completed_by: str,
    at: dt.datetime,
) -> bool:
    """Closes an open task; False when it was no longer open."""
    c = followup_tasks.c
    result = await session.execute(
        sa.update(followup_tasks)
        .where(c.task_id == task_id, c.state.in_([s.value for s in OPEN_STATES]))
        .values(
            state=TaskState.COMPLETED.value,
            outcome=outcome.value,
            follow_up_id=follow_up_id,
            completed_by=completed_by,
            completed_at=at,
        )
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def reschedule_task(
    session: AsyncSession, task_id: str, *, due: dt.datetime, state: TaskState
) -> bool:
    c = followup_tasks.c
    result = await session.execute(
        sa.update(followup_tasks)
        .where(c.task_id == task_id, c.state.in_([s.value for s in OPEN_STATES]))
        .values(due_time=due, state=state.value, reschedule_count=c.reschedule_count + 1)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def mark_due(session: AsyncSession, now: dt.datetime) -> int:
    """Scheduled tasks whose time has come go on the staff's call lists."""
    c = followup_tasks.c
    result = await session.execute(
        sa.update(followup_tasks)
        .where(c.state == TaskState.SCHEDULED.value, c.due_time <= now)
        .values(state=TaskState.DUE.value)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def cancel_open_tasks(session: AsyncSession, member_id: str) -> int:
    c = followup_tasks.c
    result = await session.execute(
        sa.update(followup_tasks)
        .where(c.member_id == member_id, c.state.in_([s.value for s in OPEN_STATES]))
        .values(state=TaskState.CANCELLED.value)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def reassign_open_tasks(
    session: AsyncSession, member_id: str, from_staff: str, to_staff: str
) -> int:
    c = followup_tasks.c
    result = await session.execute(
        sa.update(followup_tasks)
        .where(
            c.member_id == member_id,
            c.assignee_staff_id == from_staff,
            c.state.in_([s.value for s in OPEN_STATES]),
        )
        .values(assignee_staff_id=to_staff)
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a caller may see and asked for. ``scope_*`` come from the
    caller's role; the rest from the request."""

    scope_store_id: str = ""
    scope_region_id: str = ""
    # A store operator sees their own tasks and their store's unassigned ones.
    scope_staff_id: str = ""
    store_id: str = ""
    assignee_staff_id: str = ""
    member_id: str = ""
    states: tuple[TaskState, ...] = ()
    due_before: dt.datetime | None = None


def _where(query: sa.Select[Any], f: TaskFilter) -> sa.Select[Any]:
    c = followup_tasks.c
    if f.scope_staff_id:
        query = query.where(
            sa.or_(
                c.assignee_staff_id == f.scope_staff_id,
                sa.and_(c.store_id == f.scope_store_id, c.assignee_staff_id == ""),
            )
        )
    elif f.scope_store_id:
        query = query.where(c.store_id == f.scope_store_id)
    if f.scope_region_id:
        query = query.where(
            c.store_id.in_(
                sa.select(followup_stores.c.store_id).where(
                    followup_stores.c.region_id == f.scope_region_id
                )
            )
        )
    if f.store_id:
        query = query.where(c.store_id == f.store_id)
    if f.assignee_staff_id:
        query = query.where(c.assignee_staff_id == f.assignee_staff_id)
    if f.member_id:
        query = query.where(c.member_id == f.member_id)
    if f.states:
        query = query.where(c.state.in_([s.value for s in f.states]))
    if f.due_before is not None:
        query = query.where(c.due_time < f.due_before)
    return query


async def list_tasks(
    session: AsyncSession,
    f: TaskFilter,
    *,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[Task]:
    """Earliest due first, keyset-paged by (due_time, task_id)."""
    c = followup_tasks.c
    query = _where(sa.select(followup_tasks), f)
    if after is not None:
        last_due, last_id = after
        query = query.where(
            sa.or_(c.due_time > last_due, sa.and_(c.due_time == last_due, c.task_id > last_id))
        )
    rows = await session.execute(query.order_by(c.due_time, c.task_id).limit(limit))
    return [_task(r) for r in rows]


@dataclass(frozen=True)
class Counts:
    by_state: dict[TaskState, int]
    by_outcome: dict[Outcome, int]
    skipped_no_consent: int
    overdue: int


async def statistics(
    session: AsyncSession,
    f: TaskFilter,
    *,
    start: dt.datetime,
    end: dt.datetime,
    overdue_before: dt.datetime,
    skip_reason: str,
) -> Counts:
    c = followup_tasks.c
    base = _where(
        sa.select(c.state, c.outcome, c.skip_reason, sa.func.count().label("n")),
        f,
    ).where(c.due_time >= start, c.due_time < end)
    rows = (await session.execute(base.group_by(c.state, c.outcome, c.skip_reason))).all()
    by_state: dict[TaskState, int] = {}
    by_outcome: dict[Outcome, int] = {}
    skipped = 0
    for row in rows:
        state = TaskState(row.state)
        by_state[state] = by_state.get(state, 0) + int(row.n)
        if row.outcome:
            outcome = Outcome(row.outcome)
            by_outcome[outcome] = by_outcome.get(outcome, 0) + int(row.n)
        if state == TaskState.SKIPPED and row.skip_reason == skip_reason:
            skipped += int(row.n)
    overdue_query = _where(sa.select(sa.func.count()), f).where(
        c.due_time >= start,
        c.due_time < end,
        c.due_time < overdue_before,
        c.state.in_([s.value for s in OPEN_STATES]),
    )
    overdue = int((await session.execute(overdue_query)).scalar_one())
    return Counts(by_state, by_outcome, skipped, overdue)
