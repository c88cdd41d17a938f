from chassis.migrations import run_env
from services.campaigns.store import (
    coupons,
    followups,
    lotteries,
    member_events,
    metadata,
    promotions,
    referrals,
    segments,
)

# Importing each store module registers its tables on the shared metadata.
__all__ = [
    "coupons",
    "followups",
    "lotteries",
    "member_events",
    "promotions",
    "referrals",
    "segments",
]

run_env(metadata)
