"""Import time of a generated member file against a running members service.

    python -m bench.members_import [--rows 100000] [--postgres URL]

Starts a NATS server (from the wheel) and the members service in processes of
their own, on SQLite or (with --postgres, an admin URL) on a throwaway
PostgreSQL database, opens the stores the file names (through the service's
organisation API), and measures in the same run:
- ImportMembers of a CSV of ``--rows`` generated members (every row valid,
  every mobile new) through the real gRPC edge: upload, then the service's
  runner enrolling every row (validation, encryption, member row, history,
  outbox event) in batches, polled with GetImportJob until it succeeds;
- the baseline: a bare executemany insert of the same number of rows into a
  plain table of the same database;
and prints rows per second, the total times and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from bench.enrollment import wait_serving
from bench.harness import ThrowawayDatabases, spawn
from bench.organisation import open_stores, store_id
from chassis.auth import Role, Scope, ScopeLevel, mint_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET, normalise_database_url
from chassis.natsserver import NatsServer, free_port
from cornucopia.members.v1 import transfers_pb2, transfers_pb2_grpc

CHUNK = 256 * 1024
# The generated members' home stores: S000 to S049.
STORES = 50


def generate_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["姓名", "手机号", "邮箱", "性别", "生日", "门店"])
        for n in range(rows):
            writer.writerow(
                [
                    f"会员{n}",
                    f"139{n:08d}",
                    f"member{n}@example.com",
                    "女" if n % 2 else "男",
                    f"{1960 + n % 40}-{1 + n % 12:02d}-{1 + n % 28:02d}",
                    store_id(n % STORES),
                ]
            )


async def bare_executemany(url: str, rows: int) -> float:
    """Seconds to insert ``rows`` rows of a member's size in one executemany."""
    engine = create_async_engine(url)
    meta = sa.MetaData()
    table = sa.Table(
        "bench_import_rows",
        meta,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )
    async with engine.begin() as conn:
        await conn.run_sync(meta.create_all)
    values = [{"id": f"B{n:010d}", "body": b"x" * 400} for n in range(rows)]
    started = time.perf_counter()
    async with engine.begin() as conn:
        await conn.execute(sa.insert(table), values)
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return elapsed


async def import_file(address: str, path: Path, metadata: tuple[tuple[str, str], ...]) -> float:
    """Seconds from the first byte sent to the job's success."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = transfers_pb2_grpc.MemberTransfersServiceStub(channel)

        async def parts() -> AsyncIterator[transfers_pb2.ImportMembersRequest]:
            yield transfers_pb2.ImportMembersRequest(
                header=transfers_pb2.ImportHeader(
                    request_id=str(uuid.uuid4()),
                    format=transfers_pb2.FILE_FORMAT_CSV,
                )
            )
            with path.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield transfers_pb2.ImportMembersRequest(chunk=chunk)

        started = time.perf_counter()
        job = await stub.ImportMembers(parts(), metadata=metadata)
        uploaded = time.perf_counter() - started
        print(f"  upload and file check: {uploaded:.2f} s; processing...", flush=True)
        last_report = time.perf_counter()
        while job.state == transfers_pb2.ImportJob.STATE_RUNNING:
            await asyncio.sleep(0.5)
            job = await stub.GetImportJob(
                transfers_pb2.GetImportJobRequest(import_job_id=job.import_job_id),
                metadata=metadata,
            )
            if time.perf_counter() - last_report > 30:
                last_report = time.perf_counter()
                print(f"  ... {job.rows_read} rows", flush=True)
        elapsed = time.perf_counter() - started
        if job.state != transfers_pb2.ImportJob.STATE_SUCCEEDED or job.refused:
            raise RuntimeError(f"import did not succeed cleanly: {job}")
        print(
            f"  job {job.import_job_id}: read {job.rows_read}, enrolled {job.enrolled},"
            f" duplicates {job.duplicates}, refused {job.refused}"
        )
        return elapsed


async def run(rows: int, postgres: str | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="cornucopia-bench-import-"))
    file = work / "members.csv"
    generate_csv(file, rows)
    nats = NatsServer(work / "nats")
    nats.start()
    port = free_port()
    databases = ThrowawayDatabases(postgres) if postgres else None
    if databases is not None:
        members_url = await databases.create()
        baseline_url = normalise_database_url(members_url)
    else:
        members_url = f"sqlite+aiosqlite:///{work / 'members.db'}"
        baseline_url = members_url
    members = spawn(
        ["-m", "services.members"],
        {
            "GRPC_LISTEN": f"127.0.0.1:{port}",
            "MEMBERS_DATABASE_URL": members_url,
            "NATS_URL": nats.url,
            "CORNUCOPIA_VAR_DIR": str(work),
            "LOG_LEVEL": "WARNING",
        },
        work / "members.log",
    )
    try:
        await wait_serving(f"127.0.0.1:{port}")
        token = mint_token(DEVELOPMENT_TOKEN_SECRET, "bench", [Role.HQ_ADMIN], Scope(ScopeLevel.HQ))
        metadata = (("authorization", f"Bearer {token}"),)
        await open_stores(f"127.0.0.1:{port}", metadata, map(store_id, range(STORES)))
        kind = "PostgreSQL" if postgres else "SQLite"
        size_mb = file.stat().st_size / 2**20
        print(f"\nmember import benchmark: {kind}, {rows:,} rows ({size_mb:.1f} MiB CSV)")
        imported = await import_file(f"127.0.0.1:{port}", file, metadata)
        baseline = await bare_executemany(baseline_url, rows)
        print(
            f"  ImportMembers (full path)        {rows / imported:9.1f} rows/s  {imported:8.1f} s"
        )
        print(
            f"  baseline: bare executemany       {rows / baseline:9.1f} rows/s  {baseline:8.1f} s"
        )
        print(f"  ratio import / bare executemany: {baseline / imported:6.3f}")
    finally:
        members.terminate()
        members.wait(15)
        nats.stop()
        if databases is not None:
            await databases.drop_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--postgres", help="admin URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args(argv)
    asyncio.run(run(args.rows, args.postgres))


if __name__ == "__main__":
    main()
