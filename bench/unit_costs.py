"""What one statement and one service call cost in CPU: the units a
checkout is made of.

    python -m bench.unit_costs --postgres postgresql://postgres@127.0.0.1:5432/postgres

A checkout is some thirty statements in loyalty, about twenty in cards and
a handful in campaigns, and five gRPC calls; its CPU is roughly those
counts times these unit costs. Each figure is this process's CPU time
(user and system) over ``--calls`` operations by one caller, so the noise
of a shared machine changes the wall clock more than these:

- a primary-key read through the chassis's session (``session.execute``
  in a unit of work, ten reads a transaction), through a read session (on
  PostgreSQL without a transaction), through SQLAlchemy Core's
  ``AsyncConnection`` alone, through ``chassis.direct`` in a unit of work
  (on PostgreSQL the session's driver connection; elsewhere the session),
  and the baseline: the same read straight through asyncpg, in a
  transaction of ten;
- a unit of work of one UPDATE by key through ``chassis.direct``, in a
  session's unit of work and in ``direct_transaction`` (on PostgreSQL a
  pooled connection without a session), and the same UPDATE alone in
  ``single_statement``, against the same transaction straight through
  asyncpg: what a transaction costs beyond its statements (the session,
  the pooled connection, BEGIN and COMMIT), which a checkout pays some
  twenty times across the services; and the reads in ``direct_reads``;
- a gRPC call: a health check against ``bench.baseline_server`` from a
  bare grpc.aio channel (the baseline) and from a channel with the
  OpenTelemetry client interceptor every service channel has, with the
  process's tracer provider installed as a service installs it; the
  server's CPU (from /proc) too;
- a served call: a members ``GetMember`` answered at once from memory, by
  the bare server and by the services' own server
  (``chassis.grpcserver.GrpcServer``, with its tracing, access log, error
  mapping and token check, logging as under ``make up``), called with a
  service's token: what that stack adds to each call a service serves.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import asyncpg
import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from bench.harness import ThrowawayDatabases, cpu_seconds, spawn
from chassis.auth import service_token
from chassis.config import normalise_database_url
from chassis.db import Database
from chassis.direct import Direct
from chassis.grpcclient import bearer
from chassis.natsserver import free_port
from chassis.telemetry import configure_tracing
from cornucopia.members.v1 import members_pb2, members_pb2_grpc

READS_A_TRANSACTION = 10
# What a service's call carries besides the request: its token.
CALL_METADATA = (("authorization", "Bearer " + "x" * 200),)
ROWS = 1_000

shelf = sa.Table(
    "unit_cost_rows",
    sa.MetaData(),
    sa.Column("row_id", sa.String(20), primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
    sa.Column("note", sa.String(60), nullable=False),
)


@dataclass(frozen=True)
class Cost:
    name: str
    operations: int
    cpu_seconds: float
    wall_seconds: float
    # The CPU of the process at the other end (the gRPC server), if measured.
    peer_cpu_seconds: float | None = None

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.operations * 1e6

    @property
    def wall_us(self) -> float:
        return self.wall_seconds / self.operations * 1e6

    @property
    def peer_cpu_us(self) -> float | None:
        if self.peer_cpu_seconds is None:
            return None
        return self.peer_cpu_seconds / self.operations * 1e6


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    name: str,
    operations: int,
    batch: Callable[[int], Awaitable[None]],
    *,
    per_batch: int = 1,
    peer: int | None = None,
) -> Cost:
    """``batch(i)`` does ``per_batch`` operations; warmed up first, then
    timed over ``operations``, with the CPU of process ``peer`` too."""
    for i in range(20):
        await batch(i)
    peer_before = cpu_seconds(peer) if peer is not None else None
    cpu, wall = _cpu(), time.perf_counter()
    for i in range(operations // per_batch):
        await batch(i)
    cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    peer_after = cpu_seconds(peer) if peer is not None else None
    peer_cpu = None
    if peer_before is not None and peer_after is not None:
        peer_cpu = peer_after - peer_before
    return Cost(name, operations, cpu, wall, peer_cpu)


async def statement_costs(url: str, operations: int) -> list[Cost]:
    db = Database(normalise_database_url(url))
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(shelf.metadata.create_all)
            await conn.execute(
                sa.insert(shelf),
                [{"row_id": f"r{i}", "balance": i, "note": "x" * 40} for i in range(ROWS)],
            )

        def keys(i: int) -> list[str]:
            return [f"r{(i * READS_A_TRANSACTION + k) % ROWS}" for k in range(READS_A_TRANSACTION)]

        statement = sa.select(shelf).where(shelf.c.row_id == sa.bindparam("key_row_id"))
        direct = Direct(statement)

        async def unit_of_work(i: int) -> None:
            async with db.transaction() as session:
                for key in keys(i):
                    (await session.execute(statement, {"key_row_id": key})).first()

        async def read_session(i: int) -> None:
            async with db.sessions() as session:
                for key in keys(i):
                    (await session.execute(statement, {"key_row_id": key})).first()

        async def direct_unit_of_work(i: int) -> None:
            async with db.transaction() as session:
                for key in keys(i):
                    (await direct.execute(session, {"key_row_id": key})).first()

        update = Direct(
            sa.update(shelf)
            .where(shelf.c.row_id == sa.bindparam("key_row_id"))
            .values(balance=shelf.c.balance + 1)
        )

        async def one_update_unit_of_work(i: int) -> None:
            # What a unit of work costs beyond its statements: the session,
            # the pooled connection, BEGIN and COMMIT.
            async with db.transaction() as session:
                await update.execute(session, {"key_row_id": f"r{i % ROWS}"})

        async def one_update_direct_transaction(i: int) -> None:
            # The same in a unit of work of driver statements alone: on
            # PostgreSQL a pooled connection without a session.
            async with db.direct_transaction() as unit:
                await update.execute(unit, {"key_row_id": f"r{i % ROWS}"})

        async def one_update_single_statement(i: int) -> None:
            # The same UPDATE as a unit of one statement: no BEGIN or COMMIT.
            async with db.single_statement() as unit:
                await update.execute(unit, {"key_row_id": f"r{i % ROWS}"})

        async def direct_reads(i: int) -> None:
            async with db.direct_reads() as unit:
                for key in keys(i):
                    (await direct.execute(unit, {"key_row_id": key})).first()

        async def core(i: int) -> None:
            async with db.engine.begin() as conn:
                for key in keys(i):
                    (await conn.execute(statement, {"key_row_id": key})).first()

        costs = [
            await measure(
                "read, session.execute in a unit of work",
                operations,
                unit_of_work,
                per_batch=READS_A_TRANSACTION,
            ),
            await measure(
                "read, session.execute in a read session",
                operations,
                read_session,
                per_batch=READS_A_TRANSACTION,
            ),
            await measure(
                "read, SQLAlchemy Core connection", operations, core, per_batch=READS_A_TRANSACTION
            ),
            await measure(
                "read, chassis.direct in a unit of work",
                operations,
                direct_unit_of_work,
                per_batch=READS_A_TRANSACTION,
            ),
            await measure(
                "read, chassis.direct in direct_reads",
                operations,
                direct_reads,
                per_batch=READS_A_TRANSACTION,
            ),
            await measure(
                "unit of work of one UPDATE, chassis.direct", operations, one_update_unit_of_work
            ),
            await measure(
                "unit of work of one UPDATE, chassis.direct in direct_transaction",
                operations,
                one_update_direct_transaction,
            ),
            await measure(
                "one UPDATE in single_statement",
                operations,
                one_update_single_statement,
            ),
        ]
        if db.dialect == "postgresql":
            raw = await asyncpg.connect(url)
            try:
                text = "SELECT row_id, balance, note FROM unit_cost_rows WHERE row_id = $1"

                async def bare(i: int) -> None:
                    async with raw.transaction():
                        for key in keys(i):
                            await raw.fetchrow(text, key)

                async def bare_update(i: int) -> None:
                    async with raw.transaction():
                        await raw.execute(
                            "UPDATE unit_cost_rows SET balance = balance + 1 WHERE row_id = $1",
                            f"r{i % ROWS}",
                        )

                costs.append(
                    await measure(
                        "read, bare asyncpg (baseline)",
                        operations,
                        bare,
                        per_batch=READS_A_TRANSACTION,
                    )
                )
                costs.append(
                    await measure(
                        "unit of work of one UPDATE, bare asyncpg (baseline)",
                        operations,
                        bare_update,
                    )
                )
            finally:
                await raw.close()
        return costs
    finally:
        await db.dispose()


async def call_costs(operations: int, work: Path) -> list[Cost]:
    configure_tracing("bench")
    address = f"127.0.0.1:{free_port()}"
    server = spawn(["-m", "bench.baseline_server", address], {}, work / "baseline.log")
    costs: list[Cost] = []
    try:
        for name, interceptors in (
            ("gRPC call, bare channel (baseline)", None),
            ("gRPC call, OpenTelemetry interceptor", aio_client_interceptors()),
        ):
            async with grpc.aio.insecure_channel(address, interceptors=interceptors) as channel:
                await channel.channel_ready()
                health = health_pb2_grpc.HealthStub(channel)

                async def check(_i: int, health: health_pb2_grpc.HealthStub = health) -> None:
                    await health.Check(
                        health_pb2.HealthCheckRequest(), metadata=CALL_METADATA, timeout=5
                    )

                costs.append(await measure(name, operations, check, peer=server.pid))
        costs.append(await _get_member_cost("GetMember, bare server", address, operations, server))
    finally:
        server.terminate()
        server.wait(10)
    # The same call served by the services' own server: what its
    # interceptors (tracing, access log, errors, token check) add.
    address = f"127.0.0.1:{free_port()}"
    secret = "bench-" + "s" * 32
    server = spawn(
        ["-m", "bench.baseline_server", address, "--chassis", secret], {}, work / "chassis.log"
    )
    try:
        costs.append(
            await _get_member_cost(
                "GetMember, the services' server", address, operations, server, secret
            )
        )
    finally:
        server.terminate()
        server.wait(10)
    return costs


async def _get_member_cost(
    name: str, address: str, operations: int, server: subprocess.Popen[bytes], secret: str = ""
) -> Cost:
    metadata = bearer(service_token(secret, "loyalty")) if secret else CALL_METADATA
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        members = members_pb2_grpc.MembersServiceStub(channel)
        request = members_pb2.GetMemberRequest(member_id="M0000000001")

        async def get(_i: int) -> None:
            await members.GetMember(request, metadata=metadata, timeout=5)

        return await measure(name, operations, get, peer=server.pid)


def report(title: str, costs: list[Cost]) -> None:
    print(title)
    # Each operation against the baseline of its kind (the name before the
    # comma), else the first baseline.
    baselines = {c.name.split(",")[0]: c for c in costs if "baseline" in c.name}
    first = next(iter(baselines.values()), None)
    for cost in costs:
        baseline = baselines.get(cost.name.split(",")[0], first)
        ratio = f"  {cost.cpu_us / baseline.cpu_us:4.1f}x the baseline" if baseline else ""
        peer = "" if cost.peer_cpu_us is None else f"; the server's CPU {cost.peer_cpu_us:6.1f} us"
        print(
            f"  {cost.name:<52} CPU {cost.cpu_us:7.1f} us  wall {cost.wall_us:7.1f} us{ratio}{peer}"
        )


async def run(postgres: str | None, operations: int) -> None:
    with TemporaryDirectory(prefix="cornucopia-bench-units-") as tmp:
        work = Path(tmp)
        if postgres:
            databases = ThrowawayDatabases(postgres)
            try:
                url = await databases.create()
                report(
                    "a primary-key read and a unit of work (PostgreSQL), CPU each:",
                    await statement_costs(url, operations),
                )
            finally:
                await databases.drop_all()
        report(
            "a primary-key read and a unit of work (SQLite), CPU each:",
            await statement_costs(f"sqlite:///{work / 'units.db'}", operations),
        )
        report(
            "a unary gRPC call, CPU of the caller (and of the server):",
            await call_costs(operations, work),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", help="an admin URL of a PostgreSQL server to measure on")
    parser.add_argument("--calls", type=int, default=5_000, help="operations a figure")
    args = parser.parse_args(argv)
    asyncio.run(run(args.postgres, args.calls))


if __name__ == "__main__":
    main(sys.argv[1:])
