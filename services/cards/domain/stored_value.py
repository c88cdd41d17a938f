"""Stored value: the rules of the ledger, the policy and the bonus rules.

An account keeps four balances, each never negative: paid and bonus funds
available, and paid and bonus funds on hold. Every movement is a set of
journal entries that sums to zero: what the account's books gain, a chain
book (the funding channel, the bonus budget, sales, payouts, forfeits)
loses, and the other way round. The functions here decide the amounts and
the entries; the store writes them with conditional updates so that
concurrent movements cannot overdraw.
"""

from __future__ import annotations

import datetime as dt
import enum
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, Violations
from chassis.ids import random_id

MAX_REFERENCE_LENGTH = 100
MAX_NOTE_LENGTH = 200
DEFAULT_HOLD_TTL = dt.timedelta(minutes=15)
DEFAULT_MAX_HOLD_TTL = dt.timedelta(hours=24)
# A hold for longer than a week is a layaway, not a checkout.
LONGEST_HOLD_TTL = dt.timedelta(days=7)
# Large enough for any real balance, small enough that sums of many never
# leave a 64-bit integer.
MAX_AMOUNT = 10**12


def _new_id(letter: str) -> str:
    return random_id(letter, 15)


def new_movement_id() -> str:
    return _new_id("M")


def new_hold_id() -> str:
    return _new_id("H")


def new_bonus_rule_id() -> str:
    return _new_id("B")


def new_batch_id() -> str:
    return _new_id("R")


class Channel(enum.StrEnum):
    STORE_TERMINAL = "store_terminal"
    BANK_CARD = "bank_card"
    PARTNER_CARD = "partner_card"
    ONLINE_SELF_SERVICE = "online_self_service"
    ENTERPRISE_BATCH = "enterprise_batch"


# Used at a till, so a policy may name the stores where they may be used.
TILL_CHANNELS = frozenset({Channel.STORE_TERMINAL, Channel.BANK_CARD})
# Channels whose payment is made elsewhere and must be quoted.
REFERENCED_CHANNELS = frozenset(
    {
        Channel.BANK_CARD,
        Channel.PARTNER_CARD,
        Channel.ONLINE_SELF_SERVICE,
        Channel.ENTERPRISE_BATCH,
    }
)


class SpendOrder(enum.StrEnum):
    BONUS_FIRST = "bonus_first"
    PAID_FIRST = "paid_first"
    PROPORTIONAL = "proportional"


class MovementKind(enum.StrEnum):
    RECHARGE = "recharge"
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"
    DEBIT = "debit"
    REFUND = "refund"
    PAYOUT = "payout"
    FORFEIT = "forfeit"


class HoldState(enum.StrEnum):
    HELD = "held"
    CAPTURED = "captured"
    VOIDED = "voided"
    EXPIRED = "expired"


class Book(enum.StrEnum):
    """The ledger's books. The first four are an account's own (their sums
    per account are its stored balances); the rest are the chain's."""

    PAID = "paid"
    BONUS = "bonus"
    HELD_PAID = "held_paid"
    HELD_BONUS = "held_bonus"
    # Money received through a channel: one book per channel.
    FUNDING = "funding"
    # The chain's own money given as recharge bonuses.
    BONUS_GRANTED = "bonus_granted"
    # What purchases took (paid and bonus funds apart: bonus is no revenue).
    SALES_PAID = "sales_paid"
    SALES_BONUS = "sales_bonus"
    # Paid funds handed back to a member when their last card was cancelled.
    PAYOUT = "payout"
    FORFEITED = "forfeited"


ACCOUNT_BOOKS = (Book.PAID, Book.BONUS, Book.HELD_PAID, Book.HELD_BONUS)


@dataclass(frozen=True)
class Funds:
    """An amount split into paid and bonus funds (minor units)."""

    paid: int = 0
    bonus: int = 0

    @property
    def total(self) -> int:
        return self.paid + self.bonus

    def __add__(self, other: Funds) -> Funds:
        return Funds(self.paid + other.paid, self.bonus + other.bonus)

    def __sub__(self, other: Funds) -> Funds:
        return Funds(self.paid - other.paid, self.bonus - other.bonus)

    def __neg__(self) -> Funds:
        return Funds(-self.paid, -self.bonus)


@dataclass(frozen=True)
class Balances:
    paid: int = 0
    bonus: int = 0
    held_paid: int = 0
    held_bonus: int = 0

    @property
    def available(self) -> int:
        return self.paid + self.bonus

    @property
    def held(self) -> int:
        return self.held_paid + self.held_bonus

    @property
    def spendable(self) -> Funds:
        return Funds(self.paid, self.bonus)

    def by_book(self) -> dict[Book, int]:
        return {
            Book.PAID: self.paid,
            Book.BONUS: self.bonus,
            Book.HELD_PAID: self.held_paid,
            Book.HELD_BONUS: self.held_bonus,
        }

    def after(self, entries: Iterable[Entry]) -> Balances:
        """The balances once the account's entries are applied."""
        books = self.by_book()
        for entry in entries:
            if entry.book in books:
                books[entry.book] += entry.amount
        return Balances(
            books[Book.PAID], books[Book.BONUS], books[Book.HELD_PAID], books[Book.HELD_BONUS]
        )

    @property
    def valid(self) -> bool:
        return min(self.paid, self.bonus, self.held_paid, self.held_bonus) >= 0


@dataclass(frozen=True)
class Entry:
    """One line of the journal. For an account's books a positive amount
    is money the member gains; the chain's books take the other side."""

    book: Book
    amount: int
    # The funding channel, for Book.FUNDING.
    channel: Channel | None = None


def balanced(entries: Sequence[Entry]) -> bool:
    return sum(e.amount for e in entries) == 0


def _nonzero(entries: Iterable[Entry]) -> list[Entry]:
    return [e for e in entries if e.amount != 0]


# --- what a movement writes ------------------------------------------------


def recharge_entries(channel: Channel, paid: int, bonus: int) -> list[Entry]:
    return _nonzero(
        [
            Entry(Book.PAID, paid),
            Entry(Book.FUNDING, -paid, channel),
            Entry(Book.BONUS, bonus),
            Entry(Book.BONUS_GRANTED, -bonus),
        ]
    )


def hold_entries(funds: Funds) -> list[Entry]:
    return _nonzero(
        [
            Entry(Book.PAID, -funds.paid),
            Entry(Book.HELD_PAID, funds.paid),
            Entry(Book.BONUS, -funds.bonus),
            Entry(Book.HELD_BONUS, funds.bonus),
        ]
    )


def release_entries(funds: Funds) -> list[Entry]:
    """Held funds going back to available."""
    return [Entry(e.book, -e.amount) for e in hold_entries(funds)]


def capture_entries(funds: Funds) -> list[Entry]:
    """Held funds going to sales."""
    return _nonzero(
        [
            Entry(Book.HELD_PAID, -funds.paid),
            Entry(Book.SALES_PAID, funds.paid),
            Entry(Book.HELD_BONUS, -funds.bonus),
            Entry(Book.SALES_BONUS, funds.bonus),
        ]
    )


def debit_entries(funds: Funds) -> list[Entry]:
    return _nonzero(
        [
            Entry(Book.PAID, -funds.paid),
            Entry(Book.SALES_PAID, funds.paid),
            Entry(Book.BONUS, -funds.bonus),
            Entry(Book.SALES_BONUS, funds.bonus),
        ]
    )


def refund_entries(funds: Funds) -> list[Entry]:
    return [Entry(e.book, -e.amount) for e in debit_entries(funds)]


def settlement_entries(balances: Balances, *, pay_out: bool) -> list[Entry]:
    """Empties an account whose last card is cancelled: paid funds paid out
    or forfeited, bonus funds forfeited. Nothing may be on hold."""
    return _nonzero(
        [
            Entry(Book.PAID, -balances.paid),
            Entry(Book.PAYOUT if pay_out else Book.FORFEITED, balances.paid),
            Entry(Book.BONUS, -balances.bonus),
            Entry(Book.FORFEITED, balances.bonus),
        ]
    )


# --- which funds pay ---------------------------------------------------------


def insufficient(available: int, amount: int) -> FailedPrecondition:
    return FailedPrecondition(
        "the card's stored value is not enough",
        reason="INSUFFICIENT_BALANCE",
        metadata={"available_minor_units": str(available), "amount_minor_units": str(amount)},
    )


def split_spend(spendable: Funds, amount: int, order: SpendOrder) -> Funds:
    """The paid and bonus funds that pay ``amount``, by the chain's order."""
    if amount > spendable.total:
        raise insufficient(spendable.total, amount)
    if order == SpendOrder.PAID_FIRST:
        paid = min(amount, spendable.paid)
        return Funds(paid, amount - paid)
    if order == SpendOrder.PROPORTIONAL and spendable.total:
        # Rounded down on the bonus side, so the paid side never needs more
        # than there is: amount - floor(amount*bonus/total) <= paid.
        bonus = amount * spendable.bonus // spendable.total
        return Funds(amount - bonus, bonus)
    bonus = min(amount, spendable.bonus)
    return Funds(amount - bonus, bonus)


def split_capture(held: Funds, amount: int) -> Funds:
    """Of a hold, the part a capture of ``amount`` takes: in the hold's
    proportion, the bonus side rounded down, so that what goes back is the
    same mix the hold took."""
    if amount >= held.total:
        return held
    bonus = amount * held.bonus // held.total if held.total else 0
    return Funds(amount - bonus, bonus)


def split_refund(taken: Funds, refunded: Funds, amount: int) -> Funds:
    """What a refund of ``amount`` gives back of a payment that took
    ``taken`` and has had ``refunded`` given back already: in the payment's
    proportion, cumulatively (so refunds in parts end exactly where one
    whole refund would), the bonus side rounded down until the last."""
    left = taken.total - refunded.total
    if amount <= 0 or amount > left:
        raise FailedPrecondition(
            "more than is left to refund of this payment",
            reason="REFUND_EXCEEDS_PAYMENT",
            metadata={"left_minor_units": str(left), "amount_minor_units": str(amount)},
        )
    done = refunded.total + amount
    bonus_so_far = taken.bonus if done == taken.total else done * taken.bonus // taken.total
    bonus = bonus_so_far - refunded.bonus
    # Rounding down cumulatively can only lag behind, never overtake.
    bonus = max(0, min(bonus, taken.bonus - refunded.bonus, amount))
    paid = amount - bonus
    if paid > taken.paid - refunded.paid:
        paid = taken.paid - refunded.paid
        bonus = amount - paid
    return Funds(paid, bonus)


# --- the policy --------------------------------------------------------------


@dataclass(frozen=True)
class ChannelRule:
    channel: Channel
    enabled: bool = True
    # Empty: every store (till channels only).
    store_ids: frozenset[str] = frozenset()
    # Empty: any staff member whose role may recharge.
    operator_ids: frozenset[str] = frozenset()
    min_amount: int | None = None
    max_amount: int | None = None


@dataclass(frozen=True)
class Policy:
    currency: str
    spend_order: SpendOrder = SpendOrder.BONUS_FIRST
    channels: Mapping[Channel, ChannelRule] = field(default_factory=dict)
    max_balance: int | None = None
    daily_spend_limit: int | None = None
    daily_recharge_limit: int | None = None
    time_zone: str = "UTC"
    max_hold_ttl: dt.timedelta = DEFAULT_MAX_HOLD_TTL

    def rule(self, channel: Channel) -> ChannelRule:
        return self.channels.get(channel, ChannelRule(channel, enabled=False))

    def local_day(self, at: dt.datetime) -> dt.date:
        return at.astimezone(zoneinfo.ZoneInfo(self.time_zone)).date()


def default_policy(currency: str, time_zone: str = "UTC") -> Policy:
    """Every channel open everywhere, bonus funds spent first, no limits:
    what a chain has until it sets its own."""
    return Policy(
        currency=currency,
        channels={c: ChannelRule(c) for c in Channel},
        time_zone=time_zone,
    )


def _check_amount(v: Violations, name: str, value: int | None) -> None:
    if value is not None and not 0 < value <= MAX_AMOUNT:
        v.add(name, f"more than zero and at most {MAX_AMOUNT}")


def check_currency(code: str) -> bool:
    return len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()


def check_policy(policy: Policy, prefix: str = "policy") -> Policy:
    v = Violations()
    if not check_currency(policy.currency):
        v.add(f"{prefix}.currency_code", "an ISO 4217 code such as CNY")
    try:
        zoneinfo.ZoneInfo(policy.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        v.add(f"{prefix}.time_zone", "an IANA time zone such as Asia/Shanghai")
    _check_amount(v, f"{prefix}.max_balance", policy.max_balance)
    _check_amount(v, f"{prefix}.daily_spend_limit", policy.daily_spend_limit)
    _check_amount(v, f"{prefix}.daily_recharge_limit", policy.daily_recharge_limit)
    if not dt.timedelta(minutes=1) <= policy.max_hold_ttl <= LONGEST_HOLD_TTL:
        v.add(f"{prefix}.max_hold_ttl", "between one minute and seven days")
    for index, (channel, rule) in enumerate(policy.channels.items()):
        name = f"{prefix}.channels[{index}]"
        if rule.channel != channel:
            v.add(f"{name}.channel", "does not match")
        if rule.store_ids and channel not in TILL_CHANNELS:
            v.add(f"{name}.store_ids", "only for the channels used at a till")
        _check_amount(v, f"{name}.min_amount", rule.min_amount)
        _check_amount(v, f"{name}.max_amount", rule.max_amount)
        if rule.min_amount and rule.max_amount and rule.min_amount > rule.max_amount:
            v.add(f"{name}.max_amount", "below min_amount")
    v.raise_if_any("the policy has invalid fields")
    return policy


def check_recharge_allowed(
    policy: Policy, channel: Channel, amount: int, *, store_id: str, operator_id: str
) -> None:
    rule = policy.rule(channel)

    def refuse(why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"the chain's policy does not allow this recharge: {why}",
            reason="RECHARGE_CHANNEL_NOT_ALLOWED",
            metadata={"channel": channel.value, "store_id": store_id},
        )

    if not rule.enabled:
        raise refuse("the channel is closed")
    if channel in TILL_CHANNELS:
        if not store_id:
            raise refuse("a till recharge is made from a store")
        if rule.store_ids and store_id not in rule.store_ids:
            raise refuse("this store is not designated for the channel")
    if rule.operator_ids and operator_id not in rule.operator_ids:
        raise refuse("this login is not designated for the channel")
    low, high = rule.min_amount, rule.max_amount
    if (low is not None and amount < low) or (high is not None and amount > high):
        raise FailedPrecondition(
            "the amount is outside what the channel takes",
            reason="RECHARGE_AMOUNT_OUT_OF_RANGE",
            metadata={
                "channel": channel.value,
                "min_minor_units": str(low or 0),
                "max_minor_units": str(high or ""),
            },
        )


def check_max_balance(policy: Policy, balances: Balances, incoming: int) -> None:
    if policy.max_balance is None:
        return
    if balances.available + balances.held + incoming > policy.max_balance:
        raise FailedPrecondition(
            "the account would hold more than the chain allows",
            reason="MAX_BALANCE_EXCEEDED",
            metadata={
                "max_balance_minor_units": str(policy.max_balance),
                "room_minor_units": str(
                    max(0, policy.max_balance - balances.available - balances.held)
                ),
            },
        )


def check_daily_recharge(policy: Policy, recharged_today: int, amount: int) -> None:
    limit = policy.daily_recharge_limit
    if limit is not None and recharged_today + amount > limit:
        raise FailedPrecondition(
            "the card's recharges today would pass the daily limit",
            reason="DAILY_LIMIT_EXCEEDED",
            metadata={
                "limit_minor_units": str(limit),
                "left_minor_units": str(max(0, limit - recharged_today)),
            },
        )


def check_spend_limits(
    policy: Policy,
    amount: int,
    *,
    spent_today: int,
    card_monthly_limit: int | None,
    spent_this_month: int,
) -> None:
    """A card's daily limit (the chain's) and a supplementary card's monthly
    limit of its own. Holds count as spent until voided."""
    daily = policy.daily_spend_limit
    if daily is not None and spent_today + amount > daily:
        raise FailedPrecondition(
            "the card's spending today would pass the daily limit",
            reason="DAILY_LIMIT_EXCEEDED",
            metadata={
                "limit_minor_units": str(daily),
                "left_minor_units": str(max(0, daily - spent_today)),
            },
        )
    if card_monthly_limit is not None and spent_this_month + amount > card_monthly_limit:
        raise FailedPrecondition(
            "the card's spending this month would pass its own limit",
            reason="SPENDING_LIMIT_EXCEEDED",
            metadata={
                "limit_minor_units": str(card_monthly_limit),
                "left_minor_units": str(max(0, card_monthly_limit - spent_this_month)),
            },
        )


def hold_ttl(policy: Policy, asked: dt.timedelta | None) -> dt.timedelta:
    if asked is None:
        return min(DEFAULT_HOLD_TTL, policy.max_hold_ttl)
    if not dt.timedelta(seconds=30) <= asked <= policy.max_hold_ttl:
        v = Violations()
        v.add("ttl", f"between 30 seconds and {int(policy.max_hold_ttl.total_seconds())} seconds")
        v.raise_if_any()
    return asked


# --- recharge bonuses ----------------------------------------------------------


@dataclass(frozen=True)
class BonusRule:
    rule_id: str
    name: str
    threshold: int
    starts_at: dt.datetime
    fixed_bonus: int | None = None
    bonus_bps: int | None = None
    max_bonus: int | None = None
    # Empty: every channel but enterprise batches (a company's bulk
    # recharge is a negotiated deal of its own).
    channels: frozenset[Channel] = frozenset()
    program_ids: frozenset[str] = frozenset()
    ends_at: dt.datetime | None = None

    def in_force(self, at: dt.datetime) -> bool:
        return self.starts_at <= at and (self.ends_at is None or at < self.ends_at)

    def applies(self, channel: Channel, program_id: str, at: dt.datetime) -> bool:
        if self.channels:
            if channel not in self.channels:
                return False
        elif channel == Channel.ENTERPRISE_BATCH:
            return False
        if self.program_ids and program_id not in self.program_ids:
            return False
        return self.in_force(at)

    def bonus_for(self, amount: int) -> int:
        if amount < self.threshold:
            return 0
        if self.fixed_bonus is not None:
            return self.fixed_bonus
        bonus = amount * (self.bonus_bps or 0) // 10_000
        return bonus if self.max_bonus is None else min(bonus, self.max_bonus)


def check_bonus_rule(rule: BonusRule, prefix: str = "bonus_rule") -> BonusRule:
    v = Violations()
    if not rule.name.strip() or len(rule.name) > 100:
        v.add(f"{prefix}.name", "required, at most 100 characters")
    _check_amount(v, f"{prefix}.threshold", rule.threshold)
    if (rule.fixed_bonus is None) == (rule.bonus_bps is None):
        v.add(f"{prefix}.fixed_bonus", "give fixed_bonus or bonus_bps")
    _check_amount(v, f"{prefix}.fixed_bonus", rule.fixed_bonus)
    if rule.bonus_bps is not None and not 0 < rule.bonus_bps <= 10_000:
        v.add(f"{prefix}.bonus_bps", "1 to 10000")
    if rule.max_bonus is not None and rule.bonus_bps is None:
        v.add(f"{prefix}.max_bonus", "only with bonus_bps")
    _check_amount(v, f"{prefix}.max_bonus", rule.max_bonus)
    if rule.ends_at is not None and rule.ends_at <= rule.starts_at:
        v.add(f"{prefix}.end_time", "after start_time")
    v.raise_if_any("the bonus rule has invalid fields")
    return rule


def best_bonus(
    rules: Iterable[BonusRule], amount: int, channel: Channel, program_id: str, at: dt.datetime
) -> tuple[BonusRule | None, int]:
    """The rule giving the largest bonus (the oldest on a tie); rules do not
    add up."""
    best: tuple[BonusRule | None, int] = (None, 0)
    for rule in sorted(rules, key=lambda r: (r.starts_at, r.rule_id)):
        if not rule.applies(channel, program_id, at):
            continue
        bonus = rule.bonus_for(amount)
        if bonus > best[1]:
            best = (rule, bonus)
    return best


# --- checks of a request ---------------------------------------------------------


def check_amount(amount: int, currency: str, policy: Policy, field_name: str = "amount") -> int:
    v = Violations()
    if currency != policy.currency:
        v.add(
            f"{field_name}.currency_code", f"the chain's stored value is kept in {policy.currency}"
        )
    if not 0 < amount <= MAX_AMOUNT:
        v.add(f"{field_name}.minor_units", f"more than zero and at most {MAX_AMOUNT}")
    if v:
        raise InvalidArgument(list(v))
    return amount


def check_text(value: str, field_name: str, limit: int, *, required: bool = False) -> str:
    text = value.strip()
    if required and not text:
        raise InvalidArgument([FieldViolation(field_name, "required")])
    if len(text) > limit:
        raise InvalidArgument([FieldViolation(field_name, f"at most {limit} characters")])
    return text
