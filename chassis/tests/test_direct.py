"""chassis.direct: every kind of statement gives what SQLAlchemy's own
execute gives, inside the session's transaction, with SQLAlchemy's errors;
on PostgreSQL through the driver, on SQLite through the session."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, UTCDateTime, is_unique_violation
from chassis.direct import Direct, Insert, Unit, _Bound, written_together
from chassis.errors import Unavailable
from tests.integration.infra import DatabaseFactory, Postgres

metadata = sa.MetaData()
shelf = sa.Table(
    "direct_shelf",
    metadata,
    sa.Column("item_id", sa.String(20), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("small", sa.Integer, nullable=True),
    sa.Column("day", sa.Date, nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=True),
    sa.Column("doc", sa.JSON, nullable=True),
    sa.Column("flag", sa.Boolean, nullable=False),
)
# A child of the shelf's rows, for inserts written together.
label = sa.Table(
    "direct_label",
    metadata,
    sa.Column("label_id", sa.Integer, primary_key=True),
    sa.Column("item_id", sa.String(20), sa.ForeignKey(shelf.c.item_id), nullable=False),
    sa.Column("text", sa.String(40), nullable=False),
    sa.Column("doc", sa.JSON, nullable=True),
)
# A Python-side default: SQLAlchemy's execution context fills it in.
stamped = sa.Table(
    "direct_stamped",
    metadata,
    sa.Column("item_id", sa.String(20), primary_key=True),
    sa.Column("note", sa.String(20), nullable=False, default="none"),
)

AT = dt.datetime(2026, 11, 30, 8, 15, 30, 123456, tzinfo=dt.UTC)
ROW = {
    "item_id": "a",
    "count": 2**40,
    "small": None,
    "day": dt.date(2026, 11, 30),
    "at": AT,
    "blob": b"\x00\xff",
    "doc": {"k": [1, "x", None]},
    "flag": True,
}

INSERT = Direct(sa.insert(shelf))
BY_ID = Direct(sa.select(shelf).where(shelf.c.item_id == sa.bindparam("key")))
LOCKED = Direct(sa.select(shelf).where(shelf.c.item_id == sa.bindparam("key")).with_for_update())
ADD = Direct(
    sa.update(shelf)
    .where(shelf.c.item_id == sa.bindparam("key"))
    .values(count=shelf.c.count + sa.bindparam("by"))
    .returning(shelf.c.count, shelf.c.at)
)
TOUCH = Direct(sa.update(shelf).where(shelf.c.day <= sa.bindparam("until")).values(flag=sa.false()))
TOTAL = Direct(
    sa.select(sa.func.coalesce(sa.func.sum(shelf.c.count), 0).label("total")).where(
        shelf.c.day == sa.bindparam("day")
    )
)
DELETE = Direct(sa.delete(shelf).where(shelf.c.item_id == sa.bindparam("key")))
IN_LIST = Direct(
    sa.select(shelf.c.item_id).where(shelf.c.item_id.in_(sa.bindparam("keys", expanding=True)))
)
STAMP = Direct(sa.insert(stamped))


def upsert(dialect: str) -> Direct:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(shelf).values(
        item_id=sa.bindparam("key"),
        count=sa.bindparam("n"),
        small=sa.bindparam("n"),
        day=sa.bindparam("day"),
        at=sa.bindparam("at"),
        flag=sa.true(),
    )
    return Direct(
        statement.on_conflict_do_update(
            index_elements=["item_id"], set_={"count": shelf.c.count + statement.excluded.count}
        )
    )


class Stop(Exception):
    """What a test raises to leave a transaction."""


async def open_db(database_url: DatabaseFactory) -> Database:
    db = Database(await database_url("direct"))
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    return db


@asynccontextmanager
async def postgres_db(postgres: Postgres, tables: sa.MetaData) -> AsyncIterator[Database]:
    """A throwaway PostgreSQL database with ``tables``, for what only
    PostgreSQL does."""
    name = await postgres.create_database("cornucopia_test_direct")
    db = Database(postgres.url_for(name).replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(tables.create_all)
        yield db
    finally:
        await db.dispose()
        await postgres.drop_database(name)


def plain(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


async def test_each_kind_of_statement_reads_as_sqlalchemy_reads_it(
    database_url: DatabaseFactory,
) -> None:
    db = await open_db(database_url)
    try:
        async with db.transaction() as session:
            inserted = await INSERT.execute(session, ROW)
            assert inserted.rowcount == 1 and inserted.first() is None
            await INSERT.execute(session, {**ROW, "item_id": "b", "count": 5, "small": 7})
        async with db.sessions() as session:
            direct = await BY_ID.execute(session, {"key": "a"})
            through = (await session.execute(BY_ID.statement, {"key": "a"})).first()
        row = direct.one()
        assert plain(row) == plain(through) == ROW
        assert row.at.tzinfo is not None and row.at == AT
        assert row[0] == "a" and row.count == 2**40
        item_id, count, *_ = row
        assert (item_id, count) == ("a", 2**40)

        async with db.transaction() as session:
            added = await ADD.execute(session, {"key": "a", "by": 3})
            assert added.rowcount == 1 and tuple(added.one()) == (2**40 + 3, AT)
            locked = await LOCKED.execute(session, {"key": "b"})
            assert locked.one().small == 7
            touched = await TOUCH.execute(session, {"until": dt.date(2026, 12, 1)})
            assert touched.rowcount == 2 and touched.all() == []
            total = await TOTAL.execute(session, {"day": dt.date(2026, 11, 30)})
            assert total.scalar() == 2**40 + 8
            # A statement whose parameter appears twice, and an upsert.
            merge = upsert(db.dialect)
            await merge.execute(
                session, {"key": "b", "n": 10, "day": dt.date(2026, 11, 29), "at": AT}
            )
            await merge.execute(
                session, {"key": "c", "n": 4, "day": dt.date(2026, 11, 29), "at": AT}
            )
        async with db.sessions() as session:
            assert (await BY_ID.execute(session, {"key": "b"})).one().count == 15
            assert (await BY_ID.execute(session, {"key": "c"})).one().small == 4
            assert (await BY_ID.execute(session, {"key": "missing"})).first() is None
            assert (await BY_ID.execute(session, {"key": "c"})).one().flag is True
            # What this path leaves to SQLAlchemy still works through it.
            keys = await IN_LIST.execute(session, {"keys": ["a", "c", "zz"]})
            assert sorted(keys.scalars()) == ["a", "c"]
        async with db.transaction() as session:
            await STAMP.execute(session, {"item_id": "s"})
            assert (await DELETE.execute(session, {"key": "c"})).rowcount == 1
        async with db.sessions() as session:
            note = await session.execute(sa.select(stamped.c.note))
            assert note.scalar_one() == "none"
            assert (await BY_ID.execute(session, {"key": "c"})).first() is None
    finally:
        await db.dispose()


async def test_the_statements_are_part_of_the_sessions_transaction(
    database_url: DatabaseFactory,
) -> None:
    db = await open_db(database_url)
    try:
        # The first statement of the transaction is a direct one: it must
        # not run outside the transaction that is then rolled back.
        with pytest.raises(Stop):
            async with db.transaction() as session:
                await INSERT.execute(session, ROW)
                await session.execute(sa.insert(stamped).values(item_id="x", note="y"))
                raise Stop
        async with db.sessions() as session:
            assert (await BY_ID.execute(session, {"key": "a"})).first() is None
            assert (await session.execute(sa.select(stamped))).first() is None

        # Written through SQLAlchemy, read back directly in the same
        # transaction (and the other way round) before the commit.
        async with db.transaction() as session:
            await session.execute(sa.insert(shelf).values(**ROW))
            assert (await BY_ID.execute(session, {"key": "a"})).one().count == ROW["count"]
            await ADD.execute(session, {"key": "a", "by": 1})
            again = await session.execute(sa.select(shelf.c.count))
            assert again.scalar_one() == ROW["count"] + 1
        async with db.sessions() as session:
            assert (await BY_ID.execute(session, {"key": "a"})).one().count == ROW["count"] + 1
    finally:
        await db.dispose()


async def test_a_unique_violation_is_sqlalchemys_integrity_error(
    database_url: DatabaseFactory,
) -> None:
    db = await open_db(database_url)
    try:
        async with db.transaction() as session:
            await INSERT.execute(session, ROW)
        with pytest.raises(IntegrityError) as raised:
            async with db.transaction() as session:
                await INSERT.execute(session, {**ROW, "item_id": "other"})
                await INSERT.execute(session, ROW)
        assert is_unique_violation(raised.value)
        async with db.sessions() as session:
            # The whole transaction was rolled back; the pool is usable.
            assert (await BY_ID.execute(session, {"key": "other"})).first() is None
            assert (await BY_ID.execute(session, {"key": "a"})).one().item_id == "a"
    finally:
        await db.dispose()


async def test_on_postgresql_the_driver_runs_them(database_url: DatabaseFactory) -> None:
    """On PostgreSQL the statements go to the driver (SQLAlchemy sees none
    of them); elsewhere SQLAlchemy runs them all."""
    db = await open_db(database_url)
    seen: list[str] = []

    def count(*args: Any) -> None:
        seen.append(args[2])

    sa.event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    try:
        async with db.transaction() as session:
            await INSERT.execute(session, ROW)
            await ADD.execute(session, {"key": "a", "by": 1})
            bound = session.info.get("chassis.direct.connection")
        async with db.sessions() as session:
            await BY_ID.execute(session, {"key": "a"})
        if db.dialect == "postgresql":
            assert isinstance(bound, _Bound)
            assert seen == []
        else:
            assert bound is None
            assert len([s for s in seen if "direct_shelf" in s]) == 3
    finally:
        await db.dispose()


async def test_a_lost_connection_is_unavailable_and_leaves_the_pool_sound(
    postgres: Postgres,
) -> None:
    """PostgreSQL's alone: a connection lost under a statement of this path
    is thrown away, as SQLAlchemy throws away its own, and the caller gets
    UNAVAILABLE."""
    async with postgres_db(postgres, metadata) as db:
        async with db.transaction() as session:
            await INSERT.execute(session, ROW)
        with pytest.raises(Unavailable):
            async with db.transaction() as session:
                await BY_ID.execute(session, {"key": "a"})
                bound = session.info["chassis.direct.connection"]
                await bound.adapted._connection.close()
                await BY_ID.execute(session, {"key": "a"})
        async with db.sessions() as session:
            assert (await BY_ID.execute(session, {"key": "a"})).one().item_id == "a"


async def test_many_rows_in_one_call_inside_the_transaction(
    database_url: DatabaseFactory,
) -> None:
    db = await open_db(database_url)
    try:
        rows = [{**ROW, "item_id": f"m{i}", "count": i, "doc": {"i": i}} for i in range(5)]
        async with db.transaction() as session:
            await INSERT.execute_many(session, rows)
            # Seen by the transaction's next statement, and read back as written.
            assert (await BY_ID.execute(session, {"key": "m3"})).one().doc == {"i": 3}
            await INSERT.execute_many(session, [])
        async with db.sessions() as session:
            for row in rows:
                assert plain((await BY_ID.execute(session, {"key": row["item_id"]})).one()) == row
        # A duplicate among them: nothing of the call, nor of its transaction, is kept.
        with pytest.raises(IntegrityError) as raised:
            async with db.transaction() as session:
                await INSERT.execute(session, {**ROW, "item_id": "before"})
                await INSERT.execute_many(session, [{**ROW, "item_id": "new"}, rows[0]])
        assert is_unique_violation(raised.value)
        async with db.sessions() as session:
            for key in ("before", "new"):
                assert (await BY_ID.execute(session, {"key": key})).first() is None
    finally:
        await db.dispose()


SHELF_ROWS = Insert(shelf)
LABELS = Insert(label)
STAMPS = Insert(stamped)
LABELS_IN_ORDER = Direct(
    sa.select(label.c.item_id, label.c.text, label.c.doc).order_by(label.c.label_id)
)


async def test_inserts_written_together_wait_for_the_block_and_go_in_one_statement(
    database_url: DatabaseFactory,
) -> None:
    """Rows of several tables added inside ``written_together`` are written
    when it ends (on PostgreSQL in one statement), as written one by one:
    every type, the order within a table, a child beside its parent."""
    db = await open_db(database_url)
    sent: list[str] = []
    try:
        async with db.transaction() as session:
            await SHELF_ROWS.add(session, [{**ROW, "item_id": "before"}])  # outside: at once
            async with written_together(session):
                await SHELF_ROWS.add(session, [ROW])
                await LABELS.add(
                    session,
                    [{"item_id": "a", "text": f"t{i}", "doc": {"i": i}} for i in range(3)],
                )
                await SHELF_ROWS.add(session, [{**ROW, "item_id": "b", "small": 4}])
                async with written_together(session):  # the outer block writes
                    await LABELS.add(session, [{"item_id": "b", "text": "t3", "doc": None}])
                assert (await BY_ID.execute(session, {"key": "a"})).first() is None  # not yet
                assert (await BY_ID.execute(session, {"key": "before"})).one().count == ROW["count"]
                if db.dialect == "postgresql":
                    bound = session.info["chassis.direct.connection"]
                    bound.adapted._connection.add_query_logger(lambda q: sent.append(q.query))
            # Read back as written, in the transaction that wrote them.
            assert plain((await BY_ID.execute(session, {"key": "a"})).one()) == ROW
        async with db.sessions() as session:
            assert plain((await BY_ID.execute(session, {"key": "b"})).one()) == {
                **ROW,
                "item_id": "b",
                "small": 4,
            }
            labels = [tuple(r) for r in await LABELS_IN_ORDER.execute(session)]
        assert labels == [
            ("a", "t0", {"i": 0}),
            ("a", "t1", {"i": 1}),
            ("a", "t2", {"i": 2}),
            ("b", "t3", None),
        ]
        if db.dialect == "postgresql":
            # One statement for both tables, then the commit (besides the
            # driver's lookup of the array types, once a connection).
            ours = [q for q in sent if "'jit'" not in q]
            assert len(ours) == 2 and ours[0].startswith("WITH") and ours[1] == "COMMIT;"
    finally:
        await db.dispose()


async def test_inserts_written_together_keep_nothing_of_a_failed_block(
    database_url: DatabaseFactory,
) -> None:
    db = await open_db(database_url)
    try:
        with pytest.raises(Stop):
            async with db.transaction() as session, written_together(session):
                await SHELF_ROWS.add(session, [ROW])
                raise Stop
        # A duplicate key among the rows fails the statement at the block's end,
        # and the transaction with it.
        async with db.transaction() as session:
            await SHELF_ROWS.add(session, [ROW])
        with pytest.raises(IntegrityError) as raised:
            async with db.transaction() as session, written_together(session):
                await SHELF_ROWS.add(session, [{**ROW, "item_id": "new"}])
                await LABELS.add(session, [{"item_id": "new", "text": "x", "doc": None}])
                await SHELF_ROWS.add(session, [ROW])
        assert is_unique_violation(raised.value)
        # A value longer than its column allows is refused, as a statement
        # of its own would refuse it, never cut short to fit (SQLite keeps
        # no lengths: there it is kept whole).
        long_text = "x" * 41
        if db.dialect == "postgresql":
            with pytest.raises(DBAPIError, match="too long"):
                async with db.transaction() as session, written_together(session):
                    await SHELF_ROWS.add(session, [{**ROW, "item_id": "long"}])
                    await LABELS.add(session, [{"item_id": "long", "text": long_text, "doc": None}])
        else:
            async with db.transaction() as session, written_together(session):
                await SHELF_ROWS.add(session, [{**ROW, "item_id": "long"}])
                await LABELS.add(session, [{"item_id": "long", "text": long_text, "doc": None}])
            async with db.transaction() as session:
                kept = await session.execute(
                    sa.select(label.c.text).where(label.c.item_id == "long")
                )
                assert kept.scalar_one() == long_text
                await session.execute(sa.delete(label).where(label.c.item_id == "long"))
                await session.execute(sa.delete(shelf).where(shelf.c.item_id == "long"))
        # A Python-side default is SQLAlchemy's to fill in: such a table is
        # written on its own, still at the block's end.
        async with db.transaction() as session, written_together(session):
            await STAMPS.add(session, [{"item_id": "s"}])
            await LABELS.add(session, [{"item_id": "a", "text": "y", "doc": None}])
        # No savepoint inside a block.
        with pytest.raises(RuntimeError, match="savepoint"):
            async with (
                db.transaction() as session,
                written_together(session),
                session.begin_nested(),
            ):
                await SHELF_ROWS.add(session, [{**ROW, "item_id": "x"}])
        async with db.sessions() as session:
            assert (await BY_ID.execute(session, {"key": "new"})).first() is None
            assert (await session.execute(sa.select(stamped.c.note))).scalar_one() == "none"
            labels = [tuple(r) for r in await LABELS_IN_ORDER.execute(session)]
            assert labels == [("a", "y", None)]
            assert (await BY_ID.execute(session, {"key": "x"})).first() is None
    finally:
        await db.dispose()


# --- units of work without a session -------------------------------------------------------

# A uniqueness checked at COMMIT, for a unit whose commit fails.
deferred = sa.Table(
    "direct_deferred",
    sa.MetaData(),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("code", sa.String(8), nullable=False),
    sa.UniqueConstraint("code", deferrable=True, initially="DEFERRED"),
)
DEFERRED = Direct(sa.insert(deferred))


def _sent_by_driver(unit: Any) -> list[str]:
    """The commands the driver is asked to send from now on, kept in the list
    returned (PostgreSQL)."""
    sent: list[str] = []
    unit.driver_connection.add_query_logger(
        lambda query: sent.append(query.query.split()[0].rstrip(";").upper())
    )
    return sent


async def test_a_direct_transaction_keeps_its_statements_together_or_none(
    database_url: DatabaseFactory,
) -> None:
    """``Database.direct_transaction``: on PostgreSQL a ``Unit`` on a pooled
    connection, whose statements SQLAlchemy never sees, begun by its first
    statement and committed at the end; on SQLite a session's unit of work.
    Either way all of it is kept, or (when the block raises, or a statement
    fails) none of it, and the commit hooks fire after a commit alone."""
    db = await open_db(database_url)
    seen: list[str] = []
    committed: list[dict[str, Any]] = []
    db.on_commit(committed.append)
    sa.event.listen(
        db.engine.sync_engine, "before_cursor_execute", lambda *args: seen.append(args[2])
    )
    try:
        async with db.direct_transaction() as unit:
            sent = _sent_by_driver(unit) if isinstance(unit, Unit) else []
            unit.info["marker"] = "kept"
            await INSERT.execute(unit, ROW)
            assert (await ADD.execute(unit, {"key": "a", "by": 1})).one().count == 2**40 + 1
            async with written_together(unit):
                await SHELF_ROWS.add(unit, [{**ROW, "item_id": "b"}])
                await LABELS.add(unit, [{"item_id": "b", "text": "t", "doc": None}])
            # Read back inside the unit, before the commit.
            assert (await BY_ID.execute(unit, {"key": "b"})).one().count == 2**40
        assert [info.get("marker") for info in committed] == ["kept"]
        await asyncio.sleep(0.01)  # the driver tells its query loggers soon after
        if db.dialect == "postgresql":
            assert isinstance(unit, Unit)
            assert seen == []
            assert sent[0] == "BEGIN" and sent[-1] == "COMMIT" and sent.count("BEGIN") == 1
            # The block's rows went as one statement: BEGIN, three, COMMIT.
            assert len(sent) == 5
        else:
            assert isinstance(unit, AsyncSession)
        with pytest.raises(Stop):
            async with db.direct_transaction() as unit:
                await INSERT.execute(unit, {**ROW, "item_id": "gone"})
                await ADD.execute(unit, {"key": "a", "by": 10})
                raise Stop
        with pytest.raises(IntegrityError) as raised:
            async with db.direct_transaction() as unit:
                await INSERT.execute(unit, {**ROW, "item_id": "gone too"})
                await INSERT.execute(unit, ROW)
        assert is_unique_violation(raised.value)
        assert len(committed) == 1
        async with db.direct_transaction() as unit:
            assert (await BY_ID.execute(unit, {"key": "a"})).one().count == 2**40 + 1
            assert (await BY_ID.execute(unit, {"key": "gone"})).first() is None
            assert (await BY_ID.execute(unit, {"key": "gone too"})).first() is None
        if db.dialect == "postgresql":
            # No connection is left checked out, nor a transaction left open.
            assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await db.dispose()


async def test_a_unit_refuses_a_statement_only_sqlalchemy_runs_and_keeps_nothing(
    postgres: Postgres,
) -> None:
    """PostgreSQL's alone: an expanding ``IN`` (or a Python-side default)
    needs SQLAlchemy's execution, which a ``Unit`` does not have. It says
    so, rather than run it half-way, and the unit is rolled back."""
    async with postgres_db(postgres, metadata) as db:
        with pytest.raises(TypeError, match="Unit"):
            async with db.direct_transaction() as unit:
                await INSERT.execute(unit, ROW)
                await IN_LIST.execute(unit, {"keys": ["a"]})
        with pytest.raises(TypeError, match="Unit"):
            async with db.direct_transaction() as unit:
                await STAMP.execute(unit, {"item_id": "s"})
        async with db.sessions() as session:
            assert (await BY_ID.execute(session, {"key": "a"})).first() is None


async def test_a_unit_whose_commit_fails_keeps_nothing(postgres: Postgres) -> None:
    """A constraint checked at COMMIT fails the unit's commit: the error is
    SQLAlchemy's ``IntegrityError``, nothing is kept and the connection
    goes back to the pool usable."""
    async with postgres_db(postgres, deferred.metadata) as db:
        with pytest.raises(IntegrityError) as raised:
            async with db.direct_transaction() as unit:
                await DEFERRED.execute(unit, {"seq": 1, "code": "x"})
                # Accepted here: the check waits for the commit.
                await DEFERRED.execute(unit, {"seq": 2, "code": "x"})
        assert is_unique_violation(raised.value)
        async with db.direct_transaction() as unit:
            await DEFERRED.execute(unit, {"seq": 3, "code": "y"})
        async with db.sessions() as session:
            kept = await session.execute(sa.select(deferred.c.seq))
            assert kept.scalars().all() == [3]


async def test_a_unit_that_loses_its_connection_or_is_cancelled_leaves_the_pool_sound(
    postgres: Postgres,
) -> None:
    """A connection lost under a unit's statement is thrown away and the
    caller gets UNAVAILABLE; a unit cancelled in the middle of a statement
    throws its connection away too (it may be mid-exchange with the
    server). Neither keeps anything, and the next unit runs as ever."""
    async with postgres_db(postgres, metadata) as db:
        with pytest.raises(Unavailable):
            async with db.direct_transaction() as unit:
                await INSERT.execute(unit, ROW)
                assert isinstance(unit, Unit)
                await unit.driver_connection.close()
                await BY_ID.execute(unit, {"key": "a"})
        slow = Direct(sa.select(sa.func.pg_sleep(1)))

        async def stuck() -> None:
            async with db.direct_transaction() as unit:
                await INSERT.execute(unit, ROW)
                await slow.execute(unit)

        task = asyncio.create_task(stuck())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        async with db.single_statement() as unit:
            assert (await BY_ID.execute(unit, {"key": "a"})).first() is None
        async with db.direct_transaction() as unit:
            await INSERT.execute(unit, ROW)
        async with db.sessions() as session:
            assert (await BY_ID.execute(session, {"key": "a"})).one().item_id == "a"


async def test_a_unit_is_freed_as_soon_as_it_ends(postgres: Postgres) -> None:
    """A unit and its pooled connection's wrapper hold no cycle: they are
    freed when the block ends, not left for the garbage collector (a dozen
    units a checkout would otherwise be its work)."""
    async with postgres_db(postgres, metadata) as db:
        gc.collect()
        gc.disable()
        try:
            async with db.direct_transaction() as unit:
                await INSERT.execute(unit, ROW)
                assert isinstance(unit, Unit)
                ended = weakref.ref(unit.bound)
            del unit
            assert ended() is None
        finally:
            gc.enable()
