"""Alembic migrations per service, applied when the service starts.

Each service has its own ``migrations/`` folder (env.py + versions/). The
chassis runs ``upgrade head`` on the service's async engine; on PostgreSQL it
first takes an advisory lock so that replicas starting together do not race.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import sqlalchemy as sa
from alembic import command, context, op
from alembic.config import Config

from chassis.db import BigIntKey, Database, UTCDateTime


def alembic_config(migrations_dir: Path, service: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("version_table", "alembic_version")
    cfg.attributes["service"] = service
    return cfg


def _lock_key(service: str) -> int:
    digest = hashlib.sha256(f"cornucopia-migrations-{service}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def upgrade_to_head(db: Database, migrations_dir: Path, service: str) -> None:
    cfg = alembic_config(migrations_dir, service)

    def run(connection: sa.Connection) -> None:
        cfg.attributes["connection"] = connection
        # "heads": a service whose history branched and merges later (one
        # migration per area, written side by side) upgrades all the same.
        command.upgrade(cfg, "heads")

    async with db.engine.begin() as conn:
        if db.dialect == "postgresql":
            # Held until this transaction ends; other replicas wait here.
            await conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(service)}
            )
        await conn.run_sync(run)


def run_env(target_metadata: sa.MetaData) -> None:
    """The body of every service's migrations/env.py: run online against the
    connection the chassis hands over (there is no offline mode)."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "migrations run through the service (`cornucopia migrate <service>`), not alembic"
        )
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def create_chassis_tables() -> None:
    """Create the outbox, inbox and idempotency tables as they were at
    version 1; called from each service's first migration so the definition
    lives once. Later changes to these tables get helpers of their own, so a
    fresh database replays the same history as an old one."""
    op.create_table(
        "outbox",
        sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("headers", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("sent_at", UTCDateTime, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.String(500), nullable=True),
    )
    op.create_index("ix_outbox_unsent", "outbox", ["sent_at", "seq"])
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.String(100), primary_key=True),
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("processed_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_inbox_processed_at", "inbox", ["processed_at"])
    op.create_table(
        "idempotency_keys",
        sa.Column("method", sa.String(200), primary_key=True),
        sa.Column("request_id", sa.String(200), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_idempotency_created_at", "idempotency_keys", ["created_at"])


def add_outbox_lease() -> None:
    """The outbox's second version: ``lease_until``, the relay's claim on the
    rows it is publishing, in place of a transaction held open across the
    publish."""
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("lease_until", UTCDateTime, nullable=True))


def drop_outbox_lease() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("lease_until")


def drop_chassis_tables() -> None:
    for table in ("idempotency_keys", "inbox", "outbox"):
        op.drop_table(table)
