"""Follow-up plans' gRPC edge (FollowUpService), their consumers and the
periodic pass that creates birthday and win-back tasks."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, ScopeLevel, current_principal
from chassis.db import is_unique_violation, utcnow
from chassis.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import run_idempotent
from chassis.inbox import Subscription
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.campaigns.v1 import events_pb2, followups_pb2, followups_pb2_grpc
from cornucopia.common.v1 import org_pb2
from services.campaigns import events
from services.campaigns.domain import followups as domain
from services.campaigns.domain.followups import Outcome, Plan, PlanKind, TaskState
from services.campaigns.followup_planner import (
    Aim,
    FollowUpWorker,
    MembersClient,
    Planner,
    create_task,
    store_of,
    timestamp,
)
from services.campaigns.store import followups as store

F = followups_pb2
READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
KINDS = {
    F.FOLLOW_UP_PLAN_KIND_THREE_THREE_THREE: PlanKind.THREE_THREE_THREE,
    F.FOLLOW_UP_PLAN_KIND_BIRTHDAY: PlanKind.BIRTHDAY,
    F.FOLLOW_UP_PLAN_KIND_WIN_BACK: PlanKind.WIN_BACK,
    F.FOLLOW_UP_PLAN_KIND_POST_PURCHASE: PlanKind.POST_PURCHASE,
    F.FOLLOW_UP_PLAN_KIND_REQUESTED: PlanKind.REQUESTED,
}
KIND_PROTOS = {v: k for k, v in KINDS.items()}
STATES = {
    F.FOLLOW_UP_TASK_STATE_SCHEDULED: TaskState.SCHEDULED,
    F.FOLLOW_UP_TASK_STATE_DUE: TaskState.DUE,
    F.FOLLOW_UP_TASK_STATE_COMPLETED: TaskState.COMPLETED,
    F.FOLLOW_UP_TASK_STATE_SKIPPED: TaskState.SKIPPED,
    F.FOLLOW_UP_TASK_STATE_CANCELLED: TaskState.CANCELLED,
}
STATE_PROTOS = {v: k for k, v in STATES.items()}
OUTCOMES = {
    F.FOLLOW_UP_TASK_OUTCOME_REACHED: Outcome.REACHED,
    F.FOLLOW_UP_TASK_OUTCOME_NO_ANSWER: Outcome.NO_ANSWER,
    F.FOLLOW_UP_TASK_OUTCOME_CALL_BACK: Outcome.CALL_BACK,
    F.FOLLOW_UP_TASK_OUTCOME_DECLINED: Outcome.DECLINED,
    F.FOLLOW_UP_TASK_OUTCOME_WRONG_NUMBER: Outcome.WRONG_NUMBER,
}
OUTCOME_PROTOS = {v: k for k, v in OUTCOMES.items()}
UPDATABLE = frozenset({"display_name", "enabled", "days", "category", "call_windows"})
# members' FollowUpOutcome has the same numbers.
MEMBERS_OUTCOME = {o: int(p) for o, p in OUTCOME_PROTOS.items()}
NOTE_LIMIT = 2000
REQUESTED_REASON_LIMIT = 100
OCCASION_LIMIT = 40
CLOCK_SKEW = dt.timedelta(minutes=1)


def _ts(at: dt.datetime | None) -> Timestamp | None:
    return None if at is None else timestamp(at)


def _time(ts: Timestamp) -> dt.datetime | None:
    return ts.ToDatetime(dt.UTC) if ts.seconds or ts.nanos else None


def plan_to_proto(record: store.PlanRecord) -> F.FollowUpPlan:
    p = record.plan
    return F.FollowUpPlan(
        plan_id=p.plan_id,
        kind=KIND_PROTOS[p.kind],
        display_name=p.display_name,
        enabled=p.enabled,
        days=p.days,
        category=p.category,
        call_windows=[
            F.CallWindow(start_time=f"{w.start:%H:%M}", end_time=f"{w.end:%H:%M}")
            for w in p.windows
        ],
        create_time=_ts(record.created_at),
        update_time=_ts(record.updated_at),
    )


def task_to_proto(t: store.Task) -> F.FollowUpTask:
    return F.FollowUpTask(
        task_id=t.task_id,
        plan_id=t.plan_id,
        plan_kind=KIND_PROTOS[t.plan_kind],
        member_id=t.member_id,
        store_id=t.store_id,
        assignee_staff_id=t.assignee_staff_id,
        reason=t.reason,
        occasion=t.occasion,
        state=STATE_PROTOS[t.state],
        due_time=_ts(t.due_time),
        skip_reason=t.skip_reason,
        outcome=OUTCOME_PROTOS[t.outcome] if t.outcome else F.FOLLOW_UP_TASK_OUTCOME_UNSPECIFIED,
        follow_up_id=t.follow_up_id,
        completed_by=t.completed_by,
        complete_time=_ts(t.completed_at),
        create_time=_ts(t.created_at),
        reschedule_count=t.reschedule_count,
    )


def _plan_from(message: F.FollowUpPlan, kind: PlanKind) -> Plan:
    return Plan(
        plan_id=message.plan_id.strip(),
        kind=kind,
        display_name=message.display_name,
        enabled=message.enabled,
        days=message.days,
        category=message.category,
        windows=domain.parse_windows([(w.start_time, w.end_time) for w in message.call_windows]),
    )


def task_not_found(task_id: str) -> NotFound:
    return NotFound(
        "no follow-up task with this id", reason="TASK_NOT_FOUND", metadata={"task_id": task_id}
    )


def plan_not_found(plan_id: str) -> NotFound:
    return NotFound(
        "no follow-up plan with this id", reason="PLAN_NOT_FOUND", metadata={"plan_id": plan_id}
    )


def task_closed(task: store.Task) -> FailedPrecondition:
    return FailedPrecondition(
        "the task is no longer open",
        reason="TASK_CLOSED",
        metadata={"task_id": task.task_id, "state": task.state.value},
    )


def scope_filter(principal: Principal) -> store.TaskFilter:
    """Which tasks the caller may see: a store operator their own and their
    store's unassigned ones, a store manager their store's, a region
    manager their region's, HQ and the call center all."""
    level = principal.scope.level
    if level in (ScopeLevel.HQ, ScopeLevel.CALL_CENTER) or Role.SERVICE in principal.roles:
        return store.TaskFilter()
    if level == ScopeLevel.REGION:
        return store.TaskFilter(scope_region_id=principal.scope.id)
    if level == ScopeLevel.STORE:
        if principal.has_any((Role.STORE_MANAGER,)):
            return store.TaskFilter(scope_store_id=principal.scope.id)
        return store.TaskFilter(scope_store_id=principal.scope.id, scope_staff_id=principal.subject)
    raise PermissionDenied("your role may not do this", reason="ROLE_NOT_ALLOWED")


async def may_work(session: AsyncSession, principal: Principal, task: store.Task) -> bool:
    scope = scope_filter(principal)
    if scope.scope_staff_id:
        return task.assignee_staff_id == scope.scope_staff_id or (
            task.store_id == scope.scope_store_id and not task.assignee_staff_id
        )
    if scope.scope_store_id:
        return task.store_id == scope.scope_store_id
    if scope.scope_region_id:
        known = await store.get_store(session, task.store_id)
        return known is not None and known.region_id == scope.scope_region_id
    return True


def caller_token(context: Context) -> str:
    metadata = dict(context.invocation_metadata() or ())
    _, _, token = str(metadata.get("authorization", "")).partition(" ")
    return token.strip()


class FollowUpServicer(followups_pb2_grpc.FollowUpServiceServicer):
    def __init__(self, ctx: ServiceContext, members: MembersClient) -> None:
        self.db = ctx.db
        self.members = members

    # -- plans -------------------------------------------------------------

    async def CreateFollowUpPlan(
        self, request: F.CreateFollowUpPlanRequest, context: Context
    ) -> F.FollowUpPlan:
        current_principal().require_role(Role.HQ_ADMIN)
        kind = KINDS.get(request.plan.kind)
        if kind is None:
            raise InvalidArgument([FieldViolation("plan.kind", "required")])
        if kind == PlanKind.REQUESTED:
            raise InvalidArgument(
                [FieldViolation("plan.kind", "requested calls come from CreateFollowUpTask")]
            )
        plan = domain.validate_plan(_plan_from(request.plan, kind))
        now = utcnow()

        async def create(session: AsyncSession) -> F.FollowUpPlan:
            if await store.get_plan(session, plan.plan_id) is not None:
                raise _plan_exists(plan.plan_id)
            await store.insert_plan(session, plan, now)
            return F.FollowUpPlan(plan_id=plan.plan_id)

        try:
            created = await run_idempotent(
                self.db,
                method="campaigns.CreateFollowUpPlan",
                request_id=request.request_id,
                request=request,
                response_type=F.FollowUpPlan,
                work=create,
            )
        except IntegrityError as exc:
            if is_unique_violation(exc):
                raise _plan_exists(plan.plan_id) from None
            raise
        return await self._plan(created.plan_id)

    async def UpdateFollowUpPlan(
        self, request: F.UpdateFollowUpPlanRequest, context: Context
    ) -> F.FollowUpPlan:
        current_principal().require_role(Role.HQ_ADMIN)
        paths = list(request.update_mask.paths)
        unknown = [p for p in paths if p not in UPDATABLE]
        if not paths or unknown:
            raise InvalidArgument(
                [FieldViolation("update_mask", f"one or more of {', '.join(sorted(UPDATABLE))}")]
            )
        plan_id = request.plan.plan_id.strip()
        now = utcnow()

        async def update(session: AsyncSession) -> F.FollowUpPlan:
            record = await store.get_plan(session, plan_id, for_update=True)
            if record is None:
                raise plan_not_found(plan_id)
            given = _plan_from(request.plan, record.plan.kind)
            changed = replace(
                record.plan,
                display_name=(
                    given.display_name if "display_name" in paths else record.plan.display_name
                ),
                enabled=given.enabled if "enabled" in paths else record.plan.enabled,
                days=given.days if "days" in paths else record.plan.days,
                category=given.category if "category" in paths else record.plan.category,
                windows=given.windows if "call_windows" in paths else record.plan.windows,
            )
            validated = domain.validate_plan(changed)
            await store.update_plan(session, validated, now)
            return F.FollowUpPlan(plan_id=plan_id)

        await run_idempotent(
            self.db,
            method="campaigns.UpdateFollowUpPlan",
            request_id=request.request_id,
            request=request,
            response_type=F.FollowUpPlan,
            work=update,
        )
        return await self._plan(plan_id)

    async def _plan(self, plan_id: str) -> F.FollowUpPlan:
        async with self.db.sessions() as session:
            record = await store.get_plan(session, plan_id)
        if record is None:
            raise plan_not_found(plan_id)
        return plan_to_proto(record)

    async def ListFollowUpPlans(
        self, request: F.ListFollowUpPlansRequest, context: Context
    ) -> F.ListFollowUpPlansResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        after = str((decode_token(request.page_token) or {}).get("id", ""))
        async with self.db.sessions() as session:
            records = await store.list_plans(session, after=after, limit=size + 1)
        response = F.ListFollowUpPlansResponse(plans=[plan_to_proto(r) for r in records[:size]])
        if len(records) > size:
            response.next_page_token = encode_token({"id": records[size - 1].plan.plan_id})
        return response

    # -- tasks -------------------------------------------------------------

    async def _filter(
        self, session: AsyncSession, principal: Principal, store_id: str
    ) -> store.TaskFilter:
        scope = scope_filter(principal)
        if store_id:
            region = None
            if principal.scope.level == ScopeLevel.REGION:
                known = await store.get_store(session, store_id)
                region = known.region_id if known else None
            principal.require_store(store_id, region)
        return scope

    async def ListFollowUpTasks(
        self, request: F.ListFollowUpTasksRequest, context: Context
    ) -> F.ListFollowUpTasksResponse:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        size = page_size(request.page_size)
        key = decode_token(request.page_token)
        after = None
        if key is not None:
            try:
                after = (dt.datetime.fromisoformat(str(key["t"])), str(key["id"]))
            except (KeyError, ValueError):
                raise InvalidArgument(
                    [FieldViolation("page_token", "not a token this service issued")]
                ) from None
        states: list[TaskState] = []
        for value in request.states:
            state = STATES.get(value)  # type: ignore[call-overload]
            if state is None:
                raise InvalidArgument([FieldViolation("states", "unknown state")])
            states.append(state)
        async with self.db.sessions() as session:
            scope = await self._filter(session, principal, request.store_id.strip())
            f = store.TaskFilter(
                scope_store_id=scope.scope_store_id,
                scope_region_id=scope.scope_region_id,
                scope_staff_id=scope.scope_staff_id,
                store_id=request.store_id.strip(),
                assignee_staff_id=request.assignee_staff_id.strip(),
                member_id=request.member_id.strip(),
                states=tuple(states) or tuple(domain.OPEN_STATES),
                due_before=_time(request.due_before),
            )
            tasks = await store.list_tasks(session, f, after=after, limit=size + 1)
        response = F.ListFollowUpTasksResponse(tasks=[task_to_proto(t) for t in tasks[:size]])
        if len(tasks) > size:
            last = tasks[size - 1]
            response.next_page_token = encode_token(
                {"t": last.due_time.isoformat(), "id": last.task_id}
            )
        return response

    async def _workable(self, principal: Principal, task_id: str) -> store.Task:
        if not task_id.strip():
            raise InvalidArgument([FieldViolation("task_id", "required")])
        async with self.db.sessions() as session:
            task = await store.get_task(session, task_id)
            if task is None or not await may_work(session, principal, task):
                # Out of scope reads as missing: no hint of others' tasks.
                raise task_not_found(task_id)
        return task

    async def CompleteFollowUpTask(
        self, request: F.CompleteFollowUpTaskRequest, context: Context
    ) -> F.FollowUpTask:
        principal = current_principal()
        principal.require_role(*STAFF_ROLES)
        violations = Violations()
        outcome = OUTCOMES.get(request.outcome)  # type: ignore[call-overload]
        if outcome is None:
            violations.add("outcome", "required")
        if len(request.note) > NOTE_LIMIT:
            violations.add("note", f"at most {NOTE_LIMIT} characters")
        if request.duration_seconds < 0:
            violations.add("duration_seconds", "must not be negative")
        if not request.request_id.strip():
            violations.add("request_id", "required: a key of your choosing")
        violations.raise_if_any()
        assert outcome is not None
        task = await self._workable(principal, request.task_id)
        follow_up_id = ""
        if task.open:
            # The call goes on the member's file first, as the caller; the
            # same request_id gives members the same key, so a retry after
            # a failure below records it once.
            follow_up_id = await self.members.record_follow_up(
                caller_token(context),
                request_id=f"followup-task:{task.task_id}:{request.request_id}"[:200],
                member_id=task.member_id,
                outcome=MEMBERS_OUTCOME[outcome],
                note=request.note,
                duration_seconds=request.duration_seconds,
            )
        now = utcnow()
        # The note is personal: it stays out of the idempotency record.
        fingerprint = F.CompleteFollowUpTaskRequest()
        fingerprint.CopyFrom(request)
        fingerprint.note = ""

        async def complete(session: AsyncSession) -> F.FollowUpTask:
            current = await store.get_task(session, task.task_id, for_update=True)
            assert current is not None
            if not await store.complete_task(
                session,
                current.task_id,
                outcome=outcome,
                follow_up_id=follow_up_id,
                completed_by=principal.subject,
                at=now,
            ):
                raise task_closed(current)
            await events.publish(
                session,
                events.FOLLOWUP_TASK_COMPLETED,
                events_pb2.FollowUpTaskCompleted(
                    task_id=current.task_id,
                    plan_id=current.plan_id,
                    member_id=current.member_id,
                    store_id=current.store_id,
                    outcome=outcome.value,
                    stamp=org_pb2.AuditStamp(
                        principal=principal.subject, store_id=principal.store_id, time=_ts(now)
                    ),
                ),
            )
            done = await store.get_task(session, current.task_id)
            assert done is not None
            return task_to_proto(done)

        return await run_idempotent(
            self.db,
            method="campaigns.CompleteFollowUpTask",
            request_id=request.request_id,
            request=fingerprint,
            response_type=F.FollowUpTask,
            work=complete,
        )

    async def RescheduleFollowUpTask(
        self, request: F.RescheduleFollowUpTaskRequest, context: Context
    ) -> F.FollowUpTask:
        principal = current_principal()
        principal.require_role(*STAFF_ROLES)
        wanted = _time(request.due_time)
        now = utcnow()
        if wanted is None:
            raise InvalidArgument([FieldViolation("due_time", "required")])
        if wanted < now - CLOCK_SKEW:
            raise InvalidArgument([FieldViolation("due_time", "must not be in the past")])
        task = await self._workable(principal, request.task_id)

        async def reschedule(session: AsyncSession) -> F.FollowUpTask:
            current = await store.get_task(session, task.task_id, for_update=True)
            assert current is not None
            if not current.open:
                raise task_closed(current)
            plan = await store.get_plan(session, current.plan_id)
            windows = plan.plan.call_windows if plan else domain.DEFAULT_WINDOWS
            known = await store.get_store(session, current.store_id)
            due = domain.snap(max(wanted, now), known.time_zone if known else "UTC", windows)
            state = TaskState.DUE if due <= now else TaskState.SCHEDULED
            await store.reschedule_task(session, current.task_id, due=due, state=state)
            done = await store.get_task(session, current.task_id)
            assert done is not None
            return task_to_proto(done)

        return await run_idempotent(
            self.db,
            method="campaigns.RescheduleFollowUpTask",
            request_id=request.request_id,
            request=request,
            response_type=F.FollowUpTask,
            work=reschedule,
        )

    async def CreateFollowUpTask(
        self, request: F.CreateFollowUpTaskRequest, context: Context
    ) -> F.FollowUpTask:
        """A call another service asks for (notify's call-task channel),
        scheduled as plan tasks are, in the chain's default call windows."""
        principal = current_principal()
        principal.require_role(Role.SERVICE)
        violations = Violations()
        member_id = request.member_id.strip()
        reason = request.reason.strip()
        if not member_id:
            violations.add("member_id", "required")
        if not reason:
            violations.add("reason", "required")
        elif len(reason) > REQUESTED_REASON_LIMIT:
            violations.add("reason", f"at most {REQUESTED_REASON_LIMIT} characters")
        if not request.request_id.strip():
            violations.add("request_id", "required: a key of your choosing")
        violations.raise_if_any()
        now = utcnow()
        wanted = _time(request.not_before_time)
        not_before = max(wanted, now) if wanted is not None else now
        # One task per request: the occasion is the request id (hashed when
        # it is longer than the column).
        occasion = request.request_id.strip()
        if len(occasion) > OCCASION_LIMIT:
            occasion = "r:" + hashlib.sha256(occasion.encode()).hexdigest()[: OCCASION_LIMIT - 2]
        plan = Plan(plan_id=principal.subject[:40], kind=PlanKind.REQUESTED)
        facts = await self.members.member(member_id)
        if facts is None or not facts.active:
            raise NotFound(
                "no active member with this id",
                reason="MEMBER_NOT_FOUND",
                metadata={"member_id": member_id},
            )

        async def create(session: AsyncSession) -> F.FollowUpTask:
            known = await store_of(session, self.members, facts.home_store_id)
            aim = Aim(
                occasion,
                reason,
                domain.local_day(not_before, domain.zone_of(known.time_zone)),
                not_before=not_before,
            )
            task = await create_task(session, plan, facts, known, aim, now)
            if task is None:
                task = await store.find_task(session, plan.plan_id, member_id, occasion)
            assert task is not None
            return task_to_proto(task)

        return await run_idempotent(
            self.db,
            method="campaigns.CreateFollowUpTask",
            request_id=request.request_id,
            request=request,
            response_type=F.FollowUpTask,
            work=create,
        )

    async def GetFollowUpStatistics(
        self, request: F.GetFollowUpStatisticsRequest, context: Context
    ) -> F.FollowUpStatistics:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        start, end = _time(request.start_time), _time(request.end_time)
        violations = Violations()
        if start is None:
            violations.add("start_time", "required")
        if end is None:
            violations.add("end_time", "required")
        elif start is not None and end <= start:
            violations.add("end_time", "must be after start_time")
        violations.raise_if_any()
        assert start is not None and end is not None
        now = utcnow()
        async with self.db.sessions() as session:
            scope = await self._filter(session, principal, request.store_id.strip())
            if scope.scope_staff_id:
                # A store operator's statistics are their store's as a whole.
                scope = store.TaskFilter(scope_store_id=scope.scope_store_id)
            f = store.TaskFilter(
                scope_store_id=scope.scope_store_id,
                scope_region_id=scope.scope_region_id,
                store_id=request.store_id.strip(),
                assignee_staff_id=request.staff_id.strip(),
            )
            counts = await store.statistics(
                session,
                f,
                start=start,
                end=end,
                overdue_before=now - dt.timedelta(days=1),
                skip_reason=domain.SKIP_NO_PHONE_CONSENT,
            )
        created = sum(n for s, n in counts.by_state.items() if s != TaskState.CANCELLED)
        completed = counts.by_state.get(TaskState.COMPLETED, 0)
        skipped = counts.by_state.get(TaskState.SKIPPED, 0)
        to_do = created - skipped
        return F.FollowUpStatistics(
            created=created,
            completed=completed,
            by_outcome=[
                F.OutcomeCount(outcome=OUTCOME_PROTOS[o], count=n)
                for o, n in sorted(counts.by_outcome.items(), key=lambda i: OUTCOME_PROTOS[i[0]])
            ],
            skipped=counts.skipped_no_consent,
            overdue=counts.overdue,
            open=sum(counts.by_state.get(s, 0) for s in domain.OPEN_STATES),
            completion_rate_bps=(completed * 10000 // to_do) if to_do > 0 else 0,
        )


def _plan_exists(plan_id: str) -> AlreadyExists:
    return AlreadyExists(
        "a follow-up plan with this id exists", reason="PLAN_EXISTS", metadata={"plan_id": plan_id}
    )


# --- wiring -------------------------------------------------------------


def members_client(ctx: ServiceContext) -> MembersClient:
    def make() -> MembersClient:
        client = MembersClient(ctx.settings)
        ctx.on_close(client.close)
        return client

    return ctx.shared("campaigns.followups.members", make)


def planner(ctx: ServiceContext) -> Planner:
    return ctx.shared("campaigns.followups.planner", lambda: Planner(members_client(ctx)))


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=F.DESCRIPTOR.services_by_name["FollowUpService"].full_name,
            servicer=FollowUpServicer(ctx, members_client(ctx)),
            add_to_server=followups_pb2_grpc.add_FollowUpServiceServicer_to_server,
        )
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [FollowUpWorker(ctx.db, planner(ctx)).run]


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription]:
    return planner(ctx).subscriptions()
