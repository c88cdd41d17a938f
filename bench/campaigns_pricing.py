"""PriceBasket latency and coupon issuing rate on a running campaigns service.

    python -m bench.campaigns_pricing [--seconds 6] [--concurrency 16] [--members 100000]
        [--list] [--poll 1.0] [--postgres URL]

Starts a NATS server (from the wheel), a bare grpc.aio server
(bench/baseline_server.py) and the campaigns service, each in a process of
its own (``python -m services.campaigns``, on a SQLite file or, with
``--postgres``, on a throwaway PostgreSQL database dropped afterwards).

PriceBasket. Through the service's public API, as an HQ admin: 50
promotions in force, of mixed kinds (percent off by category and by SKU,
member prices, spend X save Y, member days, birthday months, double
points, exclusive ones, exclusion groups, a few for another region); a
percent-off coupon template and one coupon of it issued to the member
(IssueCoupons, inline). Then closed-loop PriceBasket calls as the checkout
calls them (a service token), without a reservation (nothing is written):
a 20-line basket, a member with a member and a (larger) tier discount, in
their birthday month, presenting the coupon's code. Measured for
``--seconds`` each: one caller (p50, p99), then ``--concurrency`` callers
(calls/s, p50, p99). In the same run:
- the baselines: a bare grpc.aio health check against the bare server
  process (one caller and as many callers), and a bare database read
  transaction (one primary-key SELECT in a session of the chassis's
  ``Database``) on the same kind of database;
- in the bench's own process, for the same basket and the same stored
  promotions and coupon: the pure pricing function
  (``domain.pricing.price``), the same with the edge's proto conversions
  (``basket_from_proto``, ``priced_to_proto``), and the store layer's
  ``coupon_ledger.price_basket`` (its three reads, then the pricing) on
  the service's database: what the service adds is the rest.

Coupon issuing, to a segment of ``--members`` members (100,000 by
default, the most one IssueCoupons takes as a list). The campaigns service
asks a stand-in for the members service, served from the bench's own
process, which counts the segment and gives its member ids (generated, in
member_id order) a SelectMembers page at a time: members' own selection
(its SQL over the member files) is not measured, everything campaigns does
is. The segment is created through SegmentsService (CreateSegment), then
one IssueCoupons(segment_id) call creates the job, which the service's
job worker (looking for running jobs every 2 s) runs: a page of 1,000
members added to the job, then issued one transaction a member, and so on.
With ``--list`` the same member ids go in the call as a LIST instead (no
selection at all). GetIssueJob is polled every ``--poll`` seconds until the
job is DONE.
Coupons issued per second: from the job's creation to its finish (the
service's own clock), and from the call to DONE seen (the bench's clock).
Baseline: a bare write transaction (an UPDATE of one row and an INSERT of
one row through the chassis's unit of work), one caller, on the same kind
of database. Then the bench counts the coupons stored, the
``campaigns.v1.coupon.issued`` events still in the outbox, and times one
GetIssueJob of the big job; and, before and after the big job, a
one-member IssueCoupons (issued within the call) and its GetIssueJob.

It prints each figure and the ratios, and the CPU the campaigns process
used (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from bench.enrollment import wait_serving
from bench.harness import Result, ThrowawayDatabases, bare_grpc, cpu_seconds, drive, spawn
from chassis.auth import Role, Scope, ScopeLevel, mint_token
from chassis.config import DEVELOPMENT_TOKEN_SECRET, normalise_database_url
from chassis.db import Database, UTCDateTime, outbox_table, utcnow
from chassis.logs import configure_logging
from chassis.natsserver import NatsServer, free_port
from cornucopia.campaigns.v1 import pricing_pb2 as pb
from cornucopia.campaigns.v1 import pricing_pb2_grpc, segments_pb2, segments_pb2_grpc
from cornucopia.common.v1 import money_pb2
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.campaigns import coupon_ledger
from services.campaigns.domain import coupons as coupon_rules
from services.campaigns.domain import pricing
from services.campaigns.server.pricing import basket_from_proto, priced_to_proto
from services.campaigns.store import coupons as coupon_store
from services.campaigns.store import promotions as promotion_store

CURRENCY = "CNY"
STORE, REGION, OTHER_REGION = "S001", "EAST", "WEST"
ZONE = "Asia/Shanghai"
PROGRAM, TIER = "BENCHPR", "T-GOLD"
MEMBER_DISCOUNT_BPS, TIER_DISCOUNT_BPS = 500, 800
# (sku, category, unit price in fen): the 20 lines of the basket.
CATALOGUE = (
    ("SERUM-30", "skincare", 19_900),
    ("MASK-5", "skincare", 5_000),
    ("CLEANSER", "skincare", 12_800),
    ("TONER-200", "skincare", 15_500),
    ("EYECREAM", "skincare", 32_000),
    ("LIPSTICK-R", "makeup", 26_000),
    ("LIPSTICK-P", "makeup", 26_000),
    ("FOUNDATION", "makeup", 42_000),
    ("MASCARA", "makeup", 18_000),
    ("PALETTE-9", "makeup", 36_000),
    ("PERFUME-50", "fragrance", 68_000),
    ("PERFUME-10", "fragrance", 19_000),
    ("CANDLE", "fragrance", 24_000),
    ("HANDCREAM", "bodycare", 8_800),
    ("BODYLOTION", "bodycare", 16_800),
    ("SCRUB", "bodycare", 14_200),
    ("SHAMPOO", "haircare", 9_900),
    ("HAIROIL", "haircare", 22_000),
    ("GIFTBOX", "gift", 4_000),
    ("POUCH", "gift", 2_500),
)
CATEGORIES = ("skincare", "makeup", "fragrance", "bodycare", "haircare", "gift")


def metadata(roles: list[Role], subject: str) -> tuple[tuple[str, str], ...]:
    token = mint_token(DEVELOPMENT_TOKEN_SECRET, subject, roles, Scope(ScopeLevel.HQ))
    return (("authorization", f"Bearer {token}"),)


HQ_ADMIN = metadata([Role.HQ_ADMIN], "bench-admin")
CHECKOUT = metadata([Role.SERVICE], "bench-checkout")


def cny(minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=CURRENCY, minor_units=minor_units)


# --- the rules: 50 promotions, a coupon, a basket ----------------------------------------


def fifty_promotions(now: dt.datetime) -> list[pb.Promotion]:
    """Promotions in force now, of mixed kinds: 12 percent off by category,
    8 by SKU, 8 member prices, 6 spend X save Y, 4 member days (3 of them
    today), 2 birthday months, 3 double points, 5 exclusive, 2 for another
    region. Some share exclusion groups."""
    start = now - dt.timedelta(days=1)
    today = now.astimezone(zoneinfo.ZoneInfo(ZONE)).isoweekday()
    out: list[pb.Promotion] = []

    def add(name: str, kind: int, **fields: object) -> None:
        m = pb.Promotion(display_name=name, kind=kind, **fields)  # type: ignore[arg-type]
        m.start_time.FromDatetime(start)
        if len(out) % 3 == 0:  # a third end in a month, the rest are open-ended
            m.end_time.FromDatetime(now + dt.timedelta(days=30))
        if not m.stacking:
            m.stacking = pb.STACKING_COMBINABLE
        out.append(m)

    groups = {0: "cat-a", 1: "cat-a", 6: "cat-b", 7: "cat-b"}
    for n in range(12):
        add(
            f"Category week {n}",
            pb.PROMOTION_KIND_PERCENT_OFF,
            categories=[CATEGORIES[n % len(CATEGORIES)]],
            percent_bps=300 + 100 * n,
            priority=n % 4,
            exclusion_group=groups.get(n, ""),
        )
    for n in range(8):
        add(
            f"SKU offer {n}",
            pb.PROMOTION_KIND_PERCENT_OFF,
            skus=[CATALOGUE[(3 * n) % 20][0], CATALOGUE[(3 * n + 1) % 20][0]],
            percent_bps=500 + 150 * n,
            priority=2,
            exclusion_group="sku-a" if n < 3 else "",
            members_only=n % 2 == 1,
        )
    for n in range(8):
        sku, _category, price = CATALOGUE[(2 * n + 5) % 20]
        add(
            f"Member price {n}",
            pb.PROMOTION_KIND_MEMBER_PRICE,
            skus=[sku],
            member_price=cny(price * (80 + n) // 100),
            priority=5,
            exclusion_group="member-price" if n < 2 else "",
        )
    for n in range(6):
        add(
            f"Spend and save {n}",
            pb.PROMOTION_KIND_SPEND_SAVE,
            threshold=cny(30_000 * (n + 1)),
            save=cny(3_000 * (n + 1)),
            repeating=n % 2 == 0,
            categories=[CATEGORIES[n]] if n >= 3 else [],
            priority=1,
            exclusion_group="spend" if n < 2 else "",
        )
    for n, days in enumerate(([today], list(range(1, 8)), [today % 7 + 1])):
        add(
            f"Member day {n}",
            pb.PROMOTION_KIND_MEMBER_DAY,
            weekdays=days,
            percent_bps=500 + 100 * n,
            time_zone=ZONE,
        )
    add(
        "Member day of the month",
        pb.PROMOTION_KIND_MEMBER_DAY,
        month_days=list(range(1, 32)),
        percent_bps=300,
        time_zone=ZONE,
    )
    for n in range(2):
        add(
            f"Birthday month {n}",
            pb.PROMOTION_KIND_BIRTHDAY,
            percent_bps=1000 + 500 * n,
            time_zone=ZONE,
            exclusion_group="birthday",
        )
    for n in range(3):
        add(
            f"Double points {n}",
            pb.PROMOTION_KIND_DOUBLE_POINTS,
            points_multiplier_bps=15_000 + 5_000 * n,
        )
    for n in range(4):
        add(
            f"Exclusive {n}",
            pb.PROMOTION_KIND_PERCENT_OFF,
            percent_bps=1_500 + 500 * n,
            stacking=pb.STACKING_EXCLUSIVE,
            categories=[] if n == 0 else [CATEGORIES[n]],
        )
    add(
        "Exclusive spend and save",
        pb.PROMOTION_KIND_SPEND_SAVE,
        threshold=cny(100_000),
        save=cny(25_000),
        stacking=pb.STACKING_EXCLUSIVE,
    )
    for n in range(2):
        add(
            f"West only {n}",
            pb.PROMOTION_KIND_PERCENT_OFF,
            percent_bps=2_000,
            region_ids=[OTHER_REGION],
        )
    assert len(out) == 50
    return out


def basket_request(member_id: str, code: str, birthday_month: int) -> pb.PriceBasketRequest:
    return pb.PriceBasketRequest(
        store_id=STORE,
        region_id=REGION,
        member_id=member_id,
        program_id=PROGRAM,
        member_discount_bps=MEMBER_DISCOUNT_BPS,
        tier_id=TIER,
        tier_name="Gold",
        tier_discount_bps=TIER_DISCOUNT_BPS,
        birthday_month=birthday_month,
        lines=[
            pb.BasketLine(
                line_no=n + 1, sku=sku, category=category, quantity=1 + n % 3, unit_price=cny(price)
            )
            for n, (sku, category, price) in enumerate(CATALOGUE)
        ],
        coupon_codes=[code],
    )


async def create_template(coupons: pricing_pb2_grpc.CouponsServiceStub, **fields: object) -> str:
    template = pb.CouponTemplate(currency_code=CURRENCY, valid_days=30, **fields)  # type: ignore[arg-type]
    created = await coupons.CreateCouponTemplate(
        pb.CreateCouponTemplateRequest(request_id=str(uuid.uuid4()), template=template),
        metadata=HQ_ADMIN,
    )
    return str(created.template_id)


# --- the baselines -------------------------------------------------------------------------------

_bare = sa.MetaData()
bare_rows = sa.Table(
    "bench_rows",
    _bare,
    sa.Column("row_id", sa.String(16), primary_key=True),
    sa.Column("counter", sa.BigInteger, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)
bare_entries = sa.Table(
    "bench_entries",
    _bare,
    sa.Column("entry_id", sa.String(32), primary_key=True),
    sa.Column("row_id", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
BARE_ROWS = 1_000


async def bare_database(url: str, concurrency: int, seconds: float) -> list[Result]:
    """A read transaction (a primary-key SELECT of one row in a session)
    with as many callers and with one, then a write transaction (an UPDATE
    of one row and an INSERT of one row) with one caller."""
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(_bare.create_all)
        async with db.transaction() as session:
            await session.execute(
                sa.insert(bare_rows),
                [
                    {"row_id": f"R{n:06d}", "counter": 0, "body": "x" * 400}
                    for n in range(BARE_ROWS)
                ],
            )

        async def read(n: int) -> None:
            async with db.sessions() as session:
                found = await session.execute(
                    sa.select(bare_rows).where(bare_rows.c.row_id == f"R{n % BARE_ROWS:06d}")
                )
                found.one()

        async def write(n: int) -> None:
            row_id = f"R{n % BARE_ROWS:06d}"
            async with db.transaction() as session:
                await session.execute(
                    sa.update(bare_rows)
                    .where(bare_rows.c.row_id == row_id)
                    .values(counter=bare_rows.c.counter + 1)
                )
                await session.execute(
                    sa.insert(bare_entries).values(
                        entry_id=uuid.uuid4().hex, row_id=row_id, created_at=utcnow()
                    )
                )

        await drive("warm-up", read, concurrency=concurrency, seconds=1)
        return [
            await drive("bare db read tx, 1 caller", read, concurrency=1, seconds=seconds),
            await drive(
                f"bare db read tx, {concurrency} callers",
                read,
                concurrency=concurrency,
                seconds=seconds,
            ),
            await drive("bare db write tx, 1 caller", write, concurrency=1, seconds=seconds),
        ]
    finally:
        await db.dispose()


# --- a stand-in for members' segment selection ------------------------------------------


class SegmentMembers(members_pb2_grpc.MembersServiceServicer):
    """Members' SelectMembers and CountMembers over a generated segment:
    ``count`` member ids in member_id order, keyset pages as members gives
    them (the page token is the last id of the page). Any criteria select
    the same members; tokens are not checked (the campaigns service's own
    token reaches members, not this)."""

    def __init__(self, run_id: str, count: int) -> None:
        self.ids = [f"BSM{run_id}{n:06d}" for n in range(count)]
        self.pages = 0

    async def SelectMembers(
        self, request: members_pb2.SelectMembersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> members_pb2.SelectMembersResponse:
        start = bisect.bisect_right(self.ids, request.page_token) if request.page_token else 0
        page = self.ids[start : start + (request.page_size or 1000)]
        self.pages += 1
        more = start + len(page) < len(self.ids)
        return members_pb2.SelectMembersResponse(
            member_ids=page, next_page_token=page[-1] if page and more else ""
        )

    async def CountMembers(
        self, request: members_pb2.CountMembersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> members_pb2.CountMembersResponse:
        return members_pb2.CountMembersResponse(count=len(self.ids))


async def start_segment_members(
    servicer: SegmentMembers,
) -> tuple[grpc.aio.Server, str]:
    """The stand-in, served from the bench's own process."""
    server = grpc.aio.server()
    members_pb2_grpc.add_MembersServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    await server.start()
    return server, address


# --- in the bench's own process ----------------------------------------------------------


def timed(name: str, work: Callable[[], object], seconds: float) -> Result:
    """``work`` called back to back for ``seconds``, each call timed."""
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        before = time.perf_counter()
        work()
        latencies.append((time.perf_counter() - before) * 1000)
    return Result(name, len(latencies), time.perf_counter() - started, latencies, 0)


async def in_process(
    url: str, request: pb.PriceBasketRequest, seconds: float
) -> tuple[list[Result], pricing.Priced]:
    """The pure pricing function for the basket, with the same promotions
    and coupon the service reads (read here through the service's store
    layer, once); the same with the edge's proto conversions; and the store
    layer's price_basket, reads included, on the service's database."""
    db = Database(url)
    try:
        lines, ctx, ttl, now = basket_from_proto(request)
        codes = list(request.coupon_codes)
        async with db.sessions() as session:
            promotions = await promotion_store.promotions_in_force(session, ctx.at)
            wanted = [coupon_rules.normalise_code(code) for code in codes]
            found = await coupon_store.coupons_by_code(session, wanted)
            templates = await coupon_store.templates_by_id(
                session, {c.template_id for c in found.values()}
            )
        presented = []
        for code, normal in zip(codes, wanted, strict=True):
            coupon = found[normal]
            reason, text = coupon_rules.refusal(coupon.facts, ctx.buyer.member_id, "", ctx.at)
            terms = templates[coupon.template_id].template.terms
            presented.append(pricing.PresentedCoupon(code, coupon.coupon_id, terms, reason, text))
        priced = pricing.price(lines, ctx, promotions, presented)

        def domain() -> None:
            pricing.price(lines, ctx, promotions, presented)

        def with_protos() -> None:
            lines_, ctx_, _ttl, _now = basket_from_proto(request)
            priced_to_proto(pricing.price(lines_, ctx_, promotions, presented), None)

        timed("warm-up", domain, 0.5)
        pure = timed("domain.pricing.price, in process", domain, seconds)
        protos = timed("  + the edge's proto conversions", with_protos, seconds)
        stamp = coupon_ledger.Stamp("bench", STORE, now)

        async def ledger(_n: int) -> None:
            async with db.sessions() as session:
                await coupon_ledger.price_basket(
                    session, lines, ctx, codes, reservation_id="", ttl=ttl, stamp=stamp
                )

        await drive("warm-up", ledger, concurrency=1, seconds=0.5)
        store_layer = await drive(
            "  + the store layer's 3 reads, in process", ledger, concurrency=1, seconds=seconds
        )
        return [pure, protos, store_layer], priced
    finally:
        await db.dispose()


# --- the service -------------------------------------------------------------------------


class CampaignsService:
    """The campaigns service in a process of its own."""

    def __init__(self, work: Path, url: str, nats_url: str, members_address: str) -> None:
        self.work, self.url, self.nats_url = work, url, nats_url
        self.members_address = members_address
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    async def start(self) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.process = spawn(
            ["-m", "services.campaigns"],
            {
                "GRPC_LISTEN": self.address,
                "CAMPAIGNS_DATABASE_URL": self.url,
                "NATS_URL": self.nats_url,
                "MEMBERS_GRPC_ADDR": self.members_address,
                "CORNUCOPIA_VAR_DIR": str(self.work),
                "LOG_LEVEL": "WARNING",
            },
            self.work / "campaigns.log",
        )
        waiting = asyncio.ensure_future(wait_serving(self.address))
        while not waiting.done():
            if self.process.poll() is not None:
                waiting.cancel()
                log = (self.work / "campaigns.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"the campaigns service exited ({self.process.returncode}):\n{log}"
                )
            await asyncio.wait([waiting], timeout=0.5)
        await waiting

    def cpu_seconds(self) -> float | None:
        return None if self.process is None else cpu_seconds(self.process.pid)

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(15)


# --- the run -------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


async def measure_pricing(
    channel: grpc.aio.Channel, service: CampaignsService, seconds: float, concurrency: int
) -> tuple[list[Result], dict[str, float], pb.PriceBasketRequest, pb.PricedBasket]:
    pricing_stub = pricing_pb2_grpc.PricingServiceStub(channel)
    coupons = pricing_pb2_grpc.CouponsServiceStub(channel)
    now = utcnow()
    for promotion in fifty_promotions(now):
        await pricing_stub.CreatePromotion(
            pb.CreatePromotionRequest(request_id=str(uuid.uuid4()), promotion=promotion),
            metadata=HQ_ADMIN,
        )
    template_id = await create_template(
        coupons,
        display_name="10 % off, at most 50 CNY",
        kind=pb.COUPON_KIND_PERCENT_OFF,
        percent_bps=1_000,
        max_discount=cny(5_000),
        min_spend=cny(20_000),
    )
    member_id = f"BPM{uuid.uuid4().hex[:8]}"
    job = await coupons.IssueCoupons(
        pb.IssueCouponsRequest(
            request_id=str(uuid.uuid4()), template_id=template_id, member_ids=[member_id]
        ),
        metadata=HQ_ADMIN,
    )
    assert job.state == pb.ISSUE_JOB_STATE_DONE and job.issued == 1, job
    birthday_month = now.astimezone(zoneinfo.ZoneInfo(ZONE)).month
    request = basket_request(member_id, job.coupons[0].code, birthday_month)

    async def price(_n: int) -> None:
        await pricing_stub.PriceBasket(request, metadata=CHECKOUT)

    first = await pricing_stub.PriceBasket(request, metadata=CHECKOUT)
    await drive("warm-up", price, concurrency=concurrency, seconds=2)
    cpu: dict[str, float] = {}
    results = []
    for name, callers in (
        ("PriceBasket, 1 caller", 1),
        (f"PriceBasket, {concurrency} callers", concurrency),
    ):
        before = service.cpu_seconds()
        results.append(await drive(name, price, concurrency=callers, seconds=seconds))
        after = service.cpu_seconds()
        if before is not None and after is not None:
            cpu[name] = after - before
    return results, cpu, request, first


async def measure_issuing(
    channel: grpc.aio.Channel,
    service: CampaignsService,
    reader: Database,
    segment: SegmentMembers,
    as_list: bool,
    poll: float,
) -> dict[str, object]:
    coupons = pricing_pb2_grpc.CouponsServiceStub(channel)
    template_id = await create_template(
        coupons,
        display_name="20 CNY off 200",
        kind=pb.COUPON_KIND_AMOUNT_OFF,
        amount_off=cny(2_000),
        min_spend=cny(20_000),
        per_member_limit=1,
    )
    request = pb.IssueCouponsRequest(request_id=str(uuid.uuid4()), template_id=template_id)
    if as_list:
        request.member_ids.extend(segment.ids)
    else:
        # A segment of SegmentsService, whose members the stand-in selects.
        await segments_pb2_grpc.SegmentsServiceStub(channel).CreateSegment(
            segments_pb2.CreateSegmentRequest(
                request_id=str(uuid.uuid4()),
                segment=segments_pb2.Segment(
                    segment_id="BENCH-SEGMENT",
                    name="bench segment",
                    criteria=members_pb2.MemberCriteria(region_ids=[REGION]),
                ),
            ),
            metadata=HQ_ADMIN,
        )
        request.segment_id = "BENCH-SEGMENT"
    async with reader.sessions() as session:
        outbox_before = await session.scalar(sa.select(sa.func.count()).select_from(outbox_table))
    cpu_before = service.cpu_seconds()
    called = time.perf_counter()
    job = await coupons.IssueCoupons(request, metadata=HQ_ADMIN, timeout=600)
    accepted = time.perf_counter()
    call_total = job.total
    polls: list[tuple[float, int, float]] = []  # (since the call, processed, poll ms)
    while job.state != pb.ISSUE_JOB_STATE_DONE:
        await asyncio.sleep(poll)
        before = time.perf_counter()
        job = await coupons.GetIssueJob(
            pb.GetIssueJobRequest(job_id=job.job_id), metadata=HQ_ADMIN, timeout=600
        )
        seen = time.perf_counter()
        polls.append((seen - called, job.processed, (seen - before) * 1000))
    done = time.perf_counter()
    cpu_after = service.cpu_seconds()
    job_seconds = (job.finish_time.ToDatetime() - job.created.time.ToDatetime()).total_seconds()
    started_at = next((t for t, processed, _ms in polls if processed), accepted - called)
    async with reader.sessions() as session:
        stored = await session.scalar(
            sa.select(sa.func.count())
            .select_from(coupon_store.coupons)
            .where(coupon_store.coupons.c.template_id == template_id)
        )
        unsent = await session.scalar(
            sa.select(sa.func.count())
            .select_from(outbox_table)
            .where(outbox_table.c.sent_at.is_(None))
        )
        outbox_after = await session.scalar(sa.select(sa.func.count()).select_from(outbox_table))
    # One GetIssueJob of the big job, and of the pricing member's one-member
    # job, now that the coupons table holds the big job's coupons.
    big = time.perf_counter()
    await coupons.GetIssueJob(pb.GetIssueJobRequest(job_id=job.job_id), metadata=HQ_ADMIN)
    big_ms = (time.perf_counter() - big) * 1000
    return {
        "job": job,
        "call_ms": (accepted - called) * 1000,
        "call_total": call_total,
        "job_seconds": job_seconds,
        "wall_seconds": done - called,
        "first_progress_s": started_at,
        "polls": polls,
        "stored": stored,
        "events": (outbox_after or 0) - (outbox_before or 0),
        "unsent": unsent,
        "cpu": None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
        "get_big_ms": big_ms,
    }


async def time_small_job(channel: grpc.aio.Channel, member_id: str) -> tuple[float, float]:
    """A one-member IssueCoupons (issued inline; its answer is built by the
    same code as GetIssueJob's), then a GetIssueJob of it: milliseconds."""
    coupons = pricing_pb2_grpc.CouponsServiceStub(channel)
    template_id = await create_template(
        coupons, display_name="5 CNY off", kind=pb.COUPON_KIND_AMOUNT_OFF, amount_off=cny(500)
    )
    before = time.perf_counter()
    job = await coupons.IssueCoupons(
        pb.IssueCouponsRequest(
            request_id=str(uuid.uuid4()), template_id=template_id, member_ids=[member_id]
        ),
        metadata=HQ_ADMIN,
    )
    used = (time.perf_counter() - before) * 1000
    assert job.state == pb.ISSUE_JOB_STATE_DONE
    before = time.perf_counter()
    await coupons.GetIssueJob(pb.GetIssueJobRequest(job_id=job.job_id), metadata=HQ_ADMIN)
    return used, (time.perf_counter() - before) * 1000


async def run(
    seconds: float,
    concurrency: int,
    members: int,
    poll: float,
    postgres: str | None,
    as_list: bool,
) -> None:
    configure_logging("bench", "ERROR")
    # A SIGTERM (a run stopped from outside) cancels the run, so that the
    # finally below still stops the processes and drops the databases.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    work = Path(tempfile.mkdtemp(prefix="cornucopia-bench-campaigns-"))
    nats = NatsServer(work / "nats")
    nats.start()
    databases = ThrowawayDatabases(postgres) if postgres else None
    if databases is not None:
        campaigns_url = normalise_database_url(await databases.create())
        baseline_url = normalise_database_url(await databases.create())
    else:
        campaigns_url = f"sqlite+aiosqlite:///{work / 'campaigns.db'}"
        baseline_url = f"sqlite+aiosqlite:///{work / 'baseline.db'}"
    baseline_port = free_port()
    baseline = spawn(
        ["-m", "bench.baseline_server", f"127.0.0.1:{baseline_port}"], {}, work / "baseline.log"
    )
    # Only SelectMembers and CountMembers are served (the rest is UNIMPLEMENTED).
    segment = SegmentMembers(uuid.uuid4().hex[:6], members)  # type: ignore[abstract]
    members_server, members_address = await start_segment_members(segment)
    service = CampaignsService(work, campaigns_url, nats.url, members_address)
    reader = Database(campaigns_url)  # the bench's own look at the campaigns database
    kind = "PostgreSQL" if postgres else "SQLite"
    try:
        began = time.perf_counter()
        await service.start()
        await wait_serving(f"127.0.0.1:{baseline_port}")
        async with grpc.aio.insecure_channel(service.address) as channel:
            priced, cpu, request, answer = await measure_pricing(
                channel, service, seconds, concurrency
            )
            print(f"\nset up and measured PriceBasket in {time.perf_counter() - began:.1f} s")
            small_before = await time_small_job(channel, "BSMALL-1")
            grpc_many, grpc_one = await bare_grpc(
                f"127.0.0.1:{baseline_port}", concurrency, seconds
            )
            db_one, db_many, db_write = await bare_database(baseline_url, concurrency, seconds)
            local, domain_priced = await in_process(campaigns_url, request, seconds)
            issuing = await measure_issuing(channel, service, reader, segment, as_list, poll)
            small_after = await time_small_job(channel, "BSMALL-2")

        single, many = priced
        pure, protos, store_layer = local
        applied = len(domain_priced.promotions)
        discounts = sum(len(line.discounts) for line in answer.lines)
        agree = (
            answer.total.minor_units == domain_priced.total
            and answer.points_multiplier_bps == domain_priced.points_multiplier_bps
        )
        print(
            f"\ncampaigns PriceBasket: {kind}, service in a process of its own,"
            f" {seconds:.0f} s each; 50 promotions in force (of which {applied} priced this"
            f" basket), 20 lines, member + tier discount, one coupon"
            f" ({'accepted' if answer.coupons[0].accepted else 'REFUSED'}),"
            f" {discounts} discounts in the answer; total {answer.total.minor_units}"
            f" of {answer.gross.minor_units};"
            f" service and in-process domain {'agree' if agree else 'DISAGREE'}"
        )
        for result in (single, many, grpc_one, grpc_many, db_one, db_many, pure, protos):
            print("  " + result.line())
        print("  " + store_layer.line())
        print(
            f"  ratios, 1 caller: PriceBasket p50 {ratio(single.pct(0.5), grpc_one.pct(0.5)):5.1f}x"
            f" / p99 {ratio(single.pct(0.99), grpc_one.pct(0.99)):5.1f}x the bare grpc call;"
            f" p50 {ratio(single.pct(0.5), db_one.pct(0.5)):5.1f}x the bare db read;"
            f" the pure function is {100 * ratio(pure.pct(0.5), single.pct(0.5)):4.1f} %"
            f" of PriceBasket's p50, with protos"
            f" {100 * ratio(protos.pct(0.5), single.pct(0.5)):4.1f} %, with the store layer"
            f" {100 * ratio(store_layer.pct(0.5), single.pct(0.5)):4.1f} %"
        )
        print(
            f"  ratios, {concurrency} callers: PriceBasket p50"
            f" {ratio(many.pct(0.5), grpc_many.pct(0.5)):5.1f}x / p99"
            f" {ratio(many.pct(0.99), grpc_many.pct(0.99)):5.1f}x the bare grpc call;"
            f" calls/s / bare grpc calls/s {ratio(many.rate, grpc_many.rate):5.3f};"
            f" / bare db reads/s {ratio(many.rate, db_many.rate):5.3f};"
            f" / pure-function calls/s {ratio(many.rate, pure.rate):6.4f}"
        )
        for result in (single, many):
            if result.name in cpu:
                used = cpu[result.name]
                print(
                    f"  campaigns process CPU, {result.name}:"
                    f" {used * 1000 / max(result.calls, 1):5.2f} ms a call,"
                    f" {100 * used / result.seconds:3.0f} % of a core"
                )

        job: pb.IssueJob = issuing["job"]  # type: ignore[assignment]
        polls: list[tuple[float, int, float]] = issuing["polls"]  # type: ignore[assignment]
        job_seconds = float(issuing["job_seconds"])  # type: ignore[arg-type]
        wall = float(issuing["wall_seconds"])  # type: ignore[arg-type]
        rate = job.issued / job_seconds if job_seconds else float("nan")
        target = (
            f"a LIST of {members:,} member ids (no segment, no selection)"
            if as_list
            else f"a SEGMENT of {members:,} members (SelectMembers pages of"
            f" {coupon_ledger.SELECT_PAGE:,} from a stand-in for members, in the bench's"
            f" process: {segment.pages:,} pages read)"
        )
        print(
            f"\ncampaigns coupon issuing: {kind}; {target}, one IssueCoupons call,"
            f" GetIssueJob polled every {poll:g} s"
        )
        print(
            f"  IssueCoupons call (the job stored, with {int(issuing['call_total']):,} of its"  # type: ignore[call-overload]
            f" {job.total:,} members when it answered) {float(issuing['call_ms']):8.1f} ms"  # type: ignore[arg-type]
        )
        print(
            f"  job: issued {job.issued:,}, skipped {job.skipped:,} in {job_seconds:.1f} s"
            f" (created to finished, the service's clock): {rate:7.1f} coupons/s;"
            f" call to DONE seen {wall:.1f} s: {job.issued / wall:7.1f} coupons/s;"
            f" first progress seen after {float(issuing['first_progress_s']):.1f} s"  # type: ignore[arg-type]
        )
        print("  " + db_write.line())
        print(f"  ratio: coupons/s / bare write tx/s (1 caller) {ratio(rate, db_write.rate):5.3f}")
        if issuing["cpu"] is not None:
            used = float(issuing["cpu"])  # type: ignore[arg-type]
            print(
                f"  campaigns process CPU during the job: {used * 1000 / max(job.issued, 1):5.2f}"
                f" ms a coupon, {100 * used / wall:3.0f} % of a core"
            )
        print(
            f"  stored: {issuing['stored']:,} coupons of the template; outbox rows written"
            f" {issuing['events']:,}, unsent when the job was done {issuing['unsent']:,}"
        )
        if len(polls) >= 8:
            # Members processed per second over the first and the last
            # quarter of the job, from the polls' progress.
            first = next(p for p in polls if p[0] >= wall / 4)
            last = [p for p in polls if p[0] <= 3 * wall / 4][-1]
            print(
                f"  processed/s over the first quarter {first[1] / first[0]:7.1f},"
                f" over the last quarter {(job.total - last[1]) / (wall - last[0]):7.1f}"
            )
        if polls:
            tail = [ms for _t, _p, ms in polls[-5:]]
            print(
                f"  GetIssueJob while the job ran: {len(polls)} polls, the first"
                f" {polls[0][2]:.1f} ms, median {statistics.median(ms for *_, ms in polls):.1f}"
                f" ms, the last five {', '.join(f'{ms:.0f}' for ms in tail)} ms;"
                f" {sum(ms for *_, ms in polls) / 1000:.0f} s in all, of the job's {wall:.0f} s"
            )
        print(f"  GetIssueJob of the done {job.total:,}-member job: {issuing['get_big_ms']:.1f} ms")
        print(
            f"  a one-member IssueCoupons (inline) / its GetIssueJob: before the big job"
            f" {small_before[0]:.1f} / {small_before[1]:.1f} ms, after it"
            f" {small_after[0]:.1f} / {small_after[1]:.1f} ms"
        )
    finally:
        await reader.dispose()
        await service.stop()
        await members_server.stop(None)
        baseline.terminate()
        baseline.wait(15)
        nats.stop()
        if databases is not None:
            await databases.drop_all()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per measured figure")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--members",
        type=int,
        default=coupon_rules.MAX_ISSUE_MEMBERS,
        help="members of the segment issued to (at most 100000; fewer for a quick run)",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="issue to the segment's member ids as a LIST in the call instead of the segment",
    )
    parser.add_argument("--poll", type=float, default=1.0, help="GetIssueJob every POLL seconds")
    parser.add_argument(
        "--postgres", help="admin URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args(argv)
    if not coupon_rules.INLINE_ISSUE_LIMIT < args.members <= coupon_rules.MAX_ISSUE_MEMBERS:
        parser.error(
            f"--members: {coupon_rules.INLINE_ISSUE_LIMIT + 1} to {coupon_rules.MAX_ISSUE_MEMBERS}"
            " (a background job)"
        )
    asyncio.run(
        run(args.seconds, args.concurrency, args.members, args.poll, args.postgres, args.list)
    )


if __name__ == "__main__":
    main()
