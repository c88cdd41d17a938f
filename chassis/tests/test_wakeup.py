"""The worker's wake-up: rung, timed out, and lingering."""

from __future__ import annotations

import asyncio
import time

import pytest

from chassis.wakeup import Wakeup


async def test_a_ring_wakes_the_worker_and_is_spent_by_the_wait() -> None:
    wakeup = Wakeup()
    wakeup.ring()
    started = time.monotonic()
    assert await wakeup.wait(5) is True
    assert time.monotonic() - started < 1
    # Spent: the next wait runs to its timeout.
    assert await wakeup.wait(0.05) is False


async def test_rings_during_the_linger_are_taken_by_the_same_pass() -> None:
    wakeup = Wakeup(linger=0.2)

    async def ring_twice() -> None:
        wakeup.ring()
        await asyncio.sleep(0.05)
        wakeup.ring()  # while the first wake-up lingers

    ringing = asyncio.create_task(ring_twice())
    started = time.monotonic()
    assert await wakeup.wait(5) is True
    assert time.monotonic() - started >= 0.2
    await ringing
    # Both rings came before the pass: nothing is left to wake the next.
    assert await wakeup.wait(0.05) is False


async def test_a_worker_stopped_as_it_is_woken_stops() -> None:
    """A cancellation that comes in the same turn as the ring is not lost:
    the worker's loop ends (``asyncio.wait_for`` of Python 3.11 returned
    the ring and dropped the cancellation, so a stopping service could
    wait on a worker that never stopped)."""
    wakeup = Wakeup()
    waiting = asyncio.create_task(wakeup.wait(10))
    await asyncio.sleep(0)
    wakeup.ring()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
