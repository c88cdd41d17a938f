"""The checkout's shape with nothing of the platform: the floor the
checkout benchmark is measured against.

Five processes, as the suite has, talk as a stored-value checkout makes
them talk, each with bare parts only: grpc.aio with bytes in and out (no
protobuf, interceptors, tokens, traces or log lines), asyncpg statements
on a database of its own (no SQLAlchemy) and nats-py to JetStream. Per
checkout (seven in ten paid with stored value, as the benchmark's tills):

    till (loyalty)  the log's read beside cards' Resolve; the member's and
                    tier's reads; pricing's Price; the log's insert;
                    cards' Hold (stored value); the commit (the log, a
                    points lot, the tier's activity, the sale, 3 lines, 2
                    tenders, 2 events); its relay publishes the events
    cards           Resolve: one read. Hold: the account's update, the
                    hold and its capture, 2 events, one transaction
    pricing         Price: no database. Two consumers of the sale's event
                    (an inbox row and a row of its own each)
    notify          a consumer of the capture's event (inbox row and a
                    notification), the member asked of members, then the
                    message and its 2 events in one transaction
    members         Get: one read

Every relay claims its unsent events, publishes them together and waits
for JetStream's acks, then marks them sent; every consumer fetches in
batches and acknowledges after its commit. This is less than the suite
does (no rules, no pricing logic, notify plans and sends in one pass), so
it is a floor: what the machine gives a checkout of this many calls,
statements and events before any of the work they carry. With
``--no-events`` the till and cards write no events: the checkout's calls
and transactions alone.

    python -m bench.skeleton --postgres postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.js.api import StreamConfig

from bench.enrollment import wait_serving
from bench.harness import (
    CpuMeter,
    Result,
    ThrowawayDatabases,
    drive,
    pids_matching,
    spawn,
    stop_processes,
)
from chassis.natsserver import NatsServer, free_port

ROLES = ("members", "cards", "pricing", "notify", "till")
STREAM = "SKELETON"
SALE_RECORDED = "skeleton.loyalty.sale_recorded"
POINTS_ACCRUED = "skeleton.loyalty.points_accrued"
HELD = "skeleton.cards.held"
CAPTURED = "skeleton.cards.captured"
QUEUED = "skeleton.notify.message_queued"
SENT = "skeleton.notify.message_sent"
STORED_VALUE_SHARE = 7  # in ten
PAYLOAD = b"p" * 180  # about an event's protobuf
RECEIPT = b"r" * 600

SCHEMAS = {
    "members": [
        "CREATE TABLE members (member_id text PRIMARY KEY, name text, mobile text,"
        " consents text, updated_at timestamptz)",
    ],
    "cards": [
        "CREATE TABLE cards (card_no text PRIMARY KEY, member_id text, account_id text,"
        " state text)",
        "CREATE TABLE accounts (account_id text PRIMARY KEY, balance bigint,"
        " updated_at timestamptz)",
        "CREATE TABLE movements (movement_id text PRIMARY KEY, account_id text, kind text,"
        " amount bigint, request_id text, at timestamptz)",
    ],
    "pricing": [
        "CREATE TABLE followups (member_id text PRIMARY KEY, last_sale text, sales int)",
        "CREATE TABLE referrals (member_id text PRIMARY KEY, last_sale text, sales int)",
    ],
    "notify": [
        "CREATE TABLE notifications (notification_id text PRIMARY KEY, member_id text,"
        " event_id text UNIQUE, at timestamptz)",
        "CREATE TABLE messages (message_id text PRIMARY KEY, notification_id text,"
        " recipient text, body text, state text, at timestamptz)",
    ],
    "till": [
        "CREATE TABLE checkouts (checkout_id text PRIMARY KEY, step text, plan bytea,"
        " sale_id text, at timestamptz)",
        "CREATE TABLE members (member_id text PRIMARY KEY, tier text, birthday_month int)",
        "CREATE TABLE points_lots (lot_id text PRIMARY KEY, member_id text, points int,"
        " sale_id text, at timestamptz)",
        "CREATE TABLE tier_activity (member_id text, sale_id text, spend bigint,"
        " day date, PRIMARY KEY (member_id, sale_id))",
        "CREATE TABLE sales (sale_id text PRIMARY KEY, member_id text, total bigint,"
        " receipt bytea, at timestamptz)",
        "CREATE TABLE sale_lines (sale_id text, line_no int, sku text, net bigint,"
        " PRIMARY KEY (sale_id, line_no))",
        "CREATE TABLE sale_tenders (sale_id text, kind text, amount bigint,"
        " PRIMARY KEY (sale_id, kind))",
    ],
}
MESSAGING = [
    "CREATE TABLE outbox (seq bigserial PRIMARY KEY, event_id text, subject text,"
    " payload bytea, lease_until timestamptz, sent_at timestamptz)",
    "CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at IS NULL",
    "CREATE TABLE inbox (consumer text, event_id text, PRIMARY KEY (consumer, event_id))",
]


# --- inside each process ----------------------------------------------------------------


class Part:
    """One process's database pool, JetStream context and peers' channels."""

    def __init__(self, role: str, config: dict[str, Any]) -> None:
        self.role = role
        self.config = config
        self.pool: Any = None
        self.js: Any = None
        self.nc: Any = None
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        task.add_done_callback(_stopped)
        self.tasks.append(task)

    async def open(self) -> None:
        import asyncpg  # noqa: PLC0415
        import nats  # noqa: PLC0415

        self.pool = await asyncpg.create_pool(self.config["database"], min_size=10, max_size=10)
        async with self.pool.acquire() as conn:
            for statement in [*SCHEMAS[self.role], *MESSAGING]:
                await conn.execute(statement)
            members = self.config["members"]
            if self.role == "members":
                await conn.executemany(
                    "INSERT INTO members VALUES ($1, 'Ana', '13800000000', 'sms', now())",
                    [(f"M{n:05d}",) for n in range(members)],
                )
            elif self.role == "cards":
                await conn.executemany(
                    "INSERT INTO cards VALUES ($1, $2, $3, 'ACTIVE')",
                    [(f"C{n:05d}", f"M{n:05d}", f"A{n:05d}") for n in range(members)],
                )
                await conn.executemany(
                    "INSERT INTO accounts VALUES ($1, 1000000000000, now())",
                    [(f"A{n:05d}",) for n in range(members)],
                )
            elif self.role == "till":
                await conn.executemany(
                    "INSERT INTO members VALUES ($1, 'SILVER', 5)",
                    [(f"M{n:05d}",) for n in range(members)],
                )
        self.nc = await nats.connect(self.config["nats"])
        self.js = self.nc.jetstream()
        for name, address in self.config["peers"].items():
            self.channels[name] = grpc.aio.insecure_channel(address)

    def call(self, peer: str, method: str) -> Callable[[bytes], Awaitable[bytes]]:
        service = {"cards": "Cards", "pricing": "Pricing", "members": "Members"}[peer]
        return self.channels[peer].unary_unary(f"/skeleton.{service}/{method}")  # type: ignore[return-value]

    async def relay(self) -> None:
        """Claims unsent events, publishes them together, marks them sent."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.5)
            self.wake.clear()
            while True:
                rows = await self.pool.fetch(
                    "UPDATE outbox SET lease_until = now() + interval '30 seconds'"
                    " WHERE seq IN (SELECT seq FROM outbox WHERE sent_at IS NULL"
                    " AND (lease_until IS NULL OR lease_until < now())"
                    " ORDER BY seq LIMIT 100 FOR UPDATE SKIP LOCKED)"
                    " RETURNING seq, event_id, subject, payload"
                )
                if not rows:
                    break
                await asyncio.gather(
                    *(
                        self.js.publish(
                            row["subject"], row["payload"], headers={"Nats-Msg-Id": row["event_id"]}
                        )
                        for row in rows
                    )
                )
                await self.pool.execute(
                    "UPDATE outbox SET sent_at = now() WHERE seq = ANY($1::bigint[])",
                    [row["seq"] for row in rows],
                )
                if len(rows) < 100:
                    break

    async def consume(
        self, durable: str, subject: str, apply: Callable[[Any, Any], Awaitable[None]]
    ) -> None:
        """Fetches in batches; one transaction a batch (inbox rows and the
        handler's), acknowledged after the commit."""
        for attempt in range(10):
            try:
                subscription = await self.js.pull_subscribe(subject, durable=durable, stream=STREAM)
                break
            except TimeoutError:
                # JetStream's API is slow to answer on a loaded machine.
                if attempt == 9:
                    raise
        while True:
            try:
                batch = await subscription.fetch(20, timeout=1.0)
            except TimeoutError:  # nats.errors.TimeoutError is one
                continue
            async with self.pool.acquire() as conn, conn.transaction():
                for msg in batch:
                    fresh = await conn.fetchval(
                        "INSERT INTO inbox VALUES ($1, $2) ON CONFLICT DO NOTHING"
                        " RETURNING event_id",
                        durable,
                        msg.headers["Nats-Msg-Id"],
                    )
                    if fresh is not None:
                        await apply(conn, msg)
            for msg in batch:
                await msg.ack()


def _stopped(task: asyncio.Future[None]) -> None:
    # A part that stops working would make the floor look lower than it is.
    if not task.cancelled() and task.exception() is not None:
        print(f"a background task failed: {task.exception()!r}", file=sys.stderr, flush=True)
        os._exit(1)


def member_of(msg: Any) -> str:
    """The member an event is about: its payload starts with the id
    (``M`` and five digits)."""
    return bytes(msg.data[:6]).decode()


def events(conn: Any, member_id: str, *subjects: str) -> Awaitable[None]:
    """The events' rows; each payload starts with the member's id."""
    return conn.executemany(  # type: ignore[no-any-return]
        "INSERT INTO outbox (event_id, subject, payload) VALUES ($1, $2, $3)",
        [(uuid.uuid4().hex, subject, member_id.encode() + PAYLOAD) for subject in subjects],
    )


async def serve_members(part: Part) -> dict[str, Callable[[bytes, Any], Awaitable[bytes]]]:
    async def get(request: bytes, _context: Any) -> bytes:
        row = await part.pool.fetchrow(
            "SELECT * FROM members WHERE member_id = $1", request.decode()
        )
        return f"{row['member_id']}|{row['mobile']}|{row['consents']}".encode()

    return {"Members/Get": get}


async def serve_cards(part: Part) -> dict[str, Callable[[bytes, Any], Awaitable[bytes]]]:
    async def resolve(request: bytes, _context: Any) -> bytes:
        row = await part.pool.fetchrow("SELECT * FROM cards WHERE card_no = $1", request.decode())
        return f"{row['member_id']}|{row['account_id']}|{row['state']}".encode()

    async def hold(request: bytes, _context: Any) -> bytes:
        member_id, account_id, amount, request_id = request.decode().split("|")
        async with part.pool.acquire() as conn, conn.transaction():
            left = await conn.fetchval(
                "UPDATE accounts SET balance = balance - $2, updated_at = now()"
                " WHERE account_id = $1 AND balance >= $2 RETURNING balance",
                account_id,
                int(amount),
            )
            await conn.executemany(
                "INSERT INTO movements VALUES ($1, $2, $3, $4, $5, now())",
                [
                    (uuid.uuid4().hex, account_id, kind, int(amount), f"{request_id}:{kind}")
                    for kind in ("HOLD", "CAPTURE")
                ],
            )
            if part.config["events"]:
                await events(conn, member_id, HELD, CAPTURED)
        part.wake.set()
        return str(left).encode()

    return {"Cards/Resolve": resolve, "Cards/Hold": hold}


async def serve_pricing(part: Part) -> dict[str, Callable[[bytes, Any], Awaitable[bytes]]]:
    async def price(request: bytes, _context: Any) -> bytes:
        return request + b"|priced"

    def counting(table: str) -> Callable[[Any, Any], Awaitable[None]]:
        async def apply(conn: Any, msg: Any) -> None:
            await conn.execute(
                f"INSERT INTO {table} VALUES ($1, $2, 1) ON CONFLICT (member_id)"
                f" DO UPDATE SET last_sale = $2, sales = {table}.sales + 1",
                member_of(msg),
                msg.headers["Nats-Msg-Id"],
            )

        return apply

    part.background(part.consume("skeleton-followups", SALE_RECORDED, counting("followups")))
    part.background(part.consume("skeleton-referrals", SALE_RECORDED, counting("referrals")))
    return {"Pricing/Price": price}


async def serve_notify(part: Part) -> dict[str, Callable[[bytes, Any], Awaitable[bytes]]]:
    get_member = part.call("members", "Get")
    planned: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def notification(conn: Any, msg: Any) -> None:
        notification_id = uuid.uuid4().hex
        member_id = member_of(msg)
        await conn.execute(
            "INSERT INTO notifications VALUES ($1, $2, $3, now())",
            notification_id,
            member_id,
            msg.headers["Nats-Msg-Id"],
        )
        planned.put_nowait((notification_id, member_id))

    async def send() -> None:
        while True:
            notification_id, member_id = await planned.get()
            member = (await get_member(member_id.encode())).decode().split("|")
            async with part.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO messages VALUES ($1, $2, $3, $4, 'SENT', now())",
                    uuid.uuid4().hex,
                    notification_id,
                    member[1],
                    "You paid 12.50 with your card; 9,987.50 left.",
                )
                await events(conn, member_id, QUEUED, SENT)
            part.wake.set()

    part.background(part.consume("skeleton-notify", CAPTURED, notification))
    for _ in range(4):
        part.background(send())
    return {}


async def serve_till(part: Part) -> dict[str, Callable[[bytes, Any], Awaitable[bytes]]]:
    resolve = part.call("cards", "Resolve")
    hold = part.call("cards", "Hold")
    price = part.call("pricing", "Price")

    async def checkout(request: bytes, _context: Any) -> bytes:
        checkout_id, card_no, pays_stored_value = request.decode().split("|")
        logged, card = await asyncio.gather(
            part.pool.fetchval("SELECT step FROM checkouts WHERE checkout_id = $1", checkout_id),
            resolve(card_no.encode()),
        )
        if logged is not None:
            return RECEIPT
        member_id, account_id, _state = card.decode().split("|")
        async with part.pool.acquire() as conn:
            await conn.fetchrow("SELECT * FROM members WHERE member_id = $1", member_id)
            await conn.fetchval(
                "SELECT coalesce(sum(spend), 0) FROM tier_activity WHERE member_id = $1",
                member_id,
            )
        priced = await price(f"{member_id}|SKU-1:2|SKU-2:1|SKU-3:1".encode())
        await part.pool.execute(
            "INSERT INTO checkouts VALUES ($1, 'STARTED', $2, NULL, now())", checkout_id, priced
        )
        if pays_stored_value == "1":
            await hold(f"{member_id}|{account_id}|1250|checkout:{checkout_id}".encode())
        sale_id = uuid.uuid4().hex
        async with part.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE checkouts SET step = 'COMMITTED', sale_id = $2 WHERE checkout_id = $1",
                checkout_id,
                sale_id,
            )
            await conn.execute(
                "INSERT INTO points_lots VALUES ($1, $2, 12, $3, now())",
                uuid.uuid4().hex,
                member_id,
                sale_id,
            )
            await conn.execute(
                "INSERT INTO tier_activity VALUES ($1, $2, 1250, current_date)", member_id, sale_id
            )
            await conn.execute(
                "INSERT INTO sales VALUES ($1, $2, 1250, $3, now())", sale_id, member_id, RECEIPT
            )
            await conn.executemany(
                "INSERT INTO sale_lines VALUES ($1, $2, 'SKU', 400)",
                [(sale_id, n) for n in (1, 2, 3)],
            )
            await conn.executemany(
                "INSERT INTO sale_tenders VALUES ($1, $2, 625)",
                [(sale_id, kind) for kind in ("cash", "stored_value")],
            )
            if part.config["events"]:
                await events(conn, member_id, SALE_RECORDED, POINTS_ACCRUED)
        part.wake.set()
        return RECEIPT

    return {"Till/Checkout": checkout}


SERVE = {
    "members": serve_members,
    "cards": serve_cards,
    "pricing": serve_pricing,
    "notify": serve_notify,
    "till": serve_till,
}


async def run_part(role: str, config: dict[str, Any]) -> None:
    part = Part(role, config)
    await part.open()
    methods = await SERVE[role](part)
    server = grpc.aio.server()
    by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for path, behaviour in methods.items():
        service, method = path.split("/")
        by_service.setdefault(service, {})[method] = grpc.unary_unary_rpc_method_handler(behaviour)
    for service, handlers in by_service.items():
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(f"skeleton.{service}", handlers),)
        )
    serving = health.aio.HealthServicer()  # type: ignore[attr-defined]
    await serving.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(serving, server)
    server.add_insecure_port(config["listen"])
    await server.start()
    if role in ("till", "cards", "notify"):
        part.background(part.relay())
    await server.wait_for_termination()


# --- the driver -------------------------------------------------------------------------


@dataclass
class Skeleton:
    """The five processes, their databases and NATS."""

    work: Path
    admin_url: str
    members: int
    # False: the checkout's calls and transactions alone, no events (and
    # so nothing for the consumers to do).
    events: bool = True
    databases: ThrowawayDatabases | None = None
    nats: NatsServer | None = None

    def __post_init__(self) -> None:
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.database_of: dict[str, str] = {}
        self.urls: dict[str, str] = {}
        self.address = ""

    async def start(self) -> None:
        import nats  # noqa: PLC0415

        self.databases = ThrowawayDatabases(self.admin_url)
        self.nats = NatsServer(self.work / "nats")
        self.nats.start()
        nc = await nats.connect(self.nats.url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name=STREAM, subjects=["skeleton.>"]))
        finally:
            await nc.close()
        ports = {role: free_port() for role in ROLES}
        peers = {role: f"127.0.0.1:{port}" for role, port in ports.items()}
        needs = {"till": ("cards", "pricing"), "notify": ("members",)}
        for role in ROLES:
            url = await self.databases.create()
            self.urls[role] = url
            self.database_of[role] = url.rsplit("/", 1)[1].split("?")[0]
            config = {
                "listen": peers[role],
                "database": url,
                "nats": self.nats.url,
                "members": self.members,
                "events": self.events,
                "peers": {peer: peers[peer] for peer in needs.get(role, ())},
            }
            self.processes[role] = spawn(
                ["-m", "bench.skeleton", "--part", role, json.dumps(config)],
                {},
                self.work / f"skeleton-{role}.log",
            )
        for role in ROLES:
            try:
                await wait_serving(peers[role], timeout=60)
            except RuntimeError as error:
                raise RuntimeError(f"{error}{self._exited()}") from None
        self.address = peers["till"]

    async def books(self, timeout: float = 30.0) -> Books:
        """Waits until every sale's events have reached their consumers
        (the floor must have done the whole shape). Raises when they have
        not within ``timeout``."""
        import asyncpg  # noqa: PLC0415

        async def count(role: str, query: str) -> int:
            conn = await asyncpg.connect(self.urls[role])
            try:
                return int(await conn.fetchval(query))
            finally:
                await conn.close()

        unsent = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
        deadline = time.monotonic() + timeout
        while True:
            books = Books(
                events=self.events,
                sales=await count("till", "SELECT count(*) FROM sales"),
                captures=await count(
                    "cards", "SELECT count(*) FROM movements WHERE kind = 'CAPTURE'"
                ),
                messages=await count("notify", "SELECT count(*) FROM messages"),
                followups=await count("pricing", "SELECT coalesce(sum(sales), 0) FROM followups"),
                referrals=await count("pricing", "SELECT coalesce(sum(sales), 0) FROM referrals"),
                unsent=sum([await count(role, unsent) for role in ("till", "cards", "notify")]),
            )
            if books.complete:
                return books
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the bare suite's events did not all arrive: {books}{self._exited()}"
                )
            await asyncio.sleep(0.5)

    def _exited(self) -> str:
        """The end of the log of every part that has stopped."""
        said = ""
        for role, process in self.processes.items():
            if process.poll() is not None:
                log = (self.work / f"skeleton-{role}.log").read_text(errors="replace")
                said += f"\n{role} exited ({process.returncode}):\n{log[-2000:]}"
        return said

    def cpu_processes(self) -> dict[str, list[int]]:
        found = {f"skeleton {role}": [p.pid] for role, p in self.processes.items()}
        for role, database in self.database_of.items():
            found[f"postgres (skeleton {role})"] = pids_matching("postgres: ", f" {database} ")
        if self.nats is not None and self.nats.process is not None:
            found["nats (skeleton)"] = [self.nats.process.pid]
        return found

    async def stop(self) -> None:
        stop_processes(self.processes.values())
        if self.nats is not None:
            self.nats.stop()
        if self.databases is not None:
            await self.databases.drop_all()


@dataclass(frozen=True)
class Books:
    """What the bare suite recorded, counted in each part's database."""

    events: bool
    sales: int
    captures: int
    messages: int
    followups: int
    referrals: int
    unsent: int

    @property
    def complete(self) -> bool:
        """Every capture made its message, both consumers saw every sale,
        and no event waits in an outbox (without events: nothing was
        consumed)."""
        if not self.events:
            return self.messages == self.followups == self.referrals == self.unsent == 0
        return (
            self.messages == self.captures
            and self.followups == self.referrals == self.sales
            and self.unsent == 0
        )

    def __str__(self) -> str:
        return (
            f"{self.sales} sales, {self.captures} stored-value captures, {self.messages}"
            f" messages, {self.followups} and {self.referrals} sales seen by pricing's two"
            f" consumers, {self.unsent} events unsent"
        )


@dataclass
class Floor:
    """What the skeleton did, [many callers, one caller], and in each its
    processes' CPU a checkout (ms)."""

    results: list[Result]
    cpu_ms: list[dict[str, float]]
    books: Books


async def floor(
    admin_url: str, members: int, concurrency: int, seconds: float, *, events: bool = True
) -> Floor:
    """Starts the skeleton, drives it as the benchmark's tills drive the
    suite (each caller keeps to its own members), and stops it."""
    work = Path(tempfile.mkdtemp(prefix="cornucopia-bench-skeleton-"))
    skeleton = Skeleton(work, admin_url, members, events)
    try:
        await skeleton.start()
        async with grpc.aio.insecure_channel(skeleton.address) as channel:
            checkout = channel.unary_unary("/skeleton.Till/Checkout")
            failures: list[str] = []

            def caller(phase: str) -> Callable[[int], Awaitable[None]]:
                async def call(n: int) -> None:
                    card = f"C{n % members:05d}"
                    stored_value = "1" if n % 10 < STORED_VALUE_SHARE else "0"
                    try:
                        await checkout(f"{phase}-{n}|{card}|{stored_value}".encode())
                    except grpc.aio.AioRpcError as error:
                        failures.append(f"{error.code().name}: {error.details()}")
                        raise

                return call

            meter = CpuMeter(skeleton.cpu_processes)
            run = uuid.uuid4().hex[:8]
            await drive(
                "warm-up",
                own_cards(caller(f"{run}w"), concurrency),
                concurrency=concurrency,
                seconds=2,
            )
            results: list[Result] = []
            cpu_ms: list[dict[str, float]] = []
            for callers in (concurrency, 1):
                meter.start()
                result = await drive(
                    f"bare suite of its shape, {callers} caller{'s' if callers > 1 else ''}",
                    own_cards(caller(f"{run}c{callers}"), callers),
                    concurrency=callers,
                    seconds=seconds,
                )
                used = meter.stop()
                used.pop("(machine, available)", None)
                results.append(result)
                cpu_ms.append(
                    {name: 1000 * spent / max(result.calls, 1) for name, spent in used.items()}
                )
        if failures:
            raise RuntimeError(f"{len(failures)} checkouts failed, the first: {failures[0]}")
        return Floor(results, cpu_ms, await skeleton.books())
    finally:
        await skeleton.stop()
        shutil.rmtree(work, ignore_errors=True)


def own_cards(
    call: Callable[[int], Awaitable[None]], callers: int
) -> Callable[[int], Awaitable[None]]:
    """Each caller keeps to its own cards, as a member is at one till at a
    time: the k-th caller's n-th call uses card k + n * callers."""
    slots: dict[int, int] = {}
    counts = [0] * callers

    async def keyed(_n: int) -> None:
        mine = slots.setdefault(id(asyncio.current_task()), len(slots))
        counts[mine] += 1
        await call(mine + callers * counts[mine])

    return keyed


def print_floor(found: Floor) -> None:
    for result in found.results:
        print("  " + result.line())
    for result, cpu_ms in zip(found.results, found.cpu_ms, strict=True):
        print(f"  CPU per checkout, {result.name} (ms of CPU a checkout):")
        for name, ms in sorted(cpu_ms.items(), key=lambda item: -item[1]):
            if ms >= 0.05:
                print(f"    {name:<34} {ms:6.2f} ms")
    print(f"  the bare suite's books: {found.books}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs=2, metavar=("ROLE", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--postgres", help="an admin URL of a PostgreSQL server")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument(
        "--no-events", action="store_true", help="the calls and transactions alone, no events"
    )
    args = parser.parse_args(argv)
    if args.part:
        role, config = args.part
        asyncio.run(run_part(role, json.loads(config)))
        return
    if not args.postgres:
        raise SystemExit("--postgres: the skeleton runs on PostgreSQL")
    if args.members < args.concurrency:
        raise SystemExit("--members must be at least --concurrency")
    found = asyncio.run(
        floor(
            args.postgres,
            args.members,
            args.concurrency,
            args.seconds,
            events=not args.no_events,
        )
    )
    shape = "without events" if args.no_events else "with its events"
    print(f"\nthe checkout's shape, bare, {shape}: PostgreSQL; {args.seconds:.0f} s each")
    print_floor(found)
    print(f"  (the machine had {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
