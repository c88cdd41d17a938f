from chassis.migrations import run_env
from services.campaigns.store import metadata

run_env(metadata)
