"""Cards: their states and the moves between them, the relations between
cards (supplementary, group holders, links), validity and payability."""

from __future__ import annotations

import calendar
import datetime as dt
import enum
from dataclasses import dataclass

from chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from chassis.ids import random_id
from services.cards.domain.programs import Holding

MAX_REASON_LENGTH = 200


def _new_id(letter: str) -> str:
    return random_id(letter, 11)


def new_card_id() -> str:
    return _new_id("C")


def new_account_id() -> str:
    return _new_id("A")


class CardState(enum.StrEnum):
    ACTIVE = "active"
    LOST = "lost"
    FROZEN = "frozen"
    REPLACED = "replaced"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Action(enum.StrEnum):
    """What can happen to a card. The first seven move it between states;
    the rest are kept in its history without changing its state."""

    REPORT_LOST = "report_lost"
    CANCEL_LOSS = "cancel_loss"
    FREEZE = "freeze"
    UNFREEZE = "unfreeze"
    REPLACE = "replace"
    CANCEL = "cancel"
    EXPIRE = "expire"
    ISSUE = "issue"
    LINK = "link"
    UNLINK = "unlink"
    SET_PIN = "set_pin"
    CHANGE_HOLDER = "change_holder"


LIFECYCLE_ACTIONS = (
    Action.REPORT_LOST,
    Action.CANCEL_LOSS,
    Action.FREEZE,
    Action.UNFREEZE,
    Action.REPLACE,
    Action.CANCEL,
    Action.EXPIRE,
)


class Role(enum.StrEnum):
    PRINCIPAL = "principal"
    SUPPLEMENTARY = "supplementary"
    GROUP_HOLDER = "group_holder"


# The whole state machine. A frozen card can be neither reported lost nor
# replaced: either would undo a manager's freeze without a manager. An
# expired card can still be cancelled, so that the stored value left on it
# is settled (paid out or forfeited) rather than stuck.
TRANSITIONS: dict[tuple[CardState, Action], CardState] = {
    (CardState.ACTIVE, Action.REPORT_LOST): CardState.LOST,
    (CardState.ACTIVE, Action.FREEZE): CardState.FROZEN,
    (CardState.ACTIVE, Action.REPLACE): CardState.REPLACED,
    (CardState.ACTIVE, Action.CANCEL): CardState.CANCELLED,
    (CardState.ACTIVE, Action.EXPIRE): CardState.EXPIRED,
    (CardState.LOST, Action.CANCEL_LOSS): CardState.ACTIVE,
    (CardState.LOST, Action.REPLACE): CardState.REPLACED,
    (CardState.LOST, Action.CANCEL): CardState.CANCELLED,
    (CardState.LOST, Action.EXPIRE): CardState.EXPIRED,
    (CardState.FROZEN, Action.UNFREEZE): CardState.ACTIVE,
    (CardState.FROZEN, Action.CANCEL): CardState.CANCELLED,
    (CardState.FROZEN, Action.EXPIRE): CardState.EXPIRED,
    (CardState.EXPIRED, Action.CANCEL): CardState.CANCELLED,
}

# States a card can still leave; the others are final.
LIVE_STATES = frozenset({CardState.ACTIVE, CardState.LOST, CardState.FROZEN})


def refusal_reason(state: CardState, action: Action) -> str:
    """The ErrorInfo reason of a refused move: the card's state, except for
    undoing something an active card never had."""
    if state == CardState.ACTIVE and action == Action.CANCEL_LOSS:
        return "CARD_NOT_LOST"
    if state == CardState.ACTIVE and action == Action.UNFREEZE:
        return "CARD_NOT_FROZEN"
    return f"CARD_{state.value.upper()}"


def transition(state: CardState, action: Action, card_id: str = "") -> CardState:
    """The state after ``action``, or FAILED_PRECONDITION."""
    after = TRANSITIONS.get((state, action))
    if after is None:
        raise FailedPrecondition(
            f"a card that is {state.value} cannot be {_PAST[action]}",
            reason=refusal_reason(state, action),
            metadata={"card_id": card_id, "state": state.value, "action": action.value},
        )
    return after


_PAST = {
    Action.REPORT_LOST: "reported lost",
    Action.CANCEL_LOSS: "found again",
    Action.FREEZE: "frozen",
    Action.UNFREEZE: "unfrozen",
    Action.REPLACE: "replaced",
    Action.CANCEL: "cancelled",
    Action.EXPIRE: "expired",
    Action.ISSUE: "issued",
    Action.LINK: "linked",
    Action.UNLINK: "unlinked",
    Action.SET_PIN: "given a PIN",
    Action.CHANGE_HOLDER: "moved",
}


def require_active(state: CardState, card_id: str, action: Action) -> None:
    """Relations (supplementary cards, group holders, links, PINs) are made
    only on active cards."""
    if state != CardState.ACTIVE:
        raise FailedPrecondition(
            f"a card that is {state.value} cannot be {_PAST[action]}",
            reason=f"CARD_{state.value.upper()}",
            metadata={"card_id": card_id, "state": state.value},
        )


def payment_refusal(state: CardState, expires_at: dt.datetime | None, now: dt.datetime) -> str:
    """Why a card cannot pay now ("" when it can). A card past its validity
    cannot pay even before the expiry worker has marked it."""
    if state != CardState.ACTIVE:
        return f"CARD_{state.value.upper()}"
    if expires_at is not None and expires_at <= now:
        return "CARD_EXPIRED"
    return ""


def check_reason(reason: str, *, required: bool, field: str = "reason") -> str:
    text = reason.strip()
    if required and not text:
        raise InvalidArgument([FieldViolation(field, "required: say why")])
    if len(text) > MAX_REASON_LENGTH:
        raise InvalidArgument([FieldViolation(field, f"at most {MAX_REASON_LENGTH} characters")])
    return text


def expiry(issued_at: dt.datetime, validity_months: int) -> dt.datetime | None:
    """The end of validity: the same day ``validity_months`` later (the last
    day of a shorter month); None for a card that never expires."""
    if validity_months <= 0:
        return None
    months = issued_at.month - 1 + validity_months
    year = issued_at.year + months // 12
    month = months % 12 + 1
    day = min(issued_at.day, calendar.monthrange(year, month)[1])
    return issued_at.replace(year=year, month=month, day=day)


# -- relations ----------------------------------------------------------------------


@dataclass(frozen=True)
class CardFacts:
    """What the relation rules need to know about an existing card."""

    card_id: str
    program_id: str
    member_id: str
    account_id: str
    state: CardState
    role: Role
    linked_card_id: str = ""


@dataclass(frozen=True)
class ProgramFacts:
    program_id: str
    holding: Holding
    stored_value: bool
    allows_supplementary: bool
    max_supplementary_cards: int
    max_group_holders: int
    allows_linking: bool


@dataclass(frozen=True)
class SpendingLimit:
    currency_code: str
    minor_units: int


def check_new_holder(program: ProgramFacts, member_live_cards: int) -> None:
    """A member holds at most one live card of a program (a supplementary
    card does not count: it draws on someone else's account)."""
    if member_live_cards:
        raise FailedPrecondition(
            "the member already holds a live card of this program",
            reason="CARD_ALREADY_HELD",
            metadata={"program_id": program.program_id},
        )


def check_supplementary(
    principal: CardFacts,
    principal_program: ProgramFacts,
    program: ProgramFacts,
    *,
    live_supplementaries: int,
) -> None:
    """A supplementary card hangs off an active principal card whose program
    allows it, up to the program's number, and is itself a personal card
    with stored value (it spends the principal's)."""
    require_active(principal.state, principal.card_id, Action.ISSUE)
    if principal.role != Role.PRINCIPAL:
        raise FailedPrecondition(
            "supplementary cards hang off a principal card",
            reason="NOT_A_PRINCIPAL_CARD",
            metadata={"card_id": principal.card_id, "role": principal.role.value},
        )
    if not principal_program.allows_supplementary:
        raise FailedPrecondition(
            "the principal card's program has no supplementary cards",
            reason="SUPPLEMENTARY_NOT_ALLOWED",
            metadata={"program_id": principal_program.program_id},
        )
    if program.holding != Holding.PERSONAL or not program.stored_value:
        raise FailedPrecondition(
            "a supplementary card must be of a personal program with stored value",
            reason="PROGRAM_NOT_SUPPLEMENTARY",
            metadata={"program_id": program.program_id},
        )
    if live_supplementaries >= principal_program.max_supplementary_cards:
        raise FailedPrecondition(
            "the principal card has all the supplementary cards its program allows",
            reason="SUPPLEMENTARY_LIMIT_REACHED",
            metadata={"max": str(principal_program.max_supplementary_cards)},
        )


def check_group_join(
    group_card: CardFacts,
    group_program: ProgramFacts,
    program_id: str,
    *,
    live_holders: int,
    already_holder: bool,
) -> None:
    """A new holder joins an active card's group account, up to the
    program's number of holders, once."""
    if program_id != group_card.program_id:
        raise InvalidArgument(
            [FieldViolation("program_id", "must be the program of the group card")]
        )
    require_active(group_card.state, group_card.card_id, Action.ISSUE)
    if group_program.holding != Holding.GROUP:
        raise FailedPrecondition(
            "this card is not a group card",
            reason="NOT_A_GROUP_CARD",
            metadata={"card_id": group_card.card_id},
        )
    if already_holder:
        raise FailedPrecondition(
            "the member already holds a card of this group",
            reason="CARD_ALREADY_HELD",
            metadata={"account_id": group_card.account_id},
        )
    if live_holders >= group_program.max_group_holders:
        raise FailedPrecondition(
            "the group has all the holders its program allows",
            reason="GROUP_FULL",
            metadata={"max": str(group_program.max_group_holders)},
        )


def check_spending_limit(limit: SpendingLimit | None, *, supplementary: bool) -> None:
    if limit is None:
        return
    problems = []
    if not supplementary:
        problems.append(FieldViolation("spending_limit", "only for a supplementary card"))
    if len(limit.currency_code) != 3 or not limit.currency_code.isalpha():
        problems.append(FieldViolation("spending_limit.currency_code", "an ISO 4217 code"))
    if limit.minor_units <= 0:
        problems.append(FieldViolation("spending_limit.minor_units", "must be positive"))
    if problems:
        raise InvalidArgument(problems)


def check_link(
    card: CardFacts, program: ProgramFacts, other: CardFacts, other_program: ProgramFacts
) -> None:
    """Two active cards of two members, both of programs that allow links,
    neither linked yet."""
    if card.card_id == other.card_id:
        raise InvalidArgument([FieldViolation("other_card_id", "a card cannot link to itself")])
    for c in (card, other):
        require_active(c.state, c.card_id, Action.LINK)
    for p in (program, other_program):
        if not p.allows_linking:
            raise FailedPrecondition(
                "this card's program does not link cards",
                reason="LINKING_NOT_ALLOWED",
                metadata={"program_id": p.program_id},
            )
    if card.member_id == other.member_id:
        raise FailedPrecondition(
            "linked cards join two different members", reason="SAME_MEMBER", metadata={}
        )
    for c in (card, other):
        if c.linked_card_id:
            raise FailedPrecondition(
                "this card is already linked",
                reason="CARD_ALREADY_LINKED",
                metadata={"card_id": c.card_id, "linked_card_id": c.linked_card_id},
            )
