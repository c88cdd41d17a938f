"""RFC 9457 problem details: the one shape of every error the gateway
returns, whether the gateway refused the request itself, FastAPI could not
read it, or a service behind the gateway answered with a gRPC status.

Only what a Cornucopia service chose to say (a status carrying ``ErrorInfo``)
is passed on as ``detail``; transport errors and anything unexpected get a
fixed text, so addresses, stack traces and exception messages never reach a
store terminal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from chassis.errors import Code, ServiceError
from chassis.grpcclient import RpcProblem
from chassis.grpcserver import error_domain
from chassis.logs import get_logger

log = get_logger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_BASE = "https://cornucopia.dev/problems/"
DOMAIN = error_domain("gateway")
INTERNAL_DETAIL = "something went wrong on our side; quote the trace_id when you report it"

# When a service asks for no particular delay, how long a caller should
# wait before retrying a 503.
DEFAULT_RETRY_AFTER_SECONDS = 1

GRPC_TO_HTTP: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Reasons whose HTTP status is not the one of their gRPC code.
REASON_TO_HTTP: Mapping[str, int] = {
    # The key was used for a different request: the body is well formed,
    # the request just cannot be processed under that key.
    "IDEMPOTENCY_KEY_REUSED": 422,
}
SERVICE_CODE_TO_HTTP: Mapping[Code, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.FAILED_PRECONDITION: 422,
    Code.ABORTED: 409,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503,
}


class FieldError(BaseModel):
    field: str = Field(
        description=(
            "The field as the request names it: a member of the JSON body "
            "(`birthday.year`), a header (`Idempotency-Key`), a path parameter, "
            "or `body` for the body as a whole."
        ),
        examples=["mobile"],
    )
    description: str = Field(examples=["not a valid phone number"])


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (`application/problem+json`)."""

    type: str = Field(
        description="Identifies the kind of problem; one per `reason`.",
        examples=["https://cornucopia.dev/problems/invalid-fields"],
    )
    title: str = Field(description="The HTTP status phrase.", examples=["Bad Request"])
    status: int = Field(description="The HTTP status code.", examples=[400])
    detail: str = Field(
        description="What went wrong, for a person; never holds personal data.",
        examples=["the request has invalid fields"],
    )
    instance: str = Field(description="The request path.", examples=["/v1/members"])
    reason: str = Field(
        description="Machine-readable cause, stable across versions (UPPER_SNAKE_CASE).",
        examples=["INVALID_FIELDS"],
    )
    domain: str = Field(
        description="The service that chose the reason.", examples=["members.cornucopia"]
    )
    errors: list[FieldError] = Field(
        default_factory=list, description="Every invalid field of the request, when any."
    )
    trace_id: str | None = Field(
        default=None,
        description="The OpenTelemetry trace of the request; quote it when reporting a problem.",
        examples=["4bf92f3577b34da6a3ce929d0e0e4736"],
    )


class ProblemError(Exception):
    """Raised anywhere in a request to answer with a problem."""

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        *,
        domain: str = DOMAIN,
        errors: Iterable[FieldError] = (),
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.domain = domain
        self.errors = list(errors)
        self.headers = dict(headers or {})
        # RFC 9457 extension members, added to the body beside the standard
        # ones (which they never replace); JSON values. The route documents
        # them with a subclass of Problem.
        self.extensions = dict(extensions or {})


def problem_type(reason: str) -> str:
    return PROBLEM_TYPE_BASE + reason.lower().replace("_", "-")


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_response(error: ProblemError, instance: str) -> JSONResponse:
    problem = Problem(
        type=problem_type(error.reason),
        title=_phrase(error.status),
        status=error.status,
        detail=error.detail,
        instance=instance,
        reason=error.reason,
        domain=error.domain,
        errors=error.errors,
        trace_id=current_trace_id(),
    )
    body = problem.model_dump(exclude_none=True)
    for name, value in error.extensions.items():
        body.setdefault(name, value)
    return JSONResponse(
        body,
        status_code=error.status,
        headers=error.headers,
        media_type=PROBLEM_JSON,
    )


def internal_error() -> ProblemError:
    return ProblemError(500, "INTERNAL", INTERNAL_DETAIL)


def _retry_after(seconds: float | None, default: int | None) -> dict[str, str]:
    if seconds is None:
        return {} if default is None else {"Retry-After": str(default)}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _unauthenticated_headers(reason: str) -> dict[str, str]:
    if reason == "MISSING_CREDENTIALS":
        return {"WWW-Authenticate": 'Bearer realm="cornucopia"'}
    return {"WWW-Authenticate": 'Bearer realm="cornucopia", error="invalid_token"'}


def from_service_error(err: ServiceError, rename: Callable[[str], str] = str) -> ProblemError:
    """A chassis error raised in the gateway itself (e.g. by verify_token)."""
    status = REASON_TO_HTTP.get(err.reason, SERVICE_CODE_TO_HTTP[err.code])
    headers: dict[str, str] = {}
    if status == 401:
        headers = _unauthenticated_headers(err.reason)
    elif status in (429, 503):
        headers = _retry_after(
            err.retry_after_seconds, DEFAULT_RETRY_AFTER_SECONDS if status == 503 else None
        )
    return ProblemError(
        status,
        err.reason,
        err.message,
        errors=[
            FieldError(field=rename(v.field), description=v.description) for v in err.violations
        ],
        headers=headers,
    )


_TRANSPORT_DETAIL = {
    503: "the {peer} service cannot be reached right now; try again shortly",
    504: "the {peer} service did not answer in time; try again shortly",
}


def from_rpc(problem: RpcProblem, *, peer: str, rename: Callable[[str], str] = str) -> ProblemError:
    """A failed call to ``peer``. ``rename`` turns the service's field
    names (``member.mobile``) into the ones of the HTTP request."""
    status = GRPC_TO_HTTP.get(problem.code, 500)
    if problem.reason in REASON_TO_HTTP and status < 500:
        status = REASON_TO_HTTP[problem.reason]
    if status == 500:
        log.error(
            "peer call failed unexpectedly",
            peer=peer,
            code=problem.code.name,
            reason=problem.reason,
            domain=problem.domain,
            grpc_message=problem.message,
        )
        return internal_error()
    headers: dict[str, str] = {}
    if status == 401:
        headers = _unauthenticated_headers(problem.reason)
    elif status in (429, 503) or problem.retry_delay is not None:
        # A service that says when trying again makes sense (RetryInfo) is
        # passed on whatever the status: a locked PIN (422) as much as a
        # rate limit.
        headers = _retry_after(
            problem.retry_delay, DEFAULT_RETRY_AFTER_SECONDS if status == 503 else None
        )
    if not problem.from_service:
        # Not a Cornucopia service's deliberate answer: its message is
        # transport text (addresses, connection errors), kept for the logs.
        log.warning(
            "peer call failed", peer=peer, code=problem.code.name, grpc_message=problem.message
        )
        detail = _TRANSPORT_DETAIL.get(status, "{phrase}").format(peer=peer, phrase=_phrase(status))
        return ProblemError(status, problem.code.name, detail, headers=headers)
    if status >= 500:
        log.warning("peer unavailable", peer=peer, code=problem.code.name, reason=problem.reason)
    return ProblemError(
        status,
        problem.reason,
        problem.message,
        domain=problem.domain,
        errors=[
            FieldError(field=rename(v.field), description=v.description) for v in problem.violations
        ],
        headers=headers,
    )


# -- FastAPI's own errors -------------------------------------------------------


def _field_path(parts: Sequence[Any]) -> str:
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path


def validation_problem(errors: Sequence[Any]) -> ProblemError:
    """FastAPI's request validation errors as a 400 listing each field.
    Pydantic's messages name the expected shape, never the value sent."""
    fields: list[FieldError] = []
    malformed = False
    for error in errors:
        loc = tuple(error.get("loc", ()))
        where, path = (loc[0], loc[1:]) if loc else ("body", ())
        if error.get("type") == "json_invalid":
            malformed = True
            cause = (error.get("ctx") or {}).get("error", "syntax error")
            at = f" at position {path[0]}" if path and isinstance(path[0], int) else ""
            fields.append(FieldError(field="body", description=f"not valid JSON: {cause}{at}"))
            continue
        name = _field_path(path) if where == "body" else str(path[0]) if path else str(where)
        fields.append(FieldError(field=name or "body", description=str(error.get("msg", ""))))
    if malformed:
        return ProblemError(
            400, "MALFORMED_JSON", "the request body is not valid JSON", errors=fields
        )
    return ProblemError(400, "INVALID_FIELDS", "the request has invalid fields", errors=fields)


_HTTP_REASONS = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    413: "CONTENT_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def install_problem_handlers(app: FastAPI) -> None:
    """Every error FastAPI or a route raises comes out as problem+json."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        return problem_response(exc, request.url.path)

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return problem_response(from_service_error(exc), request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return problem_response(validation_problem(exc.errors()), request.url.path)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        if status >= 500:
            error = internal_error()
        else:
            phrase = _phrase(status)
            detail = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
            if detail == phrase:  # Starlette's default ("Not Found"), in our style
                detail = detail.lower()
            reason = _HTTP_REASONS.get(status, phrase.upper().replace(" ", "_"))
            error = ProblemError(status, reason, detail)
        error.headers.update(exc.headers or {})
        return problem_response(error, request.url.path)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Normally the tracing middleware answers first, inside the span;
        # this is the last resort.
        log.error("unhandled error", path=request.url.path, exc_info=exc)
        return problem_response(internal_error(), request.url.path)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
