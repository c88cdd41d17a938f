"""The tables the chassis keeps in every service's database (outbox, inbox,
idempotency keys), as each service's migrations leave them: what the code
declares, and the outbox's lease taken off and put back again."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from chassis.db import Database, chassis_metadata
from chassis.service import ServiceDefinition
from services.campaigns.server import definition as campaigns
from services.cards.server import definition as cards
from services.loyalty.server import definition as loyalty
from services.members.server import definition as members
from services.notify.server import definition as notify
from tests.integration.infra import DatabaseFactory, migrate, schema_drift

pytestmark = pytest.mark.integration

# Each service's revision before the outbox got its lease.
BEFORE_THE_LEASE = {
    "members": "0005",
    "cards": "0003",
    "loyalty": "0005",
    "campaigns": "0008",
    "notify": "0009",
}


def _has_lease(connection: sa.Connection) -> bool:
    return "lease_until" in {c["name"] for c in sa.inspect(connection).get_columns("outbox")}


@pytest.mark.parametrize(
    "service", [members, cards, loyalty, campaigns, notify], ids=lambda s: s.name
)
async def test_every_service_migrates_the_chassis_tables_to_what_the_code_declares(
    database_url: DatabaseFactory, service: ServiceDefinition
) -> None:
    name = service.name
    migrations = service.migrations_dir
    db = Database(await database_url(name))
    tables = set(chassis_metadata.tables)
    try:
        await migrate(db, migrations, name, "head")
        assert await schema_drift(db, chassis_metadata, tables) == []
        await migrate(db, migrations, name, BEFORE_THE_LEASE[name], down=True)
        async with db.engine.connect() as conn:
            assert not await conn.run_sync(_has_lease)
        await migrate(db, migrations, name, "head")
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_has_lease)
        assert await schema_drift(db, chassis_metadata, tables) == []
    finally:
        await db.engine.dispose()
