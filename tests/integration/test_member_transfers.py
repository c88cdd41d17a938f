"""Member imports and exports on real databases (SQLite and PostgreSQL)
and NATS: counts and problems of files with good, bad and duplicate rows,
the same file twice, dry runs, masking in exports, resume after a restart."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
import httpx
import pytest
import sqlalchemy as sa
from openpyxl import Workbook, load_workbook

from chassis.auth import Role, Scope, ScopeLevel
from chassis.config import Settings
from chassis.db import outbox_table
from cornucopia.members.v1 import (
    members_pb2,
    members_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
)
from services.gateway.server import create_app
from services.members.server import definition as members_definition
from services.members.store.members import members as members_table
from tests.integration.conftest import (
    DatabaseFactory,
    Suite,
    auth,
    eventually,
    rpc_details,
    token,
)

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
    job = await finished(suite, started.import_job_id, timeout=90)
    assert job.state == Job.STATE_SUCCEEDED
    assert counts(job) == (total, total, 0, 0), await problems(suite, job.import_job_id)
    assert await count(suite, members_table) == total
    spool = suite.var_dir / "members" / "imports"
    assert not list(spool.glob(f"{started.import_job_id}.*"))


async def test_import_and_export_through_the_gateway(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    members = await suite.start(members_definition, await database_url("members"))
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
