"""Member imports and exports on real databases (SQLite and PostgreSQL)
and NATS: counts and problems of files with good, bad and duplicate rows,
the same file twice, dry runs, masking in exports, resume after a restart."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import sqlalchemy as sa
from openpyxl import Workbook, load_workbook

from chassis.auth import Role, Scope, ScopeLevel
from chassis.config import Settings
from chassis.db import outbox_table, utcnow
from cornucopia.common.v1 import date_pb2
from cornucopia.members.v1 import (
    events_pb2,
    members_pb2,
    members_pb2_grpc,
    organisation_pb2,
    organisation_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
)
from services.gateway.server import create_app
from services.members.server import definition as members_definition
from services.members.server import transfers as transfers_server
from services.members.server.transfers import ImportRunner
from services.members.store import members as member_store
from services.members.store import metadata
from services.members.store import transfers as transfers_store
from services.members.store.members import members as members_table
from tests.integration.conftest import (
    Suite,
    a_store,
    auth,
    eventually,
    rpc_details,
    seed_organisation,
    token,
)
from tests.integration.infra import DatabaseFactory, migrate, schema_drift

Job = transfers_pb2.ImportJob
CSV = transfers_pb2.FILE_FORMAT_CSV
XLSX = transfers_pb2.FILE_FORMAT_XLSX

# Row 2 good, 3 good (Chinese values), 4 bad mobile, 5 bad birthday and
# e-mail, 6 blank (skipped), 7 repeats row 2's mobile in another format,
# 8 already a member (enrolled before the import), 9 good with no store
# (the default applies).
HEADER = ["姓名", "手机号", "邮箱", "性别", "生日", "门店", "积分"]
ROWS: list[list[object]] = [
    ["Li Na", "13800138001", "li@example.com", "female", "1990-05-17", "S001", "10"],
    ["王伟", "139 0013 9002", "", "男", "1985年2月3日", "S002", ""],
    ["Bad Phone", "12345", "", "", "", "S001", ""],
    ["Bad Dates", "13800138004", "nope", "", "2090-01-01", "S001", ""],
    ["", "", "", "", "", "", ""],
    ["Li Again", "+86 138 0013 8001", "", "", "", "S001", ""],
    ["Known", "13800138008", "", "", "", "S001", ""],
    ["No Store", "13800138009", "", "", "", "", ""],
]


def csv_bytes(header: Sequence[object], rows: Sequence[Sequence[object]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return b"\xef\xbb\xbf" + out.getvalue().encode()


def xlsx_bytes(header: Sequence[object], rows: Sequence[Sequence[object]]) -> bytes:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(list(header))
    for row in rows:
        sheet.append(list(row))
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def stub(suite: Suite) -> transfers_pb2_grpc.MemberTransfersServiceStub:
    return transfers_pb2_grpc.MemberTransfersServiceStub(suite.channels["members"])


async def import_file(
    suite: Suite,
    data: bytes,
    file_format: transfers_pb2.FileFormat.ValueType = CSV,
    *,
    request_id: str | None = None,
    dry_run: bool = False,
    default_store: str = "S001",
    bearer: str | None = None,
    chunk: int = 4096,
) -> Job:
    async def parts() -> AsyncIterator[transfers_pb2.ImportMembersRequest]:
        yield transfers_pb2.ImportMembersRequest(
            header=transfers_pb2.ImportHeader(
                request_id=request_id or str(uuid.uuid4()),
                format=file_format,
                dry_run=dry_run,
                default_home_store_id=default_store,
            )
        )
        for start in range(0, len(data), chunk):
            yield transfers_pb2.ImportMembersRequest(chunk=data[start : start + chunk])

    job: Job = await stub(suite).ImportMembers(parts(), metadata=auth(bearer))
    return job


async def finished(suite: Suite, job_id: str, timeout: float = 30.0) -> Job:
    async def probe() -> Job:
        job: Job = await stub(suite).GetImportJob(
            transfers_pb2.GetImportJobRequest(import_job_id=job_id), metadata=auth()
        )
        return job

    return await eventually(probe, lambda j: j.state != Job.STATE_RUNNING, timeout=timeout)


async def problems(suite: Suite, job_id: str, page_size: int = 2) -> list[tuple[int, str, int]]:
    found: list[tuple[int, str, int]] = []
    page_token = ""
    while True:
        reply = await stub(suite).ListImportProblems(
            transfers_pb2.ListImportProblemsRequest(
                import_job_id=job_id, page_size=page_size, page_token=page_token
            ),
            metadata=auth(),
        )
        found.extend((p.row, p.field, p.kind) for p in reply.problems)
        page_token = reply.next_page_token
        if not page_token:
            return found


async def count(suite: Suite, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    async with suite.runtimes["members"].db.sessions() as session:
        query = sa.select(sa.func.count()).select_from(table)
        for clause in where:
            query = query.where(clause)
        return int((await session.execute(query)).scalar_one())


async def enroll_known(suite: Suite) -> None:
    await members_pb2_grpc.MembersServiceStub(suite.channels["members"]).CreateMember(
        members_pb2.CreateMemberRequest(
            request_id="known-member",
            member=members_pb2.Member(
                home_store_id="S001", given_name="Known", mobile="+8613800138008"
            ),
        ),
        metadata=auth(),
    )


REFUSED = transfers_pb2.ImportProblem.KIND_REFUSED
DUPLICATE = transfers_pb2.ImportProblem.KIND_DUPLICATE
EXPECTED_PROBLEMS = [
    (4, "mobile", REFUSED),
    (5, "email", REFUSED),
    (5, "birthday", REFUSED),
    (7, "mobile", DUPLICATE),
    (8, "mobile", DUPLICATE),
]


def counts(job: Job) -> tuple[int, int, int, int]:
    return (job.rows_read, job.enrolled, job.duplicates, job.refused)


@pytest.mark.parametrize("file_format", [CSV, XLSX], ids=["csv", "xlsx"])
async def test_import_counts_good_bad_and_duplicate_rows_and_is_safe_to_repeat(
    suite: Suite, database_url: DatabaseFactory, file_format: transfers_pb2.FileFormat.ValueType
) -> None:
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    await enroll_known(suite)
    data = (csv_bytes if file_format == CSV else xlsx_bytes)(HEADER, ROWS)

    started = await import_file(suite, data, file_format, request_id="import-1")
    assert started.state == Job.STATE_RUNNING
    assert list(started.ignored_columns) == ["积分"]
    job = await finished(suite, started.import_job_id)
    assert job.state == Job.STATE_SUCCEEDED, job.failure_reason
    assert counts(job) == (7, 3, 2, 2)
    assert sorted(await problems(suite, job.import_job_id)) == sorted(EXPECTED_PROBLEMS)
    assert await count(suite, members_table) == 4
    assert await count(suite, members_table, members_table.c.home_store_id == "S002") == 1
    assert (
        await count(suite, members_table, members_table.c.enrollment_channel == "batch_import") == 3
    )
    assert (
        await count(suite, outbox_table, outbox_table.c.subject == "members.v1.member.enrolled")
        == 4
    )

    # The same request again: the same job, nothing new.
    again = await import_file(suite, data, file_format, request_id="import-1")
    assert again.import_job_id == job.import_job_id
    assert again.state == Job.STATE_SUCCEEDED

    # The same file under a new request: every good row is now a duplicate.
    second = await finished(suite, (await import_file(suite, data, file_format)).import_job_id)
    assert counts(second) == (7, 0, 5, 2)
    assert await count(suite, members_table) == 4


async def test_dry_run_reports_and_writes_no_member(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    await enroll_known(suite)
    job = await finished(
        suite, (await import_file(suite, csv_bytes(HEADER, ROWS), dry_run=True)).import_job_id
    )
    assert job.dry_run
    assert counts(job) == (7, 3, 2, 2)
    assert sorted(await problems(suite, job.import_job_id)) == sorted(EXPECTED_PROBLEMS)
    assert await count(suite, members_table) == 1
    assert (
        await count(suite, outbox_table, outbox_table.c.subject == "members.v1.member.enrolled")
        == 1
    )


async def test_unreadable_files_and_callers_are_refused(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(suite, csv_bytes(["name", "email"], [["a", "b"]]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_details(caught.value)["reason"] == "BAD_IMPORT_FILE"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(suite, b"PK\x03\x04 not really a workbook", XLSX)
    assert rpc_details(caught.value)["reason"] == "BAD_IMPORT_FILE"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(suite, "姓名,手机\n李,1\n".encode("gb18030"))
    assert rpc_details(caught.value)["violations"] == {"file": "not UTF-8 text"}

    await import_file(suite, csv_bytes(HEADER, ROWS), request_id="reused")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(suite, csv_bytes(HEADER, ROWS[:2]), request_id="reused")
    assert rpc_details(caught.value)["reason"] == "IDEMPOTENCY_KEY_REUSED"

    operator = token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(suite, csv_bytes(HEADER, ROWS), bearer=operator)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(suite, csv_bytes(HEADER, ROWS), bearer="not-a-token")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_store_manager_imports_into_their_own_store_only(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    manager = token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "mgr-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(suite, csv_bytes(HEADER, ROWS), default_store="S002", bearer=manager)
    assert rpc_details(caught.value)["reason"] == "OUT_OF_SCOPE"
    started = await import_file(suite, csv_bytes(HEADER, ROWS), default_store="", bearer=manager)
    job = await finished(suite, started.import_job_id)
    # Row 3 names store S002: outside a store manager's scope.
    assert counts(job) == (7, 3, 1, 3)
    assert (3, "home_store_id", REFUSED) in await problems(suite, job.import_job_id)


async def export(
    suite: Suite, file_format: transfers_pb2.FileFormat.ValueType, bearer: str, **filters: object
) -> list[dict[str, str]]:
    request = transfers_pb2.ExportMembersRequest(format=file_format, **filters)  # type: ignore[arg-type]
    data = b"".join(
        [part.chunk async for part in stub(suite).ExportMembers(request, metadata=auth(bearer))]
    )
    if file_format == CSV:
        return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    sheet = load_workbook(io.BytesIO(data), read_only=True).worksheets[0]
    rows = [[c or "" for c in row] for row in sheet.iter_rows(values_only=True)]
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


@pytest.mark.parametrize("file_format", [CSV, XLSX], ids=["csv", "xlsx"])
async def test_export_masks_personal_fields_by_role(
    suite: Suite, database_url: DatabaseFactory, file_format: transfers_pb2.FileFormat.ValueType
) -> None:
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    await finished(suite, (await import_file(suite, csv_bytes(HEADER, ROWS))).import_job_id)

    clear = await export(suite, file_format, token())
    assert len(clear) == 4
    by_mobile = {row["mobile"]: row for row in clear}
    assert by_mobile["+8613800138001"]["given_name"] == "Li Na"
    assert by_mobile["+8613800138001"]["email"] == "li@example.com"
    assert by_mobile["+8613800138001"]["birthday"] == "1990-05-17"
    assert by_mobile["+8613900139002"]["given_name"] == "王伟"

    only_s002 = await export(suite, file_format, token(), home_store_id="S002")
    assert [r["given_name"] for r in only_s002] == ["王伟"]
    women = await export(suite, file_format, token(), gender=members_pb2.GENDER_FEMALE)
    assert [r["given_name"] for r in women] == ["Li Na"]
    may = await export(suite, file_format, token(), birthday_month=5)
    assert [r["given_name"] for r in may] == ["Li Na"]

    # A manager of another store sees the chain's members masked.
    other = token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S009"), "mgr-9")
    masked = await export(suite, file_format, other)
    assert len(masked) == 4
    for row in masked:
        assert "138001" not in row["mobile"] and "139002" not in row["mobile"]
        assert "****" in row["mobile"]
        assert row["birthday"] == ""
    names = {row["member_id"]: row["given_name"] for row in masked}
    assert "Li Na" not in names.values() and "王伟" not in names.values()
    assert {n[:1] for n in names.values()} == {"L", "王", "K", "N"}

    operator = token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await export(suite, file_format, operator)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_import_resumes_after_a_restart(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    url = await database_url("members")
    await suite.start(members_definition, url)
    await seed_organisation(suite)
    total = 1500
    rows = [[f"Member {n}", f"+86139{n:08d}", "", "", "", "S001", ""] for n in range(total)]
    started = await import_file(suite, csv_bytes(HEADER, rows), chunk=64 * 1024)

    async def probe() -> Job:
        job: Job = await stub(suite).GetImportJob(
            transfers_pb2.GetImportJobRequest(import_job_id=started.import_job_id),
            metadata=auth(),
        )
        return job

    partway = await eventually(probe, lambda j: j.rows_read > 0, interval=0.02)
    assert partway.state == Job.STATE_RUNNING, "the import finished before the restart"
    await suite.stop("members")

    await suite.start(members_definition, url)
    # Well within the lease (60 s): the stopped runner gave the job up, so
    # the new one takes it at once instead of waiting for the lease to lapse.
    job = await finished(suite, started.import_job_id, timeout=30)
    assert job.state == Job.STATE_SUCCEEDED
    assert counts(job) == (total, total, 0, 0), await problems(suite, job.import_job_id)
    assert await count(suite, members_table) == total
    spool = suite.var_dir / "members" / "imports"
    assert not list(spool.glob(f"{started.import_job_id}.*"))


async def test_import_and_export_through_the_gateway(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    members = await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    settings = Settings(
        service="gateway",
        environment="test",
        var_dir=suite.var_dir,
        nats_url=suite.nats_url,
        peers={"members": f"127.0.0.1:{members.port}"},
    )
    app = create_app(settings)
    headers = {"authorization": f"Bearer {token()}"}
    # Padding rows push the upload past the gateway's small-body limit.
    padding = [[f"Pad {n}", f"+86137{n:08d}", "", "", "", "S001", "x" * 40] for n in range(1500)]
    data = csv_bytes(HEADER, [*ROWS, *padding])
    assert len(data) > 64 * 1024

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 10_000):
            yield data[start : start + 10_000]

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60
    ) as http:
        missing_key = await http.post(
            "/v1/member-imports?format=csv", content=data, headers=headers
        )
        assert missing_key.status_code == 400
        started = await http.post(
            "/v1/member-imports?format=csv&default_home_store_id=S001",
            content=chunks(),
            headers={**headers, "idempotency-key": "upload-1"},
        )
        assert started.status_code == 202, started.text
        job_id = started.json()["import_job_id"]
        assert started.headers["location"] == f"/v1/member-imports/{job_id}"

        async def probe() -> dict[str, object]:
            reply = await http.get(f"/v1/member-imports/{job_id}", headers=headers)
            body: dict[str, object] = reply.json()
            return body

        job = await eventually(probe, lambda j: j["state"] != "running", timeout=90)
        assert job["state"] == "succeeded"
        assert (job["rows_read"], job["enrolled"], job["duplicates"], job["refused"]) == (
            1507,
            1504,
            1,
            2,
        )
        page = (
            await http.get(f"/v1/member-imports/{job_id}/problems?page_size=2", headers=headers)
        ).json()
        assert [p["row"] for p in page["problems"]] == [4, 5]
        assert page["next_page_token"]

        export = await http.get("/v1/members/export?format=csv&home_store_id=S002", headers=headers)
        assert export.status_code == 200
        assert export.headers["content-disposition"] == 'attachment; filename="members.csv"'
        rows = list(csv.DictReader(io.StringIO(export.content.decode("utf-8-sig"))))
        assert [r["given_name"] for r in rows] == ["王伟"]

        operator = token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1")
        denied = await http.get(
            "/v1/members/export?format=xlsx", headers={"authorization": f"Bearer {operator}"}
        )
        assert denied.status_code == 403
        assert denied.headers["content-type"].startswith("application/problem+json")


# -- home stores, bulk writes, several runners ------------------------------------------


async def open_store(suite: Suite, store_id: str, region_id: str, *, closed: bool = False) -> None:
    stub = organisation_pb2_grpc.OrganisationServiceStub(suite.channels["members"])
    await stub.CreateStore(
        organisation_pb2.CreateStoreRequest(
            request_id=f"store-{store_id}", store=a_store(store_id, region_id)
        ),
        metadata=auth(),
    )
    if closed:
        await stub.CloseStore(
            organisation_pb2.CloseStoreRequest(store_id=store_id), metadata=auth()
        )


def count_store_queries(suite: Suite) -> list[str]:
    """Statements that read the stores table, from now on."""
    seen: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "FROM stores" in statement:
            seen.append(statement)

    sa.event.listen(
        suite.runtimes["members"].db.engine.sync_engine, "before_cursor_execute", record
    )
    return seen


async def test_rows_need_an_open_home_store_looked_up_once_a_batch(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    await open_store(suite, "S003", "EAST", closed=True)
    # Five rows a batch: the file's 12 rows take three.
    monkeypatch.setattr(transfers_server, "BATCH_ROWS", {})
    monkeypatch.setattr(transfers_server, "DEFAULT_BATCH_ROWS", 5)
    stores = ["S001", "S002", "S003", "S404", "", "S001"] * 2
    rows = [[f"Member {n}", f"+86139{n:08d}", "", "", "", s, ""] for n, s in enumerate(stores)]
    queries = count_store_queries(suite)
    job = await finished(
        suite,
        (await import_file(suite, csv_bytes(HEADER, rows), default_store="S002")).import_job_id,
    )
    assert job.state == Job.STATE_SUCCEEDED, job.failure_reason
    assert counts(job) == (12, 8, 0, 4)
    found = await stub(suite).ListImportProblems(
        transfers_pb2.ListImportProblemsRequest(import_job_id=job.import_job_id), metadata=auth()
    )
    assert [(p.row, p.field, p.reason, p.kind) for p in found.problems] == [
        (4, "home_store_id", "this store is closed and takes no members", REFUSED),
        (5, "home_store_id", "no such store", REFUSED),
        (10, "home_store_id", "this store is closed and takes no members", REFUSED),
        (11, "home_store_id", "no such store", REFUSED),
    ]
    # Blank cells took the default store.
    assert await count(suite, members_table, members_table.c.home_store_id == "S002") == 4
    # One query per batch, whatever the number of rows and stores.
    assert len(queries) == 3, queries

    # A region manager's rows outside their region are refused before the
    # store is looked at.
    east = token((Role.REGION_MANAGER,), Scope(ScopeLevel.REGION, "EAST"), "east-1")
    rows = [
        ["East", "+8613700000001", "", "", "", "S001", ""],
        ["West", "+8613700000002", "", "", "", "S002", ""],
    ]
    job = await finished(
        suite,
        (
            await import_file(suite, csv_bytes(HEADER, rows), default_store="", bearer=east)
        ).import_job_id,
    )
    assert counts(job) == (2, 1, 0, 1)
    assert await problems(suite, job.import_job_id) == [(3, "home_store_id", REFUSED)]


async def test_imported_members_are_stored_as_create_member_stores_them(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    runtime = await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    row = ["李娜", "13800138001", "Li.Na@Example.com", "女", "1990-05-17", "S001", "en"]
    job = await finished(
        suite,
        (
            await import_file(
                suite, csv_bytes(["姓名", "手机号", "邮箱", "性别", "生日", "门店", "语言"], [row])
            )
        ).import_job_id,
    )
    assert counts(job) == (1, 1, 0, 0)
    created = await members_pb2_grpc.MembersServiceStub(suite.channels["members"]).CreateMember(
        members_pb2.CreateMemberRequest(
            request_id="same-member",
            member=members_pb2.Member(
                home_store_id="S001",
                given_name="李娜",
                mobile="13800138002",
                email="Li.Na@Example.com",
                gender=members_pb2.GENDER_FEMALE,
                birthday=date_pb2.Date(year=1990, month=5, day=17),
                enrollment_channel=members_pb2.ENROLLMENT_CHANNEL_BATCH_IMPORT,
                preferred_language="en",
            ),
        ),
        metadata=auth(),
    )
    keys = transfers_server.member_keys(runtime.context)
    async with runtime.db.sessions() as session:
        imported_id = (
            await session.execute(
                sa.select(members_table.c.member_id).where(
                    members_table.c.member_id != created.member_id
                )
            )
        ).scalar_one()
        ids = (imported_id, created.member_id)
        records = [await member_store.get_member(session, keys, i) for i in ids]
        changes = [
            await member_store.list_changes(session, keys, i, before_seq=None, limit=10)
            for i in ids
        ]
        rows = [
            (await session.execute(sa.select(members_table).where(members_table.c.member_id == i)))
            .one()
            ._asdict()
            for i in ids
        ]
        key_rows = [
            (
                await session.execute(
                    sa.select(member_store.member_keys).where(
                        member_store.member_keys.c.member_id == i
                    )
                )
            ).one()
            for i in ids
        ]
        payloads = (
            (
                await session.execute(
                    sa.select(outbox_table.c.payload).where(
                        outbox_table.c.subject == "members.v1.member.enrolled"
                    )
                )
            )
            .scalars()
            .all()
        )

    def same(value: object, member_id: str, mobile: str) -> object:
        """The value with what must differ between the two members blanked."""
        text = str(value)
        for distinct in filter(None, (member_id, mobile, mobile.removeprefix("+86"))):
            text = text.replace(distinct, "*")
        return text

    imported, direct = (r for r in records if r is not None)
    assert imported.mobile == "+8613800138001" and direct.mobile == "+8613800138002"
    assert same(replace(imported.file, enrolled_at=None), "", imported.mobile) == same(
        replace(direct.file, enrolled_at=None), "", direct.mobile
    )
    assert (imported.enrolled_by, imported.enrolled_from_store, imported.version) == (
        direct.enrolled_by,
        direct.enrolled_from_store,
        direct.version,
    )
    # The same history entry, sealed under each member's own key.
    assert len(changes[0]) == len(changes[1]) == 1
    first, second = changes[0][0], changes[1][0]
    assert (first.operation, first.fields, first.principal, first.store_id) == (
        second.operation,
        second.fields,
        second.principal,
        second.store_id,
    )

    def history(change: member_store.ChangeRecord, record: member_store.MemberRecord) -> object:
        new = dict(change.new_values["member"])
        assert new.pop("enrolled_at") == record.file.enrolled_at.isoformat()  # type: ignore[union-attr]
        return same(new, record.member_id, record.mobile)

    assert history(first, imported) == history(second, direct)
    # The same columns filled, each sealed value its own, the clear ones equal.
    for name, value in rows[0].items():
        other = rows[1][name]
        assert (value is None) == (other is None), name
        if name in ("member_id", "mobile_index", "created_at", "updated_at", "enrolled_at"):
            continue
        if isinstance(value, bytes):
            assert value != other, name
        else:
            assert value == other, name
    assert key_rows[0].master_key_id == key_rows[1].master_key_id
    assert key_rows[0].wrapped_key != key_rows[1].wrapped_key
    # One member.enrolled event each, with the same payload.
    events = [events_pb2.MemberEnrolled.FromString(p) for p in payloads]
    by_member = {e.member_id: e for e in events}
    assert set(by_member) == set(ids)
    a, b = by_member[imported_id], by_member[created.member_id]
    assert (a.home_store_id, a.enrollment_channel, a.preferred_language) == (
        b.home_store_id,
        b.enrollment_channel,
        b.preferred_language,
    )
    assert a.enroll_time.ToDatetime(dt.UTC) == imported.file.enrolled_at


async def test_a_mobile_enrolled_during_a_batch_sends_it_row_by_row(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's lookup misses a mobile enrolled meanwhile (CreateMember
    between the lookup and the insert): the unique index refuses the bulk
    insert, and the batch is done again member by member."""
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    await enroll_known(suite)

    async def nothing_taken(_session: object, _indexes: object) -> set[str]:
        return set()

    monkeypatch.setattr(member_store, "existing_mobile_indexes", nothing_taken)
    job = await finished(suite, (await import_file(suite, csv_bytes(HEADER, ROWS))).import_job_id)
    assert job.state == Job.STATE_SUCCEEDED, job.failure_reason
    assert counts(job) == (7, 3, 2, 2)
    assert sorted(await problems(suite, job.import_job_id)) == sorted(EXPECTED_PROBLEMS)
    assert await count(suite, members_table) == 4
    assert (
        await count(suite, outbox_table, outbox_table.c.subject == "members.v1.member.enrolled")
        == 4
    )


# A members service without its own import runner: the tests run runners
# by hand, as the replicas of a deployment would.
WITHOUT_RUNNER = replace(members_definition, workers=lambda _ctx: ())


class PodDied(BaseException):
    """The replica running a runner vanished (nothing it was doing finishes)."""


async def queued_job(suite: Suite, total: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """A RUNNING job of ``total`` good rows, 50 a batch, that no runner has
    touched yet."""
    await seed_organisation(suite)
    monkeypatch.setattr(transfers_server, "BATCH_ROWS", {})
    monkeypatch.setattr(transfers_server, "DEFAULT_BATCH_ROWS", 50)
    rows = [[f"Member {n}", f"+86139{n:08d}", "", "", "", "S001", ""] for n in range(total)]
    job = await import_file(suite, csv_bytes(HEADER, rows), chunk=64 * 1024)
    return job.import_job_id


def counting(runner: ImportRunner) -> list[int]:
    """The batches ``runner`` commits, by their resume points."""
    committed: list[int] = []
    write = runner._write_batch

    async def counted(run: Any, batch: Any, sealed: Any, **kwargs: Any) -> None:
        await write(run, batch, sealed, **kwargs)
        committed.append(batch.records_done)

    runner._write_batch = counted  # type: ignore[method-assign]
    return committed


async def job_row(suite: Suite, job_id: str) -> transfers_store.ImportJobRecord:
    async with suite.runtimes["members"].db.sessions() as session:
        job = await transfers_store.get_job(session, job_id)
    assert job is not None
    return job


async def assert_enrolled_once(suite: Suite, job_id: str, total: int) -> None:
    job = await job_row(suite, job_id)
    assert job.state == transfers_store.SUCCEEDED, job.failure_reason
    assert (job.records_done, job.rows_read, job.enrolled, job.duplicates, job.refused) == (
        total,
        total,
        total,
        0,
        0,
    )
    assert await count(suite, members_table) == total
    assert (
        await count(suite, outbox_table, outbox_table.c.subject == "members.v1.member.enrolled")
        == total
    )
    assert await problems(suite, job_id) == []
    # The file is dropped with the job's end.
    chunks = transfers_store.import_chunks
    assert await count(suite, chunks, chunks.c.import_job_id == job_id) == 0


async def test_two_runners_never_both_work_a_job(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await suite.start(WITHOUT_RUNNER, await database_url("members"))
    total = 400
    job_id = await queued_job(suite, total, monkeypatch)
    first = ImportRunner(runtime.context, runner_id="pod-a")
    second = ImportRunner(runtime.context, runner_id="pod-b")
    a, b = counting(first), counting(second)
    await asyncio.gather(first.process(job_id), second.process(job_id))
    # One claimed the job; the other found it held and left it alone.
    assert sorted([len(a), len(b)]) == [0, total // 50], (a, b)
    await assert_enrolled_once(suite, job_id, total)


async def test_a_runner_whose_lease_lapsed_stops_at_its_next_batch(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = await suite.start(WITHOUT_RUNNER, await database_url("members"))
    total = 300
    job_id = await queued_job(suite, total, monkeypatch)
    slow = ImportRunner(runtime.context, runner_id="pod-a", lease=dt.timedelta(seconds=2))
    other = ImportRunner(runtime.context, runner_id="pod-b")
    a, b = counting(slow), counting(other)
    stalled, resume = asyncio.Event(), asyncio.Event()
    write = slow._write_batch

    async def stalling(run: Any, batch: Any, sealed: Any, **kwargs: Any) -> None:
        if len(a) == 2:
            # Paused (a long GC, a frozen node) past its lease.
            stalled.set()
            await resume.wait()
        await write(run, batch, sealed, **kwargs)

    slow._write_batch = stalling  # type: ignore[method-assign]
    slowly = asyncio.create_task(slow.process(job_id))
    await asyncio.wait_for(stalled.wait(), timeout=30)
    assert await other._claim(job_id) is None, "taken while the lease held"
    await asyncio.sleep(2.1)
    await other.process(job_id)
    resume.set()
    await asyncio.wait_for(slowly, timeout=30)
    assert a == [0, 50]
    assert b == list(range(100, total, 50))
    await assert_enrolled_once(suite, job_id, total)


async def test_a_job_whose_runner_died_is_finished_by_another(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runtime = await suite.start(WITHOUT_RUNNER, await database_url("members"))
    total = 300
    job_id = await queued_job(suite, total, monkeypatch)
    dying = ImportRunner(runtime.context, runner_id="pod-a", lease=dt.timedelta(seconds=60))
    a = counting(dying)
    write = dying._write_batch

    async def dies(run: Any, batch: Any, sealed: Any, **kwargs: Any) -> None:
        if len(a) == 3:
            raise PodDied
        await write(run, batch, sealed, **kwargs)

    dying._write_batch = dies  # type: ignore[method-assign]
    with pytest.raises(PodDied):
        await dying.process(job_id)
    assert a == [0, 50, 100]
    left = await job_row(suite, job_id)
    assert (left.state, left.records_done, left.runner_id) == (
        transfers_store.RUNNING,
        150,
        "pod-a",
    )

    # The file is in the database, sealed under a key of the job's own: no
    # name or mobile of it is there in clear.
    chunks = transfers_store.import_chunks
    async with runtime.db.sessions() as session:
        stored = b"".join(
            (
                await session.execute(
                    sa.select(chunks.c.data)
                    .where(chunks.c.import_job_id == job_id)
                    .order_by(chunks.c.seq)
                )
            ).scalars()
        )
    assert left.file_key is not None and left.file_key.master_key_id
    assert stored and b"Member" not in stored and b"13900000001" not in stored

    # Another replica, with a var dir of its own: the file comes from the
    # database. It waits for the dead runner's lease to lapse (made to
    # lapse below, rather than waited for: a busy machine makes waits of a
    # few seconds unreliable).
    elsewhere = replace(
        runtime.context, settings=replace(runtime.context.settings, var_dir=tmp_path / "pod-b")
    )
    other = ImportRunner(elsewhere, runner_id="pod-b")
    b = counting(other)
    await other.process(job_id)
    assert b == [] and (await job_row(suite, job_id)).records_done == 150
    jobs = transfers_store.import_jobs
    async with runtime.db.transaction() as session:
        await session.execute(
            sa.update(jobs)
            .where(jobs.c.import_job_id == job_id)
            .values(lease_expires_at=utcnow() - dt.timedelta(seconds=1))
        )
    await other.process(job_id)
    assert b == list(range(150, total, 50))
    await assert_enrolled_once(suite, job_id, total)
    assert not list((tmp_path / "pod-b").rglob("*.csv"))


async def test_migration_0005_matches_the_import_tables(database_url: DatabaseFactory) -> None:
    """0005 gives the import tables the code declares, and rolls back."""
    from chassis.db import Database

    db = Database(await database_url("members"))
    migrations = members_definition.migrations_dir
    mine = {"import_jobs", "import_row_problems", "import_chunks"}
    try:
        await migrate(db, migrations, "members", "head")
        assert await schema_drift(db, metadata, mine) == []
        await migrate(db, migrations, "members", "0004", down=True)
        async with db.engine.connect() as conn:
            assert not await conn.run_sync(lambda c: sa.inspect(c).has_table("import_chunks"))
        await migrate(db, migrations, "members", "head")
        assert await schema_drift(db, metadata, mine) == []
    finally:
        await db.engine.dispose()
