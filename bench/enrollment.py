"""Enrollment throughput and latency against a running members service.

    python -m bench.enrollment [--seconds 10] [--concurrency 16] [--postgres URL]

Starts a NATS server (from the wheel) and the members service in processes of
their own, opens the store the members enroll into (through the service's
organisation API), then measures in the same run:
- CreateMember through the real gRPC edge (auth, validation, idempotency key,
  member row, outbox row, relay publishing to JetStream);
- the baseline: a bare grpc.aio health check against a bare server process;
- the baseline: a bare database transaction of the same shape (two inserts)
  on the same kind of database.
and prints each figure and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import uuid
from pathlib import Path

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.ext.asyncio import create_async_engine

from bench.harness import Result, ThrowawayDatabases, drive, spawn
from bench.organisation import open_stores
from chassis.auth import Role, Scope, ScopeLevel, mint_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET, normalise_database_url
from chassis.natsserver import NatsServer, free_port
from cornucopia.members.v1 import members_pb2, members_pb2_grpc


async def wait_serving(address: str, timeout: float = 60.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{address} did not become SERVING")
            await asyncio.sleep(0.2)


async def bare_transactions(url: str, concurrency: int, seconds: float) -> Result:
    engine = create_async_engine(url)
    meta = sa.MetaData()
    rows = sa.Table(
        "bench_rows",
        meta,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )
    events = sa.Table(
        "bench_events",
        meta,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )
    async with engine.begin() as conn:
        await conn.run_sync(meta.create_all)

    async def one(_n: int) -> None:
        key = str(uuid.uuid4())
        async with engine.begin() as conn:
            await conn.execute(sa.insert(rows).values(id=key, body=b"x" * 200))
            await conn.execute(sa.insert(events).values(id=key, body=b"y" * 120))

    result = await drive(
        "baseline: bare db transaction", one, concurrency=concurrency, seconds=seconds
    )
    await engine.dispose()
    return result


async def run(seconds: float, concurrency: int, postgres: str | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="cornucopia-bench-"))
    nats = NatsServer(work / "nats")
    nats.start()
    members_port, baseline_port = free_port(), free_port()
    databases = ThrowawayDatabases(postgres) if postgres else None
    if databases is not None:
        members_url = await databases.create()
        baseline_url = normalise_database_url(await databases.create())
    else:
        members_url = f"sqlite+aiosqlite:///{work / 'members.db'}"
        baseline_url = f"sqlite+aiosqlite:///{work / 'baseline.db'}"
    members = spawn(
        ["-m", "services.members"],
        {
            "GRPC_LISTEN": f"127.0.0.1:{members_port}",
            "MEMBERS_DATABASE_URL": members_url,
            "NATS_URL": nats.url,
            "CORNUCOPIA_VAR_DIR": str(work),
            "LOG_LEVEL": "WARNING",
        },
        work / "members.log",
    )
    baseline = spawn(
        ["-m", "bench.baseline_server", f"127.0.0.1:{baseline_port}"], {}, work / "baseline.log"
    )
    try:
        await wait_serving(f"127.0.0.1:{members_port}")
        await wait_serving(f"127.0.0.1:{baseline_port}")
        token = mint_token(DEVELOPMENT_TOKEN_SECRET, "bench", [Role.HQ_ADMIN], Scope(ScopeLevel.HQ))
        metadata = (("authorization", f"Bearer {token}"),)
        await open_stores(f"127.0.0.1:{members_port}", metadata, ["S001"])
        run_id = uuid.uuid4().hex[:6]

        async with grpc.aio.insecure_channel(f"127.0.0.1:{baseline_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            async def check(_n: int) -> None:
                await health.Check(health_pb2.HealthCheckRequest())

            await drive("warm-up", check, concurrency=concurrency, seconds=1)
            grpc_base = await drive(
                "baseline: bare grpc.aio call", check, concurrency=concurrency, seconds=seconds
            )

        async with grpc.aio.insecure_channel(f"127.0.0.1:{members_port}") as ch:
            stub = members_pb2_grpc.MembersServiceStub(ch)

            async def enroll(n: int) -> None:
                await stub.CreateMember(
                    members_pb2.CreateMemberRequest(
                        request_id=f"bench-{run_id}-{n}",
                        member=members_pb2.Member(
                            home_store_id="S001",
                            given_name="Bench",
                            mobile=f"+86139{n:08d}",
                        ),
                    ),
                    metadata=metadata,
                )

            enrollments = await drive(
                "CreateMember (full path)", enroll, concurrency=concurrency, seconds=seconds
            )
        db_base = await bare_transactions(baseline_url, concurrency, seconds)

        kind = "PostgreSQL" if postgres else "SQLite"
        print(f"\nenrollment benchmark: {kind}, concurrency {concurrency}, {seconds:.0f} s each")
        for result in (enrollments, grpc_base, db_base):
            print("  " + result.line())
        print(
            f"  ratio CreateMember / bare grpc call:  {enrollments.rate / grpc_base.rate:5.2f}"
            f"   CreateMember / bare db transaction: {enrollments.rate / db_base.rate:5.2f}"
        )
    finally:
        members.terminate()
        baseline.terminate()
        members.wait(15)
        baseline.wait(15)
        nats.stop()
        if databases is not None:
            await databases.drop_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--postgres", help="admin URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args(argv)
    asyncio.run(run(args.seconds, args.concurrency, args.postgres))


if __name__ == "__main__":
    main()
