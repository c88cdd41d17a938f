from chassis.migrations import run_env
from services.loyalty.store import metadata

run_env(metadata)
