from chassis.migrations import run_env
from services.members.store import members, metadata, organisation, transfers

# Importing each store module registers its tables on the shared metadata.
__all__ = ["members", "organisation", "transfers"]

run_env(metadata)
