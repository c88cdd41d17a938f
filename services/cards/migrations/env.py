from chassis.migrations import run_env
from services.cards.store import cards, metadata, programs, projections

# Importing each store module registers its tables on the shared metadata.
__all__ = ["cards", "programs", "projections"]

run_env(metadata)
