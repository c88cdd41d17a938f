"""What a crash or an outage must not do: lose an event or deliver it twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chassis.db import outbox_table
from chassis.natsserver import NatsServer
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.members.server import definition as members_definition
from services.notify.server import definition as notify_definition
from services.notify.store import messages as messages_table
from tests.integration.conftest import (
    Suite,
    auth,
    eventually,
    seed_organisation,
)
from tests.integration.infra import DatabaseFactory


async def enroll(stub: members_pb2_grpc.MembersServiceStub, n: int) -> str:
    created = await stub.CreateMember(
        members_pb2.CreateMemberRequest(
            request_id=f"outage-{n}",
            member=members_pb2.Member(
                home_store_id="S001", given_name=f"Member {n}", mobile=f"+86139{n:08d}"
            ),
        ),
        metadata=auth(),
    )
    return created.member_id


async def test_nats_outage_delivers_every_event_exactly_once(
    tmp_path: Path, database_url: DatabaseFactory, spans: InMemorySpanExporter
) -> None:
    # The wheel's server, not a container: the test stops it and starts it
    # again on the same port with the same JetStream store, as an outage does.
    server = NatsServer(tmp_path / "nats")
    server.start()
    suite = Suite(nats_url=server.url, var_dir=tmp_path / "var")
    try:
        await suite.start(members_definition, await database_url("members"))
        await seed_organisation(suite)
        await suite.start(notify_definition, await database_url("notify"))
        stub = members_pb2_grpc.MembersServiceStub(suite.channels["members"])
        members = suite.runtimes["members"]

        before = [await enroll(stub, n) for n in range(5)]
        await eventually(members.relay.pending_count, lambda n: n == 0)

        server.stop()
        # Enrollment goes on while NATS is away: the events wait in the outbox.
        during = [await enroll(stub, n) for n in range(5, 15)]
        assert await members.relay.pending_count() == 10

        server.start()
        await eventually(members.relay.pending_count, lambda n: n == 0, timeout=30)

        async def welcomed() -> Counter[str]:
            async with suite.runtimes["notify"].db.sessions() as session:
                rows = await session.execute(sa.select(messages_table.c.member_id))
                return Counter(r.member_id for r in rows)

        counts = await eventually(welcomed, lambda c: sum(c.values()) >= 15, timeout=30)
        assert set(counts) == set(before + during)
        assert all(n == 1 for n in counts.values()), counts

        async with members.db.sessions() as session:
            unsent = await session.execute(
                sa.select(sa.func.count()).where(outbox_table.c.sent_at.is_(None))
            )
            assert unsent.scalar_one() == 0
            events = await session.execute(sa.select(sa.func.count()).select_from(outbox_table))
            written = events.scalar_one()
        # Every event once in the stream: the enrollments' and the seeded
        # stores'.
        stream = await members.bus.js.stream_info("MEMBERS")
        assert stream.state.messages == written
    finally:
        await suite.stop_all()
        server.stop()
