"""A store terminal sells through the gateway: the real gateway app in front
of real members, cards and loyalty services, on SQLite and PostgreSQL.
Checkouts with stored value and cash and their receipts (points, tier),
the same Idempotency-Key again, the cashier's refusals (a frozen card, a
wrong PIN that never shows in an answer or a log), a checkout finished by
sending it again, the preview, sales read, listed and downloaded, refunds
and voids by a manager, points, gifts and tiers, bad bodies, and the
OpenAPI document."""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openpyxl
import pytest
import sqlalchemy as sa

from chassis.errors import Unavailable
from cornucopia.loyalty.v1 import points_pb2, points_pb2_grpc
from services.loyalty.domain.checkout import SagaStep
from services.loyalty.store import sales as sales_store
from tests.integration.conftest import Suite, auth, eventually
from tests.integration.gateway_rig import (
    MANAGER,
    OPERATOR,
    OTHER_STORE,
    PROBLEM_JSON,
    GatewayTill,
    everything_logged,
    fields,
    gateway_in_front_of_loyalty,
    openapi_document,
    problem,
)
from tests.integration.infra import DatabaseFactory
from tests.integration.test_loyalty_checkout import TOTAL, Shop, enroll

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
HQ = auth()


def cny(minor_units: int) -> dict[str, Any]:
    return {"currency_code": "CNY", "minor_units": minor_units}


def units(money: dict[str, Any] | None) -> int:
    assert money is not None and money["currency_code"] == "CNY", money
    value: int = money["minor_units"]
    return value


def line(sku: str, quantity: int, price: int, category: str = "skincare") -> dict[str, Any]:
    return {"sku": sku, "category": category, "quantity": quantity, "unit_price": cny(price)}


# Two serums at 199.00 and a mask at 50.00; GOLD takes 5 % off each line (TOTAL).
BASKET = [line("SERUM-30", 2, 19_900), line("MASK-5", 1, 5_000)]


def stored_value(amount: int, pin: str | None = None) -> dict[str, Any]:
    tender: dict[str, Any] = {"kind": "stored_value", "amount": cny(amount)}
    if pin is not None:
        tender["pin"] = pin
    return tender


def cash(amount: int) -> dict[str, Any]:
    return {"kind": "cash", "amount": cny(amount)}


def sale_body(*tenders: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A checkout at S001's till T1 (the BASKET unless ``lines`` is given)."""
    return {
        "store_id": "S001",
        "terminal_id": "T1",
        "lines": extra.pop("lines", BASKET),
        "tenders": list(tenders),
        **extra,
    }


@dataclass
class Till(GatewayTill):
    shop: Shop

    async def get(
        self, path: str, headers: dict[str, str] = OPERATOR, **params: Any
    ) -> httpx.Response:
        return await self.http.get(path, params=params, headers=headers)

    async def customer(self, mobile: str, *, recharge: int = 0, pin: str = "") -> tuple[str, str]:
        """A member of S001 with a GOLD card (made over gRPC): the member id
        and the card number."""
        member_id, card = await enroll(self.shop, mobile, recharge=recharge, pin=pin)
        return member_id, card.card_number

    async def sell(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        sold = await self.post("/v1/checkouts", key, body)
        assert sold.status_code == 201, sold.text
        receipt: dict[str, Any] = sold.json()
        return receipt

    async def available(self, card_number: str) -> int:
        resolved = await self.get("/v1/cards:resolve", card_number=card_number)
        balance = await self.get(f"/v1/cards/{resolved.json()['card']['card_id']}/balance")
        return units(balance.json()["available"])

    async def pages(self, path: str, items: str, page_size: int, **params: Any) -> list[Any]:
        """Every item of a paged list, ``page_size`` at a time."""
        found: list[Any] = []
        page_token = ""
        while True:
            page = await self.get(path, page_size=page_size, page_token=page_token, **params)
            assert page.status_code == 200, page.text
            assert len(page.json()[items]) <= page_size
            found.extend(page.json()[items])
            page_token = page.json()["next_page_token"]
            if not page_token:
                return found

    async def points(self, member_id: str) -> dict[str, Any]:
        """The member's points account, once loyalty knows the member."""
        read = await eventually(
            lambda: self.get(f"/v1/members/{member_id}/points"),
            lambda r: r.status_code == 200,
        )
        account: dict[str, Any] = read.json()
        return account


@pytest.fixture
async def till(suite: Suite, database_url: DatabaseFactory) -> AsyncIterator[Till]:
    async with gateway_in_front_of_loyalty(suite, database_url) as (http, shop):
        yield Till(http, shop)


async def test_a_terminal_checks_out_and_reads_its_sales(till: Till) -> None:
    member_id, card_number = await till.customer("13800138001", recharge=100_000)
    body = sale_body(stored_value(40_000), cash(TOTAL - 40_000), card_number=card_number)

    # The preview prices the basket and takes nothing.
    basket = {k: v for k, v in body.items() if k != "tenders"}
    previewed = await till.post("/v1/checkouts:preview", None, basket)
    assert previewed.status_code == 200, previewed.text
    preview = previewed.json()
    assert (units(preview["gross"]), units(preview["total"])) == (44_800, TOTAL)
    assert [units(line["net"]) for line in preview["lines"]] == [37_810, 4_750]
    assert preview["lines"][0]["discounts"][0]["source"] == "MEMBER"
    assert preview["points_to_earn"] > 0 and preview["explanations"]
    assert units(preview["stored_value_balance"]) == 100_000
    assert (preview["card_can_pay"], preview["card_refusal_reason"]) == (True, "")

    # The checkout: a receipt with the points earned and the tier.
    sold = await till.post("/v1/checkouts", "sale-1", body)
    assert sold.status_code == 201, sold.text
    receipt = sold.json()
    assert sold.headers["location"] == f"/v1/sales/{receipt['sale_id']}"
    assert (receipt["checkout_id"], receipt["member_id"]) == ("sale-1", member_id)
    assert (receipt["store_id"], receipt["terminal_id"]) == ("S001", "T1")
    assert units(receipt["total"]) == TOTAL
    assert {t["kind"]: units(t["amount"]) for t in receipt["tenders"]} == {
        "stored_value": 40_000,
        "cash": TOTAL - 40_000,
    }
    points = receipt["points"]
    assert points["earned"] == preview["points_to_earn"] > 0
    assert points["explanations"] and points["balance"] == points["earned"]
    assert units(receipt["stored_value_balance"]) == 60_000
    assert (receipt["tier"]["tier_id"], receipt["tier"]["next_tier_id"]) == ("NON_VIP", "QUASI_VIP")
    assert units(receipt["tier"]["spend_to_next"]) > 0
    assert (receipt["sold_by"]["principal"], receipt["sold_by"]["store_id"]) == ("op-1", "S001")
    assert await till.available(card_number) == 60_000

    # The same Idempotency-Key: the same receipt, nothing taken twice.
    again = await till.post("/v1/checkouts", "sale-1", body)
    assert again.status_code == 201, again.text
    assert again.json() == receipt
    assert await till.available(card_number) == 60_000
    other_tenders = sale_body(stored_value(40_001), cash(TOTAL - 40_001), card_number=card_number)
    reused = await till.post("/v1/checkouts", "sale-1", other_tenders)
    assert fields(problem(reused, 422, "IDEMPOTENCY_KEY_REUSED")) == {"Idempotency-Key"}
    problem(await till.post("/v1/checkouts", None, body), 400, "IDEMPOTENCY_KEY_REQUIRED")
    too_long = await till.post("/v1/checkouts", "k" * 65, body)
    assert fields(problem(too_long, 400, "INVALID_FIELDS")) == {"Idempotency-Key"}

    # The member by mobile, paying cash; and a guest.
    second = await till.sell("sale-2", sale_body(cash(TOTAL), mobile="13800138001"))
    assert second["member_id"] == member_id
    guest = await till.sell("sale-3", sale_body(cash(39_800), lines=BASKET[:1]))
    assert guest["member_id"] == "" and guest["points"]["earned"] == 0

    # A sale, by any staff member.
    read = await till.get(f"/v1/sales/{receipt['sale_id']}", OTHER_STORE)
    assert read.status_code == 200, read.text
    sale = read.json()
    assert (sale["state"], sale["receipt"], sale["refunds"]) == ("completed", receipt, [])
    assert sale["sale_time"] is not None
    problem(await till.get("/v1/sales/SNOSUCHSALE"), 404, "SALE_NOT_FOUND")

    # The member's and the store's sales, newest first, a page at a time.
    path = f"/v1/members/{member_id}/sales"
    whole = await till.get(path, page_size=100)
    assert whole.status_code == 200 and whole.json()["next_page_token"] == ""
    by_member = whole.json()["sales"]
    assert [s["receipt"]["sale_id"] for s in by_member] == [second["sale_id"], receipt["sale_id"]]
    assert await till.pages(path, "sales", 1) == by_member
    by_store = await till.pages("/v1/stores/S001/sales", "sales", 2)
    assert [s["receipt"]["sale_id"] for s in by_store] == [
        guest["sale_id"],
        second["sale_id"],
        receipt["sale_id"],
    ]
    problem(await till.get("/v1/stores/S001/sales", OTHER_STORE), 403, "OUT_OF_SCOPE")
    later = await till.get(path, start_time="2999-01-01T00:00:00Z")
    assert later.json()["sales"] == []
    window = await till.get(
        path, start_time="2000-01-01T08:00:00+08:00", end_time=sale["sale_time"], page_size=100
    )
    assert window.status_code == 200 and window.json()["sales"] == []
    naive = await till.get(path, start_time="2026-01-01T00:00:00")
    assert fields(problem(naive, 400, "INVALID_FIELDS")) == {"start_time"}
    backwards = await till.get(
        path, start_time="2026-01-02T00:00:00Z", end_time="2026-01-01T00:00:00Z"
    )
    assert fields(problem(backwards, 400, "INVALID_FIELDS")) == {"end_time"}
    bad_token = await till.get(path, page_token="nonsense")
    assert fields(problem(bad_token, 400, "INVALID_FIELDS")) == {"page_token"}

    # The member's sales as a workbook.
    download = await till.get(f"/v1/members/{member_id}/sales.xlsx")
    assert download.status_code == 200, download.text
    assert download.headers["content-type"] == XLSX
    disposition = download.headers["content-disposition"]
    assert disposition.startswith(f'attachment; filename="sales-{member_id}')
    assert disposition.endswith('.xlsx"')
    book = openpyxl.load_workbook(io.BytesIO(download.content), read_only=True)
    rows = list(book.active.iter_rows(values_only=True))
    assert rows[0][1] == "Sale ID"
    assert [row[1] for row in rows[1:]] == [s["receipt"]["sale_id"] for s in by_member]
    assert float(rows[-1][7]) == TOTAL / 100
    store_book = await till.get("/v1/stores/S001/sales.xlsx", MANAGER)
    assert store_book.status_code == 200, store_book.text
    assert store_book.content[:2] == b"PK"
    problem(await till.get("/v1/stores/S001/sales.xlsx", OTHER_STORE), 403, "OUT_OF_SCOPE")


async def test_the_cashiers_refusals_are_problems(
    till: Till, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    _, card_number = await till.customer("13800138002", recharge=10_000, pin="246813")

    async def refused(key: str, *tenders: dict[str, Any]) -> httpx.Response:
        return await till.post("/v1/checkouts", key, sale_body(*tenders, card_number=card_number))

    broke = await refused("no-1", stored_value(TOTAL, "246813"))
    assert problem(broke, 422, "INSUFFICIENT_BALANCE")["domain"] == "loyalty.cornucopia"
    problem(await refused("no-2", stored_value(5_000), cash(TOTAL - 5_000)), 422, "PIN_REQUIRED")
    wrong = await refused("no-3", stored_value(5_000, "111111"), cash(TOTAL - 5_000))
    assert "2 tries left" in problem(wrong, 422, "PIN_INCORRECT")["detail"]
    assert "111111" not in wrong.text
    problem(await refused("no-4", cash(TOTAL - 1)), 422, "TENDERS_DO_NOT_MATCH_TOTAL")
    points = await refused("no-5", {"kind": "points", "points": 100}, cash(TOTAL - 100))
    problem(points, 422, "POINTS_INSUFFICIENT")
    elsewhere = await till.post(
        "/v1/checkouts", "no-6", sale_body(cash(TOTAL), card_number=card_number), OTHER_STORE
    )
    problem(elsewhere, 403, "OUT_OF_SCOPE")
    assert await till.available(card_number) == 10_000

    # The refused checkout again under its key, with the right PIN.
    paid = await refused("no-3", stored_value(5_000, "246813"), cash(TOTAL - 5_000))
    assert paid.status_code == 201, paid.text
    assert paid.json()["checkout_id"] == "no-3"
    assert "246813" not in paid.text
    assert await till.available(card_number) == 5_000

    # A frozen card cannot pay; the preview says so.
    resolved = await till.get("/v1/cards:resolve", card_number=card_number)
    card_id = resolved.json()["card"]["card_id"]
    frozen = await till.post(
        f"/v1/cards/{card_id}/freeze", "freeze-1", {"reason": "check"}, MANAGER
    )
    assert frozen.status_code == 200, frozen.text
    problem(
        await refused("no-7", stored_value(1_000, "246813"), cash(TOTAL - 1_000)),
        422,
        "CARD_FROZEN",
    )
    preview = await till.post(
        "/v1/checkouts:preview",
        None,
        {k: v for k, v in sale_body(card_number=card_number).items() if k != "tenders"},
    )
    assert (preview.json()["card_can_pay"], preview.json()["card_refusal_reason"]) == (
        False,
        "CARD_FROZEN",
    )
    assert await till.available(card_number) == 5_000

    logged = everything_logged(caplog, capsys)
    assert "/v1/checkouts" in logged
    for secret in ("246813", "111111"):
        assert secret not in logged


async def test_a_checkout_being_completed_is_finished_by_sending_it_again(till: Till) -> None:
    _, card_number = await till.customer("13800138003", recharge=100_000)
    body = sale_body(stored_value(30_000), cash(TOTAL - 30_000), card_number=card_number)

    def fail_after_capture(step: SagaStep) -> None:
        if step == SagaStep.SV_CAPTURED:
            raise Unavailable("the database went away", reason="DATABASE_UNAVAILABLE")

    # Past the point of no return, the sale cannot be recorded yet.
    till.shop.sagas.crash_after = fail_after_capture
    completing = await till.post("/v1/checkouts", "late-1", body)
    problem(completing, 503, "CHECKOUT_COMPLETING")
    assert completing.headers["retry-after"] == "2"
    till.shop.sagas.crash_after = None
    # Its driver's lease has not run out: the same checkout is under way.
    busy = await till.post("/v1/checkouts", "late-1", body)
    problem(busy, 409, "CHECKOUT_IN_PROGRESS")
    assert busy.headers["retry-after"] == "1"

    # The lease runs out: sent again, the checkout is finished, charged once.
    async with till.shop.loyalty.db.transaction() as session:
        await session.execute(
            sa.update(sales_store.checkouts).values(
                lease_until=dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
            )
        )
    done = await eventually(
        lambda: till.post("/v1/checkouts", "late-1", body), lambda r: r.status_code == 201
    )
    assert done.json()["checkout_id"] == "late-1"
    assert (await till.post("/v1/checkouts", "late-1", body)).json() == done.json()
    assert await till.available(card_number) == 70_000


async def test_a_manager_refunds_and_voids(till: Till) -> None:
    member_id, card_number = await till.customer("13800138005", recharge=100_000)
    receipt = await till.sell(
        "r-sale", sale_body(stored_value(30_000), cash(TOTAL - 30_000), card_number=card_number)
    )
    refunds = f"/v1/sales/{receipt['sale_id']}/refunds"
    one_serum = {"lines": [{"line_no": 1, "quantity": 1}], "reason": "changed her mind"}

    problem(await till.post(refunds, "refund-0", one_serum), 403, "ROLE_NOT_ALLOWED")
    part = await till.post(refunds, "refund-1", one_serum, MANAGER)
    assert part.status_code == 201, part.text
    refund = part.json()
    assert (refund["sale_id"], units(refund["amount"]), refund["void"]) == (
        receipt["sale_id"],
        18_905,
        False,
    )
    assert refund["lines"] == [{"line_no": 1, "quantity": 1}]
    by_tender = {t["kind"]: units(t["amount"]) for t in refund["tenders"]}
    assert sum(by_tender.values()) == 18_905 and by_tender["stored_value"] > 0
    assert refund["points_reversed"] > 0
    assert (refund["reason"], refund["refunded_by"]["principal"]) == ("changed her mind", "mgr-1")
    again = await till.post(refunds, "refund-1", one_serum, MANAGER)
    assert (again.status_code, again.json()) == (201, refund)
    reused = await till.post(refunds, "refund-1", {**one_serum, "reason": "other"}, MANAGER)
    assert fields(problem(reused, 422, "IDEMPOTENCY_KEY_REUSED")) == {"Idempotency-Key"}
    too_many = {"lines": [{"line_no": 1, "quantity": 2}], "reason": "again"}
    problem(await till.post(refunds, "refund-2", too_many, MANAGER), 422, "REFUND_EXCEEDS_SALE")
    no_reason = await till.post(refunds, "refund-3", {"lines": []}, MANAGER)
    assert fields(problem(no_reason, 400, "INVALID_FIELDS")) == {"reason"}
    blank = await till.post(refunds, "refund-3", {"reason": " "}, MANAGER)
    assert fields(problem(blank, 400, "INVALID_FIELDS")) == {"reason"}
    no_line = {"lines": [{"line_no": 9, "quantity": 1}], "reason": "x"}
    assert fields(
        problem(await till.post(refunds, "refund-4", no_line, MANAGER), 400, "INVALID_FIELDS")
    ) == {"lines[0].line_no"}
    problem(await till.post(refunds, None, one_serum, MANAGER), 400, "IDEMPOTENCY_KEY_REQUIRED")

    sale = (await till.get(f"/v1/sales/{receipt['sale_id']}")).json()
    assert (sale["state"], units(sale["refunded"]), sale["refunds"]) == (
        "partly_refunded",
        18_905,
        [refund],
    )
    assert [line["quantity_refunded"] for line in sale["receipt"]["lines"]] == [1, 0]
    problem(
        await till.post(f"/v1/sales/{receipt['sale_id']}/void", "void-0", {"reason": "x"}, MANAGER),
        422,
        "SALE_ALREADY_REFUNDED",
    )

    # Another sale, voided on its day: everything goes back.
    before = await till.available(card_number)
    other = await till.sell("v-sale", sale_body(stored_value(TOTAL), card_number=card_number))
    assert await till.available(card_number) == before - TOTAL
    void = f"/v1/sales/{other['sale_id']}/void"
    problem(await till.post(void, "void-1", {"reason": "wrong basket"}), 403, "ROLE_NOT_ALLOWED")
    voided = await till.post(void, "void-1", {"reason": "wrong basket"}, MANAGER)
    assert voided.status_code == 200, voided.text
    assert (voided.json()["void"], units(voided.json()["amount"])) == (True, TOTAL)
    assert await till.available(card_number) == before
    assert (await till.get(f"/v1/sales/{other['sale_id']}")).json()["state"] == "voided"
    missing = await till.post("/v1/sales/SNOSUCHSALE/void", "void-2", {"reason": "x"}, MANAGER)
    problem(missing, 404, "SALE_NOT_FOUND")
    sales = await till.get(f"/v1/members/{member_id}/sales")
    assert [s["state"] for s in sales.json()["sales"]] == ["voided", "partly_refunded"]


async def test_points_gifts_and_tiers(till: Till) -> None:
    member_id, card_number = await till.customer("13800138006")
    assert (await till.points(member_id))["balance"] == 0

    # A big sale moves the member up a tier.
    receipt = await till.sell(
        "big-sale",
        sale_body(cash(237_500), card_number=card_number, lines=[line("CREAM-50", 1, 250_000)]),
    )
    earned = receipt["points"]["earned"]
    assert earned > 0
    assert (receipt["tier"]["tier_id"], receipt["tier"]["upgraded_from"]) == (
        "QUASI_VIP",
        "NON_VIP",
    )

    # The points account, history and lots after the sale.
    account = await till.points(member_id)
    assert account["member_id"] == member_id
    assert [account[k] for k in ("balance", "held", "available", "lifetime_earned")] == [
        earned,
        0,
        earned,
        earned,
    ]
    assert units(account["available_cash_value"]) == earned  # 100 points = 1.00
    assert account["next_expiry_points"] == earned
    assert dt.date.fromisoformat(account["next_expiry_date"]) > dt.date.today()
    assert account["next_expire_time"] is not None and account["closed"] is False
    history = await till.get(f"/v1/members/{member_id}/points/history")
    assert history.status_code == 200, history.text
    [accrued] = history.json()["movements"]
    assert (accrued["kind"], accrued["points"], accrued["balance_after"]) == (
        "accrue",
        earned,
        earned,
    )
    lots = await till.get(f"/v1/members/{member_id}/points/lots", only_open="true")
    assert lots.status_code == 200, lots.text
    [lot] = lots.json()["lots"]
    assert (lot["points"], lot["remaining"], lot["source"] is not None) == (earned, earned, True)

    # Adjustments are for managers.
    adjustments = f"/v1/members/{member_id}/points/adjustments"
    goodwill = {"points": 500, "reason": "goodwill"}
    problem(await till.post(adjustments, "adj-0", goodwill), 403, "ROLE_NOT_ALLOWED")
    adjusted = await till.post(adjustments, "adj-1", goodwill, MANAGER)
    assert adjusted.status_code == 201, adjusted.text
    movement = adjusted.json()["movement"]
    assert (movement["kind"], movement["points"], movement["reason"]) == ("adjust", 500, "goodwill")
    assert movement["stamp"]["principal"] == "mgr-1"
    assert adjusted.json()["account"]["balance"] == earned + 500
    again = await till.post(adjustments, "adj-1", goodwill, MANAGER)
    assert again.json()["movement"]["movement_id"] == movement["movement_id"]
    too_much = await till.post(adjustments, "adj-2", {"points": -(10**6), "reason": "x"}, MANAGER)
    problem(too_much, 422, "POINTS_INSUFFICIENT")
    zero = await till.post(adjustments, "adj-3", {"points": 0, "reason": "x"}, MANAGER)
    assert fields(problem(zero, 400, "INVALID_FIELDS")) == {"points"}

    # A transfer to the family.
    other_id, _ = await till.customer("13800138007")
    await till.points(other_id)
    sent = await till.post(
        "/v1/points/transfers",
        "tr-1",
        {"from_member_id": member_id, "to_member_id": other_id, "points": 100, "note": "mum"},
    )
    assert sent.status_code == 201, sent.text
    transfer = sent.json()
    assert (transfer["sent"]["points"], transfer["received"]["points"]) == (-100, 100)
    assert (transfer["sent"]["kind"], transfer["received"]["kind"]) == (
        "transfer_out",
        "transfer_in",
    )
    assert sum(lot["points"] for lot in transfer["lots"]) == 100
    assert (await till.points(other_id))["available"] == 100
    to_self = await till.post(
        "/v1/points/transfers",
        "tr-2",
        {"from_member_id": member_id, "to_member_id": member_id, "points": 1},
    )
    assert fields(problem(to_self, 400, "INVALID_FIELDS")) == {"to_member_id"}
    moves = await till.pages(f"/v1/members/{member_id}/points/history", "movements", 1)
    assert [m["kind"] for m in moves] == ["transfer_out", "adjust", "accrue"]

    # Gifts: HQ makes the catalogue and the stock (over gRPC); a store redeems.
    gifts = points_pb2_grpc.GiftsServiceStub(till.shop.suite.channels["loyalty"])
    for gift_id, active in (("TOTE", True), ("MUG", False)):
        await gifts.CreateGift(
            points_pb2.CreateGiftRequest(
                request_id=f"gift-{gift_id}",
                gift=points_pb2.Gift(
                    gift_id=gift_id, name=f"a {gift_id}", points_price=1_000, active=active
                ),
            ),
            metadata=HQ,
        )
        await gifts.AddGiftStock(
            points_pb2.AddGiftStockRequest(
                request_id=f"stock-{gift_id}", gift_id=gift_id, store_id="S001", delta=2
            ),
            metadata=HQ,
        )
    listed = await till.get("/v1/gifts")
    assert listed.status_code == 200, listed.text
    catalogue = {g["gift_id"]: g for g in listed.json()["gifts"]}
    assert set(catalogue) == {"MUG", "TOTE"}
    tote = catalogue["TOTE"]
    assert (tote["store_id"], tote["store_quantity"], tote["chain_quantity"]) == ("S001", 2, 0)
    assert (tote["points_price"], tote["active"]) == (1_000, True)
    active = await till.get("/v1/gifts", active_only="true", store_id="S001")
    assert [g["gift_id"] for g in active.json()["gifts"]] == ["TOTE"]
    problem(await till.get("/v1/gifts", store_id="S001", headers=OTHER_STORE), 403, "OUT_OF_SCOPE")

    before = (await till.points(member_id))["available"]
    redemption = {"member_id": member_id, "quantity": 1}
    redeemed = await till.post("/v1/gifts/TOTE/redemptions", "g-1", redemption)
    assert redeemed.status_code == 201, redeemed.text
    taken = redeemed.json()
    assert (taken["gift_id"], taken["points"], taken["store_id"], taken["stock_store_id"]) == (
        "TOTE",
        1_000,
        "S001",
        "S001",
    )
    assert taken["balance_after"] == before - 1_000
    retried = await till.post("/v1/gifts/TOTE/redemptions", "g-1", redemption)
    assert retried.json() == taken
    assert (await till.get("/v1/gifts")).json()["gifts"][1]["store_quantity"] == 1
    problem(await till.post("/v1/gifts/MUG/redemptions", "g-2", redemption), 422, "GIFT_INACTIVE")
    missing = await till.post("/v1/gifts/NOSUCH/redemptions", "g-3", redemption)
    problem(missing, 404, "GIFT_NOT_FOUND")
    none = await till.post("/v1/gifts/TOTE/redemptions", "g-4", {**redemption, "quantity": 0})
    assert fields(problem(none, 400, "INVALID_FIELDS")) == {"quantity"}
    assert (await till.points(member_id))["available"] == before - 1_000

    # The tier, and how the member got there.
    tier = await till.get(f"/v1/members/{member_id}/tier")
    assert tier.status_code == 200, tier.text
    member_tier = tier.json()
    assert (member_tier["tier"]["tier_id"], member_tier["tier"]["benefits"]["discount_bps"]) == (
        "QUASI_VIP",
        300,
    )
    assert member_tier["since"] is not None and member_tier["grace_end_time"] is None
    progress = member_tier["progress"]
    assert (progress["next_tier_id"], units(progress["window_spend"])) == ("VIP", 237_500)
    history = await till.get(f"/v1/members/{member_id}/tier/history")
    assert history.status_code == 200, history.text
    [upgrade] = history.json()["entries"]
    assert (upgrade["kind"], upgrade["from_tier_id"], upgrade["to_tier_id"]) == (
        "upgraded",
        "NON_VIP",
        "QUASI_VIP",
    )
    assert upgrade["sale_id"] == receipt["sale_id"]
    newcomer = await till.get(f"/v1/members/{other_id}/tier")
    assert newcomer.json()["tier"]["tier_id"] == "NON_VIP"


async def test_bad_bodies_are_problems_naming_the_fields(till: Till) -> None:
    _, card_number = await till.customer("13800138008", recharge=10_000)

    async def invalid(body: Any, path: str = "/v1/checkouts", key: str | None = "bad") -> set[str]:
        return fields(problem(await till.post(path, key, body), 400, "INVALID_FIELDS"))

    assert await invalid({}) == {"store_id", "terminal_id", "lines", "tenders"}
    assert await invalid(sale_body({"kind": "voucher", "amount": cny(1)})) == {"tenders[0].kind"}
    assert await invalid(sale_body(cash(TOTAL), lines=[{**BASKET[0], "quantity": "two"}])) == {
        "lines[0].quantity"
    }
    assert await invalid({**sale_body(cash(TOTAL)), "tip": 1}) == {"tip"}
    assert await invalid(sale_body({"kind": "cash", "amount": "425.60"})) == {"tenders[0].amount"}
    as_number = await till.post(
        "/v1/checkouts",
        "bad",
        sale_body({"kind": "stored_value", "amount": cny(TOTAL), "pin": 246813}),
    )
    assert fields(problem(as_number, 400, "INVALID_FIELDS")) == {"tenders[0].pin"}
    assert "246813" not in as_number.text
    # The service's rules, by the same names.
    nonsense = [{"sku": "", "category": "skincare", "quantity": 0, "unit_price": cny(-1)}]
    assert await invalid(sale_body(cash(1), lines=nonsense)) == {
        "lines[0].sku",
        "lines[0].quantity",
        "lines[0].unit_price.minor_units",
    }
    euros = [line("SERUM-30", 1, 100) | {"unit_price": {"currency_code": "EUR", "minor_units": 1}}]
    assert await invalid(sale_body(cash(1), lines=euros)) == {"lines[0].unit_price.currency_code"}
    both = sale_body(cash(TOTAL), card_number=card_number, mobile="13800138008")
    assert await invalid(both) == {"card_number"}
    twice = sale_body(cash(1), cash(TOTAL - 1), card_number=card_number)
    assert await invalid(twice) == {"tenders[1].kind"}
    malformed = await till.http.post(
        "/v1/checkouts",
        content=b'{"store_id": ',
        headers={**OPERATOR, "idempotency-key": "bad", "content-type": "application/json"},
    )
    problem(malformed, 400, "MALFORMED_JSON")

    # The preview and the other routes check their bodies alike.
    assert await invalid({"store_id": "S001"}, "/v1/checkouts:preview", None) == {
        "terminal_id",
        "lines",
    }
    assert await invalid({}, "/v1/sales/SNOSUCH/refunds") == {"reason"}
    assert await invalid(
        {"reason": "x", "lines": [{"line_no": "first"}]}, "/v1/sales/S/refunds"
    ) == {
        "lines[0].line_no",
        "lines[0].quantity",
    }
    assert await invalid({"points": 1.5, "reason": "x"}, "/v1/members/M1/points/adjustments") == {
        "points"
    }
    assert await invalid({"points": 1}, "/v1/points/transfers") == {
        "from_member_id",
        "to_member_id",
    }
    assert await invalid({"quantity": 1}, "/v1/gifts/TOTE/redemptions") == {"member_id"}
    bad_size = await till.get("/v1/members/M1/points/history", page_size=-1)
    assert fields(problem(bad_size, 400, "INVALID_FIELDS")) == {"page_size"}

    # No token, a forged one.
    assert (await till.http.get("/v1/sales/S1")).status_code == 401
    forged = await till.get("/v1/members/M1/points", {"authorization": "Bearer not-a-token"})
    assert forged.status_code == 401
    assert forged.headers["content-type"].startswith(PROBLEM_JSON)


async def test_the_openapi_document_lists_the_loyalty_operations() -> None:
    doc, operations = await openapi_document()
    expected = {
        ("POST", "/v1/checkouts"): ("checkout", "checkout"),
        ("POST", "/v1/checkouts:preview"): ("previewCheckout", "checkout"),
        ("GET", "/v1/sales/{sale_id}"): ("getSale", "sales"),
        ("GET", "/v1/members/{member_id}/sales"): ("listMemberSales", "sales"),
        ("GET", "/v1/stores/{store_id}/sales"): ("listStoreSales", "sales"),
        ("GET", "/v1/members/{member_id}/sales.xlsx"): ("exportMemberSales", "sales"),
        ("GET", "/v1/stores/{store_id}/sales.xlsx"): ("exportStoreSales", "sales"),
        ("POST", "/v1/sales/{sale_id}/refunds"): ("refundSale", "sales"),
        ("POST", "/v1/sales/{sale_id}/void"): ("voidSale", "sales"),
        ("GET", "/v1/members/{member_id}/points"): ("getPointsAccount", "points"),
        ("GET", "/v1/members/{member_id}/points/history"): ("listPointsHistory", "points"),
        ("GET", "/v1/members/{member_id}/points/lots"): ("listPointsLots", "points"),
        ("POST", "/v1/members/{member_id}/points/adjustments"): ("adjustPoints", "points"),
        ("POST", "/v1/points/transfers"): ("transferPoints", "points"),
        ("GET", "/v1/gifts"): ("listGifts", "gifts"),
        ("POST", "/v1/gifts/{gift_id}/redemptions"): ("redeemGift", "gifts"),
        ("GET", "/v1/members/{member_id}/tier"): ("getMemberTier", "tiers"),
        ("GET", "/v1/members/{member_id}/tier/history"): ("listTierHistory", "tiers"),
    }
    assert {key: operations.get(key) for key in expected} == {
        key: operation_id for key, (operation_id, _) in expected.items()
    }
    for (method, path), (_, tag) in expected.items():
        operation = doc["paths"][path][method.lower()]
        assert operation["tags"] == [tag], path
        has_key = any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
        assert has_key == (method == "POST" and path != "/v1/checkouts:preview"), path
    checkout = doc["paths"]["/v1/checkouts"]["post"]
    [key] = [p for p in checkout["parameters"] if p["name"] == "Idempotency-Key"]
    assert (
        "checkout_id" in key["description"] and "terminal's key for the sale" in key["description"]
    )
    assert "201" in checkout["responses"]
    assert "CARD_FROZEN" in checkout["responses"]["422"]["description"]
    assert "CHECKOUT_COMPLETING" in checkout["responses"]["503"]["description"]
    assert "CHECKOUT_IN_PROGRESS" in checkout["responses"]["409"]["description"]
    assert list(checkout["responses"]["422"]["content"]) == [PROBLEM_JSON]
    export = doc["paths"]["/v1/members/{member_id}/sales.xlsx"]["get"]
    assert list(export["responses"]["200"]["content"]) == [XLSX]
    schemas = doc["components"]["schemas"]
    pin = schemas["TenderInput"]["properties"]["pin"]["anyOf"][0]
    assert (pin["format"], pin["writeOnly"]) == ("password", True)
    assert schemas["TenderInput"]["properties"]["kind"]["enum"] == [
        "stored_value",
        "points",
        "cash",
        "bank_card",
    ]
    assert "voided" in schemas["Sale"]["properties"]["state"]["anyOf"][0]["enum"]
    assert "accrue" in schemas["PointsMovement"]["properties"]["kind"]["anyOf"][0]["enum"]
    assert {t["name"] for t in doc["tags"]} >= {"checkout", "sales", "points", "gifts", "tiers"}
