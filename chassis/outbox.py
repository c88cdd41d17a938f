"""The transactional outbox.

A service writes the events of a state change into the ``outbox`` table in
the same transaction as the change (``enqueue``). The relay publishes unsent
rows to JetStream with the event id as ``Nats-Msg-Id``, waits for the ack and
only then marks them sent: if NATS is down the rows wait, and a row published
but not yet marked (a crash between the two) is dropped by JetStream's
duplicate window or, later, by the consumers' inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, cast

import sqlalchemy as sa
from google.protobuf.message import Message
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bulk import insert_rows
from chassis.bus import Bus, cloudevent_headers
from chassis.db import Database, outbox_table, utcnow
from chassis.direct import (
    Direct,
    Executor,
    Insert,
    Unit,
    dialect_name,
    waiting_inserts,
    written_together,
)
from chassis.logs import get_logger
from chassis.telemetry import current_traceparent, extract_trace_context, inject_trace_headers
from chassis.wakeup import COMMIT_LINGER_SECONDS, Wakeup

log = get_logger(__name__)
_tracer = trace.get_tracer(__name__)

# Marks a session whose transaction wrote outbox rows, so the relay can be
# woken right after the commit instead of waiting for its next poll.
OUTBOX_WRITTEN = "cornucopia.outbox_written"


def event_type(message: Message) -> str:
    """The CloudEvents type of a payload: its full protobuf name."""
    return message.DESCRIPTOR.full_name


# Built once: building a statement and its cache key on every call costs
# more than executing it.
_INSERT = Insert(outbox_table)
# A batch is marked row by row, by key, in one round trip (``execute_many``).
# Not ``seq = ANY(:seqs)``: PostgreSQL's generic plan for that, made while
# the table is small and has no statistics yet (a new deployment), is a
# sequential scan, and the prepared statement keeps it as the table grows
# until it is analysed; a key's equality is found through the primary key.
_MARK_SENT = Direct(
    sa.update(outbox_table)
    .where(outbox_table.c.seq == sa.bindparam("sent_seq"))
    .values(
        sent_at=sa.bindparam("sent_now"),
        attempts=outbox_table.c.attempts + 1,
        # A row carries a lease only while a relay is publishing it.
        lease_until=sa.null(),
    )
)
_MARK_FAILED = (
    sa.update(outbox_table)
    .where(outbox_table.c.seq == sa.bindparam("failed_seq"))
    .values(
        attempts=outbox_table.c.attempts + 1,
        last_error=sa.bindparam("error"),
        lease_until=sa.null(),
    )
)
# The rows of a batch left unpublished after a failed publish, given back
# for the next pass.
_RELEASE = Direct(
    sa.update(outbox_table)
    .where(outbox_table.c.seq == sa.bindparam("released_seq"))
    .values(lease_until=sa.null())
)
# How long a relay's claim on the rows it publishes lasts: past it (the
# relay died mid-batch), another pass takes them, and JetStream's duplicate
# window or the consumers' inbox drops what had gone out.
LEASE = dt.timedelta(seconds=30)


def new_event_id() -> str:
    return str(uuid.uuid4())


async def enqueue(
    session: Executor,
    *,
    source: str,
    subject: str,
    message: Message,
    event_id: str | None = None,
) -> str:
    """Write one event into the outbox inside the caller's transaction and
    return its id. The current trace context is kept with the row so the
    publish, which happens later and elsewhere, joins the same trace.
    Inside ``together``, the row is written with the block's others."""
    row = _row(source, subject, message, event_id or new_event_id(), utcnow())
    row["headers"].update(current_traceparent())
    await _INSERT.add(session, [row])
    session.info[OUTBOX_WRITTEN] = True
    return str(row["event_id"])


def _row(
    source: str, subject: str, message: Message, event_id: str, now: dt.datetime
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "subject": subject,
        "event_type": event_type(message),
        "payload": message.SerializeToString(),
        "headers": cloudevent_headers(
            event_id=event_id,
            event_type=event_type(message),
            source=source,
            time=now,
            subject=subject,
        ),
        "created_at": now,
    }


def together(session: Executor) -> contextlib.AbstractAsyncContextManager[None]:
    """The events enqueued inside the block are written when it ends, in
    their order, with the block's other waiting inserts
    (``chassis.direct.written_together``): one round trip for them all
    instead of one each. The block is part of the caller's transaction:
    if it raises, nothing is written, as the transaction will not commit.
    No savepoint may be opened inside it."""
    return written_together(session)


def outbox_rows(*, source: str, events: Sequence[tuple[str, Message]]) -> list[dict[str, Any]]:
    """The outbox rows ``enqueue`` writes for these events (subject,
    payload), built without a session: a bulk writer may build them ahead
    of its transaction and insert them with ``enqueue_rows``."""
    now = utcnow()
    trace_headers = current_traceparent()
    rows: list[dict[str, Any]] = []
    for subject, message in events:
        row = _row(source, subject, message, new_event_id(), now)
        row["headers"].update(trace_headers)
        rows.append(row)
    return rows


# From this many rows on, COPY (two round trips and a type lookup) beats
# the insert statement sent once a row in one round trip.
COPY_FROM_ROWS = 64


async def enqueue_rows(session: Executor, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``outbox_rows`` inside the caller's transaction, in one round
    trip (inside ``together``, with the block's others)."""
    if not rows:
        return
    if (
        waiting_inserts(session) is not None
        or len(rows) < COPY_FROM_ROWS
        or isinstance(session, Unit)
    ):
        await _INSERT.add(session, rows)
    else:
        await insert_rows(session, outbox_table, rows)
    session.info[OUTBOX_WRITTEN] = True


async def enqueue_many(
    session: Executor, *, source: str, events: Sequence[tuple[str, Message]]
) -> list[str]:
    """``enqueue`` for many events (subject, payload) in one round trip:
    the same rows, headers and trace context as one call each."""
    rows = outbox_rows(source=source, events=events)
    await enqueue_rows(session, rows)
    return [row["event_id"] for row in rows]


class ChangeWithEvent:
    """A conditional change (an UPDATE of one row, say a claimed message
    marked sent) and the event that announces it, written together and
    only when the change matched. On PostgreSQL, one statement: the
    change is a data-modifying ``WITH`` and the event's outbox row is
    inserted from what it returns; so in ``Database.single_statement``
    the pair is one round trip instead of four. Elsewhere (or inside
    ``together``), the change and then, when it matched, ``enqueue``.
    Build it once, like the statement."""

    def __init__(self, change: sa.Update) -> None:
        self._change = Direct(change)
        table = cast(sa.Table, change.table)
        changed = change.returning(*table.primary_key.columns).cte("changed")
        values = {
            name: sa.bindparam(f"event_{name}", type_=outbox_table.c[name].type)
            for name in _ROW_COLUMNS
        }
        self._together = Direct(
            sa.insert(outbox_table)
            .from_select(list(values), sa.select(*values.values()).select_from(changed))
            .returning(outbox_table.c.event_id)
            .add_cte(changed)
        )

    async def execute(
        self,
        session: Executor,
        params: dict[str, Any],
        *,
        source: str,
        subject: str,
        message: Message,
    ) -> bool:
        """The change with ``params``; when it changed a row, the event
        (``enqueue``'s row). Whether it changed one."""
        if dialect_name(session) != "postgresql" or waiting_inserts(session) is not None:
            if (await self._change.execute(session, params)).rowcount != 1:
                return False
            await enqueue(session, source=source, subject=subject, message=message)
            return True
        row = _row(source, subject, message, new_event_id(), utcnow())
        row["headers"].update(current_traceparent())
        event = {f"event_{name}": row[name] for name in _ROW_COLUMNS}
        written = await self._together.execute(session, {**params, **event})
        if written.first() is None:
            return False
        session.info[OUTBOX_WRITTEN] = True
        return True


# The columns ``_row`` fills (the others take the table's defaults).
_ROW_COLUMNS = ("event_id", "subject", "event_type", "payload", "headers", "created_at")


class OutboxRelay:
    """Publishes unsent outbox rows, oldest first."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        batch_size: int = 100,
        poll_interval: float = 0.5,
        retry_delay: float = 1.0,
        linger: float = COMMIT_LINGER_SECONDS,
    ) -> None:
        self.db = db
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retry_delay = retry_delay
        self._wakeup = Wakeup(db, OUTBOX_WRITTEN, linger=linger)
        self._stopping = False
        c = outbox_table.c
        unclaimed = (
            sa.select(c.seq)
            .where(
                c.sent_at.is_(None),
                sa.or_(c.lease_until.is_(None), c.lease_until <= sa.bindparam("claim_now")),
            )
            .order_by(c.seq)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        )
        self._claim = Direct(
            sa.update(outbox_table)
            .where(c.seq.in_(unclaimed.scalar_subquery()))
            .values(lease_until=sa.bindparam("claim_until"))
            .returning(c.seq, c.event_id, c.subject, c.payload, c.headers)
        )

    def wake(self) -> None:
        self._wakeup.ring()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.ring()

    async def run(self) -> None:
        while not self._stopping:
            try:
                sent, failed = await self.publish_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay pass failed")
                sent, failed = 0, True
            if failed:
                await self._wakeup.wait(self.retry_delay)
            elif sent < self.batch_size:
                await self._wakeup.wait(self.poll_interval)

    async def publish_pending(self) -> tuple[int, bool]:
        """One pass: publish up to a batch. Returns (published, failed)."""
        if self.db.dialect == "postgresql":
            return await self._publish_locked()
        return await self._publish_single_writer()

    def _unsent(self) -> sa.Select[Any]:
        return (
            sa.select(outbox_table)
            .where(outbox_table.c.sent_at.is_(None))
            .order_by(outbox_table.c.seq)
            .limit(self.batch_size)
        )

    async def _publish_locked(self) -> tuple[int, bool]:
        # Replicas share the work: each claims, in one statement, rows no
        # one else has claimed, for a lease. No transaction stays open while
        # the batch is published (a publish can wait seconds in an outage),
        # and a pass is two round trips: the claim and the mark.
        now = utcnow()
        async with self.db.single_statement() as session:
            claimed = await self._claim.execute(
                session, {"claim_now": now, "claim_until": now + LEASE}
            )
        if not claimed:
            return 0, False
        rows = sorted(claimed, key=lambda row: row.seq)  # RETURNING keeps no order
        sent, failure = await self._publish_rows(rows)
        if failure is None:
            async with self.db.single_statement() as session:
                await _MARK_SENT.execute_many(
                    session, [{"sent_seq": seq, "sent_now": utcnow()} for seq in sent]
                )
            return len(sent), False
        async with self.db.transaction() as session:
            await self._mark(session, sent, failure)
            await _RELEASE.execute_many(
                session, [{"released_seq": row.seq} for row in rows if row.seq > failure[0]]
            )
        return len(sent), True

    async def _publish_single_writer(self) -> tuple[int, bool]:
        # SQLite: one process owns the file, so no claim is needed, and the
        # write lock is taken only for the short update, never while waiting
        # on NATS (a publish can wait seconds during an outage).
        async with self.db.sessions() as session:
            rows = (await session.execute(self._unsent())).all()
        if not rows:
            return 0, False
        sent, failure = await self._publish_rows(rows)
        async with self.db.transaction() as session:
            await self._mark(session, sent, failure)
        return len(sent), failure is not None

    async def _publish_rows(self, rows: Sequence[Any]) -> tuple[list[int], tuple[int, str] | None]:
        """Publish a batch with its publishes in flight together (one round
        trip to JetStream per batch, not per row), sent in order. Rows are
        marked up to the first failure; a later row that was stored anyway
        is published again on the next pass and JetStream drops it as a
        duplicate (same ``Nats-Msg-Id``). Returns the published seqs and the
        failed (seq, error), if any."""
        publishes = [asyncio.ensure_future(self._publish_row(row)) for row in rows]
        outcomes = await asyncio.gather(*publishes, return_exceptions=True)
        sent: list[int] = []
        for row, outcome in zip(rows, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                log.warning(
                    "outbox publish failed; will retry",
                    event_id=row.event_id,
                    subject=row.subject,
                    error=type(outcome).__name__,
                )
                return sent, (row.seq, f"{type(outcome).__name__}: {outcome}"[:500])
            sent.append(row.seq)
        return sent, None

    async def _mark(
        self, session: AsyncSession, sent: list[int], failure: tuple[int, str] | None
    ) -> None:
        now = utcnow()
        await _MARK_SENT.execute_many(session, [{"sent_seq": seq, "sent_now": now} for seq in sent])
        if failure is not None:
            seq, error = failure
            await session.execute(_MARK_FAILED, {"failed_seq": seq, "error": error})

    async def _publish_row(self, row: Any) -> None:
        stored: dict[str, str] = dict(row.headers)
        parent = extract_trace_context(stored)
        with _tracer.start_as_current_span(
            f"{row.subject} publish",
            context=parent,
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": row.subject,
                "messaging.message.id": row.event_id,
                "messaging.operation.type": "publish",
            },
        ):
            headers = {k: v for k, v in stored.items() if k not in ("traceparent", "tracestate")}
            inject_trace_headers(headers)
            await self.bus.publish(row.subject, row.payload, headers)

    async def pending_count(self) -> int:
        async with self.db.sessions() as session:
            result = await session.execute(
                sa.select(sa.func.count()).where(outbox_table.c.sent_at.is_(None))
            )
            return int(result.scalar_one())
