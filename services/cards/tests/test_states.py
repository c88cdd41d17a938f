"""The card state machine over every pair of state and action."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from chassis.errors import FailedPrecondition
from services.cards.domain.cards import (
    LIFECYCLE_ACTIONS,
    LIVE_STATES,
    Action,
    CardState,
    expiry,
    payment_refusal,
    transition,
)

S, A = CardState, Action
ALLOWED = {
    (S.ACTIVE, A.REPORT_LOST): S.LOST,
    (S.ACTIVE, A.FREEZE): S.FROZEN,
    (S.ACTIVE, A.REPLACE): S.REPLACED,
    (S.ACTIVE, A.CANCEL): S.CANCELLED,
    (S.ACTIVE, A.EXPIRE): S.EXPIRED,
    (S.LOST, A.CANCEL_LOSS): S.ACTIVE,
    (S.LOST, A.REPLACE): S.REPLACED,
    (S.LOST, A.CANCEL): S.CANCELLED,
    (S.LOST, A.EXPIRE): S.EXPIRED,
    (S.FROZEN, A.UNFREEZE): S.ACTIVE,
    (S.FROZEN, A.CANCEL): S.CANCELLED,
    (S.FROZEN, A.EXPIRE): S.EXPIRED,
    (S.EXPIRED, A.CANCEL): S.CANCELLED,
}


@pytest.mark.parametrize(("state", "action"), list(itertools.product(CardState, LIFECYCLE_ACTIONS)))
def test_every_state_and_action(state: CardState, action: Action) -> None:
    expected = ALLOWED.get((state, action))
    if expected is not None:
        assert transition(state, action) == expected
        return
    with pytest.raises(FailedPrecondition) as refused:
        transition(state, action, "C1")
    if state == S.ACTIVE and action == A.CANCEL_LOSS:
        assert refused.value.reason == "CARD_NOT_LOST"
    elif state == S.ACTIVE and action == A.UNFREEZE:
        assert refused.value.reason == "CARD_NOT_FROZEN"
    else:
        assert refused.value.reason == f"CARD_{state.value.upper()}"
    assert refused.value.metadata["card_id"] == "C1"


@pytest.mark.parametrize("state", [S.REPLACED, S.CANCELLED])
def test_final_states_refuse_everything(state: CardState) -> None:
    assert state not in LIVE_STATES
    for action in LIFECYCLE_ACTIONS:
        with pytest.raises(FailedPrecondition):
            transition(state, action)


def test_an_expired_card_can_only_be_cancelled() -> None:
    assert S.EXPIRED not in LIVE_STATES
    for action in LIFECYCLE_ACTIONS:
        if action == A.CANCEL:
            assert transition(S.EXPIRED, action) == S.CANCELLED
        else:
            with pytest.raises(FailedPrecondition):
                transition(S.EXPIRED, action)


NOW = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("state", "expires", "reason"),
    [
        (S.ACTIVE, None, ""),
        (S.ACTIVE, NOW + dt.timedelta(days=1), ""),
        (S.ACTIVE, NOW, "CARD_EXPIRED"),
        (S.LOST, None, "CARD_LOST"),
        (S.FROZEN, None, "CARD_FROZEN"),
        (S.CANCELLED, None, "CARD_CANCELLED"),
        (S.EXPIRED, None, "CARD_EXPIRED"),
        (S.REPLACED, None, "CARD_REPLACED"),
    ],
)
def test_who_can_pay(state: CardState, expires: dt.datetime | None, reason: str) -> None:
    assert payment_refusal(state, expires, NOW) == reason


def test_validity_ends_on_the_same_day_or_the_months_last() -> None:
    assert expiry(NOW, 0) is None
    assert expiry(NOW, 12) == NOW.replace(year=2027)
    assert expiry(NOW, 3) == NOW.replace(year=2027, month=3)
    end_of_january = dt.datetime(2027, 1, 31, tzinfo=dt.UTC)
    assert expiry(end_of_january, 1) == dt.datetime(2027, 2, 28, tzinfo=dt.UTC)
    assert expiry(end_of_january, 13) == dt.datetime(2028, 2, 29, tzinfo=dt.UTC)
