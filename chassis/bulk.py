"""Bulk inserts: many rows of one table in one statement, inside the
caller's unit of work.

On PostgreSQL (asyncpg) the rows go in with binary COPY, which costs the
database and the client a fraction of a multi-row INSERT; elsewhere with an
executemany. Either way each value goes through its column type's own bind
processing first (time zones, JSON), so the stored rows are exactly those a
plain ``insert`` would write, and a unique violation is an ``IntegrityError``
as it would be there (the transaction is then to be rolled back).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession


async def insert_rows(
    session: AsyncSession, table: sa.Table, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Insert ``rows`` (all with the same keys) into ``table``."""
    if not rows:
        return
    conn = await session.connection()
    dialect = conn.dialect
    if dialect.name != "postgresql" or dialect.driver != "asyncpg":
        await session.execute(sa.insert(table), [dict(row) for row in rows])
        return
    columns = list(rows[0])
    processors = [table.c[name].type._cached_bind_processor(dialect) for name in columns]
    records = [
        tuple(
            value if process is None else process(value)
            for process, value in zip(processors, (row[name] for name in columns), strict=True)
        )
        for row in rows
    ]
    raw = await conn.get_raw_connection()
    if getattr(raw.dbapi_connection, "_transaction", None) is None:
        # The driver opens its transaction with the first statement: COPY
        # must not run outside it.
        await conn.execute(sa.text("SELECT 1"))
    driver = raw.driver_connection
    assert driver is not None
    try:
        await driver.copy_records_to_table(
            table.name, records=records, columns=columns, schema_name=table.schema
        )
    except Exception as exc:
        if getattr(exc, "sqlstate", None) in ("23505", "23503", "23502", "23514"):
            raise IntegrityError(f"COPY {table.name}", None, exc) from exc
        raise
