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


@dataclass
class TokenBucket:
    """A provider's rate limit: ``rate`` sends a second on average, bursts
    of up to ``burst``. ``reserve(now)`` takes a token and says how long to
    wait before using it (0 when one is there); tokens reserved ahead are
    owed, so concurrent senders queue up fairly instead of all waking at
    once. Times are seconds of a monotonic clock."""

    rate: float
    burst: float = 1.0
    tokens: float = math.nan
    stamp: float = math.nan

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of sends per second")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        if math.isnan(self.tokens):
            self.tokens = self.burst

    def reserve(self, now: float) -> float:
        if math.isnan(self.stamp):
            self.stamp = now
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = max(self.stamp, now)
        self.tokens -= 1.0
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate
