"""The bus: one JetStream connection per process with endless reconnects,
one stream per service, CloudEvents headers (NATS binding, binary mode) and
``Nats-Msg-Id`` so that JetStream drops a republished event.

Streams are reconciled at every start: a missing stream is created, and an
existing one whose managed settings (subjects, retention, storage, age,
duplicate window, replicas) differ from the spec is updated to match. Other
settings an operator made by hand (a size limit, placement) are kept.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from chassis.config import DEAD_LETTER_RETENTION_DAYS
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
    "deadletter": StreamSpec(
        "DEADLETTER", ("deadletter.>",), max_age_days=DEAD_LETTER_RETENTION_DAYS
    ),
}


def desired_config(spec: StreamSpec, replicas: int) -> StreamConfig:
    """The settings the suite manages on a stream."""
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=spec.max_age_days * 86400,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        num_replicas=replicas,
    )


def _managed(config: StreamConfig) -> dict[str, Any]:
    """The managed settings of a config in comparable form (the server
    answers with strings, seconds as floats and replicas 0 for 1)."""

    def text(value: Any) -> str:
        return str(getattr(value, "value", value) or "")

    return {
        "subjects": sorted(config.subjects or ()),
        "retention": text(config.retention),
        "storage": text(config.storage),
        "max_age": round(float(config.max_age or 0)),
        "duplicate_window": round(float(config.duplicate_window or 0)),
        "num_replicas": config.num_replicas or 1,
    }


def config_drift(current: StreamConfig, desired: StreamConfig) -> dict[str, tuple[Any, Any]]:
    """Managed settings that differ: name -> (current, desired)."""
    have, want = _managed(current), _managed(desired)
    return {key: (have[key], want[key]) for key in want if have[key] != want[key]}


class StreamConfigError(RuntimeError):
    """JetStream refused to bring a stream to its spec (for example more
    replicas than the NATS cluster has servers, or a change of storage)."""


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
    def __init__(self, url: str, client_name: str, *, stream_replicas: int = 1) -> None:
        self.url = url
        self.client_name = client_name
        # How many servers of the NATS cluster hold each stream this process
        # ensures (NATS_STREAM_REPLICAS).
        self.stream_replicas = stream_replicas
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
        """Create the stream, or bring an existing one to the spec."""
        desired = desired_config(spec, self.stream_replicas)
        try:
            info = await self.js.stream_info(spec.name)
        except NotFoundError:
            try:
                await self.js.add_stream(desired)
                log.info("stream created", stream=spec.name, replicas=self.stream_replicas)
                return
            except Exception as exc:
                # Another service may have created it between our look and
                # our add: then reconcile what it made.
                try:
                    info = await self.js.stream_info(spec.name)
                except NotFoundError:
                    raise StreamConfigError(
                        f"stream {spec.name} cannot be created with "
                        f"{self.stream_replicas} replica(s): {exc}"
                    ) from exc
        drift = config_drift(info.config, desired)
        if not drift:
            return
        # Keep what is not managed here (limits or placement set by hand).
        updated = replace(
            info.config,
            subjects=desired.subjects,
            retention=desired.retention,
            storage=desired.storage,
            max_age=desired.max_age,
            duplicate_window=desired.duplicate_window,
            num_replicas=desired.num_replicas,
        )
        changes = {key: f"{old} -> {new}" for key, (old, new) in drift.items()}
        try:
            await self.js.update_stream(updated)
        except Exception as exc:
            raise StreamConfigError(
                f"stream {spec.name} cannot be brought to its configuration "
                f"({', '.join(f'{k}: {v}' for k, v in changes.items())}): {exc}"
            ) from exc
        log.info("stream updated", stream=spec.name, **changes)

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
