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
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import organisation_pb2, organisation_pb2_grpc
from tests.integration.infra import Nats, start_nats

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

    async def start(
        self, definition: ServiceDefinition, database_url: str, *, port: int = 0
    ) -> ServiceRuntime:
        """Start a service; ``port`` to start it again where its peers
        already look for it (after ``stop``)."""
        settings = Settings(
            service=definition.name,
            environment="test",
            var_dir=self.var_dir,
            database_url=database_url,
            nats_url=self.nats_url,
            grpc_listen=f"127.0.0.1:{port}",
            # The services already running are its peers (notify asks
            # members about the recipients of its messages).
            peers={name: f"127.0.0.1:{rt.port}" for name, rt in self.runtimes.items()},
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


# The chain the integration tests enroll into. S001 and S002 are in
# different regions, so that region scopes can be told apart; S001's beauty
# advisors are there to look after members (consultant_id).
TEST_REGIONS = {"EAST": "华东区", "WEST": "西部区"}
TEST_STORES = {"S001": "EAST", "S002": "WEST"}
TEST_CONSULTANTS = ("advisor.one", "advisor.two", "advisor.three")


@dataclass(frozen=True)
class Organisation:
    """What seed_organisation made: store id -> region id, and the staff
    ids of the consultants (in the order of TEST_CONSULTANTS)."""

    stores: dict[str, str]
    consultants: tuple[str, ...]


def a_store(store_id: str, region_id: str) -> organisation_pb2.Store:
    return organisation_pb2.Store(
        store_id=store_id,
        region_id=region_id,
        display_name=f"Store {store_id}",
        address=organisation_pb2.StoreAddress(
            province="上海市", city="上海市", district="黄浦区", street="南京东路 1 号"
        ),
        time_zone="Asia/Shanghai",
        currency_code="CNY",
    )


async def seed_organisation(suite: Suite) -> Organisation:
    """Create the test chain in the running members service through its
    public API, as an HQ admin, as ``cornucopia up`` loads the demo chain:
    members can only be enrolled into stores of the organisation tree.

    The stores' ``members.v1.store.opened`` events go to the outbox and the
    MEMBERS stream like any other. Fixed request ids: seeding twice (after a
    restart, say) changes nothing."""
    stub = organisation_pb2_grpc.OrganisationServiceStub(suite.channels["members"])
    md = auth()
    for region_id, name in TEST_REGIONS.items():
        await stub.CreateRegion(
            organisation_pb2.CreateRegionRequest(
                request_id=f"seed-region-{region_id}",
                region=organisation_pb2.Region(region_id=region_id, display_name=name),
            ),
            metadata=md,
        )
    for store_id, region_id in TEST_STORES.items():
        await stub.CreateStore(
            organisation_pb2.CreateStoreRequest(
                request_id=f"seed-store-{store_id}", store=a_store(store_id, region_id)
            ),
            metadata=md,
        )
    consultants = []
    for login_id in TEST_CONSULTANTS:
        staff = await stub.CreateStaffMember(
            organisation_pb2.CreateStaffMemberRequest(
                request_id=f"seed-staff-{login_id}",
                staff_member=organisation_pb2.StaffMember(
                    login_id=login_id,
                    display_name="美容顾问",
                    assignment=org_pb2.OrgUnitRef(level=org_pb2.ORG_LEVEL_STORE, id="S001"),
                    roles=[organisation_pb2.STAFF_ROLE_STORE_OPERATOR],
                ),
            ),
            metadata=md,
        )
        consultants.append(staff.staff_id)
    return Organisation(dict(TEST_STORES), tuple(consultants))


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
