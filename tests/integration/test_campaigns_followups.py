"""Follow-up plans driven by real events: a real members service, loyalty's
sale events published onto the LOYALTY stream as loyalty's relay would, and
the campaigns service; the periodic pass run with an explicit clock. On
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.auth import Role, Scope, ScopeLevel
from chassis.bus import STREAMS, Bus, cloudevent_headers
from chassis.config import Settings
from chassis.db import utcnow
from chassis.service import ServiceRuntime
from cornucopia.campaigns.v1 import followups_pb2 as F
from cornucopia.campaigns.v1 import followups_pb2_grpc
from cornucopia.common.v1 import date_pb2
from cornucopia.loyalty.v1 import events_pb2 as loyalty_events
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc
from services.campaigns.server import definition as campaigns_definition
from services.campaigns.server.followups import planner
from services.campaigns.store import followups as store
from services.members.server import definition as members_definition
from tests.integration.conftest import (
    Suite,
    auth,
    eventually,
    rpc_details,
    seed_organisation,
    token,
)
from tests.integration.infra import DatabaseFactory

HQ = auth()
SHANGHAI = ZoneInfo("Asia/Shanghai")


async def publish(suite: Suite, subject: str, message: Message, event_id: str) -> None:
    """Publishes as loyalty's relay would (the same event id twice is a
    redelivery)."""
    bus = Bus(suite.nats_url, "test-loyalty")
    await bus.connect()
    try:
        await bus.ensure_stream(STREAMS["loyalty"])
        headers = cloudevent_headers(
            event_id=event_id,
            event_type=message.DESCRIPTOR.full_name,
            source="cornucopia/loyalty",
            time=utcnow(),
            subject=subject,
        )
        # A distinct Nats-Msg-Id so JetStream keeps the redelivery for the test.
        headers["Nats-Msg-Id"] = str(uuid.uuid4())
        await bus.publish(subject, message.SerializeToString(), headers)
    finally:
        await bus.close()


def sale(member_id: str, day: dt.date, *categories: str) -> loyalty_events.SaleRecorded:
    return loyalty_events.SaleRecorded(
        sale_id=f"SALE-{uuid.uuid4().hex[:10]}",
        member_id=member_id,
        store_id="S001",
        categories=list(categories),
        business_day=date_pb2.Date(year=day.year, month=day.month, day=day.day),
    )


def ts(at: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


async def start_campaigns(suite: Suite, url: str) -> ServiceRuntime:
    settings = Settings(
        service="campaigns",
        environment="test",
        var_dir=suite.var_dir,
        database_url=url,
        nats_url=suite.nats_url,
        grpc_listen="127.0.0.1:0",
        peers={"members": f"127.0.0.1:{suite.runtimes['members'].port}"},
    )
    runtime = ServiceRuntime(campaigns_definition, settings)
    await runtime.start()
    await asyncio.wait_for(runtime.ready.wait(), timeout=20)
    suite.runtimes["campaigns"] = runtime
    suite.channels["campaigns"] = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    return runtime


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_follow_up_plans_from_sales_to_completed_calls(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    await suite.start(members_definition, await database_url("members"))
    org = await seed_organisation(suite)
    advisor = org.consultants[0]
    members = members_pb2_grpc.MembersServiceStub(suite.channels["members"])
    runtime = await start_campaigns(suite, await database_url("campaigns"))
    followups = followups_pb2_grpc.FollowUpServiceStub(suite.channels["campaigns"])
    advisor_md = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), advisor))
    other_md = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S002"), "op-2"))

    async def enroll(mobile: str, *, phone: bool, consultant: str = "") -> str:
        created = await members.CreateMember(
            M.CreateMemberRequest(
                request_id=str(uuid.uuid4()),
                member=M.Member(
                    home_store_id="S001",
                    given_name="娜",
                    mobile=mobile,
                    preferred_language="zh-CN",
                    consultant_id=consultant,
                    birthday=date_pb2.Date(year=1990, month=7, day=15),
                    consents=[M.Consent(channel=M.CONTACT_CHANNEL_PHONE, granted=phone)],
                ),
            ),
            metadata=HQ,
        )
        return created.member_id

    async def tasks_of(member_id: str, *states: int) -> list[F.FollowUpTask]:
        found = await followups.ListFollowUpTasks(
            F.ListFollowUpTasksRequest(member_id=member_id, states=list(states), page_size=50),
            metadata=HQ,
        )
        return list(found.tasks)

    every = (
        F.FOLLOW_UP_TASK_STATE_SCHEDULED,
        F.FOLLOW_UP_TASK_STATE_DUE,
        F.FOLLOW_UP_TASK_STATE_COMPLETED,
        F.FOLLOW_UP_TASK_STATE_SKIPPED,
    )

    # The default plans are there out of the box.
    plans = await followups.ListFollowUpPlans(F.ListFollowUpPlansRequest(), metadata=HQ)
    assert {p.plan_id for p in plans.plans} == {"birthday", "three-three-three", "win-back"}

    # A first sale: three calls at 11:00 Shanghai time, 3 days, 3 weeks and 3 months on.
    alice = await enroll("+8613800138101", phone=True, consultant=advisor)
    day = dt.date(2026, 11, 30)
    first = sale(alice, day, "skincare")
    await publish(suite, "loyalty.v1.sale.recorded", first, "evt-first")
    created = await eventually(lambda: tasks_of(alice, *every), lambda t: len(t) == 3)
    local = sorted(
        (t.occasion, t.due_time.ToDatetime(dt.UTC).astimezone(SHANGHAI)) for t in created
    )
    assert [(o, when.date(), when.hour) for o, when in local] == [
        ("3d", dt.date(2026, 12, 3), 11),
        ("3m", dt.date(2027, 2, 28), 11),
        ("3w", dt.date(2026, 12, 21), 11),
    ]
    assert {t.assignee_staff_id for t in created} == {advisor}
    assert {t.store_id for t in created} == {"S001"}

    # A second sale and a redelivered first one change nothing.
    await publish(suite, "loyalty.v1.sale.recorded", first, "evt-first")
    await publish(suite, "loyalty.v1.sale.recorded", sale(alice, day + dt.timedelta(days=1)), "e2")
    bob = await enroll("+8613800138102", phone=False)
    await publish(suite, "loyalty.v1.sale.recorded", sale(bob, day), "evt-bob")
    # Bob refused phone calls: his tasks are recorded as skipped, not open.
    skipped = await eventually(lambda: tasks_of(bob, *every), lambda t: len(t) == 3)
    assert {t.state for t in skipped} == {F.FOLLOW_UP_TASK_STATE_SKIPPED}
    assert {t.skip_reason for t in skipped} == {"NO_PHONE_CONSENT"}
    assert await tasks_of(bob) == []
    assert len(await tasks_of(alice, *every)) == 3

    # The advisor sees their tasks; another store's operator does not.
    mine = await followups.ListFollowUpTasks(F.ListFollowUpTasksRequest(), metadata=advisor_md)
    assert {t.member_id for t in mine.tasks} == {alice}
    theirs = await followups.ListFollowUpTasks(F.ListFollowUpTasksRequest(), metadata=other_md)
    assert list(theirs.tasks) == []

    # Reschedule: snapped into the next window.
    three_days = next(t for t in created if t.occasion == "3d")
    # Days ahead of the real clock: a time in the past is refused.
    ahead = (dt.datetime.now(SHANGHAI) + dt.timedelta(days=3)).date()
    wanted = dt.datetime.combine(ahead, dt.time(13, 5), SHANGHAI)
    moved = await followups.RescheduleFollowUpTask(
        F.RescheduleFollowUpTaskRequest(
            request_id="move-1", task_id=three_days.task_id, due_time=ts(wanted)
        ),
        metadata=advisor_md,
    )
    assert moved.due_time.ToDatetime(dt.UTC) == dt.datetime.combine(ahead, dt.time(16), SHANGHAI)
    assert moved.reschedule_count == 1

    # Complete: a follow-up record on the member's file, as the advisor.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await followups.CompleteFollowUpTask(
            F.CompleteFollowUpTaskRequest(
                request_id="done-x",
                task_id=three_days.task_id,
                outcome=F.FOLLOW_UP_TASK_OUTCOME_REACHED,
            ),
            metadata=other_md,
        )
    assert rpc_details(refused.value)["reason"] == "TASK_NOT_FOUND"
    request = F.CompleteFollowUpTaskRequest(
        request_id="done-1",
        task_id=three_days.task_id,
        outcome=F.FOLLOW_UP_TASK_OUTCOME_REACHED,
        note="likes the serum",
        duration_seconds=120,
    )
    done = await followups.CompleteFollowUpTask(request, metadata=advisor_md)
    again = await followups.CompleteFollowUpTask(request, metadata=advisor_md)
    assert done == again
    assert done.state == F.FOLLOW_UP_TASK_STATE_COMPLETED and done.follow_up_id
    records = await members.ListFollowUps(M.ListFollowUpsRequest(member_id=alice), metadata=HQ)
    assert [(r.follow_up_id, r.staff_id, r.outcome) for r in records.follow_ups] == [
        (done.follow_up_id, advisor, M.FOLLOW_UP_OUTCOME_REACHED)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await followups.CompleteFollowUpTask(
            F.CompleteFollowUpTaskRequest(
                request_id="done-2",
                task_id=three_days.task_id,
                outcome=F.FOLLOW_UP_TASK_OUTCOME_NO_ANSWER,
            ),
            metadata=advisor_md,
        )
    assert rpc_details(refused.value)["reason"] == "TASK_CLOSED"

    # The pass, with a clock: birthdays in July, win-back 90 days after the last visit.
    p = planner(runtime.context)
    lapse = dt.datetime(2027, 3, 2, 1, tzinfo=dt.UTC)  # 90 days after 1 December (local)
    assert (await p.run_pass(runtime.db, lapse))["win_back"] == 2
    assert (await p.run_pass(runtime.db, lapse + dt.timedelta(days=1)))["win_back"] == 0
    win_back = [t for t in await tasks_of(alice, *every) if t.plan_id == "win-back"]
    assert [t.occasion for t in win_back] == ["lapse:2026-12-01"]
    july = dt.datetime(2027, 7, 1, 2, tzinfo=dt.UTC)
    counts = await p.run_pass(runtime.db, july)
    assert (counts["birthday"], counts["win_back"]) == (2, 0)  # Alice (to call) and Bob (skipped)
    birthday = [t for t in await tasks_of(alice, *every) if t.plan_id == "birthday"]
    assert [
        (t.occasion, t.due_time.ToDatetime(dt.UTC).astimezone(SHANGHAI).date()) for t in birthday
    ] == [("2027", dt.date(2027, 7, 15))]
    again = await p.run_pass(runtime.db, july)
    assert (again["birthday"], again["win_back"]) == (0, 0)

    # A post-purchase plan.
    await followups.CreateFollowUpPlan(
        F.CreateFollowUpPlanRequest(
            request_id="plan-serum",
            plan=F.FollowUpPlan(
                plan_id="serum-care",
                kind=F.FOLLOW_UP_PLAN_KIND_POST_PURCHASE,
                display_name="精华护理",
                enabled=True,
                category="serum",
                days=2,
                call_windows=[F.CallWindow(start_time="10:00", end_time="10:30")],
            ),
        ),
        metadata=HQ,
    )
    updated = await followups.UpdateFollowUpPlan(
        F.UpdateFollowUpPlanRequest(
            request_id="plan-serum-2",
            plan=F.FollowUpPlan(plan_id="serum-care", days=5),
            update_mask=FieldMask(paths=["days"]),
        ),
        metadata=HQ,
    )
    assert updated.days == 5 and updated.category == "serum"
    await publish(
        suite, "loyalty.v1.sale.recorded", sale(alice, dt.date(2027, 4, 1), "serum"), "e-serum"
    )
    care = await eventually(
        lambda: tasks_of(alice, *every),
        lambda t: any(x.plan_id == "serum-care" for x in t),
    )
    serum = next(t for t in care if t.plan_id == "serum-care")
    assert serum.due_time.ToDatetime(dt.UTC) == dt.datetime(2027, 4, 6, 10, tzinfo=SHANGHAI)

    # Statistics for the store over the whole period.
    stats = await followups.GetFollowUpStatistics(
        F.GetFollowUpStatisticsRequest(
            store_id="S001",
            start_time=ts(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
            end_time=ts(dt.datetime(2028, 1, 1, tzinfo=dt.UTC)),
        ),
        metadata=HQ,
    )
    assert stats.created == 11  # 3+3 (3+3+3), 2 birthday, 2 win-back, 1 care
    assert stats.completed == 1
    assert stats.skipped == 5
    assert [(o.outcome, o.count) for o in stats.by_outcome] == [
        (F.FOLLOW_UP_TASK_OUTCOME_REACHED, 1)
    ]
    async with runtime.db.sessions() as session:
        assert await store.get_store(session, "S001") is not None
