"""Enterprise batch recharges on real databases (SQLite and PostgreSQL):
a company's file checked row by row at once, dry runs and files with bad
rows recharging nothing, the control total, CSV and XLSX, the worker
recharging every good row exactly once, across a crash and a takeover, and
rows refused at their turn."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from openpyxl import Workbook

from chassis.auth import Role, Scope, ScopeLevel
from chassis.db import utcnow
from cornucopia.cards.v1 import cards_pb2, stored_value_pb2, stored_value_pb2_grpc
from cornucopia.common.v1 import money_pb2
from services.cards.batches import BatchRecharges
from services.cards.store.batches import sv_batch_rows, sv_batches
from services.cards.store.stored_value import sv_movements
from tests.integration.conftest import Suite, auth, eventually, token
from tests.integration.infra import DatabaseFactory
from tests.integration.test_cards_lifecycle import (
    HQ,
    MGR_S001,
    OP_S001,
    Cards,
    create_program,
    enroll,
    issue,
    program,
    refused,
    rid,
    start_cards,
)

C, S = cards_pb2, stored_value_pb2
CALL_CENTER = auth(token((Role.CALL_CENTER,), Scope(ScopeLevel.CALL_CENTER), "cc-1"))


def cny(minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="CNY", minor_units=minor_units)


class Batches:
    def __init__(self, c: Cards) -> None:
        self.c = c
        self.sv = stored_value_pb2_grpc.StoredValueServiceStub(c.suite.channels["cards"])

    async def start(
        self,
        content: bytes,
        total: int,
        metadata: Any = MGR_S001,
        *,
        file_name: str = "recharge.csv",
        **extra: Any,
    ) -> S.BatchRecharge:
        extra.setdefault("request_id", rid())
        extra.setdefault("payment_reference", "PAY-ACME-2026-06")
        extra.setdefault("expected_total", cny(total))
        return await self.sv.StartBatchRecharge(
            S.StartBatchRechargeRequest(file_name=file_name, content=content, **extra),
            metadata=metadata,
        )

    async def get(self, batch_id: str) -> S.BatchRecharge:
        return await self.sv.GetBatchRecharge(
            S.GetBatchRechargeRequest(batch_id=batch_id), metadata=OP_S001
        )

    async def rows(self, batch_id: str, **extra: Any) -> list[S.BatchRechargeRow]:
        found: list[S.BatchRechargeRow] = []
        page_token = ""
        while True:
            page = await self.sv.ListBatchRechargeRows(
                S.ListBatchRechargeRowsRequest(
                    batch_id=batch_id, page_size=2, page_token=page_token, **extra
                ),
                metadata=OP_S001,
            )
            found.extend(page.rows)
            page_token = page.next_page_token
            if not page_token:
                return found

    async def paid(self, card_id: str) -> int:
        balance = await self.sv.GetBalance(S.GetBalanceRequest(card_id=card_id), metadata=OP_S001)
        return balance.paid.minor_units

    async def count(self, table: sa.Table) -> int:
        async with self.c.runtime.db.sessions() as session:
            return int(
                (await session.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()
            )


async def setup(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch, interval: str
) -> tuple[Batches, list[C.Card], C.Card]:
    """Cards with four GOLD cards (stored value) and one PLAIN card
    (none); the service's batch worker passing every ``interval`` seconds."""
    monkeypatch.setenv("CARDS_BATCH_INTERVAL_SECONDS", interval)
    c = await start_cards(suite, database_url)
    await create_program(c, program())
    await create_program(
        c,
        program(
            "PLAIN",
            "7700",
            stored_value=False,
            allows_supplementary=False,
            max_supplementary_cards=0,
        ),
    )
    gold = []
    for n in range(4):
        await enroll(c, f"M{n}")
        gold.append(await issue(c, f"M{n}"))
    await enroll(c, "M-PLAIN")
    plain = await issue(c, "M-PLAIN", program_id="PLAIN")
    return Batches(c), gold, plain


def csv_file(*rows: str, header: str = "card_number,amount,note") -> bytes:
    return ("\ufeff" + "\r\n".join((header, *rows)) + "\r\n").encode()


def spaced(number: str) -> str:
    return " ".join(number[i : i + 4] for i in range(0, len(number), 4))


async def test_a_csv_batch_recharges_every_card_once(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    b, gold, plain = await setup(suite, database_url, monkeypatch, "0.2")
    one, two, three, _ = gold
    content = csv_file(
        f"{spaced(one.card_number)},100.00,销售部",
        f"{two.card_number},250.5,",
        f'{three.card_number},"1,000",年终奖励',
    )
    request_id = rid()
    started = await b.start(content, 135050, request_id=request_id)
    assert started.state in (S.BATCH_RECHARGE_STATE_RUNNING, S.BATCH_RECHARGE_STATE_DONE)
    assert (started.rows, started.rows_invalid, started.total) == (3, 0, cny(135050))
    assert (started.started_by.principal, started.started_by.store_id) == ("mgr-1", "S001")
    assert started.payment_reference == "PAY-ACME-2026-06"
    # A retry is the same batch, as it is now.
    again = await b.start(content, 135050, request_id=request_id)
    assert again.batch_id == started.batch_id
    details = await refused(
        b.start(content, 135050, request_id=request_id, dry_run=True),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"

    done = await eventually(
        lambda: b.get(started.batch_id),
        lambda batch: batch.state == S.BATCH_RECHARGE_STATE_DONE,
    )
    assert (done.rows, done.rows_recharged, done.rows_failed, done.rows_invalid) == (3, 3, 0, 0)
    assert done.HasField("finish_time")
    rows = await b.rows(started.batch_id)
    assert [(r.row_number, r.card_number, r.amount.minor_units, r.outcome) for r in rows] == [
        (1, one.card_number, 10000, S.BATCH_ROW_OUTCOME_RECHARGED),
        (2, two.card_number, 25050, S.BATCH_ROW_OUTCOME_RECHARGED),
        (3, three.card_number, 100000, S.BATCH_ROW_OUTCOME_RECHARGED),
    ]
    assert all(r.movement_id.startswith("M") for r in rows)
    assert await b.rows(started.batch_id, problems_only=True) == []
    assert [await b.paid(card.card_id) for card in gold] == [10000, 25050, 100000, 0]
    movements = await b.sv.ListMovements(
        S.ListMovementsRequest(card_id=one.card_id), metadata=OP_S001
    )
    (movement,) = movements.movements
    assert movement.movement_id == rows[0].movement_id
    assert movement.channel == S.RECHARGE_CHANNEL_ENTERPRISE_BATCH
    assert (movement.reference, movement.note) == ("PAY-ACME-2026-06", "销售部")
    assert (movement.stamp.principal, movement.stamp.store_id) == ("mgr-1", "S001")
    assert (movement.paid.minor_units, movement.bonus.minor_units) == (10000, 0)
    # Nothing more to do, whoever runs.
    assert await BatchRecharges(b.c.runtime.db).run_once() == 0
    assert await b.count(sv_movements) == 3

    # A dry run checks and recharges nothing.
    dry = await b.start(content, 135050, dry_run=True)
    assert (dry.state, dry.dry_run, dry.rows, dry.rows_invalid) == (
        S.BATCH_RECHARGE_STATE_CHECKED,
        True,
        3,
        0,
    )
    assert {r.outcome for r in await b.rows(dry.batch_id)} == {S.BATCH_ROW_OUTCOME_VALID}
    assert await BatchRecharges(b.c.runtime.db).run_once() == 0
    assert (await b.get(dry.batch_id)).state == S.BATCH_RECHARGE_STATE_CHECKED

    # One bad row: the whole file is CHECKED, nothing recharged, and the
    # report says which rows to fix.
    bad = await b.start(
        csv_file(
            f"{one.card_number},10.00,",
            "8816-XXXX,10.00,",
            f"{plain.card_number},10.00,",
            "8816000000000000,10.00,",
            f"{two.card_number},10.001,",
            f"{spaced(one.card_number)},10.00,",
            header="卡号,金额,备注",
        ),
        5000,
        HQ,
    )
    assert (bad.state, bad.rows, bad.rows_invalid) == (S.BATCH_RECHARGE_STATE_CHECKED, 6, 5)
    assert (bad.started_by.principal, bad.started_by.store_id) == ("test-admin", "")
    problems = await b.rows(bad.batch_id, problems_only=True)
    assert [(r.row_number, r.outcome, r.reason) for r in problems] == [
        (2, S.BATCH_ROW_OUTCOME_INVALID, "CARD_NUMBER_INVALID"),
        (3, S.BATCH_ROW_OUTCOME_INVALID, "STORED_VALUE_NOT_OFFERED"),
        (4, S.BATCH_ROW_OUTCOME_INVALID, "CARD_NOT_FOUND"),
        (5, S.BATCH_ROW_OUTCOME_INVALID, "AMOUNT_INVALID"),
        (6, S.BATCH_ROW_OUTCOME_INVALID, "DUPLICATE_ROW"),
    ]
    assert problems[3].message == "amount: CNY amounts have 2 decimals at most"
    assert problems[4].message == "the card repeats row 1"
    assert (await b.rows(bad.batch_id))[0].outcome == S.BATCH_ROW_OUTCOME_VALID
    assert await BatchRecharges(b.c.runtime.db).run_once() == 0
    assert [await b.paid(card.card_id) for card in gold] == [10000, 25050, 100000, 0]

    # The rows do not add up to what the company paid: nothing is kept.
    batches_before, rows_before = await b.count(sv_batches), await b.count(sv_batch_rows)
    details = await refused(b.start(content, 135000), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "BATCH_TOTAL_MISMATCH"
    assert details["metadata"] == {
        "currency_code": "CNY",
        "expected_total_minor_units": "135000",
        "file_total_minor_units": "135050",
        "rows": "3",
    }
    assert (await b.count(sv_batches), await b.count(sv_batch_rows)) == (
        batches_before,
        rows_before,
    )

    # Who may, and what a request must carry.
    for who in (OP_S001, CALL_CENTER):
        await refused(b.start(content, 135050, who), grpc.StatusCode.PERMISSION_DENIED)
    details = await refused(
        b.sv.StartBatchRecharge(
            S.StartBatchRechargeRequest(request_id=rid(), content=b""), metadata=MGR_S001
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {
        "file_name",
        "content",
        "payment_reference",
        "expected_total",
    }
    details = await refused(
        b.start(
            content, 135050, expected_total=money_pb2.Money(currency_code="USD", minor_units=1)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"expected_total.currency_code"}
    details = await refused(b.start(b"name,mobile\nx,1\n", 100), grpc.StatusCode.INVALID_ARGUMENT)
    assert details["reason"] == "BAD_BATCH_FILE"
    await refused(b.get("RNOPE"), grpc.StatusCode.NOT_FOUND)
    assert await b.count(sv_movements) == 3


def workbook(rows: list[list[object]]) -> bytes:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    for row in rows:
        sheet.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


async def test_an_xlsx_batch_resumes_after_a_crash_without_recharging_twice(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service's own worker passes once at start and then sleeps: the
    # test runs the workers itself.
    b, gold, _plain = await setup(suite, database_url, monkeypatch, "3600")
    db = b.c.runtime.db
    one, two, three, four = gold
    content = workbook(
        [
            ["Card Number", "Amount", "Note"],
            [one.card_number, 100.5, "A"],
            [two.card_number, 20, None],
            [None, None, None],
            [three.card_number, "30.00", "frozen before its turn"],
            [four.card_number, 40, None],
        ]
    )
    started = await b.start(content, 19050, file_name="公司充值.xlsx")
    assert (started.state, started.rows, started.file_name) == (
        S.BATCH_RECHARGE_STATE_RUNNING,
        4,
        "公司充值.xlsx",
    )
    assert [r.row_number for r in await b.rows(started.batch_id)] == [1, 2, 4, 5]
    # Between the check and its turn, card three is frozen.
    await b.c.cards.FreezeCard(
        C.FreezeCardRequest(request_id=rid(), card_id=three.card_id, reason="lost wallet"),
        metadata=MGR_S001,
    )

    first = BatchRecharges(db, owner="worker-a")
    assert await first.run_once(limit=1) == 1
    batch = await b.get(started.batch_id)
    assert (batch.state, batch.rows_recharged) == (S.BATCH_RECHARGE_STATE_RUNNING, 1)
    first_movement = (await b.rows(started.batch_id))[0].movement_id
    assert first_movement

    # Worker A claims the batch again and dies holding its lease.
    async def lease(owner: str, until: dt.datetime) -> None:
        async with db.transaction() as session:
            await session.execute(
                sa.update(sv_batches)
                .where(sv_batches.c.batch_id == started.batch_id)
                .values(lease_owner=owner, lease_until=until)
            )

    await lease("worker-a", utcnow() + dt.timedelta(hours=1))
    second = BatchRecharges(db, owner="worker-b")
    assert await second.run_once() == 0  # a live lease of another worker
    await lease("worker-a", utcnow() - dt.timedelta(seconds=1))
    # Even a row whose mark were lost (it cannot be: the mark commits with
    # the movement) would not be recharged twice: its movement's request
    # id is bound to the row for good.
    async with db.transaction() as session:
        await session.execute(
            sa.update(sv_batch_rows)
            .where(sv_batch_rows.c.batch_id == started.batch_id, sv_batch_rows.c.row_number == 1)
            .values(outcome="valid", movement_id="")
        )
    assert await second.run_once() == 4
    assert await first.run_once() == 0
    assert await second.run_once() == 0

    done = await b.get(started.batch_id)
    assert done.state == S.BATCH_RECHARGE_STATE_DONE
    assert (done.rows, done.rows_recharged, done.rows_failed, done.rows_invalid) == (4, 3, 1, 0)
    rows = await b.rows(started.batch_id)
    assert [(r.row_number, r.outcome, r.reason) for r in rows] == [
        (1, S.BATCH_ROW_OUTCOME_RECHARGED, ""),
        (2, S.BATCH_ROW_OUTCOME_RECHARGED, ""),
        (4, S.BATCH_ROW_OUTCOME_FAILED, "CARD_FROZEN"),
        (5, S.BATCH_ROW_OUTCOME_RECHARGED, ""),
    ]
    assert rows[0].movement_id == first_movement
    assert rows[2].movement_id == ""
    assert await b.rows(started.batch_id, problems_only=True) == [rows[2]]
    assert [await b.paid(card.card_id) for card in gold] == [10050, 2000, 0, 4000]
    assert await b.count(sv_movements) == 3
    async with db.sessions() as session:
        found = await session.execute(
            sa.select(sv_movements.c.request_id, sv_movements.c.principal).order_by(
                sv_movements.c.request_id
            )
        )
        assert [tuple(r) for r in found] == [
            (f"batch:{started.batch_id}:{n}", "mgr-1") for n in (1, 2, 5)
        ]
