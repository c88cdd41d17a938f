"""What a background worker (the outbox relay, notify's planner, dispatcher
and sends worker) waits on between its passes: a commit of this process
that left it work wakes it at once; otherwise it looks again after its poll
interval (for work written by other replicas, or due later)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chassis.db import Database

# The linger of a worker woken by the commits of requests (the relay, say):
# 10 ms more on the way of what they left it, one pass for the commits of
# those 10 ms under load.
COMMIT_LINGER_SECONDS = 0.01


class Wakeup:
    """Woken by ``ring``, or by every commit of ``db`` whose session's info
    holds ``flag`` (the writer's mark that it left work for this worker).

    ``linger``: once woken, how long to wait before the pass, so that under
    load the commits that follow are taken by the same pass (one
    transaction, one round trip, for several) at the cost of that much
    latency when the worker is idle."""

    def __init__(self, db: Database | None = None, flag: str = "", *, linger: float = 0.0) -> None:
        self.linger = linger
        self._event = asyncio.Event()
        self._flag = flag
        if db is not None and flag:
            db.on_commit(self._on_commit)

    def _on_commit(self, info: dict[str, Any]) -> None:
        if info.get(self._flag):
            self._event.set()

    def ring(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Until woken (then ``linger`` more) or ``timeout``; whether it was
        woken. The pass that follows sees every commit made before it
        returns, so their wake-ups are spent here."""
        await set_within(self._event, timeout)
        woken = self._event.is_set()
        if woken and self.linger > 0:
            await asyncio.sleep(self.linger)
        self._event.clear()
        return woken


async def set_within(event: asyncio.Event, timeout: float) -> bool:
    """Whether ``event`` is set, waiting for it at most ``timeout`` seconds.
    A cancellation meanwhile is raised, always: with ``asyncio.wait_for``
    (Python 3.11), one that came in the same turn as the event was dropped,
    and the loop waiting would never stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()
