"""The unit of work on SQLite: all or nothing, savepoints included; read
sessions on both kinds of database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from chassis.db import Database, Memo
from chassis.direct import Direct, Executor, Unit
from tests.integration.infra import DatabaseFactory

pytestmark = pytest.mark.asyncio

things = sa.Table(
    "things",
    sa.MetaData(),
    sa.Column("name", sa.String(20), primary_key=True),
)


async def _database(tmp_path: Path) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'unit.db'}")
    async with db.engine.begin() as conn:
        await conn.run_sync(things.metadata.create_all)
    return db


async def _names(db: Database) -> list[str]:
    async with db.sessions() as session:
        return list((await session.execute(sa.select(things.c.name))).scalars())


class _Refused(Exception):
    pass


async def test_a_savepoint_before_the_first_write_rolls_back_with_its_transaction(
    tmp_path: Path,
) -> None:
    # The driver's own implicit BEGIN would come only at the first INSERT,
    # after the SAVEPOINT, and releasing that savepoint would then commit.
    db = await _database(tmp_path)
    try:
        with pytest.raises(_Refused):
            async with db.transaction() as session:
                async with session.begin_nested():
                    await session.execute(sa.insert(things).values(name="inside"))
                raise _Refused
        assert await _names(db) == []
    finally:
        await db.dispose()


async def test_a_rolled_back_savepoint_keeps_the_rest_of_the_transaction(tmp_path: Path) -> None:
    db = await _database(tmp_path)
    try:
        async with db.transaction() as session:
            await session.execute(sa.insert(things).values(name="kept"))
            with pytest.raises(sa.exc.IntegrityError):
                async with session.begin_nested():
                    await session.execute(sa.insert(things).values(name="kept"))
            await session.execute(sa.insert(things).values(name="also kept"))
        assert sorted(await _names(db)) == ["also kept", "kept"]
    finally:
        await db.dispose()


async def test_a_unit_of_work_holds_the_write_lock_from_its_start(tmp_path: Path) -> None:
    # BEGIN IMMEDIATE: another connection cannot start writing while a unit
    # of work is open, even one that has only read so far.
    db = await _database(tmp_path)
    other = Database(db.url)
    try:
        async with db.transaction() as session:
            await session.execute(sa.select(things.c.name))
            async with other.engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA busy_timeout=50")
                with pytest.raises(sa.exc.OperationalError, match="locked"):
                    await conn.exec_driver_sql("INSERT INTO things (name) VALUES ('other')")
    finally:
        await other.dispose()
        await db.dispose()


async def test_a_memo_keeps_a_value_until_forgotten(tmp_path: Path) -> None:
    db = await _database(tmp_path)
    memo: Memo[int] = Memo(ttl=60)
    loads: list[int] = []

    async def load() -> int:
        loads.append(1)
        return len(loads)

    async with db.sessions() as session:
        assert await memo.get(session, load) == 1
        assert await memo.get(session, load) == 1
        memo.forget()
        assert await memo.get(session, load) == 2
    await db.dispose()


async def test_a_read_racing_a_write_does_not_keep_the_old_value(tmp_path: Path) -> None:
    """A read that began before the writer's commit may have seen the old
    value: it is not kept, neither when it ends after the writer's forget
    nor after the writer's commit."""
    db = await _database(tmp_path)
    memo: Memo[str] = Memo(ttl=60)
    reading = asyncio.Event()
    release = asyncio.Event()

    async def slow_old_read() -> str:
        reading.set()
        await release.wait()
        return "old"

    async def fresh_read() -> str:
        return "new"

    async with db.sessions() as session:
        racing = asyncio.create_task(memo.get(session, slow_old_read))
        await reading.wait()
        async with db.transaction() as writer:
            await writer.execute(sa.text("INSERT INTO things (name) VALUES ('changed')"))
            memo.forget(writer)
            # A read between the forget and the commit sees the old value...
            assert await memo.get(session, lambda: asyncio.sleep(0, "old")) == "old"
        # ...and the commit drops it again.
        release.set()
        assert await racing == "old"
        assert await memo.get(session, fresh_read) == "new"
    await db.dispose()


@pytest.mark.integration
async def test_a_read_session_on_postgresql_sends_no_begin(database_url: DatabaseFactory) -> None:
    """Reads on PostgreSQL run statement by statement (no BEGIN and ROLLBACK
    around them: two round trips for nothing at READ COMMITTED); a read that
    asks for a transaction gets one, and SQLite's reads keep theirs (one
    snapshot over several statements)."""
    db = Database(await database_url("reads"))
    try:
        if db.dialect == "sqlite":
            async with db.engine.begin() as conn:
                await conn.run_sync(things.metadata.create_all)
            async with db.sessions() as session:
                await session.execute(sa.select(things.c.name))
                assert session.in_transaction()
                assert (await session.connection()).in_transaction()
            return
        async with db.sessions() as session:
            first = (await session.execute(sa.text("SELECT now()"))).scalar_one()
            await asyncio.sleep(0.02)
            second = (await session.execute(sa.text("SELECT now()"))).scalar_one()
        # Each statement its own transaction: now() moves on.
        assert second > first
        async with db.sessions(in_transaction=True) as session:
            first = (await session.execute(sa.text("SELECT now()"))).scalar_one()
            await asyncio.sleep(0.02)
            second = (await session.execute(sa.text("SELECT now()"))).scalar_one()
            # SET LOCAL needs a transaction (outside one it only warns).
            await session.execute(sa.text("SET LOCAL statement_timeout = '5s'"))
            timeout = (await session.execute(sa.text("SHOW statement_timeout"))).scalar_one()
            assert timeout == "5s"
        assert second == first
        # Units of work are transactions as ever.
        async with db.transaction() as session:
            first = (await session.execute(sa.text("SELECT now()"))).scalar_one()
            await asyncio.sleep(0.02)
            second = (await session.execute(sa.text("SELECT now()"))).scalar_one()
        assert second == first
    finally:
        await db.dispose()


_INSERT_THING = Direct(sa.insert(things))


async def _commands_sent(session: Executor, statement: Direct, params: dict[str, str]) -> list[str]:
    """The transaction commands the driver sends for ``statement`` (and,
    with it, the BEGIN the session's first statement brings)."""
    if isinstance(session, Unit):
        driver = session.driver_connection
    else:
        driver = (await (await session.connection()).get_raw_connection()).driver_connection
    sent: list[str] = []

    def note(query: Any) -> None:
        sent.append(query.query.split()[0].upper())

    driver.add_query_logger(note)
    try:
        await statement.execute(session, params)
    finally:
        driver.remove_query_logger(note)
    return sent


@pytest.mark.integration
async def test_a_unit_of_one_statement_commits_it_without_begin_and_refuses_a_second(
    database_url: DatabaseFactory,
) -> None:
    """``single_statement``: the statement is kept; on PostgreSQL it is sent
    as a transaction of its own (no BEGIN or COMMIT around it), and a second
    one through the same unit is refused rather than committed apart. On
    SQLite it is an ordinary unit of work."""
    db = Database(await database_url("single"))
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(things.metadata.create_all)
        async with db.single_statement() as session:
            await _INSERT_THING.execute(session, {"name": "kept"})
        assert await _names(db) == ["kept"]
        if db.dialect == "sqlite":
            # An ordinary unit of work there.
            async with db.single_statement() as session:
                await _INSERT_THING.execute(session, {"name": "first"})
                await _INSERT_THING.execute_many(session, [{"name": "second"}])
            assert sorted(await _names(db)) == ["first", "kept", "second"]
            return
        with pytest.raises(RuntimeError, match="second"):
            async with db.single_statement() as session:
                await _INSERT_THING.execute(session, {"name": "first"})
                await _INSERT_THING.execute_many(session, [{"name": "second"}])
        # The refused statement is not run; the first one was its own
        # transaction.
        assert sorted(await _names(db)) == ["first", "kept"]
        async with db.single_statement() as session:
            assert "BEGIN" not in await _commands_sent(session, _INSERT_THING, {"name": "a"})
        async with db.transaction() as session:
            assert "BEGIN" in await _commands_sent(session, _INSERT_THING, {"name": "b"})
        assert sorted(await _names(db)) == ["a", "b", "first", "kept"]
    finally:
        await db.dispose()
