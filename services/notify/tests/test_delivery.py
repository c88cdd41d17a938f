"""Retry timing and rate limits: full-jitter backoff stays within its
bounds, grows and caps; a Retry-After is honoured; the send pace (GCRA)
never lets more sends start than its rate and burst allow, whatever the
order of the reservations, and never holds back sends that keep to it."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.notify.domain.delivery import (
    RetryPolicy,
    SendPace,
    next_attempt_at,
    next_tat,
    pace_wait,
)

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)

policies = st.builds(
    lambda base, factor, attempts: RetryPolicy(attempts, base, base * factor),
    st.floats(0.01, 600),
    st.floats(1, 1000),
    st.integers(1, 30),
)


@given(policies, st.integers(1, 200), st.floats(0, 1, exclude_max=True))
def test_the_wait_is_between_zero_and_the_capped_ceiling(
    policy: RetryPolicy, failures: int, draw: float
) -> None:
    wait = policy.delay(failures, lambda: draw)
    assert 0 <= wait <= policy.ceiling(failures) <= policy.cap_seconds
    assert policy.ceiling(failures) == min(
        policy.cap_seconds, policy.base_seconds * 2 ** min(failures - 1, 64)
    )


@given(policies, st.integers(1, 100))
def test_the_ceiling_doubles_until_the_cap(policy: RetryPolicy, failures: int) -> None:
    now, after = policy.ceiling(failures), policy.ceiling(failures + 1)
    assert after == min(policy.cap_seconds, now * 2) or after == policy.cap_seconds
    assert after >= now


def test_full_jitter_spans_the_whole_range() -> None:
    policy = RetryPolicy(5, 10, 1000)
    assert policy.delay(3, lambda: 0.0) == 0.0
    assert policy.delay(3, lambda: 0.5) == 20.0
    assert policy.delay(3, lambda: 0.999999) == pytest.approx(40.0, rel=1e-5)
    assert policy.delay(30, lambda: 0.5) == 500.0  # capped at 1000


@given(policies, st.integers(1, 50), st.floats(0, 1, exclude_max=True), st.floats(0, 10_000))
def test_retry_after_is_a_floor_up_to_the_cap(
    policy: RetryPolicy, failures: int, draw: float, retry_after: float
) -> None:
    at = next_attempt_at(policy, failures, NOW, lambda: draw, retry_after)
    waited = (at - NOW).total_seconds()
    assert waited >= min(retry_after, policy.cap_seconds) - 1e-6
    assert waited <= max(policy.ceiling(failures), min(retry_after, policy.cap_seconds)) + 1e-6


def test_gives_up_after_the_last_attempt() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.gives_up(n) for n in (1, 2, 3, 4)] == [False, False, True, True]
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_seconds=10, cap_seconds=5)
    with pytest.raises(ValueError):
        policy.ceiling(0)


def starts_of(pace: SendPace, times: list[float]) -> list[float]:
    """When each send may start, reserving one after the other at ``times``
    (in the order the database serialised them, which need not be the
    order of the clocks' readings)."""
    tat: float | None = None
    starts = []
    for now in times:
        tat = next_tat(tat, now, pace)
        starts.append(now + pace_wait(tat, now, pace))
    return starts


def most_in_a_window(starts: list[float], rate: float, burst: int) -> float:
    """The largest excess, over all windows from one start to another, of
    the sends started in it over ``burst + rate * span``: <= 0 when the
    limit holds."""
    starts = sorted(starts)
    worst = -float(burst)
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            worst = max(worst, (j - i + 1) - (burst + rate * (starts[j] - first)))
    return worst


@given(
    st.floats(0.5, 500),
    st.integers(1, 20),
    st.lists(st.floats(0, 30), min_size=1, max_size=150),
)
def test_the_pace_never_allows_more_than_rate_and_burst(
    rate: float, burst: int, times: list[float]
) -> None:
    # Reservation times in any order: replicas' clocks differ, and a
    # reservation may wait for another's lock after reading its clock.
    pace = SendPace(rate, burst)
    starts = starts_of(pace, times)
    assert all(start >= now for start, now in zip(starts, times, strict=True))
    assert most_in_a_window(starts, rate, burst) <= 1e-6


@given(
    st.floats(0.5, 500),
    st.integers(1, 20),
    st.lists(st.floats(1, 100), min_size=1, max_size=100),
    st.floats(0, 1e6),
)
def test_sends_at_a_slow_pace_never_wait(
    rate: float, burst: int, factors: list[float], first: float
) -> None:
    # Each reservation at least one interval after the one before.
    pace = SendPace(rate, burst)
    now, tat = first, None
    for factor in factors:
        tat = next_tat(tat, now, pace)
        assert pace_wait(tat, now, pace) <= 1e-9
        now += factor * pace.interval


def test_the_pace_lets_a_burst_through_then_spaces_sends() -> None:
    pace = SendPace(rate=10, burst=2)
    assert (pace.interval, pace.tolerance) == pytest.approx((0.1, 0.1))
    assert starts_of(pace, [5.0] * 4) == pytest.approx([5.0, 5.0, 5.1, 5.2])
    # A burst at the epoch's magnitude, as the replicas' clocks read it.
    now = 1_780_000_000.0
    assert [s - now for s in starts_of(pace, [now] * 4)] == pytest.approx(
        [0, 0, 0.1, 0.2], abs=1e-6
    )
    # Once the slots reserved ahead are past, the burst is there again.
    tat = next_tat(None, 0.0, pace)
    for _ in range(3):
        tat = next_tat(tat, 0.0, pace)
    assert tat == pytest.approx(0.4)
    assert pace_wait(next_tat(tat, 0.45, pace), 0.45, pace) == 0
    assert pace_wait(next_tat(tat, 0.29, pace), 0.29, pace) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        SendPace(rate=0)
    with pytest.raises(ValueError):
        SendPace(rate=float("inf"))
    with pytest.raises(ValueError):
        SendPace(rate=1, burst=0)
