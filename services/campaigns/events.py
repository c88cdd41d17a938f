"""What the campaigns service publishes, through the outbox in the same
transaction as the change. No event carries a personal value."""

from __future__ import annotations

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.outbox import enqueue

SOURCE = "cornucopia/campaigns"
COUPON_ISSUED = "campaigns.v1.coupon.issued"
COUPON_RESERVED = "campaigns.v1.coupon.reserved"
COUPON_REDEEMED = "campaigns.v1.coupon.redeemed"
COUPON_RELEASED = "campaigns.v1.coupon.released"
COUPON_EXPIRED = "campaigns.v1.coupon.expired"
FOLLOWUP_TASK_CREATED = "campaigns.v1.followup.task_created"
FOLLOWUP_TASK_COMPLETED = "campaigns.v1.followup.task_completed"
LOTTERY_DRAWN = "campaigns.v1.lottery.drawn"
EVENT_INVITED = "campaigns.v1.event.invited"
EVENT_RSVP = "campaigns.v1.event.rsvp"
EVENT_CHECKED_IN = "campaigns.v1.event.checked_in"
REFERRAL_REWARDED = "campaigns.v1.referral.rewarded"


async def publish(session: AsyncSession, subject: str, message: Message) -> str:
    return await enqueue(session, source=SOURCE, subject=subject, message=message)
