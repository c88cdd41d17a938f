from chassis.migrations import run_env
from services.cards.store import (
    batches,
    cards,
    metadata,
    partners,
    programs,
    projections,
    stored_value,
    stored_value_rules,
)

# Importing each store module registers its tables on the shared metadata.
__all__ = [
    "batches",
    "cards",
    "partners",
    "programs",
    "projections",
    "stored_value",
    "stored_value_rules",
]

run_env(metadata)
