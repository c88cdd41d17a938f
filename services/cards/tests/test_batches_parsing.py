"""Reading enterprise batch files: amounts in currency units to minor units
exactly, CSV and XLSX through chassis.spreadsheets, the header, and each
row's check against the cards."""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal

import pytest
from openpyxl import Workbook

from chassis import spreadsheets
from chassis.errors import FailedPrecondition, InvalidArgument
from chassis.spreadsheets import BadAmount, amount_value, minor_unit_digits, parse_amount
from services.cards import batches
from services.cards.domain.cards import CardState
from services.cards.domain.stored_value import Channel, ChannelRule, default_policy
from services.cards.store.batches import INVALID, VALID, CardBrief

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def xlsx(rows: list[list[object]]) -> bytes:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    for row in rows:
        sheet.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


# -- amounts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "currency", "minor"),
    [
        ("100.00", "CNY", 10000),
        ("100", "CNY", 10000),
        ("0.01", "CNY", 1),
        ("100.5", "USD", 10050),
        ("1,000.25", "EUR", 100025),
        ("12,345,678.90", "CNY", 1234567890),
        (" 100.10 ", "CNY", 10010),
        ("100.100", "CNY", 10010),  # trailing zeros lose nothing
        ("１００.５", "CNY", 10050),  # full-width digits typed on a Chinese keyboard
        ("5000", "JPY", 5000),
        ("5000.0", "JPY", 5000),
        ("1.234", "KWD", 1234),
        (100, "CNY", 10000),
        (99.9, "CNY", 9990),
        (0.1 + 0.2, "CNY", None),  # 0.30000000000000004: not what anyone typed
        (1234.56, "CNY", 123456),
        ("-5", "CNY", -500),  # read; the batch refuses it
    ],
)
def test_amounts_convert_exactly(cell: object, currency: str, minor: int | None) -> None:
    if minor is None:
        with pytest.raises(BadAmount):
            parse_amount(cell, currency)
    else:
        assert parse_amount(cell, currency) == minor


@pytest.mark.parametrize(
    ("cell", "currency", "why"),
    [
        ("100.001", "CNY", "2 decimals at most"),
        ("100.5", "JPY", "no decimals"),
        ("1e3", "CNY", "not an amount"),
        ("¥100", "CNY", "not an amount"),
        ("100,00", "EUR", "not an amount"),
        ("1,00.00", "CNY", "not an amount"),
        ("", "CNY", "not an amount"),
        (None, "CNY", "no amount"),
        (True, "CNY", "no amount"),
        (float("nan"), "CNY", "not an amount"),
    ],
)
def test_amounts_refused(cell: object, currency: str, why: str) -> None:
    with pytest.raises(BadAmount, match=why):
        parse_amount(cell, currency)


def test_minor_units_of_currencies() -> None:
    assert [minor_unit_digits(c) for c in ("CNY", "USD", "EUR", "JPY", "KWD", "xyz")] == [
        2,
        2,
        2,
        0,
        3,
        2,
    ]
    assert amount_value(12345, "CNY") == Decimal("123.45")
    assert amount_value(5, "CNY") == Decimal("0.05")
    assert amount_value(5000, "JPY") == Decimal(5000)
    assert spreadsheets.amount_format("JPY") == "#,##0"
    assert spreadsheets.amount_format("CNY") == "#,##0.00"


def test_a_row_amount_must_be_positive_and_bounded() -> None:
    assert batches.parse_amount("0.01", "CNY") == 1
    for bad in ("0", "0.00", "-1"):
        with pytest.raises(ValueError, match="more than zero"):
            batches.parse_amount(bad, "CNY")
    with pytest.raises(ValueError, match="at most"):
        batches.parse_amount("10000000000.01", "CNY")


# -- files --------------------------------------------------------------------------


def test_csv_with_a_byte_order_mark_blank_rows_and_aliases() -> None:
    content = (
        "\ufeffCard Number,金额,备注\n8816 0000 0000 0001,100.00,李娜\n\n,,\n8816000000000002,50,\n"
    )
    rows = batches.read_rows("recharge.csv", content.encode())
    assert rows == [
        batches.FileRow(1, "8816 0000 0000 0001", "100.00", "李娜"),
        batches.FileRow(4, "8816000000000002", "50", ""),
    ]


def test_xlsx_by_extension_or_by_its_zip_magic() -> None:
    content = xlsx(
        [
            ["amount", "card_number", "note", "ignored"],
            [100.5, "8816000000000001", "x", "y"],
            [None, None, None, None],
            [20, 8816000000000002, None, None],
        ]
    )
    expected = [
        batches.FileRow(1, "8816000000000001", 100.5, "x"),
        batches.FileRow(3, "8816000000000002", 20, ""),
    ]
    assert batches.read_rows("recharge.xlsx", content) == expected
    assert batches.read_rows("recharge.csv", content) == expected  # sniffed, not named
    assert batches.read_rows("upload", content) == expected


def test_chassis_reads_csv_and_xlsx_from_bytes_and_files(tmp_path: object) -> None:
    for file_format, content in (
        ("csv", b"a,b\n1,2\n"),
        ("xlsx", xlsx([["a", "b"], [1, 2]])),
    ):
        with spreadsheets.open_sheet(content, file_format) as sheet:
            assert list(sheet.header) == ["a", "b"]
            assert [
                (r.row, [spreadsheets.cell_text(c) for c in r.cells]) for r in sheet.records
            ] == [(2, ["1", "2"])]
    assert spreadsheets.sniff_format("x.csv", b"PK\x03\x04") == "xlsx"
    assert spreadsheets.sniff_format("x.txt", b"card") == "csv"
    with pytest.raises(spreadsheets.BadFile, match="xls"):
        spreadsheets.sniff_format("old.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("r.csv", b"card_number,note\n1,x\n", "no amount column"),
        ("r.csv", b"amount\n1\n", "no card_number column"),
        ("r.csv", "卡号,card number,amount\n1,2,3\n".encode(), "two columns mean card_number"),
        ("r.csv", b"card_number,amount\n", "no rows"),
        ("r.csv", b"", "no card_number column"),
        ("r.csv", b"card_number,amount\n\xff\xfe,1\n", "not UTF-8"),
        ("r.xlsx", b"card_number,amount\n1,2\n", "not an XLSX workbook"),
        ("r.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1rest", "Excel 97-2003"),
    ],
)
def test_files_refused(name: str, content: bytes, why: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        batches.read_rows(name, content)
    assert caught.value.reason == "BAD_BATCH_FILE"
    assert why in "; ".join(v.description for v in caught.value.violations)
    assert {v.field for v in caught.value.violations} == {"content"}


def test_at_most_twenty_thousand_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batches, "MAX_ROWS", 3)
    content = b"card_number,amount\n" + b"8816000000000001,1\n" * 3
    assert len(batches.read_rows("r.csv", content)) == 3
    with pytest.raises(InvalidArgument, match="cannot be read"):
        batches.read_rows("r.csv", content + b"8816000000000001,1\n")


# -- checking rows -------------------------------------------------------------------


def card(number: str, program_id: str = "GOLD", state: CardState = CardState.ACTIVE) -> CardBrief:
    return CardBrief(f"C{number[-4:]}", number, program_id, state, NOW + dt.timedelta(days=30))


def test_each_row_gets_one_outcome() -> None:
    rows = [
        batches.FileRow(1, "8816 0000 0000 0001", "100.00", "ok"),
        batches.FileRow(2, "8816-ABCD", "1", ""),  # not digits
        batches.FileRow(3, "8816000000000002", "1.234", ""),
        batches.FileRow(4, "8816000000000001", "5", ""),
        batches.FileRow(5, "8816000000000009", "5", ""),
        batches.FileRow(6, "7700000000000001", "5", ""),
        batches.FileRow(7, "8816000000000003", "5", ""),
        batches.FileRow(8, "8816000000000004", "0", ""),
        batches.FileRow(9, "8816000000000005", "5", "x" * 201),
    ]
    cards = {
        c.card_number: c
        for c in (
            card("8816000000000001"),
            card("8816000000000002"),
            card("7700000000000001", "PLAIN"),
            card("8816000000000003", state=CardState.FROZEN),
            card("8816000000000004"),
            card("8816000000000005"),
        )
    }
    checked = batches.check_rows(
        rows,
        policy=default_policy("CNY"),
        cards=cards,
        offers_stored_value={"GOLD": True, "PLAIN": False},
        store_id="S001",
        operator_id="mgr-1",
        now=NOW,
    )
    assert [(r.row_number, r.outcome, r.reason) for r in checked.rows] == [
        (1, VALID, ""),
        (2, INVALID, "CARD_NUMBER_INVALID"),
        (3, INVALID, "AMOUNT_INVALID"),
        (4, INVALID, "DUPLICATE_ROW"),
        (5, INVALID, "CARD_NOT_FOUND"),
        (6, INVALID, "STORED_VALUE_NOT_OFFERED"),
        (7, INVALID, "CARD_FROZEN"),
        (8, INVALID, "AMOUNT_INVALID"),
        (9, INVALID, "NOTE_TOO_LONG"),
    ]
    assert checked.rows[0].card_number == "8816000000000001"
    assert checked.rows[0].amount == 10000
    assert checked.rows[3].message == "the card repeats row 1"
    assert not checked.amounts_read
    assert checked.invalid == 8


def test_the_channel_bounds_refuse_rows_and_a_closed_channel_the_file() -> None:
    policy = default_policy("CNY")
    bounded = ChannelRule(Channel.ENTERPRISE_BATCH, min_amount=1000, max_amount=50000)
    policy = type(policy)(
        currency="CNY", channels={**policy.channels, Channel.ENTERPRISE_BATCH: bounded}
    )
    rows = [
        batches.FileRow(1, "8816000000000001", "5.00", ""),
        batches.FileRow(2, "8816000000000002", "10.00", ""),
    ]
    checked = batches.check_rows(
        rows,
        policy=policy,
        cards={n: card(n) for n in ("8816000000000001", "8816000000000002")},
        offers_stored_value={"GOLD": True},
        store_id="",
        operator_id="hq",
        now=NOW,
    )
    first, second = checked.rows
    assert (first.outcome, first.reason) == (INVALID, "RECHARGE_AMOUNT_OUT_OF_RANGE")
    assert first.message == "an enterprise batch recharge is 10.00 to 500.00 CNY"
    assert second.outcome == VALID
    assert checked.amounts_read and checked.total == 1500

    from chassis.auth import Principal, Role, Scope, ScopeLevel

    manager = Principal("mgr-1", frozenset({Role.STORE_MANAGER}), Scope(ScopeLevel.STORE, "S001"))
    batches.check_channel(policy, manager)
    closed = type(policy)(
        currency="CNY",
        channels={
            **policy.channels,
            Channel.ENTERPRISE_BATCH: ChannelRule(Channel.ENTERPRISE_BATCH, enabled=False),
        },
    )
    with pytest.raises(FailedPrecondition) as caught:
        batches.check_channel(closed, manager)
    assert caught.value.reason == "RECHARGE_CHANNEL_NOT_ALLOWED"
