"""The dispatcher sends queued messages through their channel and marks
them sent, with a ``notify.v1.message.sent`` event in the same transaction.

Replicas share the queue: each pass first claims a batch (a token and a
lease written on the rows in one short transaction, see
``store.claim_queued``), then sends only what it holds, and marks each
message sent only while it still holds it. A send is started only if it can
end (``send_timeout``) well before the lease runs out, so a message is never
sent by two replicas at once; the rest of the batch is given back. A pass
that dies keeps its messages until the lease expires; then another takes
them.

At least once towards the channel: a crash after the send and before the
mark sends again once the lease has expired (providers deduplicate by
message id); exactly once in the message history and the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from chassis.db import Database, utcnow
from chassis.logs import get_logger
from chassis.telemetry import extract_trace_context
from services.notify import events, store
from services.notify.channels import Channel
from services.notify.domain import Channel as ChannelName

log = get_logger(__name__)
_tracer = trace.get_tracer(__name__)

# Room left between the end of the last send a pass may start and the end of
# its lease, for clock differences between replicas (leases are compared with
# each replica's own clock).
CLOCK_MARGIN_SECONDS = 30.0


class Dispatcher:
    def __init__(
        self,
        db: Database,
        channels: Mapping[ChannelName, Channel],
        *,
        batch_size: int = 50,
        poll_interval: float = 1.0,
        lease_seconds: float = 300.0,
        send_timeout: float = 30.0,
    ) -> None:
        if lease_seconds <= send_timeout + CLOCK_MARGIN_SECONDS:
            raise ValueError("the lease must outlast a send by more than the clock margin")
        self.db = db
        self.channels = channels
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.send_timeout = send_timeout
        self._wake = asyncio.Event()
        db.on_commit(self._on_commit)

    def _on_commit(self, info: dict[str, Any]) -> None:
        if info.pop(store.MESSAGES_QUEUED, False):
            self._wake.set()

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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
                self._wake.clear()

    async def dispatch_queued(self) -> int:
        """One pass: claim a batch, send it, give back what was not started.
        Returns how many messages were claimed."""
        token = uuid.uuid4().hex
        started = time.monotonic()
        async with self.db.transaction() as session:
            batch = await store.claim_queued(
                session,
                limit=self.batch_size,
                token=token,
                now=utcnow(),
                lease=dt.timedelta(seconds=self.lease_seconds),
                skip_locked=self.db.dialect == "postgresql",
            )
        # The last moment a send may start and still end inside the lease.
        last_start = started + self.lease_seconds - self.send_timeout - CLOCK_MARGIN_SECONDS
        pending = [message.message_id for message in batch]
        try:
            for message in batch:
                if time.monotonic() > last_start:
                    log.info("lease running out; giving back the rest", count=len(pending))
                    break
                pending.remove(message.message_id)
                await self._send(message, token)
        except asyncio.CancelledError:
            # Stopping: let another replica have what this one never started.
            with contextlib.suppress(Exception):
                await self._release(token, pending)
            raise
        await self._release(token, pending)
        return len(batch)

    async def _release(self, token: str, message_ids: list[str]) -> None:
        if message_ids:
            async with self.db.transaction() as session:
                await store.release_claims(session, token, message_ids)

    async def _send(self, message: store.MessageRecord, token: str) -> None:
        with _tracer.start_as_current_span(
            f"notify send {message.template}",
            context=extract_trace_context(message.trace_headers),
            attributes={
                "cornucopia.service": "notify",
                "cornucopia.message_id": message.message_id,
                "cornucopia.channel": message.channel.value,
            },
        ) as span:
            channel = self.channels.get(message.channel)
            try:
                if channel is None:
                    raise LookupError(f"no channel {message.channel.value} configured")
                async with asyncio.timeout(self.send_timeout):
                    await channel.send(message)
            except Exception as exc:
                span.set_status(trace.StatusCode.ERROR)
                async with self.db.transaction() as session:
                    await store.mark_attempt_failed(
                        session, message.message_id, f"{type(exc).__name__}: {exc}", token
                    )
                log.warning("send failed; will retry", message_id=message.message_id)
                return
            now = utcnow()
            async with self.db.transaction() as session:
                if not await store.mark_sent(session, message.message_id, now, token):
                    # The lease ran out and another pass took the message
                    # over: it records the send, not this one.
                    log.warning("claim lost before the mark", message_id=message.message_id)
                    return
                await events.message_sent(session, message, now)
