"""A service's life: configure, migrate, connect, serve, drain.

``ServiceRuntime`` is what ``python -m services.<name>`` and
``cornucopia serve <name>`` run, and what the integration tests start in
process. A service module only describes itself with a ``ServiceDefinition``:
its gRPC servicers, its consumers and its migrations folder, and perhaps a
``PartnerEndpoint``: gRPC services for partners on a second port, where they
authenticate by client certificate (mutual TLS) rather than by token.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chassis.bus import STREAMS, Bus, StreamConfigError
from chassis.config import Settings
from chassis.db import Database
from chassis.grpcserver import GrpcServer, GrpcService
from chassis.heap import settle_heap
from chassis.idempotency import forget_older_than
from chassis.inbox import Consumer, Subscription, forget_messaging_older_than
from chassis.logs import configure_logging, get_logger
from chassis.migrations import upgrade_to_head
from chassis.mtls import CertificateResolver, MutualTlsAuthInterceptor, server_credentials
from chassis.outbox import OutboxRelay
from chassis.telemetry import configure_tracing, shutdown_tracing

log = get_logger(__name__)
T = TypeVar("T")


@dataclass
class ServiceContext:
    """What a service's servicers and handlers are built from."""

    settings: Settings
    db: Database
    bus: Bus
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    def on_close(self, close: Callable[[], Awaitable[None]]) -> None:
        """Have the runtime await ``close()`` when it stops, after the last
        call and worker: for what a service opens itself (a channel to a
        peer, say) and shares between servicers and workers."""
        self._closers.append(close)

    def shared(self, key: str, make: Callable[[], T]) -> T:
        """One object per service under ``key`` (a client of a peer that
        servicers and workers share), made on first ask."""
        if key not in self._shared:
            self._shared[key] = make()
        value: T = self._shared[key]
        return value

    async def close(self) -> None:
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:
                log.exception("closing a service resource failed")
        self._closers.clear()

    @property
    def source(self) -> str:
        """The CloudEvents source of this service's events."""
        return f"cornucopia/{self.settings.service}"


@dataclass(frozen=True)
class PartnerEndpoint:
    """What a service serves on its partner port: gRPC services, and who
    each client certificate belongs to (``resolve`` raises Unauthenticated
    or PermissionDenied for a certificate it does not know or has revoked)."""

    grpc_services: Sequence[GrpcService]
    resolve: CertificateResolver


@dataclass(frozen=True)
class ServiceDefinition:
    name: str
    migrations_dir: Path
    grpc_services: Callable[[ServiceContext], Sequence[GrpcService]]
    subscriptions: Callable[[ServiceContext], Sequence[Subscription]] = field(
        default=lambda _ctx: ()
    )
    # Long-running loops of the service's own (a dispatcher, a scheduler):
    # started after migrations, cancelled on shutdown.
    workers: Callable[[ServiceContext], Sequence[Callable[[], Awaitable[None]]]] = field(
        default=lambda _ctx: ()
    )
    # Served only where the settings say where and with which certificates
    # (<SERVICE>_PARTNER_GRPC_LISTEN and the rest, see config.PartnerGrpc).
    partner_endpoint: Callable[[ServiceContext], PartnerEndpoint] | None = None


class ServiceRuntime:
    def __init__(self, definition: ServiceDefinition, settings: Settings) -> None:
        settings.check_retention()
        self.definition = definition
        self.settings = settings
        self.db = Database(settings.database_url)
        self.bus = Bus(
            settings.nats_url,
            client_name=f"cornucopia-{settings.service}",
            stream_replicas=settings.stream_replicas,
        )
        self.context = ServiceContext(settings=settings, db=self.db, bus=self.bus)
        self.relay = OutboxRelay(self.db, self.bus)
        self.consumers = [
            Consumer(sub, service=settings.service, db=self.db, bus=self.bus)
            for sub in definition.subscriptions(self.context)
        ]
        self.grpc = GrpcServer(
            settings.service,
            settings.grpc_listen,
            settings.token_secret,
            definition.grpc_services(self.context),
            connections=settings.grpc_connections,
        )
        self.partner = self._partner_server()
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()

    def _partner_server(self) -> GrpcServer | None:
        """The partner endpoint, if the definition declares one and the
        settings configure it."""
        configured = self.settings.partner_grpc
        declared = self.definition.partner_endpoint
        if configured is None:
            return None
        if declared is None:
            log.warning(
                "partner endpoint configured, but this service has none: not started",
                listen=configured.listen,
            )
            return None
        # The files first: a bad setting stops the service before anything is built.
        credentials = server_credentials(configured.tls)
        endpoint = declared(self.context)
        return GrpcServer(
            self.settings.service,
            configured.listen,
            self.settings.token_secret,
            endpoint.grpc_services,
            connections=self.settings.grpc_connections,
            credentials=credentials,
            auth=MutualTlsAuthInterceptor(endpoint.resolve),
        )

    @property
    def servers(self) -> list[GrpcServer]:
        return [self.grpc] if self.partner is None else [self.grpc, self.partner]

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def partner_port(self) -> int | None:
        """Where the partner endpoint listens; None when there is none."""
        return None if self.partner is None else self.partner.port

    async def start(self) -> None:
        """Migrate and listen at once (health NOT_SERVING); connect to NATS
        in the background and turn SERVING when the streams and consumers
        are in place. Requests that write meanwhile are kept in the outbox."""
        log.info("starting", environment=self.settings.environment)
        await upgrade_to_head(self.db, self.definition.migrations_dir, self.settings.service)
        for server in self.servers:
            await server.start()
        self._spawn(self._connect_and_run(), "bus")
        for index, worker in enumerate(self.definition.workers(self.context)):
            self._spawn(worker(), f"worker-{index}")
        self._spawn(self._housekeeping(), "housekeeping")

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"{self.settings.service}-{name}")  # type: ignore[arg-type]
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task died", task=task.get_name(), exc_info=task.exception())

    async def _connect_and_run(self) -> None:
        delay = 0.5
        while True:
            try:
                if self.bus.nc_or_none is None:
                    await self.bus.connect()
                await self.bus.ensure_stream(STREAMS[self.settings.service])
                await self.bus.ensure_stream(STREAMS["deadletter"])
                for consumer in self.consumers:
                    await consumer.ensure()
                break
            except StreamConfigError as exc:
                # NATS answers but refuses the stream settings: an operator
                # must act (NATS_STREAM_REPLICAS above the cluster's size...).
                log.error("stream configuration refused; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            except Exception as exc:
                log.warning("nats not ready; retrying", url=self.settings.nats_url, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        self._spawn(self.relay.run(), "outbox-relay")
        for consumer in self.consumers:
            self._spawn(consumer.run(), f"consumer-{consumer.durable}")
        for server in self.servers:
            await server.set_serving(True)
        self.ready.set()
        log.info("serving", port=self.port, partner_port=self.partner_port)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(3600)
            try:
                await forget_older_than(self.db, self.settings.idempotency_retention_hours)
                await forget_messaging_older_than(
                    self.db,
                    self.settings.inbox_retention_hours,
                    sent_outbox_hours=self.settings.sent_outbox_retention_hours,
                )
            except Exception:
                log.exception("housekeeping failed")

    async def stop(self, grace: float = 10.0) -> None:
        """Drain: stop taking calls, let in-flight calls finish, then stop
        the relay and consumers (what they had not acknowledged is
        redelivered to the next instance) and close connections."""
        log.info("stopping")
        await asyncio.gather(*(server.stop(grace) for server in self.servers))
        self.relay.stop()
        for consumer in self.consumers:
            consumer.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.context.close()
        await self.bus.close()
        await self.db.dispose()
        shutdown_tracing()
        log.info("stopped")


async def serve(definition: ServiceDefinition, settings: Settings | None = None) -> None:
    settings = settings or Settings.from_env(definition.name)
    configure_logging(definition.name, settings.log_level, settings.log_json)
    configure_tracing(definition.name)
    runtime = ServiceRuntime(definition, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runtime.start()
    settle_heap()
    await stop.wait()
    await runtime.stop()


def main(definition: ServiceDefinition) -> None:
    asyncio.run(serve(definition))
