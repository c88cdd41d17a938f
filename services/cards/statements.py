"""A stored-value statement as an XLSX workbook: an account's (or a card's)
movements in a time window, oldest first, one row each, amounts in the
currency's units as numbers a spreadsheet can add up.

The movements are read a page at a time; the workbook is written in a
worker thread (openpyxl is pure Python and slow on large sheets), so the
event loop keeps serving calls meanwhile. A statement stops at
MAX_MOVEMENTS rows and says so in its last row.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

from chassis.db import Database, utcnow
from chassis.spreadsheets import Column, write_xlsx
from services.cards.domain.stored_value import MovementKind
from services.cards.store import stored_value as store
from services.cards.store.stored_value import MovementRecord

MAX_MOVEMENTS = 100_000
PAGE = 1_000

COLUMNS = (
    Column("Time (UTC)", 20, "time"),
    Column("Movement ID", 18),
    Column("Kind", 10),
    Column("Card ID", 18),
    Column("Amount", 14, "amount"),
    Column("Paid change", 14, "amount"),
    Column("Bonus change", 14, "amount"),
    Column("Available after", 16, "amount"),
    Column("Held after", 14, "amount"),
    Column("Channel", 20),
    Column("Reference", 28),
    Column("Note", 36),
    Column("Store", 10),
    Column("By", 20),
)


def file_name(account_id: str, card_id: str, today: dt.date) -> str:
    return f"statement-{card_id or account_id}-{today:%Y%m%d}.xlsx"


async def statement_movements(
    db: Database,
    *,
    account_id: str,
    card_id: str,
    include_account_kinds: tuple[MovementKind, ...],
    start: dt.datetime | None,
    end: dt.datetime | None,
    limit: int | None = None,
) -> tuple[list[MovementRecord], bool]:
    """The movements of the statement, oldest first, at most ``limit``
    (MAX_MOVEMENTS by default); and whether there were more."""
    limit = MAX_MOVEMENTS if limit is None else limit
    found: list[MovementRecord] = []
    after: int | None = None
    while len(found) <= limit:
        size = min(PAGE, limit + 1 - len(found))
        async with db.sessions() as session:
            page = await store.movements(
                session,
                account_id=account_id,
                card_id=card_id,
                include_account_kinds=include_account_kinds,
                start=start,
                end=end,
                after_seq=after,
                oldest_first=True,
                limit=size,
            )
        found.extend(page)
        if len(page) < size:
            break
        after = page[-1].seq
    return found[:limit], len(found) > limit


async def statement_workbook(
    db: Database,
    *,
    account_id: str,
    card_id: str,
    include_account_kinds: tuple[MovementKind, ...],
    start: dt.datetime | None,
    end: dt.datetime | None,
) -> tuple[str, bytes]:
    """(file name, XLSX bytes) of the statement of an account, or of one of
    its cards (with ``include_account_kinds``: also the account's
    movements of those kinds whatever card made them)."""
    movements, cut = await statement_movements(
        db,
        account_id=account_id,
        card_id=card_id,
        include_account_kinds=include_account_kinds,
        start=start,
        end=end,
    )
    data = await asyncio.to_thread(build_workbook, movements, cut=cut)
    return file_name(account_id, card_id, utcnow().date()), data


def build_workbook(movements: Sequence[MovementRecord], *, cut: bool = False) -> bytes:
    """The workbook of these movements, in the order given. Pure."""
    footer = ""
    if cut and movements:
        last = movements[-1]
        at = last.at.astimezone(dt.UTC).replace(tzinfo=None).isoformat(sep=" ")
        footer = (
            f"Cut at {len(movements):,} movements: the last is {last.movement_id} at "
            f"{at} UTC; export again from that time for the rest."
        )
    return write_xlsx(
        "Statement",
        COLUMNS,
        (
            (
                m.at,
                m.movement_id,
                m.kind.value,
                m.card_id,
                m.amount,
                m.change.paid,
                m.change.bonus,
                m.after.available,
                m.after.held,
                m.channel.value if m.channel else "",
                m.reference,
                m.note,
                m.store_id,
                m.principal,
            )
            for m in movements
        ),
        # Every account is kept in the chain's one currency.
        currency=movements[0].currency if movements else "",
        footer=footer,
    )
