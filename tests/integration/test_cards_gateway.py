"""A store terminal works with member cards through the gateway: the real
gateway app in front of real members and cards services, on SQLite and
PostgreSQL. Issuing, resolving by number and by mobile, the lifecycle and
its refusals, who may freeze, replacement, links, idempotency, history
paging, the payment PIN, and bad input."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Suite
from tests.integration.gateway_rig import (
    MANAGER,
    OPERATOR,
    OTHER_STORE,
    PROBLEM_JSON,
    GatewayTill,
    everything_logged,
    fields,
    gateway_in_front_of_cards,
    openapi_document,
    problem,
)
from tests.integration.infra import DatabaseFactory


class Till(GatewayTill):
    async def enroll(self, mobile: str, key: str) -> str:
        created = await self.http.post(
            "/v1/members",
            json={"home_store_id": "S001", "given_name": "娜", "mobile": mobile},
            headers={**OPERATOR, "idempotency-key": key},
        )
        assert created.status_code == 201, created.text
        member_id: str = created.json()["member_id"]
        return member_id

    async def resolve(self, **by: str) -> httpx.Response:
        return await self.http.get("/v1/cards:resolve", params=by, headers=OTHER_STORE)


@pytest.fixture
async def till(suite: Suite, database_url: DatabaseFactory) -> AsyncIterator[Till]:
    async with gateway_in_front_of_cards(suite, database_url) as http:
        yield Till(http)


async def test_a_store_issues_resolves_and_moves_a_card(till: Till) -> None:
    http = till.http
    member_id = await till.enroll("13800138000", "enroll-1")
    other_member_id = await till.enroll("13900139000", "enroll-2")

    # Programs.
    listed = await http.get("/v1/card-programs", headers=OPERATOR)
    assert listed.status_code == 200, listed.text
    assert [p["program_id"] for p in listed.json()["card_programs"]] == ["GOLD"]
    gold = (await http.get("/v1/card-programs/GOLD", headers=OPERATOR)).json()
    assert (gold["form"], gold["holding"], gold["member_discount_bps"]) == (
        "physical",
        "personal",
        500,
    )
    assert gold["number_format"] == {"prefix": "8816", "length": 16, "luhn_check_digit": True}
    problem(await http.get("/v1/card-programs/NONE", headers=OPERATOR), 404, "PROGRAM_NOT_FOUND")

    # Issue, idempotently.
    request = {"program_id": "GOLD", "member_id": member_id}
    issued = await till.post("/v1/cards", "issue-1", request)
    assert issued.status_code == 201, issued.text
    card = issued.json()
    card_id = card["card_id"]
    assert issued.headers["location"] == f"/v1/cards/{card_id}"
    assert (card["state"], card["role"], card["form"], card["pin_set"]) == (
        "active",
        "principal",
        "physical",
        False,
    )
    assert card["card_number"].startswith("8816") and len(card["card_number"]) == 16
    assert card["issued_by"]["store_id"] == "S001"
    assert card["spending_limit"] is None
    again = await till.post("/v1/cards", "issue-1", request)
    assert again.json()["card_id"] == card_id
    reused = await till.post("/v1/cards", "issue-1", {**request, "member_id": other_member_id})
    assert fields(problem(reused, 422, "IDEMPOTENCY_KEY_REUSED")) == {"Idempotency-Key"}
    problem(await till.post("/v1/cards", None, request), 400, "IDEMPOTENCY_KEY_REQUIRED")
    held = await till.post("/v1/cards", "issue-2", request)
    assert problem(held, 422, "CARD_ALREADY_HELD")["domain"] == "cards.cornucopia"

    # Bad input: the JSON field names, every one of them.
    missing = problem(await till.post("/v1/cards", "issue-3", {}), 400, "INVALID_FIELDS")
    assert fields(missing) == {"program_id", "member_id"}
    limit = {**request, "spending_limit": {"currency_code": "CNY", "minor_units": 1}}
    not_supplementary = problem(
        await till.post("/v1/cards", "issue-4", limit), 400, "INVALID_FIELDS"
    )
    assert fields(not_supplementary) == {"spending_limit"}
    no_reason = await till.post(f"/v1/cards/{card_id}/freeze", "f-0", {}, MANAGER)
    assert fields(problem(no_reason, 400, "INVALID_FIELDS")) == {"reason"}
    blank = await till.post(f"/v1/cards/{card_id}/freeze", "f-0", {"reason": " "}, MANAGER)
    assert fields(problem(blank, 400, "INVALID_FIELDS")) == {"reason"}
    assert fields(problem(await till.resolve(), 400, "INVALID_FIELDS")) == {"card_number"}
    both = await till.resolve(card_number=card["card_number"], mobile="13800138000")
    problem(both, 400, "INVALID_FIELDS")
    problem(await http.get("/v1/cards/CNOSUCHCARD", headers=OPERATOR), 404, "CARD_NOT_FOUND")

    # Read and list.
    read = await http.get(f"/v1/cards/{card_id}", headers=OTHER_STORE)
    assert read.json() == card
    held_cards = await http.get(f"/v1/members/{member_id}/cards", headers=OPERATOR)
    assert [c["card_id"] for c in held_cards.json()["cards"]] == [card_id]

    # Resolve by number (as typed at the till) and by mobile.
    number = card["card_number"]
    spaced = " ".join(number[i : i + 4] for i in range(0, 16, 4))
    by_number = await till.resolve(card_number=spaced)
    assert by_number.status_code == 200, by_number.text
    found = by_number.json()
    assert (found["card"]["card_id"], found["resolved_by"], found["can_pay"]) == (
        card_id,
        "card_number",
        True,
    )
    assert (found["refusal_reason"], found["member_discount_bps"], found["stored_value"]) == (
        "",
        500,
        True,
    )
    by_mobile = (await till.resolve(mobile="138 0013 8000")).json()
    assert (by_mobile["card"]["card_id"], by_mobile["resolved_by"]) == (card_id, "mobile")
    problem(await till.resolve(mobile="13700137000"), 404, "MEMBER_NOT_FOUND")

    # Lost, at another store: it stops paying.
    lost = await till.post(
        f"/v1/cards/{card_id}/report-lost", "lost-1", {"reason": "left on the bus"}, OTHER_STORE
    )
    assert lost.status_code == 200, lost.text
    assert (lost.json()["state"], lost.json()["state_reason"]) == ("lost", "left on the bus")
    assert lost.json()["state_changed_by"]["store_id"] == "S002"
    refusal = (await till.resolve(mobile="13800138000")).json()
    assert (refusal["can_pay"], refusal["refusal_reason"]) == (False, "CARD_LOST")
    # An illegal move: lost twice.
    twice = await till.post(f"/v1/cards/{card_id}/report-lost", "lost-2")
    assert problem(twice, 422, "CARD_LOST")["domain"] == "cards.cornucopia"
    found_again = await till.post(f"/v1/cards/{card_id}/cancel-loss", "found-1")
    assert found_again.json()["state"] == "active"
    problem(await till.post(f"/v1/cards/{card_id}/cancel-loss", "found-2"), 422, "CARD_NOT_LOST")

    # Freezing is a manager's decision.
    reason = {"reason": "fraud suspected"}
    denied = await till.post(f"/v1/cards/{card_id}/freeze", "freeze-1", reason, OPERATOR)
    problem(denied, 403, "ROLE_NOT_ALLOWED")
    frozen = await till.post(f"/v1/cards/{card_id}/freeze", "freeze-2", reason, MANAGER)
    assert frozen.status_code == 200, frozen.text
    assert frozen.json()["state"] == "frozen"
    assert (await till.resolve(member_id=member_id)).json()["refusal_reason"] == "CARD_FROZEN"
    # A frozen card can be neither reported lost nor replaced.
    problem(await till.post(f"/v1/cards/{card_id}/replace", "replace-0"), 422, "CARD_FROZEN")
    unfrozen = await till.post(f"/v1/cards/{card_id}/unfreeze", "unfreeze-1", reason, MANAGER)
    assert unfrozen.json()["state"] == "active"

    # Replaced: both cards come back; the old number is dead for good.
    replaced = await till.post(f"/v1/cards/{card_id}/replace", "replace-1", {"reason": "damaged"})
    assert replaced.status_code == 201, replaced.text
    old, new = replaced.json()["replaced_card"], replaced.json()["card"]
    assert replaced.headers["location"] == f"/v1/cards/{new['card_id']}"
    assert (old["state"], old["replaced_by_card_id"]) == ("replaced", new["card_id"])
    assert (new["state"], new["replaces_card_id"], new["account_id"]) == (
        "active",
        card_id,
        card["account_id"],
    )
    assert new["card_number"] != number
    dead = (await till.resolve(card_number=number)).json()
    assert (dead["card"]["card_id"], dead["can_pay"], dead["refusal_reason"]) == (
        card_id,
        False,
        "CARD_REPLACED",
    )
    assert (await till.resolve(mobile="13800138000")).json()["card"]["card_id"] == new["card_id"]

    # Linked with another member's card, and unlinked.
    other = await till.post(
        "/v1/cards", "issue-5", {"program_id": "GOLD", "member_id": other_member_id}
    )
    other_id = other.json()["card_id"]
    problem(
        await till.post(f"/v1/cards/{new['card_id']}/link", "link-0", {}), 400, "INVALID_FIELDS"
    )
    linked = await till.post(
        f"/v1/cards/{new['card_id']}/link", "link-1", {"other_card_id": other_id}
    )
    assert linked.status_code == 200, linked.text
    assert linked.json()["card"]["linked_card_id"] == other_id
    assert linked.json()["other_card"]["linked_card_id"] == new["card_id"]
    unlinked = await till.post(f"/v1/cards/{other_id}/unlink", "unlink-1")
    assert unlinked.json()["linked_card_id"] == ""
    problem(await till.post(f"/v1/cards/{other_id}/unlink", "unlink-2"), 422, "CARD_NOT_LINKED")

    # The history, a page at a time, includes the card it replaced.
    whole = await http.get(
        f"/v1/cards/{new['card_id']}/history", params={"page_size": 100}, headers=OPERATOR
    )
    assert whole.status_code == 200, whole.text
    entries = whole.json()["entries"]
    assert whole.json()["next_page_token"] == ""
    paged: list[dict[str, Any]] = []
    page_token = ""
    pages = 0
    while True:
        page = await http.get(
            f"/v1/cards/{new['card_id']}/history",
            params={"page_size": 2, "page_token": page_token},
            headers=OPERATOR,
        )
        assert page.status_code == 200, page.text
        assert len(page.json()["entries"]) <= 2
        paged.extend(page.json()["entries"])
        pages += 1
        page_token = page.json()["next_page_token"]
        if not page_token:
            break
    assert paged == entries
    assert pages == (len(entries) + 1) // 2
    actions = [e["action"] for e in entries]
    assert actions[:5] == ["issue", "report_lost", "cancel_loss", "freeze", "unfreeze"]
    assert {"replace", "link", "unlink"} <= set(actions)
    assert (entries[1]["from_state"], entries[1]["to_state"]) == ("active", "lost")
    assert entries[1]["stamp"]["principal"] == "op-2"
    bad_token = await http.get(
        f"/v1/cards/{card_id}/history", params={"page_token": "nonsense"}, headers=OPERATOR
    )
    assert fields(problem(bad_token, 400, "INVALID_FIELDS")) == {"page_token"}

    # Cancelled, by a manager, for good.
    cancelled = await till.post(f"/v1/cards/{new['card_id']}/cancel", "cancel-1", reason, MANAGER)
    assert cancelled.json()["state"] == "cancelled"
    problem(
        await till.post(f"/v1/cards/{new['card_id']}/report-lost", "lost-3"), 422, "CARD_CANCELLED"
    )


async def test_the_payment_pin_through_the_gateway(
    till: Till, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    http = till.http
    member_id = await till.enroll("13800138000", "enroll-1")
    issued = await till.post("/v1/cards", "issue-1", {"program_id": "GOLD", "member_id": member_id})
    card_id = issued.json()["card_id"]
    pin_path, verify_path = f"/v1/cards/{card_id}/pin", f"/v1/cards/{card_id}/pin:verify"

    async def set_pin(
        body: dict[str, Any], key: str | None, headers: dict[str, str] = OPERATOR
    ) -> httpx.Response:
        sent = dict(headers)
        if key is not None:
            sent["idempotency-key"] = key
        return await http.put(pin_path, json=body, headers=sent)

    async def verify(pin: Any) -> httpx.Response:
        return await http.post(verify_path, json={"pin": pin}, headers=OTHER_STORE)

    problem(await verify("284751"), 422, "PIN_NOT_SET")
    problem(await set_pin({"new_pin": "284751"}, None), 400, "IDEMPOTENCY_KEY_REQUIRED")
    easy = await set_pin({"new_pin": "123456"}, "pin-0")
    assert fields(problem(easy, 400, "INVALID_FIELDS")) == {"new_pin"}
    assert "123456" not in easy.text
    as_number = await set_pin({"new_pin": 284751}, "pin-0")
    assert fields(problem(as_number, 400, "INVALID_FIELDS")) == {"new_pin"}
    assert "284751" not in as_number.text
    missing = await set_pin({}, "pin-0")
    assert fields(problem(missing, 400, "INVALID_FIELDS")) == {"new_pin"}

    first = await set_pin({"new_pin": "284751"}, "pin-1")
    assert first.status_code == 200, first.text
    assert first.json()["pin_set"] is True
    assert "284751" not in first.text
    assert (await set_pin({"new_pin": "284751"}, "pin-1")).status_code == 200

    right = await verify("284751")
    assert (right.status_code, right.content) == (204, b"")
    no_pin = await http.post(verify_path, json={}, headers=OTHER_STORE)
    assert fields(problem(no_pin, 400, "INVALID_FIELDS")) == {"pin"}

    # Changing it needs the current PIN.
    no_current = await set_pin({"new_pin": "395862"}, "pin-2")
    assert fields(problem(no_current, 400, "INVALID_FIELDS")) == {"current_pin"}
    wrong = await verify("000001")
    body = problem(wrong, 422, "PIN_INCORRECT")
    assert "2 tries left" in body["detail"]
    assert "000001" not in wrong.text
    wrong_current = await set_pin({"new_pin": "395862", "current_pin": "000002"}, "pin-3")
    assert "1 tries left" in problem(wrong_current, 422, "PIN_INCORRECT")["detail"]
    locked = await verify("000003")
    problem(locked, 422, "PIN_LOCKED")
    assert 0 < int(locked.headers["retry-after"]) <= 30 * 60
    # Locked: even the right PIN is refused for now.
    problem(await verify("284751"), 422, "PIN_LOCKED")

    # A manager resets it after checking the holder's identity.
    reset = await set_pin({"new_pin": "395862"}, "pin-4", MANAGER)
    assert reset.status_code == 200, reset.text
    assert (await verify("395862")).status_code == 204

    # Not a PIN in any log line, the gateway's access log included.
    logged = everything_logged(caplog, capsys)
    assert "/v1/cards/{card_id}/pin:verify" in logged
    for pin in ("284751", "395862", "123456", "000001", "000002", "000003"):
        assert pin not in logged


async def test_the_openapi_document_lists_the_card_operations() -> None:
    doc, operations = await openapi_document()
    expected = {
        ("GET", "/v1/card-programs"): "listCardPrograms",
        ("GET", "/v1/card-programs/{program_id}"): "getCardProgram",
        ("POST", "/v1/cards"): "issueCard",
        ("GET", "/v1/cards/{card_id}"): "getCard",
        ("GET", "/v1/members/{member_id}/cards"): "listMemberCards",
        ("GET", "/v1/cards:resolve"): "resolveCard",
        ("POST", "/v1/cards/{card_id}/report-lost"): "reportCardLost",
        ("POST", "/v1/cards/{card_id}/cancel-loss"): "cancelCardLoss",
        ("POST", "/v1/cards/{card_id}/freeze"): "freezeCard",
        ("POST", "/v1/cards/{card_id}/unfreeze"): "unfreezeCard",
        ("POST", "/v1/cards/{card_id}/cancel"): "cancelCard",
        ("POST", "/v1/cards/{card_id}/replace"): "replaceCard",
        ("POST", "/v1/cards/{card_id}/link"): "linkCards",
        ("POST", "/v1/cards/{card_id}/unlink"): "unlinkCard",
        ("GET", "/v1/cards/{card_id}/history"): "listCardHistory",
        ("PUT", "/v1/cards/{card_id}/pin"): "setCardPin",
        ("POST", "/v1/cards/{card_id}/pin:verify"): "verifyCardPin",
    }
    assert {key: operations.get(key) for key in expected} == expected
    freeze = doc["paths"]["/v1/cards/{card_id}/freeze"]["post"]
    assert freeze["tags"] == ["cards"]
    assert any(p["name"] == "Idempotency-Key" for p in freeze["parameters"])
    assert list(freeze["responses"]["422"]["content"]) == [PROBLEM_JSON]
    verify = doc["paths"]["/v1/cards/{card_id}/pin:verify"]["post"]
    assert "204" in verify["responses"]
    pin = doc["components"]["schemas"]["NewPin"]["properties"]["new_pin"]
    assert (pin["format"], pin["writeOnly"]) == ("password", True)
    money = doc["components"]["schemas"]["Money"]
    assert set(money["properties"]) == {"currency_code", "minor_units"}
