"""The database: one async engine per service, SQLite under ./var by default
and PostgreSQL through ``<SERVICE>_DATABASE_URL``; a unit of work that commits
state and outbox rows together; and the tables the chassis itself keeps in
every service's database (outbox, inbox, idempotency keys)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection

from chassis.direct import Direct, Executor, Unit, single_statement, unit_of_work
from chassis.errors import Unavailable

T = TypeVar("T")

# PostgreSQL's pool: as many connections kept as a busy service uses at once
# (connections made beyond the pool are closed when given back, and each new
# one is a new backend with cold caches), and some room beyond that.
POOL_SIZE = 16
MAX_OVERFLOW = 16
# A pooled connection idle longer than this is pinged (a round trip) before
# it is handed out; one in steady use is only checked for a closed socket.
PING_AFTER_IDLE_SECONDS = 10.0
_CHECKED_IN = "cornucopia_checked_in"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Timestamps are stored in UTC and always read back time-zone aware,
    on SQLite (which keeps no zone) as on PostgreSQL."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        moment: dt.datetime = value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=dt.UTC)
        return moment.astimezone(dt.UTC)


# An auto-incrementing 64-bit key that SQLite also treats as its rowid.
BigIntKey = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Tables the chassis keeps in every service's database. Created by each
# service's first migration through chassis.migrations.create_chassis_tables.
chassis_metadata = sa.MetaData()

outbox_table = sa.Table(
    "outbox",
    chassis_metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(64), nullable=False, unique=True),
    sa.Column("subject", sa.String(255), nullable=False),
    sa.Column("event_type", sa.String(255), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    # traceparent/tracestate captured when the row was written.
    sa.Column("headers", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.String(500), nullable=True),
    # A relay's claim on a row it is publishing (chassis.outbox.OutboxRelay).
    sa.Column("lease_until", UTCDateTime, nullable=True),
    sa.Index("ix_outbox_unsent", "sent_at", "seq"),
)

inbox_table = sa.Table(
    "inbox",
    chassis_metadata,
    sa.Column("consumer", sa.String(100), primary_key=True),
    sa.Column("event_id", sa.String(64), primary_key=True),
    sa.Column("subject", sa.String(255), nullable=False),
    sa.Column("processed_at", UTCDateTime, nullable=False),
    sa.Index("ix_inbox_processed_at", "processed_at"),
)

idempotency_table = sa.Table(
    "idempotency_keys",
    chassis_metadata,
    sa.Column("method", sa.String(200), primary_key=True),
    sa.Column("request_id", sa.String(200), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_idempotency_created_at", "created_at"),
)


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # WAL lets readers run beside the writer; busy_timeout makes writers wait
    # for each other instead of failing at once; foreign keys are off by
    # default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # Let SQLAlchemy, not the driver, say when a transaction begins (see
    # _sqlite_begin): the driver's own implicit BEGIN comes only before the
    # first write, so a savepoint taken earlier would commit on release.
    dbapi_connection.isolation_level = None


_WRITE_OPTION = "cornucopia_writer"


def _sqlite_begin(conn: sa.Connection) -> None:
    # A unit of work takes the write lock up front (IMMEDIATE): a deferred
    # transaction that reads and then writes cannot wait for another process's
    # writer and fails with "database is locked" instead. Reads stay deferred
    # so they never block a writer.
    immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """A service's database: the engine, sessions and units of work."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo}
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self._write_lock: asyncio.Lock | None = None
        if self.dialect != "sqlite":
            _ping_when_idle(self.engine)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin)
            self._write_lock = asyncio.Lock()
        # A session class of this database's own, so that commit hooks fire
        # for its sessions only (tests run several services in one process).
        self._session_class: type[Session] = type("ServiceSession", (Session,), {})
        self._commit_hooks: list[Callable[[dict[str, Any]], None]] = []
        event.listen(self._session_class, "after_commit", self._after_commit)
        # Reads on PostgreSQL run without a transaction: at READ COMMITTED
        # every statement takes its own snapshot either way, so a BEGIN and a
        # ROLLBACK around them are two round trips that buy nothing. SQLite's
        # read transaction does give one snapshot over several statements,
        # and costs no round trip, so it stays.
        read_engine = (
            self.engine
            if self.dialect == "sqlite"
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._read_sessions = async_sessionmaker(
            read_engine, expire_on_commit=False, sync_session_class=self._session_class
        )
        self._snapshot_sessions = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=self._session_class
        )
        # Units of work run on the same pool with the writer's begin.
        self._write_sessions = async_sessionmaker(
            self.engine.execution_options(**{_WRITE_OPTION: True}),
            expire_on_commit=False,
            sync_session_class=self._session_class,
        )

    def sessions(self, *, in_transaction: bool = False) -> AsyncSession:
        """A session for reading (``async with db.sessions() as session``);
        nothing it writes is kept. ``in_transaction`` for the rare read that
        needs one on PostgreSQL too (``SET LOCAL``, say)."""
        return (self._snapshot_sessions if in_transaction else self._read_sessions)()

    def on_commit(self, hook: Callable[[dict[str, Any]], None]) -> None:
        """Call ``hook(session.info)`` after each commit of this database."""
        self._commit_hooks.append(hook)

    def _after_commit(self, session: Session) -> None:
        self._after_commit_of(session.info)

    def _after_commit_of(self, info: dict[str, Any]) -> None:
        for hook in self._commit_hooks:
            hook(info)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: everything written through the session, state
        and outbox rows alike, commits together or not at all. A database
        that cannot be reached becomes UNAVAILABLE for the caller."""
        with _unavailable_as_status():
            async with self._writer(), self._write_sessions() as session, session.begin():
                yield session

    def direct_reads(self) -> AbstractAsyncContextManager[Executor]:
        """Reads of ``chassis.direct`` statements alone, as ``sessions`` is
        for any statement: on PostgreSQL a ``chassis.direct.Unit`` without
        a transaction (each statement its own snapshot, as a read session's
        there), on SQLite a read session. For the reads every request
        makes (a card resolved, a member looked up)."""
        return self._unit(begins=False, reads=True)

    def direct_transaction(self) -> AbstractAsyncContextManager[Executor]:
        """A unit of work of ``chassis.direct`` statements alone (``Direct``,
        ``Insert``, ``RowByKey``, ``ChangeWithEvent``), as ``transaction``
        is for any statement. On PostgreSQL it is a ``chassis.direct.Unit``
        on a pooled connection, without a session: for the short
        transactions on the checkout's path the session cost more than the
        statements. On SQLite it is ``transaction``'s session."""
        return self._unit(begins=True)

    def single_statement(self) -> AbstractAsyncContextManager[Executor]:
        """A unit of work that is one statement on PostgreSQL (a
        ``chassis.direct.Direct`` or a ``chassis.outbox.ChangeWithEvent``),
        sent there without BEGIN and COMMIT: one statement is a transaction
        by itself, so the two round trips around it buy nothing. A second
        statement is refused there, as it would commit apart from the
        first. On SQLite an ordinary unit of work (what is one statement on
        PostgreSQL may take a few on SQLite). For a write that is the whole
        of its unit: a log's step, a claim, a change with its event."""
        return self._unit(begins=False, one_statement=True)

    @asynccontextmanager
    async def _unit(
        self, *, begins: bool, one_statement: bool = False, reads: bool = False
    ) -> AsyncIterator[Executor]:
        if self.dialect != "postgresql":
            async with self.sessions() if reads else self.transaction() as session:
                yield session
            return
        with _unavailable_as_status():
            async with unit_of_work(self.engine, begins=begins) as unit:
                if one_statement:
                    single_statement(unit)
                yield unit
        if not reads:
            # Committed (a unit of one statement, as it ran): the commit
            # hooks (a worker's wake-up) fire now.
            self._after_commit_of(unit.info)

    @asynccontextmanager
    async def _writer(self) -> AsyncIterator[None]:
        # SQLite allows one writer per file. Queueing writers here, in order,
        # replaces SQLite's busy-wait (sleeps of up to 100 ms between retries)
        # that otherwise dominates the tail latency under concurrency.
        if self._write_lock is None:
            yield
            return
        async with self._write_lock:
            yield

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def _ping_when_idle(engine: AsyncEngine) -> None:
    """Instead of ``pool_pre_ping`` (a BEGIN, a ping and a ROLLBACK each time a
    session takes a connection): a connection whose socket was closed (the
    server restarted, the backend was terminated) is replaced at once, and
    one that sat in the pool for PING_AFTER_IDLE_SECONDS is pinged first.
    A connection that dies while in use fails its statement, as it would
    with pre-ping; SQLAlchemy then throws away the pool's older connections."""
    dialect = engine.sync_engine.dialect

    def checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_CHECKED_IN] = time.monotonic()

    def checkout(
        dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
    ) -> None:
        driver_connection = getattr(dbapi_connection, "driver_connection", None)
        is_closed = getattr(driver_connection, "is_closed", None)
        if is_closed is not None and is_closed():
            raise DisconnectionError("the connection was closed")
        idle_since = record.info.get(_CHECKED_IN)
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("the connection did not answer a ping") from exc

    event.listen(engine.sync_engine.pool, "checkin", checkin)
    event.listen(engine.sync_engine.pool, "checkout", checkout)


class Memo(Generic[T]):
    """A value read on every request and changed seldom (a policy document,
    a ladder), kept per database for ``ttl`` seconds instead of read and
    parsed each time. A change made through this process is seen at once
    (its writer calls ``forget`` with its session), one made by another
    replica within ``ttl``."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        # Keyed by the database's connection pool: one per Database, shared
        # by its read and write sessions.
        self._values: weakref.WeakKeyDictionary[Pool, tuple[float, T]] = weakref.WeakKeyDictionary()
        # Bumped by every forget: a read that began before it must not keep
        # what it read, which may be the value just replaced.
        self._generation = 0

    async def get(self, session: Executor, load: Callable[[], Awaitable[T]]) -> T:
        pool = session.pool if isinstance(session, Unit) else session.get_bind().pool  # type: ignore[union-attr]
        kept = self._values.get(pool)
        now = time.monotonic()
        if kept is not None and kept[0] > now:
            return kept[1]
        generation = self._generation
        value = await load()
        if generation == self._generation:
            self._values[pool] = (now + self.ttl, value)
        return value

    def forget(self, session: AsyncSession | None = None) -> None:
        """Drop what is kept; given the writer's session, again when it
        commits, since a read running meanwhile still saw the old value."""
        self._drop()
        if session is not None:
            event.listen(session.sync_session, "after_commit", self._after_commit, once=True)

    def _after_commit(self, _session: Session) -> None:
        self._drop()

    def _drop(self) -> None:
        self._generation += 1
        self._values.clear()


class RowByKey:
    """``SELECT * FROM table WHERE key = :key`` (``... FOR UPDATE`` when
    locking), built once: a statement built afresh on every call costs its
    construction and its cache key each time (most of what SQLAlchemy spends
    on a primary-key read)."""

    def __init__(self, table: sa.Table, *columns: str) -> None:
        self._names = tuple(f"key_{name}" for name in columns)
        pairs = zip(columns, self._names, strict=True)
        plain = sa.select(table).where(*(table.c[name] == sa.bindparam(key) for name, key in pairs))
        # Run on the driver on PostgreSQL (chassis.direct): the reads every
        # request makes.
        self._plain = Direct(plain)
        self._locked = Direct(plain.with_for_update())

    async def first(self, session: Executor, *values: Any, for_update: bool = False) -> Any:
        """The row with these key values (in the columns' order), or None."""
        statement = self._locked if for_update else self._plain
        result = await statement.execute(session, dict(zip(self._names, values, strict=True)))
        return result.first()


@contextmanager
def _unavailable_as_status() -> Iterator[None]:
    """A database that cannot be reached: UNAVAILABLE for the caller."""
    try:
        yield
    except (OperationalError, DBAPIError) as exc:
        if _is_unavailable(exc):
            raise Unavailable(
                "the database is unavailable; try again", reason="DATABASE_UNAVAILABLE"
            ) from exc
        raise


def _is_unavailable(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    text = str(exc.orig).lower() if exc.orig is not None else ""
    return any(
        marker in text
        for marker in ("connection refused", "could not connect", "connection was closed")
    )


def is_unique_violation(exc: BaseException) -> bool:
    """True when an IntegrityError comes from a unique or primary key
    constraint, on SQLite as on PostgreSQL."""
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate == "23505":
        return True
    text = str(orig or exc).lower()
    return "unique constraint" in text or "duplicate key" in text


async def upsert(
    session: AsyncSession, table: sa.Table, key: dict[str, Any], values: dict[str, Any]
) -> None:
    """Insert the row, or update ``values`` of the one with that key: one
    statement, so two writers of a new key cannot both insert."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    await session.execute(
        insert(table)
        .values(**key, **values)
        .on_conflict_do_update(index_elements=list(key), set_=values)
    )
