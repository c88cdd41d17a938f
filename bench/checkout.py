"""Checkout throughput and latency on the running suite (members, cards, loyalty).

    python -m bench.checkout [--seconds 15] [--concurrency 16] [--members 64]
        [--postgres URL] [--make-up] [--log-level INFO] [--rates 20,40]

Starts a NATS server (from the wheel) and the five gRPC services (members,
cards and loyalty; campaigns, whose pricing step the checkout calls, and
notify, which consumes the sales' events too), each in a process of its own
(``python -m services.<name>``) with the environment ``make up`` gives its
children (``chassis.supervisor.child_env``: the peers' addresses, a var
directory, console logs at INFO) and so, by default, the same SQLite files
(``<var>/<service>.db``); with ``--postgres`` each service gets a throwaway
PostgreSQL database of its own instead (dropped afterwards). With
``--make-up`` the bench runs ``cornucopia up`` itself (what ``make up``
runs: the same five, the gateway and the demo data, under a supervisor that
relays their logs) in a temporary var directory and drives that.

It then sets up, through the services' public APIs: a region and four
stores (members' OrganisationService, as HQ), a stored-value card program
with a 10 % member discount (larger than any tier's, so that a basket's
total does not depend on the member's tier), ``--members`` members enrolled
with CreateMember (waiting until loyalty's member projection knows them),
a card each (IssueCard) recharged with 10,000,000 CNY.

Then closed-loop callers send Checkout calls, each with a fresh checkout_id,
as the store's till (a store operator's token): the member's card number, a
3-line basket, and tenders: 30 % cash only, 70 % stored value (plus the
change in cash), a seventh of those also paying up to a fifth with points
once the member has earned some. A member is at one till at a time (the
callers take members from a shared pool), as in a shop. After a warm-up of
two checkouts a member (loyalty asks members once for a member's birthday
month; the members earn points to pay with), measured for ``--seconds``
each: ``--concurrency`` callers, then one caller. With ``--rates``, then
for each rate an open loop: a checkout is due every 1/rate s whether or not
the earlier ones have answered (as tills send them), and each latency runs
from when its checkout was due, so a suite that falls behind shows as
latency; it tells the rate a suite sustains within a latency aim, which the
closed loop, whose callers wait for their answers, does not.

In the same run, the baselines: a bare grpc.aio health check against a bare
server process (bench/baseline_server.py) with as many callers and with
one, and a bare database transaction of a checkout-like shape through the
chassis's unit of work on the same kind of database (an UPDATE of one row,
an INSERT of a sale, three lines, two tenders and an event row). It prints
each figure and the ratios; the CPU each process used per checkout (from
/proc: the services, NATS, the PostgreSQL backends of the services'
databases, the load driver itself); on PostgreSQL the transactions and
rows each service's database saw per checkout; and the RPCs each service
served per checkout with their mean duration (from the services' logs).

At the end it checks: every receipt's sale is stored once (and no sale
without a receipt), no checkout is left unfinished, the cards' ledger
verifies, each card's balance is what it was after the recharge minus the
stored value the receipts captured, nothing is left on hold (stored value
or points), and each member's points are what their last receipt says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from bench import skeleton
from bench.enrollment import wait_serving
from bench.harness import (
    CpuMeter,
    Result,
    ThrowawayDatabases,
    bare_grpc,
    cmdline_of,
    drive,
    drive_at_rate,
    pids_matching,
    spawn,
    stop_processes,
    warm_then_many_and_one,
)
from bench.organisation import open_stores, store_id
from chassis import supervisor
from chassis.auth import Role, Scope, ScopeLevel, mint_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET, GRPC_SERVICES, normalise_database_url
from chassis.db import Database, UTCDateTime, utcnow
from chassis.logs import configure_logging
from chassis.natsserver import NatsServer, free_port
from cornucopia.cards.v1 import (
    cards_pb2,
    cards_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    stored_value_pb2,
    stored_value_pb2_grpc,
)
from cornucopia.common.v1 import money_pb2
from cornucopia.loyalty.v1 import checkout_pb2 as P
from cornucopia.loyalty.v1 import checkout_pb2_grpc
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.cards.store import stored_value as sv_store
from services.loyalty import points_ledger
from services.loyalty.store import members as loyalty_members
from services.loyalty.store import points as points_store
from services.loyalty.store import sales as sales_store

# Every gRPC service, as make up runs them: the checkout calls members,
# cards and campaigns (its pricing step), and campaigns and notify consume
# the sales' events.
SERVICES = GRPC_SERVICES
PROGRAM = "BENCHCO"
CURRENCY = "CNY"
STORES = tuple(store_id(901 + n) for n in range(4))
# Larger than any tier's discount (VIP: 8 %), so the total is known up front.
MEMBER_DISCOUNT_BPS = 1_000
RECHARGE = 1_000_000_000  # 10,000,000 CNY a card: more than any run spends
# (sku, category, unit price in fen)
CATALOGUE = (
    ("SERUM-30", "skincare", 19_900),
    ("MASK-5", "skincare", 5_000),
    ("LIPSTICK-R", "makeup", 26_000),
    ("CLEANSER", "skincare", 12_800),
    ("PERFUME-50", "fragrance", 68_000),
    ("HANDCREAM", "bodycare", 8_800),
    ("TONER-200", "skincare", 15_500),
)
# Points pay at most this share of a sale here (the chain allows 50 %).
POINTS_SHARE = 5  # a fifth
MIN_POINTS = 500
WARM_UP_LIMIT_SECONDS = 300.0
SETUP_CONCURRENCY = 8
# PostgreSQL backends report their statistics at most once a second while
# busy and within ten seconds once idle.
PG_STATS_SETTLE_SECONDS = 11.0


def cny(minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=CURRENCY, minor_units=minor_units)


def bearer(
    roles: list[Role], scope: Scope, subject: str, store: str = ""
) -> tuple[tuple[str, str], ...]:
    token = mint_token(DEVELOPMENT_TOKEN_SECRET, subject, roles, scope, store_id=store)
    return (("authorization", f"Bearer {token}"),)


HQ_ADMIN = bearer([Role.HQ_ADMIN], Scope(ScopeLevel.HQ), "bench-admin")
SERVICE = bearer([Role.SERVICE], Scope(ScopeLevel.HQ), "bench")
TILLS = {
    code: bearer([Role.STORE_OPERATOR], Scope(ScopeLevel.STORE, code), f"till-{code}", code)
    for code in STORES
}


# --- processes -------------------------------------------------------------------


def start_make_up(var_dir: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``cornucopia up`` (what ``make up`` runs) in a session of its own."""
    handle = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "chassis.cli", "up", "--var-dir", str(var_dir)],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


# --- the suite --------------------------------------------------------------------


@dataclass
class Suite:
    """members, cards and loyalty in processes of their own: started here
    as ``make up`` starts them, or by ``cornucopia up`` itself."""

    work: Path
    postgres: str | None
    make_up: bool
    log_level: str
    addresses: dict[str, str] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    nats: NatsServer | None = None
    databases: ThrowawayDatabases | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    supervisor_process: subprocess.Popen[bytes] | None = None

    @property
    def var_dir(self) -> Path:
        return self.work / "var"

    async def start(self) -> None:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        base = dict(os.environ)
        base["LOG_LEVEL"] = self.log_level
        if self.postgres:
            self.databases = ThrowawayDatabases(self.postgres)
            for name in SERVICES:
                url = await self.databases.create()
                base[f"{name.upper()}_DATABASE_URL"] = url
                self.urls[name] = normalise_database_url(url)
        else:
            # What Settings.from_env picks when no URL is set: make up's files.
            for name in SERVICES:
                self.urls[name] = f"sqlite+aiosqlite:///{self.var_dir / (name + '.db')}"
        if self.make_up:
            await self._start_make_up(base)
        else:
            await self._start_own(base)

    async def _start_own(self, base: dict[str, str]) -> None:
        self.nats = NatsServer(self.work / "nats")
        self.nats.start()
        ports = {name: free_port() for name in (*GRPC_SERVICES, supervisor.GATEWAY)}
        for name in SERVICES:
            env = supervisor.child_env(
                name, ports, nats_url=self.nats.url, var_dir=self.var_dir, base=base
            )
            self.logs[name] = self.work / f"{name}.log"
            process = spawn(["-m", f"services.{name}"], env, self.logs[name])
            self.processes.append(process)
            self.pids[name] = process.pid
            self.addresses[name] = f"127.0.0.1:{ports[name]}"
        self.pids["nats"] = self.nats.process.pid if self.nats.process is not None else 0
        for name in SERVICES:
            await self._wait(name, self.processes[SERVICES.index(name)])

    async def _wait(self, name: str, process: subprocess.Popen[bytes]) -> None:
        waiting = asyncio.ensure_future(wait_serving(self.addresses[name], timeout=120))
        while not waiting.done():
            if process.poll() is not None:
                waiting.cancel()
                log = self.logs[name].read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{log}")
            await asyncio.wait([waiting], timeout=0.5)
        await waiting

    async def _start_make_up(self, base: dict[str, str]) -> None:
        base.pop("NATS_URL", None)
        base["NO_COLOR"] = "1"
        self.logs["up"] = self.work / "up.log"
        self.supervisor_process = start_make_up(self.var_dir, base, self.logs["up"])
        endpoints = self.var_dir / "endpoints.json"
        deadline = time.monotonic() + 180
        while not endpoints.exists():
            if self.supervisor_process.poll() is not None or time.monotonic() > deadline:
                log = self.logs["up"].read_text(errors="replace")[-3000:]
                raise RuntimeError(f"cornucopia up did not come up:\n{log}")
            await asyncio.sleep(0.5)
        info = json.loads(endpoints.read_text())
        self.addresses = {name: info["grpc"][name] for name in SERVICES}
        # The demo data is loaded once everything is up: wait for its banner.
        while "Demo chain" not in self.logs["up"].read_text(errors="replace"):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        for pid in children_of(self.supervisor_process.pid):
            cmdline = cmdline_of(pid)
            for name in (*GRPC_SERVICES, supervisor.GATEWAY):
                if f"services.{name} " in cmdline + " ":
                    self.pids[name] = pid
            if "nats-server" in cmdline:
                self.pids["nats"] = pid
        self.pids["(supervisor: cornucopia up)"] = self.supervisor_process.pid
        for name in SERVICES:
            self.logs[name] = self.logs["up"]

    def cpu_processes(self) -> dict[str, list[int]]:
        processes = {name: [pid] for name, pid in self.pids.items() if pid}
        if self.databases is not None:
            for name, url in self.urls.items():
                database = str(make_url(url).database)
                processes[f"postgres ({name}'s database)"] = pids_matching(
                    "postgres: ", f" {database} "
                )
        return processes

    async def stop(self) -> None:
        if self.supervisor_process is not None:
            if self.supervisor_process.poll() is None:
                self.supervisor_process.send_signal(signal.SIGTERM)
            try:
                self.supervisor_process.wait(40)
            except subprocess.TimeoutExpired:
                self.supervisor_process.kill()
        stop_processes(self.processes)
        if self.nats is not None:
            self.nats.stop()
        if self.databases is not None:
            await self.databases.drop_all()


# --- setting the chain up -------------------------------------------------------------


async def limited(coroutines: Iterable[Awaitable[object]], limit: int) -> list[object]:
    gate = asyncio.Semaphore(limit)

    async def one(coroutine: Awaitable[object]) -> object:
        async with gate:
            return await coroutine

    return list(await asyncio.gather(*(one(c) for c in coroutines)))


@dataclass
class Member:
    member_id: str
    card_id: str = ""
    card_number: str = ""
    start_balance: int = 0
    # What the last receipt said the member's points were.
    points: int | None = None


async def enroll(channel: grpc.aio.Channel, count: int, run_id: int) -> list[Member]:
    stub = members_pb2_grpc.MembersServiceStub(channel)

    async def one(n: int) -> Member:
        home = STORES[n % len(STORES)]
        member = await stub.CreateMember(
            members_pb2.CreateMemberRequest(
                request_id=f"bench-enroll-{run_id}-{n}",
                member=members_pb2.Member(
                    home_store_id=home,
                    given_name="Bench",
                    family_name="Checkout",
                    mobile=f"+86139{run_id:03d}{n:05d}",
                ),
            ),
            metadata=TILLS[home],
        )
        return Member(member.member_id)

    return [m for m in await limited((one(n) for n in range(count)), SETUP_CONCURRENCY)]  # type: ignore[misc]


async def wait_known(db: Database, member_ids: list[str], timeout: float = 120.0) -> None:
    """Until loyalty's member projection (filled from members' events) has them."""
    table = loyalty_members.known_members
    deadline = time.monotonic() + timeout
    while True:
        known = 0
        async with db.sessions() as session:
            for start in range(0, len(member_ids), 500):
                known += (
                    await session.scalar(
                        sa.select(sa.func.count())
                        .select_from(table)
                        .where(table.c.member_id.in_(member_ids[start : start + 500]))
                    )
                    or 0
                )
        if known == len(member_ids):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"loyalty knows {known} of {len(member_ids)} members")
        await asyncio.sleep(0.3)


async def issue_cards(channel: grpc.aio.Channel, members: list[Member]) -> None:
    programs = programs_pb2_grpc.CardProgramsServiceStub(channel)
    cards = cards_pb2_grpc.CardsServiceStub(channel)
    wallet = stored_value_pb2_grpc.StoredValueServiceStub(channel)
    await programs.CreateCardProgram(
        programs_pb2.CreateCardProgramRequest(
            request_id=f"bench-program-{uuid.uuid4().hex}",
            card_program=programs_pb2.CardProgram(
                program_id=PROGRAM,
                display_name="会员储值卡",
                form=programs_pb2.CARD_FORM_PHYSICAL,
                number_format=programs_pb2.NumberFormat(
                    prefix="8877", length=16, luhn_check_digit=True
                ),
                validity_months=24,
                stored_value=True,
                member_discount_bps=MEMBER_DISCOUNT_BPS,
                holding=programs_pb2.CARD_HOLDING_PERSONAL,
            ),
        ),
        metadata=HQ_ADMIN,
    )

    async def one(n: int, member: Member) -> None:
        till = TILLS[STORES[n % len(STORES)]]
        card = await cards.IssueCard(
            cards_pb2.IssueCardRequest(
                request_id=f"bench-card-{member.member_id}",
                program_id=PROGRAM,
                member_id=member.member_id,
            ),
            metadata=till,
        )
        await wallet.Recharge(
            stored_value_pb2.RechargeRequest(
                request_id=f"bench-recharge-{member.member_id}",
                card_id=card.card_id,
                amount=cny(RECHARGE),
                channel=stored_value_pb2.RECHARGE_CHANNEL_STORE_TERMINAL,
            ),
            metadata=till,
        )
        balance = await wallet.GetBalance(
            stored_value_pb2.GetBalanceRequest(card_id=card.card_id), metadata=SERVICE
        )
        member.card_id, member.card_number = card.card_id, card.card_number
        # A recharge bonus rule (make up's demo data has one) adds to it.
        member.start_balance = balance.available.minor_units

    await limited((one(n, m) for n, m in enumerate(members)), SETUP_CONCURRENCY)


# --- the checkouts ------------------------------------------------------------------------


def basket(n: int) -> list[P.BasketLine]:
    first = n % len(CATALOGUE)
    picks = [CATALOGUE[(first + step) % len(CATALOGUE)] for step in (0, 2, 5)]
    quantities = (1 + (n // len(CATALOGUE)) % 2, 1, 1)
    return [
        P.BasketLine(sku=sku, category=category, quantity=q, unit_price=cny(price))
        for (sku, category, price), q in zip(picks, quantities, strict=True)
    ]


def total_of(lines: list[P.BasketLine]) -> int:
    """The member price: each line's discount rounded down, as loyalty does."""
    total = 0
    for line in lines:
        gross = line.quantity * line.unit_price.minor_units
        total += gross - gross * MEMBER_DISCOUNT_BPS // 10_000
    return total


def tenders(n: int, total: int, member: Member) -> tuple[list[P.Tender], str]:
    """30 % cash only; 70 % stored value and the change in cash, a seventh
    of those with points too once the member has some."""
    kind = n % 10
    if kind < 3:
        return [P.Tender(kind=P.TENDER_KIND_CASH, amount=cny(total))], "cash"
    paid: list[P.Tender] = []
    rest = total
    mix = "stored value + cash"
    if kind == 3 and (member.points or 0) >= MIN_POINTS:
        points = min(member.points or 0, total // POINTS_SHARE)
        paid.append(P.Tender(kind=P.TENDER_KIND_POINTS, points=points))  # 1 point = 1 fen
        rest -= points
        mix = "stored value + points + cash"
    change = rest % 10_000
    if change:
        paid.append(P.Tender(kind=P.TENDER_KIND_CASH, amount=cny(change)))
    paid.append(P.Tender(kind=P.TENDER_KIND_STORED_VALUE, amount=cny(rest - change)))
    return paid, mix


@dataclass
class Ledger:
    """What the receipts say, for the consistency check."""

    sales: dict[str, str] = field(default_factory=dict)  # checkout_id -> sale_id
    captured: Counter[str] = field(default_factory=Counter)  # card_id -> fen
    attempted: int = 0
    mixes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


class Tills:
    """The callers: each checkout takes a free member (one till at a time
    per member), a store, a basket and tenders."""

    def __init__(self, channel: grpc.aio.Channel, members: list[Member], run_id: int) -> None:
        self.stub = checkout_pb2_grpc.CheckoutServiceStub(channel)
        self.free: asyncio.Queue[Member] = asyncio.Queue()
        for member in members:
            self.free.put_nowait(member)
        self.run_id = run_id
        self.ledger = Ledger()

    async def checkout(self, n: int) -> None:
        member = await self.free.get()
        try:
            await self._checkout(n, member)
        finally:
            self.free.put_nowait(member)

    async def _checkout(self, n: int, member: Member) -> None:
        store = STORES[n % len(STORES)]
        lines = basket(n)
        paid, mix = tenders(n, total_of(lines), member)
        checkout_id = f"bench-{self.run_id}-{uuid.uuid4().hex}"
        self.ledger.attempted += 1
        try:
            receipt = await self.stub.Checkout(
                P.CheckoutRequest(
                    checkout_id=checkout_id,
                    store_id=store,
                    terminal_id=f"T{n % 3 + 1}",
                    card_number=member.card_number,
                    lines=lines,
                    tenders=paid,
                ),
                metadata=TILLS[store],
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            self.ledger.failures[f"{exc.code().name}: {exc.details()}"] += 1
            raise
        self.ledger.sales[checkout_id] = receipt.sale_id
        self.ledger.mixes[mix] += 1
        for tender in receipt.tenders:
            if tender.kind == P.TENDER_KIND_STORED_VALUE:
                self.ledger.captured[member.card_id] += tender.amount.minor_units
        member.points = receipt.points.balance


# --- the baselines ---------------------------------------------------------------------

_bare = sa.MetaData()
bare_accounts = sa.Table(
    "bench_accounts",
    _bare,
    sa.Column("account_id", sa.String(16), primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
bare_sales = sa.Table(
    "bench_sales",
    _bare,
    sa.Column("sale_id", sa.String(32), primary_key=True),
    sa.Column("account_id", sa.String(16), nullable=False),
    sa.Column("total", sa.BigInteger, nullable=False),
    sa.Column("receipt", sa.LargeBinary, nullable=False),
    sa.Column("sold_at", UTCDateTime, nullable=False),
)
bare_lines = sa.Table(
    "bench_sale_lines",
    _bare,
    sa.Column("sale_id", sa.String(32), primary_key=True),
    sa.Column("line_no", sa.Integer, primary_key=True),
    sa.Column("sku", sa.String(64), nullable=False),
    sa.Column("net", sa.BigInteger, nullable=False),
)
bare_tenders = sa.Table(
    "bench_sale_tenders",
    _bare,
    sa.Column("sale_id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(12), primary_key=True),
    sa.Column("amount", sa.BigInteger, nullable=False),
)
bare_events = sa.Table(
    "bench_events",
    _bare,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("subject", sa.String(100), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
)


async def bare_transactions(url: str, rows: int, concurrency: int, seconds: float) -> list[Result]:
    """One unit of work of a checkout's shape: an account row updated, a
    sale, its three lines and two tenders, an event row; spread over
    ``rows`` accounts, with ``concurrency`` callers and with one."""
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(_bare.create_all)
        async with db.transaction() as session:
            await session.execute(
                sa.insert(bare_accounts),
                [
                    {"account_id": f"A{n:06d}", "balance": RECHARGE, "updated_at": utcnow()}
                    for n in range(rows)
                ],
            )

        async def call(n: int) -> None:
            account_id = f"A{n % rows:06d}"
            sale_id = uuid.uuid4().hex
            now = utcnow()
            async with db.transaction() as session:
                await session.execute(
                    sa.update(bare_accounts)
                    .where(bare_accounts.c.account_id == account_id)
                    .values(balance=bare_accounts.c.balance - 100, updated_at=now)
                )
                await session.execute(
                    sa.insert(bare_sales).values(
                        sale_id=sale_id,
                        account_id=account_id,
                        total=100,
                        receipt=b"r" * 400,
                        sold_at=now,
                    )
                )
                await session.execute(
                    sa.insert(bare_lines),
                    [{"sale_id": sale_id, "line_no": i, "sku": "SKU", "net": 1} for i in (1, 2, 3)],
                )
                await session.execute(
                    sa.insert(bare_tenders),
                    [
                        {"sale_id": sale_id, "kind": "cash", "amount": 50},
                        {"sale_id": sale_id, "kind": "stored_value", "amount": 50},
                    ],
                )
                await session.execute(
                    sa.insert(bare_events).values(subject="bench.sale", payload=b"e" * 200)
                )

        return await warm_then_many_and_one("bare db tx", call, concurrency, seconds)
    finally:
        await db.dispose()


async def raw_asyncpg_transactions(
    url: str, rows: int, concurrency: int, seconds: float
) -> list[Result]:
    """The same transaction on the same tables straight through asyncpg (a
    pool of 10, as the services'), without SQLAlchemy and the pool's ping."""
    import asyncpg  # noqa: PLC0415 - only the PostgreSQL runs need it

    pool = await asyncpg.create_pool(url, min_size=10, max_size=10)
    try:

        async def call(n: int) -> None:
            account_id = f"A{n % rows:06d}"
            sale_id = uuid.uuid4().hex
            now = utcnow()
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE bench_accounts SET balance = balance - 100, updated_at = $2"
                    " WHERE account_id = $1",
                    account_id,
                    now,
                )
                await conn.execute(
                    "INSERT INTO bench_sales (sale_id, account_id, total, receipt, sold_at)"
                    " VALUES ($1, $2, 100, $3, $4)",
                    sale_id,
                    account_id,
                    b"r" * 400,
                    now,
                )
                await conn.executemany(
                    "INSERT INTO bench_sale_lines (sale_id, line_no, sku, net)"
                    " VALUES ($1, $2, 'SKU', 1)",
                    [(sale_id, i) for i in (1, 2, 3)],
                )
                await conn.executemany(
                    "INSERT INTO bench_sale_tenders (sale_id, kind, amount) VALUES ($1, $2, 50)",
                    [(sale_id, "cash"), (sale_id, "stored_value")],
                )
                await conn.execute(
                    "INSERT INTO bench_events (subject, payload) VALUES ('bench.sale', $1)",
                    b"e" * 200,
                )

        return await warm_then_many_and_one("bare asyncpg tx", call, concurrency, seconds)
    finally:
        await pool.close()


# --- what the services did: their logs, PostgreSQL's statistics ------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RPC = re.compile(r"""rpc["']?\s*[=:]\s*["']?(/[\w.]+/(\w+))""")
_DURATION = re.compile(r"""duration_ms["']?\s*[=:]\s*([\d.]+)""")
_PREFIX = re.compile(r"^(\w+)\s+\|")


def log_offsets(suite: Suite) -> dict[Path, int]:
    return {path: path.stat().st_size for path in set(suite.logs.values()) if path.exists()}


def rpcs_between(
    suite: Suite, start: dict[Path, int], end: dict[Path, int]
) -> dict[tuple[str, str], list[float]]:
    """(service, method) -> the durations its ``rpc`` log lines gave, from
    the log bytes written between two offsets."""
    found: dict[tuple[str, str], list[float]] = defaultdict(list)
    names = {path: name for name, path in suite.logs.items()}
    if "up" in suite.logs:
        names[suite.logs["up"]] = "up"
    for path, stop in end.items():
        with path.open("rb") as handle:
            handle.seek(start.get(path, 0))
            text = handle.read(stop - start.get(path, 0)).decode(errors="replace")
        for raw in text.splitlines():
            line = _ANSI.sub("", raw)
            rpc, duration = _RPC.search(line), _DURATION.search(line)
            if rpc is None or duration is None:
                continue
            service = names[path]
            if service == "up":  # make up prefixes each line with its child's name
                prefix = _PREFIX.match(line)
                service = prefix.group(1) if prefix else "?"
            found[(service, rpc.group(2))].append(float(duration.group(1)))
    return found


async def pg_stats(admin_url: str, databases: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    """database -> {"(database)": pg_stat_database's counters, table ->
    pg_stat_user_tables' counters}."""
    import asyncpg  # noqa: PLC0415 - only the PostgreSQL runs need it

    out: dict[str, dict[str, dict[str, int]]] = {}
    conn = await asyncpg.connect(admin_url)
    try:
        for row in await conn.fetch(
            "SELECT datname, xact_commit, xact_rollback, tup_inserted, tup_updated,"
            " tup_deleted, tup_fetched, sessions FROM pg_stat_database"
            " WHERE datname = ANY($1::text[])",
            databases,
        ):
            counters = {k: int(v) for k, v in row.items() if k != "datname"}
            out.setdefault(row["datname"], {})["(database)"] = counters
    finally:
        await conn.close()
    for database in databases:
        conn = await asyncpg.connect(
            make_url(admin_url).set(database=database).render_as_string(hide_password=False)
        )
        try:
            for row in await conn.fetch(
                "SELECT relname, seq_scan, coalesce(seq_tup_read, 0) AS seq_tup_read,"
                " coalesce(idx_scan, 0) AS idx_scan, coalesce(idx_tup_fetch, 0) AS idx_tup_fetch"
                " FROM pg_stat_user_tables"
            ):
                counters = {k: int(v) for k, v in row.items() if k != "relname"}
                out.setdefault(database, {})[row["relname"]] = counters
        finally:
            await conn.close()
    return out


def pg_lines(
    before: dict[str, dict[str, dict[str, int]]],
    after: dict[str, dict[str, dict[str, int]]],
    databases: dict[str, str],
    checkouts: int,
) -> list[str]:
    lines = []
    for name, database in databases.items():
        b, a = before.get(database, {}), after.get(database, {})

        def per(
            table: str,
            key: str,
            a: dict[str, dict[str, int]] = a,
            b: dict[str, dict[str, int]] = b,
        ) -> float:
            return (a.get(table, {}).get(key, 0) - b.get(table, {}).get(key, 0)) / checkouts

        lines.append(
            f"  {name:<8} commits {per('(database)', 'xact_commit'):5.1f}  rollbacks"
            f" {per('(database)', 'xact_rollback'):5.1f}  rows inserted"
            f" {per('(database)', 'tup_inserted'):5.1f}  updated"
            f" {per('(database)', 'tup_updated'):5.1f}  deleted"
            f" {per('(database)', 'tup_deleted'):5.1f}  fetched"
            f" {per('(database)', 'tup_fetched'):6.1f}  new connections"
            f" {per('(database)', 'sessions'):5.2f}"
        )
        tables = [t for t in a if t != "(database)"]
        read = {t: per(t, "seq_tup_read") + per(t, "idx_tup_fetch") for t in tables}
        busiest = sorted(tables, key=lambda t: -read[t])[:4]
        lines.append(
            "           rows read by table: "
            + "; ".join(
                f"{t} {read[t]:.1f} ({per(t, 'seq_scan'):.1f} seq scans,"
                f" {per(t, 'idx_scan'):.1f} index scans)"
                for t in busiest
                if read[t] >= 0.5
            )
        )
    return lines


# --- the consistency check ---------------------------------------------------------------


async def check_consistency(
    suite: Suite, members: list[Member], ledger: Ledger, cards_channel: grpc.aio.Channel
) -> tuple[bool, list[str]]:
    said: list[str] = []
    ok = True
    loyalty = Database(suite.urls["loyalty"])
    cards = Database(suite.urls["cards"])
    try:
        async with loyalty.sessions() as session:
            rows = (
                await session.execute(
                    sa.select(sales_store.sales.c.checkout_id, sales_store.sales.c.sale_id).where(
                        sales_store.sales.c.store_id.in_(STORES)
                    )
                )
            ).all()
            steps = Counter(
                row.step
                for row in await session.execute(
                    sa.select(sales_store.checkouts.c.step).where(
                        sales_store.checkouts.c.store_id.in_(STORES)
                    )
                )
            )
            points_held = await session.scalar(
                sa.select(sa.func.count())
                .select_from(points_store.points_holds)
                .where(points_store.points_holds.c.state == "held")
            )
            points_now = {
                m.member_id: await points_ledger.available(session, m.member_id) for m in members
            }
        stored = Counter(row.checkout_id for row in rows)
        by_checkout = {row.checkout_id: row.sale_id for row in rows}
        missing = [c for c in ledger.sales if stored[c] == 0]
        twice = [c for c, k in stored.items() if k > 1]
        wrong = [c for c, s in ledger.sales.items() if stored[c] and by_checkout[c] != s]
        unreceipted = [c for c in stored if c not in ledger.sales]
        sales_ok = not missing and not twice and not wrong
        ok &= sales_ok
        said.append(
            f"sales: {len(ledger.sales)} receipts, {len(rows)} sales stored;"
            f" missing {len(missing)},"
            f" stored twice {len(twice)}, another sale id {len(wrong)}, sales without a receipt"
            f" {len(unreceipted)} (of {ledger.attempted - len(ledger.sales)} failed calls)"
            f": {'consistent' if sales_ok else 'NOT CONSISTENT'}"
        )
        unfinished = {step: k for step, k in steps.items() if step not in ("committed", "aborted")}
        ok &= not unfinished
        said.append(
            "checkouts by step: "
            + ", ".join(f"{step} {k}" for step, k in sorted(steps.items()))
            + ("; none unfinished" if not unfinished else "; UNFINISHED ONES LEFT")
        )

        async with cards.sessions() as session:
            problems = await sv_store.verify(session)
            open_holds = await session.scalar(
                sa.select(sa.func.count())
                .select_from(sv_store.sv_holds)
                .where(sv_store.sv_holds.c.state == "held")
            )
        wallet = stored_value_pb2_grpc.StoredValueServiceStub(cards_channel)
        off, held = 0, 0
        for member in members:
            balance = await wallet.GetBalance(
                stored_value_pb2.GetBalanceRequest(card_id=member.card_id), metadata=SERVICE
            )
            expected = member.start_balance - ledger.captured[member.card_id]
            off += balance.available.minor_units != expected
            held += balance.held.minor_units
        money_ok = not problems and off == 0 and held == 0 and open_holds == 0
        ok &= money_ok
        said.append(
            f"stored value: ledger verify found {len(problems)} problem(s); {off} of"
            f" {len(members)} cards differ from recharge - captured"
            f" ({sum(ledger.captured.values())} fen captured); held {held} fen, open holds"
            f" {open_holds}: {'consistent' if money_ok else 'NOT CONSISTENT'}"
        )
        for problem in problems[:5]:
            said.append(f"  {problem.what}: {problem.subject} {problem.detail}")
        points_off = [
            m.member_id
            for m in members
            if m.points is not None and points_now[m.member_id] != m.points
        ]
        points_ok = not points_off and not points_held
        ok &= points_ok
        said.append(
            f"points: {len(points_off)} members differ from their last receipt's balance;"
            f" open points holds {points_held}: {'consistent' if points_ok else 'NOT CONSISTENT'}"
        )
    finally:
        await loyalty.dispose()
        await cards.dispose()
    return ok, said


# --- the run -----------------------------------------------------------------------------


def pct_ratio(a: Result, b: Result, q: float) -> float:
    return a.pct(q) / b.pct(q)


async def run(
    seconds: float,
    concurrency: int,
    member_count: int,
    postgres: str | None,
    make_up: bool,
    log_level: str,
    rates: Sequence[float] = (),
) -> None:
    if member_count < concurrency:
        raise SystemExit("--members must be at least --concurrency (one till per member)")
    configure_logging("bench", "ERROR")
    work = Path(tempfile.mkdtemp(prefix="cornucopia-bench-checkout-"))
    suite = Suite(work, postgres, make_up, log_level)
    baseline_port = free_port()
    baseline = spawn(
        ["-m", "bench.baseline_server", f"127.0.0.1:{baseline_port}"], {}, work / "baseline.log"
    )
    run_id = int(uuid.uuid4().int % 1000)
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        began = time.perf_counter()
        await suite.start()
        if suite.databases is not None:
            plain_baseline_url = await suite.databases.create()
            baseline_url = normalise_database_url(plain_baseline_url)
        else:
            baseline_url = f"sqlite+aiosqlite:///{work / 'baseline.db'}"
        await wait_serving(f"127.0.0.1:{baseline_port}")
        channels = {
            name: grpc.aio.insecure_channel(address) for name, address in suite.addresses.items()
        }
        await open_stores(suite.addresses["members"], HQ_ADMIN, STORES)
        members = await enroll(channels["members"], member_count, run_id)
        reader = Database(suite.urls["loyalty"])
        try:
            await wait_known(reader, [m.member_id for m in members])
        finally:
            await reader.dispose()
        await issue_cards(channels["cards"], members)
        print(
            f"\nset up {len(STORES)} stores, {member_count} members, cards and recharges in"
            f" {time.perf_counter() - began:.1f} s",
            flush=True,
        )

        grpc_many, grpc_one = await bare_grpc(f"127.0.0.1:{baseline_port}", concurrency, seconds)
        db_many, db_one = await bare_transactions(baseline_url, member_count, concurrency, seconds)
        raw: list[Result] = []
        bare_suite: skeleton.Floor | None = None
        if suite.databases is not None and postgres:
            raw = await raw_asyncpg_transactions(
                plain_baseline_url, member_count, concurrency, seconds
            )
            bare_suite = await skeleton.floor(postgres, member_count, concurrency, seconds)

        databases = {name: str(make_url(url).database) for name, url in suite.urls.items()}
        stats_before = await pg_stats(postgres, list(databases.values())) if postgres else None
        tills = Tills(channels["loyalty"], members, run_id)
        # Warm-up: two checkouts a member (loyalty asks members for a
        # member's birthday month once, then keeps it; the points to pay with).
        await drive(
            "warm-up",
            tills.checkout,
            concurrency=concurrency,
            seconds=WARM_UP_LIMIT_SECONDS,
            max_calls=2 * member_count,
        )
        meter = CpuMeter(suite.cpu_processes)
        cpu: dict[str, dict[str, float]] = {}
        rpcs: dict[str, dict[tuple[str, str], list[float]]] = {}

        async def measured(name: str, load: Callable[[], Awaitable[Result]]) -> Result:
            offsets = log_offsets(suite)
            # Said as it starts, for whoever attaches a profiler to a service.
            print(f"measuring: {name}, {seconds:g} s", file=sys.stderr, flush=True)
            meter.start()
            result = await load()
            cpu[name] = meter.stop()
            await asyncio.sleep(0.5)  # the last log lines
            rpcs[name] = rpcs_between(suite, offsets, log_offsets(suite))
            return result

        def closed(name: str, callers: int) -> Callable[[], Awaitable[Result]]:
            return lambda: drive(name, tills.checkout, concurrency=callers, seconds=seconds)

        def opened(name: str, rate: float) -> Callable[[], Awaitable[Result]]:
            return lambda: drive_at_rate(name, tills.checkout, rate=rate, seconds=seconds)

        many_name = f"Checkout, {concurrency} callers"
        many = await measured(many_name, closed(many_name, concurrency))
        one = await measured("Checkout, 1 caller", closed("Checkout, 1 caller", 1))
        paced = []
        for rate in rates:
            name = f"Checkout, {rate:g}/s offered"
            paced.append(await measured(name, opened(name, rate)))
        stats_after = None
        if postgres:
            await asyncio.sleep(PG_STATS_SETTLE_SECONDS)
            stats_after = await pg_stats(postgres, list(databases.values()))
        consistent, said = await check_consistency(suite, members, tills.ledger, channels["cards"])

        kind = "PostgreSQL" if postgres else "SQLite"
        how = (
            "`cornucopia up` (all five services, the gateway, the demo data)"
            if make_up
            else "the five gRPC services, each in a process of its own"
        )
        print(
            f"\ncheckout: {kind}; {how}; logs at {log_level}; {member_count} members over"
            f" {len(STORES)} stores; {seconds:.0f} s each"
        )
        for result in (many, one, *paced, grpc_many, grpc_one, db_many, db_one, *raw):
            print("  " + result.line())
        print(
            f"  ratios, {concurrency} callers: checkouts/s / bare grpc calls/s"
            f" {many.rate / grpc_many.rate:6.3f}, / bare db tx/s {many.rate / db_many.rate:6.3f};"
            f" p50 {pct_ratio(many, grpc_many, 0.5):5.1f}x / p99"
            f" {pct_ratio(many, grpc_many, 0.99):5.1f}x the bare grpc call's"
        )
        print(
            f"  ratios, 1 caller: checkouts/s / bare grpc calls/s {one.rate / grpc_one.rate:6.3f},"
            f" / bare db tx/s {one.rate / db_one.rate:6.3f}; p50"
            f" {pct_ratio(one, grpc_one, 0.5):5.1f}x the bare grpc call's,"
            f" {pct_ratio(one, db_one, 0.5):5.1f}x the bare db tx's"
        )
        if raw:
            raw_many, raw_one = raw
            print(
                f"  ratios to the bare asyncpg tx: checkouts/s / tx/s, {concurrency} callers"
                f" {many.rate / raw_many.rate:6.3f}, 1 caller {one.rate / raw_one.rate:6.3f};"
                f" the chassis's unit of work / asyncpg: {db_many.rate / raw_many.rate:5.2f}"
                f" and {db_one.rate / raw_one.rate:5.2f}"
            )
        if bare_suite is not None:
            skeleton.print_floor(bare_suite)
            bare_many, bare_one = bare_suite.results
            machine_ms = (
                1000 * cpu[many.name]["(machine, all processes)"] / max(many.calls, 1)
            ) / bare_suite.cpu_ms[0]["(machine, all processes)"]
            print(
                "  ratios to the bare suite of the checkout's shape: checkouts/s,"
                f" {concurrency} callers {many.rate / bare_many.rate:6.3f}, 1 caller"
                f" {one.rate / bare_one.rate:6.3f}; p50 with 1 caller"
                f" {pct_ratio(one, bare_one, 0.5):5.1f}x; the machine's CPU a checkout,"
                f" {concurrency} callers {machine_ms:5.2f}x"
            )
        print(
            "  tenders of the successful checkouts (warm-up included): "
            + ", ".join(f"{mix} {k}" for mix, k in tills.ledger.mixes.most_common())
        )
        for result in (many, one, *paced):
            used = cpu[result.name]
            calls = max(result.calls, 1)
            available = used.pop("(machine, available)")
            print(f"  CPU per checkout, {result.name} (ms of CPU a checkout, share of one core):")
            for name, seconds_used in sorted(used.items(), key=lambda item: -item[1]):
                if seconds_used * 1000 / calls < 0.05:
                    continue
                print(
                    f"    {name:<34} {seconds_used * 1000 / calls:6.2f} ms"
                    f"  {100 * seconds_used / result.seconds:4.0f} %"
                )
            cores = available / result.seconds
            suite_ms = 1000 * sum(t for n, t in used.items() if not n.startswith("(")) / calls
            loyalty_ms = 1000 * used.get("loyalty", 0.0) / calls
            print(
                f"    (the machine had {cores:.1f} cores;"
                f" busy {100 * used['(machine, all processes)'] / available:.0f} %;"
                f" the suite's processes {suite_ms:.1f} ms a checkout)"
            )
            if loyalty_ms and suite_ms:
                print(
                    f"    ceilings from CPU alone: loyalty, one process on one core,"
                    f" {1000 / loyalty_ms:.0f} checkouts/s; the suite's processes on"
                    f" {cores:.0f} cores to themselves {cores * 1000 / suite_ms:.0f} checkouts/s"
                )
        for result in (many, one, *paced):
            calls = max(result.calls, 1)
            print(f"  RPCs served per checkout, {result.name} (count, mean ms in the service):")
            for (service, method), durations in sorted(rpcs[result.name].items()):
                print(
                    f"    {service:<8} {method:<22} {len(durations) / calls:5.2f}"
                    f"  {sum(durations) / len(durations):7.2f} ms"
                )
        if stats_before is not None and stats_after is not None:
            # Every checkout from the first reading on: warm-up and both figures.
            checkouts = tills.ledger.attempted
            print(
                f"  PostgreSQL per checkout ({checkouts} checkouts; a ping of a connection idle"
                " for 10 s is BEGIN, ';', ROLLBACK, and each statement of a read session"
                " (no transaction) counts as a commit):"
            )
            for line in pg_lines(stats_before, stats_after, databases, max(checkouts, 1)):
                print("  " + line)
        for line in said:
            print("  " + line)
        print(f"  consistency: {'all consistent' if consistent else 'PROBLEMS FOUND'}")
        for failure, count in tills.ledger.failures.most_common(5):
            print(f"  failed checkouts: {count} x {failure}")
    finally:
        for channel in channels.values():
            await channel.close()
        await suite.stop()
        baseline.terminate()
        baseline.wait(15)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per measured figure")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument(
        "--postgres", help="admin URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument(
        "--make-up",
        action="store_true",
        help="drive the suite `cornucopia up` (make up) starts, in a temporary var directory",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="the services' LOG_LEVEL (make up's default: INFO)"
    )
    parser.add_argument(
        "--rates",
        default="",
        help="checkouts a second to offer, open loop, after the closed-loop figures: 20,40",
    )
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error("--rates: numbers separated by commas, e.g. 20,40")
    if any(r <= 0 for r in rates):
        parser.error("--rates: each rate must be above 0")
    asyncio.run(
        run(
            args.seconds,
            args.concurrency,
            args.members,
            args.postgres,
            args.make_up,
            args.log_level.upper(),
            rates,
        )
    )


if __name__ == "__main__":
    main()
