"""Member imports and exports over HTTP: the upload is streamed to the
members service as it arrives (never held whole), the export streamed back
as it is produced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import quote

import grpc
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from chassis.auth import verify_token
from chassis.grpcclient import bearer, rich_error
from cornucopia.members.v1 import members_pb2, transfers_pb2, transfers_pb2_grpc
from services.gateway.problems import FieldError, Problem, ProblemError, from_rpc

if TYPE_CHECKING:
    from services.gateway.deps import Peers

TRANSFERS_SERVICE = transfers_pb2.DESCRIPTOR.services_by_name["MemberTransfersService"]
# Paths whose request bodies are files: exempt from the gateway's small-body limit.
UPLOAD_PATHS = frozenset({"/v1/member-imports"})
CALL_TIMEOUT_SECONDS = 5.0
# An upload or an export of a large file takes a while; the call still ends.
FILE_TIMEOUT_SECONDS = 600.0

FORMATS = {"csv": transfers_pb2.FILE_FORMAT_CSV, "xlsx": transfers_pb2.FILE_FORMAT_XLSX}
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
GENDERS = {
    "female": members_pb2.GENDER_FEMALE,
    "male": members_pb2.GENDER_MALE,
    "other": members_pb2.GENDER_OTHER,
}
PROBLEMS = {
    s: {"model": Problem}
    for s in (400, 401, 403, 404, 409, 413, 422, 429, 500, 503, 504)  # the usual set
}

router = APIRouter(tags=["member files"])


class ImportJob(BaseModel):
    import_job_id: str = Field(examples=["J7Q2K9X4TD5M"])
    state: Literal["running", "succeeded", "failed"]
    format: Literal["csv", "xlsx"]
    dry_run: bool
    default_home_store_id: str
    rows_read: int
    enrolled: int
    duplicates: int = Field(description="Rows whose mobile is already a member's or repeated.")
    refused: int = Field(description="Rows with invalid fields; see the problems.")
    ignored_columns: list[str]
    failure_reason: str = ""


class ImportProblem(BaseModel):
    row: int = Field(description="As a spreadsheet numbers it; the header is row 1.")
    field: str = Field(examples=["mobile"])
    reason: str
    kind: Literal["refused", "duplicate"]


class ImportProblems(BaseModel):
    problems: list[ImportProblem]
    next_page_token: str = ""


_STATES = {
    transfers_pb2.ImportJob.STATE_RUNNING: "running",
    transfers_pb2.ImportJob.STATE_SUCCEEDED: "succeeded",
    transfers_pb2.ImportJob.STATE_FAILED: "failed",
}
_KINDS = {
    transfers_pb2.ImportProblem.KIND_REFUSED: "refused",
    transfers_pb2.ImportProblem.KIND_DUPLICATE: "duplicate",
}


def job_from_proto(job: transfers_pb2.ImportJob) -> ImportJob:
    return ImportJob(
        import_job_id=job.import_job_id,
        state=_STATES.get(job.state, "running"),  # type: ignore[arg-type]
        format="xlsx" if job.format == transfers_pb2.FILE_FORMAT_XLSX else "csv",
        dry_run=job.dry_run,
        default_home_store_id=job.default_home_store_id,
        rows_read=job.rows_read,
        enrolled=job.enrolled,
        duplicates=job.duplicates,
        refused=job.refused,
        ignored_columns=list(job.ignored_columns),
        failure_reason=job.failure_reason,
    )


def _stub(request: Request) -> transfers_pb2_grpc.MemberTransfersServiceAsyncStub:
    peers: Peers = request.app.state.peers
    return peers.stub(transfers_pb2_grpc.MemberTransfersServiceStub, peers.members_channel)  # type: ignore[return-value]


def _token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ProblemError(
            401,
            "MISSING_CREDENTIALS",
            "send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="cornucopia"'},
        )
    verify_token(request.app.state.settings.token_secret, token.strip())
    return token.strip()


def _failed(exc: grpc.aio.AioRpcError) -> ProblemError:
    return from_rpc(rich_error(exc), peer="members")


@router.post(
    "/v1/member-imports",
    summary="Import a file of members",
    description="The request body is the file itself (CSV in UTF-8, or XLSX), streamed. "
    "Header row names in English or Chinese (`name`/`姓名`, `mobile`/`手机号`, `email`/`邮箱`, "
    "`gender`/`性别`, `birthday`/`生日`, `store`/`门店`). Answers 202 as soon as the file is "
    "received and readable; poll the job for progress. Needs an `Idempotency-Key`.",
    status_code=202,
    responses=PROBLEMS,  # type: ignore[arg-type]
    operation_id="importMembers",
)
async def import_members(
    request: Request,
    response: Response,
    *,
    file_format: Annotated[Literal["csv", "xlsx"], Query(alias="format")] = "csv",
    dry_run: bool = False,
    default_home_store_id: Annotated[str, Query(max_length=32)] = "",
    key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> ImportJob:
    token = _token(request)
    if key is None or not key.strip():
        raise ProblemError(
            400,
            "IDEMPOTENCY_KEY_REQUIRED",
            "send an Idempotency-Key header so that the upload can be retried safely",
            errors=[FieldError(field="Idempotency-Key", description="required")],
        )

    async def parts() -> AsyncIterator[transfers_pb2.ImportMembersRequest]:
        yield transfers_pb2.ImportMembersRequest(
            header=transfers_pb2.ImportHeader(
                request_id=key.strip(),
                format=FORMATS[file_format],
                dry_run=dry_run,
                default_home_store_id=default_home_store_id,
            )
        )
        async for chunk in request.stream():
            if chunk:
                yield transfers_pb2.ImportMembersRequest(chunk=chunk)

    try:
        job = await _stub(request).ImportMembers(
            parts(), metadata=bearer(token), timeout=FILE_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    response.headers["Location"] = f"/v1/member-imports/{quote(job.import_job_id, safe='')}"
    return job_from_proto(job)


@router.get(
    "/v1/member-imports/{import_job_id}",
    summary="An import job and its progress",
    responses=PROBLEMS,  # type: ignore[arg-type]
    operation_id="getMemberImport",
)
async def get_import(
    request: Request, import_job_id: Annotated[str, Path(min_length=1, max_length=16)]
) -> ImportJob:
    try:
        job = await _stub(request).GetImportJob(
            transfers_pb2.GetImportJobRequest(import_job_id=import_job_id),
            metadata=bearer(_token(request)),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    return job_from_proto(job)


@router.get(
    "/v1/member-imports/{import_job_id}/problems",
    summary="The rows an import refused or counted as duplicates",
    responses=PROBLEMS,  # type: ignore[arg-type]
    operation_id="listMemberImportProblems",
)
async def list_import_problems(
    request: Request,
    import_job_id: Annotated[str, Path(min_length=1, max_length=16)],
    page_size: Annotated[int, Query(ge=0, le=1000)] = 0,
    page_token: Annotated[str, Query(max_length=1024)] = "",
) -> ImportProblems:
    try:
        reply = await _stub(request).ListImportProblems(
            transfers_pb2.ListImportProblemsRequest(
                import_job_id=import_job_id, page_size=page_size, page_token=page_token
            ),
            metadata=bearer(_token(request)),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None
    return ImportProblems(
        problems=[
            ImportProblem(
                row=p.row,
                field=p.field,
                reason=p.reason,
                kind=_KINDS.get(p.kind, "refused"),  # type: ignore[arg-type]
            )
            for p in reply.problems
        ],
        next_page_token=reply.next_page_token,
    )


@router.get(
    "/v1/members/export",
    summary="Export a filtered member list",
    description="A CSV (UTF-8 with a byte order mark, for Excel) or XLSX file, streamed. "
    "Personal fields are masked unless your role may read the member's file in clear.",
    response_class=StreamingResponse,
    responses={200: {"content": {MEDIA_TYPES["csv"]: {}, MEDIA_TYPES["xlsx"]: {}}}, **PROBLEMS},  # type: ignore[dict-item]
    operation_id="exportMembers",
)
async def export_members(
    request: Request,
    file_format: Annotated[Literal["csv", "xlsx"], Query(alias="format")] = "csv",
    home_store_id: Annotated[str, Query(max_length=32)] = "",
    gender: Literal["female", "male", "other"] | None = None,
    birthday_month: Annotated[int, Query(ge=0, le=12)] = 0,
) -> StreamingResponse:
    call = _stub(request).ExportMembers(
        transfers_pb2.ExportMembersRequest(
            format=FORMATS[file_format],
            home_store_id=home_store_id,
            gender=GENDERS[gender] if gender else members_pb2.GENDER_UNSPECIFIED,
            birthday_month=birthday_month,
        ),
        metadata=bearer(_token(request)),
        timeout=FILE_TIMEOUT_SECONDS,
    )
    stream = aiter(call)
    # The first chunk before the response starts: an error becomes a
    # problem, not a truncated file.
    try:
        first = await anext(stream, None)
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc) from None

    async def body() -> AsyncIterator[bytes]:
        if first is not None:
            yield first.chunk
        async for part in stream:
            yield part.chunk

    return StreamingResponse(
        body(),
        media_type=MEDIA_TYPES[file_format],
        headers={"Content-Disposition": f'attachment; filename="members.{file_format}"'},
    )
