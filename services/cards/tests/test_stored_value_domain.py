"""Stored value: the journal's invariants over random movements, how funds
are split between paid and bonus, recharge bonuses, and the policy checks."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import FailedPrecondition, InvalidArgument
from services.cards.domain.stored_value import (
    ACCOUNT_BOOKS,
    DEFAULT_HOLD_TTL,
    LONGEST_HOLD_TTL,
    MAX_AMOUNT,
    Balances,
    BonusRule,
    Book,
    Channel,
    ChannelRule,
    Entry,
    Funds,
    Policy,
    SpendOrder,
    balanced,
    best_bonus,
    capture_entries,
    check_amount,
    check_bonus_rule,
    check_daily_recharge,
    check_max_balance,
    check_policy,
    check_recharge_allowed,
    check_spend_limits,
    check_text,
    debit_entries,
    default_policy,
    hold_entries,
    hold_ttl,
    new_batch_id,
    new_bonus_rule_id,
    new_hold_id,
    new_movement_id,
    recharge_entries,
    refund_entries,
    release_entries,
    settlement_entries,
    split_capture,
    split_refund,
    split_spend,
)

NOW = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
LAST_YEAR = NOW - dt.timedelta(days=365)
NON_BATCH_CHANNELS = [c for c in Channel if c != Channel.ENTERPRISE_BATCH]


def fields_of(error: InvalidArgument) -> set[str]:
    return {v.field for v in error.violations}


def rule(**changes: object) -> BonusRule:
    values: dict[str, object] = {
        "rule_id": "B1",
        "name": "Recharge 1000, get 100",
        "threshold": 1_000,
        "starts_at": LAST_YEAR,
        "fixed_bonus": 100,
    }
    values.update(changes)
    return BonusRule(**values)  # type: ignore[arg-type]


# --- the journal over random movements ---------------------------------------

RULES = [
    rule(rule_id="B1", threshold=1_000, fixed_bonus=100),
    rule(rule_id="B2", threshold=500, fixed_bonus=None, bonus_bps=500, max_bonus=400),
]


@dataclass
class Payment:
    taken: Funds
    refunded: Funds = field(default_factory=Funds)

    @property
    def left(self) -> int:
        return self.taken.total - self.refunded.total


@dataclass
class Ledger:
    """A tiny journal: every movement goes through ``write``, which checks the
    invariants against counters kept from the domain's own splits."""

    balances: Balances = field(default_factory=Balances)
    journal: list[Entry] = field(default_factory=list)
    holds: list[Funds] = field(default_factory=list)
    payments: list[Payment] = field(default_factory=list)
    recharged_paid: int = 0
    granted_bonus: int = 0
    sold: Funds = field(default_factory=Funds)
    refunded: Funds = field(default_factory=Funds)
    paid_out: int = 0
    forfeited: Funds = field(default_factory=Funds)

    def book(self, book: Book) -> int:
        return sum(e.amount for e in self.journal if e.book == book)

    def write(self, entries: Sequence[Entry]) -> None:
        assert entries
        assert balanced(entries)
        assert all(e.amount != 0 for e in entries)
        assert all((e.channel is not None) == (e.book == Book.FUNDING) for e in entries)
        after = self.balances.after(entries)
        assert after.valid, (self.balances, entries)
        self.journal.extend(entries)
        self.balances = after

    def check(self) -> None:
        b = self.balances
        assert b.valid
        # The stored balances are the sums of the account's books.
        assert {book: self.book(book) for book in ACCOUNT_BOOKS} == b.by_book()
        # Every entry has its other side somewhere.
        assert balanced(self.journal)
        # What is on hold is exactly the open holds.
        assert Funds(b.held_paid, b.held_bonus) == sum(self.holds, Funds())
        # The chain's books hold what the domain's splits said they would.
        assert -self.book(Book.FUNDING) == self.recharged_paid
        assert -self.book(Book.BONUS_GRANTED) == self.granted_bonus
        assert self.book(Book.SALES_PAID) == self.sold.paid - self.refunded.paid
        assert self.book(Book.SALES_BONUS) == self.sold.bonus - self.refunded.bonus
        assert self.book(Book.PAYOUT) == self.paid_out
        assert self.book(Book.FORFEITED) == self.forfeited.total
        # Money is conserved, paid and bonus funds apart.
        assert self.recharged_paid == (
            b.paid
            + b.held_paid
            + self.sold.paid
            - self.refunded.paid
            + self.paid_out
            + self.forfeited.paid
        )
        assert self.granted_bonus == (
            b.bonus + b.held_bonus + self.sold.bonus - self.refunded.bonus + self.forfeited.bonus
        )

    # The movements, as the store would make them.

    def recharge(self, channel: Channel, amount: int) -> None:
        _, bonus = best_bonus(RULES, amount, channel, "GOLD", NOW)
        self.write(recharge_entries(channel, amount, bonus))
        self.recharged_paid += amount
        self.granted_bonus += bonus

    def spend(self, amount: int, order: SpendOrder, *, hold: bool) -> None:
        if amount > self.balances.available:
            with pytest.raises(FailedPrecondition) as refused:
                split_spend(self.balances.spendable, amount, order)
            assert refused.value.reason == "INSUFFICIENT_BALANCE"
            return
        funds = split_spend(self.balances.spendable, amount, order)
        assert funds.total == amount
        if hold:
            self.write(hold_entries(funds))
            self.holds.append(funds)
        else:
            self.write(debit_entries(funds))
            self.sold += funds
            self.payments.append(Payment(funds))

    def capture(self, index: int, amount: int) -> None:
        held = self.holds.pop(index)
        part = split_capture(held, amount)
        assert part.total == min(amount, held.total)
        captured, released = capture_entries(part), release_entries(held - part)
        assert balanced(captured)
        assert balanced(released)
        self.write(captured + released)
        self.sold += part
        self.payments.append(Payment(part))

    def release(self, index: int) -> None:
        self.write(release_entries(self.holds.pop(index)))

    def refund(self, index: int, amount: int) -> None:
        payment = self.payments[index]
        part = split_refund(payment.taken, payment.refunded, amount)
        assert part.total == amount
        self.write(refund_entries(part))
        payment.refunded += part
        self.refunded += part
        assert 0 <= payment.refunded.paid <= payment.taken.paid
        assert 0 <= payment.refunded.bonus <= payment.taken.bonus
        if payment.left == 0:
            assert payment.refunded == payment.taken

    def settle(self, *, pay_out: bool) -> None:
        while self.holds:
            self.release(0)
        self.check()
        left = self.balances
        if left.available:
            self.write(settlement_entries(left, pay_out=pay_out))
        else:
            assert settlement_entries(left, pay_out=pay_out) == []
        if pay_out:
            self.paid_out += left.paid
            self.forfeited += Funds(0, left.bonus)
        else:
            self.forfeited += left.spendable
        assert self.balances == Balances()


amounts = st.integers(0, 20_000)
starting_balances = st.builds(Balances, amounts, amounts, amounts, amounts)


def open_ledger(start: Balances) -> Ledger:
    """A ledger whose journal brings the account to ``start``: one recharge
    of everything, then one hold of what ``start`` has on hold."""
    ledger = Ledger()
    paid, bonus = start.paid + start.held_paid, start.bonus + start.held_bonus
    if paid or bonus:
        ledger.write(recharge_entries(Channel.STORE_TERMINAL, paid, bonus))
        ledger.recharged_paid += paid
        ledger.granted_bonus += bonus
    held = Funds(start.held_paid, start.held_bonus)
    if held.total:
        ledger.write(hold_entries(held))
        ledger.holds.append(held)
    ledger.check()
    assert ledger.balances == start
    return ledger


@settings(max_examples=150)
@given(
    start=starting_balances,
    order=st.sampled_from(SpendOrder),
    steps=st.integers(0, 30),
    pay_out=st.booleans(),
    data=st.data(),
)
def test_every_sequence_of_movements_keeps_the_journal_sound(
    start: Balances, order: SpendOrder, steps: int, pay_out: bool, data: st.DataObject
) -> None:
    ledger = open_ledger(start)
    for _ in range(steps):
        possible = ["recharge", "hold", "debit"]
        if ledger.holds:
            possible += ["capture", "release"]
        refundable = [i for i, p in enumerate(ledger.payments) if p.left]
        if refundable:
            possible.append("refund")
        match data.draw(st.sampled_from(possible)):
            case "recharge":
                channel = data.draw(st.sampled_from(Channel))
                ledger.recharge(channel, data.draw(st.integers(1, 5_000)))
            case "hold" | "debit" as kind:
                # Now and then more than there is, which must be refused.
                amount = data.draw(st.integers(1, ledger.balances.available + 50))
                ledger.spend(amount, order, hold=kind == "hold")
            case "capture":
                index = data.draw(st.integers(0, len(ledger.holds) - 1))
                amount = data.draw(st.integers(1, ledger.holds[index].total + 10))
                ledger.capture(index, amount)
            case "release":
                ledger.release(data.draw(st.integers(0, len(ledger.holds) - 1)))
            case "refund":
                index = data.draw(st.sampled_from(refundable))
                ledger.refund(index, data.draw(st.integers(1, ledger.payments[index].left)))
        ledger.check()
    ledger.settle(pay_out=pay_out)
    ledger.check()


def test_the_opening_and_a_simple_day_by_hand() -> None:
    ledger = open_ledger(Balances(paid=1_000, bonus=200))
    ledger.recharge(Channel.BANK_CARD, 1_000)  # B1 gives 100, B2 50: B1 wins.
    assert ledger.balances == Balances(paid=2_000, bonus=300)
    ledger.spend(500, SpendOrder.BONUS_FIRST, hold=True)
    assert ledger.balances == Balances(paid=1_800, bonus=0, held_paid=200, held_bonus=300)
    ledger.capture(0, 250)  # 250 of 500 held: 150 bonus (300*250/500), 100 paid.
    assert ledger.payments[0].taken == Funds(100, 150)
    assert ledger.balances == Balances(paid=1_900, bonus=150)
    ledger.refund(0, 250)
    assert ledger.balances == Balances(paid=2_000, bonus=300)
    ledger.check()
    ledger.settle(pay_out=True)
    assert (ledger.paid_out, ledger.forfeited) == (2_000, Funds(0, 300))
    ledger.check()


def test_an_overdraft_makes_the_balances_invalid() -> None:
    balances = Balances(paid=100, bonus=50)
    assert not balances.after(debit_entries(Funds(101, 0))).valid
    assert not balances.after(hold_entries(Funds(0, 51))).valid
    assert not Balances(held_paid=10).after(release_entries(Funds(11, 0))).valid
    assert balances.after(debit_entries(Funds(100, 50))) == Balances()


def test_chain_books_do_not_touch_the_balances() -> None:
    balances = Balances(1, 2, 3, 4)
    chain = [Entry(Book.SALES_PAID, 5), Entry(Book.FUNDING, -5, Channel.BANK_CARD)]
    assert balances.after(chain) == balances
    assert balances.available == 3
    assert balances.held == 7
    assert balances.spendable == Funds(1, 2)


def test_movements_write_no_zero_lines() -> None:
    assert recharge_entries(Channel.BANK_CARD, 100, 0) == [
        Entry(Book.PAID, 100),
        Entry(Book.FUNDING, -100, Channel.BANK_CARD),
    ]
    assert hold_entries(Funds()) == []
    assert settlement_entries(Balances(bonus=7), pay_out=True) == [
        Entry(Book.BONUS, -7),
        Entry(Book.FORFEITED, 7),
    ]
    assert settlement_entries(Balances(paid=7), pay_out=False) == [
        Entry(Book.PAID, -7),
        Entry(Book.FORFEITED, 7),
    ]


# --- split_spend -------------------------------------------------------------

funds = st.builds(Funds, st.integers(0, MAX_AMOUNT), st.integers(0, MAX_AMOUNT))


@given(spendable=funds, order=st.sampled_from(SpendOrder), data=st.data())
def test_a_spend_takes_the_amount_and_never_more_than_either_side_has(
    spendable: Funds, order: SpendOrder, data: st.DataObject
) -> None:
    amount = data.draw(st.integers(0, spendable.total))
    part = split_spend(spendable, amount, order)
    assert part.total == amount
    assert 0 <= part.paid <= spendable.paid
    assert 0 <= part.bonus <= spendable.bonus


@given(spendable=funds, data=st.data())
def test_bonus_first_spends_bonus_funds_first(spendable: Funds, data: st.DataObject) -> None:
    amount = data.draw(st.integers(0, spendable.total))
    assert split_spend(spendable, amount, SpendOrder.BONUS_FIRST).bonus == min(
        amount, spendable.bonus
    )


@given(spendable=funds, data=st.data())
def test_paid_first_spends_paid_funds_first(spendable: Funds, data: st.DataObject) -> None:
    amount = data.draw(st.integers(0, spendable.total))
    assert split_spend(spendable, amount, SpendOrder.PAID_FIRST).paid == min(amount, spendable.paid)


@given(spendable=funds, data=st.data())
def test_proportional_is_within_one_minor_unit_of_the_exact_share(
    spendable: Funds, data: st.DataObject
) -> None:
    amount = data.draw(st.integers(0, spendable.total))
    part = split_spend(spendable, amount, SpendOrder.PROPORTIONAL)
    if spendable.total:
        exact_bonus = Fraction(amount * spendable.bonus, spendable.total)
        # Rounded down on the bonus side, so the paid side always suffices.
        assert 0 <= exact_bonus - part.bonus < 1
        assert abs(part.paid - (amount - exact_bonus)) < 1
    else:
        assert part == Funds()


def test_spend_examples() -> None:
    spendable = Funds(paid=700, bonus=300)
    assert split_spend(spendable, 400, SpendOrder.BONUS_FIRST) == Funds(100, 300)
    assert split_spend(spendable, 400, SpendOrder.PAID_FIRST) == Funds(400, 0)
    assert split_spend(spendable, 400, SpendOrder.PROPORTIONAL) == Funds(280, 120)
    # The bonus side rounds down: 1 of (2 paid, 1 bonus) takes 1*1//3 = 0 bonus.
    assert split_spend(Funds(2, 1), 1, SpendOrder.PROPORTIONAL) == Funds(1, 0)
    assert split_spend(Funds(1, 2), 1, SpendOrder.PROPORTIONAL) == Funds(1, 0)
    assert split_spend(Funds(1, 2), 2, SpendOrder.PROPORTIONAL) == Funds(1, 1)
    for order in SpendOrder:
        assert split_spend(spendable, 1_000, order) == spendable


@given(spendable=funds, order=st.sampled_from(SpendOrder), extra=st.integers(1, 10**6))
def test_spending_more_than_is_available_is_refused(
    spendable: Funds, order: SpendOrder, extra: int
) -> None:
    amount = spendable.total + extra
    with pytest.raises(FailedPrecondition) as refused:
        split_spend(spendable, amount, order)
    assert refused.value.reason == "INSUFFICIENT_BALANCE"
    assert refused.value.metadata == {
        "available_minor_units": str(spendable.total),
        "amount_minor_units": str(amount),
    }


# --- split_capture -----------------------------------------------------------

holds = funds.filter(lambda f: f.total > 0)


@given(held=holds, data=st.data())
def test_a_partial_capture_takes_the_amount_in_the_holds_mix(
    held: Funds, data: st.DataObject
) -> None:
    amount = data.draw(st.integers(1, held.total))
    part = split_capture(held, amount)
    assert part.total == amount
    assert 0 <= part.paid <= held.paid
    assert 0 <= part.bonus <= held.bonus
    assert abs(part.bonus - Fraction(amount * held.bonus, held.total)) < 1
    rest = held - part
    assert rest.paid >= 0
    assert rest.bonus >= 0


@given(held=holds, extra=st.integers(0, 1_000))
def test_capturing_the_whole_hold_or_more_takes_the_hold(held: Funds, extra: int) -> None:
    assert split_capture(held, held.total + extra) == held


def test_capture_examples() -> None:
    assert split_capture(Funds(200, 300), 250) == Funds(100, 150)
    assert split_capture(Funds(2, 1), 2) == Funds(2, 0)
    assert split_capture(Funds(0, 10), 4) == Funds(0, 4)
    assert split_capture(Funds(10, 0), 4) == Funds(4, 0)


# --- split_refund ------------------------------------------------------------

payments = st.builds(Funds, st.integers(0, 10**9), st.integers(0, 10**9)).filter(
    lambda f: f.total > 0
)


@st.composite
def refunds_in_parts(draw: st.DrawFn) -> tuple[Funds, list[int]]:
    """A payment and amounts that add up to all of it."""
    taken = draw(payments)
    cuts: list[int] = []
    if taken.total > 1:
        cuts = draw(st.lists(st.integers(1, taken.total - 1), max_size=8, unique=True))
    points = [0, *sorted(cuts), taken.total]
    return taken, [b - a for a, b in itertools.pairwise(points)]


@given(case=refunds_in_parts())
def test_refunds_in_parts_give_back_exactly_what_the_payment_took(
    case: tuple[Funds, list[int]],
) -> None:
    taken, parts = case
    refunded = Funds()
    for amount in parts:
        part = split_refund(taken, refunded, amount)
        assert part.total == amount
        assert part.paid >= 0
        assert part.bonus >= 0
        refunded += part
        assert refunded.paid <= taken.paid
        assert refunded.bonus <= taken.bonus
        # Cumulative: where a refund ends does not depend on the parts taken.
        if refunded.total < taken.total:
            assert refunded.bonus == refunded.total * taken.bonus // taken.total
    assert refunded == taken
    with pytest.raises(FailedPrecondition) as refused:
        split_refund(taken, refunded, 1)
    assert refused.value.reason == "REFUND_EXCEEDS_PAYMENT"


@given(taken=payments)
def test_one_whole_refund_gives_back_the_payment(taken: Funds) -> None:
    assert split_refund(taken, Funds(), taken.total) == taken


@given(taken=payments, data=st.data())
def test_refunding_more_than_is_left_or_nothing_is_refused(
    taken: Funds, data: st.DataObject
) -> None:
    already = data.draw(st.integers(0, taken.total))
    refunded = split_refund(taken, Funds(), already) if already else Funds()
    left = taken.total - already
    for amount in (left + 1, left + data.draw(st.integers(1, 10**6)), 0, -1):
        with pytest.raises(FailedPrecondition) as refused:
            split_refund(taken, refunded, amount)
        assert refused.value.reason == "REFUND_EXCEEDS_PAYMENT"
        assert refused.value.metadata["left_minor_units"] == str(left)


def test_refund_examples() -> None:
    taken = Funds(paid=2, bonus=1)
    one = split_refund(taken, Funds(), 1)
    two = split_refund(taken, one, 1)
    three = split_refund(taken, one + two, 1)
    assert (one, two, three) == (Funds(1, 0), Funds(1, 0), Funds(0, 1))
    with pytest.raises(FailedPrecondition):
        split_refund(Funds(), Funds(), 1)


# --- recharge bonuses ----------------------------------------------------------


def test_below_the_threshold_there_is_no_bonus() -> None:
    fixed = rule(threshold=1_000, fixed_bonus=100)
    assert fixed.bonus_for(999) == 0
    assert fixed.bonus_for(1_000) == 100
    assert fixed.bonus_for(50_000) == 100
    bps = rule(threshold=1_000, fixed_bonus=None, bonus_bps=1_000)
    assert bps.bonus_for(999) == 0
    assert bps.bonus_for(1_000) == 100


def test_a_share_is_rounded_down_and_capped() -> None:
    capped = rule(threshold=1, fixed_bonus=None, bonus_bps=1_000, max_bonus=500)
    assert capped.bonus_for(1_009) == 100
    assert capped.bonus_for(5_000) == 500
    assert capped.bonus_for(90_000) == 500
    uncapped = dataclasses.replace(capped, max_bonus=None)
    assert uncapped.bonus_for(90_000) == 9_000


def test_the_largest_bonus_wins_and_rules_do_not_add_up() -> None:
    small = rule(rule_id="B1", fixed_bonus=100)
    large = rule(rule_id="B2", fixed_bonus=None, bonus_bps=2_000, starts_at=NOW)
    assert best_bonus([small, large], 1_000, Channel.BANK_CARD, "GOLD", NOW) == (large, 200)
    assert best_bonus([large, small], 400, Channel.BANK_CARD, "GOLD", NOW) == (None, 0)
    assert best_bonus([], 1_000, Channel.BANK_CARD, "GOLD", NOW) == (None, 0)


def test_a_tie_goes_to_the_oldest_rule() -> None:
    old = rule(rule_id="BZ", starts_at=LAST_YEAR)
    new = rule(rule_id="BA", starts_at=LAST_YEAR + dt.timedelta(days=1))
    for rules in ([old, new], [new, old]):
        assert best_bonus(rules, 1_000, Channel.BANK_CARD, "GOLD", NOW) == (old, 100)
    # Started at the same moment: the lower id is the older.
    twin = rule(rule_id="BA", starts_at=LAST_YEAR)
    for rules in ([old, twin], [twin, old]):
        assert best_bonus(rules, 1_000, Channel.BANK_CARD, "GOLD", NOW) == (twin, 100)


def test_a_rule_applies_only_within_its_window() -> None:
    windowed = rule(starts_at=NOW, ends_at=NOW + dt.timedelta(days=1))
    assert not windowed.in_force(NOW - dt.timedelta(microseconds=1))
    assert windowed.in_force(NOW)
    assert not windowed.in_force(NOW + dt.timedelta(days=1))
    for at in (NOW - dt.timedelta(seconds=1), NOW + dt.timedelta(days=2)):
        assert best_bonus([windowed], 1_000, Channel.BANK_CARD, "GOLD", at) == (None, 0)
    assert rule(ends_at=None).in_force(NOW + dt.timedelta(days=10_000))


def test_a_rule_applies_only_to_its_channels_and_programs() -> None:
    narrow = rule(channels=frozenset({Channel.PARTNER_CARD}), program_ids=frozenset({"GOLD"}))
    assert narrow.applies(Channel.PARTNER_CARD, "GOLD", NOW)
    assert not narrow.applies(Channel.BANK_CARD, "GOLD", NOW)
    assert not narrow.applies(Channel.PARTNER_CARD, "SILVER", NOW)
    assert best_bonus([narrow], 1_000, Channel.BANK_CARD, "GOLD", NOW) == (None, 0)
    assert best_bonus([narrow], 1_000, Channel.PARTNER_CARD, "SILVER", NOW) == (None, 0)


@pytest.mark.parametrize("channel", list(Channel))
def test_no_channels_means_every_channel_but_enterprise_batches(channel: Channel) -> None:
    everywhere = rule()
    assert everywhere.applies(channel, "ANY", NOW) == (channel != Channel.ENTERPRISE_BATCH)
    named = rule(channels=frozenset({channel}))
    assert named.applies(channel, "ANY", NOW)


@given(
    threshold=st.integers(1, 10**6),
    fixed_bonus=st.none() | st.integers(1, 10**6),
    bps=st.integers(1, 10_000),
    max_bonus=st.none() | st.integers(1, 10**6),
    a=st.integers(0, 10**9),
    b=st.integers(0, 10**9),
)
def test_a_rules_bonus_never_falls_as_the_amount_grows(
    threshold: int, fixed_bonus: int | None, bps: int, max_bonus: int | None, a: int, b: int
) -> None:
    if fixed_bonus is None:
        one = rule(threshold=threshold, fixed_bonus=None, bonus_bps=bps, max_bonus=max_bonus)
    else:
        one = rule(threshold=threshold, fixed_bonus=fixed_bonus)
    low, high = sorted((a, b))
    assert 0 <= one.bonus_for(low) <= one.bonus_for(high)
    if fixed_bonus is None:
        # A share of at most the whole, never more than the cap.
        assert one.bonus_for(high) <= high
        if max_bonus is not None:
            assert one.bonus_for(high) <= max_bonus


def test_a_valid_bonus_rule_passes() -> None:
    assert check_bonus_rule(rule()) == rule()
    share = rule(fixed_bonus=None, bonus_bps=10_000, max_bonus=MAX_AMOUNT)
    assert check_bonus_rule(share) == share


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"name": "  "}, {"bonus_rule.name"}),
        ({"name": "x" * 101}, {"bonus_rule.name"}),
        ({"threshold": 0}, {"bonus_rule.threshold"}),
        ({"threshold": MAX_AMOUNT + 1}, {"bonus_rule.threshold"}),
        ({"fixed_bonus": None}, {"bonus_rule.fixed_bonus"}),
        ({"bonus_bps": 100}, {"bonus_rule.fixed_bonus"}),
        ({"fixed_bonus": 0}, {"bonus_rule.fixed_bonus"}),
        ({"fixed_bonus": None, "bonus_bps": 0}, {"bonus_rule.bonus_bps"}),
        ({"fixed_bonus": None, "bonus_bps": 10_001}, {"bonus_rule.bonus_bps"}),
        ({"max_bonus": 50}, {"bonus_rule.max_bonus"}),
        ({"fixed_bonus": None, "bonus_bps": 100, "max_bonus": 0}, {"bonus_rule.max_bonus"}),
        ({"ends_at": LAST_YEAR}, {"bonus_rule.end_time"}),
        ({"ends_at": LAST_YEAR - dt.timedelta(seconds=1)}, {"bonus_rule.end_time"}),
    ],
)
def test_bad_bonus_rules_name_the_field(changes: dict[str, object], fields: set[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_bonus_rule(rule(**changes))
    assert fields_of(caught.value) == fields


def test_every_problem_of_a_bonus_rule_is_reported_under_the_prefix() -> None:
    bad = rule(name="", threshold=-1, fixed_bonus=5, bonus_bps=0, max_bonus=1, ends_at=LAST_YEAR)
    with pytest.raises(InvalidArgument) as caught:
        check_bonus_rule(bad, prefix="rule")
    assert fields_of(caught.value) == {
        "rule.name",
        "rule.threshold",
        "rule.fixed_bonus",
        "rule.bonus_bps",
        "rule.end_time",
    }


# --- the policy ------------------------------------------------------------------


def policy(**changes: object) -> Policy:
    return dataclasses.replace(default_policy("CNY", "Asia/Shanghai"), **changes)  # type: ignore[arg-type]


def with_rules(*rules: ChannelRule, **changes: object) -> Policy:
    return policy(channels={r.channel: r for r in rules}, **changes)


def test_the_default_policy_is_valid_and_open() -> None:
    default = default_policy("CNY")
    assert check_policy(default) == default
    assert default.spend_order == SpendOrder.BONUS_FIRST
    assert all(default.rule(c).enabled for c in Channel)
    assert default.max_balance is None
    for channel in Channel:
        check_recharge_allowed(default, channel, MAX_AMOUNT, store_id="S1", operator_id="U1")


def test_a_policy_at_its_bounds_is_valid() -> None:
    for ttl in (dt.timedelta(minutes=1), LONGEST_HOLD_TTL):
        check_policy(policy(max_hold_ttl=ttl, max_balance=MAX_AMOUNT, daily_spend_limit=1))
    check_policy(
        with_rules(
            ChannelRule(Channel.STORE_TERMINAL, store_ids=frozenset({"S1"})),
            ChannelRule(Channel.BANK_CARD, store_ids=frozenset({"S1"})),
            ChannelRule(Channel.PARTNER_CARD, min_amount=100, max_amount=100),
        )
    )


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"currency": "cny"}, {"policy.currency_code"}),
        ({"currency": "CN"}, {"policy.currency_code"}),
        ({"currency": "C1Y"}, {"policy.currency_code"}),
        ({"currency": "ÇNY"}, {"policy.currency_code"}),
        ({"time_zone": "Mars/Olympus"}, {"policy.time_zone"}),
        ({"time_zone": ""}, {"policy.time_zone"}),
        ({"time_zone": "../etc/passwd"}, {"policy.time_zone"}),
        ({"time_zone": "Asia"}, {"policy.time_zone"}),
        ({"max_balance": 0}, {"policy.max_balance"}),
        ({"daily_spend_limit": MAX_AMOUNT + 1}, {"policy.daily_spend_limit"}),
        ({"daily_recharge_limit": -5}, {"policy.daily_recharge_limit"}),
        ({"max_hold_ttl": dt.timedelta(seconds=59)}, {"policy.max_hold_ttl"}),
        ({"max_hold_ttl": LONGEST_HOLD_TTL + dt.timedelta(seconds=1)}, {"policy.max_hold_ttl"}),
    ],
)
def test_bad_policies_name_the_field(changes: dict[str, object], fields: set[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_policy(policy(**changes))
    assert fields_of(caught.value) == fields


def test_bad_channel_rules_name_the_channel_by_position() -> None:
    bad = with_rules(
        ChannelRule(Channel.STORE_TERMINAL, store_ids=frozenset({"S1"})),
        ChannelRule(Channel.ONLINE_SELF_SERVICE, store_ids=frozenset({"S1"})),
        ChannelRule(Channel.PARTNER_CARD, min_amount=200, max_amount=100),
        ChannelRule(Channel.BANK_CARD, min_amount=0),
    )
    with pytest.raises(InvalidArgument) as caught:
        check_policy(bad, prefix="p")
    assert fields_of(caught.value) == {
        "p.channels[1].store_ids",
        "p.channels[2].max_amount",
        "p.channels[3].min_amount",
    }
    mismatched = policy(channels={Channel.BANK_CARD: ChannelRule(Channel.PARTNER_CARD)})
    with pytest.raises(InvalidArgument) as caught:
        check_policy(mismatched)
    assert fields_of(caught.value) == {"policy.channels[0].channel"}


def refusal(
    p: Policy, channel: Channel, amount: int = 1_000, store_id: str = "S1", operator_id: str = "U1"
) -> FailedPrecondition:
    with pytest.raises(FailedPrecondition) as refused:
        check_recharge_allowed(p, channel, amount, store_id=store_id, operator_id=operator_id)
    return refused.value


def test_a_closed_or_unnamed_channel_refuses_recharges() -> None:
    closed = with_rules(ChannelRule(Channel.BANK_CARD, enabled=False))
    for channel in (Channel.BANK_CARD, Channel.PARTNER_CARD):
        refused = refusal(closed, channel)
        assert refused.reason == "RECHARGE_CHANNEL_NOT_ALLOWED"
        assert refused.metadata == {"channel": channel.value, "store_id": "S1"}


def test_a_till_recharge_needs_a_designated_store() -> None:
    only_s1 = with_rules(
        ChannelRule(Channel.STORE_TERMINAL, store_ids=frozenset({"S1"})),
        ChannelRule(Channel.BANK_CARD),
        ChannelRule(Channel.ONLINE_SELF_SERVICE),
    )
    check_recharge_allowed(only_s1, Channel.STORE_TERMINAL, 1, store_id="S1", operator_id="")
    check_recharge_allowed(only_s1, Channel.BANK_CARD, 1, store_id="S9", operator_id="")
    # Not at a till: no store needed.
    check_recharge_allowed(only_s1, Channel.ONLINE_SELF_SERVICE, 1, store_id="", operator_id="")
    for channel, store_id in [
        (Channel.STORE_TERMINAL, "S2"),
        (Channel.STORE_TERMINAL, ""),
        (Channel.BANK_CARD, ""),
    ]:
        assert refusal(only_s1, channel, store_id=store_id).reason == (
            "RECHARGE_CHANNEL_NOT_ALLOWED"
        )


def test_a_channel_may_be_kept_to_designated_logins() -> None:
    only_u1 = with_rules(ChannelRule(Channel.ENTERPRISE_BATCH, operator_ids=frozenset({"U1"})))
    check_recharge_allowed(only_u1, Channel.ENTERPRISE_BATCH, 1, store_id="", operator_id="U1")
    for operator_id in ("U2", ""):
        refused = refusal(only_u1, Channel.ENTERPRISE_BATCH, operator_id=operator_id)
        assert refused.reason == "RECHARGE_CHANNEL_NOT_ALLOWED"


def test_a_channel_takes_amounts_within_its_range() -> None:
    ranged = with_rules(ChannelRule(Channel.BANK_CARD, min_amount=100, max_amount=50_000))
    for amount in (100, 50_000):
        check_recharge_allowed(ranged, Channel.BANK_CARD, amount, store_id="S1", operator_id="")
    for amount in (99, 50_001):
        refused = refusal(ranged, Channel.BANK_CARD, amount)
        assert refused.reason == "RECHARGE_AMOUNT_OUT_OF_RANGE"
        assert refused.metadata["min_minor_units"] == "100"
        assert refused.metadata["max_minor_units"] == "50000"
    only_low = with_rules(ChannelRule(Channel.BANK_CARD, min_amount=100))
    check_recharge_allowed(only_low, Channel.BANK_CARD, MAX_AMOUNT, store_id="S1", operator_id="")
    assert refusal(only_low, Channel.BANK_CARD, 99).metadata["max_minor_units"] == ""


def test_the_balance_cap_counts_what_is_on_hold() -> None:
    capped = policy(max_balance=10_000)
    balances = Balances(paid=4_000, bonus=1_000, held_paid=2_000, held_bonus=1_000)
    check_max_balance(capped, balances, 2_000)
    with pytest.raises(FailedPrecondition) as refused:
        check_max_balance(capped, balances, 2_001)
    assert refused.value.reason == "MAX_BALANCE_EXCEEDED"
    assert refused.value.metadata["room_minor_units"] == "2000"
    check_max_balance(policy(), balances, MAX_AMOUNT)


def test_the_daily_recharge_limit_allows_its_exact_boundary() -> None:
    limited = policy(daily_recharge_limit=5_000)
    check_daily_recharge(limited, 3_000, 2_000)
    with pytest.raises(FailedPrecondition) as refused:
        check_daily_recharge(limited, 3_000, 2_001)
    assert refused.value.reason == "DAILY_LIMIT_EXCEEDED"
    assert refused.value.metadata == {"limit_minor_units": "5000", "left_minor_units": "2000"}
    check_daily_recharge(policy(), 10**9, MAX_AMOUNT)


def test_no_negative_room_is_reported_after_the_limit_was_lowered() -> None:
    # Recharged 6000 today, then the chain lowered its limit to 5000.
    with pytest.raises(FailedPrecondition) as refused:
        check_daily_recharge(policy(daily_recharge_limit=5_000), 6_000, 1)
    assert refused.value.metadata["left_minor_units"] == "0"
    with pytest.raises(FailedPrecondition) as refused:
        check_max_balance(policy(max_balance=5_000), Balances(paid=6_000), 1)
    assert refused.value.metadata["room_minor_units"] == "0"


def test_spend_limits_allow_their_exact_boundaries() -> None:
    limited = policy(daily_spend_limit=5_000)
    check_spend_limits(
        limited, 2_000, spent_today=3_000, card_monthly_limit=10_000, spent_this_month=8_000
    )
    check_spend_limits(
        policy(), MAX_AMOUNT, spent_today=10**9, card_monthly_limit=None, spent_this_month=10**9
    )
    cases = [
        # (amount, spent today, spent this month, reason, left)
        (2_001, 3_000, 0, "DAILY_LIMIT_EXCEEDED", "2000"),
        (1, 6_000, 0, "DAILY_LIMIT_EXCEEDED", "0"),
        (2_001, 0, 8_000, "SPENDING_LIMIT_EXCEEDED", "2000"),
        (1, 0, 12_000, "SPENDING_LIMIT_EXCEEDED", "0"),
        # Both passed: the daily limit is reported.
        (9_000, 0, 8_000, "DAILY_LIMIT_EXCEEDED", "5000"),
    ]
    for amount, today, month, reason, left in cases:
        with pytest.raises(FailedPrecondition) as refused:
            check_spend_limits(
                limited,
                amount,
                spent_today=today,
                card_monthly_limit=10_000,
                spent_this_month=month,
            )
        assert refused.value.reason == reason
        assert refused.value.metadata["left_minor_units"] == left


def test_hold_ttl_defaults_and_bounds() -> None:
    assert hold_ttl(policy(), None) == DEFAULT_HOLD_TTL
    short = policy(max_hold_ttl=dt.timedelta(minutes=5))
    assert hold_ttl(short, None) == dt.timedelta(minutes=5)
    for asked in (dt.timedelta(seconds=30), dt.timedelta(minutes=5)):
        assert hold_ttl(short, asked) == asked
    for asked in (dt.timedelta(seconds=29), dt.timedelta(minutes=5, seconds=1), -DEFAULT_HOLD_TTL):
        with pytest.raises(InvalidArgument) as caught:
            hold_ttl(short, asked)
        assert fields_of(caught.value) == {"ttl"}
        assert "300 seconds" in caught.value.violations[0].description


@pytest.mark.parametrize(
    ("time_zone", "at", "day"),
    [
        ("Asia/Shanghai", dt.datetime(2026, 3, 1, 15, 59, tzinfo=dt.UTC), dt.date(2026, 3, 1)),
        ("Asia/Shanghai", dt.datetime(2026, 3, 1, 16, 0, tzinfo=dt.UTC), dt.date(2026, 3, 2)),
        ("America/New_York", dt.datetime(2026, 3, 2, 4, 59, tzinfo=dt.UTC), dt.date(2026, 3, 1)),
        ("America/New_York", dt.datetime(2026, 3, 2, 5, 0, tzinfo=dt.UTC), dt.date(2026, 3, 2)),
        # Summer time: midnight in New York is 04:00 UTC.
        ("America/New_York", dt.datetime(2026, 7, 2, 4, 0, tzinfo=dt.UTC), dt.date(2026, 7, 2)),
        ("UTC", dt.datetime(2026, 3, 1, 23, 59, tzinfo=dt.UTC), dt.date(2026, 3, 1)),
        (
            "Asia/Shanghai",
            dt.datetime(2026, 3, 1, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            dt.date(2026, 3, 2),
        ),
    ],
)
def test_the_local_day_turns_at_local_midnight(
    time_zone: str, at: dt.datetime, day: dt.date
) -> None:
    assert policy(time_zone=time_zone).local_day(at) == day


# --- request checks and ids --------------------------------------------------------


def test_amounts_are_positive_bounded_and_in_the_chains_currency() -> None:
    p = policy()
    assert check_amount(MAX_AMOUNT, "CNY", p) == MAX_AMOUNT
    with pytest.raises(InvalidArgument) as caught:
        check_amount(0, "USD", p, "price")
    assert fields_of(caught.value) == {"price.currency_code", "price.minor_units"}
    with pytest.raises(InvalidArgument) as caught:
        check_amount(MAX_AMOUNT + 1, "CNY", p)
    assert fields_of(caught.value) == {"amount.minor_units"}


def test_texts_are_trimmed_and_bounded() -> None:
    assert check_text("  till 4 ", "note", 10) == "till 4"
    assert check_text("  ", "note", 10) == ""
    with pytest.raises(InvalidArgument) as caught:
        check_text("  ", "reference", 10, required=True)
    assert fields_of(caught.value) == {"reference"}
    with pytest.raises(InvalidArgument):
        check_text("x" * 11, "note", 10)


def test_ids_have_their_letter_and_fifteen_crockford_characters() -> None:
    for make, letter in [
        (new_movement_id, "M"),
        (new_hold_id, "H"),
        (new_bonus_rule_id, "B"),
        (new_batch_id, "R"),
    ]:
        ids = {make() for _ in range(50)}
        assert len(ids) == 50
        for new_id in ids:
            assert len(new_id) == 16
            assert new_id[0] == letter
            assert set(new_id[1:]) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
