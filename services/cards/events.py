"""What the cards service publishes: one event per change of a card's
state, through the outbox in the same transaction as the change. No event
carries a personal value or a card number."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.direct import Executor
from chassis.outbox import enqueue, enqueue_many
from cornucopia.cards.v1 import events_pb2
from services.cards.convert import FORMS_PROTO, ROLES_PROTO, audit_stamp, timestamp
from services.cards.convert_stored_value import channel_to_proto, money
from services.cards.domain.cards import Action
from services.cards.domain.programs import Form
from services.cards.domain.stored_value import MovementKind
from services.cards.store.cards import CardRecord, Stamp
from services.cards.store.stored_value import MovementRecord

SOURCE = "cornucopia/cards"
CARD_ISSUED = "cards.v1.card.issued"
CARD_REPORTED_LOST = "cards.v1.card.reported_lost"
CARD_LOSS_CANCELLED = "cards.v1.card.loss_cancelled"
CARD_FROZEN = "cards.v1.card.frozen"
CARD_UNFROZEN = "cards.v1.card.unfrozen"
CARD_REPLACED = "cards.v1.card.replaced"
CARD_CANCELLED = "cards.v1.card.cancelled"
CARD_EXPIRED = "cards.v1.card.expired"
STORED_VALUE_SUBJECTS = {
    MovementKind.RECHARGE: "cards.v1.stored_value.recharged",
    MovementKind.HOLD: "cards.v1.stored_value.held",
    MovementKind.CAPTURE: "cards.v1.stored_value.captured",
    MovementKind.RELEASE: "cards.v1.stored_value.voided",
    MovementKind.DEBIT: "cards.v1.stored_value.debited",
    MovementKind.REFUND: "cards.v1.stored_value.refunded",
}
STORED_VALUE_SETTLED = "cards.v1.stored_value.settled"


async def publish(session: Executor, subject: str, message: Message) -> str:
    return await enqueue(session, source=SOURCE, subject=subject, message=message)


async def card_issued(session: AsyncSession, card: CardRecord, form: Form, stamp: Stamp) -> str:
    message = events_pb2.CardIssued(
        card_id=card.card_id,
        program_id=card.program_id,
        member_id=card.member_id,
        account_id=card.account_id,
        role=ROLES_PROTO[card.role],
        form=FORMS_PROTO[form],
        principal_card_id=card.principal_card_id,
        replaces_card_id=card.replaces_card_id,
        stamp=audit_stamp(stamp),
    )
    if card.expires_at is not None:
        message.expire_time.CopyFrom(timestamp(card.expires_at))
    return await publish(session, CARD_ISSUED, message)


async def card_moved(
    session: AsyncSession,
    card: CardRecord,
    action: Action,
    stamp: Stamp,
    *,
    new_card_id: str = "",
    member_erased: bool = False,
) -> str:
    """The event of one lifecycle move of ``card`` (as it was before)."""
    message: Any
    if action == Action.REPORT_LOST:
        subject, message = CARD_REPORTED_LOST, events_pb2.CardReportedLost()
    elif action == Action.CANCEL_LOSS:
        subject, message = CARD_LOSS_CANCELLED, events_pb2.CardLossCancelled()
    elif action == Action.FREEZE:
        subject, message = CARD_FROZEN, events_pb2.CardFrozen()
    elif action == Action.UNFREEZE:
        subject, message = CARD_UNFROZEN, events_pb2.CardUnfrozen()
    elif action == Action.REPLACE:
        subject, message = CARD_REPLACED, events_pb2.CardReplaced(new_card_id=new_card_id)
    elif action == Action.CANCEL:
        cause = (
            events_pb2.CANCEL_CAUSE_MEMBER_ERASED
            if member_erased
            else events_pb2.CANCEL_CAUSE_STAFF
        )
        subject, message = CARD_CANCELLED, events_pb2.CardCancelled(cause=cause)
    elif action == Action.EXPIRE:
        subject, message = CARD_EXPIRED, events_pb2.CardExpired()
        if card.expires_at is not None:
            message.expire_time.CopyFrom(timestamp(card.expires_at))
    else:
        raise ValueError(f"{action} is not a lifecycle move")
    # Every card event names the card, its program, holder and account.
    message.card_id = card.card_id
    message.program_id = card.program_id
    message.member_id = card.member_id
    message.account_id = card.account_id
    message.stamp.CopyFrom(audit_stamp(stamp))
    return await publish(session, subject, message)


async def stored_value_moved(
    session: AsyncSession,
    movement: MovementRecord,
    card: CardRecord,
    stamp: Stamp,
    *,
    expire_time: dt.datetime | None = None,
    expired: bool = False,
) -> str:
    """The event of one movement, on the subject of its kind. The card is
    the one that made it (for a refund, the card that paid)."""
    subject, message = stored_value_event(
        movement, card, stamp, expire_time=expire_time, expired=expired
    )
    return await publish(session, subject, message)


async def stored_values_moved(
    session: Executor, events: Sequence[tuple[str, Message]]
) -> list[str]:
    """Events of ``stored_value_event`` written in one insert."""
    return await enqueue_many(session, source=SOURCE, events=events)


def stored_value_event(
    movement: MovementRecord,
    card: CardRecord,
    stamp: Stamp,
    *,
    expire_time: dt.datetime | None = None,
    expired: bool = False,
) -> tuple[str, Message]:
    """The subject and event of one movement (see ``stored_value_moved``)."""
    currency = movement.currency
    moved = events_pb2.StoredValueMoved(
        movement_id=movement.movement_id,
        account_id=movement.account_id,
        card_id=movement.card_id,
        member_id=card.member_id,
        program_id=card.program_id,
        amount=money(currency, movement.amount),
        paid=money(currency, movement.change.paid),
        bonus=money(currency, movement.change.bonus),
        available_after=money(currency, movement.after.available),
        held_after=money(currency, movement.after.held),
        channel=channel_to_proto(movement.channel),
        hold_id=movement.hold_id,
        refunds_movement_id=movement.refunds_movement_id,
        reference=movement.reference,
        stamp=audit_stamp(stamp),
    )
    message: Message
    if movement.kind == MovementKind.RECHARGE:
        message = events_pb2.StoredValueRecharged(
            movement=moved, bonus_rule_id=movement.bonus_rule_id
        )
    elif movement.kind == MovementKind.HOLD:
        message = events_pb2.StoredValueHeld(movement=moved)
        if expire_time is not None:
            message.expire_time.CopyFrom(timestamp(expire_time))
    elif movement.kind == MovementKind.CAPTURE:
        message = events_pb2.StoredValueCaptured(movement=moved)
    elif movement.kind == MovementKind.RELEASE:
        message = events_pb2.StoredValueVoided(movement=moved, expired=expired)
    elif movement.kind == MovementKind.DEBIT:
        message = events_pb2.StoredValueDebited(movement=moved)
    elif movement.kind == MovementKind.REFUND:
        message = events_pb2.StoredValueRefunded(movement=moved)
    else:
        raise ValueError(f"{movement.kind} has no event of its own")
    return STORED_VALUE_SUBJECTS[movement.kind], message


async def stored_value_settled(
    session: AsyncSession,
    card: CardRecord,
    currency: str,
    *,
    paid_out: int,
    forfeited: int,
    stamp: Stamp,
) -> str:
    return await publish(
        session,
        STORED_VALUE_SETTLED,
        events_pb2.StoredValueSettled(
            account_id=card.account_id,
            card_id=card.card_id,
            member_id=card.member_id,
            paid_out=money(currency, paid_out),
            forfeited=money(currency, forfeited),
            stamp=audit_stamp(stamp),
        ),
    )
