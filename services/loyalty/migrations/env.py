from chassis.migrations import run_env
from services.loyalty.store import earn_rules, gifts, members, metadata, points, sales, tiers  # noqa: F401

run_env(metadata)
