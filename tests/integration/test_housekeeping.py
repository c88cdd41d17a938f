"""Retention: idempotency keys, consumed event ids and sent outbox rows are
dropped after their time, and nothing younger or unsent is touched."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import sqlalchemy as sa

from chassis.config import DEAD_LETTER_RETENTION_DAYS, Settings
from chassis.db import Database, idempotency_table, inbox_table, outbox_table, utcnow
from chassis.idempotency import forget_older_than
from chassis.inbox import forget_messaging_older_than
from chassis.migrations import upgrade_to_head
from tests.integration.infra import DatabaseFactory


async def test_housekeeping_keeps_what_is_young_or_unsent(database_url: DatabaseFactory) -> None:
    db = Database(await database_url("cards"))
    await upgrade_to_head(db, Path("services/cards/migrations"), "cards")
    now = utcnow()
    old = now - dt.timedelta(days=10)
    try:
        async with db.transaction() as session:
            for key, created in (("old", old), ("young", now)):
                await session.execute(
                    sa.insert(idempotency_table).values(
                        method="m",
                        request_id=key,
                        request_hash="h",
                        response=b"r",
                        created_at=created,
                    )
                )
                await session.execute(
                    sa.insert(inbox_table).values(
                        consumer="c", event_id=key, subject="s", processed_at=created
                    )
                )
            for key, created, sent in (
                ("sent-old", old, old),
                ("sent-young", now, now),
                ("unsent-old", old, None),
            ):
                await session.execute(
                    sa.insert(outbox_table).values(
                        event_id=key,
                        subject="s",
                        event_type="t",
                        payload=b"",
                        headers={},
                        created_at=created,
                        sent_at=sent,
                    )
                )
        assert await forget_older_than(db, 48) == 1
        assert await forget_messaging_older_than(db, 24 * 7) == (1, 1)
        async with db.sessions() as session:
            keys = (await session.execute(sa.select(idempotency_table.c.request_id))).scalars()
            assert set(keys) == {"young"}
            events = (await session.execute(sa.select(inbox_table.c.event_id))).scalars()
            assert set(events) == {"young"}
            rows = (await session.execute(sa.select(outbox_table.c.event_id))).scalars()
            assert set(rows) == {"sent-young", "unsent-old"}
    finally:
        await db.dispose()


async def test_consumed_event_ids_are_kept_as_long_as_dead_letters_can_be_replayed(
    database_url: DatabaseFactory,
) -> None:
    """An event parked as a dead letter can be replayed until the DEADLETTER
    stream drops it; every consumer that handled it the first time must then
    still find its id. Sent outbox rows, only history, go sooner."""
    settings = Settings.from_env("cards", {})
    db = Database(await database_url("cards"))
    await upgrade_to_head(db, Path("services/cards/migrations"), "cards")
    now = utcnow()
    ages = {
        "a-month": now - dt.timedelta(days=30),
        "as-old-as-the-oldest-dead-letter": now - dt.timedelta(days=DEAD_LETTER_RETENTION_DAYS),
        "older-than-any-dead-letter": now - dt.timedelta(days=DEAD_LETTER_RETENTION_DAYS + 2),
    }
    try:
        async with db.transaction() as session:
            for key, at in ages.items():
                await session.execute(
                    sa.insert(inbox_table).values(
                        consumer="c", event_id=key, subject="s", processed_at=at
                    )
                )
                await session.execute(
                    sa.insert(outbox_table).values(
                        event_id=key,
                        subject="s",
                        event_type="t",
                        payload=b"",
                        headers={},
                        created_at=at,
                        sent_at=at,
                    )
                )
        assert await forget_messaging_older_than(
            db,
            settings.inbox_retention_hours,
            sent_outbox_hours=settings.sent_outbox_retention_hours,
        ) == (1, 3)
        async with db.sessions() as session:
            events = (await session.execute(sa.select(inbox_table.c.event_id))).scalars()
            assert set(events) == {"a-month", "as-old-as-the-oldest-dead-letter"}
    finally:
        await db.dispose()
