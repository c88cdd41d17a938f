"""Real infrastructure for the integration tests: NATS with JetStream and
PostgreSQL. Testcontainers when a Docker engine answers; otherwise a
nats-server from the wheel on a free port and the PostgreSQL at
TEST_DATABASE_URL (default: the local server on 127.0.0.1:5432); otherwise a
clear error. Never a silent skip."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# ``await make("members")``: the URL of a fresh, empty database of the kind
# the test runs on (the ``database_url`` fixture).
DatabaseFactory = Callable[[str], Awaitable[str]]


async def migrated(make: DatabaseFactory, migrations: Path, service: str) -> str:
    """A fresh database of ``service`` with its migrations applied."""
    from chassis.db import Database
    from chassis.migrations import upgrade_to_head

    url = await make(service)
    db = Database(url)
    try:
        await upgrade_to_head(db, migrations, service)
    finally:
        await db.dispose()
    return url


async def migrate(
    db: Any, migrations: Path, service: str, target: str, *, down: bool = False
) -> None:
    """Upgrade (or downgrade) ``db`` (a chassis Database) to ``target``."""
    from alembic import command

    from chassis.migrations import alembic_config

    cfg = alembic_config(migrations, service)

    def run(connection: Any) -> None:
        cfg.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(cfg, target)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def schema_drift(db: Any, metadata: Any, tables: set[str]) -> list[Any]:
    """How the migrated schema of ``tables`` differs from what ``metadata``
    (the code) declares: [] when migrations and code agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def table_of(diff: Any) -> str:
        if isinstance(diff, list):
            return str(diff[0][2])
        if diff[0] in ("add_index", "remove_index"):
            return str(diff[1].table.name)
        if diff[0] in ("add_table", "remove_table"):
            return str(diff[1].name)
        return str(diff[2])

    def drift(connection: Any) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        return [d for d in compare_metadata(context, metadata) if table_of(d) in tables]

    async with db.engine.connect() as conn:
        return list(await conn.run_sync(drift))


def docker_available() -> bool:
    if os.environ.get("CORNUCOPIA_TEST_NO_DOCKER"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@dataclass
class Postgres:
    """A PostgreSQL server the tests may create databases on."""

    admin_url: str
    container: Any = None

    def url_for(self, database: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path=f"/{database}"))

    async def create_database(self, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return name

    async def drop_database(self, name: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def stop(self) -> None:
        if self.container is not None:
            self.container.stop()


async def _can_connect(url: str) -> str | None:
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), timeout=5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def start_postgres() -> Postgres:
    explicit = os.environ.get("TEST_DATABASE_URL")
    url = (explicit or DEFAULT_ADMIN_URL).replace("postgresql+asyncpg://", "postgresql://")
    # Run in a thread: the caller may be inside the test's event loop.
    with ThreadPoolExecutor(max_workers=1) as pool:
        problem = pool.submit(asyncio.run, _can_connect(url)).result()
    if problem is None:
        return Postgres(admin_url=url)
    if not explicit and docker_available():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver=None)
        container.start()
        return Postgres(admin_url=container.get_connection_url(), container=container)
    raise RuntimeError(
        "integration tests need PostgreSQL: none answered at "
        f"{url} ({problem}) and no Docker engine is reachable for testcontainers. "
        "Start PostgreSQL or set TEST_DATABASE_URL=postgresql://user@host:port/db "
        "(a role that may CREATE DATABASE)."
    )


@dataclass
class Nats:
    url: str
    server: Any = None
    container: Any = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.container is not None:
            self.container.stop()


def start_nats(store_dir: Path) -> Nats:
    """A NATS server with JetStream for the test run."""
    if docker_available():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        container = DockerContainer("nats:2.11-alpine").with_command("-js").with_exposed_ports(4222)
        container.start()
        wait_for_logs(container, "Server is ready", timeout=30)
        host = container.get_container_host_ip()
        port = container.get_exposed_port(4222)
        return Nats(url=f"nats://{host}:{port}", container=container)
    from chassis.natsserver import NatsServer

    server = NatsServer(store_dir)
    server.start()
    return Nats(url=server.url, server=server)
