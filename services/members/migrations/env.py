from chassis.migrations import run_env
from services.members.store import metadata

run_env(metadata)
