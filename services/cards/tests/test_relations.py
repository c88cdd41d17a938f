"""Supplementary cards, group holders and links; spending limits; PINs."""

from __future__ import annotations

import datetime as dt

import pytest

from chassis.errors import FailedPrecondition, InvalidArgument
from services.cards.domain import pins
from services.cards.domain.cards import (
    CardFacts,
    CardState,
    ProgramFacts,
    Role,
    SpendingLimit,
    check_group_join,
    check_link,
    check_new_holder,
    check_reason,
    check_spending_limit,
    check_supplementary,
)
from services.cards.domain.programs import Holding

GOLD = ProgramFacts("GOLD", Holding.PERSONAL, True, True, 2, 0, True)
PLAIN = ProgramFacts("PLAIN", Holding.PERSONAL, False, False, 0, 0, False)
FAMILY = ProgramFacts("FAMILY", Holding.GROUP, True, False, 0, 3, False)


def card(
    card_id: str = "C1",
    program: str = "GOLD",
    member: str = "M1",
    state: CardState = CardState.ACTIVE,
    role: Role = Role.PRINCIPAL,
    linked: str = "",
) -> CardFacts:
    return CardFacts(card_id, program, member, "A1", state, role, linked)


def test_one_live_card_of_a_program_per_member() -> None:
    check_new_holder(GOLD, 0)
    with pytest.raises(FailedPrecondition) as refused:
        check_new_holder(GOLD, 1)
    assert refused.value.reason == "CARD_ALREADY_HELD"


def test_supplementary_cards() -> None:
    check_supplementary(card(), GOLD, GOLD, live_supplementaries=1)
    cases = [
        ((card(state=CardState.LOST), GOLD, GOLD, 0), "CARD_LOST"),
        ((card(role=Role.SUPPLEMENTARY), GOLD, GOLD, 0), "NOT_A_PRINCIPAL_CARD"),
        ((card(program="PLAIN"), PLAIN, GOLD, 0), "SUPPLEMENTARY_NOT_ALLOWED"),
        ((card(), GOLD, PLAIN, 0), "PROGRAM_NOT_SUPPLEMENTARY"),
        ((card(), GOLD, FAMILY, 0), "PROGRAM_NOT_SUPPLEMENTARY"),
        ((card(), GOLD, GOLD, 2), "SUPPLEMENTARY_LIMIT_REACHED"),
    ]
    for (principal, principal_program, program, live), reason in cases:
        with pytest.raises(FailedPrecondition) as refused:
            check_supplementary(principal, principal_program, program, live_supplementaries=live)
        assert refused.value.reason == reason


def test_group_holders() -> None:
    group = card(program="FAMILY", role=Role.GROUP_HOLDER)
    check_group_join(group, FAMILY, "FAMILY", live_holders=2, already_holder=False)
    with pytest.raises(InvalidArgument):
        check_group_join(group, FAMILY, "GOLD", live_holders=1, already_holder=False)
    for kwargs, facts, reason in [
        ({"live_holders": 3, "already_holder": False}, FAMILY, "GROUP_FULL"),
        ({"live_holders": 1, "already_holder": True}, FAMILY, "CARD_ALREADY_HELD"),
        ({"live_holders": 1, "already_holder": False}, GOLD, "NOT_A_GROUP_CARD"),
    ]:
        with pytest.raises(FailedPrecondition) as refused:
            check_group_join(group, facts, "FAMILY", **kwargs)  # type: ignore[arg-type]
        assert refused.value.reason == reason
    with pytest.raises(FailedPrecondition) as refused:
        check_group_join(
            card(program="FAMILY", state=CardState.FROZEN),
            FAMILY,
            "FAMILY",
            live_holders=1,
            already_holder=False,
        )
    assert refused.value.reason == "CARD_FROZEN"


def test_links() -> None:
    mine, theirs = card("C1"), card("C2", member="M2")
    check_link(mine, GOLD, theirs, GOLD)
    with pytest.raises(InvalidArgument):
        check_link(mine, GOLD, mine, GOLD)
    for other, other_program, reason in [
        (card("C2", member="M2", program="PLAIN"), PLAIN, "LINKING_NOT_ALLOWED"),
        (card("C2", member="M1"), GOLD, "SAME_MEMBER"),
        (card("C2", member="M2", linked="C9"), GOLD, "CARD_ALREADY_LINKED"),
        (card("C2", member="M2", state=CardState.CANCELLED), GOLD, "CARD_CANCELLED"),
    ]:
        with pytest.raises(FailedPrecondition) as refused:
            check_link(mine, GOLD, other, other_program)
        assert refused.value.reason == reason


def test_spending_limits_only_on_supplementary_cards() -> None:
    check_spending_limit(None, supplementary=False)
    check_spending_limit(SpendingLimit("CNY", 50_000), supplementary=True)
    with pytest.raises(InvalidArgument) as caught:
        check_spending_limit(SpendingLimit("C", 0), supplementary=False)
    assert {v.field for v in caught.value.violations} == {
        "spending_limit",
        "spending_limit.currency_code",
        "spending_limit.minor_units",
    }


def test_reasons() -> None:
    assert check_reason("  fraud suspected ", required=True) == "fraud suspected"
    with pytest.raises(InvalidArgument):
        check_reason(" ", required=True)
    with pytest.raises(InvalidArgument):
        check_reason("x" * 201, required=False)


@pytest.mark.parametrize(
    "pin", ["12345", "1234567", "12a456", "111111", "123456", "987654", "890123"]
)
def test_guessable_or_malformed_pins_are_refused(pin: str) -> None:
    with pytest.raises(InvalidArgument):
        pins.check_new_pin(pin)


def test_a_good_pin_passes() -> None:
    pins.check_new_pin("284751")


def test_three_wrong_tries_lock_the_pin_for_a_while() -> None:
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    state = pins.PinState()
    state = pins.after_wrong_try(state, now)
    state = pins.after_wrong_try(state, now)
    assert state == pins.PinState(2, None)
    assert not pins.is_locked(state, now)
    state = pins.after_wrong_try(state, now)
    assert pins.is_locked(state, now)
    assert not pins.is_locked(state, now + pins.LOCK)
    # After the lock, one wrong try is one, not a fresh lock.
    after = pins.after_wrong_try(state, now + pins.LOCK)
    assert after == pins.PinState(1, None)


def test_the_fingerprint_stand_in_is_stable_per_request_and_hides_the_pin() -> None:
    one = pins.request_stand_in("284751", "C1", "r-1")
    assert one == pins.request_stand_in("284751", "C1", "r-1")
    assert one != pins.request_stand_in("284751", "C1", "r-2")
    assert "284751" not in one
    assert pins.request_stand_in("", "C1", "r-1") == ""
