"""The send pace holds across replicas: two replicas (two engines on one
database) reserving a channel's slots at once, through the real store, start
no more sends than the rate and burst allow between them, and really wait
for their slots. On real databases, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from chassis.db import Database
from services.notify.dispatch import RateLimiter
from services.notify.domain import Channel
from services.notify.domain.delivery import SendPace, next_tat, pace_wait
from services.notify.store.pace import pace_of, reserve_send
from services.notify.tests.test_delivery import most_in_a_window

pytestmark = pytest.mark.integration


async def test_the_statement_does_what_the_domain_says(
    replicas: Callable[[], Database],
) -> None:
    db = replicas()
    pace = SendPace(rate=4, burst=2)
    expected: float | None = None
    async with db.sessions() as session:
        assert await pace_of(session, "sms") is None
    # Created by the first reservation; then ahead of the clock, then behind it.
    for now in (1000.0, 1000.0, 1000.1, 1000.2, 1009.0):
        async with db.transaction() as session:
            tat = await reserve_send(session, "sms", now=now, interval=pace.interval)
        expected = next_tat(expected, now, pace)
        assert tat == pytest.approx(expected)
    assert expected == pytest.approx(1009.25)
    async with db.sessions() as session:
        assert await pace_of(session, "sms") == pytest.approx(1009.25)
        # Channels keep paces of their own.
        assert await pace_of(session, "email") is None
    # The third reservation at 1000.1 had the slot at 1000.5: 0.15 s to wait.
    assert pace_wait(1000.75, 1000.1, pace) == pytest.approx(0.15)


async def test_two_replicas_keep_one_pace_between_them(
    replicas: Callable[[], Database],
) -> None:
    rate, burst = 40.0, 3
    senders, each = 4, 8  # per replica
    first, second = replicas(), replicas()
    # Planned start, the time the sender woke, and which replica it was.
    starts: list[tuple[float, float, str]] = []

    async def sender(db: Database, name: str) -> None:
        limiter = RateLimiter(db, Channel.SMS, rate, burst)
        for _ in range(each):
            planned = await limiter.acquire()
            starts.append((planned, time.time(), name))

    began = time.time()
    await asyncio.wait_for(
        asyncio.gather(
            *(
                sender(db, name)
                for db, name in ((first, "one"), (second, "two"))
                for _ in range(senders)
            )
        ),
        timeout=60,
    )
    total = 2 * senders * each
    assert len(starts) == total
    assert {name for _, _, name in starts} == {"one", "two"}
    planned = [p for p, _, _ in starts]
    # Between them the replicas never started more than the limit allows
    # (a hundredth of a send's room for floats at the epoch's magnitude).
    assert most_in_a_window(planned, rate, burst) <= 0.01
    # Each slot was its own: the burst, then one send every interval.
    assert max(planned) - min(planned) >= (total - burst) / rate - 1e-3
    # And the senders really waited for them (the sleep never ends early
    # by more than the clock's grain).
    assert all(woke >= p - 0.005 for p, woke, _ in starts)
    assert max(woke for _, woke, _ in starts) - began >= (total - burst) / rate - 0.005
    async with first.sessions() as session:
        tat = await pace_of(session, Channel.SMS.value)
    # The last send started ``burst - 1`` intervals before its slot, and
    # the next slot is one interval after that.
    assert tat == pytest.approx(max(planned) + burst / rate, abs=1e-3)
