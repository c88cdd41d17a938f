"""Errors a service raises on purpose. Pure: no gRPC import, so domain code
can raise them; the gRPC edge turns them into statuses with google.rpc
details (see chassis.grpcserver) and the gateway into problem+json.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass


class Code(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ServiceError(Exception):
    """An error meant for the caller. ``message`` must never hold personal
    data or internals: it is sent as is."""

    code: Code = Code.FAILED_PRECONDITION

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)
        self.retry_after_seconds = retry_after_seconds


class InvalidArgument(ServiceError):
    code = Code.INVALID_ARGUMENT

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        *,
        message: str = "the request has invalid fields",
        reason: str = "INVALID_FIELDS",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, violations=violations)


class NotFound(ServiceError):
    code = Code.NOT_FOUND


class AlreadyExists(ServiceError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = Code.FAILED_PRECONDITION


class Aborted(ServiceError):
    code = Code.ABORTED


class Unauthenticated(ServiceError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = Code.UNAVAILABLE


class Violations:
    """Collects field violations so that a request reports every problem at
    once, then raises them together."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[FieldViolation]:
        return iter(self._items)

    def raise_if_any(self, message: str = "the request has invalid fields") -> None:
        if self._items:
            raise InvalidArgument(self._items, message=message)
