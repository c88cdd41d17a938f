"""The bus: one JetStream connection per process with endless reconnects,
one stream per service, CloudEvents headers (NATS binding, binary mode) and
``Nats-Msg-Id`` so that JetStream drops a republished event."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from chassis.logs import get_logger

log = get_logger(__name__)

SPEC_VERSION = "1.0"
# How long JetStream remembers a Nats-Msg-Id to drop a duplicate publish. The
# outbox relay republishes only rows it has not marked sent, so two minutes
# covers a relay that crashed between the ack and the mark.
DUPLICATE_WINDOW_SECONDS = 120.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age_days: int = 30


# Every stream of the suite, defined once: the owner provisions it, and a
# service that consumes another's events may provision it too (same spec), so
# start-up order does not matter.
STREAMS: Mapping[str, StreamSpec] = {
    "members": StreamSpec("MEMBERS", ("members.v1.>",)),
    "cards": StreamSpec("CARDS", ("cards.v1.>",)),
    "loyalty": StreamSpec("LOYALTY", ("loyalty.v1.>",)),
    "campaigns": StreamSpec("CAMPAIGNS", ("campaigns.v1.>",)),
    "notify": StreamSpec("NOTIFY", ("notify.v1.>",)),
    "deadletter": StreamSpec("DEADLETTER", ("deadletter.>",), max_age_days=90),
}


def stream_for_subject(subject: str) -> StreamSpec:
    owner = subject.split(".", 1)[0]
    try:
        return STREAMS[owner]
    except KeyError:
        raise ValueError(f"no stream carries subject {subject!r}") from None


def cloudevent_headers(
    *, event_id: str, event_type: str, source: str, time: dt.datetime, subject: str
) -> dict[str, str]:
    return {
        "ce-specversion": SPEC_VERSION,
        "ce-id": event_id,
        "ce-type": event_type,
        "ce-source": source,
        "ce-time": time.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
        "ce-subject": subject,
        "content-type": "application/protobuf",
        "Nats-Msg-Id": event_id,
    }


class Bus:
    def __init__(self, url: str, client_name: str) -> None:
        self.url = url
        self.client_name = client_name
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self.connected = asyncio.Event()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("the bus is not connected")
        return self._js

    @property
    def nc_or_none(self) -> NatsClient | None:
        return self._nc

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("the bus is not connected")
        return self._nc

    async def connect(self, *, first_attempt_timeout: float = 2.0) -> None:
        async def disconnected() -> None:
            self.connected.clear()
            log.warning("nats disconnected")

        async def reconnected() -> None:
            self.connected.set()
            log.info("nats reconnected")

        async def error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc))

        self._nc = await nats.connect(
            servers=[self.url],
            name=self.client_name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=int(max(1, first_attempt_timeout)),
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        self._js = self._nc.jetstream(timeout=5)
        self.connected.set()

    async def ensure_stream(self, spec: StreamSpec) -> None:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=spec.max_age_days * 86400,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        try:
            await self.js.stream_info(spec.name)
        except NotFoundError:
            try:
                await self.js.add_stream(config)
                log.info("stream created", stream=spec.name)
                return
            except Exception:
                # Another service created it between our look and our add.
                await self.js.stream_info(spec.name)
                return
        await self.js.update_stream(config)

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], *, timeout: float = 5.0
    ) -> PubAck:
        """Publish and wait for JetStream's ack: the event is stored once
        this returns. ``headers`` must carry ``Nats-Msg-Id``."""
        return await self.js.publish(subject, payload, timeout=timeout, headers=dict(headers))

    async def close(self) -> None:
        # Not drain(): consumers have stopped fetching and anything they had
        # not acknowledged is redelivered, so there is nothing to wait for.
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
        self.connected.clear()


def header_map(msg: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (msg.headers or {}).items()}
