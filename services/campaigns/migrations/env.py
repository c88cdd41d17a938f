from chassis.migrations import run_env
from services.campaigns.store import coupons, followups, metadata, promotions

# Importing each store module registers its tables on the shared metadata.
__all__ = ["coupons", "followups", "promotions"]

run_env(metadata)
