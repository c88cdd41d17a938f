"""Statements on the hot paths, run straight on the driver on PostgreSQL.

Through SQLAlchemy's execution path a key read costs two to three times
what the same read costs through asyncpg (``bench/unit_costs.py``): the
session's bookkeeping, the execution context, the greenlet that bridges the
sync core to asyncio, the cursor adapter and the result wrapping, all per
statement. A checkout runs some fifty statements, so that path was the
largest part of the services' CPU.

``Direct`` keeps SQLAlchemy for what it is good at (the statement is an
ordinary Core construct, compiled once by the dialect, with its types' bind
and result processing) and skips the rest on PostgreSQL: the compiled SQL
goes to the session's own asyncpg connection, prepared through the dialect
adapter's statement cache, inside the transaction the session has begun
(begun here if this is its first statement), serialised with the adapter's
other statements on that connection. Errors come back as SQLAlchemy's own
(``IntegrityError`` for a unique violation, with ``connection_invalidated``
for a lost connection, which is then invalidated as SQLAlchemy would). On
SQLite, or for a statement this path cannot run (Python-side column
defaults, expanding ``IN`` parameters), it is an ordinary
``session.execute``. Either way the caller gets the same ``Rows``.

``Insert`` and ``written_together`` take this one step further for rows
nothing reads back before the commit (a sale's lines, a ledger's entries,
the events): inside the block they wait, and at its end every table's
rows go in one statement on PostgreSQL, each table's as arrays unnested
into it.

``Unit`` goes further still for a unit of work made of these statements
alone: on PostgreSQL it takes a connection from the engine's pool and
begins, commits and rolls back through the driver, with no session around
it (``chassis.db.Database.direct_transaction``, ``direct_reads`` and
``single_statement``).

It relies on a few internals of SQLAlchemy's asyncpg adapter (its
transaction, statement cache and mutex), pinned with SQLAlchemy's version
in ``pyproject.toml``; ``chassis/tests/test_direct.py`` runs every kind of
statement both ways on PostgreSQL and compares them, so an upgrade that
changes them fails there first.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import PoolProxiedConnection

# The session's driver connection, kept in ``session.info`` for the rest of
# the session's transaction.
_CONNECTION = "chassis.direct.connection"
# The constants of a plan whose parameters are computed per call.
_COMPUTED: dict[str, Any] = {}
_ROWCOUNT = re.compile(r"(?:SELECT|UPDATE|DELETE|INSERT \d+|MERGE) (\d+)")


# Set in a session that is a unit of work of one statement
# (``chassis.db.Database.single_statement``): whether it has run.
_SINGLE = "chassis.direct.single_statement"


def single_statement(session: Executor) -> None:
    """Marks ``session`` as a unit of work of one statement: a second
    statement run through ``Direct`` raises instead of committing apart
    from the first."""
    session.info[_SINGLE] = False


def _count_single(session: Executor) -> None:
    if session.info[_SINGLE]:
        raise RuntimeError("a unit of work of one statement was given a second one")
    session.info[_SINGLE] = True


class Rows:
    """A statement's result, read at once: its rows (with attribute, index
    and ``_mapping`` access, as SQLAlchemy's) and the rows it changed."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: Sequence[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def all(self) -> list[Any]:
        return list(self._rows)

    def first(self) -> Any | None:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise sa.exc.NoResultFound(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def one_or_none(self) -> Any | None:
        if len(self._rows) > 1:
            raise sa.exc.MultipleResultsFound(f"expected one row, got {len(self._rows)}")
        return self.first()

    def scalar(self) -> Any:
        """The first column of the first row, or None without rows."""
        row = self.first()
        return None if row is None else row[0]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]


class _MappingRow:
    """What a row class adds to a named tuple: SQLAlchemy's ``_mapping``."""

    _fields: tuple[str, ...]

    @property
    def _mapping(self) -> dict[str, Any]:
        return dict(zip(self._fields, cast(Sequence[Any], self), strict=True))


def _row_class(names: Sequence[str]) -> type:
    plain = NamedTuple("Row", [(name, Any) for name in _safe_names(names)])  # type: ignore[misc]
    return type("Row", (plain, _MappingRow), {"__slots__": ()})


def _safe_names(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    safe = []
    for i, name in enumerate(names):
        ok = name.isidentifier() and not name.startswith("_") and name not in seen
        safe.append(name if ok else f"c{i}")
        seen.add(safe[-1])
    return safe


@dataclass
class _Plan:
    """A statement compiled for one set of parameter names."""

    compiled: Any
    sql: str
    positions: tuple[str, ...]
    processors: Mapping[str, Any]
    # The values of the parameters the calls do not give (the literals the
    # statement was built with), found at the first execution.
    constants: dict[str, Any] | None = None
    # Whether a parameter's value is computed per call (``construct_params``).
    computed: bool = False
    # Filled at the first execution, from what the server says it returns.
    results: tuple[type, tuple[Any, ...]] | None = None


class Direct:
    """A Core statement that runs on the driver on PostgreSQL (see the
    module's docstring). Build it once, at import time, like the statement;
    ``await statement.execute(session, params)``."""

    def __init__(self, statement: sa.Executable) -> None:
        self.statement = statement
        # By the names of the parameters a call passes: an INSERT without
        # explicit values renders the columns it is given.
        self._plans: dict[tuple[str, ...], _Plan | None] = {}

    async def execute(self, session: Executor, params: Mapping[str, Any] | None = None) -> Rows:
        if _SINGLE in session.info:
            _count_single(session)
        values = dict(params or {})
        bound = await _bound(session)
        plan = None if bound is None else self._plan(bound.dialect, tuple(sorted(values)))
        if bound is None or plan is None:
            return await self._through_sqlalchemy(_session(session, self), values)
        return await _run(session, bound, plan, values)

    async def execute_many(self, session: Executor, rows: Sequence[Mapping[str, Any]]) -> None:
        """The statement once for each of ``rows`` (all with the same keys),
        in one round trip on PostgreSQL; no result."""
        if not rows:
            return
        if _SINGLE in session.info:
            _count_single(session)
        bound = await _bound(session)
        plan = None if bound is None else self._plan(bound.dialect, tuple(sorted(rows[0])))
        if bound is None or plan is None:
            await _session(session, self).execute(self.statement, [dict(row) for row in rows])
            return
        await _run_many(session, bound, plan, rows)

    def _plan(self, dialect: sa.Dialect, names: tuple[str, ...]) -> _Plan | None:
        try:
            return self._plans[names]
        except KeyError:
            pass
        compiled: Any = cast(Any, self.statement).compile(dialect=dialect, column_keys=list(names))
        if (
            compiled.insert_prefetch
            or compiled.update_prefetch
            or compiled.post_compile_params
            or compiled.literal_execute_params
            or not compiled.positional
        ):
            # Python-side defaults or expanding parameters: SQLAlchemy's own
            # execution context works those out.
            plan = None
        else:
            plan = _Plan(
                compiled=compiled,
                sql=compiled.string,
                positions=tuple(compiled.positiontup or ()),
                processors=dict(compiled._bind_processors),
            )
        self._plans[names] = plan
        return plan

    async def _through_sqlalchemy(self, session: AsyncSession, values: dict[str, Any]) -> Rows:
        result = cast(sa.CursorResult[Any], await session.execute(self.statement, values))
        rows = result.all() if result.returns_rows else []
        return Rows(rows, result.rowcount)


@dataclass(frozen=True)
class _Bound:
    """A session's transaction (or a ``Unit``) and the driver connection it
    runs on."""

    transaction: Any
    # SQLAlchemy's asyncpg adapter connection.
    adapted: Any
    dialect: Any
    # Gives the connection up after an error that lost it, as SQLAlchemy
    # does: it is not returned to the pool.
    lose: Callable[[Exception], Awaitable[None]]
    # Whether the first statement begins a transaction; a unit of one
    # statement runs it alone, a transaction by itself.
    begins: bool = True


class Unit:
    """A unit of work of ``Direct`` statements and ``Insert`` rows alone,
    on PostgreSQL: a connection from the engine's pool, driven through the
    driver with no ORM session or Core connection around it
    (``chassis.db.Database.direct_transaction``, ``direct_reads`` and
    ``single_statement``).
    For a short transaction those cost more CPU than its statements: the
    session and its transaction's bookkeeping, and the connection checked
    out, begun, committed and checked in through SQLAlchemy's greenlet
    bridge (``bench/unit_costs.py``). It has a session's ``info``; a
    statement that needs SQLAlchemy's own execution is refused."""

    __slots__ = ("_loss", "_pooled", "bound", "info", "pool")

    def __init__(self, engine: AsyncEngine, pooled: PoolProxiedConnection, *, begins: bool) -> None:
        self.info: dict[str, Any] = {}
        # The engine's pool, which ``chassis.db.Memo`` keys by, as for a session.
        self.pool = engine.sync_engine.pool
        self._pooled = pooled
        self._loss = _Loss(pooled)
        self.bound = _Bound(
            transaction=None,
            adapted=pooled.dbapi_connection,
            dialect=engine.dialect,
            lose=self._loss,
            begins=begins,
        )

    def in_nested_transaction(self) -> bool:
        return False

    @property
    def driver_connection(self) -> Any:
        """The asyncpg connection underneath."""
        return self._pooled.driver_connection

    async def _end(self, *, commit: bool) -> None:
        """Commits or rolls back what the statements began, if anything."""
        adapted = self.bound.adapted
        if self._loss.lost or adapted._transaction is None:
            return
        end = adapted._transaction.commit if commit else adapted._transaction.rollback
        try:
            async with adapted._execute_mutex:
                await adapted._call_and_discard(end)
        except Exception as error:
            ending = "COMMIT" if commit else "ROLLBACK"
            raise await _translated(self, self.bound, ending, (), error) from error


@asynccontextmanager
async def unit_of_work(engine: AsyncEngine, *, begins: bool = True) -> AsyncIterator[Unit]:
    """A ``Unit`` on a connection of ``engine``'s pool (PostgreSQL through
    asyncpg): committed when the block ends, rolled back when it raises.
    ``begins=False`` for a unit of one statement, which runs without BEGIN
    and COMMIT."""
    pooled = await engine.raw_connection()
    unit = Unit(engine, pooled, begins=begins)
    try:
        try:
            yield unit
        except Exception:
            try:
                await unit._end(commit=False)
            except Exception:
                # The rollback failed: the connection's state is unknown.
                if not unit._loss.lost:
                    await unit._loss(RuntimeError("a rollback failed"))
            raise
        except BaseException:
            # Cancelled, perhaps inside a statement: the connection may be
            # mid-exchange with the server, so it is not used again.
            if not unit._loss.lost:
                await unit._loss(RuntimeError("a unit of work was cancelled"))
            raise
        await unit._end(commit=True)
    finally:
        pooled.close()


class _Loss:
    """How a unit gives up a connection that was lost: thrown away, not
    returned to the pool. An object of its own, not a method of the unit:
    the unit's ``_Bound`` holds it, and a bound method would make a cycle
    of the two that only the garbage collector frees (with the pooled
    connection's wrapper), a dozen times a checkout."""

    __slots__ = ("lost", "pooled")

    def __init__(self, pooled: PoolProxiedConnection) -> None:
        self.pooled = pooled
        self.lost = False

    async def __call__(self, error: Exception) -> None:
        self.lost = True
        self.pooled.invalidate(error)


Executor = AsyncSession | Unit
"""What ``Direct`` statements run in: a session's transaction or a ``Unit``."""


async def _bound(session: Executor) -> _Bound | None:
    if isinstance(session, Unit):
        return session.bound
    bound: _Bound | None = session.info.get(_CONNECTION)
    if bound is None or bound.transaction is not session.sync_session.get_transaction():
        bound = await _bind(session)
    return bound


def as_session(session: Executor) -> AsyncSession:
    """The session itself, for a statement only SQLAlchemy's execution
    runs (on SQLite, say, where a unit of work is a session); a ``Unit``
    has none, and is refused."""
    if isinstance(session, Unit):
        raise TypeError("this statement needs a session's unit of work, not a chassis.direct.Unit")
    return session


def dialect_name(session: Executor) -> str:
    """The name of the database's dialect ("postgresql", "sqlite")."""
    if isinstance(session, Unit):
        return str(session.bound.dialect.name)
    return session.get_bind().dialect.name


def _session(session: Executor, statement: Direct) -> AsyncSession:
    """The session a statement the driver path cannot run falls back to."""
    if isinstance(session, Unit):
        raise TypeError(
            f"{statement.statement} needs SQLAlchemy's execution (a Python-side default or "
            "an expanding parameter), which a chassis.direct.Unit does not have"
        )
    return session


class DialectInsert:
    """An INSERT whose form is the dialect's own (``ON CONFLICT``, say):
    ``build`` makes it from the dialect's ``insert`` (PostgreSQL's or
    SQLite's), once for each, and it runs as a ``Direct``. Build it once,
    like a statement."""

    def __init__(self, build: Callable[[Callable[[sa.Table], Any]], sa.Executable]) -> None:
        self._build = build
        self._built: dict[str, Direct] = {}

    async def execute(self, session: Executor, params: Mapping[str, Any] | None = None) -> Rows:
        name = dialect_name(session)
        direct = self._built.get(name)
        if direct is None:
            insert = postgresql.insert if name == "postgresql" else sqlite.insert
            direct = self._built[name] = Direct(self._build(insert))
        return await direct.execute(session, params)


async def _bind(session: AsyncSession) -> _Bound | None:
    """The session's asyncpg adapter connection (the session's transaction
    begun, the connection checked out), None off asyncpg. Kept for the rest
    of the transaction."""
    engine = session.bind
    dialect = (engine if engine is not None else session.get_bind()).dialect
    if dialect.name != "postgresql" or dialect.driver != "asyncpg":
        return None
    connection = await session.connection()
    pooled = connection.sync_connection.connection  # type: ignore[union-attr]
    bound = _Bound(
        transaction=session.sync_session.get_transaction(),
        adapted=pooled.dbapi_connection,
        dialect=dialect,
        lose=connection.invalidate,
    )
    session.info[_CONNECTION] = bound
    return bound


async def _run(session: Executor, bound: _Bound, plan: _Plan, values: dict[str, Any]) -> Rows:
    dialect = bound.dialect
    args = _arguments(plan, values)
    async with _prepared(session, bound, plan, args) as (prepared, attributes):
        records = await prepared.fetch(*args)
        status = prepared.get_statusmsg()
    matched = _ROWCOUNT.match(status or "")
    rowcount = int(matched.group(1)) if matched else -1
    if not attributes:
        return Rows((), rowcount)
    if plan.results is None:
        plan.results = _result_plan(plan.compiled, dialect, attributes)
    row_class, result_processors = plan.results
    rows = [
        row_class(
            *(
                value if process is None else process(value)
                for process, value in zip(result_processors, record, strict=True)
            )
        )
        for record in records
    ]
    return Rows(rows, rowcount)


def _arguments(plan: _Plan, values: Mapping[str, Any]) -> list[Any]:
    """The statement's positional arguments, through its types' bind
    processing, as SQLAlchemy's execution context makes them."""
    constants = plan.constants
    if constants is None:
        constants = plan.constants = _constants(plan.compiled, values)
        plan.computed = constants is _COMPUTED
    if plan.computed:
        merged = plan.compiled.construct_params(values, escape_names=False)
    else:
        merged = constants | dict(values) if constants else values
    processors = plan.processors
    return [
        processors[key](merged[key]) if key in processors else merged[key] for key in plan.positions
    ]


def _constants(compiled: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of the parameters a call does not give: the literals the
    statement was built with (the same for every call of a plan, whose
    calls give the same names). ``_COMPUTED`` when one is computed per
    call, which is left to ``construct_params``; a required one not given
    raises SQLAlchemy's own error."""
    constants: dict[str, Any] = {}
    for bind, key in compiled.bind_names.items():
        if key in values:
            continue
        if bind.callable is not None:
            return _COMPUTED
        if bind.required:
            compiled.construct_params(values, escape_names=False)
        constants[key] = bind.value
    return constants


async def _run_many(
    session: Executor, bound: _Bound, plan: _Plan, rows: Sequence[Mapping[str, Any]]
) -> None:
    args = [_arguments(plan, row) for row in rows]
    async with _prepared(session, bound, plan, args) as (prepared, _attributes):
        await prepared.executemany(args)


@asynccontextmanager
async def _prepared(
    session: Executor, bound: _Bound, plan: _Plan, args: Any
) -> AsyncIterator[tuple[Any, Any]]:
    """The plan's prepared statement and what it returns, on the session's
    connection with its transaction begun, for the statements of the body
    alone on that connection; an error of theirs comes out as SQLAlchemy's."""
    adapted = bound.adapted
    try:
        async with adapted._execute_mutex:
            if adapted._transaction is None and bound.begins:
                # The driver begins the session's transaction with its first
                # statement; this may be that statement.
                await adapted._start_transaction()
            yield await adapted._prepare(plan.sql, bound.dialect._invalidate_schema_cache_asof)
    except Exception as error:
        raise await _translated(session, bound, plan.sql, args, error) from error


def _result_plan(compiled: Any, dialect: Any, attributes: Any) -> tuple[type, tuple[Any, ...]]:
    """The row class and each column's result processor, as SQLAlchemy's
    cursor result would build them for these columns."""
    columns = list(compiled._result_columns or ())
    if len(columns) != len(attributes):
        # Not a shape SQLAlchemy matched by position (text, say): the
        # server's names, no processing.
        return _row_class([a.name for a in attributes]), (None,) * len(attributes)
    names = [column.keyname for column in columns]
    processors = tuple(
        column.type._cached_result_processor(dialect, attribute.type.oid)
        for column, attribute in zip(columns, attributes, strict=True)
    )
    return _row_class(names), processors


async def _translated(
    session: Executor, bound: _Bound, sql: str, args: Any, error: Exception
) -> Exception:
    """The driver's error as SQLAlchemy would raise it from ``execute``."""
    dialect = bound.dialect
    try:
        bound.adapted._handle_exception(error)
    except Exception as dbapi_error:
        error = dbapi_error
    if not isinstance(error, dialect.loaded_dbapi.Error):
        return error
    lost = dialect.is_disconnect(error, bound.adapted, None)
    if lost:
        # As SQLAlchemy does after a statement of its own: the connection is
        # not given back to the pool, and the session must roll back.
        session.info.pop(_CONNECTION, None)
        await bound.lose(error)
    translated: Exception = DBAPIError.instance(
        sql,
        args,
        error,
        dialect.loaded_dbapi.Error,
        hide_parameters=True,
        dialect=dialect,
        connection_invalidated=lost,
    )
    return translated


# --- inserts written together ----------------------------------------------------------

# Inside ``written_together``: the rows waiting, by the insert and the
# names its rows give, in the order the parts were first used.
_WAITING = "chassis.direct.inserts_waiting"


class Insert:
    """An INSERT into one table of rows nothing reads back before the
    transaction commits (a sale's lines, a ledger's movement, an event).
    Inside ``written_together`` the rows wait for the block's end and are
    written with the other tables' rows; outside it, at once. Build it
    once, like a statement."""

    def __init__(self, table: sa.Table) -> None:
        self.table = table
        self.direct = Direct(sa.insert(table))

    async def add(self, session: Executor, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        waiting = waiting_inserts(session)
        if waiting is None:
            await self._write(session, rows)
            return
        for row in rows:
            waiting.setdefault((self, tuple(sorted(row))), []).append(row)

    async def _write(self, session: Executor, rows: Sequence[Mapping[str, Any]]) -> None:
        if len(rows) == 1:
            await self.direct.execute(session, rows[0])
        else:
            await self.direct.execute_many(session, rows)


_Parts = dict[tuple[Insert, tuple[str, ...]], list[Mapping[str, Any]]]


def waiting_inserts(session: Executor) -> _Parts | None:
    """The rows waiting in the session's ``written_together`` block, None
    outside one."""
    waiting: _Parts | None = session.info.get(_WAITING)
    if waiting is not None and session.in_nested_transaction():
        # A savepoint rolled back would have to take its rows out again;
        # nothing in a block needs one, so none is allowed.
        raise RuntimeError("a written_together block does not allow savepoints inside it")
    return waiting


@asynccontextmanager
async def written_together(session: Executor) -> AsyncIterator[None]:
    """The rows added through ``Insert`` inside the block are written when
    it ends: on PostgreSQL every table's in one statement (one round trip
    instead of one a table), elsewhere a table at a time, in the order the
    tables were first used. The block is part of the caller's transaction:
    if it raises, nothing of it is written, as the transaction will not
    commit. A block inside a block leaves the writing to the outer one;
    no savepoint may be opened inside."""
    if _WAITING in session.info:
        yield
        return
    waiting: _Parts = {}
    session.info[_WAITING] = waiting
    try:
        yield
    finally:
        del session.info[_WAITING]
    await _write_waiting(session, waiting)


class _Items(sa.types.UserDefinedType[list[Any]]):
    """An array of a column's values, bound by the column's own type
    already (``_write_waiting``): cast to the column's type's array, and
    passed to the driver as it is, not item by item through ``ARRAY``."""

    cache_ok = True
    render_bind_cast = True

    def __init__(self, spec: str = "") -> None:
        # The array's type as the server names it: the item's, with ``[]``.
        self.spec = spec

    def get_col_spec(self, **_kw: Any) -> str:
        return self.spec

    def bind_processor(self, dialect: sa.Dialect) -> None:
        return None


def _items_of(column_type: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> _Items:
    """The array type a column's values are sent as: its type's, as
    SQLAlchemy casts a value of it, except that a string goes as VARCHAR
    without its length, as SQLAlchemy sends it too: a cast to VARCHAR(n)
    would cut a longer value short where the column's own check must
    refuse it."""
    item = column_type._unwrapped_dialect_impl(dialect)
    if item._type_affinity is sa.String and getattr(item, "length", None):
        item = sa.String()
    return _Items(f"{dialect.type_compiler_instance.process(item)}[]")


# By dialect and parts (each an insert and its rows' names): the statement
# writing them, each part's rows as an array a column unnested into its
# table; None when a part cannot be written so (a column with a
# Python-side default left out, which SQLAlchemy's execution computes).
_TOGETHER: dict[tuple[Any, tuple[tuple[Insert, tuple[str, ...]], ...]], Direct | None] = {}


async def _write_waiting(session: Executor, waiting: _Parts) -> None:
    if not waiting:
        return
    bound = await _bound(session)
    together = None if bound is None else _together(bound.dialect, tuple(waiting))
    if bound is None or together is None:
        for (insert, _), rows in waiting.items():
            await insert._write(session, rows)
        return
    params: dict[str, list[Any]] = {}
    for i, ((insert, names), rows) in enumerate(waiting.items()):
        for name in names:
            values = [row[name] for row in rows]
            process = insert.table.c[name].type._cached_bind_processor(bound.dialect)
            params[f"p{i}_{name}"] = values if process is None else [process(v) for v in values]
    await together.execute(session, params)


def _together(
    dialect: sa.Dialect, parts: tuple[tuple[Insert, tuple[str, ...]], ...]
) -> Direct | None:
    key = (dialect, parts)
    try:
        return _TOGETHER[key]
    except KeyError:
        pass
    inserts = []
    for i, (insert, names) in enumerate(parts):
        compiled: Any = sa.insert(insert.table).compile(dialect=dialect, column_keys=list(names))
        if compiled.insert_prefetch:
            _TOGETHER[key] = None
            return None
        arrays = sa.func.unnest(
            *(
                sa.bindparam(f"p{i}_{name}", type_=_items_of(insert.table.c[name].type, dialect))
                for name in names
            )
        )
        rows = arrays.table_valued(*names).render_derived()
        inserts.append(sa.insert(insert.table).from_select(list(names), sa.select(*rows.c)))
    # All but the last in a WITH of their own: each runs exactly once, and
    # the constraints are checked when the whole statement is done.
    statement = inserts[-1].add_cte(*(insert.cte(f"w{i}") for i, insert in enumerate(inserts[:-1])))
    together = _TOGETHER[key] = Direct(statement)
    return together
