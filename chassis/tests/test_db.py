"""The unit of work on SQLite: all or nothing, savepoints included."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from chassis.db import Database

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
