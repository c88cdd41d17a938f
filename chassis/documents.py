"""Settings kept as one JSON document in a row with an etag: the table's
shape, reading the row back and writing it (one upsert, so two writers of a
missing row cannot both insert).

Each service keeps its own table (its name and key column are its
migration's); only the mechanism is shared here."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import RowByKey, UTCDateTime, upsert
from chassis.direct import Executor


def document_table(
    name: str, metadata: sa.MetaData, key_column: str, **key_options: Any
) -> sa.Table:
    """A table of documents keyed by a small integer ``key_column``
    (``key_options`` go to that column, e.g. ``autoincrement=False``)."""
    return sa.Table(
        name,
        metadata,
        sa.Column(key_column, sa.SmallInteger, primary_key=True, **key_options),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.Column("updated_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )


@dataclass(frozen=True)
class StoredDocument:
    document: dict[str, Any]
    etag: str
    updated_by: str
    updated_store_id: str
    updated_at: dt.datetime


def etag_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def default_etag(document: dict[str, Any]) -> str:
    """The etag of a document no one has saved yet (e.g. the default one)."""
    return etag_of(json.dumps(document, sort_keys=True))


# By table and key columns: the read of a document by its key, built once
# (read on every request that prices or grants by a policy).
_BY_KEY: dict[tuple[sa.Table, tuple[str, ...]], RowByKey] = {}


async def read_document(
    session: Executor, table: sa.Table, key: dict[str, Any], *, for_update: bool = False
) -> StoredDocument | None:
    """The row with that key, or None until one is written."""
    names = tuple(key)
    by_key = _BY_KEY.get((table, names))
    if by_key is None:
        by_key = _BY_KEY[(table, names)] = RowByKey(table, *names)
    row = await by_key.first(session, *key.values(), for_update=for_update)
    if row is None:
        return None
    return StoredDocument(
        json.loads(row.document), row.etag, row.updated_by, row.updated_store_id, row.updated_at
    )


async def write_document(
    session: AsyncSession,
    table: sa.Table,
    key: dict[str, Any],
    document: dict[str, Any],
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
    ensure_ascii: bool = True,
) -> str:
    """Creates or replaces the row with that key; returns its new etag."""
    text = json.dumps(document, sort_keys=True, ensure_ascii=ensure_ascii)
    etag = etag_of(text + now.isoformat())
    values = {
        "document": text,
        "etag": etag,
        "updated_by": principal,
        "updated_store_id": store_id,
        "updated_at": now,
    }
    await upsert(session, table, key, values)
    return etag
