"""HQ runs its campaigns through the gateway: the real gateway app in front
of real members and campaigns services (the rig of the store-facing
campaigns routes, tests/integration/gateway_rig.py). Coupon templates
created, listed and issued (to a list and to a segment) with their
statistics and download; promotions created, read and ended; follow-up
plans created, changed and listed; member events created and read, members
invited by list and by segment; segments created, changed (versions),
previewed. Refusals as problems naming the body's fields, and the OpenAPI
document."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from chassis.auth import Role
from chassis.db import utcnow
from cornucopia.common.v1 import date_pb2
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc
from tests.integration import conftest as integration
from tests.integration.conftest import Suite, auth, token
from tests.integration.gateway_rig import (
    MANAGER,
    OPERATOR,
    bearer,
    fields,
    gateway_in_front_of_campaigns,
    openapi_document,
    problem,
)
from tests.integration.infra import DatabaseFactory

pytestmark = pytest.mark.integration

# The integration tests' fixtures the gateway rig runs on.
nats = integration.nats
spans = integration.spans
suite = integration.suite

HQ = {"authorization": f"Bearer {token()}"}
OTHER_MANAGER = bearer((Role.STORE_MANAGER,), "S002", "mgr-2")


def rid() -> str:
    return str(uuid.uuid4())


def cny(minor_units: int) -> dict[str, Any]:
    return {"currency_code": "CNY", "minor_units": minor_units}


@dataclass
class Desk:
    """HQ's HTTP client of the gateway, and the suite for what no route does
    (enrolling members)."""

    http: httpx.AsyncClient
    suite: Suite

    async def get(self, path: str, headers: dict[str, str] = HQ, **params: Any) -> httpx.Response:
        return await self.http.get(path, params=params, headers=headers)

    async def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] = HQ,
    ) -> httpx.Response:
        sent = dict(headers)
        if key is not None:
            sent["idempotency-key"] = key
        return await self.http.request(method, path, json=body, headers=sent)

    async def post(
        self, path: str, body: Any = None, *, key: str | None = "", headers: dict[str, str] = HQ
    ) -> httpx.Response:
        """A POST with an Idempotency-Key of its own ('') or this one (None: none)."""
        return await self.send("POST", path, body, key=rid() if key == "" else key, headers=headers)

    async def enroll(self, n: int, store_id: str = "S001", month: int = 6) -> str:
        members = members_pb2_grpc.MembersServiceStub(self.suite.channels["members"])
        created = await members.CreateMember(
            M.CreateMemberRequest(
                request_id=rid(),
                member=M.Member(
                    home_store_id=store_id,
                    given_name="娜",
                    mobile=f"+8613700{n:06d}",
                    preferred_language="zh-CN",
                    birthday=date_pb2.Date(year=1991, month=month, day=3),
                ),
            ),
            metadata=auth(),
        )
        return str(created.member_id)


@pytest.fixture
async def desk(suite: Suite, database_url: DatabaseFactory) -> AsyncIterator[Desk]:
    async with gateway_in_front_of_campaigns(suite, database_url) as (http, _org):
        yield Desk(http, suite)


def ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_coupon_templates_issued_to_a_list_and_a_segment(desk: Desk) -> None:
    wanted = {
        "display_name": "20 off 200",
        "kind": "amount_off",
        "currency_code": "CNY",
        "amount_off": cny(2_000),
        "min_spend": cny(20_000),
        "valid_days": 30,
        "per_member_limit": 1,
        "restore_policy": "on_whole_refund",
    }
    key = rid()
    created = ok(await desk.post("/v1/coupon-templates", wanted, key=key))
    template_id = created["template_id"]
    assert (created["kind"], created["amount_off"], created["restore_policy"]) == (
        "amount_off",
        cny(2_000),
        "on_whole_refund",
    )
    assert created["issued_count"] == 0 and created["created"]["principal"] == "test-admin"
    again = ok(await desk.post("/v1/coupon-templates", wanted, key=key))
    assert again == created
    reused = await desk.post("/v1/coupon-templates", {**wanted, "valid_days": 7}, key=key)
    problem(reused, 422, "IDEMPOTENCY_KEY_REUSED")
    # The service's rules, reported on the body's own fields.
    faulty = await desk.post(
        "/v1/coupon-templates", {**wanted, "kind": "percent_off", "amount_off": None}
    )
    assert "percent_bps" in fields(problem(faulty, 400, "INVALID_FIELDS"))
    shapeless = await desk.post("/v1/coupon-templates", {**wanted, "kind": "free_lunch"})
    assert fields(problem(shapeless, 400, "INVALID_FIELDS")) == {"kind"}
    # HQ's: a store's staff may read, not create.
    problem(
        await desk.post("/v1/coupon-templates", wanted, headers=OPERATOR), 403, "ROLE_NOT_ALLOWED"
    )

    listed = ok(await desk.get("/v1/coupon-templates", OPERATOR))
    assert [t["template_id"] for t in listed["templates"]] == [template_id]
    assert ok(await desk.get(f"/v1/coupon-templates/{template_id}")) == created
    problem(await desk.get("/v1/coupon-templates/TNOSUCH"), 404, "COUPON_TEMPLATE_NOT_FOUND")

    # Issued to a list, within the call: the job and its coupons.
    alice, bob = await desk.enroll(1), await desk.enroll(2)
    issue_key = rid()
    path = f"/v1/coupon-templates/{template_id}/issues"
    job = ok(await desk.post(path, {"member_ids": [alice, bob, alice]}, key=issue_key))
    assert (job["state"], job["total"], job["issued"], job["skipped"]) == ("done", 2, 2, 0)
    assert sorted(c["member_id"] for c in job["coupons"]) == sorted([alice, bob])
    assert {c["state"] for c in job["coupons"]} == {"issued"}
    replayed = ok(await desk.post(path, {"member_ids": [alice, bob, alice]}, key=issue_key))
    assert replayed["job_id"] == job["job_id"]
    assert ok(await desk.get(f"/v1/coupon-issue-jobs/{job['job_id']}"))["issued"] == 2
    problem(await desk.get("/v1/coupon-issue-jobs/JNOSUCH"), 404, "ISSUE_JOB_NOT_FOUND")
    both = await desk.post(path, {"member_ids": [alice], "segment_id": "JUNE"})
    assert fields(problem(both, 400, "INVALID_FIELDS")) == {"segment_id"}

    # Issued to a segment: the per-member limit skips those who have one.
    carol = await desk.enroll(3)
    ok(
        await desk.post(
            "/v1/segments",
            {"segment_id": "JUNE", "name": "June", "criteria": {"birth_months": [6]}},
        )
    )
    to_segment = ok(await desk.post(path, {"segment_id": "JUNE"}))
    assert (to_segment["segment_id"], to_segment["segment_version"]) == ("JUNE", 1)
    assert (to_segment["total"], to_segment["issued"], to_segment["skipped"]) == (3, 1, 2)
    assert [c["member_id"] for c in to_segment["coupons"]] == [carol]
    assert {s["reason"] for s in to_segment["skipped_members"]} == {"PER_MEMBER_LIMIT_REACHED"}

    # The statistics of the day, as JSON and as a workbook.
    period = {
        "start_time": (utcnow() - dt.timedelta(hours=1)).isoformat(),
        "end_time": (utcnow() + dt.timedelta(hours=1)).isoformat(),
    }
    stats = ok(await desk.get("/v1/coupon-statistics", template_id=template_id, **period))
    [row] = stats["rows"]
    assert (row["template_id"], row["store_id"], row["issued"], row["redeemed"]) == (
        template_id,
        "",
        3,
        0,
    )
    no_period = await desk.get("/v1/coupon-statistics")
    assert fields(problem(no_period, 400, "INVALID_FIELDS")) == {"start_time", "end_time"}
    workbook = await desk.get("/v1/coupon-statistics.xlsx", **period)
    assert workbook.status_code == 200, workbook.text
    assert workbook.headers["content-type"].startswith("application/vnd.openxmlformats")
    assert "coupon-statistics-" in workbook.headers["content-disposition"]
    assert workbook.content[:2] == b"PK"
    backwards = await desk.get(
        "/v1/coupon-statistics.xlsx", start_time=period["end_time"], end_time=period["start_time"]
    )
    assert fields(problem(backwards, 400, "INVALID_FIELDS")) == {"end_time"}


async def test_promotions_created_read_and_ended(desk: Desk) -> None:
    wanted = {
        "display_name": "Skincare week",
        "kind": "percent_off",
        "start_time": (utcnow() - dt.timedelta(hours=1)).isoformat(),
        "categories": ["skincare"],
        "percent_bps": 1500,
        "stacking": "combinable",
        "exclusion_group": "week",
    }
    created = ok(await desk.post("/v1/promotions", wanted))
    promotion_id = created["promotion_id"]
    assert (created["kind"], created["stacking"], created["percent_bps"]) == (
        "percent_off",
        "combinable",
        1500,
    )
    assert created["end_time"] is None and created["categories"] == ["skincare"]
    later = {**wanted, "display_name": "Later", "start_time": "2099-01-01T00:00:00+08:00"}
    later_id = ok(await desk.post("/v1/promotions", later))["promotion_id"]
    problem(await desk.post("/v1/promotions", wanted, headers=MANAGER), 403, "ROLE_NOT_ALLOWED")
    unknown = await desk.post("/v1/promotions", {**wanted, "stacking": "sometimes"})
    assert fields(problem(unknown, 400, "INVALID_FIELDS")) == {"stacking"}
    naive = await desk.post("/v1/promotions", {**wanted, "start_time": "2026-12-01T00:00:00"})
    assert fields(problem(naive, 400, "INVALID_FIELDS")) == {"start_time"}

    every = ok(await desk.get("/v1/promotions", OPERATOR))
    assert {p["promotion_id"] for p in every["promotions"]} == {promotion_id, later_id}
    in_force = ok(await desk.get("/v1/promotions", OPERATOR, in_force_only="true"))
    assert [p["promotion_id"] for p in in_force["promotions"]] == [promotion_id]
    assert ok(await desk.get(f"/v1/promotions/{promotion_id}")) == created

    ended = ok(await desk.post(f"/v1/promotions/{promotion_id}/end"))
    assert dt.datetime.fromisoformat(ended["end_time"]) <= utcnow()
    in_force = ok(await desk.get("/v1/promotions", in_force_only="true"))
    assert in_force["promotions"] == []
    no_key = await desk.post(f"/v1/promotions/{promotion_id}/end", key=None)
    assert fields(problem(no_key, 400, "IDEMPOTENCY_KEY_REQUIRED")) == {"Idempotency-Key"}
    problem(await desk.post("/v1/promotions/PNOSUCH/end"), 404, "PROMOTION_NOT_FOUND")


async def test_follow_up_plans_created_changed_and_listed(desk: Desk) -> None:
    wanted = {
        "plan_id": "serum-care",
        "kind": "post_purchase",
        "display_name": "Serum aftercare",
        "days": 7,
        "category": "skincare",
        "call_windows": [{"start_time": "10:00", "end_time": "11:30"}],
    }
    created = ok(await desk.post("/v1/follow-up-plans", wanted))
    assert (created["plan_id"], created["kind"], created["enabled"], created["days"]) == (
        "serum-care",
        "post_purchase",
        True,
        7,
    )
    assert created["call_windows"] == [{"start_time": "10:00", "end_time": "11:30"}]
    problem(await desk.post("/v1/follow-up-plans", wanted), 409, "PLAN_EXISTS")
    no_category = await desk.post(
        "/v1/follow-up-plans", {**wanted, "plan_id": "other", "category": None}
    )
    assert fields(problem(no_category, 400, "INVALID_FIELDS")) == {"category"}
    problem(
        await desk.post("/v1/follow-up-plans", wanted, headers=MANAGER), 403, "ROLE_NOT_ALLOWED"
    )

    path = "/v1/follow-up-plans/serum-care"
    key = rid()
    changed = ok(await desk.send("PATCH", path, {"enabled": False, "days": 10}, key=key))
    assert (changed["enabled"], changed["days"], changed["category"]) == (False, 10, "skincare")
    assert changed["call_windows"] == created["call_windows"]  # not sent, kept
    again = ok(await desk.send("PATCH", path, {"enabled": False, "days": 10}, key=key))
    assert again == changed
    nothing = await desk.send("PATCH", path, {}, key=rid())
    assert fields(problem(nothing, 400, "INVALID_FIELDS")) == {"body"}
    no_key = await desk.send("PATCH", path, {"enabled": True})
    problem(no_key, 400, "IDEMPOTENCY_KEY_REQUIRED")
    kind = await desk.send("PATCH", path, {"kind": "birthday"}, key=rid())
    assert fields(problem(kind, 400, "INVALID_FIELDS")) == {"kind"}

    listed = ok(await desk.get("/v1/follow-up-plans", OPERATOR))
    plans = {p["plan_id"]: p for p in listed["plans"]}
    assert plans["serum-care"]["enabled"] is False
    assert [p["plan_id"] for p in listed["plans"]] == sorted(plans)


async def test_member_events_created_and_members_invited(desk: Desk) -> None:
    start = utcnow() + dt.timedelta(days=3)
    wanted = {
        "display_name": "VIP 之夜",
        "kind": "vip_evening",
        "store_id": "S001",
        "start_time": start.isoformat(),
        "end_time": (start + dt.timedelta(hours=3)).isoformat(),
        "capacity": 2,
    }
    # A store manager creates for their own store only.
    problem(
        await desk.post("/v1/member-events", wanted, headers=OTHER_MANAGER), 403, "OUT_OF_SCOPE"
    )
    past = await desk.post(
        "/v1/member-events", {**wanted, "start_time": "2020-01-01T19:00:00+08:00"}
    )
    assert "start_time" in fields(problem(past, 400, "INVALID_FIELDS"))
    event = ok(await desk.post("/v1/member-events", wanted, headers=MANAGER))
    event_id = event["event_id"]
    assert (event["kind"], event["capacity"], event["confirmed"], event["created_by"]) == (
        "vip_evening",
        2,
        0,
        "mgr-1",
    )
    assert event["rsvp_deadline"] == event["start_time"]
    assert ok(await desk.get(f"/v1/member-events/{event_id}", OPERATOR)) == event
    problem(await desk.get(f"/v1/member-events/{event_id}", OTHER_MANAGER), 404, "EVENT_NOT_FOUND")

    # Invited by list (the store's manager), then by segment (HQ only).
    june = sorted([await desk.enroll(10 + i) for i in range(3)])
    await desk.enroll(20, month=7)
    path = f"/v1/member-events/{event_id}/invitations"
    key = rid()
    by_list = ok(await desk.post(path, {"member_ids": june[:1]}, key=key, headers=MANAGER))
    assert by_list == {"invited": 1, "already_invited": 0, "job": None}
    assert ok(await desk.post(path, {"member_ids": june[:1]}, key=key, headers=MANAGER)) == by_list
    ok(
        await desk.post(
            "/v1/segments",
            {"segment_id": "JUNE-S001", "name": "June", "criteria": {"birth_months": [6]}},
        )
    )
    refused = await desk.post(path, {"segment_id": "JUNE-S001"}, headers=MANAGER)
    problem(refused, 403, "ROLE_NOT_ALLOWED")
    by_segment = ok(await desk.post(path, {"segment_id": "JUNE-S001"}))
    job = by_segment["job"]
    assert (by_segment["invited"], by_segment["already_invited"]) == (2, 1)
    assert (job["state"], job["total"], job["segment_version"], job["stop_reason"]) == (
        "done",
        3,
        1,
        "",
    )
    assert ok(await desk.get(f"/v1/member-event-invite-jobs/{job['job_id']}")) == job
    problem(await desk.get("/v1/member-event-invite-jobs/IJNOSUCH"), 404, "INVITE_JOB_NOT_FOUND")
    unknown = await desk.post(path, {"segment_id": "NOSUCH"})
    problem(unknown, 404, "SEGMENT_NOT_FOUND")
    invalid = await desk.post(path, {"member_ids": ["not an id"]})
    assert fields(problem(invalid, 400, "INVALID_FIELDS")) == {"member_ids[0]"}

    report = ok(await desk.get(f"/v1/member-events/{event_id}/attendance", MANAGER))
    assert (report["invited"], report["yes"], report["capacity"]) == (3, 0, 2)


async def test_segments_created_changed_and_previewed(desk: Desk) -> None:
    june = sorted([await desk.enroll(30 + i) for i in range(2)])
    elsewhere = await desk.enroll(40, store_id="S002")
    wanted = {
        "segment_id": "JUNE-EAST",
        "name": "June in the east",
        "criteria": {"region_ids": ["EAST"], "birth_months": [6], "states": ["active"]},
    }
    created = ok(await desk.post("/v1/segments", wanted))
    assert (created["version"], created["criteria"]["states"]) == (1, ["active"])
    assert created["created"]["principal"] == "test-admin"
    problem(await desk.post("/v1/segments", wanted), 409, "SEGMENT_EXISTS")
    bad = await desk.post(
        "/v1/segments",
        {"segment_id": "BAD", "name": "bad", "criteria": {"birth_months": [13]}},
    )
    assert fields(problem(bad, 400, "INVALID_FIELDS")) == {"criteria.birth_months"}
    lower = await desk.post("/v1/segments", {**wanted, "segment_id": "lower case"})
    assert fields(problem(lower, 400, "INVALID_FIELDS")) == {"segment_id"}
    gender = await desk.post(
        "/v1/segments", {**wanted, "segment_id": "G", "criteria": {"genders": ["robot"]}}
    )
    assert fields(problem(gender, 400, "INVALID_FIELDS")) == {"criteria.genders[0]"}
    problem(await desk.get("/v1/segments", MANAGER), 403, "ROLE_NOT_ALLOWED")

    preview = ok(await desk.get("/v1/segments/JUNE-EAST/preview"))
    assert (preview["size"], preview["sample_member_ids"], preview["version"]) == (2, june, 1)
    rules = ok(
        await desk.post("/v1/segment-previews", {"criteria": {"region_ids": ["WEST"]}}, key=None)
    )
    assert (rules["size"], rules["sample_member_ids"], rules["version"]) == (1, [elsewhere], 0)

    path = "/v1/segments/JUNE-EAST"
    update = {"name": "June anywhere", "criteria": {"birth_months": [6]}, "version": 1}
    changed = ok(await desk.send("PUT", path, update))
    assert (changed["version"], changed["name"]) == (2, "June anywhere")
    assert changed["criteria"]["region_ids"] == []
    stale = await desk.send("PUT", path, update)
    problem(stale, 409, "VERSION_MISMATCH")
    problem(await desk.send("PUT", "/v1/segments/NOSUCH", update), 404, "SEGMENT_NOT_FOUND")
    assert ok(await desk.get(path)) == changed
    assert ok(await desk.get("/v1/segments/JUNE-EAST/preview"))["size"] == 3
    listed = ok(await desk.get("/v1/segments", page_size=1))
    assert [s["segment_id"] for s in listed["segments"]] == ["JUNE-EAST"]
    assert listed["next_page_token"] == ""


async def test_the_openapi_document_lists_the_hq_operations() -> None:
    doc, operations = await openapi_document()
    assert {
        ("POST", "/v1/coupon-templates"): "createCouponTemplate",
        ("GET", "/v1/coupon-templates"): "listCouponTemplates",
        ("GET", "/v1/coupon-templates/{template_id}"): "getCouponTemplate",
        ("POST", "/v1/coupon-templates/{template_id}/issues"): "issueCoupons",
        ("GET", "/v1/coupon-issue-jobs/{job_id}"): "getIssueJob",
        ("GET", "/v1/coupon-statistics"): "getCouponStatistics",
        ("GET", "/v1/coupon-statistics.xlsx"): "exportCouponStatistics",
        ("POST", "/v1/promotions"): "createPromotion",
        ("GET", "/v1/promotions"): "listPromotions",
        ("GET", "/v1/promotions/{promotion_id}"): "getPromotion",
        ("POST", "/v1/promotions/{promotion_id}/end"): "endPromotion",
        ("POST", "/v1/follow-up-plans"): "createFollowUpPlan",
        ("PATCH", "/v1/follow-up-plans/{plan_id}"): "updateFollowUpPlan",
        ("GET", "/v1/follow-up-plans"): "listFollowUpPlans",
        ("POST", "/v1/member-events"): "createMemberEvent",
        ("GET", "/v1/member-events/{event_id}"): "getMemberEvent",
        ("POST", "/v1/member-events/{event_id}/invitations"): "inviteMembers",
        ("GET", "/v1/member-event-invite-jobs/{job_id}"): "getInviteJob",
        ("POST", "/v1/segments"): "createSegment",
        ("PUT", "/v1/segments/{segment_id}"): "updateSegment",
        ("GET", "/v1/segments"): "listSegments",
        ("GET", "/v1/segments/{segment_id}"): "getSegment",
        ("GET", "/v1/segments/{segment_id}/preview"): "previewSegment",
        ("POST", "/v1/segment-previews"): "previewCriteria",
    }.items() <= operations.items()
    schemas = doc["components"]["schemas"]
    assert "amount_off" in schemas["NewCouponTemplate"]["properties"]["kind"]["enum"]
    assert "exclusive" in schemas["NewPromotion"]["properties"]["stacking"]["anyOf"][0]["enum"]
    assert "post_purchase" in schemas["NewFollowUpPlan"]["properties"]["kind"]["enum"]
    for method, path in [
        ("post", "/v1/coupon-templates"),
        ("post", "/v1/coupon-templates/{template_id}/issues"),
        ("post", "/v1/promotions/{promotion_id}/end"),
        ("patch", "/v1/follow-up-plans/{plan_id}"),
        ("post", "/v1/member-events/{event_id}/invitations"),
        ("post", "/v1/segments"),
    ]:
        operation = doc["paths"][path][method]
        headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert "Idempotency-Key" in headers, (method, path)
    preview = doc["paths"]["/v1/segment-previews"]["post"]
    assert "Idempotency-Key" not in {p["name"] for p in preview.get("parameters", [])}
