"""Messages through the SMS channel: how fast notify's dispatcher empties a
queue of SMS messages into the local SMS provider.

    python -m bench.notify_sms [--messages 3000] [--members 200]
        [--concurrency 16] [--batch 100] [--postgres URL]

Starts a NATS server (from the wheel), the members service and the local
SMS provider (``python -m services.notify.sms_provider``) as processes of
their own, enrolls ``--members`` members, queues ``--messages`` messages
round-robin to them in a fresh notify database, then measures in the same
run:
- the dispatcher (``services.notify.dispatch.Dispatcher``, the SMS channel,
  addresses from members through ``MembersPeer.contact`` with its cache)
  sending the queue until every message is SENT: claim a batch, look the
  number up, POST to the provider, mark the message sent with its event;
- the baseline: bare httpx POSTs of the same request to the provider from
  one process, at the same concurrency, no database.
and prints messages per second and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.enrollment import wait_serving
from bench.harness import ThrowawayDatabases, spawn
from bench.organisation import open_stores
from chassis.auth import Role, Scope, ScopeLevel, mint_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET, Settings, normalise_database_url
from chassis.db import Database, utcnow
from chassis.migrations import upgrade_to_head
from chassis.natsserver import NatsServer, free_port
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.notify import store
from services.notify.channels.config import SmsSettings
from services.notify.channels.sms import SmsChannel
from services.notify.dispatch import Dispatcher
from services.notify.domain import Channel, MessageStatus
from services.notify.peers import MembersPeer

NOTIFY_MIGRATIONS = Path(__file__).resolve().parents[1] / "services" / "notify" / "migrations"
BODY = "您的储值卡消费 88.00 元，余额 412.00 元。如非本人操作请致电门店。"


def start_provider(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The local SMS provider on a free port; returns it and its URL."""
    log = work / "sms-provider.log"
    process = spawn(["-m", "services.notify.sms_provider", "--port", "0"], {}, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(rb"listening on (http://\S+)", log.read_bytes())
        if found:
            return process, found.group(1).decode()
        time.sleep(0.05)
    process.terminate()
    raise RuntimeError("the SMS provider did not start")


async def enroll(address: str, count: int) -> list[str]:
    import grpc  # noqa: PLC0415

    token = mint_token(DEVELOPMENT_TOKEN_SECRET, "bench", [Role.HQ_ADMIN], Scope(ScopeLevel.HQ))
    metadata = (("authorization", f"Bearer {token}"),)
    await open_stores(address, metadata, ["S001"])
    run_id = uuid.uuid4().hex[:6]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = members_pb2_grpc.MembersServiceStub(channel)
        ids: list[str] = []
        for start in range(0, count, 20):
            created = await asyncio.gather(
                *(
                    stub.CreateMember(
                        members_pb2.CreateMemberRequest(
                            request_id=f"bench-{run_id}-{n}",
                            member=members_pb2.Member(
                                home_store_id="S001", given_name="Bench", mobile=f"+86137{n:08d}"
                            ),
                        ),
                        metadata=metadata,
                    )
                    for n in range(start, min(count, start + 20))
                )
            )
            ids.extend(c.member_id for c in created)
    return ids


async def queue(db: Database, members: list[str], count: int) -> None:
    start = utcnow()
    for first in range(0, count, 500):
        async with db.transaction() as session:
            for n in range(first, min(count, first + 500)):
                await store.queue_message(
                    session,
                    message_id=str(uuid.uuid4()),
                    member_id=members[n % len(members)],
                    template="consumption_alert",
                    channel=Channel.SMS,
                    locale="zh-CN",
                    body=BODY,
                    trace_headers={},
                    created_at=start + dt.timedelta(microseconds=n),
                )


async def unsent(db: Database) -> int:
    async with db.sessions() as session:
        result = await session.execute(
            sa.select(sa.func.count()).where(store.messages.c.status == MessageStatus.QUEUED.value)
        )
        return int(result.scalar_one())


async def dispatcher_rate(
    url: str, members_address: str, sms_url: str, members: list[str], args: argparse.Namespace
) -> tuple[float, float]:
    db = Database(url)
    await upgrade_to_head(db, NOTIFY_MIGRATIONS, "notify")
    await queue(db, members, args.messages)
    settings = Settings(service="notify", peers={"members": members_address})
    contacts = MembersPeer(settings)
    channel = SmsChannel(SmsSettings(url=sms_url))
    dispatcher = Dispatcher(
        db,
        {Channel.SMS: channel},
        contacts=contacts,
        concurrency=args.concurrency,
        batch_size=args.batch,
        poll_interval=0.05,
    )
    started = time.perf_counter()
    running = asyncio.create_task(dispatcher.run())
    try:
        # Polling the database: the queue's state is there, not in an event.
        while await unsent(db):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await channel.close()
        await contacts.close()
        await db.dispose()
    return args.messages / seconds, seconds


async def baseline_rate(sms_url: str, count: int, concurrency: int) -> tuple[float, float]:
    """Bare POSTs of the same request, ``concurrency`` at a time."""
    remaining = list(range(count))
    async with httpx.AsyncClient(timeout=10) as client:

        async def worker() -> None:
            while remaining:
                n = remaining.pop()
                answer = await client.post(
                    sms_url,
                    json={"to": f"+86136{n:08d}", "text": BODY, "reference": f"baseline-{n}"},
                )
                answer.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return count / seconds, seconds


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="cornucopia-bench-"))
    nats = NatsServer(work / "nats")
    nats.start()
    members_port = free_port()
    databases = ThrowawayDatabases(args.postgres) if args.postgres else None
    if databases is not None:
        members_url = await databases.create()
        notify_url = normalise_database_url(await databases.create())
    else:
        members_url = f"sqlite+aiosqlite:///{work / 'members.db'}"
        notify_url = f"sqlite+aiosqlite:///{work / 'notify.db'}"
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
    provider, sms_url = start_provider(work)
    try:
        address = f"127.0.0.1:{members_port}"
        await wait_serving(address)
        member_ids = await enroll(address, args.members)
        # Warm both paths up (connections, the provider's first requests).
        await baseline_rate(sms_url, 200, args.concurrency)
        base, base_seconds = await baseline_rate(sms_url, args.messages, args.concurrency)
        rate, seconds = await dispatcher_rate(notify_url, address, sms_url, member_ids, args)
        kind = "PostgreSQL" if databases is not None else "SQLite"
        print(
            f"\nnotify SMS benchmark: {kind}, {args.messages} messages to {args.members} members, "
            f"concurrency {args.concurrency}, batches of {args.batch}"
        )
        print(f"  dispatcher through the SMS channel  {rate:9.1f} messages/s  ({seconds:.2f} s)")
        print(
            f"  baseline: bare httpx POSTs          {base:9.1f} messages/s  ({base_seconds:.2f} s)"
        )
        print(f"  ratio dispatcher / bare POSTs:      {rate / base:5.2f}")
    finally:
        for process in (members, provider):
            process.terminate()
            process.wait(15)
        nats.stop()
        if databases is not None:
            await databases.drop_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--postgres", help="admin URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres"
    )
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
