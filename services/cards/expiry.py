"""The expiry worker: cards past the end of their validity become EXPIRED,
each with its history entry and ``card.expired`` event. Replicas share the
work (PostgreSQL skips rows another replica holds); a card that cannot pay
because it is past its validity is refused by ResolveCard even before the
worker has passed."""

from __future__ import annotations

import asyncio
import datetime as dt
import os

from chassis.db import Database, utcnow
from chassis.logs import get_logger
from services.cards import lifecycle
from services.cards.consumers import SYSTEM_PRINCIPAL
from services.cards.domain.cards import Action
from services.cards.store import cards as store
from services.cards.store.cards import Stamp

log = get_logger(__name__)

BATCH = 100
DEFAULT_INTERVAL_SECONDS = 300.0


async def expire_due(db: Database, now: dt.datetime | None = None) -> int:
    """Expires every card due at ``now``, a batch per transaction; returns
    how many."""
    expired = 0
    while True:
        at = now or utcnow()
        async with db.transaction() as session:
            due = await store.due_to_expire(session, at, BATCH)
            for card in due:
                await lifecycle.move(
                    session, card, Action.EXPIRE, Stamp(SYSTEM_PRINCIPAL, "", at), "end of validity"
                )
        expired += len(due)
        if len(due) < BATCH:
            return expired


class ExpiryWorker:
    def __init__(self, db: Database, interval_seconds: float | None = None) -> None:
        self.db = db
        self.interval = interval_seconds or float(
            os.environ.get("CARDS_EXPIRY_INTERVAL_SECONDS", DEFAULT_INTERVAL_SECONDS)
        )

    async def run(self) -> None:
        while True:
            try:
                count = await expire_due(self.db)
                if count:
                    log.info("cards expired", count=count)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("expiry pass failed; will retry")
            await asyncio.sleep(self.interval)
