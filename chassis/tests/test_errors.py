"""Service errors and how the gRPC edge turns them into statuses with
google.rpc details (ErrorInfo, BadRequest, RetryInfo)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from chassis.auth import Role, Scope, ScopeLevel, current_principal, mint_token
from chassis.errors import (
    Aborted,
    AlreadyExists,
    Code,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Violations,
)
from chassis.grpcserver import (
    AuthInterceptor,
    ErrorInterceptor,
    error_domain,
    internal_status,
    to_grpc_status,
)

DOMAIN = "members.cornucopia"
SECRET = "test-secret-of-a-reasonable-length-0123456789"


def rich_status(status: Any) -> status_pb2.Status:
    """The google.rpc.Status carried in the trailing metadata of a status (or
    of the trailing metadata itself)."""
    trailing = getattr(status, "trailing_metadata", status)
    found = [v for k, v in trailing if k == "grpc-status-details-bin"]
    assert len(found) == 1
    return status_pb2.Status.FromString(found[0])


def details(status: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for any_detail in rich_status(status).details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                assert kind.__name__ not in out, "each detail kind at most once"
                out[kind.__name__] = message
    assert len(out) == len(rich_status(status).details), "no unexpected detail kinds"
    return out


def test_the_error_domain_is_the_service_under_cornucopia() -> None:
    assert error_domain("members") == DOMAIN


def test_invalid_argument_carries_error_info_and_every_violation() -> None:
    err = InvalidArgument(
        [
            FieldViolation("member.mobile", "not a valid phone number"),
            FieldViolation("member.email", "not a valid e-mail address"),
        ],
        metadata={"store_id": "S001"},
    )
    status = to_grpc_status(err, DOMAIN)
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "the request has invalid fields"
    rich = rich_status(status)
    assert rich.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rich.message == "the request has invalid fields"
    found = details(status)
    info = found["ErrorInfo"]
    assert info.reason == "INVALID_FIELDS"
    assert info.domain == DOMAIN
    assert dict(info.metadata) == {"store_id": "S001"}
    bad = found["BadRequest"]
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("member.mobile", "not a valid phone number"),
        ("member.email", "not a valid e-mail address"),
    ]
    assert "RetryInfo" not in found


def test_an_error_without_violations_has_no_bad_request() -> None:
    status = to_grpc_status(NotFound("no such member", reason="MEMBER_NOT_FOUND"), DOMAIN)
    found = details(status)
    assert set(found) == {"ErrorInfo"}
    assert found["ErrorInfo"].reason == "MEMBER_NOT_FOUND"
    assert dict(found["ErrorInfo"].metadata) == {}


def test_retry_after_becomes_retry_info() -> None:
    err = Unavailable("try later", reason="DATABASE_UNAVAILABLE", retry_after_seconds=1.5)
    status = to_grpc_status(err, DOMAIN)
    assert status.code is grpc.StatusCode.UNAVAILABLE
    retry = details(status)["RetryInfo"]
    assert retry.retry_delay.seconds == 1
    assert retry.retry_delay.nanos == 500_000_000


@pytest.mark.parametrize("code", list(Code))
def test_every_code_maps_to_the_grpc_code_of_the_same_name(code: Code) -> None:
    err = ServiceError("message", reason="R")
    err.code = code
    status = to_grpc_status(err, DOMAIN)
    assert status.code is grpc.StatusCode[code.value]
    assert rich_status(status).code == grpc.StatusCode[code.value].value[0]


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (NotFound, Code.NOT_FOUND),
        (AlreadyExists, Code.ALREADY_EXISTS),
        (FailedPrecondition, Code.FAILED_PRECONDITION),
        (Aborted, Code.ABORTED),
        (Unauthenticated, Code.UNAUTHENTICATED),
        (PermissionDenied, Code.PERMISSION_DENIED),
        (ResourceExhausted, Code.RESOURCE_EXHAUSTED),
        (Unavailable, Code.UNAVAILABLE),
    ],
)
def test_each_error_class_has_its_code(cls: type[ServiceError], code: Code) -> None:
    err = cls("m", reason="R", metadata={"k": "v"})
    assert err.code is code
    assert (err.message, err.reason, err.metadata, str(err)) == ("m", "R", {"k": "v"}, "m")
    assert InvalidArgument([]).code is Code.INVALID_ARGUMENT


def test_internal_status_says_nothing_but_internal() -> None:
    status = internal_status(DOMAIN)
    assert status.code is grpc.StatusCode.INTERNAL
    assert status.details == "internal error"
    found = details(status)
    assert set(found) == {"ErrorInfo"}
    assert found["ErrorInfo"].reason == "INTERNAL"
    assert found["ErrorInfo"].domain == DOMAIN


class Aborting(Exception):
    pass


class FakeContext:
    """Records what the interceptor aborts with, as grpc.aio would."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.aborted: tuple[grpc.StatusCode, str, Any] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        self.aborted = (code, details, trailing)
        raise Aborting


async def test_an_unexpected_exception_reaches_the_caller_as_bare_internal() -> None:
    secret_text = "KeyError in row for +8613800138000 at /srv/app/secret.py"

    async def handler(_request: Any, _context: Any) -> Any:
        raise RuntimeError(secret_text)

    context = FakeContext()
    with pytest.raises(Aborting):
        await ErrorInterceptor("members").around(handler, object(), context, "/m.v1.M/Get")
    assert context.aborted is not None
    code, message, trailing = context.aborted
    assert code is grpc.StatusCode.INTERNAL
    assert message == "internal error"
    sent = repr(trailing).encode() + b"".join(v for _, v in trailing)
    for fragment in (b"8613800138000", b"secret.py", b"RuntimeError", b"KeyError"):
        assert fragment not in sent


async def test_a_service_error_reaches_the_caller_with_its_details() -> None:
    async def handler(_request: Any, _context: Any) -> Any:
        raise InvalidArgument([FieldViolation("member.email", "not a valid e-mail address")])

    context = FakeContext()
    with pytest.raises(Aborting):
        await ErrorInterceptor("members").around(handler, object(), context, "/m.v1.M/Enroll")
    assert context.aborted is not None
    code, message, trailing = context.aborted
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message == "the request has invalid fields"
    found = details(trailing)
    assert (found["ErrorInfo"].reason, found["ErrorInfo"].domain) == ("INVALID_FIELDS", DOMAIN)
    assert [v.field for v in found["BadRequest"].field_violations] == ["member.email"]


async def test_the_auth_interceptor_makes_the_principal_current() -> None:
    token = mint_token(SECRET, "staff-1", [Role.STORE_OPERATOR], Scope(ScopeLevel.STORE, "S001"))
    seen: list[str] = []

    async def handler(_request: Any, _context: Any) -> str:
        seen.append(current_principal().subject)
        return "ok"

    context = FakeContext((("authorization", f"Bearer {token}"),))
    result = await AuthInterceptor(SECRET).around(handler, object(), context, "/m.v1.M/Get")
    assert result == "ok"
    assert seen == ["staff-1"]
    with pytest.raises(Unauthenticated):
        current_principal()


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "MISSING_CREDENTIALS"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "MISSING_CREDENTIALS"),
        ((("authorization", "Bearer "),), "MISSING_CREDENTIALS"),
        ((("authorization", "Bearer not-a-token"),), "TOKEN_INVALID"),
    ],
)
async def test_the_auth_interceptor_refuses_calls_without_a_valid_token(
    metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    async def handler(_request: Any, _context: Any) -> str:
        raise AssertionError("the handler must not run")

    with pytest.raises(Unauthenticated) as caught:
        await AuthInterceptor(SECRET).around(handler, object(), FakeContext(metadata), "/m.v1.M/G")
    assert caught.value.reason == reason


async def test_health_checks_need_no_token() -> None:
    async def handler(_request: Any, _context: Any) -> str:
        return "serving"

    method = "/grpc.health.v1.Health/Check"
    assert await AuthInterceptor(SECRET).around(handler, object(), FakeContext(), method) == (
        "serving"
    )


def test_violations_collect_every_problem_then_raise_them_together() -> None:
    v = Violations()
    assert not v
    v.raise_if_any()  # nothing collected: nothing raised
    v.add("member.given_name", "required")
    v.add("member.mobile", "not a valid phone number")
    assert v
    assert list(v) == [
        FieldViolation("member.given_name", "required"),
        FieldViolation("member.mobile", "not a valid phone number"),
    ]
    with pytest.raises(InvalidArgument) as caught:
        v.raise_if_any("the member has invalid fields")
    err = caught.value
    assert err.code is Code.INVALID_ARGUMENT
    assert err.reason == "INVALID_FIELDS"
    assert err.message == "the member has invalid fields"
    assert err.violations == (
        FieldViolation("member.given_name", "required"),
        FieldViolation("member.mobile", "not a valid phone number"),
    )
