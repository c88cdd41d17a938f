"""When to try a message again, and how fast a provider may be called. Pure:
no I/O; the caller passes the clock and the randomness.

Retries back off exponentially with *full jitter*: the n-th retry waits a
uniformly random time between zero and ``base * 2**(n-1)`` (capped), so that
messages that failed together during an outage do not all come back at the
same instant and knock the recovering provider over again.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    # Attempts in all, the first included; the last failure makes the message
    # FAILED, a dead letter.
    max_attempts: int = 8
    base_seconds: float = 30.0
    cap_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not (0 < self.base_seconds <= self.cap_seconds):
            raise ValueError("0 < base_seconds <= cap_seconds")

    def ceiling(self, failures: int) -> float:
        """The longest wait after the ``failures``-th failed attempt (1, 2,
        ...): base, 2 base, 4 base, ... up to the cap."""
        if failures < 1:
            raise ValueError("failures counts from 1")
        # 2**64 already dwarfs any cap; no float overflow for large counts.
        return min(self.cap_seconds, self.base_seconds * 2.0 ** min(failures - 1, 64))

    def delay(self, failures: int, uniform: Callable[[], float]) -> float:
        """Full jitter: ``uniform()`` (in [0, 1)) of the ceiling."""
        return self.ceiling(failures) * min(max(uniform(), 0.0), 1.0)

    def gives_up(self, attempts: int) -> bool:
        """True when ``attempts`` made so far are all a message gets."""
        return attempts >= self.max_attempts


def next_attempt_at(
    policy: RetryPolicy,
    failures: int,
    now: dt.datetime,
    uniform: Callable[[], float],
    retry_after: float | None = None,
) -> dt.datetime:
    """When to try again after the ``failures``-th failure: the jittered
    backoff, but never sooner than the provider asked (``Retry-After``)."""
    wait = policy.delay(failures, uniform)
    if retry_after is not None and math.isfinite(retry_after):
        wait = max(wait, min(retry_after, policy.cap_seconds))
    return now + dt.timedelta(seconds=wait)


@dataclass(frozen=True)
class SendPace:
    """A provider's rate limit: ``rate`` sends a second on average, bursts
    of up to ``burst``, kept with the generic cell rate algorithm (GCRA).

    The whole state is one number per channel, the *theoretical arrival
    time* ``tat`` (seconds since the Unix epoch): when the channel would be
    idle again if every send reserved so far started on time. A reservation
    (``next_tat``) takes the slot at ``max(tat, now)`` and moves ``tat`` one
    ``interval`` on; its send may start ``tolerance`` before its slot
    (``pace_wait``). Slots are reserved ahead, so concurrent senders queue
    up fairly, each with its own slot, instead of all waking at once; and
    since the state is one number, every replica can share it in the
    database (``store.pace``).

    Slots are ``interval`` apart and each send starts within ``tolerance``
    before its slot, so any window of ``w`` seconds holds at most
    ``burst + rate * w`` starts, whatever the order and the clocks of the
    reservations. (At epoch magnitudes a float resolves about a quarter of a
    microsecond, far below any interval.)"""

    rate: float
    burst: int = 1

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of sends per second")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")

    @property
    def interval(self) -> float:
        """Seconds between two slots."""
        return 1.0 / self.rate

    @property
    def tolerance(self) -> float:
        """How long before its slot a send may start: ``burst - 1`` slots."""
        return (self.burst - 1) * self.interval


def next_tat(tat: float | None, now: float, pace: SendPace) -> float:
    """The channel's ``tat`` after one reservation at ``now``: what the
    reservation statement writes and returns (``None``: the channel has no
    row yet, as if idle). The reserved slot is the result less ``interval``."""
    return (now if tat is None else max(tat, now)) + pace.interval


def pace_wait(tat: float, now: float, pace: SendPace) -> float:
    """How long a send whose reservation returned ``tat`` waits from ``now``
    before it starts: until ``tolerance`` before its slot, 0 when that is
    past."""
    return max(0.0, (tat - pace.interval) - now - pace.tolerance)
