from chassis.migrations import run_env
from services.cards.store import metadata

run_env(metadata)
