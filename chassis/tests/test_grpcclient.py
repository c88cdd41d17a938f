"""chassis.grpcclient: which methods are retried, google.rpc details read
back from a failed call, and a peer's calls passing its refusals on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2

from chassis.auth import current_principal
from chassis.errors import FailedPrecondition, FieldViolation, NotFound, Unavailable
from chassis.grpcclient import (
    DETAILS_METADATA_KEY,
    Peer,
    bearer,
    open_channel,
    peer_name,
    retry_service_config,
    rich_error,
)
from chassis.grpcserver import GrpcServer, GrpcService
from cornucopia.members.v1 import (
    members_pb2,
    members_pb2_grpc,
    organisation_pb2,
    organisation_pb2_grpc,
)
from cornucopia.notify.v1 import notify_pb2


def _ledger_service() -> ServiceDescriptor:
    """A made-up service with one method of each kind."""
    proto = descriptor_pb2.FileDescriptorProto(name="ledger_test.proto", package="test.ledger")
    proto.message_type.add(name="Plain").field.add(
        name="amount", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64
    )
    proto.message_type.add(name="Keyed").field.add(
        name="request_id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    )
    service = proto.service.add(name="LedgerService")
    service.method.add(
        name="AddPoints", input_type=".test.ledger.Plain", output_type=".test.ledger.Plain"
    )
    service.method.add(
        name="EarnPoints", input_type=".test.ledger.Keyed", output_type=".test.ledger.Plain"
    )
    service.method.add(
        name="GetBalance", input_type=".test.ledger.Plain", output_type=".test.ledger.Plain"
    )
    marked = service.method.add(
        name="Recompute", input_type=".test.ledger.Plain", output_type=".test.ledger.Plain"
    )
    marked.options.idempotency_level = descriptor_pb2.MethodOptions.IDEMPOTENT
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool.FindServiceByName("test.ledger.LedgerService")


def _retried(config: dict[str, object]) -> set[str]:
    (method_config,) = config["methodConfig"]  # type: ignore[misc]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    return {f"{n['service']}/{n['method']}" for n in method_config["name"]}


def test_only_idempotent_methods_are_retried() -> None:
    ledger = _ledger_service()
    members = members_pb2.DESCRIPTOR.services_by_name["MembersService"]
    notify = notify_pb2.DESCRIPTOR.services_by_name["NotifyService"]

    retried = _retried(retry_service_config([ledger, members, notify]))

    assert retried == {
        "grpc.health.v1.Health/Check",
        "test.ledger.LedgerService/EarnPoints",  # has a request_id
        "test.ledger.LedgerService/GetBalance",  # a read
        "test.ledger.LedgerService/Recompute",  # says it is idempotent
        *(
            f"cornucopia.members.v1.MembersService/{name}"
            for name in (
                # request_id
                "CreateMember",
                "MergeMembers",
                "ReassignConsultant",
                "RecordFollowUp",
                "RecordFeedback",
                # reads
                "GetMember",
                "ListMembers",
                "ListMemberChanges",
                "ListFollowUps",
                "ListFeedback",
                "ListAttributeDefinitions",
                # marked in the proto
                "LookupMember",
                "SelectMembers",
                "CountMembers",
                "ExportMemberData",
                "UpdateConsent",
                "EraseMember",
            )
        ),
        *(
            f"cornucopia.notify.v1.NotifyService/{name}"
            for name in ("ListMessages", "GetMessage", "ListFailedMessages", "ReplayMessage")
        ),
    }
    json.dumps(retry_service_config([ledger]))  # a valid service config is JSON


async def test_a_channel_opens_with_its_options() -> None:
    channel = open_channel("127.0.0.1:1", options=[("grpc.keepalive_time_ms", 60_000)])
    try:
        assert channel.get_state() in (
            grpc.ChannelConnectivity.IDLE,
            grpc.ChannelConnectivity.CONNECTING,
        )
    finally:
        await channel.close()


def test_bearer_metadata() -> None:
    assert bearer("abc") == (("authorization", "Bearer abc"),)


def _failed(status: status_pb2.Status | None, trailer: bytes | None = None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if status is not None:
        trailing.add(DETAILS_METADATA_KEY, status.SerializeToString())
    if trailer is not None:
        trailing.add(DETAILS_METADATA_KEY, trailer)
    code = (
        grpc.StatusCode.RESOURCE_EXHAUSTED if status is None else grpc.StatusCode.INVALID_ARGUMENT
    )
    message = status.message if status is not None else "too many"
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


def test_rich_error_reads_every_detail() -> None:
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message="the request has invalid fields"
    )
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(
            reason="INVALID_FIELDS", domain="members.cornucopia", metadata={"store": "S001"}
        )
    )
    status.details.add().Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="member.mobile", description="bad"
                )
            ]
        )
    )
    status.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))
    )

    problem = rich_error(_failed(status))

    assert problem.code == grpc.StatusCode.INVALID_ARGUMENT
    assert problem.message == "the request has invalid fields"
    assert problem.reason == "INVALID_FIELDS"
    assert problem.domain == "members.cornucopia"
    assert problem.metadata == {"store": "S001"}
    assert problem.violations == (FieldViolation("member.mobile", "bad"),)
    assert problem.retry_delay == 1.5
    assert problem.from_service


def test_rich_error_without_details_keeps_the_code_and_message() -> None:
    problem = rich_error(_failed(None))

    assert problem.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert problem.message == "too many"
    assert (problem.reason, problem.violations, problem.retry_delay) == ("", (), None)
    assert not problem.from_service


def test_rich_error_survives_a_garbled_trailer() -> None:
    problem = rich_error(_failed(None, trailer=b"\xff\xff\xff not a status"))

    assert problem.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not problem.from_service


# --- Peer.call, against a real grpc.aio server ----------------------------------------

PEER_SECRET = "test-secret-of-a-reasonable-length-0123456789"
MEMBERS_SERVICE = members_pb2.DESCRIPTOR.services_by_name["MembersService"]


class FakeMembers(members_pb2_grpc.MembersServiceServicer):
    """GetMember knows M1 and takes its time over SLOW; UpdateConsent refuses
    an erased file. Records who called."""

    def __init__(self) -> None:
        self.callers: list[str] = []

    async def GetMember(
        self, request: members_pb2.GetMemberRequest, context: grpc.aio.ServicerContext
    ) -> members_pb2.Member:
        self.callers.append(current_principal().subject)
        if request.member_id == "SLOW":
            await asyncio.sleep(2)
        if request.member_id != "M1":
            raise NotFound(
                "no member with this id",
                reason="MEMBER_NOT_FOUND",
                metadata={"member_id": request.member_id},
            )
        return members_pb2.Member(member_id="M1", given_name="Ana")

    async def UpdateConsent(
        self, request: members_pb2.UpdateConsentRequest, context: grpc.aio.ServicerContext
    ) -> members_pb2.Member:
        raise FailedPrecondition("the member file was erased", reason="MEMBER_ERASED")


@pytest.fixture
async def members_peer() -> AsyncIterator[tuple[Peer, FakeMembers]]:
    fake = FakeMembers()
    server = GrpcServer(
        "members",
        "127.0.0.1:0",
        PEER_SECRET,
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
    peer = Peer(
        f"127.0.0.1:{server.port}", [MEMBERS_SERVICE], token_secret=PEER_SECRET, subject="notify"
    )
    try:
        yield peer, fake
    finally:
        await peer.close()
        await server.stop(grace=0)


def _members(peer: Peer) -> members_pb2_grpc.MembersServiceAsyncStub:
    return peer.stub(members_pb2_grpc.MembersServiceStub)  # type: ignore[return-value]


async def test_a_peers_stub_is_made_once_per_channel(
    members_peer: tuple[Peer, FakeMembers],
) -> None:
    peer, _ = members_peer
    first = peer.stub(members_pb2_grpc.MembersServiceStub)

    assert peer.stub(members_pb2_grpc.MembersServiceStub) is first
    assert peer.stub(organisation_pb2_grpc.OrganisationServiceStub) is not first

    # A closed channel takes its stubs with it: the next call opens a new
    # channel and makes its stubs on that one.
    await peer.close()
    again = peer.stub(members_pb2_grpc.MembersServiceStub)
    assert again is not first
    member = await peer.call(again.GetMember, members_pb2.GetMemberRequest(member_id="M1"))
    assert member.given_name == "Ana"


async def test_a_peer_call_answers_with_the_reply_on_the_services_own_token(
    members_peer: tuple[Peer, FakeMembers],
) -> None:
    peer, fake = members_peer

    member = await peer.call(_members(peer).GetMember, members_pb2.GetMemberRequest(member_id="M1"))

    assert member.given_name == "Ana"
    assert fake.callers == ["notify"]


async def test_not_found_is_none_only_when_missing_is_ok(
    members_peer: tuple[Peer, FakeMembers],
) -> None:
    peer, _ = members_peer
    request = members_pb2.GetMemberRequest(member_id="M404")

    assert await peer.call(_members(peer).GetMember, request, missing_ok=True) is None
    with pytest.raises(NotFound) as raised:
        await peer.call(_members(peer).GetMember, request)
    assert raised.value.reason == "MEMBER_NOT_FOUND"
    assert raised.value.metadata == {"member_id": "M404"}


async def test_a_peers_refusal_is_passed_on_as_it_is(
    members_peer: tuple[Peer, FakeMembers],
) -> None:
    peer, _ = members_peer

    with pytest.raises(FailedPrecondition) as raised:
        await peer.call(
            _members(peer).UpdateConsent,
            members_pb2.UpdateConsentRequest(member_id="M1", granted=False),
            missing_ok=True,
        )

    assert raised.value.reason == "MEMBER_ERASED"
    assert raised.value.message == "the member file was erased"


async def test_a_peer_past_its_deadline_is_unavailable_by_its_name(
    members_peer: tuple[Peer, FakeMembers],
) -> None:
    peer, _ = members_peer

    with pytest.raises(Unavailable) as raised:
        await peer.call(
            _members(peer).GetMember,
            members_pb2.GetMemberRequest(member_id="SLOW"),
            timeout=0.2,
            missing_ok=True,
        )

    assert raised.value.reason == "MEMBERS_UNAVAILABLE"
    assert raised.value.retry_after_seconds == 1.0


async def test_a_peer_that_is_not_there_is_unavailable() -> None:
    peer = Peer(
        "127.0.0.1:1",
        [MEMBERS_SERVICE],
        token_secret=PEER_SECRET,
        subject="notify",
        name="directory",
        timeout=0.5,
    )
    try:
        with pytest.raises(Unavailable) as raised:
            await peer.call(_members(peer).GetMember, members_pb2.GetMemberRequest(member_id="M1"))
    finally:
        await peer.close()

    assert raised.value.reason == "DIRECTORY_UNAVAILABLE"


def test_a_peer_is_named_after_its_proto_package_or_else_its_host() -> None:
    organisation = organisation_pb2.DESCRIPTOR.services_by_name["OrganisationService"]

    assert peer_name("127.0.0.1:50051", [organisation, MEMBERS_SERVICE]) == "members"
    assert peer_name("127.0.0.1:1", [_ledger_service()]) == "ledger"
    assert peer_name("campaigns.internal:50054") == "campaigns.internal"
    assert peer_name("dns:///loyalty:50053") == "loyalty"
    assert peer_name("[::1]:50051") == "::1"
    named = Peer("127.0.0.1:1", [MEMBERS_SERVICE], token_secret=PEER_SECRET, subject="x", name="m")
    assert named.name == "m"
