"""Spreadsheets people upload: a CSV (UTF-8, with or without a byte order
mark) or an XLSX workbook (its first sheet), read as a header row and then
records, each with the row number a spreadsheet program shows for it.

A file on disk is read as a stream (a large import is never held in
memory); a small upload may be given as bytes. Cells come as the file holds
them: text for a CSV, text, numbers, dates or None for a workbook;
``cell_text`` turns any of them into text the way a person reads it.

Also the money cells of such files: an amount written in currency units
(``100.00``) to the integer minor units the services keep, exactly, and
back.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import re
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any

CSV = "csv"
XLSX = "xlsx"
# Every XLSX workbook is a ZIP archive; an old binary .xls is an OLE file.
ZIP_MAGIC = b"PK\x03\x04"
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"

# Excel shows long digit strings in scientific notation and drops leading
# zeros, so spreadsheets often carry numbers typed as text as numbers:
# 13800138000.0.
_INTEGRAL_FLOAT = re.compile(r"^(\d+)\.0+$")
_HEADER_SEPARATORS = re.compile(r"[\s_\-./:()（）：]+")


class BadFile(Exception):
    """The file cannot be read as the format it claims."""


@dataclass(frozen=True)
class Record:
    """One record of the file after the header: its row number as a
    spreadsheet shows it (the header is row 1) and its cells."""

    row: int
    cells: Sequence[object]


@dataclass(frozen=True)
class Sheet:
    """A file's header row and its records, read as they are consumed."""

    header: Sequence[object]
    records: Iterator[Record]


def sniff_format(file_name: str, head: bytes) -> str:
    """CSV or XLSX from the first bytes of a file and its name: a ZIP
    archive is taken for a workbook whatever its name, a name ending in
    .xlsx too (and then fails to open if it is not one). BadFile for an old
    binary Excel file, which is read by nothing here."""
    name = file_name.strip().lower()
    if head.startswith(ZIP_MAGIC):
        return XLSX
    if head.startswith(OLE_MAGIC) or name.endswith(".xls"):
        raise BadFile("an Excel 97-2003 (.xls) file: save it as XLSX or CSV")
    if name.endswith((".xlsx", ".xlsm")):
        return XLSX
    return CSV


def _csv(source: Path | bytes) -> tuple[Sheet, IO[str]]:
    handle: IO[str]
    if isinstance(source, bytes):
        try:
            text = source.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BadFile("not UTF-8 CSV text") from exc
        handle = io.StringIO(text, newline="")
    else:
        handle = source.open(encoding="utf-8-sig", newline="")
    reader = csv.reader(handle)
    try:
        header = next(reader, [])
    except (UnicodeDecodeError, csv.Error) as exc:
        handle.close()
        raise BadFile("not UTF-8 CSV text") from exc

    def records() -> Iterator[Record]:
        for cells in reader:
            yield Record(reader.line_num, cells)

    return Sheet(header, records()), handle


def _xlsx(source: Path | bytes) -> tuple[Sheet, Any]:
    from openpyxl import load_workbook  # noqa: PLC0415 - heavy, only for XLSX
    from openpyxl.utils.exceptions import InvalidFileException  # noqa: PLC0415

    try:
        book = load_workbook(
            io.BytesIO(source) if isinstance(source, bytes) else source,
            read_only=True,
            data_only=True,
        )
    except (zipfile.BadZipFile, InvalidFileException, KeyError, ValueError, OSError) as exc:
        raise BadFile("not an XLSX workbook") from exc
    sheet = book.worksheets[0] if book.worksheets else None
    if sheet is None:
        book.close()
        raise BadFile("the workbook has no sheet")
    rows = sheet.iter_rows(values_only=True)
    header = list(next(rows, ()) or ())

    def records() -> Iterator[Record]:
        for number, cells in enumerate(rows, start=2):
            yield Record(number, cells)

    return Sheet(header, records()), book


@contextlib.contextmanager
def open_sheet(source: Path | bytes, file_format: str) -> Iterator[Sheet]:
    """The file's header and its records, read as a stream; closed on
    leaving. BadFile when the file is not readable as ``file_format``. A
    CSV read from disk may still raise UnicodeDecodeError or csv.Error
    further on, as its records are read."""
    closer: Any
    if file_format == CSV:
        sheet, closer = _csv(source)
    elif file_format == XLSX:
        sheet, closer = _xlsx(source)
    else:
        raise ValueError(f"unknown spreadsheet format {file_format!r}")
    try:
        yield sheet
    finally:
        closer.close()


# -- cells -------------------------------------------------------------------------


def cell_text(value: object) -> str:
    """A cell as text: CSV cells are text already; spreadsheet cells may be
    numbers or dates."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = repr(value)
        match = _INTEGRAL_FLOAT.match(text)
        return match.group(1) if match else text
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value).strip()


def is_blank(row: Sequence[object]) -> bool:
    return all(not cell_text(cell) for cell in row)


def normalise_header(text: str) -> str:
    """A header cell compared without case, width, spaces or punctuation:
    'Card Number', 'card_number' and 'CARD-NUMBER' are the same."""
    folded = unicodedata.normalize("NFKC", text).strip().lower()
    return _HEADER_SEPARATORS.sub(" ", folded).strip()


# -- money cells -----------------------------------------------------------------------

# ISO 4217 minor-unit exponents that differ from 2, for the currencies a
# chain is likely to keep (and a few more); every other code has 2.
_MINOR_UNIT_DIGITS = {
    "BHD": 3,
    "CLP": 0,
    "ISK": 0,
    "JOD": 3,
    "JPY": 0,
    "KRW": 0,
    "KWD": 3,
    "OMR": 3,
    "TND": 3,
    "UGX": 0,
    "VND": 0,
    "XAF": 0,
    "XOF": 0,
}
# Digits, thousands grouped by commas or not, and decimals after a point.
_AMOUNT = re.compile(r"^(?:\d+|\d{1,3}(?:,\d{3})+)(?:\.\d+)?$")


def minor_unit_digits(currency: str) -> int:
    """The decimals of a currency's amounts: 2 for CNY, USD, EUR; 0 for
    JPY; 3 for KWD."""
    return _MINOR_UNIT_DIGITS.get(currency.strip().upper(), 2)


class BadAmount(ValueError):
    """An amount cell that is not an amount of the currency; the message
    says why, for the person who wrote the file."""


def parse_amount(value: object, currency: str) -> int:
    """An amount in currency units as written in a cell ('100.00',
    '1,000.5', 100, 99.9) to minor units, exactly: no rounding, ever. More
    decimals than the currency has are refused unless they are zeros
    ('100.000' is 100.00 CNY); so are exponents, currency signs and other
    text. Zero and negative amounts are read (the caller decides)."""
    if value is None or isinstance(value, bool):
        raise BadAmount("no amount")
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        # repr is the shortest text that reads back as this float: what the
        # person typed into the cell.
        number = Decimal(repr(value))
        if not number.is_finite():
            raise BadAmount("not an amount")
    elif isinstance(value, Decimal):
        number = value
    else:
        text = unicodedata.normalize("NFKC", str(value)).strip().replace(" ", "")
        negative = text.startswith("-")
        body = text[1:] if negative else text
        if not _AMOUNT.match(body):
            raise BadAmount("not an amount: write it like 100.00")
        try:
            number = Decimal(body.replace(",", ""))
        except InvalidOperation:
            raise BadAmount("not an amount: write it like 100.00") from None
        if negative:
            number = -number
    if not number.is_finite():
        raise BadAmount("not an amount")
    digits = minor_unit_digits(currency)
    minor = number.scaleb(digits)
    if minor != minor.to_integral_value():
        raise BadAmount(
            f"{currency} amounts have {digits} decimals at most"
            if digits
            else f"{currency} amounts have no decimals"
        )
    return int(minor)


def amount_value(minor_units: int, currency: str) -> Decimal:
    """Minor units as the decimal amount of the currency (12345 CNY ->
    123.45), exact."""
    digits = minor_unit_digits(currency)
    return Decimal(minor_units).scaleb(-digits).quantize(Decimal(1).scaleb(-digits))


def amount_format(currency: str) -> str:
    """A spreadsheet number format that shows an amount with the currency's
    decimals: '#,##0.00' for CNY, '#,##0' for JPY."""
    digits = minor_unit_digits(currency)
    return "#,##0" + ("." + "0" * digits if digits else "")


XLSX_CONTENT_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
EXPORT_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Column:
    """A column of an exported sheet: its header, its width in characters,
    and what its cells hold: "text", "amount" (minor units of ``currency``,
    written as the currency's units) or "time" (an aware datetime, written
    in UTC)."""

    header: str
    width: int
    kind: str = "text"


def write_xlsx(
    sheet_name: str,
    columns: Sequence[Column],
    rows: Iterable[Sequence[object]],
    *,
    currency: str = "",
    footer: str = "",
) -> bytes:
    """A one-sheet workbook: a bold, frozen header row (amount headers say
    the currency), then the rows; a text cell that looks like a formula
    stays text. Pure, and slow on large sheets: call it in a thread."""
    from openpyxl import Workbook  # noqa: PLC0415 - heavy, only when exporting
    from openpyxl.cell import WriteOnlyCell  # noqa: PLC0415
    from openpyxl.styles import Font  # noqa: PLC0415
    from openpyxl.utils import get_column_letter  # noqa: PLC0415

    book = Workbook(write_only=True)
    sheet: Any = book.create_sheet(sheet_name)
    # In a write-only sheet, the panes and widths must be set before the
    # first row.
    sheet.freeze_panes = "A2"
    for index, column in enumerate(columns, start=1):
        sheet.column_dimensions[get_column_letter(index)].width = column.width

    def cell(column: Column, value: object) -> Any:
        if column.kind == "amount" and isinstance(value, int):
            written = WriteOnlyCell(sheet, value=amount_value(value, currency))
            written.number_format = amount_format(currency)
            return written
        if column.kind == "time" and isinstance(value, dt.datetime):
            # Spreadsheets have no time zones: UTC, as the header says.
            written = WriteOnlyCell(sheet, value=value.astimezone(dt.UTC).replace(tzinfo=None))
            written.number_format = "yyyy-mm-dd hh:mm:ss"
            return written
        written = WriteOnlyCell(sheet, value=None if value in ("", None) else value)
        # Someone's note typed as "=..." stays text: never a formula the
        # spreadsheet would run.
        if written.data_type == "f":
            written.data_type = "s"
        return written

    bold = Font(bold=True)
    headers = []
    for column in columns:
        title = (
            f"{column.header} ({currency})"
            if currency and column.kind == "amount"
            else column.header
        )
        header = WriteOnlyCell(sheet, value=title)
        header.font = bold
        headers.append(header)
    sheet.append(headers)
    for row in rows:
        sheet.append([cell(column, value) for column, value in zip(columns, row, strict=True)])
    if footer:
        sheet.append([cell(Column("", 0), footer)])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def chunks(data: bytes, size: int = EXPORT_CHUNK_BYTES) -> Iterator[bytes]:
    """``data`` in pieces for a streaming reply (at least one, even empty)."""
    for offset in range(0, max(len(data), 1), size):
        yield data[offset : offset + size]
