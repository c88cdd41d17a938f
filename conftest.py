"""Fixtures every test folder shares: real databases, SQLite and PostgreSQL
alike (PostgreSQL from testcontainers where Docker answers, else the local
server; see tests/integration/infra.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import settings

from tests.integration.infra import DatabaseFactory, Postgres, start_postgres

# Property tests check what a rule gives, not how fast: on a shared machine
# one example can take longer than Hypothesis's default deadline of 200 ms
# for reasons of its own, which would fail a test that is right. Speed is
# measured by the benchmarks in bench/.
settings.register_profile("cornucopia", deadline=None)
settings.load_profile("cornucopia")


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs a command (``cornucopia rekey ...``) configures the
    process's logging onto the stderr pytest captured for that test; later
    tests would log into a closed file. Put logging back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)
    structlog.contextvars.clear_contextvars()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[DatabaseFactory]:
    """A factory of fresh, empty databases of one kind: ``await make("members")``."""
    created: list[str] = []
    pg: Postgres | None = None
    if request.param == "postgresql":
        pg = request.getfixturevalue("postgres")

    async def make(service: str) -> str:
        if pg is None:
            return f"sqlite+aiosqlite:///{tmp_path / (service + '.db')}"
        name = await pg.create_database(f"cornucopia_test_{service}")
        created.append(name)
        return pg.url_for(name).replace("postgresql://", "postgresql+asyncpg://", 1)

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    if pg is not None:
        for name in created:
            await pg.drop_database(name)
