"""Consumers: durable JetStream pull consumers with explicit ack, and the
inbox that makes a redelivery change nothing.

For each message the consumer records the event id in ``inbox`` and applies
the handler's effect in one transaction; a message whose id is already there
is acknowledged without running the handler again. The messages of one fetch
share a transaction (see ``Consumer.handle_batch``). A handler that
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
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bus import Bus, StreamSpec, header_map
from chassis.db import Database, inbox_table, outbox_table, utcnow
from chassis.direct import DialectInsert, Executor
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
# A handler that runs ``chassis.direct`` statements alone (``DirectSubscription``).
DirectHandler = Callable[[Executor, Any, Envelope], Awaitable[None]]


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


@dataclass(frozen=True)
class DirectSubscription(Subscription):
    """A subscription whose handlers run ``chassis.direct`` statements
    alone: on PostgreSQL its events are applied, with their inbox rows, in
    a ``chassis.direct.Unit`` (``Database.direct_transaction``) instead of
    a session's unit of work. For the consumers every sale keeps busy."""

    handlers: Mapping[type[Message], DirectHandler]


class PoisonMessage(Exception):
    """A message no number of retries can handle (undecodable payload)."""


def dead_letter_subject(consumer: str, subject: str) -> str:
    return f"deadletter.{consumer}.{subject}"


def _envelope(msg: Any) -> Envelope:
    headers = header_map(msg)
    return Envelope(
        event_id=headers.get("ce-id") or headers.get("Nats-Msg-Id", ""),
        subject=msg.subject,
        event_type=headers.get("ce-type", ""),
        source=headers.get("ce-source", ""),
        time=headers.get("ce-time", ""),
        delivery=int(msg.metadata.num_delivered),
    )


@dataclass(frozen=True)
class _Decoded:
    """A delivery ready for its handler."""

    msg: Any
    envelope: Envelope
    # A Handler, or a DirectHandler for a DirectSubscription's unit.
    handler: Callable[[Any, Any, Envelope], Awaitable[None]]
    event: Message


# The inbox row of a handled event, built once per dialect (not per event).
_RECORD = DialectInsert(lambda insert: insert(inbox_table).on_conflict_do_nothing())


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
        self._unit = (
            db.direct_transaction
            if isinstance(subscription, DirectSubscription)
            else db.transaction
        )

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
            await self.handle_batch(messages)

    async def handle_batch(self, messages: Sequence[Any]) -> None:
        """A fetched batch, its events applied in one transaction and then
        acknowledged: one BEGIN and COMMIT for all of them. A consumer that
        keeps up fetches one event at a time; one that falls behind fetches
        what waits, so the saving grows with the load. When any handler of
        the batch fails, nothing of the batch is kept and each event is
        handled again on its own, so that only the failing one is retried or
        dead-lettered. Events that are not this consumer's, or cannot be
        decoded, are settled on their own first."""
        together: list[_Decoded] = []
        for msg in messages:
            envelope = _envelope(msg)
            try:
                decoded = self._decode(msg, envelope)
            except PoisonMessage:
                decoded = None
            if decoded is None:
                await self.handle(msg, envelope)
            else:
                together.append(decoded)
        if len(together) == 1:
            await self.handle(together[0].msg, together[0].envelope)
        elif together:
            try:
                await self._apply_together(together)
            except Exception as exc:
                log.info(
                    "a batch failed; its events are handled one by one",
                    consumer=self.durable,
                    events=len(together),
                    error=type(exc).__name__,
                )
                for one in together:
                    await self.handle(one.msg, one.envelope)
                return
            for one in together:
                await self._ack(one.msg)

    async def handle(self, msg: Any, envelope: Envelope | None = None) -> None:
        """One event in a transaction of its own."""
        envelope = envelope or _envelope(msg)
        with trace.use_span(self._span(msg, envelope), end_on_exit=True) as span:
            try:
                decoded = self._decode(msg, envelope)
                if decoded is None:
                    log.info(
                        "event type not handled", consumer=self.durable, type=envelope.event_type
                    )
                else:
                    async with self._unit() as session:
                        await self._apply(session, decoded)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                await self._failed(msg, envelope, exc)
                return
            await self._ack(msg)

    async def _apply_together(self, batch: Sequence[_Decoded]) -> None:
        # Each event keeps a span of its own, parented by its producer's
        # trace; all of them end once the batch is committed or given up.
        spans: list[trace.Span] = []
        try:
            async with self._unit() as session:
                for one in batch:
                    span = self._span(one.msg, one.envelope, batch=len(batch))
                    spans.append(span)
                    with trace.use_span(span):
                        await self._apply(session, one)
        except BaseException:
            for span in spans:
                span.add_event("rolled back with its batch")
            raise
        finally:
            for span in spans:
                span.end()

    def _span(self, msg: Any, envelope: Envelope, batch: int = 1) -> trace.Span:
        attributes: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.destination.name": msg.subject,
            "messaging.message.id": envelope.event_id,
            "messaging.consumer.group.name": self.durable,
            "messaging.operation.type": "process",
            "cornucopia.service": self.service,
        }
        if batch > 1:
            attributes["messaging.batch.message_count"] = batch
        return _tracer.start_span(
            f"{msg.subject} process",
            context=extract_trace_context(header_map(msg)),
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        )

    def _decode(self, msg: Any, envelope: Envelope) -> _Decoded | None:
        """The event and its handler; None when the type is not this
        consumer's. Raises PoisonMessage for what no retry can handle."""
        if not envelope.event_id:
            raise PoisonMessage("the message has no event id")
        known = self._types.get(envelope.event_type)
        if known is None:
            # Not an event this consumer acts on (a newer type on a subject
            # it filters); acknowledging is right, there is nothing to do.
            return None
        cls, handler = known
        try:
            event = cls.FromString(msg.data)
        except DecodeError as exc:
            raise PoisonMessage(f"cannot decode {envelope.event_type}") from exc
        return _Decoded(msg, envelope, handler, event)

    async def _apply(self, session: Executor, decoded: _Decoded) -> None:
        if not await self._record(session, decoded.envelope):
            log.info(
                "duplicate event ignored",
                consumer=self.durable,
                event_id=decoded.envelope.event_id,
            )
            return
        await decoded.handler(session, decoded.event, decoded.envelope)

    async def _record(self, session: Executor, envelope: Envelope) -> bool:
        result = await _RECORD.execute(
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
