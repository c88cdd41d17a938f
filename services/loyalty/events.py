"""What the loyalty service publishes, through the outbox in the same
transaction as the change. No event carries a personal value."""

from __future__ import annotations

from google.protobuf.message import Message

from chassis.direct import Executor
from chassis.outbox import enqueue

SOURCE = "cornucopia/loyalty"
SALE_RECORDED = "loyalty.v1.sale.recorded"
SALE_REFUNDED = "loyalty.v1.sale.refunded"
SALE_VOIDED = "loyalty.v1.sale.voided"
POINTS_ACCRUED = "loyalty.v1.points.accrued"
POINTS_SPENT = "loyalty.v1.points.spent"
POINTS_EXPIRED = "loyalty.v1.points.expired"
POINTS_EXPIRING = "loyalty.v1.points.expiring"
POINTS_ADJUSTED = "loyalty.v1.points.adjusted"
POINTS_REVERSED = "loyalty.v1.points.reversed"
TIER_CHANGED = "loyalty.v1.tier.changed"
GIFT_REDEEMED = "loyalty.v1.gift.redeemed"


async def publish(session: Executor, subject: str, message: Message) -> str:
    return await enqueue(session, source=SOURCE, subject=subject, message=message)
