"""Notifications wanted: one per dedup key, and planned only when near."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chassis.db import Database, utcnow
from services.notify.domain import Category
from services.notify.store import intents
from tests.integration.infra import DatabaseFactory, migrated

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"


@pytest.fixture
async def db(database_url: DatabaseFactory) -> AsyncIterator[Database]:
    database = Database(await migrated(database_url, MIGRATIONS, "notify"))
    yield database
    await database.dispose()


async def add(db: Database, key: str, not_before: dt.datetime | None = None) -> bool:
    async with db.transaction() as session:
        return await intents.add_notification(
            session,
            notification_id=key,
            dedup_key=key,
            trigger="birthday",
            category=Category.MARKETING,
            variables={},
            created_at=utcnow(),
            trace_headers={},
            member_id="M0000000001",
            not_before=not_before,
        )


async def test_one_key_is_one_notification(db: Database) -> None:
    assert await add(db, "birthday:M0000000001:2026")
    assert not await add(db, "birthday:M0000000001:2026")
    async with db.sessions() as session:
        pending = await intents.pending(session, now=utcnow(), limit=10)
    assert [n.dedup_key for n in pending] == ["birthday:M0000000001:2026"]


async def test_a_greeting_written_ahead_waits_to_be_planned_until_its_day(db: Database) -> None:
    now = utcnow()
    await add(db, "later", not_before=now + dt.timedelta(days=20))
    await add(db, "soon", not_before=now + dt.timedelta(minutes=30))
    async with db.sessions() as session:
        due_now = await intents.pending(session, now=now, limit=10)
        due_then = await intents.pending(session, now=now + dt.timedelta(days=20), limit=10)
    assert [n.dedup_key for n in due_now] == ["soon"]
    assert {n.dedup_key for n in due_then} == {"soon", "later"}


async def test_the_migrations_match_the_code(db: Database) -> None:
    from services.notify.store import metadata
    from tests.integration.infra import schema_drift

    assert await schema_drift(db, metadata, set(metadata.tables)) == []
