"""Scheduled and direct notifications against real services: a real members
service (member files, stores in Shanghai and Mexico City, a store manager),
a real campaigns service (follow-up tasks from a real sale event, segments),
and the notify service; the schedules driven with a clock of the test's
own. On SQLite and PostgreSQL.

What is asserted is what the schedules and sends own: the notifications
they write (whom, which trigger, not before when, with which values), once
each, however often or however cut short the jobs run."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.auth import Role, Scope, ScopeLevel
from chassis.config import Settings
from chassis.db import Database, utcnow
from chassis.service import ServiceRuntime
from cornucopia.campaigns.v1 import followups_pb2 as F
from cornucopia.campaigns.v1 import followups_pb2_grpc, segments_pb2_grpc
from cornucopia.campaigns.v1 import segments_pb2 as S
from cornucopia.common.v1 import date_pb2, org_pb2
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc, organisation_pb2, organisation_pb2_grpc
from cornucopia.notify.v1 import notify_pb2, sends_pb2_grpc
from cornucopia.notify.v1 import sends_pb2 as N
from services.members.server import definition as members_definition
from services.notify import store as notify_store
from services.notify.domain import Category, Channel
from services.notify.domain.optouts import Scope as OptOutScope
from services.notify.domain.optouts import Source as OptOutSource
from services.notify.domain.policy import NotifyPolicy
from services.notify.peers import Peers
from services.notify.schedules import Schedules
from services.notify.server import definition as notify_definition
from services.notify.server import templates as templates_server
from services.notify.server.sends import SendsWorker, criteria_json, new_send_id
from services.notify.store import intents, optouts, policy, schedules
from services.notify.store import sends as send_store
from services.notify.store.messages import messages as messages_table
from tests.integration.conftest import (
    Suite,
    a_store,
    auth,
    eventually,
    rpc_details,
    seed_organisation,
    token,
)
from tests.integration.infra import DatabaseFactory
from tests.integration.test_campaigns_followups import publish, sale, start_campaigns

HQ = auth()
OTHER_ADMIN = auth(token((Role.HQ_ADMIN,), Scope(ScopeLevel.HQ), "hq-2"))
STORE_MANAGER = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "mgr-1"))
NINE = dt.time(9, 0)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC)


def ts(at: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


async def start_notify(suite: Suite, url: str) -> ServiceRuntime:
    peers = {"members": f"127.0.0.1:{suite.runtimes['members'].port}"}
    if "campaigns" in suite.runtimes:
        peers["campaigns"] = f"127.0.0.1:{suite.runtimes['campaigns'].port}"
    settings = Settings(
        service="notify",
        environment="test",
        var_dir=suite.var_dir,
        database_url=url,
        nats_url=suite.nats_url,
        grpc_listen="127.0.0.1:0",
        peers=peers,
    )
    runtime = ServiceRuntime(notify_definition, settings)
    await runtime.start()
    await asyncio.wait_for(runtime.ready.wait(), timeout=20)
    suite.runtimes["notify"] = runtime
    suite.channels["notify"] = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    return runtime


@dataclass
class Chain:
    """The running services, with the test's own directory of them."""

    suite: Suite
    notify: ServiceRuntime
    directory: Peers

    @property
    def db(self) -> Database:
        return self.notify.db

    def schedules(self, worker_id: str = "test-worker", page_size: int = 200) -> Schedules:
        async def default_policy() -> NotifyPolicy:
            async with self.db.sessions() as session:
                return await policy.load_policy(session)

        return Schedules(
            self.db, self.directory, default_policy, worker_id=worker_id, page_size=page_size
        )

    async def messages(self) -> list[dict[str, Any]]:
        """The greetings planned into messages (not the welcomes)."""
        c = messages_table.c
        async with self.db.sessions() as session:
            rows = await session.execute(
                sa.select(messages_table)
                .where(c.template.in_(("birthday", "anniversary")))
                .order_by(c.not_before)
            )
        return [dict(row._mapping) for row in rows]

    async def notifications(self, trigger: str | None = None) -> list[dict[str, Any]]:
        c = intents.notifications.c
        query = sa.select(intents.notifications).order_by(c.dedup_key)
        if trigger is not None:
            query = query.where(c.trigger == trigger)
        async with self.db.sessions() as session:
            rows = await session.execute(query)
        out = []
        for row in rows:
            item = dict(row._mapping)
            item["variables"] = json.loads(item["variables"])
            out.append(item)
        return out


def mexico_store() -> organisation_pb2.Store:
    store = a_store("S003", "WEST")
    store.display_name = "Tienda Reforma"
    store.time_zone = "America/Mexico_City"
    store.currency_code = "MXN"
    return store


async def open_chain(suite: Suite, database_url: DatabaseFactory) -> Chain:
    """Members (the test chain, plus S003 in Mexico City and a manager of
    S001), campaigns and notify."""
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    org = organisation_pb2_grpc.OrganisationServiceStub(suite.channels["members"])
    await org.CreateStore(
        organisation_pb2.CreateStoreRequest(
            request_id="seed-store-S003",
            store=mexico_store(),
        ),
        metadata=HQ,
    )
    await start_campaigns(suite, await database_url("campaigns"))
    notify = await start_notify(suite, await database_url("notify"))
    directory = Peers(notify.context.settings)
    return Chain(suite, notify, directory)


async def add_manager(suite: Suite, store_id: str, login_id: str) -> str:
    org = organisation_pb2_grpc.OrganisationServiceStub(suite.channels["members"])
    staff = await org.CreateStaffMember(
        organisation_pb2.CreateStaffMemberRequest(
            request_id=f"seed-staff-{login_id}",
            staff_member=organisation_pb2.StaffMember(
                login_id=login_id,
                display_name="店长",
                assignment=org_pb2.OrgUnitRef(level=org_pb2.ORG_LEVEL_STORE, id=store_id),
                roles=[organisation_pb2.STAFF_ROLE_STORE_MANAGER],
            ),
        ),
        metadata=HQ,
    )
    return str(staff.staff_id)


_mobiles = iter(range(1000))


async def enroll(
    suite: Suite,
    store_id: str,
    *,
    birthday: tuple[int, int, int] | None = None,
    language: str = "zh-CN",
    enrolled: dt.datetime | None = None,
    anniversaries: tuple[tuple[str, tuple[int, int, int]], ...] = (),
    phone: bool = True,
) -> str:
    members = members_pb2_grpc.MembersServiceStub(suite.channels["members"])
    member = M.Member(
        home_store_id=store_id,
        given_name="Ana",
        mobile=f"+86139{uuid.uuid4().int % 10**8:08d}",
        preferred_language=language,
        consents=[
            M.Consent(channel=M.CONTACT_CHANNEL_SMS, granted=True),
            M.Consent(channel=M.CONTACT_CHANNEL_PHONE, granted=phone),
        ],
        anniversaries=[
            M.Anniversary(kind=kind, date=date_pb2.Date(year=y, month=m, day=d))
            for kind, (y, m, d) in anniversaries
        ],
    )
    if birthday is not None:
        member.birthday.CopyFrom(
            date_pb2.Date(year=birthday[0], month=birthday[1], day=birthday[2])
        )
    if enrolled is not None:
        member.enroll_time.CopyFrom(ts(enrolled))
    created = await members.CreateMember(
        M.CreateMemberRequest(request_id=str(uuid.uuid4()), member=member), metadata=HQ
    )
    return str(created.member_id)


# --- greetings --------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_birthdays_and_anniversaries_at_nine_local_once_each(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    chain = await open_chain(suite, database_url)
    alice = await enroll(suite, "S001", birthday=(1990, 3, 15))  # Shanghai
    bob = await enroll(suite, "S003", birthday=(1985, 3, 15), language="es")  # Mexico City
    carol = await enroll(suite, "S001", birthday=(1992, 3, 10))  # her day has gone by
    await enroll(suite, "S001", birthday=(1990, 7, 15))  # another month
    eve = await enroll(suite, "S001", birthday=(1996, 2, 29))  # a leap-day birthday
    frank = await enroll(
        suite,
        "S001",
        enrolled=utc(2024, 3, 20, 2),
        anniversaries=(("wedding", (2015, 3, 18)), ("first_visit", (0, 3, 25))),
    )
    archived = await enroll(suite, "S001", birthday=(1990, 3, 16))
    members = members_pb2_grpc.MembersServiceStub(suite.channels["members"])
    await members.ArchiveMember(M.ArchiveMemberRequest(member_id=archived), metadata=HQ)

    # 15 March 2027, 08:30 in Shanghai, still 14 March in Mexico City.
    today = utc(2027, 3, 15, 0, 30)
    jobs = chain.schedules()
    [march] = await jobs.birthdays(today)
    assert (march.period, march.done) == ("2027-03", True)
    greeted = await chain.notifications("birthday")
    assert [(n["member_id"], n["not_before"]) for n in greeted] == sorted(
        [(alice, utc(2027, 3, 15, 1)), (bob, utc(2027, 3, 15, 15))]
    )
    assert {n["dedup_key"] for n in greeted} == {f"birthday:{alice}:2027", f"birthday:{bob}:2027"}
    assert {n["category"] for n in greeted} == {"marketing"}
    assert carol not in {n["member_id"] for n in greeted}

    # Running it again (the run is done) or on another replica writes nothing.
    assert sum(r.written for r in await jobs.birthdays(today)) == 0
    assert sum(r.written for r in await chain.schedules("other").birthdays(today)) == 0
    assert len(await chain.notifications("birthday")) == 2

    # February's run, three days ahead of March: 29 February is greeted on
    # the 28th in 2027.
    await jobs.birthdays(utc(2027, 2, 26, 12))
    [leap] = [n for n in await chain.notifications("birthday") if n["member_id"] == eve]
    assert leap["not_before"] == utc(2027, 2, 28, 1)

    # Anniversaries: Frank's wedding (12 years), the day he joined (3 years);
    # a date without its year is not greeted (no "years" to say).
    await jobs.anniversaries(today)
    dates = await chain.notifications("anniversary")
    assert [(n["member_id"], n["variables"], n["not_before"]) for n in dates] == [
        (frank, {"kind": "enrollment", "years": "3"}, utc(2027, 3, 20, 1)),
        (frank, {"kind": "wedding", "years": "12"}, utc(2027, 3, 18, 1)),
    ]
    assert [n["dedup_key"] for n in dates] == [
        f"anniversary:{frank}:enrollment:2027",
        f"anniversary:{frank}:wedding:2027",
    ]
    await jobs.anniversaries(today)
    assert len(await chain.notifications("anniversary")) == 2

    # The planner takes each greeting an hour before its time, in the
    # member's language: Alice's at 08:30 in Shanghai, Bob's (09:00 in Mexico
    # City) not yet; at 08:30 in Mexico City, his. Eve's day (28 February)
    # has gone by: her greeting is not sent late, it is kept as too late.
    planner = templates_server.planner(chain.notify.context)
    await planner.plan_pending(now=today)
    planned = {m["member_id"]: m for m in await chain.messages()}
    assert (planned[eve]["status"], planned[eve]["status_reason"]) == ("suppressed", "too_late")
    del planned[eve]
    assert [(m, p["locale"], p["not_before"], p["status"]) for m, p in planned.items()] == [
        (alice, "zh-CN", utc(2027, 3, 15, 1), "queued")
    ]
    await planner.plan_pending(now=utc(2027, 3, 15, 14, 30))
    planned = {m["member_id"]: m for m in await chain.messages()}
    assert (planned[bob]["locale"], planned[bob]["not_before"]) == ("es", utc(2027, 3, 15, 15))
    assert planned[bob]["template"] == "birthday" and planned[bob]["category"] == "marketing"
    await chain.directory.close()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_notification_that_fails_to_plan_holds_back_no_other(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planning pass writes its messages in one transaction. When one of
    them fails, the others are planned all the same and the failing one is
    put off like one whose member could not be looked up, then planned."""
    chain = await open_chain(suite, database_url)
    alice = await enroll(suite, "S001", birthday=(1990, 3, 15))
    bob = await enroll(suite, "S001", birthday=(1985, 3, 15))
    carol = await enroll(suite, "S001", birthday=(1992, 3, 15))
    today = utc(2027, 3, 15, 0, 30)
    await chain.schedules().birthdays(today)
    # Carol wants no marketing by SMS: the pass reads its members' opt-outs
    # together, and hers still counts.
    async with chain.db.transaction() as session:
        await optouts.record(
            session,
            optout_id="OPT-CAROL",
            member_id=carol,
            channel=Channel.SMS,
            scope=OptOutScope.MARKETING,
            source=OptOutSource.STAFF,
            recorded_by="tests",
            now=today,
        )
    queue_message = notify_store.queue_message
    failures: list[str] = []

    async def full_disk_for_bob(session: Any, **message: Any) -> None:
        # Bob's greeting fails in the pass, then alone; its retry succeeds.
        if message["member_id"] == bob and message["template"] == "birthday" and len(failures) < 2:
            failures.append(message["message_id"])
            raise OSError("no space left on device")
        await queue_message(session, **message)

    monkeypatch.setattr(notify_store, "queue_message", full_disk_for_bob)
    planner = templates_server.planner(chain.notify.context)
    # (The members' welcomes may be in the pass too.)
    assert await planner.plan_pending(now=today) >= 3
    assert len(failures) == 2
    planned = {m["member_id"]: m for m in await chain.messages()}
    assert planned.keys() == {alice, carol}
    assert planned[alice]["status"] == "queued"
    assert planned[carol]["status"] == "suppressed"
    [held_back] = [n for n in await chain.notifications("birthday") if n["member_id"] == bob]
    assert held_back["planned_at"] is None and held_back["attempts"] == 1
    assert held_back["last_error"] == "OSError: no space left on device"
    retry_at = held_back["next_attempt_at"]
    assert retry_at > today
    await planner.plan_pending(now=today)
    assert bob not in {m["member_id"] for m in await chain.messages()}  # not before its delay
    assert await planner.plan_pending(now=retry_at) >= 1
    planned = {m["member_id"]: m for m in await chain.messages()}
    assert planned.keys() == {alice, bob, carol}
    assert [planned[m]["status"] for m in (alice, bob, carol)] == ["queued", "queued", "suppressed"]
    await chain.directory.close()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_run_cut_short_is_taken_over_and_greets_each_member_once(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    chain = await open_chain(suite, database_url)
    born = sorted([await enroll(suite, "S001", birthday=(1990, 4, 20)) for _ in range(5)])
    at = utc(2027, 4, 1, 3)
    # A worker reads two pages of two, then dies holding the run.
    first = await chain.schedules("worker-a", page_size=2).birthdays(at, max_pages=2)
    assert [(r.written, r.done) for r in first] == [(4, False)]
    # Another replica may not take it while the lease holds...
    busy = await chain.schedules("worker-b", page_size=2).birthdays(at + dt.timedelta(minutes=1))
    assert [r.claimed for r in busy] == [False]
    # ...and takes it over once it has run out, where it stopped.
    later = at + dt.timedelta(minutes=6)
    rest = await chain.schedules("worker-b", page_size=2).birthdays(later)
    assert [(r.claimed, r.written, r.done) for r in rest] == [(True, 1, True)]
    greeted = await chain.notifications("birthday")
    assert sorted(n["member_id"] for n in greeted) == born
    async with chain.db.sessions() as session:
        run = await schedules.get_run(session, "birthday", "2027-04")
    assert run is not None and (run.state, run.members_read, run.written) == ("done", 5, 5)
    await chain.directory.close()


# --- the weekly digest ------------------------------------------------------------


async def digests(chain: Chain) -> list[dict[str, Any]]:
    """The digests of the test's weeks (the service's own worker runs on
    the real clock and may have looked at this week's)."""
    return [
        n for n in await chain.notifications("weekly_call_digest") if ":2027-W" in n["dedup_key"]
    ]


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_store_managers_get_the_weekly_calls_once(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    chain = await open_chain(suite, database_url)
    manager = await add_manager(suite, "S001", "manager.one")
    alice = await enroll(suite, "S001", birthday=(1990, 7, 1))
    # A first purchase on Monday 1 March: calls after 3 days, 3 weeks, 3 months.
    await publish(suite, "loyalty.v1.sale.recorded", sale(alice, dt.date(2027, 3, 1)), "evt-sale")
    followups = followups_pb2_grpc.FollowUpServiceStub(suite.channels["campaigns"])

    async def open_tasks() -> list[F.FollowUpTask]:
        found = await followups.ListFollowUpTasks(
            F.ListFollowUpTasksRequest(member_id=alice), metadata=HQ
        )
        return list(found.tasks)

    await eventually(open_tasks, lambda t: len(t) == 3)
    jobs = chain.schedules()
    # Monday 1 March, 08:59 in Shanghai: not yet.
    # (Mexico City's week is still W08 there: S003's digest is due, but it
    # has no manager to get it.)
    early = await jobs.digests(utc(2027, 3, 1, 0, 59))
    assert [(o.period, o.written) for o in early] == [("2027-W08:S003", 0)]
    monday = utc(2027, 3, 1, 2)
    await jobs.digests(monday)
    [digest] = await digests(chain)
    assert digest["staff_id"] == manager and digest["member_id"] is None
    assert digest["dedup_key"] == f"digest:S001:2027-W09:{manager}"
    assert digest["not_before"] == utc(2027, 3, 1, 1)
    assert digest["category"] == "transactional"
    values = digest["variables"]
    # Only the 3-day call falls in the coming week; 11:00 Shanghai time.
    assert (values["store_id"], values["task_count"], values["week_start"]) == (
        "S001",
        "1",
        "2027-03-01",
    )
    assert values["call_list"].startswith(f"03-04 11:00 {alice}")
    assert values["store_name"] == "Store S001"
    # No personal value: the member number, a time and the plan's reason.
    assert "Ana" not in json.dumps(values, ensure_ascii=False)
    # Later that week, again: nothing new. The next week: a new digest.
    await jobs.digests(utc(2027, 3, 3, 2))
    assert len(await digests(chain)) == 1
    await chain.schedules("other").digests(utc(2027, 3, 8, 2))
    weeks = [n["dedup_key"] for n in await digests(chain)]
    assert weeks == [f"digest:S001:2027-W09:{manager}", f"digest:S001:2027-W10:{manager}"]
    await chain.directory.close()


# --- direct sends -----------------------------------------------------------------


async def approval_threshold(chain: Chain, size: int) -> None:
    """Saves the policy with this threshold, and waits until the service
    reads it (a worker reading the policy while it was saved keeps the old
    one for a few seconds)."""
    async with chain.db.transaction() as session:
        await policy.save_policy(
            session,
            NotifyPolicy(approval_threshold=size),
            principal="test-admin",
            store_id="",
            now=utcnow(),
        )

    async def threshold() -> int:
        async with chain.db.sessions() as session:
            return (await policy.load_policy(session)).approval_threshold

    await eventually(threshold, lambda found: found == size, timeout=10)


async def get_send(chain: Chain, send_id: str) -> N.Send:
    stub = sends_pb2_grpc.SendsServiceStub(chain.suite.channels["notify"])
    return await stub.GetSend(N.GetSendRequest(send_id=send_id), metadata=HQ)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_direct_sends_to_lists_and_segments_with_approval(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    chain = await open_chain(suite, database_url)
    stub = sends_pb2_grpc.SendsServiceStub(suite.channels["notify"])
    await approval_threshold(chain, 3)
    june = sorted([await enroll(suite, "S001", birthday=(1990, 6, 15)) for _ in range(4)])
    others = [await enroll(suite, "S002", birthday=(1990, 6, 15)) for _ in range(2)]

    # A list at or under the threshold goes at once; a member listed twice
    # hears once.
    small = await stub.CreateSend(
        N.CreateSendRequest(
            request_id="send-small",
            send=N.Send(member_ids=[june[0], june[1], june[0]], channel=notify_pb2.CHANNEL_SMS),
        ),
        metadata=HQ,
    )
    assert (small.state, small.audience_size, small.approval_required) == (
        N.SEND_STATE_RUNNING,
        2,
        False,
    )
    done = await eventually(
        lambda: get_send(chain, small.send_id), lambda s: s.state == N.SEND_STATE_DONE
    )
    assert done.notifications_written == 2
    written = [n for n in await chain.notifications("marketing") if n["send_id"] == small.send_id]
    assert sorted(n["member_id"] for n in written) == june[:2]
    assert {n["dedup_key"] for n in written} == {f"send:{small.send_id}:{m}" for m in june[:2]}
    assert {(n["channel"], n["category"]) for n in written} == {("sms", "marketing")}
    # The same request again returns the same send.
    again = await stub.CreateSend(
        N.CreateSendRequest(
            request_id="send-small",
            send=N.Send(member_ids=[june[0], june[1], june[0]], channel=notify_pb2.CHANNEL_SMS),
        ),
        metadata=HQ,
    )
    assert again.send_id == small.send_id

    # A segment above the threshold waits for a second HQ admin.
    segments = segments_pb2_grpc.SegmentsServiceStub(suite.channels["campaigns"])
    await segments.CreateSegment(
        S.CreateSegmentRequest(
            request_id="seg-june",
            segment=S.Segment(
                segment_id="JUNE-S001",
                name="June birthdays at S001",
                criteria=M.MemberCriteria(home_store_ids=["S001"], birth_months=[6]),
            ),
        ),
        metadata=HQ,
    )
    big = await stub.CreateSend(
        N.CreateSendRequest(
            request_id="send-june", send=N.Send(segment_id="JUNE-S001", template="june_offer")
        ),
        metadata=HQ,
    )
    assert (big.state, big.audience_size, big.approval_required, big.segment_version) == (
        N.SEND_STATE_PENDING_APPROVAL,
        4,
        True,
        1,
    )
    await asyncio.sleep(0.3)
    assert (await get_send(chain, big.send_id)).notifications_written == 0
    mine = await refused(
        stub.ApproveSend(N.ApproveSendRequest(request_id="a-1", send_id=big.send_id), metadata=HQ)
    )
    assert (mine.code(), rpc_details(mine)["reason"]) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "SELF_APPROVAL",
    )
    not_hq = await refused(
        stub.ApproveSend(
            N.ApproveSendRequest(request_id="a-2", send_id=big.send_id), metadata=STORE_MANAGER
        )
    )
    assert not_hq.code() == grpc.StatusCode.PERMISSION_DENIED
    approved = await stub.ApproveSend(
        N.ApproveSendRequest(request_id="a-3", send_id=big.send_id), metadata=OTHER_ADMIN
    )
    assert approved.approved.principal == "hq-2"
    assert approved.state in (N.SEND_STATE_RUNNING, N.SEND_STATE_DONE)
    done = await eventually(
        lambda: get_send(chain, big.send_id), lambda s: s.state == N.SEND_STATE_DONE
    )
    assert done.notifications_written == 4
    segment_sent = [n for n in await chain.notifications() if n["send_id"] == big.send_id]
    assert sorted(n["member_id"] for n in segment_sent) == june
    assert not set(others) & {n["member_id"] for n in segment_sent}
    assert {n["template"] for n in segment_sent} == {"june_offer"}
    # Approving twice: the send is no longer waiting.
    twice = await refused(
        stub.ApproveSend(
            N.ApproveSendRequest(request_id="a-4", send_id=big.send_id), metadata=OTHER_ADMIN
        )
    )
    assert rpc_details(twice)["reason"] == "SEND_NOT_PENDING_APPROVAL"

    # A rejected send writes nothing; a scheduled one waits for its time and
    # can be cancelled.
    rejected_send = await stub.CreateSend(
        N.CreateSendRequest(request_id="send-all", send=N.Send(member_ids=june + others)),
        metadata=HQ,
    )
    rejected = await stub.RejectSend(
        N.RejectSendRequest(request_id="r-1", send_id=rejected_send.send_id, reason="too broad"),
        metadata=OTHER_ADMIN,
    )
    assert (rejected.state, rejected.reason) == (N.SEND_STATE_REJECTED, "too broad")
    later = await stub.CreateSend(
        N.CreateSendRequest(
            request_id="send-later",
            send=N.Send(member_ids=[june[3]], schedule_time=ts(utcnow() + dt.timedelta(days=2))),
        ),
        metadata=HQ,
    )
    assert later.state == N.SEND_STATE_SCHEDULED
    cancelled = await stub.CancelSend(
        N.CancelSendRequest(request_id="c-1", send_id=later.send_id, reason="changed our mind"),
        metadata=HQ,
    )
    assert cancelled.state == N.SEND_STATE_CANCELLED
    closed = await refused(
        stub.CancelSend(N.CancelSendRequest(request_id="c-2", send_id=later.send_id), metadata=HQ)
    )
    assert rpc_details(closed)["reason"] == "SEND_CLOSED"
    sent_to = {n["send_id"] for n in await chain.notifications()}
    assert rejected_send.send_id not in sent_to and later.send_id not in sent_to

    listed = await stub.ListSends(N.ListSendsRequest(page_size=2), metadata=HQ)
    assert [s.send_id for s in listed.sends] == [later.send_id, rejected_send.send_id]
    rest = await stub.ListSends(
        N.ListSendsRequest(page_size=10, page_token=listed.next_page_token), metadata=HQ
    )
    assert [s.send_id for s in rest.sends] == [big.send_id, small.send_id]

    # Bad input: every problem at once, nothing written.
    bad = await refused(
        stub.CreateSend(
            N.CreateSendRequest(
                request_id="send-bad",
                send=N.Send(
                    member_ids=["M1"],
                    segment_id="JUNE-S001",
                    trigger="welcome",
                    channel=notify_pb2.CHANNEL_CALL_TASK,
                    schedule_time=ts(utcnow() - dt.timedelta(days=1)),
                ),
            ),
            metadata=HQ,
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(rpc_details(bad)["violations"]) == {
        "send.segment_id",
        "send.trigger",
        "send.channel",
        "send.schedule_time",
    }
    missing = await refused(
        stub.CreateSend(
            N.CreateSendRequest(request_id="send-nope", send=N.Send(segment_id="NOPE")),
            metadata=HQ,
        )
    )
    assert rpc_details(missing)["reason"] == "SEGMENT_NOT_FOUND"
    listed_all = await stub.ListSends(N.ListSendsRequest(), metadata=HQ)
    assert len(listed_all.sends) == 4
    await chain.directory.close()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_send_cut_short_writes_each_member_once(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers of the test's own on a send the service's worker does not
    see (written straight into the store, started by the test's clock, and
    the service's worker asleep): the first dies after one page, the second
    takes over after the lease."""
    monkeypatch.setenv("NOTIFY_SENDS_POLL_SECONDS", "3600")
    chain = await open_chain(suite, database_url)
    members = sorted([await enroll(suite, "S002", birthday=(1991, 5, 5)) for _ in range(5)])
    criteria = M.MemberCriteria(home_store_ids=["S002"])
    now = utcnow()
    send = send_store.SendRecord(
        send_id=new_send_id(),
        trigger="marketing",
        template=None,
        channel=None,
        segment_id="S002-ALL",
        segment_version=1,
        criteria=criteria_json(criteria),
        schedule_at=now + dt.timedelta(days=1),
        state=send_store.SendState.SCHEDULED,
        approval_required=False,
        audience_size=5,
        processed=0,
        written=0,
        cursor="",
        claimed_by=None,
        lease_until=None,
        trace_headers={},
        created_by="test-admin",
        created_store_id="",
        created_at=now,
        approved_by=None,
        approved_at=None,
        rejected_by=None,
        rejected_at=None,
        cancelled_by=None,
        cancelled_at=None,
        reason="",
        finished_at=None,
    )
    async with chain.db.transaction() as session:
        await send_store.insert_send(session, send, [])
    # Its time comes (for the test's clock only: the service's worker sees
    # the real one).
    at = now + dt.timedelta(days=1, minutes=1)
    first = SendsWorker(chain.db, chain.directory, worker_id="a", select_page=2)
    async with chain.db.transaction() as session:
        assert await send_store.start_due(session, at) == 1
    assert await first.expand(send.send_id, now=at, max_batches=1) == 2
    second = SendsWorker(chain.db, chain.directory, worker_id="b", select_page=2)
    # Held by the first until its lease runs out.
    assert await second.run_pass(at + dt.timedelta(minutes=1)) == 0
    # A page done twice (the first worker's page, repeated before its cursor
    # moved) writes nothing again: the dedup key names the send and member.
    async with chain.db.transaction() as session:
        for member_id in members[:2]:
            assert not await intents.add_notification(
                session,
                notification_id=str(uuid.uuid4()),
                dedup_key=f"send:{send.send_id}:{member_id}",
                trigger="marketing",
                category=Category.MARKETING,
                variables={},
                created_at=at,
                trace_headers={},
                member_id=member_id,
                send_id=send.send_id,
            )
    assert await second.run_pass(at + dt.timedelta(minutes=6)) == 3
    done = await get_send(chain, send.send_id)
    assert (done.state, done.notifications_written) == (N.SEND_STATE_DONE, 5)
    written = [n for n in await chain.notifications() if n["send_id"] == send.send_id]
    assert sorted(n["member_id"] for n in written) == members
    await chain.directory.close()


async def test_sends_over_http_for_hq(suite: Suite, database_url: DatabaseFactory) -> None:
    """The gateway's routes in front of the same services: a send made,
    refused to its creator's approval as problem+json, approved by another
    admin, listed."""
    from tests.integration.gateway_rig import _gateway, problem

    chain = await open_chain(suite, database_url)
    await approval_threshold(chain, 1)
    members = [await enroll(suite, "S001", birthday=(1990, 6, 1)) for _ in range(2)]
    hq = {"authorization": HQ[0][1]}
    other = {"authorization": OTHER_ADMIN[0][1]}
    ports = {name: runtime.port for name, runtime in suite.runtimes.items()}
    async with _gateway(suite, **ports) as http:
        made = await http.post(
            "/v1/notify/sends",
            json={"member_ids": members, "channel": "sms", "template": "june_offer"},
            headers={**hq, "idempotency-key": "http-send-1"},
        )
        assert made.status_code == 201, made.text
        send = made.json()
        assert (send["state"], send["audience_size"], send["channel"]) == (
            "pending_approval",
            2,
            "sms",
        )
        path = f"/v1/notify/sends/{send['send_id']}"
        own = await http.post(f"{path}/approve", headers={**hq, "idempotency-key": "ap-1"})
        problem(own, 403, "SELF_APPROVAL")
        bad = await http.post(
            "/v1/notify/sends",
            json={"member_ids": members, "segment_id": "JUNE"},
            headers={**hq, "idempotency-key": "http-send-2"},
        )
        assert {e["field"] for e in problem(bad, 400, "INVALID_FIELDS")["errors"]} == {"segment_id"}
        approved = await http.post(f"{path}/approve", headers={**other, "idempotency-key": "ap-2"})
        assert approved.status_code == 200, approved.text
        assert approved.json()["approved"]["principal"] == "hq-2"
        done = await eventually(
            lambda: http.get(path, headers=hq), lambda r: r.json()["state"] == "done"
        )
        assert done.json()["notifications_written"] == 2
        listed = await http.get("/v1/notify/sends?state=done", headers=hq)
        assert [s["send_id"] for s in listed.json()["sends"]] == [send["send_id"]]
    await chain.directory.close()
