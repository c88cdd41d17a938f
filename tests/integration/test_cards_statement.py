"""The stored-value statement as an XLSX workbook, on real databases
(SQLite and PostgreSQL): the movements oldest first with the right
amounts, scoped to an account or a card, within a time window, streamed in
chunks, and cut (and saying so) past its maximum."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import secrets
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from openpyxl import load_workbook

from chassis.db import utcnow
from cornucopia.cards.v1 import cards_pb2, stored_value_pb2, stored_value_pb2_grpc
from cornucopia.common.v1 import money_pb2
from services.cards import ledger, statements
from services.cards.domain.stored_value import Channel
from services.cards.store import cards as card_store
from services.cards.store import programs as program_store
from services.cards.store import stored_value_rules as rule_store
from services.cards.store.cards import Stamp
from tests.integration.conftest import Suite
from tests.integration.infra import DatabaseFactory
from tests.integration.test_cards_lifecycle import (
    CHECKOUT,
    OP_S001,
    Cards,
    create_program,
    enroll,
    issue,
    program,
    rid,
    start_cards,
)

C, S = cards_pb2, stored_value_pb2
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def cny(minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="CNY", minor_units=minor_units)


def at(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


class Statements:
    def __init__(self, c: Cards) -> None:
        self.c = c
        self.sv = stored_value_pb2_grpc.StoredValueServiceStub(c.suite.channels["cards"])

    async def recharge(self, card_id: str, amount: int, **extra: Any) -> S.Movement:
        response = await self.sv.Recharge(
            S.RechargeRequest(
                request_id=rid(),
                card_id=card_id,
                amount=cny(amount),
                channel=S.RECHARGE_CHANNEL_STORE_TERMINAL,
                **extra,
            ),
            metadata=OP_S001,
        )
        return response.movement

    async def debit(self, card_id: str, amount: int) -> S.Movement:
        response = await self.sv.Debit(
            S.DebitRequest(
                request_id=rid(), card_id=card_id, amount=cny(amount), reference="POS-1"
            ),
            metadata=CHECKOUT,
        )
        return response.movement

    async def export(self, **where: Any) -> list[S.ExportStatementChunk]:
        call = self.sv.ExportStatement(S.ExportStatementRequest(**where), metadata=OP_S001)
        return [chunk async for chunk in call]

    async def sheet(self, **where: Any) -> tuple[str, list[tuple[Any, ...]], Any]:
        """The file name, the rows and the sheet of an export."""
        chunks = await self.export(**where)
        assert chunks[0].content_type == XLSX
        book = load_workbook(io.BytesIO(b"".join(c.data for c in chunks)))
        sheet = book.worksheets[0]
        return chunks[0].file_name, list(sheet.iter_rows(values_only=True)), sheet


def ids(rows: list[tuple[Any, ...]]) -> list[str]:
    return [row[1] for row in rows[1:]]


async def test_the_statement_workbook(suite: Suite, database_url: DatabaseFactory) -> None:
    c = await start_cards(suite, database_url)
    await create_program(c, program())
    for member_id in ("M1", "M2", "M3"):
        await enroll(c, member_id)
    principal = await issue(c, "M1")
    supplementary = await issue(c, "M2", principal_card_id=principal.card_id)
    other = await issue(c, "M3")
    s = Statements(c)

    first = await s.recharge(principal.card_id, 10000, note="首充")
    await s.recharge(other.card_id, 5000)
    await asyncio.sleep(0.05)
    middle = utcnow()
    await asyncio.sleep(0.05)
    debit = await s.debit(supplementary.card_id, 3050)
    last = await s.recharge(principal.card_id, 2000, note='=HYPERLINK("http://x")')

    # The account: every card's movements, oldest first, the right amounts.
    name, rows, sheet = await s.sheet(account_id=principal.account_id)
    assert name == f"statement-{principal.account_id}-{utcnow():%Y%m%d}.xlsx"
    assert sheet.freeze_panes == "A2"
    assert sheet.column_dimensions["A"].width >= 18
    assert rows[0] == (
        "Time (UTC)",
        "Movement ID",
        "Kind",
        "Card ID",
        "Amount (CNY)",
        "Paid change (CNY)",
        "Bonus change (CNY)",
        "Available after (CNY)",
        "Held after (CNY)",
        "Channel",
        "Reference",
        "Note",
        "Store",
        "By",
    )
    assert ids(rows) == [first.movement_id, debit.movement_id, last.movement_id]
    assert [row[2:10] for row in rows[1:]] == [
        ("recharge", principal.card_id, 100, 100, 0, 100, 0, "store_terminal"),
        ("debit", supplementary.card_id, 30.5, -30.5, 0, 69.5, 0, None),
        ("recharge", principal.card_id, 20, 20, 0, 89.5, 0, "store_terminal"),
    ]
    assert [row[10:] for row in rows[1:]] == [
        (None, "首充", "S001", "op-1"),
        ("POS-1", None, None, "loyalty"),
        (None, '=HYPERLINK("http://x")', "S001", "op-1"),
    ]
    # Times are real spreadsheet times, in UTC, in order.
    times = [row[0] for row in rows[1:]]
    assert all(isinstance(t, dt.datetime) for t in times)
    assert times == sorted(times)
    assert abs(times[0] - first.stamp.time.ToDatetime()) < dt.timedelta(seconds=1)
    # A note is never a formula.
    assert sheet.cell(row=4, column=12).data_type == "s"

    # A principal card: what it did and what came onto its account; a
    # supplementary card: only what it did.
    _, rows, _ = await s.sheet(card_id=principal.card_id)
    assert ids(rows) == [first.movement_id, last.movement_id]
    name, rows, _ = await s.sheet(card_id=supplementary.card_id)
    assert name.startswith(f"statement-{supplementary.card_id}-")
    assert ids(rows) == [debit.movement_id]
    _, rows, _ = await s.sheet(card_id=other.card_id)
    assert len(rows) == 2 and rows[1][2:5] == ("recharge", other.card_id, 50)

    # The window [start_time, end_time).
    _, rows, _ = await s.sheet(account_id=principal.account_id, start_time=at(middle))
    assert ids(rows) == [debit.movement_id, last.movement_id]
    _, rows, _ = await s.sheet(account_id=principal.account_id, end_time=at(middle))
    assert ids(rows) == [first.movement_id]
    _, rows, _ = await s.sheet(
        account_id=principal.account_id,
        start_time=at(middle - dt.timedelta(days=2)),
        end_time=at(middle - dt.timedelta(days=1)),
    )
    assert rows == [rows[0]]


async def test_a_long_statement_streams_in_chunks_and_is_cut_at_its_maximum(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = await start_cards(suite, database_url)
    await create_program(c, program())
    await enroll(c, "M1")
    card = await issue(c, "M1")
    s = Statements(c)
    # Enough movements, with notes that do not compress, for a workbook
    # of several chunks (64 KiB each).
    count = 400
    async with c.runtime.db.transaction() as session:
        record = await card_store.get_card(session, card.card_id)
        gold = await program_store.get_program(session, "GOLD")
        policy = (await rule_store.get_policy(session)).policy
        assert record is not None and gold is not None
        for n in range(count):
            await ledger.recharge(
                session,
                record,
                gold,
                policy,
                ledger.Request(f"seed-{n}", "", Stamp("seeder", "S001", utcnow())),
                amount=100 + n,
                channel=Channel.STORE_TERMINAL,
                operator_id="seeder",
                reference=secrets.token_hex(50),
                note=secrets.token_urlsafe(150)[:200],
            )

    chunks = await s.export(card_id=card.card_id)
    assert len(chunks) > 1
    assert chunks[0].file_name.startswith(f"statement-{card.card_id}-")
    assert chunks[0].content_type == XLSX
    assert all(not (x.file_name or x.content_type) for x in chunks[1:])
    assert all(x.data for x in chunks)
    book = load_workbook(io.BytesIO(b"".join(x.data for x in chunks)), read_only=True)
    rows = list(book.worksheets[0].iter_rows(values_only=True))
    assert len(rows) == count + 1
    assert [row[4] for row in rows[1:4]] == [1, 1.01, 1.02]
    assert rows[-1][7] == sum(100 + n for n in range(count)) / 100

    monkeypatch.setattr(statements, "MAX_MOVEMENTS", 5)
    _, rows, _ = await s.sheet(card_id=card.card_id)
    assert len(rows) == 1 + 5 + 1
    assert [row[4] for row in rows[1:6]] == [1, 1.01, 1.02, 1.03, 1.04]
    assert rows[-1][0].startswith(f"Cut at 5 movements: the last is {rows[5][1]}")
    assert rows[-1][1:] == (None,) * 13
