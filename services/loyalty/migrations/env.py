from chassis.migrations import run_env
from services.loyalty.store import (  # noqa: F401
    conversions,
    earn_rules,
    gifts,
    members,
    metadata,
    points,
    sales,
    tiers,
)

run_env(metadata)
