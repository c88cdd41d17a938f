"""Stored-value Debit throughput, latency and contention on a running cards service.

    python -m bench.stored_value_debits [--seconds 6] [--concurrency 32] [--cards 64]
        [--amount 100] [--postgres URL] [--in-process]

Starts a NATS server (from the wheel) and the cards service (its
ServiceRuntime with the cards definition: in a process of its own, or with
``--in-process`` in this one), creates a stored-value card program,
enrolls ``--cards`` members into cards' member projection by publishing
``members.v1.member.enrolled`` events as the members service's relay would,
issues each a card (IssueCard) and recharges it generously (Recharge, store
terminal). Then measures, each closed loop for ``--seconds``, every Debit
with a request_id of its own through a real grpc.aio channel with a service
token (role service, as the checkout calls):
- ``--concurrency`` callers spread over the cards: debits/s, p50 and p99;
- one caller spread over the cards: the latency of a debit alone;
- ``--concurrency`` callers all on ONE card (serialised on its account
  row): debits/s, p50 and p99;
and in the same run the baselines:
- a bare grpc.aio health check against a bare server process, with as many
  callers and with one;
- a bare database transaction through the chassis's unit of work (the same
  pool, and on SQLite the same writer queue, as the service): an UPDATE of
  one row and an INSERT of one row, on the same kind of database, spread
  over as many rows as there are cards, on one row, and with one caller.
It prints each figure and the ratios, then checks the ledger
(``services.cards.store.stored_value.verify`` finds no problem) and that the
cards' balances add up to what was recharged minus the debits that
succeeded (warm-ups included).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import sqlalchemy as sa

from bench.enrollment import wait_serving
from bench.harness import Result, ThrowawayDatabases, bare_grpc, cpu_seconds, drive, spawn
from chassis.auth import Role, Scope, ScopeLevel, mint_token
from chassis.bus import STREAMS, Bus, cloudevent_headers
from chassis.config import DEVELOPMENT_TOKEN_SECRET, Settings, normalise_database_url
from chassis.db import Database, UTCDateTime, utcnow
from chassis.logs import configure_logging
from chassis.natsserver import NatsServer, free_port
from chassis.service import ServiceRuntime
from cornucopia.cards.v1 import (
    cards_pb2,
    cards_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    stored_value_pb2,
    stored_value_pb2_grpc,
)
from cornucopia.common.v1 import money_pb2
from cornucopia.members.v1 import events_pb2 as member_events
from services.cards.server import definition as cards_definition
from services.cards.store import projections
from services.cards.store import stored_value as sv_store

PROGRAM = "BENCHSV"
CURRENCY = "CNY"
# Per card: far more than any run can spend, below the per-movement maximum.
RECHARGE = 1_000_000_000
NO_MEMBERS_SERVICE = "127.0.0.1:1"  # cards knows the members from their events


def cny(minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=CURRENCY, minor_units=minor_units)


def metadata(roles: list[Role], scope: Scope, subject: str) -> tuple[tuple[str, str], ...]:
    token = mint_token(DEVELOPMENT_TOKEN_SECRET, subject, roles, scope)
    return (("authorization", f"Bearer {token}"),)


HQ_ADMIN = metadata([Role.HQ_ADMIN], Scope(ScopeLevel.HQ), "bench-admin")
OPERATOR = metadata([Role.STORE_OPERATOR], Scope(ScopeLevel.STORE, "S001"), "bench-op")
CHECKOUT = metadata([Role.SERVICE], Scope(ScopeLevel.HQ), "bench-checkout")


# --- the bare database transaction --------------------------------------------------

_bare = sa.MetaData()
bare_accounts = sa.Table(
    "bench_accounts",
    _bare,
    sa.Column("account_id", sa.String(16), primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
)
bare_entries = sa.Table(
    "bench_entries",
    _bare,
    sa.Column("entry_id", sa.String(32), primary_key=True),
    sa.Column("account_id", sa.String(16), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)


async def bare_transactions(url: str, rows: int, concurrency: int, seconds: float) -> list[Result]:
    """An UPDATE of one row and an INSERT of one row in one unit of work:
    spread over ``rows`` rows, all on one row, and with one caller."""
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(_bare.create_all)
        async with db.transaction() as session:
            await session.execute(
                sa.insert(bare_accounts),
                [{"account_id": f"A{n:06d}", "balance": RECHARGE} for n in range(rows)],
            )

        def one(pick: int | None) -> Callable[[int], Awaitable[None]]:
            async def call(n: int) -> None:
                account_id = f"A{(n if pick is None else pick) % rows:06d}"
                async with db.transaction() as session:
                    await session.execute(
                        sa.update(bare_accounts)
                        .where(bare_accounts.c.account_id == account_id)
                        .values(balance=bare_accounts.c.balance - 100)
                    )
                    await session.execute(
                        sa.insert(bare_entries).values(
                            entry_id=uuid.uuid4().hex,
                            account_id=account_id,
                            amount=-100,
                            created_at=utcnow(),
                        )
                    )

            return call

        await drive("warm-up", one(None), concurrency=concurrency, seconds=1)
        return [
            await drive(
                f"bare db tx, {concurrency} callers, {rows} rows",
                one(None),
                concurrency=concurrency,
                seconds=seconds,
            ),
            await drive(
                f"bare db tx, {concurrency} callers, 1 row",
                one(0),
                concurrency=concurrency,
                seconds=seconds,
            ),
            await drive(
                "bare db tx, 1 caller",
                one(None),
                concurrency=1,
                seconds=seconds,
            ),
        ]
    finally:
        await db.dispose()


# --- setting the cards up ---------------------------------------------------------------


async def enroll_members(nats_url: str, member_ids: list[str]) -> None:
    """Publishes members.v1.member.enrolled as the members service's relay would."""
    bus = Bus(nats_url, "bench-members")
    await bus.connect()
    try:
        await bus.ensure_stream(STREAMS["members"])
        subject = "members.v1.member.enrolled"
        for member_id in member_ids:
            message = member_events.MemberEnrolled(member_id=member_id, home_store_id="S001")
            headers = cloudevent_headers(
                event_id=str(uuid.uuid4()),
                event_type=message.DESCRIPTOR.full_name,
                source="cornucopia/members",
                time=utcnow(),
                subject=subject,
            )
            await bus.publish(subject, message.SerializeToString(), headers)
    finally:
        await bus.close()


async def wait_projected(db: Database, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        async with db.sessions() as session:
            known = await session.scalar(
                sa.select(sa.func.count()).select_from(projections.known_members)
            )
        if known == count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cards knows {known} of {count} members after {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def set_up_cards(channel: grpc.aio.Channel, member_ids: list[str]) -> list[str]:
    programs = programs_pb2_grpc.CardProgramsServiceStub(channel)
    cards = cards_pb2_grpc.CardsServiceStub(channel)
    wallet = stored_value_pb2_grpc.StoredValueServiceStub(channel)
    await programs.CreateCardProgram(
        programs_pb2.CreateCardProgramRequest(
            request_id=f"bench-program-{uuid.uuid4().hex}",
            card_program=programs_pb2.CardProgram(
                program_id=PROGRAM,
                display_name="储值卡",
                form=programs_pb2.CARD_FORM_PHYSICAL,
                number_format=programs_pb2.NumberFormat(
                    prefix="8899", length=16, luhn_check_digit=True
                ),
                validity_months=24,
                stored_value=True,
                holding=programs_pb2.CARD_HOLDING_PERSONAL,
            ),
        ),
        metadata=HQ_ADMIN,
    )
    card_ids: list[str] = []
    for member_id in member_ids:
        card = await cards.IssueCard(
            cards_pb2.IssueCardRequest(
                request_id=str(uuid.uuid4()), program_id=PROGRAM, member_id=member_id
            ),
            metadata=OPERATOR,
        )
        await wallet.Recharge(
            stored_value_pb2.RechargeRequest(
                request_id=str(uuid.uuid4()),
                card_id=card.card_id,
                amount=cny(RECHARGE),
                channel=stored_value_pb2.RECHARGE_CHANNEL_STORE_TERMINAL,
            ),
            metadata=OPERATOR,
        )
        card_ids.append(card.card_id)
    return card_ids


# --- the run -------------------------------------------------------------------------------------


class CardsService:
    """The cards service, in a process of its own or in this one."""

    def __init__(self, work: Path, url: str, nats_url: str, *, in_process: bool) -> None:
        self.work, self.url, self.nats_url = work, url, nats_url
        self.in_process = in_process
        self.runtime: ServiceRuntime | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    async def start(self) -> None:
        if self.in_process:
            settings = Settings(
                service="cards",
                var_dir=self.work,
                database_url=self.url,
                nats_url=self.nats_url,
                grpc_listen="127.0.0.1:0",
                log_level="WARNING",
                peers={"members": NO_MEMBERS_SERVICE},
            )
            self.runtime = ServiceRuntime(cards_definition, settings)
            await self.runtime.start()
            await asyncio.wait_for(self.runtime.ready.wait(), timeout=60)
            self.address = f"127.0.0.1:{self.runtime.port}"
            return
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.process = spawn(
            ["-m", "services.cards"],
            {
                "GRPC_LISTEN": self.address,
                "CARDS_DATABASE_URL": self.url,
                "NATS_URL": self.nats_url,
                "MEMBERS_GRPC_ADDR": NO_MEMBERS_SERVICE,
                "CORNUCOPIA_VAR_DIR": str(self.work),
                "LOG_LEVEL": "WARNING",
            },
            self.work / "cards.log",
        )
        waiting = asyncio.ensure_future(wait_serving(self.address))
        while not waiting.done():
            if self.process.poll() is not None:
                waiting.cancel()
                log = (self.work / "cards.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the cards service exited ({self.process.returncode}):\n{log}")
            await asyncio.wait([waiting], timeout=0.5)
        await waiting

    def cpu_seconds(self) -> float | None:
        """CPU time the service's own process has used (Linux); None when
        it runs in this process, beside the load driver."""
        if self.process is None:
            return None
        return cpu_seconds(self.process.pid)

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop(grace=1)
        if self.process is not None:
            self.process.terminate()
            self.process.wait(15)


def pct_ratio(a: Result, b: Result, q: float) -> float:
    return a.pct(q) / b.pct(q)


async def run(
    seconds: float,
    concurrency: int,
    card_count: int,
    amount: int,
    postgres: str | None,
    in_process: bool,
) -> None:
    # Errors only: the bench's own NATS client warns when it disconnects.
    configure_logging("bench", "ERROR")
    work = Path(tempfile.mkdtemp(prefix="cornucopia-bench-sv-"))
    nats = NatsServer(work / "nats")
    nats.start()
    databases = ThrowawayDatabases(postgres) if postgres else None
    if databases is not None:
        cards_url = normalise_database_url(await databases.create())
        baseline_url = normalise_database_url(await databases.create())
    else:
        cards_url = f"sqlite+aiosqlite:///{work / 'cards.db'}"
        baseline_url = f"sqlite+aiosqlite:///{work / 'baseline.db'}"
    baseline_port = free_port()
    baseline = spawn(
        ["-m", "bench.baseline_server", f"127.0.0.1:{baseline_port}"], {}, work / "baseline.log"
    )
    service = CardsService(work, cards_url, nats.url, in_process=in_process)
    reader = Database(cards_url)  # the bench's own look at the cards database
    try:
        began = time.perf_counter()
        await service.start()
        await wait_serving(f"127.0.0.1:{baseline_port}")
        run_id = uuid.uuid4().hex[:6]
        member_ids = [f"BM{run_id}{n:05d}" for n in range(card_count)]
        await enroll_members(nats.url, member_ids)
        await wait_projected(reader, card_count)
        async with grpc.aio.insecure_channel(service.address) as channel:
            card_ids = await set_up_cards(channel, member_ids)
            print(
                f"\nset up {card_count} members, cards and recharges in"
                f" {time.perf_counter() - began:.1f} s",
                flush=True,
            )
            wallet = stored_value_pb2_grpc.StoredValueServiceStub(channel)
            debited = 0
            failures: Counter[str] = Counter()

            def debit_on(pick: int | None) -> Callable[[int], Awaitable[None]]:
                async def call(n: int) -> None:
                    nonlocal debited
                    card_id = card_ids[(n if pick is None else pick) % card_count]
                    try:
                        await wallet.Debit(
                            stored_value_pb2.DebitRequest(
                                request_id=f"bench-{run_id}-{uuid.uuid4().hex}",
                                card_id=card_id,
                                amount=cny(amount),
                                reference="bench",
                            ),
                            metadata=CHECKOUT,
                        )
                    except grpc.aio.AioRpcError as exc:
                        failures[f"{exc.code().name}: {exc.details()}"] += 1
                        raise
                    debited += 1

                return call

            await drive("warm-up", debit_on(None), concurrency=concurrency, seconds=2)
            cpu: dict[str, float] = {}

            async def measured(name: str, pick: int | None, callers: int) -> Result:
                before = service.cpu_seconds()
                result = await drive(name, debit_on(pick), concurrency=callers, seconds=seconds)
                after = service.cpu_seconds()
                if before is not None and after is not None:
                    cpu[name] = after - before
                return result

            spread = await measured(
                f"Debit, {concurrency} callers, {card_count} cards", None, concurrency
            )
            single = await measured("Debit, 1 caller", None, 1)
            hot = await measured(f"Debit, {concurrency} callers, ONE card", 0, concurrency)
            grpc_many, grpc_one = await bare_grpc(
                f"127.0.0.1:{baseline_port}", concurrency, seconds
            )
            db_spread, db_hot, db_one = await bare_transactions(
                baseline_url, card_count, concurrency, seconds
            )

            # The books: the ledger's own check, then the money.
            async with reader.sessions() as session:
                problems = await sv_store.verify(session)
                debit_rows = await session.scalar(
                    sa.select(sa.func.count())
                    .select_from(sv_store.sv_movements)
                    .where(sv_store.sv_movements.c.kind == "debit")
                )
            balances = [
                await wallet.GetBalance(
                    stored_value_pb2.GetBalanceRequest(card_id=card_id), metadata=CHECKOUT
                )
                for card_id in card_ids
            ]

        kind = "PostgreSQL" if postgres else "SQLite"
        where = "in the bench's process" if in_process else "in a process of its own"
        print(
            f"\nstored-value debits: {kind}, cards service {where}, {seconds:.0f} s each,"
            f" debits of {amount} minor units"
        )
        for result in (spread, single, hot, grpc_many, grpc_one, db_spread, db_hot, db_one):
            print("  " + result.line())
        print(
            f"  ratios, {concurrency} callers over {card_count} cards:"
            f" p50 {pct_ratio(spread, grpc_many, 0.5):5.1f}x / p99"
            f" {pct_ratio(spread, grpc_many, 0.99):5.1f}x the bare grpc call;"
            f" p50 {pct_ratio(spread, db_spread, 0.5):5.2f}x the bare db tx;"
            f" debits/s / bare tx/s {spread.rate / db_spread.rate:5.3f}"
        )
        print(
            f"  ratios, 1 caller: p50 {pct_ratio(single, grpc_one, 0.5):5.1f}x the bare grpc"
            f" call, {pct_ratio(single, db_one, 0.5):5.2f}x the bare db tx;"
            f" debits/s / bare tx/s {single.rate / db_one.rate:5.3f}"
        )
        print(
            f"  ratios, ONE card: debits/s / bare tx/s on one row {hot.rate / db_hot.rate:5.3f};"
            f" one card / spread {hot.rate / spread.rate:5.2f}"
        )
        for result in (spread, single, hot):
            if result.name in cpu:
                used = cpu[result.name]
                print(
                    f"  cards process CPU, {result.name}: {used * 1000 / max(result.calls, 1):5.1f}"
                    f" ms a debit, {100 * used / result.seconds:3.0f} % of a core"
                )
        recharged = RECHARGE * card_count
        expected = recharged - debited * amount
        available = sum(b.available.minor_units for b in balances)
        held = sum(b.held.minor_units for b in balances)
        consistent = not problems and expected == available and held == 0
        print(
            f"  ledger: verify found {len(problems)} problem(s);"
            f" {debited} debits succeeded, {debit_rows} debit movements stored;"
            f" recharged {recharged} - debited {debited * amount} = {expected},"
            f" balances add up to {available} (held {held}):"
            f" {'consistent' if consistent else 'NOT CONSISTENT'}"
        )
        for problem in problems[:10]:
            print(f"    {problem.what}: {problem.subject} {problem.detail}")
        for failure, count in failures.most_common(5):
            print(f"  failed debits: {count} x {failure}")
    finally:
        await reader.dispose()
        await service.stop()
        baseline.terminate()
        baseline.wait(15)
        nats.stop()
        if databases is not None:
            await databases.drop_all()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per measured figure")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cards", type=int, default=64)
    parser.add_argument("--amount", type=int, default=100, help="minor units per debit")
    parser.add_argument(
        "--postgres", help="admin URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the cards service in this process instead of a process of its own",
    )
    args = parser.parse_args(argv)
    asyncio.run(
        run(args.seconds, args.concurrency, args.cards, args.amount, args.postgres, args.in_process)
    )


if __name__ == "__main__":
    main()
