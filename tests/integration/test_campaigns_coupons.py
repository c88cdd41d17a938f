"""Coupons through real gRPC on SQLite and PostgreSQL: templates, issuing
(one member, a list in the background, per-member limits, concurrent
issues never passing quantity or budget), the wallet, reservation by
PriceBasket then commit / release / restore, the reservation and expiry
workers, statistics and the XLSX export."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration

from chassis.db import outbox_table, utcnow
from cornucopia.campaigns.v1 import pricing_pb2 as pb
from services.campaigns.coupon_ledger import expire_due, release_due
from tests.integration.conftest import Suite, eventually
from tests.integration.infra import DatabaseFactory
from tests.integration.test_campaigns_pricing import (
    CHECKOUT,
    HQ,
    Campaigns,
    cny,
    line,
    rid,
    start,
    ts,
)

BASKET = [line(1, "LIP-1", "lipstick", 2, 10_000), line(2, "CRM-1", "cream", 1, 30_000)]


async def template(c: Campaigns, **fields: Any) -> pb.CouponTemplate:
    fields.setdefault("display_name", "Ten off")
    fields.setdefault("kind", pb.COUPON_KIND_AMOUNT_OFF)
    fields.setdefault("currency_code", "CNY")
    if fields["kind"] == pb.COUPON_KIND_AMOUNT_OFF:
        fields.setdefault("amount_off", cny(1_000))
    fields.setdefault("valid_days", 30)
    return await c.coupons.CreateCouponTemplate(
        pb.CreateCouponTemplateRequest(request_id=rid(), template=pb.CouponTemplate(**fields)),
        metadata=HQ,
    )


async def issue(c: Campaigns, template_id: str, *members: str, request_id: str = "") -> pb.IssueJob:
    return await c.coupons.IssueCoupons(
        pb.IssueCouponsRequest(
            request_id=request_id or rid(), template_id=template_id, member_ids=list(members)
        ),
        metadata=HQ,
    )


async def price_now(c: Campaigns, codes: list[str], **fields: Any) -> pb.PricedBasket:
    return await c.pricing.PriceBasket(
        pb.PriceBasketRequest(
            store_id="S001", member_id="M1", lines=BASKET, coupon_codes=codes, **fields
        ),
        metadata=CHECKOUT,
    )


async def state_of(c: Campaigns, coupon_id: str) -> int:
    coupon = await c.coupons.GetCoupon(pb.GetCouponRequest(coupon_id=coupon_id), metadata=HQ)
    return coupon.state


async def subjects(c: Campaigns) -> list[str]:
    db = c.suite.runtimes["campaigns"].db
    async with db.sessions() as session:
        rows = await session.execute(sa.select(outbox_table.c.subject).order_by(outbox_table.c.seq))
        return [r.subject for r in rows]


async def test_reserve_commit_release_restore(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start(suite, database_url)
    t = await template(c, min_spend=cny(20_000), restore_policy=pb.RESTORE_POLICY_ON_WHOLE_REFUND)
    job = await issue(c, t.template_id, "M1", "M1")
    assert job.state == pb.ISSUE_JOB_STATE_DONE and job.issued == 1 and job.total == 1
    code = job.coupons[0].code
    coupon_id = job.coupons[0].coupon_id
    assert len(code) >= 12

    # Without a reservation nothing is written; a stranger's code is refused.
    quote = await price_now(c, [code, "NOPE"])
    assert quote.coupons[0].accepted and quote.coupons[0].discount.minor_units == 1_000
    assert quote.coupons[1].refusal_reason == "COUPON_NOT_FOUND"
    assert await state_of(c, coupon_id) == pb.COUPON_STATE_ISSUED
    other = await c.pricing.PriceBasket(
        pb.PriceBasketRequest(store_id="S001", member_id="M2", lines=BASKET, coupon_codes=[code]),
        metadata=CHECKOUT,
    )
    assert other.coupons[0].refusal_reason == "COUPON_NOT_YOURS"

    # Reserved for checkout K1, idempotently; another checkout cannot use it.
    first = await price_now(c, [code], reservation_id="K1")
    again = await price_now(c, [code], reservation_id="K1")
    assert first.total == again.total and again.coupons[0].accepted
    assert await state_of(c, coupon_id) == pb.COUPON_STATE_RESERVED
    k2 = await price_now(c, [code], reservation_id="K2")
    assert k2.coupons[0].refusal_reason == "COUPON_RESERVED"

    # Released, then reserved again and committed.
    released = await c.coupons.ReleaseCoupons(
        pb.ReleaseCouponsRequest(reservation_id="K1", reason="abandoned"), metadata=CHECKOUT
    )
    assert [x.coupon_id for x in released.coupons] == [coupon_id]
    assert await state_of(c, coupon_id) == pb.COUPON_STATE_ISSUED
    await price_now(c, [code], reservation_id="K3")
    commit = pb.CommitCouponsRequest(reservation_id="K3", sale_id="SALE-1")
    done = await c.coupons.CommitCoupons(commit, metadata=CHECKOUT)
    assert done.coupons[0].committed and done.coupons[0].coupon.state == pb.COUPON_STATE_REDEEMED
    assert (await c.coupons.CommitCoupons(commit, metadata=CHECKOUT)) == done
    used = await price_now(c, [code], reservation_id="K4")
    assert used.coupons[0].refusal_reason == "COUPON_USED"

    # A partial refund keeps it (policy ON_WHOLE_REFUND); the whole refund gives it back.
    part = await c.coupons.RestoreCoupons(
        pb.RestoreCouponsRequest(sale_id="SALE-1", refund_id="F1", whole_sale=False),
        metadata=CHECKOUT,
    )
    assert not part.restored and len(part.kept) == 1
    whole = pb.RestoreCouponsRequest(sale_id="SALE-1", refund_id="F2", whole_sale=True)
    back = await c.coupons.RestoreCoupons(whole, metadata=CHECKOUT)
    assert [x.coupon_id for x in back.restored] == [coupon_id]
    assert (await c.coupons.RestoreCoupons(whole, metadata=CHECKOUT)) == back
    assert await state_of(c, coupon_id) == pb.COUPON_STATE_ISSUED

    wallet = await c.coupons.ListMemberCoupons(
        pb.ListMemberCouponsRequest(member_id="M1", states=[pb.COUPON_STATE_ISSUED]), metadata=HQ
    )
    assert [x.coupon_id for x in wallet.coupons] == [coupon_id]
    sent = await subjects(c)
    for verb in ("issued", "reserved", "released", "redeemed"):
        assert f"campaigns.v1.coupon.{verb}" in sent


async def test_reservation_ttl_and_expiry(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start(suite, database_url)
    db = suite.runtimes["campaigns"].db
    t = await template(c, valid_days=1)
    job = await issue(c, t.template_id, "M1")
    code, coupon_id = job.coupons[0].code, job.coupons[0].coupon_id
    await price_now(c, [code], reservation_id="K1", reservation_ttl=Duration(seconds=30))
    assert await release_due(db, utcnow() + dt.timedelta(seconds=31)) == 1
    assert await state_of(c, coupon_id) == pb.COUPON_STATE_ISSUED
    # A late commit still redeems it: nobody took it since.
    late = await c.coupons.CommitCoupons(
        pb.CommitCouponsRequest(reservation_id="K1", sale_id="S-LATE", sale_total=cny(49_000)),
        metadata=CHECKOUT,
    )
    assert late.coupons[0].committed

    job2 = await issue(c, t.template_id, "M2")
    assert await expire_due(db, utcnow() + dt.timedelta(days=2)) == 1
    assert await state_of(c, job2.coupons[0].coupon_id) == pb.COUPON_STATE_EXPIRED
    assert "campaigns.v1.coupon.expired" in await subjects(c)

    # Statistics and the export.
    start_, end = utcnow() - dt.timedelta(hours=1), utcnow() + dt.timedelta(days=3)
    stats = await c.coupons.GetCouponStatistics(
        pb.GetCouponStatisticsRequest(
            template_id=t.template_id, start_time=ts(start_), end_time=ts(end)
        ),
        metadata=HQ,
    )
    issued = sum(r.issued for r in stats.rows)
    redeemed = sum(r.redeemed for r in stats.rows)
    assert (issued, redeemed, sum(r.expired for r in stats.rows)) == (2, 1, 1)
    assert sum(r.sales_attributed.minor_units for r in stats.rows) == 49_000
    assert sum(r.discount_given.minor_units for r in stats.rows) == 1_000
    chunks = [
        chunk
        async for chunk in c.coupons.ExportCouponStatistics(
            pb.ExportCouponStatisticsRequest(start_time=ts(start_), end_time=ts(end)), metadata=HQ
        )
    ]
    assert chunks[0].file_name.endswith(".xlsx")
    from openpyxl import load_workbook

    sheet = load_workbook(io.BytesIO(b"".join(x.data for x in chunks))).active
    assert sheet is not None
    values = [list(r) for r in sheet.iter_rows(values_only=True)]
    assert values[0][0] == "Template ID" and any(t.template_id in row for row in values)


async def test_concurrent_issuing_never_exceeds(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    c = await start(suite, database_url)
    quantity = await template(c, total_quantity=5)
    budget = await template(c, budget=cny(3_000))  # three coupons of 10.00
    limited = await template(c, per_member_limit=2)

    async def one(template_id: str, member: str) -> pb.IssueJob:
        return await issue(c, template_id, member)

    jobs = await asyncio.gather(*(one(quantity.template_id, f"M{i}") for i in range(12)))
    assert sum(j.issued for j in jobs) == 5
    assert {s.reason for j in jobs for s in j.skipped_members} == {"COUPON_QUANTITY_EXHAUSTED"}
    jobs = await asyncio.gather(*(one(budget.template_id, f"M{i}") for i in range(8)))
    assert sum(j.issued for j in jobs) == 3
    read = await c.coupons.GetCouponTemplate(
        pb.GetCouponTemplateRequest(template_id=budget.template_id), metadata=HQ
    )
    assert read.budget_used.minor_units == 3_000 and read.issued_count == 3
    jobs = await asyncio.gather(*(one(limited.template_id, "M1") for _ in range(5)))
    assert sum(j.issued for j in jobs) == 2
    assert {s.reason for j in jobs for s in j.skipped_members} == {"PER_MEMBER_LIMIT_REACHED"}

    # A list in the background: never twice to one member in a run.
    members = [f"L{i:03d}" for i in range(150)]
    request_id = rid()
    job = await issue(c, limited.template_id, *members, *members[:10], request_id=request_id)
    assert job.total == 150
    done = await eventually(
        lambda: c.coupons.GetIssueJob(pb.GetIssueJobRequest(job_id=job.job_id), metadata=HQ),
        lambda j: j.state == pb.ISSUE_JOB_STATE_DONE,
        timeout=60,
    )
    assert done.issued == 150 and done.processed == 150
    again = await issue(c, limited.template_id, *members, *members[:10], request_id=request_id)
    assert again.job_id == job.job_id and again.issued == 150

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await template(c, kind=pb.COUPON_KIND_PERCENT_OFF, percent_bps=1000, budget=cny(100))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
