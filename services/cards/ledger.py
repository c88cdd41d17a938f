"""Writing stored-value movements: what the domain decided, in the caller's
unit of work, with the journal entries, the account's balances, the card's
day counters and the outbox row together.

Every movement of an account first locks the account's row, so the
movements of one account happen one at a time (on PostgreSQL; SQLite
serialises all writers). A movement is bound to its (kind, request id) for
good: the same request again returns the first movement, another request
under the same id is refused. Shared by the gRPC edge, the partner service,
enterprise batches, the hold expiry worker and card cancellation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.direct import Executor, written_together
from chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.cards import events
from services.cards.domain import cards as card_rules
from services.cards.domain import stored_value as rules
from services.cards.domain.cards import Role
from services.cards.domain.programs import CancelSettlement
from services.cards.domain.stored_value import (
    Balances,
    Channel,
    Funds,
    HoldState,
    MovementKind,
    Policy,
)
from services.cards.store import cards as card_store
from services.cards.store import stored_value as store
from services.cards.store import stored_value_rules as rule_store
from services.cards.store.cards import CardRecord, Stamp
from services.cards.store.programs import ProgramRecord
from services.cards.store.stored_value import (
    AccountRecord,
    HoldRecord,
    MovementRecord,
    NewMovement,
)

# The statement of a principal card shows, besides what the card did, what
# came onto or left its account as a whole.
ACCOUNT_WIDE_KINDS = (
    MovementKind.RECHARGE,
    MovementKind.REFUND,
    MovementKind.PAYOUT,
    MovementKind.FORFEIT,
)


def _reused() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("request_id", "already used for a different request")],
        message="this request_id was already used with a different payload",
        reason="IDEMPOTENCY_KEY_REUSED",
    )


def hold_not_found(hold_id: str) -> NotFound:
    return NotFound("no hold with this id", reason="HOLD_NOT_FOUND", metadata={"hold_id": hold_id})


def movement_not_found(movement_id: str) -> NotFound:
    return NotFound(
        "no movement with this id",
        reason="MOVEMENT_NOT_FOUND",
        metadata={"movement_id": movement_id},
    )


@dataclass(frozen=True)
class Request:
    """Who asks, and the request's identity for idempotency."""

    request_id: str
    request_hash: str
    stamp: Stamp


async def _replayed(
    session: Executor, kind: MovementKind, request: Request
) -> MovementRecord | None:
    done = await store.movement_by_request(session, kind, request.request_id)
    if done is not None and done.request_hash != request.request_hash:
        raise _reused()
    return done


def _require_can_pay(card: CardRecord, program: ProgramRecord, now: dt.datetime) -> None:
    if not program.program.stored_value:
        raise FailedPrecondition(
            "this card's program carries no stored value",
            reason="STORED_VALUE_NOT_OFFERED",
            metadata={"card_id": card.card_id, "program_id": card.program_id},
        )
    refusal = card_rules.payment_refusal(card.state, card.expires_at, now)
    if refusal:
        raise FailedPrecondition(
            f"this card cannot be used now ({card.state.value})",
            reason=refusal,
            metadata={"card_id": card.card_id, "state": card.state.value},
        )


def _require_open(account: AccountRecord) -> None:
    if account.closed_at is not None:
        raise FailedPrecondition(
            "this stored-value account was closed",
            reason="ACCOUNT_CLOSED",
            metadata={"account_id": account.account_id},
        )


async def _locked_account(
    session: Executor, account_id: str, policy: Policy, now: dt.datetime, *, create: bool
) -> AccountRecord | None:
    if create:
        await store.open_account(session, account_id, policy.currency, now)
    return await store.get_account(session, account_id, for_update=True)


async def _write(session: Executor, movement: NewMovement, stamp: Stamp) -> MovementRecord:
    after = await store.apply_entries(session, movement.account_id, movement.entries)
    return await store.record_movement(
        session, movement, after, principal=stamp.principal, store_id=stamp.store_id, now=stamp.at
    )


async def _write_pair(
    session: Executor, first: NewMovement, second: NewMovement, stamp: Stamp
) -> tuple[MovementRecord, MovementRecord]:
    """Two movements of one account, one after the other (a hold and its
    capture), in three statements: their balances in one update, the
    movements in one insert, their entries in another. The account's
    checks apply to its balances after the second: for movements whose
    balances in between are no lower."""
    after_first, after_second = await store.apply_movements(
        session, first.account_id, [first.entries, second.entries]
    )
    return await store.record_movement_pair(
        session,
        (first, after_first),
        (second, after_second),
        principal=stamp.principal,
        store_id=stamp.store_id,
        now=stamp.at,
    )


async def _card(session: AsyncSession, card_id: str) -> CardRecord:
    card = await card_store.get_card(session, card_id)
    assert card is not None  # a movement's card is never deleted
    return card


# --- recharge ------------------------------------------------------------------


async def quote(
    session: AsyncSession, program_id: str, amount: int, channel: Channel, now: dt.datetime
) -> tuple[rules.BonusRule | None, int]:
    return rules.best_bonus(
        await rule_store.bonus_rules_in_force(session, now), amount, channel, program_id, now
    )


async def recharge(
    session: AsyncSession,
    card: CardRecord,
    program: ProgramRecord,
    policy: Policy,
    request: Request,
    *,
    amount: int,
    channel: Channel,
    operator_id: str,
    reference: str = "",
    note: str = "",
) -> MovementRecord:
    now = request.stamp.at
    account = await _locked_account(session, card.account_id, policy, now, create=True)
    assert account is not None  # created just now if it was missing
    if (done := await _replayed(session, MovementKind.RECHARGE, request)) is not None:
        return done
    _require_can_pay(card, program, now)
    _require_open(account)
    rules.check_recharge_allowed(
        policy, channel, amount, store_id=request.stamp.store_id, operator_id=operator_id
    )
    day = policy.local_day(now)
    _, recharged_today = await store.card_day(session, card.card_id, day)
    rules.check_daily_recharge(policy, recharged_today, amount)
    rule, bonus = await quote(session, card.program_id, amount, channel, now)
    rules.check_max_balance(policy, account.balances, amount + bonus)
    movement = await _write(
        session,
        NewMovement(
            movement_id=rules.new_movement_id(),
            kind=MovementKind.RECHARGE,
            request_id=request.request_id,
            request_hash=request.request_hash,
            account_id=card.account_id,
            card_id=card.card_id,
            currency=account.currency,
            amount=amount,
            change=Funds(amount, bonus),
            entries=rules.recharge_entries(channel, amount, bonus),
            channel=channel,
            reference=reference,
            note=note,
            bonus_rule_id=rule.rule_id if rule else "",
        ),
        request.stamp,
    )
    await store.add_to_card_day(session, card.card_id, day, recharged=amount)
    await events.stored_value_moved(session, movement, card, request.stamp)
    return movement


# --- spending --------------------------------------------------------------------


async def _check_spend(
    session: Executor, card: CardRecord, policy: Policy, amount: int, now: dt.datetime
) -> dt.date:
    day = policy.local_day(now)
    spent_today = 0
    if policy.daily_spend_limit is not None:
        # Without a daily limit what the card spent today decides nothing.
        spent_today, _ = await store.card_day(session, card.card_id, day)
    monthly = None
    spent_this_month = 0
    if card.role == Role.SUPPLEMENTARY and card.spending_limit is not None:
        monthly = card.spending_limit.minor_units
        spent_this_month = await store.spent_since(session, card.card_id, day.replace(day=1))
    rules.check_spend_limits(
        policy,
        amount,
        spent_today=spent_today,
        card_monthly_limit=monthly,
        spent_this_month=spent_this_month,
    )
    return day


@dataclass(frozen=True)
class _PlannedSpend:
    """A hold or a debit checked and worked out, not yet written."""

    movement: NewMovement
    day: dt.date


async def _plan_spend(
    session: Executor,
    card: CardRecord,
    program: ProgramRecord,
    policy: Policy,
    request: Request,
    *,
    kind: MovementKind,
    amount: int,
    reference: str,
    hold_id: str = "",
    unseen_request: bool = False,
) -> _PlannedSpend | MovementRecord:
    """Locks the account and checks a hold or a debit (funds out of what
    the card can spend, in the chain's order, within the card's limits);
    returns the movement to write and the day it counts on, or the
    movement of an earlier request when this one is its replay.
    ``unseen_request``: the replay is not looked for; a replay then fails
    on the movement's unique request id, and the caller asks again
    without it."""
    now = request.stamp.at
    account = await _locked_account(session, card.account_id, policy, now, create=False)
    if (
        account is not None
        and not unseen_request
        and (done := await _replayed(session, kind, request))
    ):
        return done
    _require_can_pay(card, program, now)
    if account is None:
        raise rules.insufficient(0, amount)
    _require_open(account)
    funds = rules.split_spend(account.balances.spendable, amount, policy.spend_order)
    day = await _check_spend(session, card, policy, amount, now)
    movement = NewMovement(
        movement_id=rules.new_movement_id(),
        kind=kind,
        request_id=request.request_id,
        request_hash=request.request_hash,
        account_id=card.account_id,
        card_id=card.card_id,
        currency=account.currency,
        amount=amount,
        change=-funds,
        entries=(
            rules.hold_entries(funds) if kind == MovementKind.HOLD else rules.debit_entries(funds)
        ),
        taken=funds if kind == MovementKind.DEBIT else Funds(),
        reference=reference,
        hold_id=hold_id,
    )
    return _PlannedSpend(movement, day)


async def hold(
    session: Executor,
    card: CardRecord,
    program: ProgramRecord,
    policy: Policy,
    request: Request,
    *,
    amount: int,
    ttl: dt.timedelta,
    reference: str = "",
    capture: bool = False,
    unseen_request: bool = False,
) -> HoldStanding:
    """Sets funds aside; with ``capture``, takes them at once, in the
    caller's one unit of work: for a till that has nothing to do between
    the two (the checkout records its sale afterwards). Both movements
    carry the request's id, so the hold is found, and refunded, like any
    other. A replay returns the hold the request made as it now stands,
    whether or not it asks for the capture. ``unseen_request``: see
    ``_plan_spend`` (a replay raises ``IntegrityError``)."""
    planned = await _plan_spend(
        session,
        card,
        program,
        policy,
        request,
        kind=MovementKind.HOLD,
        amount=amount,
        reference=reference,
        hold_id=rules.new_hold_id(),
        unseen_request=unseen_request,
    )
    if isinstance(planned, MovementRecord):
        found = await store.get_hold(session, planned.hold_id)
        account = await store.get_account(session, planned.account_id)
        assert found is not None and account is not None  # written with the movement
        return HoldStanding(found, account.currency, account.balances.available)
    now = request.stamp.at
    new = planned.movement
    held = HoldRecord(
        hold_id=new.hold_id,
        account_id=card.account_id,
        card_id=card.card_id,
        state=HoldState.HELD,
        currency=new.currency,
        funds=-new.change,
        captured=Funds(),
        reference=reference,
        local_day=planned.day,
        expires_at=now + ttl,
        hold_movement_id=new.movement_id,
        capture_movement_id="",
        principal=request.stamp.principal,
        store_id=request.stamp.store_id,
        held_at=now,
        finished_at=None,
    )
    # Nothing below is read back before the commit: the hold, the entries
    # and the events go in one statement at the block's end.
    async with written_together(session):
        await store.add_to_card_day(session, card.card_id, planned.day, spent=amount)
        if not capture:
            movement = await _write(session, new, request.stamp)
            await store.insert_hold(session, held)
            await events.publish(
                session,
                *events.stored_value_event(movement, card, request.stamp, expire_time=now + ttl),
            )
            return HoldStanding(held, movement.currency, movement.after.available)
        # All of it taken at once: both movements are written together (their
        # balances in one update, the movements in one insert), and the hold,
        # written captured, goes with their entries and events.
        capture_of, take, _ = _capture_of(held, new.currency, request, amount=None)
        movement, taken = await _write_pair(session, new, capture_of, request.stamp)
        await store.insert_hold(session, _captured(held, take, taken, now))
        await events.stored_values_moved(
            session,
            [
                events.stored_value_event(movement, card, request.stamp, expire_time=now + ttl),
                events.stored_value_event(taken, card, request.stamp),
            ],
        )
        return HoldStanding(_captured(held, take, taken, now), new.currency, taken.after.available)


@dataclass(frozen=True)
class _LockedHold:
    account: AccountRecord
    hold: HoldRecord
    card: CardRecord
    # Whether this request was carried out already (see ``_replayed``).
    replayed: bool


async def _locked_hold(
    session: AsyncSession, hold_id: str, kind: MovementKind, request: Request
) -> _LockedHold:
    """Locks the hold's account, then reads the hold (locked too) with its
    card and checks the request for a replay: the order every movement
    locks in. Read after the account's lock, the hold is as the account's
    last movement left it, and a replay committed meanwhile is seen."""
    account = await store.lock_account_of_hold(session, hold_id)
    if account is None:
        raise hold_not_found(hold_id)
    found = await store.locked_hold_with_card(session, hold_id, kind, request.request_id)
    assert found is not None  # holds and cards are never deleted
    done = found.done_request_hash
    if done is not None and done != request.request_hash:
        raise _reused()
    return _LockedHold(account, found.hold, found.card, replayed=done is not None)


def _hold_refusal(held: HoldRecord) -> FailedPrecondition:
    return FailedPrecondition(
        f"this hold was {held.state.value}",
        reason=f"HOLD_{held.state.value.upper()}",
        metadata={"hold_id": held.hold_id, "state": held.state.value},
    )


async def _release(
    session: AsyncSession,
    held: HoldRecord,
    funds: Funds,
    request: Request,
    card: CardRecord,
    *,
    expired: bool = False,
    note: str = "",
) -> MovementRecord:
    """Gives held funds back to what can be spent, and the card's day its
    room."""
    movement = await _write(
        session,
        NewMovement(
            movement_id=rules.new_movement_id(),
            kind=MovementKind.RELEASE,
            request_id=request.request_id,
            request_hash=request.request_hash,
            account_id=held.account_id,
            card_id=held.card_id,
            currency=held.currency,
            amount=funds.total,
            change=funds,
            entries=rules.release_entries(funds),
            reference=held.reference,
            note=note,
            hold_id=held.hold_id,
        ),
        request.stamp,
    )
    await store.add_to_card_day(session, held.card_id, held.local_day, spent=-funds.total)
    await events.stored_value_moved(session, movement, card, request.stamp, expired=expired)
    return movement


@dataclass(frozen=True)
class HoldStanding:
    """A hold as a call left it (held, or captured), and what its account
    has available after it (for the till's receipt)."""

    hold: HoldRecord
    currency: str
    available: int


async def capture(
    session: AsyncSession,
    hold_id: str,
    request: Request,
    *,
    amount: int | None,
) -> HoldStanding:
    locked = await _locked_hold(session, hold_id, MovementKind.CAPTURE, request)
    account, held, card = locked.account, locked.hold, locked.card
    if locked.replayed:
        # The account as locked: nothing moved it since.
        return HoldStanding(held, account.currency, account.balances.available)
    if held.state != HoldState.HELD:
        raise _hold_refusal(held)
    return await _capture(session, held, card, account.currency, request, amount=amount)


async def _capture(
    session: AsyncSession,
    held: HoldRecord,
    card: CardRecord,
    currency: str,
    request: Request,
    *,
    amount: int | None,
) -> HoldStanding:
    """Takes the funds of a hold found HELD, its account locked."""
    movement, take, rest = await _write_capture(session, held, currency, request, amount=amount)
    await events.stored_value_moved(session, movement, card, request.stamp)
    # The balances the account's last write returned are its balances now.
    after = movement.after
    if rest.total:
        released = await _release(
            session,
            held,
            rest,
            Request(f"{held.hold_id}:rest", "", request.stamp),
            card,
            note="not captured",
        )
        after = released.after
    await store.finish_hold(
        session,
        held.hold_id,
        HoldState.CAPTURED,
        request.stamp.at,
        captured=take,
        capture_movement_id=movement.movement_id,
    )
    return HoldStanding(
        _captured(held, take, movement, request.stamp.at), currency, after.available
    )


async def _write_capture(
    session: AsyncSession,
    held: HoldRecord,
    currency: str,
    request: Request,
    *,
    amount: int | None,
) -> tuple[MovementRecord, Funds, Funds]:
    """The capture movement of ``amount`` of a HELD hold (all of it when
    None), written; returns it, the funds taken and the funds left held."""
    new, take, rest = _capture_of(held, currency, request, amount=amount)
    return await _write(session, new, request.stamp), take, rest


def _capture_of(
    held: HoldRecord, currency: str, request: Request, *, amount: int | None
) -> tuple[NewMovement, Funds, Funds]:
    """The capture movement of ``amount`` of a HELD hold (all of it when
    None), to write; the funds it takes and those it leaves held."""
    take_total = held.funds.total if amount is None else amount
    if take_total > held.funds.total:
        raise FailedPrecondition(
            "more than the hold set aside",
            reason="HOLD_AMOUNT_EXCEEDED",
            metadata={"hold_id": held.hold_id, "held_minor_units": str(held.funds.total)},
        )
    take = rules.split_capture(held.funds, take_total)
    movement = NewMovement(
        movement_id=rules.new_movement_id(),
        kind=MovementKind.CAPTURE,
        request_id=request.request_id,
        request_hash=request.request_hash,
        account_id=held.account_id,
        card_id=held.card_id,
        currency=currency,
        amount=take.total,
        change=Funds(),
        entries=rules.capture_entries(take),
        taken=take,
        reference=held.reference,
        hold_id=held.hold_id,
    )
    return movement, take, held.funds - take


def _captured(
    held: HoldRecord, take: Funds, movement: MovementRecord, at: dt.datetime
) -> HoldRecord:
    return dataclasses.replace(
        held,
        state=HoldState.CAPTURED,
        captured=take,
        capture_movement_id=movement.movement_id,
        finished_at=at,
    )


async def void(
    session: AsyncSession,
    hold_id: str,
    request: Request,
    *,
    reason: str = "",
    expired: bool = False,
) -> HoldRecord:
    locked = await _locked_hold(session, hold_id, MovementKind.RELEASE, request)
    held, card = locked.hold, locked.card
    if locked.replayed:
        return held
    if held.state in (HoldState.VOIDED, HoldState.EXPIRED):
        return held
    if held.state == HoldState.CAPTURED:
        raise _hold_refusal(held)
    await _release(session, held, held.funds, request, card, expired=expired, note=reason)
    state = HoldState.EXPIRED if expired else HoldState.VOIDED
    await store.finish_hold(session, held.hold_id, state, request.stamp.at)
    # As finish_hold wrote it, without reading it back.
    return dataclasses.replace(
        held,
        state=state,
        captured=Funds(),
        capture_movement_id="",
        finished_at=request.stamp.at,
    )


async def debit(
    session: AsyncSession,
    card: CardRecord,
    program: ProgramRecord,
    policy: Policy,
    request: Request,
    *,
    amount: int,
    reference: str = "",
) -> MovementRecord:
    planned = await _plan_spend(
        session,
        card,
        program,
        policy,
        request,
        kind=MovementKind.DEBIT,
        amount=amount,
        reference=reference,
    )
    if isinstance(planned, MovementRecord):
        return planned  # a replay
    async with written_together(session):  # the entries with the event
        movement = await _write(session, planned.movement, request.stamp)
        await store.add_to_card_day(session, card.card_id, planned.day, spent=amount)
        await events.stored_value_moved(session, movement, card, request.stamp)
    return movement


async def refund(
    session: AsyncSession,
    movement_id: str,
    request: Request,
    *,
    amount: int | None,
    reason: str = "",
) -> MovementRecord:
    found = await store.get_movement(session, movement_id)
    if found is None:
        raise movement_not_found(movement_id)
    if found.kind not in (MovementKind.DEBIT, MovementKind.CAPTURE):
        raise FailedPrecondition(
            "only a debit or a capture can be refunded",
            reason="MOVEMENT_NOT_REFUNDABLE",
            metadata={"movement_id": movement_id, "kind": found.kind.value},
        )
    account = await store.get_account(session, found.account_id, for_update=True)
    assert account is not None  # a movement's account is never deleted
    if (done := await _replayed(session, MovementKind.REFUND, request)) is not None:
        return done
    _require_open(account)
    paid = await store.get_movement(session, movement_id, for_update=True)
    assert paid is not None
    left = paid.taken.total - paid.refunded.total
    funds = rules.split_refund(paid.taken, paid.refunded, left if amount is None else amount)
    movement = await _write(
        session,
        NewMovement(
            movement_id=rules.new_movement_id(),
            kind=MovementKind.REFUND,
            request_id=request.request_id,
            request_hash=request.request_hash,
            account_id=paid.account_id,
            card_id=paid.card_id,
            currency=paid.currency,
            amount=funds.total,
            change=funds,
            entries=rules.refund_entries(funds),
            reference=paid.reference,
            note=reason,
            refunds_movement_id=paid.movement_id,
        ),
        request.stamp,
    )
    await store.add_refunded(session, paid.movement_id, funds)
    await events.stored_value_moved(
        session, movement, await _card(session, paid.card_id), request.stamp
    )
    return movement


# --- closing an account ------------------------------------------------------------


async def settle(
    session: AsyncSession,
    card: CardRecord,
    program: ProgramRecord,
    stamp: Stamp,
    *,
    void_holds: bool,
) -> None:
    """Closes the account of a card whose account has no live card left:
    paid funds paid out or forfeited by the program's rule, bonus funds
    forfeited. Open holds are refused (a sale is under way) unless
    ``void_holds`` (the member's data is being erased)."""
    account = await store.get_account(session, card.account_id, for_update=True)
    if account is None or account.closed_at is not None:
        return
    if open_holds := await store.open_holds(session, card.account_id):
        if not void_holds:
            raise FailedPrecondition(
                "a sale holds some of this card's stored value; capture or void it first",
                reason="STORED_VALUE_ON_HOLD",
                metadata={"account_id": card.account_id},
            )
        for hold_id in open_holds:
            await void(
                session,
                hold_id,
                Request(f"{hold_id}:settle", "", stamp),
                reason="account closed",
            )
        account = await store.get_account(session, card.account_id)
        assert account is not None
    balances = account.balances
    pay_out = program.program.cancel_settlement == CancelSettlement.PAY_OUT
    paid_out = Balances(paid=balances.paid if pay_out else 0)
    forfeited = Balances(paid=balances.paid - paid_out.paid, bonus=balances.bonus)
    for kind, funds, entries in (
        (MovementKind.PAYOUT, paid_out, rules.settlement_entries(paid_out, pay_out=True)),
        (MovementKind.FORFEIT, forfeited, rules.settlement_entries(forfeited, pay_out=False)),
    ):
        if not funds.available:
            continue
        await _write(
            session,
            NewMovement(
                movement_id=rules.new_movement_id(),
                kind=kind,
                request_id=f"{card.account_id}:{kind.value}",
                request_hash="",
                account_id=card.account_id,
                card_id=card.card_id,
                currency=account.currency,
                amount=funds.available,
                change=-funds.spendable,
                entries=entries,
            ),
            stamp,
        )
    await store.close_account(session, card.account_id, stamp.at)
    await events.stored_value_settled(
        session,
        card,
        account.currency,
        paid_out=paid_out.available,
        forfeited=forfeited.available,
        stamp=stamp,
    )


# --- reading -------------------------------------------------------------------------


@dataclass(frozen=True)
class CardRoom:
    """What a card may still spend today and this month (None: no limit)."""

    today: int | None
    this_month: int | None


async def card_room(
    session: AsyncSession, card: CardRecord, policy: Policy, now: dt.datetime
) -> CardRoom:
    day = policy.local_day(now)
    today = None
    if policy.daily_spend_limit is not None:
        spent, _ = await store.card_day(session, card.card_id, day)
        today = max(0, policy.daily_spend_limit - spent)
    month = None
    if card.role == Role.SUPPLEMENTARY and card.spending_limit is not None:
        spent_month = await store.spent_since(session, card.card_id, day.replace(day=1))
        month = max(0, card.spending_limit.minor_units - spent_month)
    return CardRoom(today, month)
