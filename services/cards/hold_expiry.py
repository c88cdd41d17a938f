"""The hold expiry worker: a hold the checkout neither captured nor voided
in time is voided here, its funds given back and ``stored_value.voided``
published with ``expired`` set. A crashed checkout thus never leaves stored
value on hold for good. Each hold is expired in a transaction of its own,
locking its account first as every movement does; replicas may race for
the same hold, and the second finds it no longer held."""

from __future__ import annotations

import asyncio
import datetime as dt
import os

from chassis.db import Database, utcnow
from chassis.logs import get_logger
from services.cards import ledger
from services.cards.consumers import SYSTEM_PRINCIPAL
from services.cards.store import stored_value as store
from services.cards.store.cards import Stamp

log = get_logger(__name__)

BATCH = 200
DEFAULT_INTERVAL_SECONDS = 30.0


async def expire_due_holds(db: Database, now: dt.datetime | None = None) -> int:
    """Expires every hold due at ``now``; returns how many."""
    expired = 0
    while True:
        at = now or utcnow()
        async with db.sessions() as session:
            due = await store.holds_due(session, at, BATCH)
        for hold_id in due:
            async with db.transaction() as session:
                await ledger.void(
                    session,
                    hold_id,
                    ledger.Request(f"{hold_id}:expire", "", Stamp(SYSTEM_PRINCIPAL, "", at)),
                    reason="not captured in time",
                    expired=True,
                )
        expired += len(due)
        if len(due) < BATCH:
            return expired


class HoldExpiryWorker:
    def __init__(self, db: Database, interval_seconds: float | None = None) -> None:
        self.db = db
        self.interval = interval_seconds or float(
            os.environ.get("CARDS_HOLD_EXPIRY_INTERVAL_SECONDS", DEFAULT_INTERVAL_SECONDS)
        )

    async def run(self) -> None:
        while True:
            try:
                count = await expire_due_holds(self.db)
                if count:
                    log.info("holds expired", count=count)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("hold expiry pass failed; will retry")
            await asyncio.sleep(self.interval)
