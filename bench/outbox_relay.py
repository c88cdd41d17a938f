"""Outbox relay throughput: how fast a backlog of events reaches JetStream.

    python -m bench.outbox_relay [--events 20000] [--postgres URL]

Starts a NATS server (from the wheel), writes a backlog of outbox rows the
way a member import does (one `members.v1.member.enrolled`-sized event per
member), then measures in the same run:
- the relay (`chassis.outbox.OutboxRelay`) draining the backlog: read a
  batch, publish it to JetStream with acks, mark it sent, repeat;
- the baseline: bare JetStream publishes of the same payloads, each awaited
  before the next (what the relay did per row before it pipelined a batch);
- the baseline: bare JetStream publishes of a batch in flight together
  (the bound on what pipelining can reach, with no database at all).
and prints events per second and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from bench.harness import ThrowawayDatabases
from chassis.bus import STREAMS, Bus, cloudevent_headers
from chassis.config import normalise_database_url
from chassis.db import Database, outbox_table, utcnow
from chassis.migrations import upgrade_to_head
from chassis.natsserver import NatsServer
from chassis.outbox import OutboxRelay

NOTIFY_MIGRATIONS = Path(__file__).resolve().parents[1] / "services" / "notify" / "migrations"
PAYLOAD = bytes(180)  # about an enrolled event: ids, store, channel, language, time
BATCH = 100


def _rows(count: int) -> list[dict[str, object]]:
    now = utcnow()
    rows = []
    for _ in range(count):
        event_id = uuid.uuid4().hex
        rows.append(
            {
                "event_id": event_id,
                "subject": "members.v1.member.enrolled",
                "event_type": "cornucopia.members.v1.MemberEnrolled",
                "payload": PAYLOAD,
                "headers": cloudevent_headers(
                    event_id=event_id,
                    event_type="cornucopia.members.v1.MemberEnrolled",
                    source="cornucopia/bench",
                    time=now,
                    subject="members.v1.member.enrolled",
                ),
                "created_at": now,
            }
        )
    return rows


async def _fresh_stream(bus: Bus) -> None:
    spec = STREAMS["members"]
    with contextlib.suppress(NotFoundError):  # absent on the first run
        await bus.js.delete_stream(spec.name)
    await bus.js.add_stream(StreamConfig(name=spec.name, subjects=list(spec.subjects)))


async def relay_rate(url: str, bus: Bus, events: int) -> float:
    db = Database(url)
    try:
        await upgrade_to_head(db, NOTIFY_MIGRATIONS, "notify")
        async with db.transaction() as session:
            await session.execute(sa.delete(outbox_table))
        rows = _rows(events)
        for start in range(0, events, 1000):
            async with db.transaction() as session:
                await session.execute(sa.insert(outbox_table), rows[start : start + 1000])
        await _fresh_stream(bus)
        relay = OutboxRelay(db, bus, batch_size=BATCH)
        began = time.perf_counter()
        published = 0
        while published < events:
            sent, failed = await relay.publish_pending()
            if failed:
                raise RuntimeError("a publish failed during the benchmark")
            published += sent
        return events / (time.perf_counter() - began)
    finally:
        await db.dispose()


async def bare_rate(bus: Bus, events: int, *, in_flight: int) -> float:
    await _fresh_stream(bus)
    rows = _rows(events)
    began = time.perf_counter()
    for start in range(0, events, in_flight):
        chunk = rows[start : start + in_flight]
        await asyncio.gather(
            *(bus.publish(str(r["subject"]), PAYLOAD, r["headers"]) for r in chunk)  # type: ignore[arg-type]
        )
    return events / (time.perf_counter() - began)


async def run(events: int, postgres: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp) / "nats")
        nats.start()
        bus = Bus(nats.url, client_name="bench-relay")
        databases = ThrowawayDatabases(postgres) if postgres else None
        try:
            await bus.connect()
            if databases is not None:
                url = normalise_database_url(await databases.create())
                kind = "PostgreSQL"
            else:
                url = f"sqlite+aiosqlite:///{Path(tmp) / 'relay.db'}"
                kind = "SQLite"
            relay = await relay_rate(url, bus, events)
            one_by_one = await bare_rate(bus, events, in_flight=1)
            pipelined = await bare_rate(bus, events, in_flight=BATCH)
        finally:
            await bus.close()
            nats.stop()
            if databases is not None:
                await databases.drop_all()
    print(f"outbox relay on {kind}, {events} events, batches of {BATCH}")
    print(f"  relay (read, publish with acks, mark sent): {relay:10,.0f} events/s")
    print(f"  bare publishes, one awaited at a time:      {one_by_one:10,.0f} events/s")
    print(f"  bare publishes, {BATCH} in flight:              {pipelined:10,.0f} events/s")
    print(f"  ratio relay / bare one at a time:           {relay / one_by_one:10.2f}")
    print(f"  ratio relay / bare {BATCH} in flight:           {relay / pipelined:10.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--postgres", help="an admin URL; a throwaway database is created")
    args = parser.parse_args(argv)
    asyncio.run(run(args.events, args.postgres))


if __name__ == "__main__":
    main()
