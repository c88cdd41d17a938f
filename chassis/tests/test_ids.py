"""Random identifiers."""

from __future__ import annotations

from collections import Counter

from chassis.ids import ALPHABET, random_id


def test_an_id_is_its_prefix_and_characters_of_the_alphabet() -> None:
    made = {random_id("H", 15) for _ in range(1_000)}
    assert len(made) == 1_000
    for made_id in made:
        assert made_id.startswith("H") and len(made_id) == 16
        assert set(made_id[1:]) <= set(ALPHABET)
    assert random_id("", 16) != random_id("", 16)


def test_every_character_is_drawn_alike() -> None:
    drawn = Counter("".join(random_id("", 64) for _ in range(1_000)))
    assert set(drawn) == set(ALPHABET)
    # 2,000 expected a character: 1,700 and 2,300 are each some seven
    # standard deviations away.
    assert all(1_700 < count < 2_300 for count in drawn.values())
