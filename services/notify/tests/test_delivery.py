"""Retry timing and rate limits: full-jitter backoff stays within its
bounds, grows and caps; a Retry-After is honoured; a token bucket never
lets more through than its rate and burst allow."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.notify.domain.delivery import RetryPolicy, TokenBucket, next_attempt_at

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


@given(
    st.floats(0.5, 500),
    st.integers(1, 20),
    st.lists(st.floats(0, 0.5), min_size=1, max_size=200),
)
def test_a_bucket_never_allows_more_than_rate_and_burst(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = 0.0
    starts = []
    for gap in gaps:
        now += gap
        starts.append(now + bucket.reserve(now))
    starts.sort()
    # In any window from one start to another, at most burst + rate * span
    # sends begin.
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            span = starts[j] - first
            assert j - i + 1 <= burst + rate * span + 1e-6


def test_a_bucket_lets_a_burst_through_then_spaces_sends() -> None:
    bucket = TokenBucket(rate=10, burst=2)
    assert [bucket.reserve(0.0) for _ in range(4)] == pytest.approx([0, 0, 0.1, 0.2])
    # A second later the debt is paid and the bucket full again.
    assert bucket.reserve(1.3) == 0
    with pytest.raises(ValueError):
        TokenBucket(rate=0)
