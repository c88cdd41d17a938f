"""Referral campaigns as data: what triggers the reward, which reward, and
the window. Pure: no I/O."""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass

from chassis.errors import Violations


class Trigger(enum.StrEnum):
    ENROLL = "enroll"
    FIRST_PURCHASE = "first_purchase"


class RewardKind(enum.StrEnum):
    COUPON = "coupon"
    POINTS = "points"


class ReferralState(enum.StrEnum):
    # Triggered; points still to be awarded by the worker.
    PENDING = "pending"
    REWARDED = "rewarded"
    SKIPPED = "skipped"


NAME_LIMIT = 100
MAX_POINTS = 1_000_000
MAX_WINDOW = dt.timedelta(days=3660)
# What a referral records as its trigger reference for an enrollment.
ENROLL_REFERENCE = "enroll"
SKIP_TEMPLATE_NOT_FOUND = "COUPON_TEMPLATE_NOT_FOUND"
_CAMPAIGN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    name: str
    trigger: Trigger
    reward: RewardKind
    # COUPON: the template; POINTS: the points.
    template_id: str
    points: int
    start_at: dt.datetime
    end_at: dt.datetime

    def covers(self, at: dt.datetime) -> bool:
        return self.start_at <= at < self.end_at


def validate_campaign(  # noqa: PLR0917
    campaign_id: str,
    name: str,
    trigger: Trigger | None,
    template_id: str,
    points: int,
    start_at: dt.datetime | None,
    end_at: dt.datetime | None,
) -> Campaign:
    """The campaign, or INVALID_ARGUMENT naming every field at fault.
    Exactly one reward: a template or points."""
    v = Violations()
    if not _CAMPAIGN_ID.match(campaign_id):
        v.add("campaign.campaign_id", "lower-case letters, digits, '-' and '_', at most 40")
    name = name.strip()
    if not name:
        v.add("campaign.display_name", "required")
    elif len(name) > NAME_LIMIT:
        v.add("campaign.display_name", f"at most {NAME_LIMIT} characters")
    if trigger is None:
        v.add("campaign.trigger", "ENROLL or FIRST_PURCHASE")
    template_id = template_id.strip()
    reward = RewardKind.COUPON
    if template_id and points:
        v.add("campaign.reward", "a coupon template or points, not both")
    elif template_id:
        reward = RewardKind.COUPON
    elif points:
        reward = RewardKind.POINTS
        if not 1 <= points <= MAX_POINTS:
            v.add("campaign.points", f"1 to {MAX_POINTS}")
    else:
        v.add("campaign.reward", "required: a coupon template or points")
    if start_at is None:
        v.add("campaign.start_time", "required")
    if end_at is None:
        v.add("campaign.end_time", "required")
    elif start_at is not None and not start_at < end_at <= start_at + MAX_WINDOW:
        v.add("campaign.end_time", "after start_time, within ten years of it")
    v.raise_if_any()
    assert trigger is not None and start_at is not None and end_at is not None
    return Campaign(
        campaign_id=campaign_id,
        name=name,
        trigger=trigger,
        reward=reward,
        template_id=template_id if reward == RewardKind.COUPON else "",
        points=points if reward == RewardKind.POINTS else 0,
        start_at=start_at,
        end_at=end_at,
    )


def reward_request_id(campaign_id: str, referred_member_id: str) -> str:
    """The key of the reward in other services (loyalty's AwardPoints, the
    coupon issue job): one per (campaign, referred member)."""
    return f"referral:{campaign_id}:{referred_member_id}"
