"""The gRPC edge of member imports and exports, and the import runner.

An import is received as a stream of chunks and spooled to a file under the
service's var dir (never held in memory), checked as a file (readable, a
header with a mobile and a name column), and recorded as a RUNNING job. The
runner, a worker of the service, then reads the file as a stream and
enrolls its rows in batches: each batch's members, their
``member.enrolled`` events, the job's counters and its resume point commit
in one transaction, so a restart resumes after the last committed batch.

The chassis interceptors wrap unary calls only, so the two streaming
methods check the token and map errors themselves (``_streaming_edge``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import datetime as dt
import hashlib
import os
import tempfile
import zipfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import (
    Principal,
    Role,
    Scope,
    ScopeLevel,
    current_principal,
    reset_current_principal,
    set_current_principal,
    verify_token,
)
from chassis.crypto import keys_from_env
from chassis.db import Database, utcnow
from chassis.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from chassis.grpcserver import Context, error_domain, internal_status, to_grpc_status
from chassis.idempotency import check_request_id, run_idempotent
from chassis.logs import get_logger
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import members_pb2, transfers_pb2, transfers_pb2_grpc
from services.members import events
from services.members.domain import members as domain
from services.members.domain import transfers as rules
from services.members.server.members import CHANNELS, CHANNELS_PROTO, GENDERS
from services.members.store import members as member_store
from services.members.store import organisation as org_store
from services.members.store import transfers as store

log = get_logger(__name__)

IMPORTING_ROLES = (Role.HQ_ADMIN, Role.REGION_MANAGER, Role.STORE_MANAGER)
EXPORTING_ROLES = (Role.HQ_ADMIN, Role.REGION_MANAGER, Role.STORE_MANAGER)
# Rows per transaction. SQLite has one writer: short batches keep online
# enrollments waiting at most one batch behind an import.
BATCH_ROWS = {"sqlite": 100}
DEFAULT_BATCH_ROWS = 500
MAX_IMPORT_BYTES = 256 * 1024 * 1024
EXPORT_CHUNK_BYTES = 64 * 1024
EXPORT_PAGE = 500
POLL_SECONDS = 0.3
STALE_JOB = dt.timedelta(minutes=15)

FORMATS = {
    transfers_pb2.FILE_FORMAT_CSV: "csv",
    transfers_pb2.FILE_FORMAT_XLSX: "xlsx",
}
FORMATS_PROTO = {v: k for k, v in FORMATS.items()}
STATES_PROTO = {
    store.RUNNING: transfers_pb2.ImportJob.STATE_RUNNING,
    store.SUCCEEDED: transfers_pb2.ImportJob.STATE_SUCCEEDED,
    store.FAILED: transfers_pb2.ImportJob.STATE_FAILED,
}
KINDS_PROTO = {
    store.REFUSED: transfers_pb2.ImportProblem.KIND_REFUSED,
    store.DUPLICATE: transfers_pb2.ImportProblem.KIND_DUPLICATE,
}


def imports_dir(ctx: ServiceContext) -> Path:
    return ctx.settings.var_dir / "members" / "imports"


def spooled_file(ctx: ServiceContext, import_job_id: str, file_format: str) -> Path:
    return imports_dir(ctx) / f"{import_job_id}.{file_format}"


def member_keys(ctx: ServiceContext) -> member_store.Keys:
    ring, index = keys_from_env("MEMBERS", os.environ, production=ctx.settings.production)
    return member_store.Keys(ring, index)


# -- reading files ----------------------------------------------------------------


class BadFile(Exception):
    """The file cannot be read as the format it claims."""


@dataclass(frozen=True)
class Record:
    """One record of the file after the header: its row number as a
    spreadsheet shows it and its cells."""

    row: int
    cells: Sequence[object]


def _csv_records(path: Path) -> tuple[list[str], Iterator[Record], IO[str]]:
    handle = path.open(encoding="utf-8-sig", newline="")
    reader = csv.reader(handle)
    header = next(reader, [])

    def records() -> Iterator[Record]:
        for cells in reader:
            yield Record(reader.line_num, cells)

    return header, records(), handle


def _xlsx_records(path: Path) -> tuple[list[object], Iterator[Record], Any]:
    from openpyxl import load_workbook  # noqa: PLC0415 - heavy, only for XLSX
    from openpyxl.utils.exceptions import InvalidFileException  # noqa: PLC0415

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, KeyError, ValueError, OSError) as exc:
        raise BadFile("not an XLSX workbook") from exc
    sheet = book.worksheets[0] if book.worksheets else None
    if sheet is None:
        book.close()
        raise BadFile("the workbook has no sheet")
    rows = sheet.iter_rows(values_only=True)
    header = list(next(rows, ()) or ())

    def records() -> Iterator[Record]:
        for number, cells in enumerate(rows, start=2):
            yield Record(number, cells)

    return header, records(), book


@contextlib.contextmanager
def open_records(
    path: Path, file_format: str
) -> Iterator[tuple[rules.ColumnMap, Iterator[Record]]]:
    """The file's column map and its records, read as a stream."""
    closer: Any
    header: Sequence[object]
    if file_format == "csv":
        try:
            header, records, closer = _csv_records(path)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise BadFile("not UTF-8 CSV text") from exc
    else:
        header, records, closer = _xlsx_records(path)
    try:
        yield rules.map_header(header), records
    finally:
        closer.close()


def check_file(path: Path, file_format: str) -> rules.ColumnMap:
    """Open the file and read its header: what 'valid as a file' means."""
    with open_records(path, file_format) as (columns, _records):
        return columns


# -- the streaming edge -------------------------------------------------------------


@contextlib.contextmanager
def _principal_of(context: Context, token_secret: str) -> Iterator[Principal]:
    metadata = dict(context.invocation_metadata() or ())
    scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("send 'authorization: Bearer <token>'", reason="MISSING_CREDENTIALS")
    principal = verify_token(token_secret, token.strip())
    reset = set_current_principal(principal)
    try:
        yield principal
    finally:
        reset_current_principal(reset)


async def _abort(context: Context, exc: BaseException) -> None:
    domain_name = error_domain("members")
    if isinstance(exc, ServiceError):
        status = to_grpc_status(exc, domain_name)
    else:
        log.error("unhandled error", exc_info=exc)
        status = internal_status(domain_name)
    await context.abort(status.code, status.details, status.trailing_metadata)


# -- servicer ---------------------------------------------------------------------


def job_to_proto(job: store.ImportJobRecord) -> transfers_pb2.ImportJob:
    msg = transfers_pb2.ImportJob(
        import_job_id=job.import_job_id,
        state=STATES_PROTO[job.state],
        format=FORMATS_PROTO[job.file_format],
        dry_run=job.dry_run,
        default_home_store_id=job.default_home_store_id,
        enrollment_channel=CHANNELS_PROTO[domain.EnrollmentChannel(job.enrollment_channel)],
        rows_read=job.rows_read,
        enrolled=job.enrolled,
        duplicates=job.duplicates,
        refused=job.refused,
        ignored_columns=job.ignored_columns,
        file_sha256=job.file_sha256,
        failure_reason=job.failure_reason,
        created_by=org_pb2.AuditStamp(
            principal=job.created_by,
            store_id=job.created_from_store,
            time=events.timestamp(job.created_at),
        ),
    )
    msg.create_time.FromDatetime(job.created_at)
    msg.update_time.FromDatetime(job.updated_at)
    if job.finished_at is not None:
        msg.finish_time.FromDatetime(job.finished_at)
    return msg


class MemberTransfersServicer(transfers_pb2_grpc.MemberTransfersServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.keys = member_keys(ctx)

    # -- import ---------------------------------------------------------------

    async def ImportMembers(
        self,
        request_iterator: AsyncIterator[transfers_pb2.ImportMembersRequest],
        context: Context,
    ) -> transfers_pb2.ImportJob:
        try:
            with _principal_of(context, self.ctx.settings.token_secret) as principal:
                return await self._import(principal, request_iterator)
        except Exception as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises

    async def _import(
        self,
        principal: Principal,
        parts: AsyncIterator[transfers_pb2.ImportMembersRequest],
    ) -> transfers_pb2.ImportJob:
        principal.require_role(*IMPORTING_ROLES)
        first = await anext(aiter(parts), None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument([FieldViolation("header", "the first message must be a header")])
        header = first.header
        check_request_id(header.request_id, "header.request_id")
        file_format = FORMATS.get(header.format)
        if file_format is None:
            raise InvalidArgument([FieldViolation("header.format", "FILE_FORMAT_CSV or _XLSX")])
        channel = domain.EnrollmentChannel.BATCH_IMPORT
        if header.enrollment_channel != members_pb2.ENROLLMENT_CHANNEL_UNSPECIFIED:
            known = CHANNELS.get(header.enrollment_channel)
            if known is None:
                raise InvalidArgument([FieldViolation("header.enrollment_channel", "unknown")])
            channel = known
        default_store = header.default_home_store_id.strip()
        if default_store:
            await require_store_in_scope(self.db, principal, default_store)
        elif principal.scope.level == ScopeLevel.STORE:
            default_store = principal.scope.id

        folder = imports_dir(self.ctx)
        folder.mkdir(parents=True, exist_ok=True)
        spool = _new_file(folder, prefix="upload-", suffix=f".{file_format}")
        keep = False
        try:
            digest = await _spool(parts, spool, text=file_format == "csv")
            try:
                columns = await asyncio.to_thread(check_file, spool, file_format)
            except BadFile as exc:
                raise InvalidArgument(
                    [FieldViolation("file", str(exc))],
                    message="the file cannot be read",
                    reason="BAD_IMPORT_FILE",
                ) from None
            job_id = rules.new_import_job_id()
            target = spooled_file(self.ctx, job_id, file_format)
            # In place before the job commits: a committed RUNNING job
            # always has its file.
            await asyncio.to_thread(spool.rename, target)
            spool = target
            as_requested = transfers_pb2.ImportJob(
                format=header.format,
                dry_run=header.dry_run,
                default_home_store_id=default_store,
                enrollment_channel=CHANNELS_PROTO[channel],
                file_sha256=digest,
            )
            now = utcnow()

            async def create(session: AsyncSession) -> transfers_pb2.ImportJob:
                job = await store.insert_job(
                    session,
                    import_job_id=job_id,
                    file_format=file_format,
                    dry_run=header.dry_run,
                    default_home_store_id=default_store,
                    enrollment_channel=channel.value,
                    file_sha256=digest,
                    ignored_columns=columns.ignored,
                    created_by=principal.subject,
                    created_from_store=principal.store_id,
                    scope=str(principal.scope),
                    roles=[r.value for r in principal.roles],
                    now=now,
                )
                return job_to_proto(job)

            result = await run_idempotent(
                self.db,
                method="members.ImportMembers",
                request_id=header.request_id,
                request=as_requested,
                response_type=transfers_pb2.ImportJob,
                work=create,
            )
            if result.import_job_id == job_id:
                keep = True  # the runner owns it now
                log.info("import received", import_job_id=job_id, dry_run=header.dry_run)
                return result
            # A repeat of an earlier request: report that job as it is now.
            async with self.db.sessions() as session:
                current = await store.get_job(session, result.import_job_id)
            return job_to_proto(current) if current is not None else result
        finally:
            if not keep:
                spool.unlink(missing_ok=True)

    async def GetImportJob(
        self, request: transfers_pb2.GetImportJobRequest, context: Context
    ) -> transfers_pb2.ImportJob:
        principal = await self._job_reader()
        job = await self._job(request.import_job_id)
        _require_job_access(principal, job)
        return job_to_proto(job)

    async def ListImportProblems(
        self, request: transfers_pb2.ListImportProblemsRequest, context: Context
    ) -> transfers_pb2.ListImportProblemsResponse:
        principal = await self._job_reader()
        size = page_size(request.page_size, default=100, maximum=1000)
        token = decode_token(request.page_token) or {}
        after = token.get("seq", 0)
        if not isinstance(after, int) or token.get("job", request.import_job_id) != (
            request.import_job_id
        ):
            raise InvalidArgument([FieldViolation("page_token", "not a token for this job")])
        job = await self._job(request.import_job_id)
        _require_job_access(principal, job)
        async with self.db.sessions() as session:
            found = await store.list_problems(
                session, job.import_job_id, after_seq=after, limit=size + 1
            )
        page = found[:size]
        reply = transfers_pb2.ListImportProblemsResponse(
            problems=[
                transfers_pb2.ImportProblem(
                    row=p.row, field=p.field, reason=p.reason, kind=KINDS_PROTO[p.kind]
                )
                for p in page
            ]
        )
        if len(found) > size:
            reply.next_page_token = encode_token({"job": job.import_job_id, "seq": page[-1].seq})
        return reply

    async def _job_reader(self) -> Principal:
        principal = current_principal()
        principal.require_role(*IMPORTING_ROLES)
        return principal

    async def _job(self, import_job_id: str) -> store.ImportJobRecord:
        if not import_job_id:
            raise InvalidArgument([FieldViolation("import_job_id", "required")])
        async with self.db.sessions() as session:
            job = await store.get_job(session, import_job_id)
        if job is None:
            raise NotFound(
                "no import job with this id",
                reason="IMPORT_JOB_NOT_FOUND",
                metadata={"import_job_id": import_job_id},
            )
        return job

    # -- export ---------------------------------------------------------------

    async def ExportMembers(
        self, request: transfers_pb2.ExportMembersRequest, context: Context
    ) -> AsyncIterator[transfers_pb2.ExportMembersResponse]:
        try:
            with _principal_of(context, self.ctx.settings.token_secret) as principal:
                path = await self._export(principal, request)
        except Exception as exc:
            await _abort(context, exc)
            raise
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(EXPORT_CHUNK_BYTES):
                    yield transfers_pb2.ExportMembersResponse(chunk=chunk)
        finally:
            path.unlink(missing_ok=True)

    async def _export(
        self, principal: Principal, request: transfers_pb2.ExportMembersRequest
    ) -> Path:
        principal.require_role(*EXPORTING_ROLES)
        # Reads are chain-wide; what the caller may not read in clear is
        # masked row by row (export_row).
        where = export_filter(request)
        file_format = FORMATS[request.format]
        folder = imports_dir(self.ctx).parent / "exports"
        folder.mkdir(parents=True, exist_ok=True)
        path = _new_file(folder, prefix="export-", suffix=f".{file_format}")
        try:
            writer = _CsvWriter(path) if file_format == "csv" else _XlsxWriter(path)
            with writer:
                writer.row(list(rules.EXPORT_COLUMNS))
                after: tuple[dt.datetime, str] | None = None
                while True:
                    async with self.db.sessions() as session:
                        records = await member_store.list_members(
                            session, self.keys, where, after=after, limit=EXPORT_PAGE
                        )
                    for record in records:
                        writer.row(export_row(principal, record))
                    if len(records) < EXPORT_PAGE:
                        break
                    last = records[-1]
                    after = (last.file.enrolled_at or last.created_at, last.member_id)
        except BaseException:
            await asyncio.to_thread(path.unlink, missing_ok=True)
            raise
        return path


def export_filter(request: transfers_pb2.ExportMembersRequest) -> member_store.MemberFilter:
    """The member file's own list filter (active members only)."""
    violations: list[FieldViolation] = []
    if request.format not in FORMATS:
        violations.append(FieldViolation("format", "FILE_FORMAT_CSV or FILE_FORMAT_XLSX"))
    if request.gender not in GENDERS:
        violations.append(FieldViolation("gender", "unknown value"))
    if not 0 <= request.birthday_month <= 12:
        violations.append(FieldViolation("birthday_month", "1 to 12"))
    if violations:
        raise InvalidArgument(violations)
    gender = GENDERS[request.gender]
    home_store = request.home_store_id.strip()
    return member_store.MemberFilter(
        home_store_ids=(home_store,) if home_store else None,
        gender=gender if gender != domain.Gender.UNSPECIFIED else None,
        birth_month=request.birthday_month or None,
        enrolled_after=request.enrolled_after.ToDatetime(dt.UTC)
        if request.HasField("enrolled_after")
        else None,
        enrolled_before=request.enrolled_before.ToDatetime(dt.UTC)
        if request.HasField("enrolled_before")
        else None,
    )


def export_row(principal: Principal, record: member_store.MemberRecord) -> list[str]:
    """One member's row; personal fields masked unless the caller's role
    may read this member's file in clear (the member file's own rule)."""
    personal = domain.Personal(
        given_name=record.given_name,
        family_name=record.family_name,
        mobile=record.mobile,
        email=record.email,
        birthday=record.birthday,
    )
    if not domain.sees_in_clear(principal, record.home_store_id):
        personal = domain.mask_personal(personal)
    values = {
        "member_id": record.member_id,
        "home_store_id": record.home_store_id,
        "given_name": personal.given_name,
        "family_name": personal.family_name,
        "mobile": personal.mobile,
        "email": personal.email,
        "gender": record.gender.value,
        "birthday": rules.birthday_text(personal.birthday),
        "enrollment_channel": record.enrollment_channel.value,
        "preferred_language": record.preferred_language,
        "enrolled_at": (record.file.enrolled_at or record.created_at).isoformat(timespec="seconds"),
    }
    return [rules.safe_cell(values[name]) for name in rules.EXPORT_COLUMNS]


class _CsvWriter:
    def __init__(self, path: Path) -> None:
        # utf-8-sig: Excel opens a CSV with a byte order mark as UTF-8, so
        # Chinese names survive a double click.
        self.handle = path.open("w", encoding="utf-8-sig", newline="")
        self.writer = csv.writer(self.handle)

    def row(self, values: Sequence[str]) -> None:
        self.writer.writerow(values)

    def __enter__(self) -> _CsvWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


class _XlsxWriter:
    def __init__(self, path: Path) -> None:
        from openpyxl import Workbook  # noqa: PLC0415

        self.path = path
        self.book = Workbook(write_only=True)
        self.sheet = self.book.create_sheet("members")

    def row(self, values: Sequence[str]) -> None:
        self.sheet.append(list(values))

    def __enter__(self) -> _XlsxWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.book.save(self.path)


# -- helpers ----------------------------------------------------------------------


async def _spool(
    parts: AsyncIterator[transfers_pb2.ImportMembersRequest], path: Path, *, text: bool
) -> str:
    """Write the chunks to ``path``; return the file's SHA-256. A CSV is
    checked to be UTF-8 as it arrives."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")() if text else None
    size = 0
    with path.open("wb") as handle:
        async for part in parts:
            if part.HasField("header"):
                raise InvalidArgument([FieldViolation("header", "only the first message")])
            size += len(part.chunk)
            if size > MAX_IMPORT_BYTES:
                raise InvalidArgument(
                    [FieldViolation("file", f"at most {MAX_IMPORT_BYTES // 2**20} MiB")],
                    reason="IMPORT_FILE_TOO_LARGE",
                )
            digest.update(part.chunk)
            if decoder is not None:
                try:
                    decoder.decode(part.chunk)
                except UnicodeDecodeError:
                    raise InvalidArgument(
                        [FieldViolation("file", "not UTF-8 text")], reason="BAD_IMPORT_FILE"
                    ) from None
            handle.write(part.chunk)
    if size == 0:
        raise InvalidArgument([FieldViolation("file", "empty")], reason="BAD_IMPORT_FILE")
    if decoder is not None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InvalidArgument(
                [FieldViolation("file", "not UTF-8 text")], reason="BAD_IMPORT_FILE"
            ) from None
    return digest.hexdigest()


def _require_job_access(principal: Principal, job: store.ImportJobRecord) -> None:
    """A job is read by whoever started it and by the organisation above."""
    if principal.subject == job.created_by or principal.scope.level == ScopeLevel.HQ:
        return
    if str(principal.scope) == job.scope:
        return
    raise PermissionDenied(
        "this import job belongs to another organisation unit", reason="OUT_OF_SCOPE"
    )


async def region_of(session: AsyncSession, principal: Principal, store_id: str) -> str | None:
    """The store's region, looked up only when a region manager's scope
    needs it."""
    if principal.scope.level != ScopeLevel.REGION:
        return None
    return await org_store.region_of_store(session, store_id)


async def require_store_in_scope(db: Database, principal: Principal, store_id: str) -> None:
    region = None
    if principal.scope.level == ScopeLevel.REGION:
        async with db.sessions() as session:
            region = await org_store.region_of_store(session, store_id)
    principal.require_store(store_id, region)


def job_principal(job: store.ImportJobRecord) -> Principal:
    return Principal(
        subject=job.created_by,
        roles=frozenset(Role(r) for r in job.roles),
        scope=Scope.parse(job.scope),
        store_id=job.created_from_store,
    )


# -- the runner ---------------------------------------------------------------------


class _Superseded(Exception):
    """Another runner moved the job on; this one stops."""


@dataclass
class _JobRun:
    """One pass over a job's file."""

    job: store.ImportJobRecord
    principal: Principal
    channel: domain.EnrollmentChannel
    columns: rules.ColumnMap
    # The chain's own attributes, checked as CreateMember checks them.
    definitions: Mapping[str, domain.AttributeDefinition] = field(default_factory=dict)
    # Mobile blind index -> the row that first had it: repeats inside the
    # file are duplicates too.
    seen: dict[str, int] = field(default_factory=dict)
    regions: dict[str, str | None] = field(default_factory=dict)

    async def in_scope(self, session: AsyncSession, store_id: str) -> bool:
        if store_id not in self.regions:
            self.regions[store_id] = await region_of(session, self.principal, store_id)
        try:
            self.principal.require_store(store_id, self.regions[store_id])
        except PermissionDenied:
            return False
        return True


class ImportRunner:
    """Processes RUNNING import jobs, one at a time, oldest first; on start
    it picks up the jobs a previous instance left running."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.keys = member_keys(ctx)
        self.default_region = os.environ.get("CORNUCOPIA_DEFAULT_REGION", "CN")

    async def run(self) -> None:
        while True:
            try:
                async with self.db.sessions() as session:
                    job_ids = await store.running_job_ids(session)
                for job_id in job_ids:
                    await self.process(job_id)
            except asyncio.CancelledError:
                raise
            except Unavailable:
                log.warning("import runner: database unavailable; retrying")
            except Exception:
                log.exception("import runner failed")
            await asyncio.sleep(POLL_SECONDS)

    async def process(self, import_job_id: str) -> None:
        async with self.db.sessions() as session:
            job = await store.get_job(session, import_job_id)
        if job is None or job.state != store.RUNNING:
            return
        path = spooled_file(self.ctx, job.import_job_id, job.file_format)
        if not path.exists():
            # Another replica's upload (its var dir holds the file), unless
            # nobody has moved the job for a long time: then the file is gone.
            if utcnow() - job.updated_at > STALE_JOB:
                await self._finish(job, store.FAILED, "the uploaded file was lost; import it again")
            return
        try:
            await self._run(job, path)
        except _Superseded:
            log.warning("import moved on elsewhere", import_job_id=job.import_job_id)
            return
        except BadFile as exc:
            await self._finish(job, store.FAILED, str(exc))
        except InvalidArgument as exc:
            await self._finish(job, store.FAILED, "; ".join(v.description for v in exc.violations))
        except (UnicodeDecodeError, csv.Error):
            await self._finish(job, store.FAILED, "the file cannot be read as UTF-8 CSV")
        else:
            await self._finish(job, store.SUCCEEDED)
        path.unlink(missing_ok=True)

    async def _finish(self, job: store.ImportJobRecord, state: str, reason: str = "") -> None:
        async with self.db.transaction() as session:
            await store.finish_job(
                session, job.import_job_id, state=state, now=utcnow(), failure_reason=reason
            )
        log.info("import finished", import_job_id=job.import_job_id, state=state)

    async def _run(self, job: store.ImportJobRecord, path: Path) -> None:
        async with self.db.sessions() as session:
            definitions = await member_store.attribute_definitions_by_name(session)
        with open_records(path, job.file_format) as (columns, records):
            run = _JobRun(
                job=job,
                principal=job_principal(job),
                channel=domain.EnrollmentChannel(job.enrollment_channel),
                columns=columns,
                definitions=definitions,
            )
            done = 0
            batch_rows = BATCH_ROWS.get(self.db.dialect, DEFAULT_BATCH_ROWS)
            while True:
                chunk = await asyncio.to_thread(_take, records, batch_rows)
                if not chunk:
                    return
                committed = min(len(chunk), max(0, job.records_done - done))
                if committed:
                    # Committed by an earlier run: only remember their mobiles.
                    async with self.db.sessions() as session:
                        for record in chunk[:committed]:
                            await self._evaluate(session, run, record)
                done += len(chunk)
                if committed < len(chunk):
                    await self._batch(
                        run, chunk[committed:], records_done=done - len(chunk) + committed
                    )

    async def _evaluate(
        self, session: AsyncSession, run: _JobRun, record: Record
    ) -> domain.NewMember | list[rules.RowProblem] | None:
        """A row's validated member, or why it is refused; None for a blank
        row. Remembers the mobile of a valid row the first time."""
        if rules.is_blank(record.cells):
            return None
        asked = rules.row_to_enrollment(
            record.row,
            record.cells,
            run.columns,
            default_home_store_id=run.job.default_home_store_id,
            channel=run.channel,
        )
        if isinstance(asked, list):
            return asked
        try:
            member = domain.validate_enrollment(
                asked,
                today=utcnow().date(),
                default_region=self.default_region,
                default_channel=run.channel,
                definitions=run.definitions,
            )
        except InvalidArgument as exc:
            return rules.violations_to_problems(record.row, exc.violations)
        if not await run.in_scope(session, member.home_store_id):
            return [rules.RowProblem(record.row, "home_store_id", "outside your scope")]
        run.seen.setdefault(self.keys.mobile_index(member.mobile), record.row)
        return member

    async def _batch(self, run: _JobRun, records: Sequence[Record], *, records_done: int) -> None:
        rows_read = enrolled = duplicates = refused = 0
        problems: list[tuple[rules.RowProblem, str]] = []
        now = utcnow()
        async with self.db.transaction() as session:
            if not await store.start_batch(
                session, run.job.import_job_id, records_done=records_done, now=now
            ):
                raise _Superseded
            for record in records:
                outcome = await self._evaluate(session, run, record)
                if outcome is None:
                    continue
                rows_read += 1
                if isinstance(outcome, list):
                    refused += 1
                    problems.extend((p, store.REFUSED) for p in outcome)
                    continue
                first = run.seen[self.keys.mobile_index(outcome.mobile)]
                if first != record.row:
                    duplicates += 1
                    reason = f"the mobile repeats row {first}"
                    problems.append(
                        (rules.RowProblem(record.row, "mobile", reason), store.DUPLICATE)
                    )
                elif await self._enroll(session, run.job, outcome, now):
                    enrolled += 1
                else:
                    duplicates += 1
                    reason = "already a member's mobile"
                    problems.append(
                        (rules.RowProblem(record.row, "mobile", reason), store.DUPLICATE)
                    )
            await store.record_batch(
                session,
                run.job.import_job_id,
                store.Progress(
                    records=len(records),
                    rows_read=rows_read,
                    enrolled=enrolled,
                    duplicates=duplicates,
                    refused=refused,
                ),
                problems,
                now=now,
            )

    async def _enroll(
        self,
        session: AsyncSession,
        job: store.ImportJobRecord,
        member: domain.NewMember,
        now: dt.datetime,
    ) -> bool:
        """Enroll one member (or, in a dry run, check that it could be);
        False when the mobile is already a member's."""
        if job.dry_run:
            existing = await member_store.member_id_by_mobile(session, self.keys, member.mobile)
            return existing is None
        member_id = domain.new_member_id()
        try:
            record = await member_store.insert_member(
                session,
                self.keys,
                member_id,
                member,
                principal=job.created_by,
                from_store=job.created_from_store,
                now=now,
            )
        except member_store.MobileTaken:
            return False
        await events.member_enrolled(
            session,
            member_id=record.member_id,
            home_store_id=record.home_store_id,
            channel=CHANNELS_PROTO[record.enrollment_channel],
            language=record.preferred_language,
            enrolled_at=now,
        )
        return True


def _new_file(folder: Path, *, prefix: str, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.close(handle)
    return Path(name)


def _take(records: Iterator[Record], count: int) -> list[Record]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) >= count:
            break
    return batch
