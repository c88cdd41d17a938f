"""Lookup-by-mobile latency over a large member file on PostgreSQL.

    python -m bench.members_lookup [--members 1000000] [--seconds 10]
        [--concurrency 8] [--postgres URL] [--no-grpc]

Creates a throwaway PostgreSQL database, migrates the members schema, and
seeds ``--members`` members into 200 stores. Seeding takes the fast road, and
says so: the stores are written through the store layer (no events), and
the member rows are built by the store's own column mapping (each member
with a data key of their own, wrapped by the master key, and every personal
field sealed under it, exactly as an enrollment stores them) in a process
pool, then written with COPY instead of one CreateMember call each (which
would take hours). No history, tags or consents rows are written; a lookup does
not read history, and finds no consents either way.

Then measures in the same run, closed loop, ``--concurrency`` callers:
- LookupMember-equivalent through the store layer: blind index of the
  mobile -> member id, then the member row with its data key, unwrapped and
  decrypted (what the RPC does inside);
- LookupMember over gRPC against a members service process on the same
  database (token check, validation, the same store calls, masking rules);
- the baseline: a bare primary-key select of one member row;
and prints p50/p99 and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import sqlalchemy as sa

from bench.enrollment import wait_serving
from bench.harness import Result, ThrowawayDatabases, drive, spawn
from bench.organisation import insert_stores, store_id
from chassis.auth import Role, Scope, ScopeLevel, mint_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET, normalise_database_url
from chassis.crypto import FieldCipher, keys_from_env
from chassis.db import Database
from chassis.migrations import upgrade_to_head
from chassis.natsserver import NatsServer, free_port
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.members.domain.members import Birthday, EnrollmentChannel, Gender, NewMember
from services.members.server import definition
from services.members.store import members as store

SEED_CHUNK = 20_000
# The seeded members' home stores: S000 to S199.
STORES = 200
NOW = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)


def mobile_of(n: int) -> str:
    return f"+86139{n:08d}"


def _keys() -> store.Keys:
    ring, index = keys_from_env("MEMBERS", os.environ, production=False)
    return store.Keys(ring, index)


def build_rows(start: int, stop: int) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """Member rows and key rows for members start..stop, built by the
    store's own column mapping (a process-pool task)."""
    keys = _keys()
    members: list[dict[str, Any]] = []
    member_keys: list[tuple[Any, ...]] = []
    for n in range(start, stop):
        member_id = f"B{n:010d}"
        member = NewMember(
            home_store_id=store_id(n % STORES),
            given_name=f"会员{n}",
            family_name="王",
            mobile=mobile_of(n),
            email=f"m{n}@example.com",
            gender=Gender.FEMALE if n % 2 else Gender.MALE,
            birthday=Birthday(1960 + n % 40, 1 + n % 12, 1 + n % 28),
            enrollment_channel=EnrollmentChannel.BATCH_IMPORT,
            preferred_language="zh-CN",
        )
        data_key, wrapped = keys.ring.new_data_key(member_id)
        row = store._columns(keys, FieldCipher(data_key, member_id), member)
        row.update(
            member_id=member_id,
            enrollment_channel=member.enrollment_channel.value,
            enrolled_by="bench",
            enrolled_from_store="",
            enrolled_at=NOW,
            created_at=NOW,
            updated_at=NOW,
            version=1,
            state="active",
            merged_into="",
        )
        members.append(row)
        member_keys.append((member_id, wrapped.master_key_id, wrapped.ciphertext))
    return members, member_keys


async def seed(dsn: str, count: int) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    columns: list[str] | None = None
    json_columns = {c.name for c in store.members.columns if isinstance(c.type, sa.JSON)}
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        tasks = [
            loop.run_in_executor(pool, build_rows, start, min(start + SEED_CHUNK, count))
            for start in range(0, count, SEED_CHUNK)
        ]
        done = 0
        for task in tasks:
            members, member_keys = await task
            if columns is None:
                columns = sorted(members[0])
            records = [
                tuple(
                    json.dumps(row[c]) if c in json_columns and row[c] is not None else row[c]
                    for c in columns
                )
                for row in members
            ]
            await conn.copy_records_to_table("members", records=records, columns=columns)
            await conn.copy_records_to_table(
                "member_keys",
                records=member_keys,
                columns=["member_id", "master_key_id", "wrapped_key"],
            )
            done += len(members)
            if done % 200_000 < SEED_CHUNK:
                print(f"  seeded {done:,} members", flush=True)
    await conn.execute("ANALYZE members")
    await conn.execute("ANALYZE member_keys")
    await conn.close()
    return time.perf_counter() - started


async def run(count: int, seconds: float, concurrency: int, postgres: str, with_grpc: bool) -> None:
    databases = ThrowawayDatabases(postgres)
    dsn = await databases.create()
    url = normalise_database_url(dsn)
    work = Path(tempfile.mkdtemp(prefix="cornucopia-bench-lookup-"))
    db = Database(url)
    service = None
    nats = None
    try:
        await upgrade_to_head(db, definition.migrations_dir, "members")
        await insert_stores(db, map(store_id, range(STORES)))
        print(f"\nseeding {count:,} members (process pool + COPY)...", flush=True)
        seeded = await seed(dsn, count)
        print(f"  seeded in {seeded:.0f} s ({count / seeded:,.0f} members/s)")
        keys = _keys()
        rng = random.Random(7)

        async def lookup(_n: int) -> None:
            mobile = mobile_of(rng.randrange(count))
            async with db.sessions() as session:
                member_id = await store.member_id_by_mobile(session, keys, mobile)
                record = await store.get_member(session, keys, member_id or "")
            if record is None or record.mobile != mobile:
                raise RuntimeError("lookup found the wrong member")

        pk = sa.select(store.members).where(store.members.c.member_id == sa.bindparam("id"))

        async def bare(_n: int) -> None:
            async with db.engine.connect() as conn:
                row = (await conn.execute(pk, {"id": f"B{rng.randrange(count):010d}"})).first()
            if row is None:
                raise RuntimeError("missing row")

        await drive("warm-up", lookup, concurrency=concurrency, seconds=2)
        results: list[Result] = [
            await drive(
                "lookup by mobile (store layer)", lookup, concurrency=concurrency, seconds=seconds
            )
        ]
        if with_grpc:
            nats = NatsServer(work / "nats")
            nats.start()
            port = free_port()
            service = spawn(
                ["-m", "services.members"],
                {
                    "GRPC_LISTEN": f"127.0.0.1:{port}",
                    "MEMBERS_DATABASE_URL": dsn,
                    "NATS_URL": nats.url,
                    "CORNUCOPIA_VAR_DIR": str(work),
                    "LOG_LEVEL": "WARNING",
                },
                work / "members.log",
            )
            await wait_serving(f"127.0.0.1:{port}")
            token = mint_token(
                DEVELOPMENT_TOKEN_SECRET, "bench", [Role.HQ_ADMIN], Scope(ScopeLevel.HQ)
            )
            metadata = (("authorization", f"Bearer {token}"),)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = members_pb2_grpc.MembersServiceStub(channel)

                async def rpc(_n: int) -> None:
                    mobile = mobile_of(rng.randrange(count))
                    member = await stub.LookupMember(
                        members_pb2.LookupMemberRequest(mobile=mobile), metadata=metadata
                    )
                    if member.mobile != mobile:
                        raise RuntimeError("lookup found the wrong member")

                await drive("warm-up", rpc, concurrency=concurrency, seconds=2)
                results.append(
                    await drive(
                        "LookupMember over gRPC", rpc, concurrency=concurrency, seconds=seconds
                    )
                )
        results.append(
            await drive(
                "baseline: bare primary-key select", bare, concurrency=concurrency, seconds=seconds
            )
        )
        print(
            f"\nlookup benchmark: PostgreSQL, {count:,} members, concurrency {concurrency},"
            f" {seconds:.0f} s each"
        )
        for result in results:
            print("  " + result.line())
        base = results[-1]
        for result in results[:-1]:
            print(
                f"  {result.name}: p50 {result.pct(0.5) / base.pct(0.5):5.2f}x,"
                f" p99 {result.pct(0.99) / base.pct(0.99):5.2f}x the bare select"
            )
    finally:
        if service is not None:
            service.terminate()
            service.wait(15)
        if nats is not None:
            nats.stop()
        await db.dispose()
        await databases.drop_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC measurement")
    args = parser.parse_args(argv)
    asyncio.run(run(args.members, args.seconds, args.concurrency, args.postgres, not args.no_grpc))


if __name__ == "__main__":
    main()
