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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import nats
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
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
        self._reconnect_hooks: list[Callable[[], Awaitable[None]]] = []

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
            for hook in list(self._reconnect_hooks):
                try:
                    await hook()
                except Exception:
                    log.exception("a reconnect hook failed")

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

    def on_reconnect(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Await ``hook()`` after every reconnect, once the client has made
        its core subscriptions again; returns what removes the hook."""
        self._reconnect_hooks.append(hook)

        def remove() -> None:
            if hook in self._reconnect_hooks:
                self._reconnect_hooks.remove(hook)

        return remove

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


# -- per-replica listeners ---------------------------------------------------------------


@dataclass(frozen=True)
class Heard:
    """What a listener knows about an event besides its payload (the
    CloudEvents headers the outbox relay publishes)."""

    event_id: str
    subject: str
    event_type: str
    source: str
    time: str


ListenerHandler = Callable[[Any, Heard], Awaitable[None]]


class Listener:
    """A plain core NATS subscription of this process on ``subjects``,
    decoding the suite's envelope (``ce-type`` names the protobuf payload):
    for what every replica must hear itself, a cache to drop, say, where a
    durable consumer would hand each event to one replica only.

    JetStream's stored events reach core subscribers of their subject too,
    but only as they are published: there is no ack, no redelivery and no
    inbox. Whatever was published while this process was not subscribed
    (before ``start``, or while the connection was down) is never heard;
    ``on_gap`` is awaited after the subscription is made and after every
    reconnect (nats-py makes core subscriptions again by itself), so that
    the caller can drop what it may have missed. A handler that fails is
    logged and the event forgotten; an event of a type without a handler,
    or one that does not decode, is ignored."""

    def __init__(
        self,
        bus: Bus,
        *,
        name: str,
        subjects: Sequence[str],
        handlers: Mapping[type[Message], ListenerHandler],
        on_gap: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.bus = bus
        self.name = name
        self.subjects = tuple(subjects)
        self.on_gap = on_gap
        self._types = {cls.DESCRIPTOR.full_name: (cls, h) for cls, h in handlers.items()}
        self._subs: list[NatsSubscription] = []
        self._remove_hook: Callable[[], None] | None = None

    @property
    def listening(self) -> bool:
        return bool(self._subs)

    async def start(self) -> None:
        """Subscribe on the connected bus (once; again after ``close``)."""
        if self._subs:
            return
        nc = self.bus.nc
        for subject in self.subjects:
            self._subs.append(await nc.subscribe(subject, cb=self._deliver))
        if self.on_gap is not None:
            self._remove_hook = self.bus.on_reconnect(self._gap)
        try:
            # Subscribed once the server has the SUBs: from here on nothing is missed.
            await nc.flush()
        except Exception as exc:
            # Disconnected meanwhile: the client subscribes again when it is
            # back, and the reconnect hook reports the gap then.
            log.warning("listener not yet confirmed", listener=self.name, error=type(exc).__name__)
        log.info("listening", listener=self.name, subjects=list(self.subjects))
        await self._gap()

    async def run(self) -> None:
        """A worker: wait for the bus, listen until cancelled, then stop."""
        try:
            while self.bus.nc_or_none is None:
                await self.bus.connected.wait()
            await self.start()
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._remove_hook is not None:
            self._remove_hook()
            self._remove_hook = None
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                # A closed connection has dropped it already.
                log.debug("unsubscribe failed", listener=self.name, error=type(exc).__name__)

    async def _gap(self) -> None:
        if self.on_gap is None:
            return
        try:
            await self.on_gap()
        except Exception:
            log.exception("listener gap handling failed", listener=self.name)

    async def _deliver(self, msg: Msg) -> None:
        headers = header_map(msg)
        heard = Heard(
            event_id=headers.get("ce-id") or headers.get("Nats-Msg-Id", ""),
            subject=msg.subject,
            event_type=headers.get("ce-type", ""),
            source=headers.get("ce-source", ""),
            time=headers.get("ce-time", ""),
        )
        known = self._types.get(heard.event_type)
        if known is None:
            return
        cls, handler = known
        try:
            event = cls.FromString(msg.data)
        except DecodeError:
            log.warning(
                "undecodable event ignored",
                listener=self.name,
                subject=heard.subject,
                type=heard.event_type,
            )
            return
        try:
            await handler(event, heard)
        except Exception:
            log.exception(
                "listener handler failed",
                listener=self.name,
                subject=heard.subject,
                event_id=heard.event_id,
            )
