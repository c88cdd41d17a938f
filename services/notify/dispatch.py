"""The dispatcher sends queued messages through their channel and records
what became of each, with its event in the same transaction:

- sent: SENT with the provider's id (``notify.v1.message.sent``);
- refused for good (``PermanentChannelError``): FAILED at once with the
  provider's reason (``notify.v1.message.failed``), a dead letter;
- failed otherwise (provider down, timeout, members unreachable): tried
  again after an exponential backoff with full jitter (``next_attempt_at``),
  not before the provider's Retry-After; after the last allowed attempt,
  FAILED with the last error;
- quiet hours begun while it waited (marketing SMS at night): given back
  unsent, not before the end of the quiet hours.

A provider outage therefore delays messages and loses none: each waits
out its backoff until the provider answers again, or becomes a dead letter
an operator can replay.

Replicas share the queue: each pass first claims a batch (a token and a
lease written on the rows in one short transaction, see
``store.claim_queued``), then sends only what it holds, and records each
result only while it still holds it. A send is started only if it can end
(``send_timeout``) well before the lease runs out, so a message is never
sent by two replicas at once; the rest of the batch is given back. A pass
that dies keeps its messages until the lease expires; then another takes
them. Up to ``concurrency`` sends of a pass run at once; each channel's
sends are spaced by its rate limit, kept in the database and so shared by
every replica (``RateLimiter``).

At least once towards the channel: a crash after the send and before the
mark sends again once the lease has expired (providers deduplicate by
our message id, sent as their reference); exactly once in the message
history and the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, utcnow
from chassis.logs import get_logger, redact_text
from chassis.telemetry import extract_trace_context
from chassis.wakeup import COMMIT_LINGER_SECONDS, Wakeup
from services.notify import events, store
from services.notify.channels import Channel, ChannelError, Needs, PermanentChannelError, Sent
from services.notify.contacts import ContactsUnavailable, Directory
from services.notify.domain import Channel as ChannelName
from services.notify.domain.delivery import RetryPolicy, SendPace, next_attempt_at, pace_wait
from services.notify.domain.policy import NotifyPolicy, quiet_hours_release
from services.notify.store.pace import reserve_send
from services.notify.store.policy import load_policy

log = get_logger(__name__)
_tracer = trace.get_tracer(__name__)

# Room left between the end of the last send a pass may start and the end of
# its lease, for clock differences between replicas (leases are compared with
# each replica's own clock).
CLOCK_MARGIN_SECONDS = 30.0

PolicyLoader = Callable[[AsyncSession], Awaitable[NotifyPolicy]]


class RateLimiter:
    """A channel's rate limit, held across all replicas: ``await acquire()``
    reserves the next slot in the database (GCRA, see
    ``domain.delivery.SendPace`` and ``store.pace``) and returns when the
    send may start. One short transaction of one statement per send, apart
    from the send's own.

    Replicas read their own wall clock (``time.time``): the nodes are assumed
    NTP-synchronised, and a skew of a few milliseconds only shifts the pace
    by as much (a replica whose clock is ahead waits a little less after an
    idle spell, one behind a little more)."""

    def __init__(
        self,
        db: Database,
        channel: ChannelName | str,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.channel = str(channel)
        self.pace = SendPace(rate, burst)
        self.clock = clock

    async def acquire(self) -> float:
        """Wait for the next slot; returns the time (``clock``) the send was
        allowed to start at. A database error propagates: nothing reserved,
        or a slot reserved that no send uses, which only slows the pace."""
        async with self.db.single_statement() as session:
            # Read the clock as late as possible: a reservation made with an
            # older ``now`` lets the send start later than its slot.
            now = self.clock()
            tat = await reserve_send(session, self.channel, now=now, interval=self.pace.interval)
        start = now + pace_wait(tat, now, self.pace)
        # Measured again after the commit, so that its latency is not waited twice.
        wait = pace_wait(tat, self.clock(), self.pace)
        if wait > 0:
            await asyncio.sleep(wait)
        return start


class Dispatcher:
    def __init__(
        self,
        db: Database,
        channels: Mapping[ChannelName, Channel],
        *,
        contacts: Directory | None = None,
        retry: RetryPolicy | None = None,
        limits: Mapping[ChannelName, RateLimiter] | None = None,
        policy: PolicyLoader = load_policy,
        clock: Callable[[], dt.datetime] = utcnow,
        uniform: Callable[[], float] = random.random,
        concurrency: int = 1,
        batch_size: int = 50,
        poll_interval: float = 1.0,
        lease_seconds: float = 300.0,
        send_timeout: float = 30.0,
    ) -> None:
        if lease_seconds <= send_timeout + CLOCK_MARGIN_SECONDS:
            raise ValueError("the lease must outlast a send by more than the clock margin")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.db = db
        self.channels = channels
        self.contacts = contacts
        self.retry = retry or RetryPolicy()
        self.limits = dict(limits or {})
        self.policy = policy
        self.clock = clock
        self.uniform = uniform
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.send_timeout = send_timeout
        self._wakeup = Wakeup(db, store.MESSAGES_QUEUED, linger=COMMIT_LINGER_SECONDS)

    async def run(self) -> None:
        while True:
            try:
                handled = await self.dispatch_queued()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatch pass failed")
                handled = 0
            if handled < self.batch_size:
                await self._wakeup.wait(self.poll_interval)

    async def dispatch_queued(self) -> int:
        """One pass: claim a batch, send it, give back what was not started.
        Returns how many messages were claimed."""
        token = uuid.uuid4().hex
        started = time.monotonic()
        # On PostgreSQL the claim is one statement, a unit of work by itself.
        async with self.db.single_statement() as session:
            batch = await store.claim_queued(
                session,
                limit=self.batch_size,
                token=token,
                now=self.clock(),
                lease=dt.timedelta(seconds=self.lease_seconds),
                skip_locked=self.db.dialect == "postgresql",
            )
        if not batch:
            return 0
        async with self.db.sessions() as session:
            policy = await self.policy(session)
        # The last moment a send may start and still end inside the lease.
        last_start = started + self.lease_seconds - self.send_timeout - CLOCK_MARGIN_SECONDS
        waiting = list(batch)
        pending = {message.message_id for message in batch}
        failures: list[Exception] = []

        async def worker() -> None:
            while waiting and not failures:
                message = waiting.pop(0)
                limiter = self.limits.get(message.channel)
                if limiter is not None:
                    try:
                        await limiter.acquire()
                    except Exception as exc:
                        # The rate limit could not be reserved (the database
                        # is unreachable, say). Sending anyway could overrun
                        # the provider; so the message is not started: it
                        # goes back with the rest of the batch, no attempt
                        # counted, and the pass fails like any pass that
                        # meets a database error, to be tried again after
                        # the poll interval. Nothing is lost (a message that
                        # cannot even be given back waits for its lease to
                        # expire) and nothing is sent twice (it was never
                        # sent). Sends already under way end as usual.
                        waiting.insert(0, message)
                        failures.append(exc)
                        return
                if time.monotonic() > last_start:
                    waiting.insert(0, message)
                    return
                pending.discard(message.message_id)
                await self._deliver_safely(message, token, policy)

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(batch)))))
        except asyncio.CancelledError:
            # Stopping: let another replica have what this one never started.
            with contextlib.suppress(Exception):
                await self._release(token, list(pending))
            raise
        if failures:
            await self._release(token, list(pending))
            raise failures[0]
        if pending:
            log.info("lease running out; giving back the rest", count=len(pending))
        await self._release(token, list(pending))
        return len(batch)

    async def _release(self, token: str, message_ids: list[str]) -> None:
        if message_ids:
            async with self.db.single_statement() as session:
                await store.release_claims(session, token, message_ids)

    async def _deliver_safely(
        self, message: store.MessageRecord, token: str, policy: NotifyPolicy
    ) -> None:
        """One message; whatever goes wrong with it (the database between
        two statements, say) stays with it: the pass goes on, and the
        message comes back when its claim expires."""
        try:
            await self._deliver(message, token, policy)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivering a message failed", message_id=message.message_id)

    async def _deliver(
        self, message: store.MessageRecord, token: str, policy: NotifyPolicy
    ) -> None:
        now = self.clock()
        release = quiet_hours_release(
            policy.quiet_hours, message.category, message.channel, now, message.time_zone
        )
        if release is not None:
            async with self.db.transaction() as session:
                await store.postpone(session, message.message_id, token, release)
            log.info("quiet hours: held back", message_id=message.message_id, until=release)
            return
        with _tracer.start_as_current_span(
            f"notify send {message.template}",
            context=extract_trace_context(message.trace_headers),
            attributes={
                "cornucopia.service": "notify",
                "cornucopia.message_id": message.message_id,
                "cornucopia.channel": message.channel.value,
            },
        ) as span:
            try:
                sent = await self._send(message)
            except PermanentChannelError as exc:
                span.set_status(trace.StatusCode.ERROR)
                span.set_attribute("cornucopia.outcome", "failed")
                await self._fail(message, token, exc.reason)
                return
            except Exception as exc:
                span.set_status(trace.StatusCode.ERROR)
                span.set_attribute("cornucopia.outcome", "retry")
                retry_after = exc.retry_after if isinstance(exc, ChannelError) else None
                await self._retry(message, token, exc, retry_after)
                return
            span.set_attribute("cornucopia.provider", sent.provider)
            span.set_attribute("cornucopia.outcome", "sent")
            sent_at = self.clock()
            # The mark and its event: one statement on PostgreSQL.
            async with self.db.single_statement() as session:
                marked = await store.mark_sent_announced(
                    session,
                    message.message_id,
                    sent_at,
                    token,
                    provider=sent.provider,
                    provider_message_id=sent.provider_message_id,
                    event=events.message_sent(
                        message, sent_at, sent.provider, sent.provider_message_id
                    ),
                )
            if not marked:
                # The lease ran out and another pass took the message over:
                # it records the send, not this one.
                log.warning("claim lost before the mark", message_id=message.message_id)

    async def _send(self, message: store.MessageRecord) -> Sent:
        channel = self.channels.get(message.channel)
        if channel is None:
            raise ChannelError(f"no {message.channel.value} channel configured")
        address = await self._address(message, channel.needs)
        async with asyncio.timeout(self.send_timeout):
            return await channel.send(message, address)

    async def _address(self, message: store.MessageRecord, needs: Needs) -> str:
        """The address the channel needs, asked of members now; never
        stored, never logged."""
        if needs is Needs.NOTHING:
            return ""
        if message.member_id is None:
            raise PermanentChannelError(
                f"staff are reached in the staff app, not by {message.channel.value}"
            )
        if self.contacts is None:
            raise ChannelError("no members directory to look addresses up in")
        try:
            contact = await self.contacts.contact(message.member_id)
        except ContactsUnavailable as exc:
            raise ChannelError(f"members did not answer: {exc}") from None
        if contact is None:
            raise PermanentChannelError("the member is not on file any more")
        address = contact.mobile if needs is Needs.MOBILE else contact.email
        if not address:
            what = "mobile number" if needs is Needs.MOBILE else "e-mail address"
            raise PermanentChannelError(f"no {what} on file")
        return address

    async def _fail(self, message: store.MessageRecord, token: str, reason: str) -> None:
        async with self.db.transaction() as session:
            failed = await store.mark_failed(
                session, message.message_id, redact_text(reason), token, self.clock()
            )
            if failed is not None:
                await events.message_failed(session, failed)
        log.warning("message failed for good", message_id=message.message_id)

    async def _retry(
        self,
        message: store.MessageRecord,
        token: str,
        exc: Exception,
        retry_after: float | None,
    ) -> None:
        error = redact_text(f"{type(exc).__name__}: {exc}")
        attempts = message.attempts + 1
        if self.retry.gives_up(attempts):
            await self._fail(message, token, f"gave up after {attempts} attempts: {error}")
            return
        at = next_attempt_at(self.retry, attempts, self.clock(), self.uniform, retry_after)
        async with self.db.transaction() as session:
            await store.mark_attempt_failed(session, message.message_id, error, token, at)
        log.warning(
            "send failed; will retry",
            message_id=message.message_id,
            attempts=attempts,
            retry_at=at.isoformat(),
        )
