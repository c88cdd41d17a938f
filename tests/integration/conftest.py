"""Fixtures that start Cornucopia services in this process against real NATS
and real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chassis.auth import Role, Scope, ScopeLevel, mint_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET, Settings
from chassis.service import ServiceDefinition, ServiceRuntime
from chassis.telemetry import configure_tracing
from tests.integration.infra import Nats, Postgres, start_nats, start_postgres

T = TypeVar("T")

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    configure_tracing("tests", extra_processors=(SimpleSpanProcessor(exporter),))
    return exporter


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[Nats]:
    """A NATS server of the test's own: streams and durable consumers of one
    test never leak into the next."""
    server = start_nats(tmp_path / "nats")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = start_postgres()
    yield server
    server.stop()


DatabaseFactory = Callable[[str], Awaitable[str]]


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[DatabaseFactory]:
    """A factory of fresh, empty databases of one kind: ``await make("members")``."""
    created: list[str] = []
    pg: Postgres | None = None
    if request.param == "postgresql":
        pg = request.getfixturevalue("postgres")

    async def make(service: str) -> str:
        if pg is None:
            return f"sqlite+aiosqlite:///{tmp_path / (service + '.db')}"
        name = await pg.create_database(f"cornucopia_test_{service}")
        created.append(name)
        return pg.url_for(name).replace("postgresql://", "postgresql+asyncpg://", 1)

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    if pg is not None:
        for name in created:
            await pg.drop_database(name)


HQ = Scope(ScopeLevel.HQ)


def token(
    roles: tuple[Role, ...] = (Role.HQ_ADMIN,),
    scope: Scope = HQ,
    subject: str = "test-admin",
) -> str:
    return mint_token(DEVELOPMENT_TOKEN_SECRET, subject, roles, scope)


def auth(bearer: str | None = None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {bearer or token()}"),)


@dataclass
class Suite:
    """Services running in this process, each with its own database."""

    nats_url: str
    var_dir: Path
    runtimes: dict[str, ServiceRuntime] = field(default_factory=dict)
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    async def start(self, definition: ServiceDefinition, database_url: str) -> ServiceRuntime:
        settings = Settings(
            service=definition.name,
            environment="test",
            var_dir=self.var_dir,
            database_url=database_url,
            nats_url=self.nats_url,
            grpc_listen="127.0.0.1:0",
        )
        runtime = ServiceRuntime(definition, settings)
        await runtime.start()
        await asyncio.wait_for(runtime.ready.wait(), timeout=20)
        self.runtimes[definition.name] = runtime
        self.channels[definition.name] = grpc.aio.insecure_channel(
            f"127.0.0.1:{runtime.port}", interceptors=aio_client_interceptors()
        )
        return runtime

    async def stop(self, name: str) -> None:
        channel = self.channels.pop(name, None)
        if channel is not None:
            await channel.close()
        runtime = self.runtimes.pop(name)
        await runtime.stop(grace=1)

    async def stop_all(self) -> None:
        for name in list(self.runtimes):
            await self.stop(name)


@pytest.fixture
async def suite(nats: Nats, tmp_path: Path, spans: InMemorySpanExporter) -> AsyncIterator[Suite]:
    s = Suite(nats_url=nats.url, var_dir=tmp_path / "var")
    yield s
    await s.stop_all()


async def eventually(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    timeout: float = 15.0,
    interval: float = 0.1,
) -> T:
    """Poll ``probe`` until ``done(result)``; fail with the last result."""
    deadline = time.monotonic() + timeout
    result = await probe()
    while not done(result):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s; last: {result!r}")
        await asyncio.sleep(interval)
        result = await probe()
    return result


def rpc_details(exc: grpc.aio.AioRpcError) -> dict[str, Any]:
    """ErrorInfo and BadRequest details of a failed call, for assertions."""
    from google.rpc import error_details_pb2, status_pb2

    out: dict[str, Any] = {"reason": None, "violations": {}, "metadata": {}}
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                out["reason"] = info.reason
                out["domain"] = info.domain
                out["metadata"] = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                out["violations"] = {v.field: v.description for v in bad.field_violations}
    return out
