"""The gRPC edge of member imports and exports, and the import runner.

An import is received as a stream of chunks and spooled to a scratch file
(never held in memory), checked as a file (readable, a header with a mobile
and a name column), and recorded as a RUNNING job together with the file's
content (``import_chunks``), so that the runner of any replica can work it.
The runner, a worker of the service, claims a job with a lease, reads the
file as a stream and enrolls its rows in batches: per batch the rows are
checked (pure), their home stores and mobiles looked up in one query each,
and the new members, data keys, history and ``member.enrolled`` events
inserted a table at a time; the members, the job's counters and its resume
point commit in one transaction, so a restart resumes after the last
committed batch.

The two streaming methods rely on the chassis interceptors, as the unary
ones do: the token is checked before they run and errors, mid-stream ones
included, become statuses with details.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import datetime as dt
import hashlib
import os
import secrets
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from chassis import spreadsheets
from chassis.auth import (
    Principal,
    Role,
    Scope,
    ScopeLevel,
    current_principal,
)
from chassis.crypto import DecryptionError, keys_from_env
from chassis.db import Database, utcnow
from chassis.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from chassis.grpcserver import Context
from chassis.idempotency import check_request_id, run_idempotent
from chassis.logs import get_logger
from chassis.outbox import enqueue_rows
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from chassis.wakeup import Wakeup
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import members_pb2, transfers_pb2, transfers_pb2_grpc
from services.members import events, importing
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
# A job queued through this process starts at its commit (``Wakeup``); the
# poll finds those queued through other replicas and jobs whose runner died.
POLL_SECONDS = 2.0
# How long a runner's claim on a job holds without a batch renewing it:
# how long a job whose replica died waits before another takes it over.
LEASE = dt.timedelta(seconds=60)
# How long a stopping runner waits for the batch it is writing.
BATCH_FINISH_SECONDS = 10.0
# A job received before files were kept in the database, whose file no
# replica has found for this long, has lost it.
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
    """Scratch files of this replica: uploads being checked, jobs' files
    being read. What must outlive the replica is in the database."""
    return ctx.settings.var_dir / "members" / "imports"


def spooled_file(ctx: ServiceContext, import_job_id: str, file_format: str) -> Path:
    """Where a job received before files were kept in the database has its
    file (on the replica that received it)."""
    return imports_dir(ctx) / f"{import_job_id}.{file_format}"


def member_keys(ctx: ServiceContext) -> member_store.Keys:
    ring, index = keys_from_env("MEMBERS", os.environ, production=ctx.settings.production)
    return member_store.Keys(ring, index)


# -- reading files ----------------------------------------------------------------

# What a file is made of (chassis.spreadsheets reads CSV and XLSX for every
# service); kept under these names for the runner and the tests.
BadFile = spreadsheets.BadFile
Record = spreadsheets.Record


@contextlib.contextmanager
def open_records(
    path: Path, file_format: str
) -> Iterator[tuple[rules.ColumnMap, Iterator[Record]]]:
    """The file's column map and its records, read as a stream."""
    with spreadsheets.open_sheet(path, file_format) as sheet:
        yield rules.map_header(sheet.header), sheet.records


def check_file(path: Path, file_format: str) -> rules.ColumnMap:
    """Open the file and read its header: what 'valid as a file' means."""
    with open_records(path, file_format) as (columns, _records):
        return columns


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
        return await self._import(current_principal(), request_iterator)

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
        # The upload is spooled to a scratch file of this replica while it is
        # checked, then kept in the database with the job, where the runner
        # of any replica finds it.
        spool = _new_file(folder, prefix="upload-", suffix=f".{file_format}")
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
            # The file holds personal data: it is kept sealed, under a key
            # of the job's own.
            cipher, file_key = store.FileCipher.new(self.keys.ring, job_id)
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
                    file_key=file_key,
                )
                # In the job's transaction: a committed RUNNING job always
                # has its file.
                await _store_file(session, job_id, spool, cipher)
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
                log.info("import received", import_job_id=job_id, dry_run=header.dry_run)
                return result
            # A repeat of an earlier request: report that job as it is now.
            async with self.db.sessions() as session:
                current = await store.get_job(session, result.import_job_id)
            return job_to_proto(current) if current is not None else result
        finally:
            await asyncio.to_thread(spool.unlink, missing_ok=True)

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
        path = await self._export(current_principal(), request)
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


async def _store_file(
    session: AsyncSession, import_job_id: str, path: Path, cipher: store.FileCipher
) -> None:
    """Copy a spooled upload into the job's chunks, a sealed piece at a time."""
    with path.open("rb") as handle:
        seq = 0
        while data := await asyncio.to_thread(handle.read, store.CHUNK_BYTES):
            await store.add_chunk(session, import_job_id, seq, cipher.seal(seq, data))
            seq += 1


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
    """Another runner holds the job now (this one's lease lapsed), moved it
    on, or it ended; this one stops."""


@dataclass(frozen=True)
class _Outcome:
    """What a batch does with a row: enroll it (``member`` set), or report
    its problems (refused or duplicate)."""

    row: int
    kind: str = ""
    problems: tuple[rules.RowProblem, ...] = ()
    member: domain.NewMember | None = None
    mobile_index: str = ""


@dataclass
class _JobRun:
    """One pass over a job's file."""

    job: store.ImportJobRecord
    principal: Principal
    how: importing.RowRules
    author: importing.Author
    # Mobile blind index -> the row that first had it: repeats inside the
    # file are duplicates too.
    seen: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Sealed:
    """A batch's rows after the pure checks, and the members sealed in
    advance for those that looked new (by row number)."""

    now: dt.datetime
    rows: Sequence[importing.Row]
    prepared: Mapping[int, importing.Prepared] = field(default_factory=dict)


@dataclass(frozen=True)
class _Pending:
    """A batch on its way: its records, the job's records done before it,
    and the task checking and sealing it."""

    records: Sequence[Record]
    records_done: int
    sealing: asyncio.Task[_Sealed]


def default_runner_id() -> str:
    """This process among the replicas: the host (the pod's name on a
    cluster), the process and a random part."""
    return f"{socket.gethostname()[:60]}-{os.getpid()}-{secrets.token_hex(4)}"


class ImportRunner:
    """Processes RUNNING import jobs, one at a time, oldest first, on any
    replica: a job's file is in the database, and a lease (renewed by every
    batch) keeps every other runner off the job while this one works it.
    A job whose runner died is taken over once the lease lapses; a runner
    that shuts down gives its lease up at once."""

    def __init__(
        self,
        ctx: ServiceContext,
        *,
        runner_id: str | None = None,
        lease: dt.timedelta = LEASE,
    ) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.keys = member_keys(ctx)
        self.default_region = os.environ.get("CORNUCOPIA_DEFAULT_REGION", "CN")
        self.runner_id = runner_id or default_runner_id()
        self.lease = lease
        self._renewed_at = utcnow()
        self._wakeup = Wakeup(self.db, store.IMPORT_QUEUED)

    async def run(self) -> None:
        while True:
            try:
                async with self.db.sessions() as session:
                    job_ids = await store.claimable_job_ids(session, self.runner_id, now=utcnow())
                for job_id in job_ids:
                    await self.process(job_id)
            except asyncio.CancelledError:
                raise
            except Unavailable:
                log.warning("import runner: database unavailable; retrying")
            except Exception:
                log.exception("import runner failed")
            await self._wakeup.wait(POLL_SECONDS)

    async def process(self, import_job_id: str) -> None:
        """Work the job if this runner can claim it; return when it is done,
        or when another runner holds it."""
        job = await self._claim(import_job_id)
        if job is None:
            return
        try:
            await self._process(job)
        except asyncio.CancelledError:
            # Shutting down: another replica may take the job over at once.
            try:
                await asyncio.wait_for(self._release(job), timeout=5)
            except Exception as exc:
                log.warning(
                    "import lease not given up; it lapses by itself",
                    import_job_id=job.import_job_id,
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                )
            raise

    async def _process(self, job: store.ImportJobRecord) -> None:
        try:
            fetched = await self._fetch(job)
        except _Superseded:
            log.warning("import taken over elsewhere", import_job_id=job.import_job_id)
            return
        if fetched is None:
            return
        path, temporary = fetched
        finished = False
        try:
            # Fetching a large file may take a while: the lease starts again.
            if await self._claim(job.import_job_id) is None:
                raise _Superseded
            await self._run(job, path)
        except _Superseded:
            log.warning("import taken over elsewhere", import_job_id=job.import_job_id)
        except BadFile as exc:
            finished = await self._finish(job, store.FAILED, str(exc))
        except InvalidArgument as exc:
            finished = await self._finish(
                job, store.FAILED, "; ".join(v.description for v in exc.violations)
            )
        except (UnicodeDecodeError, csv.Error):
            finished = await self._finish(job, store.FAILED, "the file cannot be read as UTF-8 CSV")
        else:
            finished = await self._finish(job, store.SUCCEEDED)
        finally:
            if temporary or finished:
                path.unlink(missing_ok=True)

    # The pure work runs in a worker thread, so that calls keep being served
    # while a batch is checked and sealed.

    async def _check(
        self, run: _JobRun, records: Sequence[Record], today: dt.date
    ) -> list[importing.Row]:
        cells = [(record.row, record.cells) for record in records]
        return await asyncio.to_thread(importing.check_rows, self.keys, run.how, today, cells)

    async def _prepare(
        self, run: _JobRun, members: Sequence[domain.NewMember], now: dt.datetime
    ) -> list[importing.Prepared]:
        return await asyncio.to_thread(importing.prepare, self.keys, run.author, now, members)

    async def _claim(self, import_job_id: str) -> store.ImportJobRecord | None:
        """Take or renew the job's lease; the job as it now is, or None when
        another runner holds it or it is no longer running."""
        now = utcnow()
        async with self.db.transaction() as session:
            if not await store.claim_job(
                session,
                import_job_id,
                runner_id=self.runner_id,
                now=now,
                lease_until=now + self.lease,
            ):
                return None
            job = await store.get_job(session, import_job_id)
        self._renewed_at = now
        return job

    async def _keep_lease(self, job: store.ImportJobRecord) -> None:
        """Renew the lease during work that writes no batch (fetching,
        re-reading the rows an earlier run committed)."""
        due = utcnow() - self._renewed_at > self.lease / 3
        if due and await self._claim(job.import_job_id) is None:
            raise _Superseded

    async def _release(self, job: store.ImportJobRecord) -> None:
        async with self.db.transaction() as session:
            await store.release_job(session, job.import_job_id, runner_id=self.runner_id)

    async def _finish(self, job: store.ImportJobRecord, state: str, reason: str = "") -> bool:
        async with self.db.transaction() as session:
            done = await store.finish_job(
                session,
                job.import_job_id,
                runner_id=self.runner_id,
                state=state,
                now=utcnow(),
                failure_reason=reason,
            )
        if done:
            log.info("import finished", import_job_id=job.import_job_id, state=state)
        return done

    async def _fetch(self, job: store.ImportJobRecord) -> tuple[Path, bool] | None:
        """The job's file from the database into a scratch file of this
        replica (removed after the run): the path, and True. A job received
        before the file was kept in the database still has it in the var
        dir of the replica that received it: that path, and False. None
        when the file cannot be had (the job is failed once it is stale)."""
        cipher = None
        if job.file_key is not None:
            try:
                cipher = store.FileCipher.of(self.keys.ring, job.import_job_id, job.file_key)
            except DecryptionError:
                reason = "the key of the uploaded file is not among the master keys"
                await self._finish(job, store.FAILED, f"{reason}; import it again")
                return None
        folder = imports_dir(self.ctx)
        folder.mkdir(parents=True, exist_ok=True)
        path = _new_file(folder, prefix=f"{job.import_job_id}-", suffix=f".{job.file_format}")
        digest = hashlib.sha256()
        chunks = 0
        intact = True
        try:
            with path.open("wb") as handle:
                while True:
                    async with self.db.sessions() as session:
                        sealed = await store.read_chunk(session, job.import_job_id, chunks)
                    if sealed is None:
                        break
                    try:
                        if cipher is None:
                            raise DecryptionError("a file piece without a key")
                        data = cipher.open(chunks, sealed)
                    except DecryptionError:
                        intact = False
                        break
                    digest.update(data)
                    await asyncio.to_thread(handle.write, data)
                    chunks += 1
                    await self._keep_lease(job)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if intact and chunks and digest.hexdigest() == job.file_sha256:
            return path, True
        path.unlink(missing_ok=True)
        if chunks or not intact:
            await self._finish(job, store.FAILED, "the uploaded file is damaged; import it again")
            return None
        legacy = spooled_file(self.ctx, job.import_job_id, job.file_format)
        if legacy.exists():
            return legacy, False
        if utcnow() - job.updated_at > STALE_JOB:
            await self._finish(job, store.FAILED, "the uploaded file was lost; import it again")
        return None

    async def _run(self, job: store.ImportJobRecord, path: Path) -> None:
        async with self.db.sessions() as session:
            definitions = await member_store.attribute_definitions_by_name(session)
        with open_records(path, job.file_format) as (columns, records):
            run = _JobRun(
                job=job,
                principal=job_principal(job),
                how=importing.RowRules(
                    columns=columns,
                    default_home_store_id=job.default_home_store_id,
                    channel=domain.EnrollmentChannel(job.enrollment_channel),
                    default_region=self.default_region,
                    definitions=definitions,
                ),
                author=importing.Author(
                    principal=job.created_by,
                    from_store=job.created_from_store,
                    channel_numbers=CHANNELS_PROTO,
                ),
            )
            done = 0
            batch_rows = BATCH_ROWS.get(self.db.dialect, DEFAULT_BATCH_ROWS)
            # Two batches in flight: while one is written, the next one's rows
            # are checked and its members sealed.
            pending: _Pending | None = None
            following: _Pending | None = None
            try:
                while True:
                    chunk = await asyncio.to_thread(_take, records, batch_rows)
                    committed = min(len(chunk), max(0, job.records_done - done))
                    if committed:
                        # Committed by an earlier run: only remember their mobiles.
                        await self._remember(run, chunk[:committed])
                    if committed < len(chunk):
                        rest = chunk[committed:]
                        sealing = asyncio.create_task(self._seal(run, rest))
                        following = _Pending(rest, done + committed, sealing)
                    done += len(chunk)
                    if pending is not None:
                        await self._batch(run, pending)
                    pending, following = following, None
                    if not chunk:
                        return
            finally:
                for left in (pending, following):
                    if left is not None:
                        left.sealing.cancel()
                        await asyncio.gather(left.sealing, return_exceptions=True)

    async def _admit(
        self, session: AsyncSession, run: _JobRun, rows: Sequence[importing.Row], *, lock: bool
    ) -> list[_Outcome]:
        """The checks against the database, a query each for the batch: the
        home stores (within the job's scope, of the tree, open; locked
        until the batch commits when it writes, as CreateMember locks
        its store), repeats inside the file, mobiles already members'. A
        valid row's mobile is remembered the first time it is seen."""
        found = await org_store.stores_by_id(
            session,
            (r.member.home_store_id for r in rows if r.member is not None),
            lock="share" if lock else None,
        )
        outcomes: list[_Outcome] = []
        for row in rows:
            if row.member is None:
                outcomes.append(_Outcome(row.row, store.REFUSED, row.problems))
                continue
            home = found.get(row.member.home_store_id)
            problem = None
            try:
                run.principal.require_store(
                    row.member.home_store_id, None if home is None else home.region_id
                )
            except PermissionDenied:
                problem = rules.RowProblem(row.row, "home_store_id", "outside your scope")
            if problem is None:
                problem = rules.home_store_problem(
                    row.row, exists=home is not None, closed=home is not None and home.closed
                )
            if problem is not None:
                outcomes.append(_Outcome(row.row, store.REFUSED, (problem,)))
                continue
            first = run.seen.setdefault(row.mobile_index, row.row)
            if first != row.row:
                reason = f"the mobile repeats row {first}"
                problem = rules.RowProblem(row.row, "mobile", reason)
                outcomes.append(_Outcome(row.row, store.DUPLICATE, (problem,)))
                continue
            outcomes.append(_Outcome(row.row, member=row.member, mobile_index=row.mobile_index))
        return outcomes

    async def _remember(self, run: _JobRun, records: Sequence[Record]) -> None:
        """Rows an earlier run committed: only their mobiles are remembered,
        so that later repeats of them are still found."""
        await self._keep_lease(run.job)
        rows = await self._check(run, records, utcnow().date())
        async with self.db.sessions() as session:
            await self._admit(session, run, rows, lock=False)

    async def _seal(self, run: _JobRun, records: Sequence[Record]) -> _Sealed:
        """A batch's work before its transaction: its rows checked, and the
        members that look new (no member has their mobile yet) sealed in
        advance. The transaction decides; this only saves it the time."""
        now = utcnow()
        rows = await self._check(run, records, now.date())
        if run.job.dry_run:
            return _Sealed(now, rows)
        # In a transaction: the lookup sets a planner option for itself only.
        async with self.db.sessions(in_transaction=True) as session:
            taken = await member_store.existing_mobile_indexes(
                session, [r.mobile_index for r in rows if r.member is not None]
            )
        likely = [
            (r.row, r.member)
            for r in rows
            if r.member is not None
            and r.mobile_index not in taken
            and run.seen.get(r.mobile_index, r.row) == r.row
        ]
        members = await self._prepare(run, [m for _, m in likely], now)
        prepared = {row: member for (row, _), member in zip(likely, members, strict=True)}
        return _Sealed(now, rows, prepared)

    async def _batch(self, run: _JobRun, batch: _Pending) -> None:
        sealed = await batch.sealing
        try:
            await self._write_batch(run, batch, sealed)
        except member_store.MobileTaken:
            # A mobile enrolled (by CreateMember, say) between the batch's
            # lookup and its insert: the whole batch rolled back; again, one
            # member at a time, each one's mobile checked and inserted under
            # a savepoint of its own.
            log.info("import batch meets an enrollment", import_job_id=run.job.import_job_id)
            await self._write_batch(run, batch, sealed, one_by_one=True)

    async def _write_batch(
        self, run: _JobRun, batch: _Pending, sealed: _Sealed, *, one_by_one: bool = False
    ) -> None:
        """The batch's transaction, finished (committed or rolled back) even
        when the runner is cancelled meanwhile; the cancellation is raised
        after it. A transaction cut short by a shutdown leaves its
        connection behind, and on SQLite that connection keeps the file's
        write lock until the pool is disposed of: the runner could not give
        its lease up, and the next start would wait out the lease."""
        write = asyncio.ensure_future(self._write_batch_whole(run, batch, sealed, one_by_one))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            if not write.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(write, timeout=BATCH_FINISH_SECONDS)
            raise

    async def _write_batch_whole(
        self, run: _JobRun, batch: _Pending, sealed: _Sealed, one_by_one: bool
    ) -> None:
        """One batch in one transaction: the lease check and renewal, the
        members (multi-row inserts of members, data keys, history and
        ``member.enrolled`` events), the job's counters, problems and
        resume point."""
        job, now = run.job, sealed.now
        async with self.db.transaction() as session:
            renewed = utcnow()
            if not await store.start_batch(
                session,
                job.import_job_id,
                runner_id=self.runner_id,
                records_done=batch.records_done,
                now=renewed,
                lease_until=renewed + self.lease,
            ):
                raise _Superseded
            self._renewed_at = renewed
            outcomes = await self._admit(session, run, sealed.rows, lock=not job.dry_run)
            taken = await member_store.existing_mobile_indexes(
                session, [o.mobile_index for o in outcomes if o.member is not None]
            )
            outcomes = [
                _already_a_member(o.row) if o.member is not None and o.mobile_index in taken else o
                for o in outcomes
            ]
            fresh = [o for o in outcomes if o.member is not None]
            if job.dry_run:
                pass
            elif one_by_one:
                enrolled = set()
                for outcome in fresh:
                    assert outcome.member is not None
                    if await self._enroll(session, job, outcome.member, now):
                        enrolled.add(outcome.row)
                outcomes = [
                    o if o.member is None or o.row in enrolled else _already_a_member(o.row)
                    for o in outcomes
                ]
            else:
                unsealed = [
                    o.member for o in fresh if o.member is not None and o.row not in sealed.prepared
                ]
                more = iter(await self._prepare(run, unsealed, now))
                prepared = [sealed.prepared.get(o.row) or next(more) for o in fresh]
                await member_store.insert_members(session, [p.member for p in prepared])
                await enqueue_rows(session, [dict(p.event) for p in prepared])
            progress, problems = _tally(len(batch.records), outcomes)
            await store.record_batch(session, job.import_job_id, progress, problems, now=renewed)

    async def _enroll(
        self,
        session: AsyncSession,
        job: store.ImportJobRecord,
        member: domain.NewMember,
        now: dt.datetime,
    ) -> bool:
        """Enroll one member as CreateMember does; False when the mobile is
        already a member's."""
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


def _already_a_member(row: int) -> _Outcome:
    problem = rules.RowProblem(row, "mobile", "already a member's mobile")
    return _Outcome(row, store.DUPLICATE, (problem,))


def _tally(
    records: int, outcomes: Sequence[_Outcome]
) -> tuple[store.Progress, list[tuple[rules.RowProblem, str]]]:
    """A batch's counts and its problems, in row order."""
    enrolled = duplicates = refused = 0
    problems: list[tuple[rules.RowProblem, str]] = []
    for outcome in outcomes:
        if outcome.member is not None:
            enrolled += 1
            continue
        if outcome.kind == store.DUPLICATE:
            duplicates += 1
        else:
            refused += 1
        problems.extend((problem, outcome.kind) for problem in outcome.problems)
    progress = store.Progress(
        records=records,
        rows_read=len(outcomes),
        enrolled=enrolled,
        duplicates=duplicates,
        refused=refused,
    )
    return progress, problems


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
