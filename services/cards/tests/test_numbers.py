"""Card numbers: Luhn, the spread of serials over a range, program checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from services.cards.domain.programs import (
    Form,
    Holding,
    NumberFormat,
    Program,
    Spread,
    card_number,
    luhn_check_digit,
    luhn_valid,
    new_spread,
    normalise_card_number,
    validate_program,
)


@st.composite
def formats(draw: st.DrawFn) -> NumberFormat:
    luhn = draw(st.booleans())
    length = draw(st.integers(8, 19))
    prefix_length = draw(st.integers(1, min(12, length - 2 - int(luhn))))
    prefix = draw(st.text("0123456789", min_size=prefix_length, max_size=prefix_length))
    return NumberFormat(prefix, length, luhn)


@given(fmt=formats(), data=st.data())
def test_every_number_has_the_prefix_the_length_and_a_valid_check_digit(
    fmt: NumberFormat, data: st.DataObject
) -> None:
    spread = new_spread(fmt.capacity)
    serial = data.draw(st.integers(0, fmt.capacity - 1))
    number = card_number(fmt, spread, serial)
    assert number.startswith(fmt.prefix)
    assert len(number) == fmt.length
    assert number.isdigit()
    if fmt.luhn:
        assert luhn_valid(number)
    assert normalise_card_number(number) == number


@settings(max_examples=30)
@given(prefix=st.text("0123456789", min_size=1, max_size=4), luhn=st.booleans())
def test_a_small_range_gives_every_number_once(prefix: str, luhn: bool) -> None:
    fmt = NumberFormat(prefix, len(prefix) + 3 + int(luhn), luhn)
    spread = new_spread(fmt.capacity)
    numbers = {card_number(fmt, spread, serial) for serial in range(fmt.capacity)}
    assert len(numbers) == fmt.capacity == 1000


@given(payload=st.text("0123456789", min_size=1, max_size=18), position=st.data())
def test_luhn_catches_any_single_mistyped_digit(payload: str, position: st.DataObject) -> None:
    number = payload + luhn_check_digit(payload)
    assert luhn_valid(number)
    index = position.draw(st.integers(0, len(number) - 1))
    wrong = position.draw(st.sampled_from([d for d in "0123456789" if d != number[index]]))
    assert not luhn_valid(number[:index] + wrong + number[index + 1 :])


def test_known_luhn_numbers() -> None:
    assert luhn_valid("79927398713")
    assert luhn_valid("4539578763621486")
    assert not luhn_valid("79927398710")
    assert luhn_check_digit("7992739871") == "3"


def test_serials_outside_the_range_are_refused() -> None:
    fmt = NumberFormat("9", 8, True)
    with pytest.raises(ValueError):
        card_number(fmt, Spread(1, 0), fmt.capacity)


def test_typed_numbers_are_normalised() -> None:
    assert normalise_card_number("8816 0000 1234-5") == "8816000012345"
    assert normalise_card_number("12ab5678") is None
    assert normalise_card_number("1234") is None


def test_overlapping_ranges() -> None:
    assert NumberFormat("88", 16, True).overlaps(NumberFormat("881", 16, True))
    assert not NumberFormat("88", 16, True).overlaps(NumberFormat("881", 15, True))
    assert not NumberFormat("88", 16, True).overlaps(NumberFormat("89", 16, True))


def gold(**changes: object) -> Program:
    values: dict[str, object] = {
        "program_id": "GOLD",
        "display_name": " 金卡 ",
        "form": Form.PHYSICAL,
        "number_format": NumberFormat("8816", 16, True),
        "validity_months": 24,
        "stored_value": True,
        "member_discount_bps": 500,
        "allows_supplementary": True,
        "max_supplementary_cards": 3,
    }
    values.update(changes)
    return Program(**values)  # type: ignore[arg-type]


def test_a_valid_program_is_trimmed() -> None:
    assert validate_program(gold()).display_name == "金卡"


def test_every_problem_of_a_program_is_reported() -> None:
    bad = gold(
        program_id="gold card",
        display_name="",
        number_format=NumberFormat("88a", 30, True),
        validity_months=-1,
        member_discount_bps=20_000,
        stored_value=False,
        max_group_holders=3,
        partner_id="bad partner",
    )
    with pytest.raises(InvalidArgument) as caught:
        validate_program(bad)
    assert {v.field for v in caught.value.violations} == {
        "card_program.program_id",
        "card_program.display_name",
        "card_program.number_format.prefix",
        "card_program.number_format.length",
        "card_program.validity_months",
        "card_program.member_discount_bps",
        "card_program.allows_supplementary",
        "card_program.max_group_holders",
        "card_program.partner_id",
    }


def test_group_programs_need_holders_and_no_supplementary_cards() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_program(gold(holding=Holding.GROUP))
    assert {v.field for v in caught.value.violations} == {
        "card_program.max_group_holders",
        "card_program.allows_supplementary",
    }
    assert validate_program(
        gold(
            holding=Holding.GROUP,
            max_group_holders=5,
            allows_supplementary=False,
            max_supplementary_cards=0,
        )
    )


def test_a_range_needs_two_digits() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_program(gold(number_format=NumberFormat("1234567", 8, True)))
    assert [v.field for v in caught.value.violations] == ["card_program.number_format.length"]
