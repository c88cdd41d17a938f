"""Stored-value accounts, the journal, holds and the per-card day counters.
Each function runs in the caller's unit of work, so that a movement, its
entries, the account's balances and the outbox row commit together."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import BigIntKey, RowByKey, UTCDateTime
from chassis.direct import DialectInsert, Direct, Executor, Insert
from services.cards.domain.stored_value import (
    ACCOUNT_BOOKS,
    Balances,
    Book,
    Channel,
    Entry,
    Funds,
    HoldState,
    MovementKind,
)
from services.cards.store import metadata
from services.cards.store.cards import CardRecord, card_of, cards

NO_FUNDS = Funds()


def _money(name: str, nullable: bool = False) -> sa.Column[int]:
    if nullable:
        return sa.Column(name, sa.BigInteger, nullable=True)
    return sa.Column(name, sa.BigInteger, nullable=False, server_default="0")


sv_accounts = sa.Table(
    "sv_accounts",
    metadata,
    sa.Column("account_id", sa.String(16), primary_key=True),
    sa.Column("currency", sa.String(3), nullable=False),
    _money("paid"),
    _money("bonus"),
    _money("held_paid"),
    _money("held_bonus"),
    sa.Column("opened_at", UTCDateTime, nullable=False),
    sa.Column("closed_at", UTCDateTime, nullable=True),
    sa.CheckConstraint("paid >= 0", name="ck_sv_accounts_paid"),
    sa.CheckConstraint("bonus >= 0", name="ck_sv_accounts_bonus"),
    sa.CheckConstraint("held_paid >= 0", name="ck_sv_accounts_held_paid"),
    sa.CheckConstraint("held_bonus >= 0", name="ck_sv_accounts_held_bonus"),
)

sv_movements = sa.Table(
    "sv_movements",
    metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("movement_id", sa.String(16), nullable=False, unique=True),
    sa.Column("kind", sa.String(10), nullable=False),
    sa.Column("request_id", sa.String(220), nullable=False),
    sa.Column("request_hash", sa.String(64), nullable=False, server_default=""),
    sa.Column("account_id", sa.String(16), nullable=False),
    sa.Column("card_id", sa.String(16), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    _money("amount"),
    # What the spendable funds changed by (signed).
    _money("paid"),
    _money("bonus"),
    # For a debit or a capture: what it took, and how much of that was
    # refunded since.
    _money("taken_paid"),
    _money("taken_bonus"),
    _money("refunded_paid"),
    _money("refunded_bonus"),
    _money("paid_after"),
    _money("bonus_after"),
    _money("held_paid_after"),
    _money("held_bonus_after"),
    sa.Column("channel", sa.String(24), nullable=False, server_default=""),
    sa.Column("reference", sa.String(100), nullable=False, server_default=""),
    sa.Column("note", sa.String(200), nullable=False, server_default=""),
    sa.Column("bonus_rule_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("hold_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("refunds_movement_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("kind", "request_id", name="uq_sv_movements_request"),
    sa.CheckConstraint("refunded_paid <= taken_paid", name="ck_sv_movements_refund_paid"),
    sa.CheckConstraint("refunded_bonus <= taken_bonus", name="ck_sv_movements_refund_bonus"),
    sa.Index("ix_sv_movements_account", "account_id", "seq"),
    sa.Index("ix_sv_movements_card", "card_id", "seq"),
)

sv_entries = sa.Table(
    "sv_entries",
    metadata,
    sa.Column("entry_id", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("movement_id", sa.String(16), nullable=False),
    sa.Column("account_id", sa.String(16), nullable=False),
    sa.Column("book", sa.String(16), nullable=False),
    sa.Column("channel", sa.String(24), nullable=False, server_default=""),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Index("ix_sv_entries_movement", "movement_id"),
    sa.Index("ix_sv_entries_account_book", "account_id", "book"),
)

sv_holds = sa.Table(
    "sv_holds",
    metadata,
    sa.Column("hold_id", sa.String(16), primary_key=True),
    sa.Column("account_id", sa.String(16), nullable=False),
    sa.Column("card_id", sa.String(16), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    _money("paid"),
    _money("bonus"),
    _money("captured_paid"),
    _money("captured_bonus"),
    sa.Column("reference", sa.String(100), nullable=False, server_default=""),
    # The day the hold counted against the card's daily limit.
    sa.Column("local_day", sa.Date, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("hold_movement_id", sa.String(16), nullable=False),
    sa.Column("capture_movement_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("held_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Index("ix_sv_holds_due", "state", "expires_at"),
    sa.Index("ix_sv_holds_account", "account_id", "state"),
)

sv_card_days = sa.Table(
    "sv_card_days",
    metadata,
    sa.Column("card_id", sa.String(16), primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    _money("spent"),
    _money("recharged"),
)


# --- accounts ------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRecord:
    account_id: str
    currency: str
    balances: Balances
    opened_at: dt.datetime
    closed_at: dt.datetime | None


def _account(row: Any, prefix: str = "") -> AccountRecord:
    """From a row with the account's columns, named ``prefix + name`` (a
    joined read's, see ``_labelled``)."""
    values = row._mapping
    return AccountRecord(
        account_id=values[prefix + "account_id"],
        currency=values[prefix + "currency"],
        balances=Balances(
            values[prefix + "paid"],
            values[prefix + "bonus"],
            values[prefix + "held_paid"],
            values[prefix + "held_bonus"],
        ),
        opened_at=values[prefix + "opened_at"],
        closed_at=values[prefix + "closed_at"],
    )


def _labelled(table: sa.Table, prefix: str) -> list[sa.Label[Any]]:
    """A table's columns for a read joined with the cards table, named apart
    from the card's own (both have an account_id, a state...)."""
    return [column.label(prefix + column.name) for column in table.c]


# Built once per dialect (see chassis.db.RowByKey); the values go as parameters.
_OPEN_ACCOUNT = DialectInsert(
    lambda insert: insert(sv_accounts).on_conflict_do_nothing(index_elements=["account_id"])
)


async def open_account(session: Executor, account_id: str, currency: str, now: dt.datetime) -> None:
    """Creates the account on its first movement; a no-op after that."""
    await _OPEN_ACCOUNT.execute(
        session,
        {"account_id": account_id, "currency": currency, "opened_at": now},
    )


_ACCOUNT = RowByKey(sv_accounts, "account_id")


async def get_account(
    session: Executor, account_id: str, *, for_update: bool = False
) -> AccountRecord | None:
    """With ``for_update`` the account is locked until the transaction ends:
    every movement of one account is serialised on this row."""
    row = await _ACCOUNT.first(session, account_id, for_update=for_update)
    return None if row is None else _account(row)


_ACCOUNT_PREFIX = "account__"
# A card by its number with its account (none before the account's first
# movement): ResolveCard's one statement where two would do.
_CARD_BY_NUMBER_WITH_ACCOUNT = Direct(
    sa.select(cards, *_labelled(sv_accounts, _ACCOUNT_PREFIX))
    .select_from(cards.outerjoin(sv_accounts, sv_accounts.c.account_id == cards.c.account_id))
    .where(cards.c.card_number == sa.bindparam("card_number"))
)


async def card_by_number_with_account(
    session: Executor, number: str
) -> tuple[CardRecord, AccountRecord | None] | None:
    row = (await _CARD_BY_NUMBER_WITH_ACCOUNT.execute(session, {"card_number": number})).first()
    if row is None:
        return None
    has_account = row._mapping[_ACCOUNT_PREFIX + "account_id"] is not None
    return card_of(row), _account(row, _ACCOUNT_PREFIX) if has_account else None


# The account of a hold, locked: one statement where reading the hold for
# its account and then locking that would be two (a hold never changes
# account, so the hold read before the lock is as good as one after).
_ACCOUNT_OF_HOLD = Direct(
    sa.select(sv_accounts)
    .where(
        sv_accounts.c.account_id
        == sa.select(sv_holds.c.account_id)
        .where(sv_holds.c.hold_id == sa.bindparam("hold_id"))
        .scalar_subquery()
    )
    .with_for_update()
)


async def lock_account_of_hold(session: AsyncSession, hold_id: str) -> AccountRecord | None:
    """The hold's account, locked until the transaction ends; None when
    there is no such hold."""
    row = (await _ACCOUNT_OF_HOLD.execute(session, {"hold_id": hold_id})).first()
    return None if row is None else _account(row)


# Built once (see chassis.db.RowByKey): every book's change goes as a
# parameter, zero for the books a movement leaves alone. The WHERE clause
# and the CHECK constraints refuse any result below zero even if a caller
# had not locked the row (adding zero to a column never below zero passes).
_BOOK_CHANGES = {
    book: sa.bindparam(f"change_{book.value}", type_=sa.BigInteger) for book in ACCOUNT_BOOKS
}
_APPLY_ENTRIES = Direct(
    sa.update(sv_accounts)
    .where(
        sv_accounts.c.account_id == sa.bindparam("key_account_id"),
        *[sv_accounts.c[book.value] + change >= 0 for book, change in _BOOK_CHANGES.items()],
    )
    .values({book.value: sv_accounts.c[book.value] + ch for book, ch in _BOOK_CHANGES.items()})
    .returning(*(sv_accounts.c[book.value] for book in ACCOUNT_BOOKS))
)
_BALANCES = Direct(
    sa.select(*(sv_accounts.c[book.value] for book in ACCOUNT_BOOKS)).where(
        sv_accounts.c.account_id == sa.bindparam("key_account_id")
    )
)


def _account_changes(entries: list[Entry]) -> dict[Book, int]:
    """What entries add to each of the account's own books."""
    delta = {book: 0 for book in ACCOUNT_BOOKS}
    for entry in entries:
        if entry.book in delta:
            delta[entry.book] += entry.amount
    return delta


async def apply_movements(
    session: Executor, account_id: str, entries_of: list[list[Entry]]
) -> list[Balances]:
    """``apply_entries`` for several movements of the account at once, in
    one update; returns its balances after each (those before the last
    worked back from the ones the update returns)."""
    after = await apply_entries(session, account_id, [e for each in entries_of for e in each])
    afters = [after]
    for entries in reversed(entries_of[1:]):
        change = _account_changes(entries)
        after = Balances(
            after.paid - change[Book.PAID],
            after.bonus - change[Book.BONUS],
            after.held_paid - change[Book.HELD_PAID],
            after.held_bonus - change[Book.HELD_BONUS],
        )
        afters.append(after)
    return afters[::-1]


async def apply_entries(session: Executor, account_id: str, entries: list[Entry]) -> Balances:
    """Adds the account books' entries to its stored balances; returns them
    as they are after."""
    delta = _account_changes(entries)
    params: dict[str, Any] = {"key_account_id": account_id}
    query: Direct
    if any(delta.values()):
        params.update({change.key: delta[book] for book, change in _BOOK_CHANGES.items()})
        query = _APPLY_ENTRIES
    else:
        # Nothing of the account's changes: read its balances, write nothing.
        query = _BALANCES
    row = (await query.execute(session, params)).first()
    if row is None:
        raise LookupError(f"account {account_id} would go below zero or does not exist")
    return Balances(row.paid, row.bonus, row.held_paid, row.held_bonus)


async def any_account(session: AsyncSession) -> bool:
    return (await session.execute(sa.select(sv_accounts.c.account_id).limit(1))).first() is not None


async def close_account(session: AsyncSession, account_id: str, now: dt.datetime) -> None:
    await session.execute(
        sa.update(sv_accounts).where(sv_accounts.c.account_id == account_id).values(closed_at=now)
    )


# --- movements and their entries -------------------------------------------------


@dataclass(frozen=True)
class MovementRecord:
    seq: int
    movement_id: str
    kind: MovementKind
    request_id: str
    request_hash: str
    account_id: str
    card_id: str
    currency: str
    amount: int
    change: Funds
    taken: Funds
    refunded: Funds
    after: Balances
    channel: Channel | None
    reference: str
    note: str
    bonus_rule_id: str
    hold_id: str
    refunds_movement_id: str
    principal: str
    store_id: str
    at: dt.datetime


def _movement(row: Any) -> MovementRecord:
    return MovementRecord(
        seq=row.seq,
        movement_id=row.movement_id,
        kind=MovementKind(row.kind),
        request_id=row.request_id,
        request_hash=row.request_hash,
        account_id=row.account_id,
        card_id=row.card_id,
        currency=row.currency,
        amount=row.amount,
        change=Funds(row.paid, row.bonus),
        taken=Funds(row.taken_paid, row.taken_bonus),
        refunded=Funds(row.refunded_paid, row.refunded_bonus),
        after=Balances(row.paid_after, row.bonus_after, row.held_paid_after, row.held_bonus_after),
        channel=Channel(row.channel) if row.channel else None,
        reference=row.reference,
        note=row.note,
        bonus_rule_id=row.bonus_rule_id,
        hold_id=row.hold_id,
        refunds_movement_id=row.refunds_movement_id,
        principal=row.principal,
        store_id=row.store_id,
        at=row.at,
    )


@dataclass(frozen=True)
class NewMovement:
    movement_id: str
    kind: MovementKind
    request_id: str
    request_hash: str
    account_id: str
    card_id: str
    currency: str
    amount: int
    change: Funds
    entries: list[Entry]
    taken: Funds = NO_FUNDS
    channel: Channel | None = None
    reference: str = ""
    note: str = ""
    bonus_rule_id: str = ""
    hold_id: str = ""
    refunds_movement_id: str = ""


# Built once (see chassis.db.RowByKey); the values go as parameters.
_INSERT_MOVEMENT = Direct(sa.insert(sv_movements).returning(*sv_movements.c))
_INSERT_ENTRIES = Insert(sv_entries)


def _movement_row(
    movement: NewMovement, after: Balances, *, principal: str, store_id: str, now: dt.datetime
) -> dict[str, Any]:
    return dict(
        movement_id=movement.movement_id,
        kind=movement.kind.value,
        request_id=movement.request_id,
        request_hash=movement.request_hash,
        account_id=movement.account_id,
        card_id=movement.card_id,
        currency=movement.currency,
        amount=movement.amount,
        paid=movement.change.paid,
        bonus=movement.change.bonus,
        taken_paid=movement.taken.paid,
        taken_bonus=movement.taken.bonus,
        paid_after=after.paid,
        bonus_after=after.bonus,
        held_paid_after=after.held_paid,
        held_bonus_after=after.held_bonus,
        channel=movement.channel.value if movement.channel else "",
        reference=movement.reference,
        note=movement.note,
        bonus_rule_id=movement.bonus_rule_id,
        hold_id=movement.hold_id,
        refunds_movement_id=movement.refunds_movement_id,
        principal=principal,
        store_id=store_id,
        at=now,
    )


def _entry_rows(movement: NewMovement, now: dt.datetime) -> list[dict[str, Any]]:
    return [
        {
            "movement_id": movement.movement_id,
            "account_id": movement.account_id,
            "book": e.book.value,
            "channel": e.channel.value if e.channel else "",
            "amount": e.amount,
            "at": now,
        }
        for e in movement.entries
    ]


# The columns a movement is written with (``_movement_row``); the others
# take the table's defaults.
_MOVEMENT_COLUMNS = tuple(
    c.name for c in sv_movements.c if c.name not in {"seq", "refunded_paid", "refunded_bonus"}
)
# Two movements in one insert (a hold and its capture), built once.
_INSERT_TWO_MOVEMENTS = Direct(
    sa.insert(sv_movements)
    .values(
        [
            {
                name: sa.bindparam(f"m{i}_{name}", type_=sv_movements.c[name].type)
                for name in _MOVEMENT_COLUMNS
            }
            for i in range(2)
        ]
    )
    .returning(*sv_movements.c)
)


async def record_movement(
    session: Executor,
    movement: NewMovement,
    after: Balances,
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
) -> MovementRecord:
    inserted = await _INSERT_MOVEMENT.execute(
        session, _movement_row(movement, after, principal=principal, store_id=store_id, now=now)
    )
    # As written (its seq included), without reading it back.
    recorded = _movement(inserted.one())
    if movement.entries:
        await _INSERT_ENTRIES.add(session, _entry_rows(movement, now))
    return recorded


async def record_movement_pair(
    session: Executor,
    first: tuple[NewMovement, Balances],
    second: tuple[NewMovement, Balances],
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
) -> tuple[MovementRecord, MovementRecord]:
    """``record_movement`` for two movements (a hold and its capture), each
    with its account's balances after it: both in one insert, their
    entries in another."""
    params: dict[str, Any] = {}
    for i, (movement, after) in enumerate((first, second)):
        row = _movement_row(movement, after, principal=principal, store_id=store_id, now=now)
        params.update({f"m{i}_{name}": value for name, value in row.items()})
    inserted = await _INSERT_TWO_MOVEMENTS.execute(session, params)
    # Matched by id: the order rows come back in is not the order given.
    by_id = {row.movement_id: _movement(row) for row in inserted}
    entries = [e for movement, _ in (first, second) for e in _entry_rows(movement, now)]
    if entries:
        await _INSERT_ENTRIES.add(session, entries)
    return by_id[first[0].movement_id], by_id[second[0].movement_id]


async def get_movement(
    session: AsyncSession, movement_id: str, *, for_update: bool = False
) -> MovementRecord | None:
    query = sa.select(sv_movements).where(sv_movements.c.movement_id == movement_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _movement(row)


_MOVEMENT_BY_REQUEST = RowByKey(sv_movements, "kind", "request_id")


async def movement_by_request(
    session: Executor, kind: MovementKind, request_id: str
) -> MovementRecord | None:
    row = await _MOVEMENT_BY_REQUEST.first(session, kind.value, request_id)
    return None if row is None else _movement(row)


async def add_refunded(session: AsyncSession, movement_id: str, funds: Funds) -> None:
    c = sv_movements.c
    await session.execute(
        sa.update(sv_movements)
        .where(c.movement_id == movement_id)
        .values(
            refunded_paid=c.refunded_paid + funds.paid,
            refunded_bonus=c.refunded_bonus + funds.bonus,
        )
    )


async def movements(
    session: AsyncSession,
    *,
    account_id: str = "",
    card_id: str = "",
    include_account_kinds: tuple[MovementKind, ...] = (),
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    before_seq: int | None = None,
    limit: int = 100,
    after_seq: int | None = None,
    oldest_first: bool = False,
) -> list[MovementRecord]:
    """Newest first (oldest first with ``oldest_first``). By card, with
    ``include_account_kinds`` also the account's movements of those kinds
    whatever card made them."""
    c = sv_movements.c
    query = sa.select(sv_movements)
    if card_id:
        mine = c.card_id == card_id
        if include_account_kinds and account_id:
            mine = sa.or_(
                mine,
                sa.and_(
                    c.account_id == account_id,
                    c.kind.in_([k.value for k in include_account_kinds]),
                ),
            )
        query = query.where(mine)
    elif account_id:
        query = query.where(c.account_id == account_id)
    if start is not None:
        query = query.where(c.at >= start)
    if end is not None:
        query = query.where(c.at < end)
    if before_seq is not None:
        query = query.where(c.seq < before_seq)
    if after_seq is not None:
        query = query.where(c.seq > after_seq)
    query = query.order_by(c.seq.asc() if oldest_first else c.seq.desc()).limit(limit)
    return [_movement(row) for row in await session.execute(query)]


# --- holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class HoldRecord:
    hold_id: str
    account_id: str
    card_id: str
    state: HoldState
    currency: str
    funds: Funds
    captured: Funds
    reference: str
    local_day: dt.date
    expires_at: dt.datetime
    hold_movement_id: str
    capture_movement_id: str
    principal: str
    store_id: str
    held_at: dt.datetime
    finished_at: dt.datetime | None


def _hold(row: Any, prefix: str = "") -> HoldRecord:
    """From a row with the hold's columns, named ``prefix + name`` (a
    joined read's, see ``_labelled``)."""
    values = row._mapping
    return HoldRecord(
        hold_id=values[prefix + "hold_id"],
        account_id=values[prefix + "account_id"],
        card_id=values[prefix + "card_id"],
        state=HoldState(values[prefix + "state"]),
        currency=values[prefix + "currency"],
        funds=Funds(values[prefix + "paid"], values[prefix + "bonus"]),
        captured=Funds(values[prefix + "captured_paid"], values[prefix + "captured_bonus"]),
        reference=values[prefix + "reference"],
        local_day=values[prefix + "local_day"],
        expires_at=values[prefix + "expires_at"],
        hold_movement_id=values[prefix + "hold_movement_id"],
        capture_movement_id=values[prefix + "capture_movement_id"],
        principal=values[prefix + "principal"],
        store_id=values[prefix + "store_id"],
        held_at=values[prefix + "held_at"],
        finished_at=values[prefix + "finished_at"],
    )


_INSERT_HOLD = Insert(sv_holds)


async def insert_hold(session: Executor, hold: HoldRecord) -> None:
    await _INSERT_HOLD.add(
        session,
        [
            dict(
                hold_id=hold.hold_id,
                account_id=hold.account_id,
                card_id=hold.card_id,
                state=hold.state.value,
                currency=hold.currency,
                paid=hold.funds.paid,
                bonus=hold.funds.bonus,
                reference=hold.reference,
                local_day=hold.local_day,
                expires_at=hold.expires_at,
                hold_movement_id=hold.hold_movement_id,
                principal=hold.principal,
                store_id=hold.store_id,
                held_at=hold.held_at,
                # A hold captured as it is made is written finished.
                captured_paid=hold.captured.paid,
                captured_bonus=hold.captured.bonus,
                capture_movement_id=hold.capture_movement_id,
                finished_at=hold.finished_at,
            )
        ],
    )


_HOLD = RowByKey(sv_holds, "hold_id")


async def get_hold(
    session: Executor, hold_id: str, *, for_update: bool = False
) -> HoldRecord | None:
    row = await _HOLD.first(session, hold_id, for_update=for_update)
    return None if row is None else _hold(row)


_HOLD_PREFIX = "hold__"
# A hold, locked, with the card that made it (its movements' events name
# the card's holder and program) and the request hash of the movement of
# this kind already made under this request id, if any: one statement
# where three would do. Read after the account's lock, as the replay check
# must be (see ledger.py).
_HOLD_WITH_CARD = Direct(
    sa.select(
        cards,
        *_labelled(sv_holds, _HOLD_PREFIX),
        sa.select(sv_movements.c.request_hash)
        .where(
            sv_movements.c.kind == sa.bindparam("kind"),
            sv_movements.c.request_id == sa.bindparam("request_id"),
        )
        .scalar_subquery()
        .label("done_request_hash"),
    )
    .join_from(sv_holds, cards, cards.c.card_id == sv_holds.c.card_id)
    .where(sv_holds.c.hold_id == sa.bindparam("hold_id"))
    .with_for_update(of=sv_holds)
)


@dataclass(frozen=True)
class LockedHold:
    hold: HoldRecord
    card: CardRecord
    # The request hash of the movement already made under the request id
    # asked about; None when there is none.
    done_request_hash: str | None


async def locked_hold_with_card(
    session: AsyncSession, hold_id: str, kind: MovementKind, request_id: str
) -> LockedHold | None:
    """The hold, locked until the transaction ends, its card (not locked),
    and whether a movement of ``kind`` was made under ``request_id``. Lock
    the hold's account first (``lock_account_of_hold``)."""
    row = (
        await _HOLD_WITH_CARD.execute(
            session, {"hold_id": hold_id, "kind": kind.value, "request_id": request_id}
        )
    ).first()
    if row is None:
        return None
    return LockedHold(_hold(row, _HOLD_PREFIX), card_of(row), row.done_request_hash)


_FINISH_HOLD = Direct(sa.update(sv_holds).where(sv_holds.c.hold_id == sa.bindparam("key_hold_id")))


async def finish_hold(
    session: AsyncSession,
    hold_id: str,
    state: HoldState,
    now: dt.datetime,
    *,
    captured: Funds = NO_FUNDS,
    capture_movement_id: str = "",
) -> None:
    await _FINISH_HOLD.execute(
        session,
        dict(
            key_hold_id=hold_id,
            state=state.value,
            finished_at=now,
            captured_paid=captured.paid,
            captured_bonus=captured.bonus,
            capture_movement_id=capture_movement_id,
        ),
    )


async def holds_due(session: AsyncSession, now: dt.datetime, limit: int) -> list[str]:
    """Ids of open holds past their time. Each is then handled in a
    transaction of its own that locks its account first, then the hold, as
    every movement does, so the expiry cannot deadlock with a capture."""
    rows = await session.execute(
        sa.select(sv_holds.c.hold_id)
        .where(sv_holds.c.state == HoldState.HELD.value, sv_holds.c.expires_at <= now)
        .order_by(sv_holds.c.expires_at)
        .limit(limit)
    )
    return [r.hold_id for r in rows]


async def open_holds(session: AsyncSession, account_id: str) -> list[str]:
    rows = await session.execute(
        sa.select(sv_holds.c.hold_id).where(
            sv_holds.c.account_id == account_id, sv_holds.c.state == HoldState.HELD.value
        )
    )
    return [r.hold_id for r in rows]


# --- what a card did per day -------------------------------------------------------


_CARD_DAY = RowByKey(sv_card_days, "card_id", "day")


async def card_day(session: Executor, card_id: str, day: dt.date) -> tuple[int, int]:
    """(spent, recharged) on that day."""
    row = await _CARD_DAY.first(session, card_id, day)
    return (0, 0) if row is None else (int(row.spent), int(row.recharged))


_SPENT_SINCE = Direct(
    sa.select(sa.func.coalesce(sa.func.sum(sv_card_days.c.spent), 0)).where(
        sv_card_days.c.card_id == sa.bindparam("card_id"),
        sv_card_days.c.day >= sa.bindparam("first_day"),
    )
)


async def spent_since(session: Executor, card_id: str, first_day: dt.date) -> int:
    result = await _SPENT_SINCE.execute(session, {"card_id": card_id, "first_day": first_day})
    return int(result.scalar_one())


def _add_to_card_day(insert: Any) -> Any:
    # What the row would have been had it been new is what to add to it.
    statement = insert(sv_card_days)
    c = sv_card_days.c
    return statement.on_conflict_do_update(
        index_elements=["card_id", "day"],
        set_={
            "spent": c.spent + statement.excluded.spent,
            "recharged": c.recharged + statement.excluded.recharged,
        },
    )


# Built once per dialect; the values go as parameters.
_ADD_TO_CARD_DAY = DialectInsert(_add_to_card_day)


async def add_to_card_day(
    session: Executor, card_id: str, day: dt.date, *, spent: int = 0, recharged: int = 0
) -> None:
    """Callers hold the account's lock, so the counters of its cards change
    one movement at a time."""
    await _ADD_TO_CARD_DAY.execute(
        session,
        {"card_id": card_id, "day": day, "spent": spent, "recharged": recharged},
    )


# --- verification --------------------------------------------------------------------


async def counts(session: AsyncSession) -> tuple[int, int]:
    """(accounts, movements)."""
    accounts = await session.execute(sa.select(sa.func.count()).select_from(sv_accounts))
    moved = await session.execute(sa.select(sa.func.count()).select_from(sv_movements))
    return int(accounts.scalar_one()), int(moved.scalar_one())


@dataclass(frozen=True)
class LedgerProblem:
    what: str
    subject: str
    detail: str


async def verify(session: AsyncSession) -> list[LedgerProblem]:
    """Every movement's entries sum to zero, and every account's stored
    balances equal the sums of its books' entries."""
    problems: list[LedgerProblem] = []
    e = sv_entries.c
    unbalanced = await session.execute(
        sa.select(e.movement_id, sa.func.sum(e.amount).label("total"))
        .group_by(e.movement_id)
        .having(sa.func.sum(e.amount) != 0)
    )
    for row in unbalanced:
        problems.append(
            LedgerProblem("unbalanced movement", row.movement_id, f"entries sum to {row.total}")
        )
    sums: dict[str, dict[str, int]] = {}
    rows = await session.execute(
        sa.select(e.account_id, e.book, sa.func.sum(e.amount).label("total"))
        .where(e.book.in_([b.value for b in ACCOUNT_BOOKS]))
        .group_by(e.account_id, e.book)
    )
    for book_sum in rows:
        sums.setdefault(book_sum.account_id, {})[book_sum.book] = int(book_sum.total)
    for account in (await session.execute(sa.select(sv_accounts))).all():
        record = _account(account)
        journal = sums.pop(record.account_id, {})
        for book, stored in record.balances.by_book().items():
            summed = journal.get(book.value, 0)
            if summed != stored:
                problems.append(
                    LedgerProblem(
                        "balance differs from journal",
                        record.account_id,
                        f"{book.value}: stored {stored}, journal {summed}",
                    )
                )
    for account_id in sums:
        problems.append(LedgerProblem("entries without an account", account_id, ""))
    movement_ids = sa.select(sv_movements.c.movement_id)
    orphans = await session.execute(
        sa.select(sa.func.count()).where(e.movement_id.not_in(movement_ids))
    )
    if count := int(orphans.scalar_one()):
        problems.append(LedgerProblem("entries without a movement", "", f"{count} entries"))
    return problems
