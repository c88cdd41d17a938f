"""A store terminal works with stored value through the gateway: the real
gateway app in front of real members and cards services, on SQLite and
PostgreSQL. Recharges with a bonus and their quote, holds captured in part
and voided, debits (and too little money), refunds, statements paged and
downloaded as XLSX, idempotent retries, the payment PIN, the policy and
the bonus rules, and bad input."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openpyxl
import pytest

from chassis.auth import Role, Scope, ScopeLevel
from cornucopia.cards.v1 import stored_value_pb2, stored_value_pb2_grpc
from cornucopia.common.v1 import money_pb2
from tests.integration.conftest import Suite, token
from tests.integration.gateway_rig import (
    MANAGER,
    OPERATOR,
    OTHER_STORE,
    PROBLEM_JSON,
    GatewayTill,
    bearer,
    everything_logged,
    fields,
    gateway_in_front_of_cards,
    openapi_document,
    problem,
)
from tests.integration.infra import DatabaseFactory
from tests.integration.test_cards_lifecycle import HQ

S = stored_value_pb2
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PARTNER = {
    "authorization": "Bearer "
    + token((Role.PARTNER,), Scope(ScopeLevel.PARTNER, "P001"), "partner-1")
}
CHECKOUT = bearer((Role.SERVICE,), "S001", "checkout")


def cny(minor_units: int) -> dict[str, Any]:
    return {"currency_code": "CNY", "minor_units": minor_units}


def units(money: dict[str, Any] | None) -> int:
    assert money is not None and money["currency_code"] == "CNY", money
    value: int = money["minor_units"]
    return value


@dataclass
class Till(GatewayTill):
    sv: stored_value_pb2_grpc.StoredValueServiceAsyncStub

    async def card(self, mobile: str, key: str) -> dict[str, Any]:
        """A member enrolled at S001 with a GOLD card."""
        enrolled = await self.post(
            "/v1/members",
            f"enroll-{key}",
            {"home_store_id": "S001", "given_name": "娜", "mobile": mobile},
        )
        assert enrolled.status_code == 201, enrolled.text
        issued = await self.post(
            "/v1/cards",
            f"issue-{key}",
            {"program_id": "GOLD", "member_id": enrolled.json()["member_id"]},
        )
        assert issued.status_code == 201, issued.text
        card: dict[str, Any] = issued.json()
        return card

    async def get(
        self, path: str, headers: dict[str, str] = OPERATOR, **params: Any
    ) -> httpx.Response:
        return await self.http.get(path, params=params, headers=headers)

    async def balance(self, card_id: str) -> dict[str, Any]:
        read = await self.get(f"/v1/cards/{card_id}/balance")
        assert read.status_code == 200, read.text
        balance: dict[str, Any] = read.json()
        return balance

    async def all_movements(self, path: str, page_size: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        page_token = ""
        while True:
            page = await self.get(path, page_size=page_size, page_token=page_token)
            assert page.status_code == 200, page.text
            assert len(page.json()["movements"]) <= page_size
            found.extend(page.json()["movements"])
            page_token = page.json()["next_page_token"]
            if not page_token:
                return found


@pytest.fixture
async def till(suite: Suite, database_url: DatabaseFactory) -> AsyncIterator[Till]:
    async with gateway_in_front_of_cards(suite, database_url) as http:
        sv = stored_value_pb2_grpc.StoredValueServiceStub(suite.channels["cards"])
        # Bonus rules are set by HQ over gRPC; no HTTP route creates them.
        await sv.CreateBonusRule(
            S.CreateBonusRuleRequest(
                request_id="bonus-1000",
                bonus_rule=S.BonusRule(
                    name="充1000送100",
                    threshold=money_pb2.Money(currency_code="CNY", minor_units=100_000),
                    fixed_bonus=money_pb2.Money(currency_code="CNY", minor_units=10_000),
                ),
            ),
            metadata=HQ,
        )
        yield Till(http, sv)  # type: ignore[arg-type]


async def test_a_till_recharges_holds_debits_and_refunds(till: Till) -> None:
    card = await till.card("13800138000", "1")
    card_id, account_id = card["card_id"], card["account_id"]

    # A new card: nothing on it, no daily limit.
    empty = await till.balance(card_id)
    assert empty["account_id"] == account_id
    assert [units(empty[k]) for k in ("available", "paid", "bonus", "held")] == [0, 0, 0, 0]
    assert (empty["closed"], empty["spendable_today"]) == (False, None)

    # The quote names the bonus a recharge would get, without making it.
    quoted = await till.get(
        f"/v1/cards/{card_id}/recharge-quote",
        amount_minor_units=100_000,
        currency_code="CNY",
        channel="store_terminal",
    )
    assert quoted.status_code == 200, quoted.text
    quote = quoted.json()
    assert (units(quote["bonus"]), quote["bonus_rule_name"]) == (10_000, "充1000送100")
    small = await till.get(
        f"/v1/cards/{card_id}/recharge-quote",
        amount_minor_units=5_000,
        currency_code="CNY",
        channel="bank_card",
    )
    assert (units(small.json()["bonus"]), small.json()["bonus_rule_id"]) == (0, "")
    assert units((await till.balance(card_id))["available"]) == 0

    # Recharge, idempotently.
    path = f"/v1/cards/{card_id}/recharges"
    body = {"amount": cny(100_000), "channel": "store_terminal", "note": "cash"}
    recharged = await till.post(path, "recharge-1", body)
    assert recharged.status_code == 201, recharged.text
    movement, balance = recharged.json()["movement"], recharged.json()["balance"]
    assert (movement["kind"], movement["channel"], movement["card_id"]) == (
        "recharge",
        "store_terminal",
        card_id,
    )
    assert (units(movement["paid"]), units(movement["bonus"])) == (100_000, 10_000)
    assert movement["bonus_rule_id"] == quote["bonus_rule_id"]
    assert (movement["note"], movement["stamp"]["store_id"]) == ("cash", "S001")
    assert units(balance["available"]) == 110_000
    again = await till.post(path, "recharge-1", body)
    assert again.status_code == 201, again.text
    assert again.json()["movement"]["movement_id"] == movement["movement_id"]
    reused = await till.post(path, "recharge-1", {**body, "amount": cny(5_000)})
    assert fields(problem(reused, 422, "IDEMPOTENCY_KEY_REUSED")) == {"Idempotency-Key"}
    problem(await till.post(path, None, body), 400, "IDEMPOTENCY_KEY_REQUIRED")
    after = await till.balance(card_id)
    assert [units(after[k]) for k in ("available", "paid", "bonus", "held")] == [
        110_000,
        100_000,
        10_000,
        0,
    ]

    # Hold, capture part: the rest goes back.
    held = await till.post(
        f"/v1/cards/{card_id}/holds",
        "hold-1",
        {"amount": cny(30_000), "reference": "checkout 1", "ttl_seconds": 600},
        CHECKOUT,
    )
    assert held.status_code == 201, held.text
    hold = held.json()
    assert held.headers["location"] == f"/v1/holds/{hold['hold_id']}"
    assert (hold["state"], units(hold["amount"]), hold["reference"]) == (
        "held",
        30_000,
        "checkout 1",
    )
    # Bonus funds go first (the default policy).
    assert (units(hold["bonus"]), units(hold["paid"])) == (10_000, 20_000)
    assert hold["expire_time"] is not None and hold["captured"] is None
    holding = await till.balance(card_id)
    assert (units(holding["available"]), units(holding["held"])) == (80_000, 30_000)
    read = await till.get(f"/v1/holds/{hold['hold_id']}", OTHER_STORE)
    assert read.json() == hold
    captured = await till.post(
        f"/v1/holds/{hold['hold_id']}/capture", "capture-1", {"amount": cny(20_000)}, CHECKOUT
    )
    assert captured.status_code == 200, captured.text
    capture = captured.json()
    assert (capture["state"], units(capture["captured"])) == ("captured", 20_000)
    assert capture["capture_movement_id"]
    settled = await till.balance(card_id)
    assert (units(settled["available"]), units(settled["held"])) == (90_000, 0)
    too_late = await till.post(f"/v1/holds/{hold['hold_id']}/void", "void-0")
    problem(too_late, 422, "HOLD_CAPTURED")

    # Hold and void, with no body at all: a second void changes nothing.
    second = (
        await till.post(f"/v1/cards/{card_id}/holds", "hold-2", {"amount": cny(1_000)})
    ).json()
    voided = await till.post(
        f"/v1/holds/{second['hold_id']}/void", "void-1", {"reason": "sale abandoned"}
    )
    assert voided.status_code == 200, voided.text
    assert voided.json()["state"] == "voided"
    assert (await till.post(f"/v1/holds/{second['hold_id']}/void", "void-2")).json()[
        "state"
    ] == "voided"
    problem(
        await till.post(f"/v1/holds/{second['hold_id']}/capture", "capture-2"), 422, "HOLD_VOIDED"
    )
    problem(await till.get("/v1/holds/HNOSUCHHOLD"), 404, "HOLD_NOT_FOUND")
    assert units((await till.balance(card_id))["available"]) == 90_000

    # Debit; too much is refused.
    debited = await till.post(
        f"/v1/cards/{card_id}/debits", "debit-1", {"amount": cny(25_000), "reference": "fee"}
    )
    assert debited.status_code == 201, debited.text
    debit = debited.json()["movement"]
    assert (debit["kind"], units(debit["amount"]), debit["reference"]) == ("debit", 25_000, "fee")
    assert units(debited.json()["balance"]["available"]) == 65_000
    broke = await till.post(f"/v1/cards/{card_id}/debits", "debit-2", {"amount": cny(10_000_000)})
    assert problem(broke, 422, "INSUFFICIENT_BALANCE")["domain"] == "cards.cornucopia"

    # Refund part, then the rest (no body); more is refused.
    refunds = f"/v1/movements/{debit['movement_id']}/refunds"
    part = await till.post(refunds, "refund-1", {"amount": cny(5_000), "reason": "returned"})
    assert part.status_code == 201, part.text
    refund = part.json()["movement"]
    assert (refund["kind"], refund["refunds_movement_id"]) == ("refund", debit["movement_id"])
    assert units(part.json()["balance"]["available"]) == 70_000
    rest = await till.post(refunds, "refund-2")
    assert rest.status_code == 201, rest.text
    assert units(rest.json()["movement"]["amount"]) == 20_000
    problem(await till.post(refunds, "refund-3", {"amount": cny(1)}), 422, "REFUND_EXCEEDS_PAYMENT")
    capture_refund = await till.post(
        f"/v1/movements/{capture['capture_movement_id']}/refunds", "refund-4", {}
    )
    assert capture_refund.status_code == 201, capture_refund.text
    problem(
        await till.post(f"/v1/movements/{movement['movement_id']}/refunds", "refund-5"),
        422,
        "MOVEMENT_NOT_REFUNDABLE",
    )
    final = await till.balance(card_id)
    assert units(final["available"]) == 110_000

    # The statement, a page at a time: the same as in one page, newest first.
    whole = await till.get(f"/v1/cards/{card_id}/movements", page_size=100)
    assert whole.status_code == 200, whole.text
    movements = whole.json()["movements"]
    assert whole.json()["next_page_token"] == ""
    assert await till.all_movements(f"/v1/cards/{card_id}/movements", 2) == movements
    assert movements[-1]["movement_id"] == movement["movement_id"]
    kinds = [m["kind"] for m in movements]
    assert kinds[-1] == "recharge" and kinds[0] == "refund"
    assert {"hold", "capture", "release", "debit", "refund"} <= set(kinds)
    by_account = await till.all_movements(f"/v1/accounts/{account_id}/movements", 3)
    assert [m["movement_id"] for m in by_account] == [m["movement_id"] for m in movements]
    first = movements[-1]["stamp"]["time"]
    since = await till.get(f"/v1/cards/{card_id}/movements", start_time="2999-01-01T00:00:00Z")
    assert since.json()["movements"] == []
    window = await till.get(
        f"/v1/cards/{card_id}/movements",
        start_time="2000-01-01T08:00:00+08:00",
        end_time=first,
        page_size=100,
    )
    assert window.status_code == 200, window.text
    assert window.json()["movements"] == []
    naive = await till.get(f"/v1/cards/{card_id}/movements", start_time="2026-01-01T00:00:00")
    assert fields(problem(naive, 400, "INVALID_FIELDS")) == {"start_time"}
    backwards = await till.get(
        f"/v1/cards/{card_id}/movements",
        start_time="2026-01-02T00:00:00Z",
        end_time="2026-01-01T00:00:00Z",
    )
    assert fields(problem(backwards, 400, "INVALID_FIELDS")) == {"end_time"}
    bad_token = await till.get(f"/v1/cards/{card_id}/movements", page_token="nonsense")
    assert fields(problem(bad_token, 400, "INVALID_FIELDS")) == {"page_token"}
    problem(await till.get("/v1/cards/CNOSUCHCARD/movements"), 404, "CARD_NOT_FOUND")

    # The statement as a workbook: every movement, oldest first.
    download = await till.get(f"/v1/cards/{card_id}/statement.xlsx")
    assert download.status_code == 200, download.text
    assert download.headers["content-type"] == XLSX
    disposition = download.headers["content-disposition"]
    assert disposition.startswith(f'attachment; filename="statement-{card_id}')
    assert disposition.endswith('.xlsx"')
    book = openpyxl.load_workbook(io.BytesIO(download.content), read_only=True)
    rows = list(book.active.iter_rows(values_only=True))
    header, lines = rows[0], rows[1:]
    assert header[1] == "Movement ID"
    assert [line[1] for line in lines] == [m["movement_id"] for m in reversed(movements)]
    assert lines[0][2] == "recharge" and lines[0][4] == 1000  # yuan, not fen
    by_account_book = await till.get(f"/v1/accounts/{account_id}/statement.xlsx")
    assert by_account_book.status_code == 200, by_account_book.text
    assert by_account_book.content[:2] == b"PK"
    # An error before the first chunk is a problem, not a broken file.
    missing = await till.get("/v1/cards/CNOSUCHCARD/statement.xlsx")
    problem(missing, 404, "CARD_NOT_FOUND")
    problem(await till.get(f"/v1/cards/{card_id}/statement.xlsx", PARTNER), 403, "ROLE_NOT_ALLOWED")


async def test_bad_requests_are_problems_naming_the_fields(till: Till) -> None:
    card = await till.card("13800138000", "1")
    path = f"/v1/cards/{card['card_id']}/recharges"

    async def invalid(body: Any, key: str = "bad") -> set[str]:
        return fields(problem(await till.post(path, key, body), 400, "INVALID_FIELDS"))

    assert await invalid({}) == {"amount", "channel"}
    assert await invalid({"amount": cny(100), "channel": "partner_card"}) == {"channel"}
    assert await invalid({"amount": "100", "channel": "store_terminal"}) == {"amount"}
    assert await invalid({"amount": {"minor_units": 100}, "channel": "bank_card"}) == {
        "amount.currency_code"
    }
    assert await invalid({"amount": cny(100), "channel": "store_terminal", "tip": 1}) == {"tip"}
    # The service's rules, by the same names.
    assert await invalid({"amount": cny(-5), "channel": "store_terminal"}) == {"amount.minor_units"}
    euros = {"amount": {"currency_code": "EUR", "minor_units": 100}, "channel": "store_terminal"}
    assert await invalid(euros) == {"amount.currency_code"}
    assert await invalid({"amount": cny(100), "channel": "bank_card"}) == {"payment_reference"}
    malformed = await till.http.post(
        path,
        content=b'{"amount": ',
        headers={**OPERATOR, "idempotency-key": "bad", "content-type": "application/json"},
    )
    problem(malformed, 400, "MALFORMED_JSON")

    holds = f"/v1/cards/{card['card_id']}/holds"
    short = await till.post(holds, "hold-bad", {"amount": cny(100), "ttl_seconds": 5})
    assert fields(problem(short, 400, "INVALID_FIELDS")) == {"ttl_seconds"}
    negative = await till.post(holds, "hold-bad", {"amount": cny(100), "ttl_seconds": -1})
    assert fields(problem(negative, 400, "INVALID_FIELDS")) == {"ttl_seconds"}
    problem(await till.post(holds, None, {"amount": cny(100)}), 400, "IDEMPOTENCY_KEY_REQUIRED")
    no_amount = await till.post(f"/v1/cards/{card['card_id']}/debits", "debit-bad", {})
    assert fields(problem(no_amount, 400, "INVALID_FIELDS")) == {"amount"}
    no_card = await till.post("/v1/cards/CNOSUCHCARD/debits", "debit-x", {"amount": cny(100)})
    problem(no_card, 404, "CARD_NOT_FOUND")
    refund = await till.post("/v1/movements/VNOSUCH/refunds", "refund-bad", {"amount": "all"})
    assert fields(problem(refund, 400, "INVALID_FIELDS")) == {"amount"}
    problem(await till.post("/v1/movements/VNOSUCH/refunds", "refund-x"), 404, "MOVEMENT_NOT_FOUND")

    quote = f"/v1/cards/{card['card_id']}/recharge-quote"
    missing = await till.get(quote)
    assert fields(problem(missing, 400, "INVALID_FIELDS")) == {
        "amount_minor_units",
        "currency_code",
        "channel",
    }
    euros_quote = await till.get(
        quote, amount_minor_units=100, currency_code="EUR", channel="store_terminal"
    )
    assert fields(problem(euros_quote, 400, "INVALID_FIELDS")) == {"currency_code"}
    zero = await till.get(quote, amount_minor_units=0, currency_code="CNY", channel="bank_card")
    assert fields(problem(zero, 400, "INVALID_FIELDS")) == {"amount_minor_units"}

    # No token, a forged one.
    assert (await till.http.get(f"/v1/cards/{card['card_id']}/balance")).status_code == 401
    forged = await till.get(
        f"/v1/cards/{card['card_id']}/balance", {"authorization": "Bearer not-a-token"}
    )
    assert forged.status_code == 401
    assert forged.headers["content-type"].startswith(PROBLEM_JSON)


async def test_payments_with_the_pin(
    till: Till, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    card = await till.card("13800138000", "1")
    card_id = card["card_id"]
    await till.post(
        f"/v1/cards/{card_id}/recharges",
        "r-1",
        {"amount": cny(50_000), "channel": "store_terminal"},
    )
    pin = await till.http.put(
        f"/v1/cards/{card_id}/pin",
        json={"new_pin": "284751"},
        headers={**OPERATOR, "idempotency-key": "pin-1"},
    )
    assert pin.status_code == 200, pin.text
    debits = f"/v1/cards/{card_id}/debits"

    problem(await till.post(debits, "d-1", {"amount": cny(1_000)}), 422, "PIN_REQUIRED")
    wrong = await till.post(debits, "d-2", {"amount": cny(1_000), "pin": "000001"})
    assert "2 tries left" in problem(wrong, 422, "PIN_INCORRECT")["detail"]
    assert "000001" not in wrong.text
    as_number = await till.post(debits, "d-3", {"amount": cny(1_000), "pin": 284751})
    assert fields(problem(as_number, 400, "INVALID_FIELDS")) == {"pin"}
    assert "284751" not in as_number.text
    paid = await till.post(debits, "d-4", {"amount": cny(1_000), "pin": "284751"}, CHECKOUT)
    assert paid.status_code == 201, paid.text
    assert "284751" not in paid.text
    # A retry is the same movement, and not another try at the PIN.
    retried = await till.post(debits, "d-4", {"amount": cny(1_000), "pin": "284751"}, CHECKOUT)
    assert retried.json()["movement"]["movement_id"] == paid.json()["movement"]["movement_id"]
    held = await till.post(
        f"/v1/cards/{card_id}/holds", "h-1", {"amount": cny(2_000), "pin": "284751"}, CHECKOUT
    )
    assert held.status_code == 201, held.text
    assert "284751" not in held.text
    # The right PIN cleared the wrong try: three more lock it.
    wrong_hold = await till.post(
        f"/v1/cards/{card_id}/holds", "h-2", {"amount": cny(2_000), "pin": "000002"}
    )
    assert "2 tries left" in problem(wrong_hold, 422, "PIN_INCORRECT")["detail"]
    wrong_again = await till.post(debits, "d-5", {"amount": cny(1_000), "pin": "000003"})
    assert "1 tries left" in problem(wrong_again, 422, "PIN_INCORRECT")["detail"]
    locked = await till.post(debits, "d-6", {"amount": cny(1_000), "pin": "000004"})
    problem(locked, 422, "PIN_LOCKED")
    assert 0 < int(locked.headers["retry-after"]) <= 30 * 60
    assert units((await till.balance(card_id))["available"]) == 47_000

    logged = everything_logged(caplog, capsys)
    assert "/v1/cards/{card_id}/debits" in logged
    for secret in ("284751", "000001", "000002", "000003", "000004"):
        assert secret not in logged


async def test_the_policy_and_the_bonus_rules(till: Till) -> None:
    # Any staff member reads the policy, an operator as much as a manager.
    for headers in (OPERATOR, MANAGER, CHECKOUT):
        read = await till.get("/v1/stored-value/policy", headers)
        assert read.status_code == 200, read.text
    policy = read.json()
    assert (policy["currency_code"], policy["spend_order"], policy["time_zone"]) == (
        "CNY",
        "bonus_first",
        "Asia/Shanghai",
    )
    assert policy["max_hold_ttl_seconds"] == 24 * 60 * 60
    assert policy["max_balance"] is None and policy["etag"]
    channels = {c["channel"]: c for c in policy["channels"]}
    assert {"store_terminal", "bank_card", "online_self_service"} <= set(channels)
    assert channels["store_terminal"]["enabled"] is True
    # A partner is not staff.
    problem(await till.get("/v1/stored-value/policy", PARTNER), 403, "ROLE_NOT_ALLOWED")

    # HQ ends the first rule and adds two more (over gRPC).
    listed = await till.get("/v1/stored-value/bonus-rules")
    assert listed.status_code == 200, listed.text
    [first] = listed.json()["bonus_rules"]
    assert (first["name"], units(first["threshold"]), units(first["fixed_bonus"])) == (
        "充1000送100",
        100_000,
        10_000,
    )
    assert (first["bonus_bps"], first["end_time"], first["channels"]) == (None, None, [])
    await till.sv.EndBonusRule(
        S.EndBonusRuleRequest(request_id="end-1", bonus_rule_id=first["bonus_rule_id"]),
        metadata=HQ,
    )
    for index, bps in enumerate((500, 800)):
        await till.sv.CreateBonusRule(
            S.CreateBonusRuleRequest(
                request_id=f"bonus-{bps}",
                bonus_rule=S.BonusRule(
                    name=f"{bps} bps {index}",
                    threshold=money_pb2.Money(currency_code="CNY", minor_units=50_000),
                    bonus_bps=bps,
                    channels=[S.RECHARGE_CHANNEL_BANK_CARD],
                ),
            ),
            metadata=HQ,
        )
    rules: list[dict[str, Any]] = []
    page_token = ""
    while True:
        page = await till.get("/v1/stored-value/bonus-rules", page_size=2, page_token=page_token)
        assert page.status_code == 200, page.text
        assert len(page.json()["bonus_rules"]) <= 2
        rules.extend(page.json()["bonus_rules"])
        page_token = page.json()["next_page_token"]
        if not page_token:
            break
    assert [r["name"] for r in rules] == ["800 bps 1", "500 bps 0", "充1000送100"]
    assert (rules[0]["bonus_bps"], rules[0]["fixed_bonus"], rules[0]["channels"]) == (
        800,
        None,
        ["bank_card"],
    )
    assert rules[2]["end_time"] is not None
    in_force = await till.get("/v1/stored-value/bonus-rules", in_force_only="true")
    assert [r["name"] for r in in_force.json()["bonus_rules"]] == ["800 bps 1", "500 bps 0"]
    problem(await till.get("/v1/stored-value/bonus-rules", PARTNER), 403, "ROLE_NOT_ALLOWED")


async def test_the_openapi_document_lists_the_stored_value_operations() -> None:
    doc, operations = await openapi_document()
    expected = {
        ("GET", "/v1/cards/{card_id}/balance"): "getCardBalance",
        ("POST", "/v1/cards/{card_id}/recharges"): "rechargeCard",
        ("GET", "/v1/cards/{card_id}/recharge-quote"): "quoteRecharge",
        ("POST", "/v1/cards/{card_id}/debits"): "debitCard",
        ("POST", "/v1/cards/{card_id}/holds"): "holdStoredValue",
        ("GET", "/v1/holds/{hold_id}"): "getHold",
        ("POST", "/v1/holds/{hold_id}/capture"): "captureHold",
        ("POST", "/v1/holds/{hold_id}/void"): "voidHold",
        ("POST", "/v1/movements/{movement_id}/refunds"): "refundMovement",
        ("GET", "/v1/cards/{card_id}/movements"): "listCardMovements",
        ("GET", "/v1/accounts/{account_id}/movements"): "listAccountMovements",
        ("GET", "/v1/cards/{card_id}/statement.xlsx"): "exportCardStatement",
        ("GET", "/v1/accounts/{account_id}/statement.xlsx"): "exportAccountStatement",
        ("GET", "/v1/stored-value/policy"): "getStoredValuePolicy",
        ("GET", "/v1/stored-value/bonus-rules"): "listBonusRules",
    }
    assert {key: operations.get(key) for key in expected} == expected
    for (method, path), _ in expected.items():
        operation = doc["paths"][path][method.lower()]
        assert operation["tags"] == ["stored value"]
        has_key = any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
        assert has_key == (method == "POST"), path
    debit = doc["paths"]["/v1/cards/{card_id}/debits"]["post"]
    assert "201" in debit["responses"]
    assert "INSUFFICIENT_BALANCE" in debit["responses"]["422"]["description"]
    assert list(debit["responses"]["422"]["content"]) == [PROBLEM_JSON]
    statement = doc["paths"]["/v1/cards/{card_id}/statement.xlsx"]["get"]
    assert list(statement["responses"]["200"]["content"]) == [XLSX]
    schemas = doc["components"]["schemas"]
    pin = schemas["NewDebit"]["properties"]["pin"]["anyOf"][0]
    assert (pin["format"], pin["writeOnly"]) == ("password", True)
    assert schemas["NewRecharge"]["properties"]["channel"]["enum"] == [
        "store_terminal",
        "bank_card",
        "online_self_service",
    ]
    assert "held" in schemas["Hold"]["properties"]["state"]["anyOf"][0]["enum"]
    assert "recharge" in schemas["Movement"]["properties"]["kind"]["anyOf"][0]["enum"]
