"""Writing what the domain decided: a card's move between states, a new
card with a fresh number. Each runs in the caller's unit of work and leaves
the card's row, its history and the outbox row in the same transaction;
shared by the gRPC edge, the expiry worker and the members consumer."""

from __future__ import annotations

import dataclasses

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.errors import AlreadyExists, ResourceExhausted
from services.cards import events, ledger
from services.cards.domain import cards as domain
from services.cards.domain.cards import Action, CardState, Role
from services.cards.domain.programs import card_number
from services.cards.store import cards as store
from services.cards.store import programs as program_store
from services.cards.store.cards import CardRecord, NewCard, Stamp
from services.cards.store.programs import ProgramRecord

# A drawn number is taken only when another program's range overlaps this
# one's (refused at creation, so only after a race); a few draws suffice.
MAX_DRAWS = 20


async def move(
    session: AsyncSession,
    card: CardRecord,
    action: Action,
    stamp: Stamp,
    reason: str,
    *,
    new_card_id: str = "",
    member_erased: bool = False,
) -> CardState:
    """One lifecycle move of a card read FOR UPDATE in this transaction."""
    after = domain.transition(card.state, action, card.card_id)
    await store.set_state(session, card.card_id, after, stamp, reason)
    if new_card_id:
        await store.update_card(session, card.card_id, replaced_by_card_id=new_card_id)
    await store.record_history(
        session,
        card,
        action,
        stamp,
        before=card.state,
        after=after,
        reason=reason,
        related_card_id=new_card_id,
    )
    await events.card_moved(
        session, card, action, stamp, new_card_id=new_card_id, member_erased=member_erased
    )
    return after


async def _issued(
    session: AsyncSession, program: ProgramRecord, card: NewCard, stamp: Stamp, reason: str
) -> CardRecord:
    created = await store.get_card(session, card.card_id)
    assert created is not None  # written just now, in this transaction
    await store.record_history(
        session,
        created,
        Action.ISSUE,
        stamp,
        after=CardState.ACTIVE,
        reason=reason,
        related_card_id=card.replaces_card_id,
    )
    await events.card_issued(session, created, program.program.form, stamp)
    return created


async def issue(
    session: AsyncSession, program: ProgramRecord, card: NewCard, stamp: Stamp, reason: str = ""
) -> CardRecord:
    """Writes the card, its history and ``card.issued``. A card with a
    number (one a partner printed) keeps it, unless it is taken
    (ALREADY_EXISTS); otherwise it gets the program's next number."""
    if card.card_number:
        if not await store.insert_card(session, card, stamp):
            raise AlreadyExists(
                "a card with this number exists",
                reason="CARD_NUMBER_TAKEN",
                metadata={"program_id": program.program.program_id},
            )
        return await _issued(session, program, card, stamp, reason)
    fmt = program.program.number_format
    for _ in range(MAX_DRAWS):
        serial = await program_store.take_serial(session, program.program.program_id, fmt.capacity)
        if serial is None:
            break
        number = card_number(fmt, program.spread, serial)
        card = dataclasses.replace(card, card_number=number)
        if await store.insert_card(session, card, stamp):
            return await _issued(session, program, card, stamp, reason)
    raise ResourceExhausted(
        "the program's number range has no number left",
        reason="NUMBER_RANGE_EXHAUSTED",
        metadata={"program_id": program.program.program_id},
    )


async def replace(
    session: AsyncSession, old: CardRecord, program: ProgramRecord, stamp: Stamp, reason: str
) -> CardRecord:
    """A new card for a lost or damaged one: same program, holder, account,
    validity, relations and PIN; a new number; the old card is dead."""
    domain.transition(old.state, Action.REPLACE, old.card_id)
    if old.partner_reference is not None:
        # The partner's reference names the card in use: it moves along.
        await store.update_card(session, old.card_id, partner_reference=None)
    new = await issue(
        session,
        program,
        NewCard(
            card_id=domain.new_card_id(),
            card_number="",
            program_id=old.program_id,
            member_id=old.member_id,
            account_id=old.account_id,
            role=old.role,
            lineage_id=old.lineage_id,
            expires_at=old.expires_at,
            principal_card_id=old.principal_card_id,
            spending_limit=old.spending_limit,
            replaces_card_id=old.card_id,
            linked_card_id=old.linked_card_id,
            pin_hash=old.pin_hash,
            partner_id=old.partner_id,
            partner_reference=old.partner_reference,
        ),
        stamp,
        reason,
    )
    await move(session, old, Action.REPLACE, stamp, reason, new_card_id=new.card_id)
    await store.move_relations(session, old.card_id, new.card_id)
    if old.linked_card_id:
        await store.update_card(session, old.card_id, linked_card_id="")
    return new


async def cancel(
    session: AsyncSession,
    card: CardRecord,
    stamp: Stamp,
    reason: str,
    *,
    member_erased: bool = False,
) -> None:
    """Cancels a card read FOR UPDATE. A principal card takes its live
    supplementary cards with it (they draw on its account); when no live
    card is left on the account, its stored value is settled by the
    program's rule and the account closed. While a sale holds some of the
    stored value a staff cancel is refused (STORED_VALUE_ON_HOLD); an
    erasure voids the hold."""
    await move(session, card, Action.CANCEL, stamp, reason, member_erased=member_erased)
    if card.role == Role.PRINCIPAL:
        for supplementary in await store.live_supplementaries(session, card.card_id):
            await move(
                session,
                supplementary,
                Action.CANCEL,
                stamp,
                "the principal card was cancelled",
            )
    if await store.count_live(session, account_id=card.account_id):
        return
    program = await program_store.get_program(session, card.program_id)
    assert program is not None  # a card's program is never deleted
    await ledger.settle(session, card, program, stamp, void_holds=member_erased)
