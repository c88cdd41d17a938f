"""Writing coupons: issuing, reserving at pricing, committing, releasing,
restoring after a refund, expiring. Each function runs in the caller's unit
of work with its outbox rows, except the job and worker passes, which open
one transaction per member or per coupon.

Every move of a coupon is a conditional update from the state it must be
in, after the rows were read FOR UPDATE (PostgreSQL; SQLite serialises
writers): two checkouts can never both reserve one coupon, and a retry
finds the move done and changes nothing."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import json_format
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, utcnow
from cornucopia.campaigns.v1 import events_pb2
from cornucopia.common.v1 import money_pb2, org_pb2
from cornucopia.members.v1 import members_pb2
from services.campaigns import events
from services.campaigns.domain import coupons as rules
from services.campaigns.domain import pricing
from services.campaigns.domain.coupons import CouponState
from services.campaigns.store import coupons as store
from services.campaigns.store import promotions as promotion_store
from services.campaigns.store.coupons import CouponRecord, TemplateRecord

SYSTEM_PRINCIPAL = "campaigns"
JOB_PAGE = 200
# Members read from a segment per SelectMembers page.
SELECT_PAGE = 1000


class MemberSelector(Protocol):
    """Members' SelectMembers, one page at a time."""

    async def select_members(
        self, criteria: members_pb2.MemberCriteria, page_token: str, page_size: int
    ) -> tuple[list[str], str]: ...


def criteria_json(criteria: members_pb2.MemberCriteria) -> str:
    return json_format.MessageToJson(criteria, indent=None, sort_keys=True)


def criteria_of(text: str) -> members_pb2.MemberCriteria:
    return json_format.Parse(text, members_pb2.MemberCriteria())


@dataclass(frozen=True)
class Stamp:
    principal: str
    store_id: str
    at: dt.datetime


def _stamp_proto(stamp: Stamp) -> org_pb2.AuditStamp:
    message = org_pb2.AuditStamp(principal=stamp.principal, store_id=stamp.store_id)
    message.time.FromDatetime(stamp.at)
    return message


def _moved(
    coupon: CouponRecord,
    stamp: Stamp,
    *,
    currency: str = "",
    discount: int | None = None,
    sale_id: str = "",
) -> events_pb2.CouponMoved:
    message = events_pb2.CouponMoved(
        coupon_id=coupon.coupon_id,
        template_id=coupon.template_id,
        member_id=coupon.member_id,
        checkout_id=coupon.reservation_id,
        sale_id=sale_id or coupon.sale_id,
        stamp=_stamp_proto(stamp),
    )
    if discount is not None:
        message.discount.CopyFrom(money_pb2.Money(currency_code=currency, minor_units=discount))
    message.expire_time.FromDatetime(coupon.expires_at)
    return message


# --- issuing ---------------------------------------------------------------------------


class Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _issue_in(
    session: AsyncSession, template: TemplateRecord, job_id: str, member_id: str, stamp: Stamp
) -> None:
    t = template.template
    coupon_id = rules.new_coupon_id()
    # First: the job's row for this member, once (a second worker waits
    # here, then finds it settled).
    if not await store.settle_member(session, job_id, member_id, "issued", coupon_id):
        return
    if not t.issuable(stamp.at):
        raise Skip("COUPON_TEMPLATE_ENDED")
    if not await store.take_member_count(session, t.template_id, member_id, t.per_member_limit):
        raise Skip("PER_MEMBER_LIMIT_REACHED")
    if not await store.take_from_template(session, t.template_id):
        now = await store.get_template(session, t.template_id)
        assert now is not None
        if t.total_quantity and now.issued_count >= t.total_quantity:
            raise Skip("COUPON_QUANTITY_EXHAUSTED")
        raise Skip("COUPON_BUDGET_EXHAUSTED")
    valid_from, expires_at = t.validity(stamp.at)
    coupon = CouponRecord(
        coupon_id=coupon_id,
        code=rules.new_code(),
        template_id=t.template_id,
        member_id=member_id,
        state=CouponState.ISSUED,
        issued_at=stamp.at,
        issued_store_id=stamp.store_id,
        job_id=job_id,
        valid_from=valid_from,
        expires_at=expires_at,
        reservation_id="",
        reserved_until=None,
        reserved_store_id="",
        reserved_discount=0,
        reserved_basket_total=0,
        sale_id="",
        redeemed_at=None,
    )
    # The event is built from the row as written (not read back: one
    # statement less for each coupon of a large issue).
    await store.insert_coupon(
        session,
        coupon_id=coupon.coupon_id,
        code=coupon.code,
        template_id=coupon.template_id,
        member_id=coupon.member_id,
        state=coupon.state.value,
        issued_at=coupon.issued_at,
        issued_store_id=coupon.issued_store_id,
        issued_by=stamp.principal,
        job_id=coupon.job_id,
        valid_from=coupon.valid_from,
        expires_at=coupon.expires_at,
    )
    await events.publish(
        session,
        events.COUPON_ISSUED,
        events_pb2.CouponIssued(coupon=_moved(coupon, stamp), issue_job_id=job_id),
    )


async def issue_member(
    db: Database, template: TemplateRecord, job_id: str, member_id: str, stamp: Stamp
) -> None:
    """Issues the job's coupon to one member in a transaction of its own;
    a member who cannot have one is marked skipped with the reason."""
    try:
        async with db.transaction() as session:
            await _issue_in(session, template, job_id, member_id, stamp)
    except Skip as skip:
        async with db.transaction() as session:
            await store.settle_member(session, job_id, member_id, skip.reason)


async def _issue_pending(db: Database, template: TemplateRecord, job: store.JobRecord) -> None:
    while True:
        async with db.sessions() as session:
            pending = await store.pending_members(session, job.job_id, JOB_PAGE)
        for member_id in pending:
            await issue_member(
                db,
                template,
                job.job_id,
                member_id,
                Stamp(job.created_by, job.created_store_id, utcnow()),
            )
        if len(pending) < JOB_PAGE:
            break


async def run_job(db: Database, job_id: str, selector: MemberSelector | None = None) -> None:
    """Issues to the job's members not yet settled, in their order; safe
    to run again after a crash, and side by side with another runner. A
    segment's job first reads the next page of its members (from the page
    it recorded), issues to them, and so on until the last page; it needs
    ``selector`` for that (without one it issues what it has and stays
    running)."""
    async with db.sessions() as session:
        job = await store.get_job(session, job_id=job_id)
        assert job is not None
        template = await store.get_template(session, job.template_id)
        assert template is not None
    await _issue_pending(db, template, job)
    while job.selecting and selector is not None:
        assert job.criteria is not None
        ids, next_cursor = await selector.select_members(
            criteria_of(job.criteria), job.cursor, SELECT_PAGE
        )
        async with db.transaction() as session:
            await store.add_selected_page(session, job_id, job.cursor, ids, next_cursor)
        await _issue_pending(db, template, job)
        async with db.sessions() as session:
            found = await store.get_job(session, job_id=job_id)
        assert found is not None
        job = found
    async with db.transaction() as session:
        await store.finish_job(session, job_id, utcnow())


# --- pricing and reserving --------------------------------------------------------------------


async def price_basket(
    session: AsyncSession,
    lines: list[pricing.Line],
    ctx: pricing.Context,
    codes: list[str],
    *,
    reservation_id: str,
    ttl: dt.timedelta,
    stamp: Stamp,
) -> pricing.Priced:
    """Prices the basket; with a reservation id, reserves the coupons it
    used for that checkout (and releases those it had reserved before and
    no longer uses)."""
    promotions = await promotion_store.promotions_in_force(session, ctx.at)
    wanted = [rules.normalise_code(code) for code in codes]
    found = await store.coupons_by_code(session, wanted, for_update=bool(reservation_id))
    templates = await store.templates_by_id(session, {c.template_id for c in found.values()})
    presented = []
    for code, normal in zip(codes, wanted, strict=True):
        coupon = found.get(normal)
        if coupon is None:
            presented.append(
                pricing.PresentedCoupon(code, refusal="COUPON_NOT_FOUND", refusal_text="unknown")
            )
            continue
        template = templates[coupon.template_id].template
        reason, text = rules.refusal(coupon.facts, ctx.buyer.member_id, reservation_id, ctx.at)
        presented.append(
            pricing.PresentedCoupon(code, coupon.coupon_id, template.terms, reason, text)
        )
    priced = pricing.price(lines, ctx, promotions, presented)
    if not reservation_id:
        return priced
    until = stamp.at + ttl
    used = {u.coupon_id: u for u in priced.coupons if u.accepted}
    by_id = {c.coupon_id: c for c in found.values()}
    for coupon_id, use in used.items():
        coupon = by_id[coupon_id]
        moved = await store.update_coupon(
            session,
            coupon_id,
            store.coupons.c.state.in_([CouponState.ISSUED.value, CouponState.RESERVED.value]),
            state=CouponState.RESERVED.value,
            reservation_id=reservation_id,
            reserved_until=until,
            reserved_store_id=ctx.store_id,
            reserved_discount=use.discount,
            reserved_basket_total=priced.total,
        )
        assert moved  # read FOR UPDATE and checked usable above
        if coupon.state == CouponState.ISSUED:
            reserved = await store.get_coupon(session, coupon_id=coupon_id)
            assert reserved is not None
            await events.publish(
                session,
                events.COUPON_RESERVED,
                events_pb2.CouponReserved(
                    coupon=_moved(reserved, stamp, currency=ctx.currency, discount=use.discount)
                ),
            )
    held = await store.reserved_for(session, reservation_id, for_update=True)
    for coupon in held:
        if coupon.coupon_id not in used:
            await _release(session, coupon, stamp)
    return priced


async def _release(session: AsyncSession, coupon: CouponRecord, stamp: Stamp) -> None:
    if await store.update_coupon(
        session,
        coupon.coupon_id,
        store.coupons.c.state == CouponState.RESERVED.value,
        state=CouponState.ISSUED.value,
        reservation_id="",
        reserved_until=None,
        reserved_discount=0,
        reserved_basket_total=0,
    ):
        await events.publish(
            session, events.COUPON_RELEASED, events_pb2.CouponReleased(coupon=_moved(coupon, stamp))
        )


# --- commit, release, restore -----------------------------------------------------------------


async def commit(
    session: AsyncSession,
    reservation_id: str,
    sale_id: str,
    sale_total: int | None,
    stamp: Stamp,
) -> list[tuple[CouponRecord, bool]]:
    """The checkout's coupons redeemed by its sale. A coupon whose
    reservation ran out (released by the worker) but that nobody took
    since still carries the reservation id and is redeemed all the same:
    the sale happened. Returns each coupon and whether it is redeemed by
    this sale."""
    c = store.coupons.c
    held = await store.coupons_where(session, c.reservation_id == reservation_id, for_update=True)
    templates = await store.templates_by_id(session, {h.template_id for h in held})
    out: list[tuple[CouponRecord, bool]] = []
    for coupon in held:
        if coupon.state == CouponState.REDEEMED:
            out.append((coupon, coupon.sale_id == sale_id))
            continue
        if coupon.state == CouponState.EXPIRED:
            out.append((coupon, False))
            continue
        await store.update_coupon(
            session,
            coupon.coupon_id,
            c.state.in_([CouponState.RESERVED.value, CouponState.ISSUED.value]),
            state=CouponState.REDEEMED.value,
            sale_id=sale_id,
            redeemed_at=stamp.at,
            reserved_until=None,
        )
        await store.record_redemption(
            session,
            coupon,
            sale_id=sale_id,
            sales=coupon.reserved_basket_total if sale_total is None else sale_total,
            at=stamp.at,
        )
        done = await store.get_coupon(session, coupon_id=coupon.coupon_id)
        assert done is not None
        currency = templates[coupon.template_id].template.currency
        await events.publish(
            session,
            events.COUPON_REDEEMED,
            events_pb2.CouponRedeemed(
                coupon=_moved(done, stamp, currency=currency, discount=coupon.reserved_discount)
            ),
        )
        out.append((done, True))
    return out


async def release(session: AsyncSession, reservation_id: str, stamp: Stamp) -> list[CouponRecord]:
    """The checkout's reserved coupons back to the wallet; those the worker
    released already lose their tie to the checkout (a late commit will not
    take them)."""
    c = store.coupons.c
    held = await store.coupons_where(
        session,
        c.reservation_id == reservation_id,
        c.state.in_([CouponState.RESERVED.value, CouponState.ISSUED.value]),
        for_update=True,
    )
    released = []
    for coupon in held:
        if coupon.state == CouponState.RESERVED:
            await _release(session, coupon, stamp)
        else:
            await store.update_coupon(
                session, coupon.coupon_id, c.state == CouponState.ISSUED.value, reservation_id=""
            )
        back = await store.get_coupon(session, coupon_id=coupon.coupon_id)
        assert back is not None
        released.append(back)
    return released


async def restore(
    session: AsyncSession, sale_id: str, refund_id: str, whole_sale: bool, stamp: Stamp
) -> tuple[list[CouponRecord], list[CouponRecord]]:
    """After a refund: the sale's coupons back to the wallet where the
    template's policy says so and they are still valid. (restored, kept)"""
    c = store.coupons.c
    redeemed = await store.coupons_where(
        session, c.sale_id == sale_id, c.state == CouponState.REDEEMED.value, for_update=True
    )
    templates = await store.templates_by_id(session, {r.template_id for r in redeemed})
    restored, kept = [], []
    for coupon in redeemed:
        policy = templates[coupon.template_id].template.restore_policy
        if not rules.restores(policy, whole_sale) or stamp.at >= coupon.expires_at:
            kept.append(coupon)
            continue
        await store.update_coupon(
            session,
            coupon.coupon_id,
            c.state == CouponState.REDEEMED.value,
            state=CouponState.ISSUED.value,
            sale_id="",
            redeemed_at=None,
            reservation_id="",
            reserved_discount=0,
            reserved_basket_total=0,
        )
        await store.reverse_redemption(session, coupon.coupon_id, sale_id, refund_id)
        await events.publish(
            session,
            events.COUPON_RELEASED,
            events_pb2.CouponReleased(
                coupon=_moved(coupon, stamp, sale_id=sale_id), restored_by_refund=True
            ),
        )
        back = await store.get_coupon(session, coupon_id=coupon.coupon_id)
        assert back is not None
        restored.append(back)
    return restored, kept


# --- the workers' passes ------------------------------------------------------------------------


async def release_due(db: Database, now: dt.datetime | None = None, batch: int = 200) -> int:
    """Reservations past their time back to ISSUED (keeping the checkout id
    so that a late commit still finds them)."""
    c = store.coupons.c
    count = 0
    while True:
        at = now or utcnow()
        async with db.sessions() as session:
            due = await store.due_ids(
                session,
                c.state == CouponState.RESERVED.value,
                c.reserved_until <= at,
                limit=batch,
            )
        for coupon_id in due:
            async with db.transaction() as session:
                coupon = await store.get_coupon(session, coupon_id=coupon_id, for_update=True)
                if coupon is None or not await store.update_coupon(
                    session,
                    coupon_id,
                    c.state == CouponState.RESERVED.value,
                    c.reserved_until <= at,
                    state=CouponState.ISSUED.value,
                    reserved_until=None,
                ):
                    continue
                await events.publish(
                    session,
                    events.COUPON_RELEASED,
                    events_pb2.CouponReleased(
                        coupon=_moved(coupon, Stamp(SYSTEM_PRINCIPAL, "", at))
                    ),
                )
                count += 1
        if len(due) < batch:
            return count


async def expire_due(db: Database, now: dt.datetime | None = None, batch: int = 200) -> int:
    """Issued coupons past their validity become EXPIRED."""
    c = store.coupons.c
    count = 0
    while True:
        at = now or utcnow()
        async with db.sessions() as session:
            due = await store.due_ids(
                session, c.state == CouponState.ISSUED.value, c.expires_at <= at, limit=batch
            )
        for coupon_id in due:
            async with db.transaction() as session:
                coupon = await store.get_coupon(session, coupon_id=coupon_id, for_update=True)
                if coupon is None or not await store.update_coupon(
                    session,
                    coupon_id,
                    c.state == CouponState.ISSUED.value,
                    c.expires_at <= at,
                    state=CouponState.EXPIRED.value,
                    expired_at=at,
                ):
                    continue
                await events.publish(
                    session,
                    events.COUPON_EXPIRED,
                    events_pb2.CouponExpired(
                        coupon=_moved(coupon, Stamp(SYSTEM_PRINCIPAL, "", at))
                    ),
                )
                count += 1
        if len(due) < batch:
            return count
