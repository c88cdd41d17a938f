"""The gateway in front of a real grpc.aio server standing in for members.

The stand-in runs on chassis.grpcserver's GrpcServer, so tokens are checked
by the real auth interceptor and the chassis errors it raises become real
statuses with google.rpc details; only its member files are a dict, and its
organisation tree a set of open stores (STORES).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chassis.auth import Role, Scope, ScopeLevel, current_principal, mint_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET, Settings
from chassis.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from chassis.grpcclient import open_channel
from chassis.grpcserver import GrpcServer, GrpcService
from chassis.telemetry import configure_tracing
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.gateway.server import MEMBERS_SERVICE, create_app

# The stand-in fails on purpose for these given names.
SCRIPTED: dict[str, Callable[[], Exception]] = {
    "Boom": lambda: RuntimeError("db-7.internal refused the password hunter2"),
    "Closed": lambda: FailedPrecondition(
        "this store is closed and takes no members", reason="STORE_CLOSED"
    ),
    "Busy": lambda: ResourceExhausted(
        "too many enrollments from this store", reason="RATE_LIMITED", retry_after_seconds=2.5
    ),
    "Racing": lambda: Aborted("the member changed meanwhile", reason="CONCURRENT_CHANGE"),
    "Down": lambda: Unavailable(
        "the member files are being moved", reason="MAINTENANCE", retry_after_seconds=30
    ),
}


# The stores members may be enrolled into, as the real service's
# organisation tree would have them.
STORES = frozenset({"S001", "S002"})


def token(
    roles: tuple[Role, ...] = (Role.STORE_OPERATOR,),
    scope: Scope = Scope(ScopeLevel.STORE, "S001"),  # noqa: B008 - immutable
    secret: str = DEVELOPMENT_TOKEN_SECRET,
) -> str:
    return mint_token(secret, "till-7", roles, scope)


def headers(key: str | None = "till-7-0001", bearer: str | None = None) -> dict[str, str]:
    result = {"authorization": f"Bearer {bearer or token()}"}
    if key is not None:
        result["idempotency-key"] = key
    return result


class FakeMembers(members_pb2_grpc.MembersServiceServicer):
    """Members in a dict, idempotency by request_id, unique mobiles, and
    a queue of errors to fail the next calls with."""

    def __init__(self) -> None:
        self.members: dict[str, members_pb2.Member] = {}
        self.answers: dict[str, tuple[bytes, str]] = {}
        self.create_requests: list[members_pb2.CreateMemberRequest] = []
        self.get_calls = 0
        self.metadata: list[dict[str, str]] = []
        self.fail_next: list[ServiceError] = []
        self.delay = 0.0

    def add(self, member: members_pb2.Member) -> members_pb2.Member:
        stored = members_pb2.Member()
        stored.CopyFrom(member)
        stored.member_id = stored.member_id or f"M{len(self.members) + 1:09d}"
        stored.etag = 'W/"1"'
        stored.create_time.FromDatetime(dt.datetime(2026, 11, 22, 9, 30, tzinfo=dt.UTC))
        stored.update_time.CopyFrom(stored.create_time)
        self.members[stored.member_id] = stored
        return stored

    async def CreateMember(
        self, request: members_pb2.CreateMemberRequest, context: grpc.aio.ServicerContext
    ) -> members_pb2.Member:
        self.create_requests.append(request)
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        principal = current_principal()
        if self.fail_next:
            raise self.fail_next.pop(0)
        if self.delay:
            await asyncio.sleep(self.delay)
        member = request.member
        if member.given_name in SCRIPTED:
            raise SCRIPTED[member.given_name]()
        principal.require_store(member.home_store_id)
        payload = member.SerializeToString(deterministic=True)
        if request.request_id in self.answers:
            first_payload, member_id = self.answers[request.request_id]
            if first_payload != payload:
                raise InvalidArgument(
                    [FieldViolation("request_id", "already used for a different request")],
                    message="this request_id was already used with a different payload",
                    reason="IDEMPOTENCY_KEY_REUSED",
                )
            return self.members[member_id]
        violations = []
        if not member.given_name:
            violations.append(FieldViolation("member.given_name", "required"))
        digits = member.mobile.replace(" ", "").removeprefix("+")
        if not digits.isdigit() or len(digits) < 7:
            violations.append(FieldViolation("member.mobile", "not a valid phone number"))
        if member.HasField("birthday") and not 1 <= member.birthday.month <= 12:
            violations.append(FieldViolation("member.birthday", "not a real calendar day"))
        if violations:
            raise InvalidArgument(violations)
        if member.home_store_id not in STORES:
            raise InvalidArgument([FieldViolation("member.home_store_id", "no such store")])
        mobile = "+" + digits
        for existing in self.members.values():
            if existing.mobile == mobile:
                raise AlreadyExists(
                    "a member with this mobile number already exists",
                    reason="MOBILE_IN_USE",
                    metadata={"member_id": existing.member_id},
                )
        created = members_pb2.Member()
        created.CopyFrom(member)
        created.mobile = mobile
        created.enrolled_by.CopyFrom(
            org_pb2.AuditStamp(principal=principal.subject, store_id=principal.store_id)
        )
        stored = self.add(created)
        self.answers[request.request_id] = (payload, stored.member_id)
        return stored

    async def GetMember(
        self, request: members_pb2.GetMemberRequest, context: grpc.aio.ServicerContext
    ) -> members_pb2.Member:
        self.get_calls += 1
        current_principal()
        if self.fail_next:
            raise self.fail_next.pop(0)
        member = self.members.get(request.member_id)
        if member is None:
            raise NotFound(
                "no member with this id",
                reason="MEMBER_NOT_FOUND",
                metadata={"member_id": request.member_id},
            )
        return member


@dataclass
class Peer:
    server: GrpcServer
    fake: FakeMembers

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    configure_tracing("gateway-tests", extra_processors=(SimpleSpanProcessor(exporter),))
    return exporter


@pytest.fixture
async def members(spans: InMemorySpanExporter) -> AsyncIterator[Peer]:
    fake = FakeMembers()
    server = GrpcServer(
        "members",
        "127.0.0.1:0",
        DEVELOPMENT_TOKEN_SECRET,
        [
            GrpcService(
                full_name=MEMBERS_SERVICE.full_name,
                servicer=fake,
                add_to_server=members_pb2_grpc.add_MembersServiceServicer_to_server,
            )
        ],
    )
    await server.start()
    await server.set_serving(True)
    yield Peer(server, fake)
    await server.stop(grace=0)


def gateway_settings(members_target: str) -> Settings:
    return Settings(service="gateway", environment="test", peers={"members": members_target})


@pytest.fixture
async def channel(members: Peer) -> AsyncIterator[grpc.aio.Channel]:
    chan = open_channel(members.target, services=[MEMBERS_SERVICE])
    yield chan
    await chan.close()


@pytest.fixture
async def http(members: Peer, channel: grpc.aio.Channel) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(gateway_settings(members.target), members_channel=channel)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        yield client
