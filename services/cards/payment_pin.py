"""Checking a card's payment PIN: shared by VerifyCardPin, SetCardPin and
the stored-value payments. A wrong try is written (and committed by the
caller) before the refusal is raised, so that it counts."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from chassis.db import Database
from chassis.direct import Executor
from chassis.errors import FailedPrecondition, NotFound
from services.cards.domain import cards as domain
from services.cards.domain import pins
from services.cards.domain.cards import Action
from services.cards.store import cards as store
from services.cards.store.cards import CardRecord


def pin_refusal(outcome: dict[str, Any], card_id: str) -> FailedPrecondition:
    if outcome.get("refused") == "PIN_LOCKED":
        return FailedPrecondition(
            "too many wrong PINs; the PIN is locked for a while",
            reason="PIN_LOCKED",
            metadata={"card_id": card_id},
            retry_after_seconds=float(outcome.get("retry_after", 0.0)),
        )
    return FailedPrecondition(
        "the PIN is wrong",
        reason="PIN_INCORRECT",
        metadata={"card_id": card_id, "tries_left": str(int(outcome.get("tries_left", 0)))},
    )


async def try_pin(
    session: Executor, card: CardRecord, pin: str, now: dt.datetime
) -> dict[str, Any]:
    """Checks a PIN against the card's and writes the try's outcome; an
    empty dict when it matched, else what to refuse with."""
    state = pins.PinState(card.pin_wrong_tries, card.pin_locked_until)
    if pins.is_locked(state, now) and state.locked_until is not None:
        return {
            "refused": "PIN_LOCKED",
            "retry_after": (state.locked_until - now).total_seconds(),
        }
    if await asyncio.to_thread(pins.secret_matches, pin, card.pin_hash or ""):
        if state != pins.PinState():
            await store.update_card(session, card.card_id, pin_wrong_tries=0, pin_locked_until=None)
        return {}
    after = pins.after_wrong_try(state, now)
    await store.update_card(
        session,
        card.card_id,
        pin_wrong_tries=after.wrong_tries,
        pin_locked_until=after.locked_until,
    )
    if after.locked_until is not None:
        return {"refused": "PIN_LOCKED", "retry_after": pins.LOCK.total_seconds()}
    return {"refused": "PIN_INCORRECT", "tries_left": pins.MAX_WRONG_TRIES - after.wrong_tries}


async def check_payment_pin_in(
    session: Executor, card: CardRecord, pin: str, now: dt.datetime
) -> FailedPrecondition | None:
    """``check_payment_pin`` inside the payment's own unit of work, with
    the card as read in it: refuses at once what writes nothing
    (PIN_REQUIRED, a card that is not active), and returns a wrong PIN's
    refusal for the caller to raise once the try is committed (the
    payment then writes nothing else)."""
    domain.require_active(card.state, card.card_id, Action.SET_PIN)
    if card.pin_hash is None:
        return None
    if not pin:
        raise FailedPrecondition(
            "this card pays only with its PIN",
            reason="PIN_REQUIRED",
            metadata={"card_id": card.card_id},
        )
    # Locked, so that concurrent wrong tries all count.
    locked = await store.get_card(session, card.card_id, for_update=True)
    assert locked is not None  # cards are never deleted
    outcome = await try_pin(session, locked, pin, now)
    return pin_refusal(outcome, card.card_id) if outcome else None


async def check_payment_pin(
    db: Database, card_id: str, pin: str, now: dt.datetime, *, required: bool = False
) -> None:
    """Before a payment from a card: a card with a PIN needs it
    (PIN_REQUIRED), a wrong one is refused and counted. ``required`` asks
    for a PIN even of a card without one (PIN_NOT_SET)."""
    async with db.sessions() as session:
        card = await store.get_card(session, card_id)
    if card is None:
        raise NotFound(
            "no card with this id", reason="CARD_NOT_FOUND", metadata={"card_id": card_id}
        )
    domain.require_active(card.state, card.card_id, Action.SET_PIN)
    if card.pin_hash is None:
        # Most cards have no PIN: no write, no lock, for them.
        if required:
            raise FailedPrecondition(
                "this card has no PIN", reason="PIN_NOT_SET", metadata={"card_id": card_id}
            )
        return
    if not pin:
        raise FailedPrecondition(
            "this card pays only with its PIN", reason="PIN_REQUIRED", metadata={"card_id": card_id}
        )
    async with db.transaction() as session:
        # Locked, so that concurrent wrong tries all count.
        locked = await store.get_card(session, card_id, for_update=True)
        assert locked is not None  # cards are never deleted
        outcome = await try_pin(session, locked, pin, now)
    if outcome:
        raise pin_refusal(outcome, card_id)
