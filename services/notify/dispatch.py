"""The dispatcher sends queued messages through their channel and marks
them sent, with a ``notify.v1.message.sent`` event in the same transaction.

At least once towards the channel: a crash after the send and before the
mark sends again on restart (providers deduplicate by message id); exactly
once in the message history and the events.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class Dispatcher:
    def __init__(
        self,
        db: Database,
        channels: Mapping[ChannelName, Channel],
        *,
        batch_size: int = 50,
        poll_interval: float = 1.0,
    ) -> None:
        self.db = db
        self.channels = channels
        self.batch_size = batch_size
        self.poll_interval = poll_interval
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
        async with self.db.sessions() as session:
            batch = await store.queued(session, self.batch_size)
        for message in batch:
            await self._send(message)
        return len(batch)

    async def _send(self, message: store.MessageRecord) -> None:
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
                await channel.send(message)
            except Exception as exc:
                span.set_status(trace.StatusCode.ERROR)
                async with self.db.transaction() as session:
                    await store.mark_attempt_failed(
                        session, message.message_id, f"{type(exc).__name__}: {exc}"
                    )
                log.warning("send failed; will retry", message_id=message.message_id)
                return
            now = utcnow()
            async with self.db.transaction() as session:
                await store.mark_sent(session, message.message_id, now)
                await events.message_sent(session, message, now)
