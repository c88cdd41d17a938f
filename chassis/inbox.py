"""Consumers: durable JetStream pull consumers with explicit ack, and the
inbox that makes a redelivery change nothing.

For each message the consumer opens one transaction, records the event id in
``inbox`` and applies the handler's effect; a message whose id is already
there is acknowledged without running the handler again. A handler that
fails is ``nak``ed with a growing delay; after ``max_deliver`` attempts the
message is copied to ``deadletter.<consumer>.<subject>`` and terminated. A
message is never acknowledged when its handling failed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import sqlalchemy as sa
from google.protobuf.message import DecodeError, Message
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bus import Bus, StreamSpec, header_map
from chassis.db import Database, inbox_table, outbox_table, utcnow
from chassis.direct import Direct
from chassis.logs import get_logger, redact_text
from chassis.telemetry import extract_trace_context

log = get_logger(__name__)
_tracer = trace.get_tracer(__name__)


@dataclass(frozen=True)
class Envelope:
    """What a handler knows about the event besides its payload."""

    event_id: str
    subject: str
    event_type: str
    source: str
    time: str
    delivery: int


Handler = Callable[[AsyncSession, Any, Envelope], Awaitable[None]]


@dataclass(frozen=True)
class Subscription:
    """One durable consumer of a service: which stream, which subjects, and a
    handler per event type."""

    name: str
    stream: StreamSpec
    subjects: Sequence[str]
    handlers: Mapping[type[Message], Handler]
    max_deliver: int = 5
    # Delay before the n-th redelivery (the last value repeats).
    backoff_seconds: Sequence[float] = field(default=(1.0, 5.0, 30.0, 120.0))
    ack_wait_seconds: float = 30.0


class PoisonMessage(Exception):
    """A message no number of retries can handle (undecodable payload)."""


def dead_letter_subject(consumer: str, subject: str) -> str:
    return f"deadletter.{consumer}.{subject}"


# The inbox row of a handled event, built once per dialect (not per event).
_RECORD = {
    dialect: Direct(
        insert(inbox_table)
        .values(
            {
                name: sa.bindparam(name)
                for name in ("consumer", "event_id", "subject", "processed_at")
            }
        )
        .on_conflict_do_nothing()
    )
    for dialect, insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}


class Consumer:
    def __init__(
        self,
        subscription: Subscription,
        *,
        service: str,
        db: Database,
        bus: Bus,
        batch_size: int = 20,
    ) -> None:
        self.sub = subscription
        self.service = service
        self.durable = f"{service}-{subscription.name}"
        self.db = db
        self.bus = bus
        self.batch_size = batch_size
        self._types = {
            cls.DESCRIPTOR.full_name: (cls, h) for cls, h in subscription.handlers.items()
        }
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    async def ensure(self) -> None:
        await self.bus.ensure_stream(self.sub.stream)
        await self.bus.js.add_consumer(
            self.sub.stream.name,
            ConsumerConfig(
                durable_name=self.durable,
                filter_subjects=list(self.sub.subjects),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.sub.ack_wait_seconds,
                # We count deliveries ourselves and dead-letter at our limit;
                # JetStream must never drop a message silently.
                max_deliver=-1,
                max_ack_pending=1000,
            ),
        )

    async def run(self) -> None:
        await self.ensure()
        psub = await self.bus.js.pull_subscribe_bind(
            durable=self.durable, stream=self.sub.stream.name
        )
        while not self._stopping:
            try:
                messages = await psub.fetch(self.batch_size, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("fetch failed; retrying", consumer=self.durable, error=type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                await self.handle(msg)

    async def handle(self, msg: Any) -> None:
        headers = header_map(msg)
        meta = msg.metadata
        envelope = Envelope(
            event_id=headers.get("ce-id") or headers.get("Nats-Msg-Id", ""),
            subject=msg.subject,
            event_type=headers.get("ce-type", ""),
            source=headers.get("ce-source", ""),
            time=headers.get("ce-time", ""),
            delivery=int(meta.num_delivered),
        )
        with _tracer.start_as_current_span(
            f"{msg.subject} process",
            context=extract_trace_context(headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.message.id": envelope.event_id,
                "messaging.consumer.group.name": self.durable,
                "messaging.operation.type": "process",
                "cornucopia.service": self.service,
            },
        ) as span:
            try:
                await self._apply(msg, envelope)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                await self._failed(msg, envelope, exc)
                return
            await self._ack(msg)

    async def _apply(self, msg: Any, envelope: Envelope) -> None:
        if not envelope.event_id:
            raise PoisonMessage("the message has no event id")
        known = self._types.get(envelope.event_type)
        if known is None:
            # Not an event this consumer acts on (a newer type on a subject
            # it filters); acknowledging is right, there is nothing to do.
            log.info("event type not handled", consumer=self.durable, type=envelope.event_type)
            return
        cls, handler = known
        try:
            event = cls.FromString(msg.data)
        except DecodeError as exc:
            raise PoisonMessage(f"cannot decode {envelope.event_type}") from exc
        async with self.db.transaction() as session:
            if not await self._record(session, envelope):
                log.info(
                    "duplicate event ignored", consumer=self.durable, event_id=envelope.event_id
                )
                return
            await handler(session, event, envelope)

    async def _record(self, session: AsyncSession, envelope: Envelope) -> bool:
        result = await _RECORD[self.db.dialect].execute(
            session,
            {
                "consumer": self.durable,
                "event_id": envelope.event_id,
                "subject": envelope.subject,
                "processed_at": utcnow(),
            },
        )
        return result.rowcount == 1

    async def _ack(self, msg: Any) -> None:
        try:
            await msg.ack()
        except Exception as exc:
            log.warning("ack failed; the redelivery will be ignored", error=type(exc).__name__)

    async def _failed(self, msg: Any, envelope: Envelope, exc: Exception) -> None:
        poison = isinstance(exc, PoisonMessage)
        if poison or envelope.delivery >= self.sub.max_deliver:
            log.error(
                "event dead-lettered",
                consumer=self.durable,
                event_id=envelope.event_id,
                subject=envelope.subject,
                deliveries=envelope.delivery,
                error=type(exc).__name__,
                exc_info=not poison,
            )
            try:
                await self._dead_letter(msg, envelope, exc)
            except Exception as dl_exc:
                # Could not park it: leave it for redelivery rather than lose it.
                log.warning("dead-letter publish failed", error=type(dl_exc).__name__)
                await self._nak(msg, self.sub.backoff_seconds[-1])
                return
            await msg.term()
            return
        delays = self.sub.backoff_seconds
        delay = delays[min(envelope.delivery, len(delays)) - 1]
        log.warning(
            "event handling failed; will retry",
            consumer=self.durable,
            event_id=envelope.event_id,
            delivery=envelope.delivery,
            retry_in=delay,
            error=type(exc).__name__,
            exc_info=True,
        )
        await self._nak(msg, delay)

    async def _nak(self, msg: Any, delay: float) -> None:
        try:
            await msg.nak(delay=delay)
        except Exception as exc:
            log.warning("nak failed", error=type(exc).__name__)

    async def _dead_letter(self, msg: Any, envelope: Envelope, exc: Exception) -> None:
        headers = header_map(msg)
        headers.update(
            {
                "Nats-Msg-Id": f"{envelope.event_id}:{self.durable}:dead",
                "Cornucopia-Original-Subject": msg.subject,
                "Cornucopia-Consumer": self.durable,
                "Cornucopia-Deliveries": str(envelope.delivery),
                "Cornucopia-Error": redact_text(f"{type(exc).__name__}: {exc}")[:300],
            }
        )
        await self.bus.publish(dead_letter_subject(self.durable, msg.subject), msg.data, headers)


async def inbox_contains(db: Database, consumer: str, event_id: str) -> bool:
    async with db.sessions() as session:
        row = await session.execute(
            sa.select(inbox_table.c.event_id).where(
                inbox_table.c.consumer == consumer, inbox_table.c.event_id == event_id
            )
        )
        return row.first() is not None


async def forget_messaging_older_than(
    db: Database, hours: int, *, sent_outbox_hours: int | None = None
) -> tuple[int, int]:
    """Housekeeping: drop consumed event ids older than ``hours`` and sent
    outbox rows older than ``sent_outbox_hours`` (default: ``hours``).
    Event ids must be kept at least as long as dead letters are (a replay
    reaches every consumer of the subject; see ``Settings.check_retention``);
    sent outbox rows are only history. Returns the rows dropped from each."""
    now = utcnow()
    inbox_cutoff = now - dt.timedelta(hours=max(24, hours))
    outbox_cutoff = now - dt.timedelta(
        hours=max(24, hours if sent_outbox_hours is None else sent_outbox_hours)
    )
    async with db.transaction() as session:
        inbox = await session.execute(
            sa.delete(inbox_table).where(inbox_table.c.processed_at < inbox_cutoff)
        )
        outbox = await session.execute(
            sa.delete(outbox_table).where(
                outbox_table.c.sent_at.is_not(None), outbox_table.c.sent_at < outbox_cutoff
            )
        )
    return int(getattr(inbox, "rowcount", 0) or 0), int(getattr(outbox, "rowcount", 0) or 0)
