"""Notify's databases for the tests that run on real ones."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from chassis.db import Database
from tests.integration.infra import DatabaseFactory, migrated

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"


@pytest.fixture
async def notify_url(database_url: DatabaseFactory) -> str:
    """A fresh notify database at head; each replica opens its own engine."""
    return await migrated(database_url, MIGRATIONS, "notify")


@pytest.fixture
async def replicas(notify_url: str) -> AsyncIterator[Callable[[], Database]]:
    """Engines on that one database, one per replica."""
    opened: list[Database] = []

    def open_one() -> Database:
        db = Database(notify_url)
        opened.append(db)
        return db

    yield open_one
    for db in opened:
        await db.dispose()
