"""Store staff and terminals use the campaigns service through the gateway:
the real gateway app in front of real members and campaigns services. A
member's wallet after a coupon is issued and a presented code checked; the
follow-up calls a sale creates, listed, completed and moved over HTTP, and
their statistics; an invited member's answer and check-in at the door, and
the attendance; refusals as problems, bad bodies, and the OpenAPI
document."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.auth import Role
from chassis.db import utcnow
from cornucopia.campaigns.v1 import member_events_pb2 as E
from cornucopia.campaigns.v1 import member_events_pb2_grpc, pricing_pb2_grpc
from cornucopia.campaigns.v1 import pricing_pb2 as C
from cornucopia.common.v1 import money_pb2
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc
from tests.integration.conftest import Organisation, Suite, auth, eventually
from tests.integration.gateway_rig import (
    OPERATOR,
    OTHER_STORE,
    GatewayTill,
    bearer,
    fields,
    gateway_in_front_of_campaigns,
    openapi_document,
    problem,
)
from tests.integration.infra import DatabaseFactory
from tests.integration.test_campaigns_followups import publish, sale

HQ = auth()
SHANGHAI = ZoneInfo("Asia/Shanghai")


def rid() -> str:
    return str(uuid.uuid4())


def ts(at: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


@dataclass
class Counter(GatewayTill):
    """A store's HTTP client of the gateway, with the gRPC stubs that set up
    what no route does."""

    suite: Suite
    org: Organisation

    async def get(
        self, path: str, headers: dict[str, str] = OPERATOR, **params: Any
    ) -> httpx.Response:
        return await self.http.get(path, params=params, headers=headers)

    @property
    def coupons(self) -> pricing_pb2_grpc.CouponsServiceStub:
        return pricing_pb2_grpc.CouponsServiceStub(self.suite.channels["campaigns"])

    @property
    def events(self) -> member_events_pb2_grpc.MemberEventsServiceStub:
        return member_events_pb2_grpc.MemberEventsServiceStub(self.suite.channels["campaigns"])

    async def enroll(self, mobile: str, *, consultant: str = "") -> str:
        """A member of S001 who accepts phone calls (made over gRPC)."""
        members = members_pb2_grpc.MembersServiceStub(self.suite.channels["members"])
        created = await members.CreateMember(
            M.CreateMemberRequest(
                request_id=rid(),
                member=M.Member(
                    home_store_id="S001",
                    given_name="娜",
                    mobile=mobile,
                    preferred_language="zh-CN",
                    consultant_id=consultant,
                    consents=[M.Consent(channel=M.CONTACT_CHANNEL_PHONE, granted=True)],
                ),
            ),
            metadata=HQ,
        )
        return created.member_id


@pytest.fixture
async def counter(suite: Suite, database_url: DatabaseFactory) -> AsyncIterator[Counter]:
    async with gateway_in_front_of_campaigns(suite, database_url) as (http, org):
        yield Counter(http, suite, org)


async def test_a_members_wallet_and_a_presented_code(counter: Counter) -> None:
    member_id = await counter.enroll("+8613800138201")
    template = await counter.coupons.CreateCouponTemplate(
        C.CreateCouponTemplateRequest(
            request_id=rid(),
            template=C.CouponTemplate(
                display_name="10 off",
                kind=C.COUPON_KIND_AMOUNT_OFF,
                currency_code="CNY",
                amount_off=money_pb2.Money(currency_code="CNY", minor_units=1_000),
                valid_days=30,
            ),
        ),
        metadata=HQ,
    )
    job = await counter.coupons.IssueCoupons(
        C.IssueCouponsRequest(
            request_id=rid(), template_id=template.template_id, member_ids=[member_id]
        ),
        metadata=HQ,
    )
    [issued] = job.coupons

    wallet = await counter.get(f"/v1/members/{member_id}/coupons")
    assert wallet.status_code == 200, wallet.text
    [coupon] = wallet.json()["coupons"]
    assert (coupon["coupon_id"], coupon["code"], coupon["state"], coupon["kind"]) == (
        issued.coupon_id,
        issued.code,
        "issued",
        "amount_off",
    )
    assert coupon["display_name"] == "10 off" and coupon["expire_time"]
    assert wallet.json()["next_page_token"] == ""
    only_open = await counter.get(
        f"/v1/members/{member_id}/coupons", state=["issued", "reserved"], page_size=5
    )
    assert [c["coupon_id"] for c in only_open.json()["coupons"]] == [issued.coupon_id]
    redeemed = await counter.get(f"/v1/members/{member_id}/coupons", state="redeemed")
    assert redeemed.json()["coupons"] == []
    bad_state = await counter.get(f"/v1/members/{member_id}/coupons", state="used")
    assert fields(problem(bad_state, 400, "INVALID_FIELDS")) == {"state"}

    # Staff at a till check the code the member shows, as typed.
    typed = "-".join(issued.code[i : i + 4] for i in range(0, 16, 4)).lower()
    presented = await counter.get(f"/v1/coupons/{typed}")
    assert presented.status_code == 200, presented.text
    assert (presented.json()["coupon_id"], presented.json()["member_id"]) == (
        issued.coupon_id,
        member_id,
    )
    problem(await counter.get("/v1/coupons/NOSUCHCODE000000"), 404, "COUPON_NOT_FOUND")


async def test_follow_up_calls_listed_completed_and_moved(counter: Counter) -> None:
    advisor = counter.org.consultants[0]
    mine = bearer((Role.STORE_OPERATOR,), "S001", advisor)
    alice = await counter.enroll("+8613800138202", consultant=advisor)
    today = utcnow().astimezone(SHANGHAI).date()
    await publish(counter.suite, "loyalty.v1.sale.recorded", sale(alice, today), "evt-gw-1")

    # The sale made the 3+3+3 calls: on the advisor's list, not on another store's.
    listed = await eventually(
        lambda: counter.get("/v1/follow-up-tasks", mine, member_id=alice),
        lambda r: r.status_code == 200 and len(r.json()["tasks"]) == 3,
    )
    tasks = listed.json()["tasks"]
    assert [t["occasion"] for t in tasks] == ["3d", "3w", "3m"]  # earliest due first
    assert {(t["state"], t["plan_kind"], t["assignee_staff_id"]) for t in tasks} == {
        ("scheduled", "three_three_three", advisor)
    }
    three_days, three_weeks = tasks[0], tasks[1]
    soon = dt.datetime.fromisoformat(three_weeks["due_time"])
    before_three_weeks = await counter.get("/v1/follow-up-tasks", mine, due_before=soon.isoformat())
    assert [t["task_id"] for t in before_three_weeks.json()["tasks"]] == [three_days["task_id"]]
    first_page = await counter.get("/v1/follow-up-tasks", mine, page_size=2)
    assert len(first_page.json()["tasks"]) == 2 and first_page.json()["next_page_token"]
    theirs = await counter.get("/v1/follow-up-tasks", OTHER_STORE)
    assert theirs.json()["tasks"] == []

    # Another store's staff: the task reads as missing.
    path = f"/v1/follow-up-tasks/{three_days['task_id']}"
    outcome = {"outcome": "reached", "note": "likes the serum", "duration_seconds": 120}
    elsewhere = await counter.post(f"{path}/complete", rid(), outcome, OTHER_STORE)
    problem(elsewhere, 404, "TASK_NOT_FOUND")

    # Completed, once: the same key again gets the same task; another key is refused.
    key = rid()
    done = await counter.post(f"{path}/complete", key, outcome, mine)
    assert done.status_code == 200, done.text
    assert (done.json()["state"], done.json()["outcome"], done.json()["completed_by"]) == (
        "completed",
        "reached",
        advisor,
    )
    assert done.json()["follow_up_id"]
    assert "likes the serum" not in done.text
    again = await counter.post(f"{path}/complete", key, outcome, mine)
    assert again.json() == done.json()
    closed = await counter.post(f"{path}/complete", rid(), {"outcome": "no_answer"}, mine)
    problem(closed, 422, "TASK_CLOSED")
    moved_closed = await counter.post(
        f"{path}/reschedule", rid(), {"due_time": soon.isoformat()}, mine
    )
    problem(moved_closed, 422, "TASK_CLOSED")

    # Moved: snapped to the next call window (16:00 local).
    wanted = soon.astimezone(SHANGHAI).replace(hour=13, minute=5) + dt.timedelta(days=1)
    later = f"/v1/follow-up-tasks/{three_weeks['task_id']}/reschedule"
    moved = await counter.post(later, rid(), {"due_time": wanted.isoformat()}, mine)
    assert moved.status_code == 200, moved.text
    assert dt.datetime.fromisoformat(moved.json()["due_time"]) == wanted.replace(hour=16, minute=0)
    assert moved.json()["reschedule_count"] == 1
    past = await counter.post(later, rid(), {"due_time": "2020-01-01T11:00:00+08:00"}, mine)
    assert fields(problem(past, 400, "INVALID_FIELDS")) == {"due_time"}

    # The statistics of the period.
    stats = await counter.get(
        "/v1/follow-up-statistics",
        mine,
        store_id="S001",
        start_time=(utcnow() - dt.timedelta(days=1)).isoformat(),
        end_time=(utcnow() + dt.timedelta(days=400)).isoformat(),
    )
    assert stats.status_code == 200, stats.text
    counted = stats.json()
    assert (counted["created"], counted["completed"], counted["open"]) == (3, 1, 2)
    assert counted["by_outcome"] == [{"outcome": "reached", "count": 1}]
    assert counted["completion_rate_bps"] == 3333
    no_period = await counter.get("/v1/follow-up-statistics", mine)
    assert fields(problem(no_period, 400, "INVALID_FIELDS")) == {"start_time", "end_time"}


async def test_an_answer_a_check_in_and_the_attendance(counter: Counter) -> None:
    start = utcnow() + dt.timedelta(hours=1)
    event = await counter.events.CreateMemberEvent(
        E.CreateMemberEventRequest(
            request_id=rid(),
            event=E.MemberEvent(
                display_name="VIP 之夜",
                kind=E.MEMBER_EVENT_KIND_VIP_EVENING,
                store_id="S001",
                start_time=ts(start),
                end_time=ts(start + dt.timedelta(hours=3)),
                capacity=1,
            ),
        ),
        metadata=HQ,
    )
    await counter.events.InviteMembers(
        E.InviteMembersRequest(
            request_id=rid(), event_id=event.event_id, member_ids=["M001", "M002", "M003"]
        ),
        metadata=HQ,
    )

    listed = await counter.get("/v1/member-events", end_after=utcnow().isoformat())
    assert [(e["event_id"], e["kind"], e["capacity"]) for e in listed.json()["events"]] == [
        (event.event_id, "vip_evening", 1)
    ]
    assert (await counter.get("/v1/member-events", OTHER_STORE)).json()["events"] == []

    path = f"/v1/member-events/{event.event_id}"
    key = rid()
    yes = await counter.post(f"{path}/rsvps", key, {"member_id": "M001", "answer": "yes"})
    assert yes.status_code == 200, yes.text
    assert (yes.json()["answer"], yes.json()["invited"]) == ("yes", True)
    again = await counter.post(f"{path}/rsvps", key, {"member_id": "M001", "answer": "yes"})
    assert again.json() == yes.json()
    full = await counter.post(f"{path}/rsvps", rid(), {"member_id": "M002", "answer": "yes"})
    problem(full, 422, "EVENT_FULL")
    stranger = await counter.post(f"{path}/rsvps", rid(), {"member_id": "M999", "answer": "yes"})
    problem(stranger, 422, "NOT_INVITED")
    declined = await counter.post(f"{path}/rsvps", rid(), {"member_id": "M003", "answer": "no"})
    assert declined.json()["answer"] == "no"

    # The door: the event's store's staff; another store's sees no such event.
    elsewhere = await counter.post(f"{path}/check-ins", rid(), {"member_id": "M001"}, OTHER_STORE)
    problem(elsewhere, 404, "EVENT_NOT_FOUND")
    checked = await counter.post(f"{path}/check-ins", rid(), {"member_id": "M001"})
    assert checked.status_code == 200, checked.text
    assert (checked.json()["walk_in"], checked.json()["checked_in_by"]) == (False, "op-1")
    walk_in = await counter.post(f"{path}/check-ins", rid(), {"member_id": "M002"})
    assert walk_in.json()["walk_in"] is True

    report = await counter.get(f"{path}/attendance")
    assert report.status_code == 200, report.text
    assert {k: report.json()[k] for k in ("capacity", "invited", "yes", "no", "checked_in")} == {
        "capacity": 1,
        "invited": 3,
        "yes": 1,
        "no": 1,
        "checked_in": 2,
    }
    assert report.json()["walk_ins"] == 1
    problem(await counter.get("/v1/member-events/EVNOSUCH/attendance"), 404, "EVENT_NOT_FOUND")


async def test_bad_bodies_are_problems_naming_the_fields(counter: Counter) -> None:
    async def invalid(path: str, body: Any, key: str | None = "bad") -> set[str]:
        return fields(problem(await counter.post(path, key, body), 400, "INVALID_FIELDS"))

    task = "/v1/follow-up-tasks/T1"
    assert await invalid(f"{task}/complete", {}) == {"outcome"}
    assert await invalid(f"{task}/complete", {"outcome": "shouted"}) == {"outcome"}
    assert await invalid(f"{task}/complete", {"outcome": "reached", "mood": "good"}) == {"mood"}
    assert await invalid(f"{task}/complete", {"outcome": "reached", "duration_seconds": -1}) == {
        "duration_seconds"
    }
    assert await invalid(f"{task}/reschedule", {"due_time": "2026-12-04T13:05:00"}) == {"due_time"}
    assert await invalid(f"{task}/reschedule", {"due_time": "tomorrow"}) == {"due_time"}
    event = "/v1/member-events/EV1"
    assert await invalid(f"{event}/rsvps", {"member_id": "M001", "answer": "maybe"}) == {"answer"}
    assert await invalid(f"{event}/rsvps", {"answer": "yes"}) == {"member_id"}
    assert await invalid(f"{event}/check-ins", {"member_id": ""}) == {"member_id"}
    no_key = await counter.post(f"{event}/check-ins", None, {"member_id": "M001"})
    assert fields(problem(no_key, 400, "IDEMPOTENCY_KEY_REQUIRED")) == {"Idempotency-Key"}
    naive = await counter.get("/v1/follow-up-tasks", due_before="2026-12-01T00:00:00")
    assert fields(problem(naive, 400, "INVALID_FIELDS")) == {"due_before"}
    assert (await counter.http.get("/v1/follow-up-tasks")).status_code == 401


async def test_the_openapi_document_lists_the_campaigns_operations() -> None:
    doc, operations = await openapi_document()
    assert {
        ("GET", "/v1/members/{member_id}/coupons"): "listMemberCoupons",
        ("GET", "/v1/coupons/{code}"): "getCoupon",
        ("GET", "/v1/follow-up-tasks"): "listFollowUpTasks",
        ("POST", "/v1/follow-up-tasks/{task_id}/complete"): "completeFollowUpTask",
        ("POST", "/v1/follow-up-tasks/{task_id}/reschedule"): "rescheduleFollowUpTask",
        ("GET", "/v1/follow-up-statistics"): "getFollowUpStatistics",
        ("GET", "/v1/member-events"): "listMemberEvents",
        ("POST", "/v1/member-events/{event_id}/rsvps"): "rsvpMemberEvent",
        ("POST", "/v1/member-events/{event_id}/check-ins"): "checkInMemberEvent",
        ("GET", "/v1/member-events/{event_id}/attendance"): "getAttendanceReport",
    }.items() <= operations.items()
    schemas = doc["components"]["schemas"]
    assert schemas["NewRsvp"]["properties"]["answer"]["enum"] == ["yes", "no"]
    assert "reached" in schemas["TaskCompletion"]["properties"]["outcome"]["enum"]
    for method, path in [
        ("post", "/v1/follow-up-tasks/{task_id}/complete"),
        ("post", "/v1/member-events/{event_id}/rsvps"),
        ("post", "/v1/member-events/{event_id}/check-ins"),
    ]:
        operation = doc["paths"][path][method]
        headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert "Idempotency-Key" in headers
        assert "422" in operation["responses"]
