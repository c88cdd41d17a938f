from chassis.migrations import run_env
from services.members.store import members, metadata

# Importing each store module registers its tables on the shared metadata.
__all__ = ["members"]

run_env(metadata)
