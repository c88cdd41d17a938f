"""Cards and their history. Each function runs inside the caller's unit of
work so that a card's state, its history and the outbox row commit
together. Card rows are never deleted: a number, once given, stays taken."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import BigIntKey, RowByKey, UTCDateTime
from chassis.direct import Direct, Executor
from chassis.paging import newest_first
from services.cards.domain.cards import (
    LIVE_STATES,
    Action,
    CardFacts,
    CardState,
    Role,
    SpendingLimit,
)
from services.cards.store import metadata

cards = sa.Table(
    "cards",
    metadata,
    sa.Column("card_id", sa.String(16), primary_key=True),
    # Unique across programs and across time.
    sa.Column("card_number", sa.String(19), nullable=False, unique=True),
    sa.Column("program_id", sa.String(32), nullable=False),
    sa.Column("member_id", sa.String(16), nullable=False),
    sa.Column("account_id", sa.String(16), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("principal_card_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("limit_currency", sa.String(3), nullable=True),
    sa.Column("limit_minor_units", sa.BigInteger, nullable=True),
    sa.Column("linked_card_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("replaces_card_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("replaced_by_card_id", sa.String(16), nullable=False, server_default=""),
    # The first card of a chain of replacements: the history follows it.
    sa.Column("lineage_id", sa.String(16), nullable=False),
    sa.Column("issued_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.Column("issued_by", sa.String(100), nullable=False),
    sa.Column("issued_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("state_changed_at", UTCDateTime, nullable=False),
    sa.Column("state_changed_by", sa.String(100), nullable=False),
    sa.Column("state_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("state_reason", sa.String(200), nullable=False, server_default=""),
    sa.Column("pin_hash", sa.String(200), nullable=True),
    sa.Column("pin_wrong_tries", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("pin_locked_until", UTCDateTime, nullable=True),
    # Co-brand cards: the program's partner and the partner's own reference.
    sa.Column("partner_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("partner_reference", sa.String(64), nullable=True),
    sa.Index("ix_cards_member", "member_id", "issued_at"),
    sa.Index("ix_cards_account", "account_id", "issued_at"),
    sa.Index("ix_cards_principal", "principal_card_id"),
    sa.Index("ix_cards_expiry", "state", "expires_at"),
    sa.Index("ix_cards_lineage", "lineage_id"),
    sa.Index("ix_cards_partner_reference", "partner_id", "partner_reference", unique=True),
)

card_history = sa.Table(
    "card_history",
    metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("card_id", sa.String(16), nullable=False),
    sa.Column("lineage_id", sa.String(16), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("from_state", sa.String(10), nullable=False, server_default=""),
    sa.Column("to_state", sa.String(10), nullable=False, server_default=""),
    sa.Column("reason", sa.String(200), nullable=False, server_default=""),
    sa.Column("related_card_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Index("ix_card_history_lineage", "lineage_id", "seq"),
)

# The feed of changes to co-brand cards that partners read in order through
# PartnerCardsService. ``seq`` counts per partner, taken from the partner's
# row (see ``next_change_seq``), so a reader never sees a later change
# before an earlier one has committed.
partner_card_changes = sa.Table(
    "partner_card_changes",
    metadata,
    sa.Column("partner_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("card_id", sa.String(16), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("related_card_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("at", UTCDateTime, nullable=False),
)

_LIVE = [s.value for s in LIVE_STATES]


@dataclass(frozen=True)
class Stamp:
    principal: str
    store_id: str
    at: dt.datetime


@dataclass(frozen=True)
class CardRecord:
    card_id: str
    card_number: str
    program_id: str
    member_id: str
    account_id: str
    role: Role
    state: CardState
    principal_card_id: str
    spending_limit: SpendingLimit | None
    linked_card_id: str
    replaces_card_id: str
    replaced_by_card_id: str
    lineage_id: str
    issued_at: dt.datetime
    expires_at: dt.datetime | None
    issued_by: str
    issued_store_id: str
    state_changed_at: dt.datetime
    state_changed_by: str
    state_store_id: str
    state_reason: str
    pin_hash: str | None
    pin_wrong_tries: int
    pin_locked_until: dt.datetime | None
    partner_id: str = ""
    partner_reference: str | None = None

    @property
    def facts(self) -> CardFacts:
        return CardFacts(
            card_id=self.card_id,
            program_id=self.program_id,
            member_id=self.member_id,
            account_id=self.account_id,
            state=self.state,
            role=self.role,
            linked_card_id=self.linked_card_id,
        )


def _record(row: Any) -> CardRecord:
    limit = None
    if row.limit_minor_units is not None:
        limit = SpendingLimit(row.limit_currency or "", int(row.limit_minor_units))
    return CardRecord(
        card_id=row.card_id,
        card_number=row.card_number,
        program_id=row.program_id,
        member_id=row.member_id,
        account_id=row.account_id,
        role=Role(row.role),
        state=CardState(row.state),
        principal_card_id=row.principal_card_id,
        spending_limit=limit,
        linked_card_id=row.linked_card_id,
        replaces_card_id=row.replaces_card_id,
        replaced_by_card_id=row.replaced_by_card_id,
        lineage_id=row.lineage_id,
        issued_at=row.issued_at,
        expires_at=row.expires_at,
        issued_by=row.issued_by,
        issued_store_id=row.issued_store_id,
        state_changed_at=row.state_changed_at,
        state_changed_by=row.state_changed_by,
        state_store_id=row.state_store_id,
        state_reason=row.state_reason,
        pin_hash=row.pin_hash,
        pin_wrong_tries=row.pin_wrong_tries,
        pin_locked_until=row.pin_locked_until,
        partner_id=row.partner_id,
        partner_reference=row.partner_reference,
    )


def card_of(row: Any) -> CardRecord:
    """The card in a row with the cards table's columns under their own
    names: a read of cards joined with another table's."""
    return _record(row)


@dataclass(frozen=True)
class NewCard:
    card_id: str
    card_number: str
    program_id: str
    member_id: str
    account_id: str
    role: Role
    lineage_id: str
    expires_at: dt.datetime | None
    principal_card_id: str = ""
    spending_limit: SpendingLimit | None = None
    replaces_card_id: str = ""
    linked_card_id: str = ""
    pin_hash: str | None = None
    partner_id: str = ""
    partner_reference: str | None = None


async def insert_card(session: AsyncSession, card: NewCard, stamp: Stamp) -> bool:
    """Inserts the card unless its number is taken (by a program whose range
    overlaps, created concurrently); False then, and the caller draws the
    next number. ON CONFLICT waits for a concurrent insert of the same
    number to commit or roll back, so two cards never share one."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(cards)
        .values(
            card_id=card.card_id,
            card_number=card.card_number,
            program_id=card.program_id,
            member_id=card.member_id,
            account_id=card.account_id,
            role=card.role.value,
            state=CardState.ACTIVE.value,
            principal_card_id=card.principal_card_id,
            limit_currency=card.spending_limit.currency_code if card.spending_limit else None,
            limit_minor_units=card.spending_limit.minor_units if card.spending_limit else None,
            linked_card_id=card.linked_card_id,
            replaces_card_id=card.replaces_card_id,
            lineage_id=card.lineage_id,
            issued_at=stamp.at,
            expires_at=card.expires_at,
            issued_by=stamp.principal,
            issued_store_id=stamp.store_id,
            state_changed_at=stamp.at,
            state_changed_by=stamp.principal,
            state_store_id=stamp.store_id,
            pin_hash=card.pin_hash,
            partner_id=card.partner_id,
            partner_reference=card.partner_reference,
        )
        .on_conflict_do_nothing(index_elements=["card_number"])
    )
    result = await session.execute(statement)
    return bool(getattr(result, "rowcount", 0) == 1)


async def number_taken(session: AsyncSession, number: str) -> bool:
    row = await session.execute(sa.select(cards.c.card_id).where(cards.c.card_number == number))
    return row.first() is not None


_CARD = RowByKey(cards, "card_id")


async def get_card(
    session: Executor, card_id: str, *, for_update: bool = False
) -> CardRecord | None:
    row = await _CARD.first(session, card_id, for_update=for_update)
    return None if row is None else _record(row)


_CARD_BY_NUMBER = RowByKey(cards, "card_number")


async def card_by_number(session: AsyncSession, number: str) -> CardRecord | None:
    row = await _CARD_BY_NUMBER.first(session, number)
    return None if row is None else _record(row)


async def cards_of(
    session: AsyncSession,
    *,
    member_id: str = "",
    account_id: str = "",
    after: tuple[dt.datetime, str] | None = None,
    limit: int = 100,
) -> list[CardRecord]:
    """Newest first."""
    query = sa.select(cards)
    if member_id:
        query = query.where(cards.c.member_id == member_id)
    if account_id:
        query = query.where(cards.c.account_id == account_id)
    query = newest_first(query, cards.c.issued_at, cards.c.card_id, after, limit)
    return [_record(row) for row in await session.execute(query)]


async def count_live(
    session: AsyncSession,
    *,
    program_id: str = "",
    member_id: str = "",
    account_id: str = "",
    principal_card_id: str = "",
    exclude_roles: Sequence[Role] = (),
) -> int:
    query = sa.select(sa.func.count()).where(cards.c.state.in_(_LIVE))
    if program_id:
        query = query.where(cards.c.program_id == program_id)
    if member_id:
        query = query.where(cards.c.member_id == member_id)
    if account_id:
        query = query.where(cards.c.account_id == account_id)
    if principal_card_id:
        query = query.where(cards.c.principal_card_id == principal_card_id)
    if exclude_roles:
        query = query.where(cards.c.role.not_in([r.value for r in exclude_roles]))
    return int((await session.execute(query)).scalar_one())


async def set_state(
    session: AsyncSession, card_id: str, state: CardState, stamp: Stamp, reason: str
) -> None:
    await session.execute(
        sa.update(cards)
        .where(cards.c.card_id == card_id)
        .values(
            state=state.value,
            state_changed_at=stamp.at,
            state_changed_by=stamp.principal,
            state_store_id=stamp.store_id,
            state_reason=reason,
        )
    )


# Sets the columns it is given (``update_card``).
_UPDATE_CARD = Direct(sa.update(cards).where(cards.c.card_id == sa.bindparam("key_card_id")))


async def update_card(session: Executor, card_id: str, **values: Any) -> None:
    await _UPDATE_CARD.execute(session, {"key_card_id": card_id, **values})


async def move_relations(session: AsyncSession, old_card_id: str, new_card_id: str) -> None:
    """A replacement takes the old card's place: supplementary cards hang
    off the new card and a linked card points at it."""
    await session.execute(
        sa.update(cards)
        .where(cards.c.principal_card_id == old_card_id)
        .values(principal_card_id=new_card_id)
    )
    await session.execute(
        sa.update(cards)
        .where(cards.c.linked_card_id == old_card_id, cards.c.card_id != new_card_id)
        .values(linked_card_id=new_card_id)
    )


async def record_history(
    session: AsyncSession,
    card: CardRecord,
    action: Action,
    stamp: Stamp,
    *,
    before: CardState | None = None,
    after: CardState | None = None,
    reason: str = "",
    related_card_id: str = "",
) -> None:
    await session.execute(
        sa.insert(card_history).values(
            card_id=card.card_id,
            lineage_id=card.lineage_id,
            action=action.value,
            from_state=before.value if before else "",
            to_state=after.value if after else "",
            reason=reason,
            related_card_id=related_card_id,
            principal=stamp.principal,
            store_id=stamp.store_id,
            at=stamp.at,
        )
    )
    if card.partner_id:
        # What happens to a co-brand card is also the partner's to know.
        await session.execute(
            sa.insert(partner_card_changes).values(
                partner_id=card.partner_id,
                seq=await next_change_seq(session, card.partner_id),
                card_id=card.card_id,
                action=action.value,
                state=(after or card.state).value,
                related_card_id=related_card_id,
                at=stamp.at,
            )
        )


async def next_change_seq(session: AsyncSession, partner_id: str) -> int:
    """The partner's next change number. The update locks the partner's row
    until this transaction ends, so numbers are handed out in commit order:
    a later number cannot commit while an earlier one is still open. (Plain
    SQL: the partners table is declared in store/partners, which imports
    this module.)"""
    result = await session.execute(
        sa.text(
            "UPDATE partners SET change_seq = change_seq + 1 WHERE partner_id = :p "
            "RETURNING change_seq"
        ),
        {"p": partner_id},
    )
    return int(result.scalar_one())


@dataclass(frozen=True)
class HistoryEntry:
    seq: int
    card_id: str
    action: Action
    from_state: CardState | None
    to_state: CardState | None
    reason: str
    related_card_id: str
    stamp: Stamp


async def history(
    session: AsyncSession, lineage_id: str, *, after_seq: int, limit: int
) -> list[HistoryEntry]:
    rows = await session.execute(
        sa.select(card_history)
        .where(card_history.c.lineage_id == lineage_id, card_history.c.seq > after_seq)
        .order_by(card_history.c.seq)
        .limit(limit)
    )
    return [
        HistoryEntry(
            seq=r.seq,
            card_id=r.card_id,
            action=Action(r.action),
            from_state=CardState(r.from_state) if r.from_state else None,
            to_state=CardState(r.to_state) if r.to_state else None,
            reason=r.reason,
            related_card_id=r.related_card_id,
            stamp=Stamp(r.principal, r.store_id, r.at),
        )
        for r in rows
    ]


async def due_to_expire(session: AsyncSession, now: dt.datetime, limit: int) -> list[CardRecord]:
    """Live cards past their validity, claimed for this transaction (other
    replicas skip them)."""
    query = (
        sa.select(cards)
        .where(cards.c.state.in_(_LIVE), cards.c.expires_at <= now)
        .order_by(cards.c.expires_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return [_record(row) for row in await session.execute(query)]


async def live_cards_of_member(session: AsyncSession, member_id: str) -> list[CardRecord]:
    rows = await session.execute(
        sa.select(cards)
        .where(cards.c.member_id == member_id, cards.c.state.in_(_LIVE))
        .order_by(cards.c.issued_at)
        .with_for_update()
    )
    return [_record(row) for row in rows]


async def live_supplementaries(session: AsyncSession, principal_card_id: str) -> list[CardRecord]:
    rows = await session.execute(
        sa.select(cards)
        .where(cards.c.principal_card_id == principal_card_id, cards.c.state.in_(_LIVE))
        .order_by(cards.c.card_id)
        .with_for_update()
    )
    return [_record(row) for row in rows]


async def all_cards_of_member(session: AsyncSession, member_id: str) -> list[CardRecord]:
    rows = await session.execute(
        sa.select(cards).where(cards.c.member_id == member_id).order_by(cards.c.issued_at)
    )
    return [_record(row) for row in rows]


async def change_holder(session: AsyncSession, from_member: str, to_member: str) -> None:
    await session.execute(
        sa.update(cards).where(cards.c.member_id == from_member).values(member_id=to_member)
    )
