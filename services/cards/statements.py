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
import io
from collections.abc import Sequence
from typing import Any

from chassis.db import Database, utcnow
from chassis.spreadsheets import amount_format, amount_value
from services.cards.domain.stored_value import MovementKind
from services.cards.store import stored_value as store
from services.cards.store.stored_value import MovementRecord

CONTENT_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
MAX_MOVEMENTS = 100_000
PAGE = 1_000
TIME_FORMAT = "yyyy-mm-dd hh:mm:ss"

# (header, width in characters) of each column, in order.
COLUMNS: tuple[tuple[str, int], ...] = (
    ("Time (UTC)", 20),
    ("Movement ID", 18),
    ("Kind", 10),
    ("Card ID", 18),
    ("Amount", 14),
    ("Paid change", 14),
    ("Bonus change", 14),
    ("Available after", 16),
    ("Held after", 14),
    ("Channel", 20),
    ("Reference", 28),
    ("Note", 36),
    ("Store", 10),
    ("By", 20),
)
# The columns holding amounts (0-based).
AMOUNT_COLUMNS = range(4, 9)


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


def _excel_time(at: dt.datetime) -> dt.datetime:
    """Spreadsheets have no time zones: UTC, as the header says."""
    return at.astimezone(dt.UTC).replace(tzinfo=None)


def build_workbook(movements: Sequence[MovementRecord], *, cut: bool = False) -> bytes:
    """The workbook of these movements, in the order given. Pure."""
    from openpyxl import Workbook  # noqa: PLC0415 - heavy, only when exporting
    from openpyxl.cell import WriteOnlyCell  # noqa: PLC0415
    from openpyxl.styles import Font  # noqa: PLC0415
    from openpyxl.utils import get_column_letter  # noqa: PLC0415

    book = Workbook(write_only=True)
    sheet: Any = book.create_sheet("Statement")
    # In a write-only sheet, the panes and widths must be set before the
    # first row.
    sheet.freeze_panes = "A2"
    for index, (_header, width) in enumerate(COLUMNS, start=1):
        sheet.column_dimensions[get_column_letter(index)].width = width

    def text(value: str) -> Any:
        cell = WriteOnlyCell(sheet, value=value or None)
        # A note or a reference someone typed as "=..." stays text: never a
        # formula the spreadsheet would run.
        if cell.data_type == "f":
            cell.data_type = "s"
        return cell

    def amount(minor_units: int, currency: str) -> Any:
        cell = WriteOnlyCell(sheet, value=amount_value(minor_units, currency))
        cell.number_format = amount_format(currency)
        return cell

    bold = Font(bold=True)
    headers = []
    # Every account is kept in the chain's one currency.
    currency = movements[0].currency if movements else ""
    for index, (header, _width) in enumerate(COLUMNS):
        title = f"{header} ({currency})" if currency and index in AMOUNT_COLUMNS else header
        cell = WriteOnlyCell(sheet, value=title)
        cell.font = bold
        headers.append(cell)
    sheet.append(headers)
    for m in movements:
        at = WriteOnlyCell(sheet, value=_excel_time(m.at))
        at.number_format = TIME_FORMAT
        c = m.currency
        sheet.append(
            [
                at,
                text(m.movement_id),
                text(m.kind.value),
                text(m.card_id),
                amount(m.amount, c),
                amount(m.change.paid, c),
                amount(m.change.bonus, c),
                amount(m.after.available, c),
                amount(m.after.held, c),
                text(m.channel.value if m.channel else ""),
                text(m.reference),
                text(m.note),
                text(m.store_id),
                text(m.principal),
            ]
        )
    if cut and movements:
        last = movements[-1]
        sheet.append(
            [
                text(
                    f"Cut at {len(movements):,} movements: the last is {last.movement_id} at "
                    f"{_excel_time(last.at).isoformat(sep=' ')} UTC; export again from that "
                    "time for the rest."
                )
            ]
        )
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()
