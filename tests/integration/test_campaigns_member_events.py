"""Member events through real gRPC on SQLite and PostgreSQL: creating,
inviting (one event.invited per new guest), answers against the capacity
under concurrency, check-in at the door and the attendance report."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.auth import Role, Scope, ScopeLevel
from chassis.db import Database, outbox_table, utcnow
from cornucopia.campaigns.v1 import member_events_pb2 as E
from cornucopia.campaigns.v1 import member_events_pb2_grpc
from services.campaigns.server import definition as campaigns
from services.campaigns.store import member_events as event_store
from tests.integration.conftest import Suite, auth, rpc_details, token
from tests.integration.infra import DatabaseFactory, migrate, schema_drift

HQ = auth()
S001_MANAGER = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "mgr-1"))
S001_DOOR = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "door-1"))
S002_MANAGER = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S002"), "mgr-2"))
S002_DOOR = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S002"), "door-2"))
APP = auth(token((Role.SERVICE,), Scope(ScopeLevel.HQ), "gateway"))


def ts(at: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


def rid() -> str:
    return str(uuid.uuid4())


async def fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def subjects(suite: Suite) -> list[str]:
    db = suite.runtimes["campaigns"].db
    async with db.sessions() as session:
        rows = await session.execute(sa.select(outbox_table.c.subject).order_by(outbox_table.c.seq))
        return [r.subject for r in rows]


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_invite_answer_check_in_and_report(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    await suite.start(campaigns, await database_url("campaigns"))
    stub = member_events_pb2_grpc.MemberEventsServiceStub(suite.channels["campaigns"])
    start = utcnow() + dt.timedelta(hours=1)
    wanted = E.MemberEvent(
        display_name="VIP 之夜",
        kind=E.MEMBER_EVENT_KIND_VIP_EVENING,
        store_id="S001",
        start_time=ts(start),
        end_time=ts(start + dt.timedelta(hours=3)),
        capacity=5,
    )

    # A store manager creates for their own store only.
    refused = await fails(
        stub.CreateMemberEvent(
            E.CreateMemberEventRequest(request_id=rid(), event=wanted), metadata=S002_MANAGER
        )
    )
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    bad = E.MemberEvent()
    bad.CopyFrom(wanted)
    bad.capacity = 0
    invalid = await fails(
        stub.CreateMemberEvent(E.CreateMemberEventRequest(request_id=rid(), event=bad), metadata=HQ)
    )
    assert set(rpc_details(invalid)["violations"]) == {"event.capacity"}
    key = rid()
    event = await stub.CreateMemberEvent(
        E.CreateMemberEventRequest(request_id=key, event=wanted), metadata=S001_MANAGER
    )
    again = await stub.CreateMemberEvent(
        E.CreateMemberEventRequest(request_id=key, event=wanted), metadata=S001_MANAGER
    )
    assert again.event_id == event.event_id
    assert (event.capacity, event.confirmed, event.created_by) == (5, 0, "mgr-1")
    assert event.rsvp_deadline == event.start_time

    # Another store's staff does not see it; HQ and the app do.
    listed = await stub.ListMemberEvents(E.ListMemberEventsRequest(), metadata=S002_MANAGER)
    assert list(listed.events) == []
    listed = await stub.ListMemberEvents(E.ListMemberEventsRequest(store_id="S001"), metadata=HQ)
    assert [e.event_id for e in listed.events] == [event.event_id]
    hidden = await fails(
        stub.GetMemberEvent(E.GetMemberEventRequest(event_id=event.event_id), metadata=S002_DOOR)
    )
    assert hidden.code() == grpc.StatusCode.NOT_FOUND

    # Invitations: one event.invited per new guest.
    members = [f"M{i:03d}" for i in range(1, 23)]
    invited = await stub.InviteMembers(
        E.InviteMembersRequest(request_id=rid(), event_id=event.event_id, member_ids=members),
        metadata=S001_MANAGER,
    )
    assert (invited.invited, invited.already_invited) == (22, 0)
    again_invited = await stub.InviteMembers(
        E.InviteMembersRequest(
            request_id=rid(), event_id=event.event_id, member_ids=["M001", "M023"]
        ),
        metadata=HQ,
    )
    assert (again_invited.invited, again_invited.already_invited) == (1, 1)
    assert (await subjects(suite)).count("campaigns.v1.event.invited") == 23

    # 20 answer YES at once to 5 seats: exactly 5 are confirmed.
    async def yes(member_id: str) -> str:
        try:
            await stub.Rsvp(
                E.RsvpRequest(
                    request_id=rid(),
                    event_id=event.event_id,
                    member_id=member_id,
                    answer=E.RSVP_ANSWER_YES,
                ),
                metadata=APP,
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            return str(rpc_details(exc)["reason"])
        return "OK"

    outcomes = await asyncio.gather(*(yes(m) for m in members[:20]))
    assert outcomes.count("OK") == 5
    assert outcomes.count("EVENT_FULL") == 15
    confirmed = [m for m, o in zip(members[:20], outcomes, strict=True) if o == "OK"]
    current = await stub.GetMemberEvent(
        E.GetMemberEventRequest(event_id=event.event_id), metadata=HQ
    )
    assert current.confirmed == 5

    # A YES again changes nothing; a NO gives the seat back for another.
    same = await stub.Rsvp(
        E.RsvpRequest(
            request_id=rid(),
            event_id=event.event_id,
            member_id=confirmed[0],
            answer=E.RSVP_ANSWER_YES,
        ),
        metadata=APP,
    )
    assert same.answer == E.RSVP_ANSWER_YES
    dropped = await stub.Rsvp(
        E.RsvpRequest(
            request_id=rid(),
            event_id=event.event_id,
            member_id=confirmed[0],
            answer=E.RSVP_ANSWER_NO,
        ),
        metadata=APP,
    )
    assert dropped.answer == E.RSVP_ANSWER_NO
    waiting = next(m for m in members[:20] if m not in confirmed)
    assert await yes(waiting) == "OK"
    assert await yes(members[20]) == "EVENT_FULL"
    await stub.Rsvp(
        E.RsvpRequest(
            request_id=rid(), event_id=event.event_id, member_id="M021", answer=E.RSVP_ANSWER_NO
        ),
        metadata=S001_MANAGER,
    )
    # Not invited: no answer taken.
    assert await yes("M999") == "NOT_INVITED"

    # The door: the event's store's staff; once per member; walk-ins counted.
    coming = [*confirmed[1:], waiting]
    refused = await fails(
        stub.CheckIn(
            E.CheckInRequest(request_id=rid(), event_id=event.event_id, member_id=coming[0]),
            metadata=S002_DOOR,
        )
    )
    # Another store's event reads as missing to its staff.
    assert refused.code() == grpc.StatusCode.NOT_FOUND
    first = await stub.CheckIn(
        E.CheckInRequest(request_id=rid(), event_id=event.event_id, member_id=coming[0]),
        metadata=S001_DOOR,
    )
    assert not first.walk_in and first.checked_in_by == "door-1"
    second = await stub.CheckIn(
        E.CheckInRequest(request_id=rid(), event_id=event.event_id, member_id=coming[0]),
        metadata=HQ,
    )
    assert second.check_in_time == first.check_in_time and second.checked_in_by == "door-1"
    for member_id in coming[1:3]:
        await stub.CheckIn(
            E.CheckInRequest(request_id=rid(), event_id=event.event_id, member_id=member_id),
            metadata=S001_DOOR,
        )
    walk_in = await stub.CheckIn(
        E.CheckInRequest(request_id=rid(), event_id=event.event_id, member_id="M777"),
        metadata=S001_DOOR,
    )
    assert walk_in.walk_in and not walk_in.invited

    report = await stub.GetAttendanceReport(
        E.GetAttendanceReportRequest(event_id=event.event_id), metadata=S001_MANAGER
    )
    assert (report.capacity, report.invited, report.yes, report.no) == (5, 23, 5, 2)
    assert report.no_answer == 23 - 5 - 2
    assert (report.checked_in, report.walk_ins, report.no_shows) == (4, 1, 2)
    published = await subjects(suite)
    assert published.count("campaigns.v1.event.checked_in") == 4
    # Answers that changed: 5 + 1 YES, the NO after a YES, M021's NO.
    assert published.count("campaigns.v1.event.rsvp") == 8


async def test_the_invite_jobs_migration_matches_the_table_and_rolls_back(
    database_url: DatabaseFactory,
) -> None:
    """0008's invite jobs table is the one the code declares; it rolls back
    to 0007 and applies again."""
    db = Database(await database_url("campaigns"))
    migrations = campaigns.migrations_dir
    tables = {"member_event_invite_jobs", "member_events", "member_event_guests"}
    metadata = event_store.metadata
    try:
        await migrate(db, migrations, "campaigns", "heads")
        assert await schema_drift(db, metadata, tables) == []
        await migrate(db, migrations, "campaigns", "0007", down=True)
        async with db.engine.connect() as conn:
            assert not await conn.run_sync(
                lambda c: sa.inspect(c).has_table("member_event_invite_jobs")
            )
        await migrate(db, migrations, "campaigns", "heads")
        assert await schema_drift(db, metadata, tables) == []
    finally:
        await db.dispose()
