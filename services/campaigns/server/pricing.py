"""The pricing and coupons gRPC edge: PricingService here (PriceBasket and
promotions), CouponsService in server/coupons.py, and their workers
(reservation expiry, coupon expiry, issue jobs). The rules are in
domain/pricing.py and domain/coupons.py; the writes in coupon_ledger.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Awaitable, Callable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Role, current_principal
from chassis.db import Database, utcnow
from chassis.errors import FieldViolation, InvalidArgument, NotFound, Violations
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, run_idempotent
from chassis.inbox import Subscription
from chassis.logs import get_logger
from chassis.paging import newest_first_after, newest_first_token, page_size
from chassis.service import ServiceContext
from cornucopia.campaigns.v1 import pricing_pb2 as pb
from cornucopia.campaigns.v1 import pricing_pb2_grpc, segments_pb2, segments_pb2_grpc
from cornucopia.common.v1 import money_pb2, org_pb2
from services.campaigns import coupon_ledger
from services.campaigns.domain import coupons as coupon_rules
from services.campaigns.domain import pricing as rules
from services.campaigns.domain.pricing import PromotionKind, Source, Stacking
from services.campaigns.store import coupons as coupon_store
from services.campaigns.store import promotions as store
from services.campaigns.store.promotions import PromotionRecord

log = get_logger(__name__)

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
PRICING_ROLES = (*STAFF_ROLES, Role.SERVICE)

KINDS = {
    pb.PROMOTION_KIND_MEMBER_PRICE: PromotionKind.MEMBER_PRICE,
    pb.PROMOTION_KIND_PERCENT_OFF: PromotionKind.PERCENT_OFF,
    pb.PROMOTION_KIND_SPEND_SAVE: PromotionKind.SPEND_SAVE,
    pb.PROMOTION_KIND_MEMBER_DAY: PromotionKind.MEMBER_DAY,
    pb.PROMOTION_KIND_BIRTHDAY: PromotionKind.BIRTHDAY,
    pb.PROMOTION_KIND_DOUBLE_POINTS: PromotionKind.DOUBLE_POINTS,
}
KINDS_PROTO = {v: k for k, v in KINDS.items()}
STACKING = {pb.STACKING_COMBINABLE: Stacking.COMBINABLE, pb.STACKING_EXCLUSIVE: Stacking.EXCLUSIVE}
STACKING_PROTO = {v: k for k, v in STACKING.items()}
SOURCES_PROTO = {
    Source.MEMBER: pb.DISCOUNT_SOURCE_MEMBER,
    Source.TIER: pb.DISCOUNT_SOURCE_TIER,
    Source.PROMOTION: pb.DISCOUNT_SOURCE_PROMOTION,
    Source.COUPON: pb.DISCOUNT_SOURCE_COUPON,
}


def money(currency: str, amount: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, minor_units=amount)


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def stamp_proto(principal: str, store_id: str, at: dt.datetime) -> org_pb2.AuditStamp:
    return org_pb2.AuditStamp(principal=principal, store_id=store_id, time=timestamp(at))


def required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def when(message: Timestamp, present: bool) -> dt.datetime | None:
    return message.ToDatetime(dt.UTC) if present else None


# --- promotions <-> proto ---------------------------------------------------------------


def promotion_from_proto(m: pb.Promotion, promotion_id: str, now: dt.datetime) -> rules.Promotion:
    v = Violations()
    if m.kind not in KINDS:
        v.add("promotion.kind", "one of the promotion kinds")
    if m.stacking not in STACKING:
        v.add("promotion.stacking", "COMBINABLE or EXCLUSIVE")
    v.raise_if_any("the promotion has invalid fields")
    currency = ""
    for part in (m.member_price, m.threshold, m.save):
        currency = currency or part.currency_code.strip().upper()
    kind = KINDS[m.kind]
    return rules.check_promotion(
        rules.Promotion(
            promotion_id=promotion_id,
            name=m.display_name.strip(),
            kind=kind,
            starts_at=when(m.start_time, m.HasField("start_time")) or now,
            ends_at=when(m.end_time, m.HasField("end_time")),
            currency=currency,
            store_ids=frozenset(s.strip() for s in m.store_ids if s.strip()),
            region_ids=frozenset(s.strip() for s in m.region_ids if s.strip()),
            scope=rules.Scope(
                frozenset(s.strip() for s in m.skus if s.strip()),
                frozenset(s.strip() for s in m.categories if s.strip()),
            ),
            priority=m.priority,
            stacking=STACKING[m.stacking],
            exclusion_group=m.exclusion_group.strip(),
            percent_bps=m.percent_bps,
            member_price=m.member_price.minor_units,
            threshold=m.threshold.minor_units,
            save=m.save.minor_units,
            repeating=m.repeating,
            weekdays=frozenset(m.weekdays),
            month_days=frozenset(m.month_days),
            points_multiplier_bps=m.points_multiplier_bps,
            time_zone=m.time_zone.strip() or "UTC",
            members_only=m.members_only or kind in rules.MEMBER_KINDS,
            description=m.description.strip(),
        )
    )


def promotion_to_proto(record: PromotionRecord) -> pb.Promotion:
    p = record.promotion
    m = pb.Promotion(
        promotion_id=p.promotion_id,
        display_name=p.name,
        kind=KINDS_PROTO[p.kind],
        start_time=timestamp(p.starts_at),
        store_ids=sorted(p.store_ids),
        region_ids=sorted(p.region_ids),
        skus=sorted(p.scope.skus),
        categories=sorted(p.scope.categories),
        priority=p.priority,
        stacking=STACKING_PROTO[p.stacking],
        exclusion_group=p.exclusion_group,
        percent_bps=p.percent_bps,
        repeating=p.repeating,
        weekdays=sorted(p.weekdays),
        month_days=sorted(p.month_days),
        points_multiplier_bps=p.points_multiplier_bps,
        time_zone=p.time_zone,
        members_only=p.members_only,
        description=p.description,
        created=stamp_proto(record.created_by, record.created_store_id, record.created_at),
    )
    if p.ends_at is not None:
        m.end_time.CopyFrom(timestamp(p.ends_at))
    if p.kind == PromotionKind.MEMBER_PRICE:
        m.member_price.CopyFrom(money(p.currency, p.member_price))
    if p.kind == PromotionKind.SPEND_SAVE:
        m.threshold.CopyFrom(money(p.currency, p.threshold))
        m.save.CopyFrom(money(p.currency, p.save))
    return m


def priced_to_proto(priced: rules.Priced, until: dt.datetime | None) -> pb.PricedBasket:
    c = priced.currency
    out = pb.PricedBasket(
        total=money(c, priced.total),
        gross=money(c, priced.gross),
        discount=money(c, priced.discount),
        points_multiplier_bps=priced.points_multiplier_bps,
        points_promotion_id=priced.points_promotion_id,
    )
    for line in priced.lines:
        out.lines.append(
            pb.PricedLine(
                line_no=line.line.line_no,
                gross=money(c, line.line.gross),
                net=money(c, line.net),
                discounts=[
                    pb.Discount(
                        source=SOURCES_PROTO[d.source],
                        rule_id=d.rule_id,
                        coupon_id=d.coupon_id,
                        description=d.description,
                        amount=money(c, d.amount),
                    )
                    for d in line.discounts
                ],
            )
        )
    for use in priced.coupons:
        out.coupons.append(
            pb.CouponUse(
                code=use.code,
                coupon_id=use.coupon_id,
                template_id=use.template_id,
                accepted=use.accepted,
                refusal_reason=use.refusal,
                discount=money(c, use.discount),
                description=use.description,
            )
        )
    if until is not None:
        out.reservation_expire_time.CopyFrom(timestamp(until))
    return out


def basket_from_proto(
    request: pb.PriceBasketRequest,
) -> tuple[list[rules.Line], rules.Context, dt.timedelta, dt.datetime]:
    now = utcnow()
    lines = [
        rules.Line(
            line_no=line.line_no,
            sku=line.sku.strip(),
            category=line.category.strip(),
            quantity=line.quantity,
            unit_price=line.unit_price.minor_units,
        )
        for line in request.lines
    ]
    currency = rules.check_lines(
        lines, [line.unit_price.currency_code.strip().upper() for line in request.lines]
    )
    v = Violations()
    if not request.store_id.strip():
        v.add("store_id", "required")
    for name in ("member_discount_bps", "tier_discount_bps"):
        if not 0 <= getattr(request, name) <= 10_000:
            v.add(name, "0 to 10000")
    if not 0 <= request.birthday_month <= 12:
        v.add("birthday_month", "1 to 12, or 0 when unknown")
    if len(request.coupon_codes) > rules.MAX_COUPONS:
        v.add("coupon_codes", f"at most {rules.MAX_COUPONS}")
    if any(not code.strip() or len(code) > 64 for code in request.coupon_codes):
        v.add("coupon_codes", "each a code of at most 64 characters")
    if len(request.reservation_id) > 64:
        v.add("reservation_id", "at most 64 characters")
    ttl = coupon_rules.DEFAULT_RESERVATION_TTL
    if request.HasField("reservation_ttl"):
        ttl = request.reservation_ttl.ToTimedelta()
        if not dt.timedelta(seconds=30) <= ttl <= coupon_rules.MAX_RESERVATION_TTL:
            v.add("reservation_ttl", "30 seconds to 24 hours")
    v.raise_if_any()
    at = request.at.ToDatetime(dt.UTC) if request.HasField("at") else now
    buyer = rules.Buyer(
        member_id=request.member_id.strip(),
        program_id=request.program_id.strip(),
        member_discount_bps=request.member_discount_bps,
        tier_id=request.tier_id.strip(),
        tier_name=request.tier_name.strip(),
        tier_discount_bps=request.tier_discount_bps,
        birthday_month=request.birthday_month,
    )
    ctx = rules.Context(request.store_id.strip(), request.region_id.strip(), at, currency, buyer)
    return lines, ctx, ttl, now


class PricingServicer(pricing_pb2_grpc.PricingServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db

    async def PriceBasket(
        self, request: pb.PriceBasketRequest, context: Context
    ) -> pb.PricedBasket:
        principal = current_principal()
        principal.require_role(*PRICING_ROLES)
        lines, ctx, ttl, now = basket_from_proto(request)
        codes = [code.strip() for code in request.coupon_codes]
        reservation_id = request.reservation_id.strip()
        stamp = coupon_ledger.Stamp(principal.subject, ctx.store_id, now)
        if not reservation_id or not codes:
            async with self.db.sessions() as session:
                # Without codes nothing is reserved, and a checkout that
                # holds no coupon from an earlier pricing has none to
                # release: it needs no unit of work (on SQLite, no turn
                # at the writer's lock).
                if not reservation_id or not await coupon_store.reserved_for(
                    session, reservation_id
                ):
                    priced = await coupon_ledger.price_basket(
                        session, lines, ctx, codes, reservation_id="", ttl=ttl, stamp=stamp
                    )
                    return priced_to_proto(priced, None)
        async with self.db.transaction() as session:
            priced = await coupon_ledger.price_basket(
                session, lines, ctx, codes, reservation_id=reservation_id, ttl=ttl, stamp=stamp
            )
        reserved = any(use.accepted for use in priced.coupons)
        return priced_to_proto(priced, now + ttl if reserved else None)

    async def CreatePromotion(
        self, request: pb.CreatePromotionRequest, context: Context
    ) -> pb.Promotion:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        now = utcnow()
        promotion = promotion_from_proto(request.promotion, rules.new_promotion_id(), now)

        async def create(session: AsyncSession) -> pb.Promotion:
            await store.insert_promotion(
                session,
                promotion,
                principal=principal.subject,
                store_id=principal.store_id,
                now=now,
            )
            record = await store.get_promotion(session, promotion.promotion_id)
            assert record is not None
            return promotion_to_proto(record)

        return await run_idempotent(
            self.db,
            method="campaigns.CreatePromotion",
            request_id=request.request_id,
            request=request,
            response_type=pb.Promotion,
            work=create,
        )

    async def GetPromotion(self, request: pb.GetPromotionRequest, context: Context) -> pb.Promotion:
        current_principal().require_role(*READING_ROLES)
        promotion_id = required(request.promotion_id, "promotion_id")
        async with self.db.sessions() as session:
            record = await store.get_promotion(session, promotion_id)
        if record is None:
            raise _promotion_not_found(promotion_id)
        return promotion_to_proto(record)

    async def ListPromotions(
        self, request: pb.ListPromotionsRequest, context: Context
    ) -> pb.ListPromotionsResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            found = await store.list_promotions(
                session,
                in_force_at=utcnow() if request.in_force_only else None,
                after=after,
                limit=size + 1,
            )
        response = pb.ListPromotionsResponse(
            promotions=[promotion_to_proto(r) for r in found[:size]]
        )
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = newest_first_token(
                last.created_at, last.promotion.promotion_id
            )
        return response

    async def EndPromotion(self, request: pb.EndPromotionRequest, context: Context) -> pb.Promotion:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        promotion_id = required(request.promotion_id, "promotion_id")
        now = utcnow()

        async def end(session: AsyncSession) -> pb.Promotion:
            record = await store.get_promotion(session, promotion_id, for_update=True)
            if record is None:
                raise _promotion_not_found(promotion_id)
            p = record.promotion
            if p.ends_at is None or p.ends_at > now:
                await store.end_promotion(session, promotion_id, max(now, p.starts_at))
            ended = await store.get_promotion(session, promotion_id)
            assert ended is not None
            return promotion_to_proto(ended)

        return await run_idempotent(
            self.db,
            method="campaigns.EndPromotion",
            request_id=request.request_id,
            request=request,
            response_type=pb.Promotion,
            work=end,
        )


def _promotion_not_found(promotion_id: str) -> NotFound:
    return NotFound(
        "no promotion with this id",
        reason="PROMOTION_NOT_FOUND",
        metadata={"promotion_id": promotion_id},
    )


# --- workers -----------------------------------------------------------------------------------

DEFAULT_INTERVAL_SECONDS = 30.0


def _interval(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


async def run_issue_jobs(db: Database, selector: coupon_ledger.MemberSelector | None = None) -> int:
    """Runs (or resumes) every job still running; returns how many."""
    async with db.sessions() as session:
        running = await coupon_store.running_jobs(session)
    for job_id in running:
        await coupon_ledger.run_job(db, job_id, selector)
    return len(running)


def _loop(
    name: str, interval: float, work: Callable[[], Awaitable[int]]
) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        while True:
            try:
                count = await work()
                if count:
                    log.info(name, count=count)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(f"{name} pass failed; will retry")
            await asyncio.sleep(interval)

    return run


def services(ctx: ServiceContext) -> list[GrpcService]:
    from services.campaigns.server.coupons import CouponsServicer  # noqa: PLC0415 - a cycle
    from services.campaigns.server.segments import SegmentsServicer  # noqa: PLC0415 - a cycle

    return [
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["PricingService"].full_name,
            servicer=PricingServicer(ctx),
            add_to_server=pricing_pb2_grpc.add_PricingServiceServicer_to_server,
        ),
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["CouponsService"].full_name,
            servicer=CouponsServicer(ctx),
            add_to_server=pricing_pb2_grpc.add_CouponsServiceServicer_to_server,
        ),
        GrpcService(
            full_name=segments_pb2.DESCRIPTOR.services_by_name["SegmentsService"].full_name,
            servicer=SegmentsServicer(ctx),
            add_to_server=segments_pb2_grpc.add_SegmentsServiceServicer_to_server,
        ),
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    db = ctx.db
    coupon_interval = _interval(
        "CAMPAIGNS_COUPON_WORKER_INTERVAL_SECONDS", DEFAULT_INTERVAL_SECONDS
    )
    job_interval = _interval("CAMPAIGNS_ISSUE_JOB_INTERVAL_SECONDS", 2.0)
    from services.campaigns.server.followups import members_client  # noqa: PLC0415 - a cycle

    members = members_client(ctx)
    return [
        _loop(
            "coupon reservations released", coupon_interval, lambda: coupon_ledger.release_due(db)
        ),
        _loop("coupons expired", coupon_interval, lambda: coupon_ledger.expire_due(db)),
        _loop("coupon issue jobs run", job_interval, lambda: run_issue_jobs(db, members)),
    ]


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription]:
    return []
