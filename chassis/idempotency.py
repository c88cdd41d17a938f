"""Idempotent mutations, in the manner of Stripe's idempotency keys.

The key row is written first in the same transaction as the work, so a
concurrent duplicate waits on it (PostgreSQL row lock, SQLite write lock) and,
once the first commits, reads the stored response instead of doing the work
again. The same key with a different payload is refused.

Because the key and the response commit together, a committed key always has
its answer: there is no "in flight" state another caller could observe, and an
empty response (``google.protobuf.Empty``) is a complete answer like any other.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, idempotency_table, is_unique_violation, utcnow
from chassis.errors import FieldViolation, InvalidArgument

R = TypeVar("R", bound=Message)

MAX_REQUEST_ID_LENGTH = 200


def request_fingerprint(request: Message) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def check_request_id(request_id: str, field: str = "request_id") -> None:
    if not request_id.strip():
        raise InvalidArgument(
            [FieldViolation(field, "required: a key of your choosing, unique per operation")]
        )
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(
            [FieldViolation(field, f"at most {MAX_REQUEST_ID_LENGTH} characters")]
        )


def _reused() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("request_id", "already used for a different request")],
        message="this request_id was already used with a different payload",
        reason="IDEMPOTENCY_KEY_REUSED",
    )


async def run_idempotent(
    db: Database,
    *,
    method: str,
    request_id: str,
    request: Message,
    response_type: type[R],
    work: Callable[[AsyncSession], Awaitable[R]],
) -> R:
    """Run ``work`` once per (method, request_id) and return its response;
    repeat calls with the same request return the stored response."""
    check_request_id(request_id)
    fingerprint = request_fingerprint(request)
    stored = await _lookup(db, method, request_id)
    if stored is not None:
        return _replay(stored, fingerprint, response_type)
    key = idempotency_table.c
    try:
        async with db.transaction() as session:
            await session.execute(
                sa.insert(idempotency_table).values(
                    method=method,
                    request_id=request_id,
                    request_hash=fingerprint,
                    response=b"",
                    created_at=utcnow(),
                )
            )
            response = await work(session)
            await session.execute(
                sa.update(idempotency_table)
                .where(key.method == method, key.request_id == request_id)
                .values(response=response.SerializeToString())
            )
        return response
    except IntegrityError as exc:
        if not is_unique_violation(exc):
            raise
        stored = await _lookup(db, method, request_id)
        if stored is None:
            # The unique violation came from the work, not from the key.
            raise
        return _replay(stored, fingerprint, response_type)


def _replay(stored: tuple[str, bytes], fingerprint: str, response_type: type[R]) -> R:
    request_hash, response = stored
    if request_hash != fingerprint:
        raise _reused()
    return response_type.FromString(response)


async def _lookup(db: Database, method: str, request_id: str) -> tuple[str, bytes] | None:
    key = idempotency_table.c
    async with db.sessions() as session:
        row = (
            await session.execute(
                sa.select(key.request_hash, key.response).where(
                    key.method == method, key.request_id == request_id
                )
            )
        ).first()
    return None if row is None else (row.request_hash, row.response)


async def forget_older_than(db: Database, hours: int) -> int:
    """Housekeeping: drop keys past their retention (kept at least 24 h)."""

    cutoff = utcnow() - dt.timedelta(hours=max(24, hours))
    async with db.transaction() as session:
        result = await session.execute(
            sa.delete(idempotency_table).where(idempotency_table.c.created_at < cutoff)
        )
    return int(getattr(result, "rowcount", 0) or 0)
