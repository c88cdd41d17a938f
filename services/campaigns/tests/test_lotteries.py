"""Lotteries' pure rules: validation, and the mapping of a draw's
randomness onto its prize table (deterministic, only prizes in stock,
frequencies that follow the weights), and the audit."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from services.campaigns.domain import lotteries as rules
from services.campaigns.domain.lotteries import Entry, Lottery, Prize, PrizeKind

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)

tables = st.lists(
    st.builds(
        Entry,
        prize_id=st.text("ABCDEFGH", min_size=1, max_size=3),
        stock=st.integers(0, 5),
        weight=st.integers(1, 1_000),
    ),
    min_size=0,
    max_size=8,
    unique_by=lambda e: e.prize_id,
)
seeds = st.binary(min_size=32, max_size=32)


@given(seed=seeds, table=tables, no_prize=st.integers(0, 1_000), round_no=st.integers(0, 3))
def test_the_mapping_is_deterministic_and_gives_only_prizes_in_stock(
    seed: bytes, table: list[Entry], no_prize: int, round_no: int
) -> None:
    first = rules.draw_round(seed, "D1", round_no, table, no_prize)
    assert first == rules.draw_round(seed, "D1", round_no, table, no_prize)
    # The order the table is given in does not matter.
    assert first == replace(
        rules.draw_round(seed, "D1", round_no, list(reversed(table)), no_prize),
        table=first.table,
    )
    if first.prize_id:
        chosen = next(e for e in table if e.prize_id == first.prize_id)
        assert chosen.stock > 0
    in_stock = [e for e in table if e.stock > 0]
    assert first.total == sum(e.weight for e in in_stock) + no_prize
    if not in_stock:
        assert first.prize_id == ""


def test_the_documented_mapping() -> None:
    """What an auditor computes by hand, step by step."""
    seed = bytes(range(32))
    table = [Entry("B", 1, 30), Entry("A", 2, 10), Entry("C", 0, 50)]
    value = int.from_bytes(hmac.new(seed, b"DX:0", hashlib.sha256).digest(), "big")
    point = value % (10 + 30 + 60)
    expected = "A" if point < 10 else "B" if point < 40 else ""
    drawn = rules.draw_round(seed, "DX", 0, table, 60)
    assert (drawn.roll, drawn.total, drawn.point, drawn.prize_id) == (value, 100, point, expected)


def test_frequencies_follow_the_weights() -> None:
    table = [Entry("A", 10, 1), Entry("B", 10, 3), Entry("C", 0, 100)]
    n = 20_000
    counts = {"A": 0, "B": 0, "": 0}
    for i in range(n):
        counts[rules.draw_round(rules.new_seed(), f"D{i}", 0, table, 4).prize_id] += 1
    # Expected shares 1/8, 3/8, 4/8; five standard deviations at most.
    for key, share in (("A", 1 / 8), ("B", 3 / 8), ("", 4 / 8)):
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(counts[key] - n * share) < 5 * sd, counts


def test_nothing_to_draw_is_no_prize() -> None:
    drawn = rules.draw_round(b"\0" * 32, "D", 0, [Entry("A", 0, 5)], 0)
    assert (drawn.total, drawn.prize_id) == (0, "")


@settings(max_examples=50)
@given(seed=seeds, table=tables, no_prize=st.integers(0, 100))
def test_an_audit_recomputes_recorded_rounds(
    seed: bytes, table: list[Entry], no_prize: int
) -> None:
    drawn = rules.draw_round(seed, "D7", 0, table, no_prize)
    assert rules.audit(seed, "D7", [drawn], drawn.prize_id).matches
    # A raced-out prize: another round on the table with it at 0.
    if drawn.prize_id:
        lost = replace(drawn, given=False, refusal="OUT_OF_STOCK")
        after = [replace(e, stock=0) if e.prize_id == drawn.prize_id else e for e in table]
        second = rules.draw_round(seed, "D7", 1, after, no_prize)
        assert rules.audit(seed, "D7", [lost, second], second.prize_id).matches
        # Claiming the first round's prize was given after all does not.
        assert not rules.audit(seed, "D7", [lost, second], drawn.prize_id).matches or (
            second.prize_id == drawn.prize_id
        )
    # Another seed, or a tampered record, does not match.
    other = bytes(b ^ 1 for b in seed)
    tampered = rules.audit(other, "D7", [drawn], drawn.prize_id)
    assert not tampered.matches or rules.draw_round(other, "D7", 0, table, no_prize) == drawn
    assert not rules.audit(seed, "D7", [replace(drawn, point=drawn.point + 1)], "").matches


def lottery(**fields: object) -> Lottery:
    values: dict[str, object] = {
        "lottery_id": "Y1",
        "display_name": "Spring draw",
        "start_at": NOW,
        "end_at": NOW + dt.timedelta(days=7),
        "cost_points": 100,
        "prizes": (Prize("P1", PrizeKind.POINTS, points=500, stock=3, weight=1),),
        "no_prize_weight": 10,
    }
    values.update(fields)
    return Lottery(**values)  # type: ignore[arg-type]


def test_validation() -> None:
    assert rules.validate(lottery()).cost_points == 100
    bad = [
        {"display_name": " "},
        {"end_at": NOW},
        {"cost_points": 0},
        {"no_prize_weight": -1},
        {"prizes": ()},
        {"prizes": (Prize("P1", PrizeKind.COUPON, stock=1, weight=1),)},
        {"prizes": (Prize("P1", PrizeKind.POINTS, points=0, stock=1, weight=1),)},
        {"prizes": (Prize("P1", PrizeKind.GIFT, stock=1, weight=1),)},
        {"prizes": (Prize("P 1", PrizeKind.GIFT, gift_id="G", stock=1, weight=1),)},
        {"prizes": (Prize("P1", PrizeKind.GIFT, gift_id="G", stock=-1, weight=1),)},
        {"prizes": (Prize("P1", PrizeKind.GIFT, gift_id="G", stock=1, weight=0),)},
        {
            "prizes": (
                Prize("P1", PrizeKind.GIFT, gift_id="G", stock=1, weight=1),
                Prize("P1", PrizeKind.GIFT, gift_id="G", stock=1, weight=1),
            )
        },
    ]
    for fields in bad:
        with pytest.raises(InvalidArgument):
            rules.validate(lottery(**fields))
    assert lottery().open_at(NOW) and not lottery().open_at(NOW + dt.timedelta(days=7))
