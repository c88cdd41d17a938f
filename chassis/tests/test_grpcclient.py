"""chassis.grpcclient: which methods are retried, and google.rpc details
read back from a failed call."""

from __future__ import annotations

import json

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2

from chassis.errors import FieldViolation
from chassis.grpcclient import (
    DETAILS_METADATA_KEY,
    bearer,
    open_channel,
    retry_service_config,
    rich_error,
)
from cornucopia.members.v1 import members_pb2
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
        "cornucopia.notify.v1.NotifyService/ListMessages",
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
