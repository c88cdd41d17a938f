"""List paging in the manner of AIP-158: ``page_size`` (clamped) and an
opaque ``page_token`` that carries the last key seen (keyset paging: stable
while rows are added, no OFFSET scans)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any, TypeVar

import sqlalchemy as sa

from chassis.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# Tokens carry a last-seen key: a few ids and timestamps. Anything longer was
# not issued here, and refusing it early keeps the JSON parser out of reach.
MAX_TOKEN_LENGTH = 1024


def page_size(
    requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    return min(requested or default, maximum)


def encode_token(key: dict[str, Any]) -> str:
    raw = json.dumps(key, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> dict[str, Any] | None:
    if not token:
        return None
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidArgument([FieldViolation("page_token", "not a token this service issued")])
    try:
        padded = token + "=" * (-len(token) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise InvalidArgument([FieldViolation("page_token", "not a token this service issued")])
    return value


def newest_first_after(token: str) -> tuple[dt.datetime, str] | None:
    """The (time, id) key a ``newest_first`` page token carries."""
    key = decode_token(token)
    if key is None:
        return None
    try:
        return dt.datetime.fromisoformat(str(key["t"])), str(key["id"])
    except (KeyError, ValueError):
        raise InvalidArgument(
            [FieldViolation("page_token", "not a token this service issued")]
        ) from None


def newest_first_token(at: dt.datetime, key: str) -> str:
    """The page token after a row keyed (``at``, ``key``)."""
    return encode_token({"t": at.isoformat(), "id": key})


Query = TypeVar("Query", bound=sa.Select[Any])


def newest_first(
    query: Query,
    at: sa.ColumnElement[dt.datetime],
    key: sa.ColumnElement[str],
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> Query:
    """``query`` newest first by ``(at, key)``, resuming after the last row
    a page showed: the order lists of records, changes and messages share."""
    if after is not None:
        last_at, last_key = after
        query = query.where(sa.or_(at < last_at, sa.and_(at == last_at, key < last_key)))
    return query.order_by(at.desc(), key.desc()).limit(limit)
