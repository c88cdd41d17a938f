"""The payment PIN of a card's stored value: what a PIN may be, and the
lock after repeated wrong tries. The hash itself is the chassis's salted
scrypt (``chassis.passwords``)."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from dataclasses import dataclass

from chassis import passwords
from chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from chassis.passwords import hash_secret, secret_matches, slow_hash

PIN_LENGTH = 6
# Three wrong tries in a row lock the PIN for half an hour: with a million
# PINs, that leaves a thief about one chance in seven thousand a day.
MAX_WRONG_TRIES = 3
LOCK = dt.timedelta(minutes=30)

__all__ = [
    "LOCK",
    "MAX_WRONG_TRIES",
    "PinState",
    "after_wrong_try",
    "check_new_pin",
    "hash_secret",
    "is_locked",
    "request_stand_in",
    "secret_matches",
]


def check_new_pin(pin: str, field: str = "new_pin") -> None:
    """Six digits, neither all alike nor a run (123456, 987654): the first
    guesses of anyone holding a stolen card."""
    if len(pin) != PIN_LENGTH or not pin.isdigit():
        raise InvalidArgument([FieldViolation(field, f"{PIN_LENGTH} digits")])
    steps = {(int(b) - int(a)) % 10 for a, b in itertools.pairwise(pin)}
    if steps in ({0}, {1}, {9}):
        raise InvalidArgument([FieldViolation(field, "too easy to guess")])


@dataclass(frozen=True)
class PinState:
    wrong_tries: int = 0
    locked_until: dt.datetime | None = None


def is_locked(state: PinState, now: dt.datetime) -> bool:
    return passwords.is_locked(state.locked_until, now)


def after_wrong_try(state: PinState, now: dt.datetime) -> PinState:
    """One more wrong PIN; the third in a row locks it, and the count starts
    again once the lock has run out."""
    return PinState(
        *passwords.after_wrong_try(
            state.wrong_tries, state.locked_until, now, max_tries=MAX_WRONG_TRIES, lock=LOCK
        )
    )


def refuse_locked(state: PinState, now: dt.datetime, card_id: str) -> None:
    if is_locked(state, now) and state.locked_until is not None:
        raise FailedPrecondition(
            "too many wrong PINs; the PIN is locked for a while",
            reason="PIN_LOCKED",
            metadata={"card_id": card_id},
            retry_after_seconds=(state.locked_until - now).total_seconds(),
        )


def request_stand_in(pin: str, card_id: str, request_id: str) -> str:
    """What stands for a PIN in an idempotency fingerprint: deterministic per
    request (a retry matches), and as slow to guess from as the PIN's own
    hash, so the stored fingerprint gives away nothing the hash does not."""
    if not pin:
        return ""
    salt = hashlib.sha256(f"card-pin/{card_id}/{request_id}".encode()).digest()
    return slow_hash(pin, salt).hex()
