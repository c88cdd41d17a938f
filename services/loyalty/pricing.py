"""The checkout's pricing step, between loyalty and the campaigns service:
the request PriceBasket takes, and its answer as the checkout's priced
basket (the discounts of each line with their sources, the coupons used,
the double-points promotion in force)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from cornucopia.campaigns.v1 import pricing_pb2
from cornucopia.common.v1 import money_pb2
from services.loyalty.domain import checkout as rules

# As long as the stored-value hold: a recovery after a restart still finds
# the coupons reserved.
RESERVATION_TTL = dt.timedelta(minutes=15)
SOURCES = {
    pricing_pb2.DISCOUNT_SOURCE_MEMBER: "MEMBER",
    pricing_pb2.DISCOUNT_SOURCE_TIER: "TIER",
}


@dataclass(frozen=True)
class Priced:
    basket: rules.PricedBasket
    coupon_ids: tuple[str, ...] = ()
    points_multiplier_bps: int = 0
    points_promotion_id: str = ""
    refusals: tuple[tuple[str, str], ...] = field(default=())


def price_request(
    *,
    store_id: str,
    region_id: str,
    currency: str,
    buyer: rules.Buyer,
    lines: Sequence[rules.Line],
    codes: Sequence[str],
    now: dt.datetime,
    birthday_month: int | None,
    reservation_id: str,
) -> pricing_pb2.PriceBasketRequest:
    at = Timestamp()
    at.FromDatetime(now)
    request = pricing_pb2.PriceBasketRequest(
        store_id=store_id,
        region_id=region_id,
        member_id=buyer.member_id,
        program_id=buyer.program_id,
        member_discount_bps=buyer.program_discount_bps,
        tier_id=buyer.tier_id,
        tier_name=buyer.tier_name,
        tier_discount_bps=buyer.tier_discount_bps,
        birthday_month=birthday_month or 0,
        lines=[
            pricing_pb2.BasketLine(
                line_no=line.line_no,
                sku=line.sku,
                category=line.category,
                quantity=line.quantity,
                unit_price=money_pb2.Money(currency_code=currency, minor_units=line.unit_price),
            )
            for line in lines
        ],
        coupon_codes=list(codes),
        at=at,
        reservation_id=reservation_id,
    )
    if reservation_id:
        ttl = Duration()
        ttl.FromTimedelta(RESERVATION_TTL)
        request.reservation_ttl.CopyFrom(ttl)
    return request


def priced_from_proto(lines: Sequence[rules.Line], answer: pricing_pb2.PricedBasket) -> Priced:
    by_no = {line.line_no: line for line in answer.lines}
    priced = []
    for line in lines:
        found = by_no.get(line.line_no)
        discounts = (
            tuple(
                rules.Discount(
                    source=SOURCES.get(
                        d.source,
                        pricing_pb2.DiscountSource.Name(d.source).removeprefix("DISCOUNT_SOURCE_"),
                    ),
                    description=d.description,
                    amount=d.amount.minor_units,
                )
                for d in found.discounts
            )
            if found
            else ()
        )
        priced.append(rules.PricedLine(line, discounts))
    return Priced(
        basket=rules.PricedBasket(tuple(priced)),
        coupon_ids=tuple(c.coupon_id for c in answer.coupons if c.accepted and c.coupon_id),
        points_multiplier_bps=answer.points_multiplier_bps,
        points_promotion_id=answer.points_promotion_id,
        refusals=tuple((c.code, c.refusal_reason) for c in answer.coupons if not c.accepted),
    )
