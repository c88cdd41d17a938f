"""Notify's triggers, templates, planner and opt-outs against real services:
a real members service (the recipients, their stores, consents and
opt-outs on the member file), the notify service, and the other services'
events published onto their JetStream streams as their relays publish
them. The planner's clock is set to 22:00 in Shanghai. On SQLite and
PostgreSQL."""

from __future__ import annotations

import datetime as dt
import re
import uuid
import zoneinfo
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import sqlalchemy as sa
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chassis.auth import Role, Scope, ScopeLevel, service_token
from chassis.bus import STREAMS, Bus, cloudevent_headers
from chassis.config import DEVELOPMENT_TOKEN_SECRET, Settings
from chassis.db import utcnow
from chassis.service import ServiceRuntime
from cornucopia.campaigns.v1 import events_pb2 as campaign_events
from cornucopia.cards.v1 import events_pb2 as card_events
from cornucopia.common.v1 import money_pb2, org_pb2
from cornucopia.loyalty.v1 import events_pb2 as loyalty_events
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc, organisation_pb2, organisation_pb2_grpc
from cornucopia.notify.v1 import preferences_pb2, preferences_pb2_grpc, templates_pb2_grpc
from cornucopia.notify.v1 import templates_pb2 as T
from services.gateway.server import create_app
from services.members.server import definition as members_definition
from services.notify.domain.templates import format_date
from services.notify.server import definition as notify_definition
from services.notify.server import templates as templates_server
from services.notify.store.intents import notifications as notifications_table
from services.notify.store.messages import messages as messages_table
from tests.integration.conftest import (
    Suite,
    auth,
    eventually,
    rpc_details,
    seed_organisation,
    token,
)
from tests.integration.infra import DatabaseFactory

HQ = auth()


def as_service() -> tuple[tuple[str, str], ...]:
    """A service's token; short-lived, so minted when used."""
    return auth(service_token(DEVELOPMENT_TOKEN_SECRET, "tests"))


# 22:00 in Shanghai, the stores' zone: quiet hours for marketing SMS. A
# day ahead of the real clock, which the triggers also read (an early
# warning is told later only when its time is still ahead).
NOW = dt.datetime.now(dt.UTC).replace(hour=14, minute=0, second=0, microsecond=0) + dt.timedelta(
    days=1
)
NINE_NEXT_MORNING = NOW + dt.timedelta(hours=11)
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
SECRET = "provider-shared-secret-for-tests"


def ts(at: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


def cny(minor: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="CNY", minor_units=minor)


async def publish(suite: Suite, stream: str, subject: str, message: Message, event_id: str) -> None:
    """Publishes as the owning service's relay would; the same event id
    twice is a redelivery (a fresh Nats-Msg-Id keeps JetStream from
    dropping it, so that notify's own dedup is what is tested)."""
    bus = Bus(suite.nats_url, f"test-{stream}")
    await bus.connect()
    try:
        await bus.ensure_stream(STREAMS[stream])
        headers = cloudevent_headers(
            event_id=event_id,
            event_type=message.DESCRIPTOR.full_name,
            source=f"cornucopia/{stream}",
            time=utcnow(),
            subject=subject,
        )
        headers["Nats-Msg-Id"] = str(uuid.uuid4())
        await bus.publish(subject, message.SerializeToString(), headers)
    finally:
        await bus.close()


@dataclass
class Rig:
    suite: Suite
    notify: ServiceRuntime
    members: members_pb2_grpc.MembersServiceStub
    templates: templates_pb2_grpc.TemplatesServiceStub
    preferences: preferences_pb2_grpc.PreferencesServiceStub
    consultant: str
    manager: str

    async def enroll(
        self,
        mobile: str,
        language: str,
        *,
        store: str = "S001",
        email: str = "",
        preferred: int = M.CONTACT_CHANNEL_UNSPECIFIED,
        consents: tuple[int, ...] = (),
    ) -> str:
        created = await self.members.CreateMember(
            M.CreateMemberRequest(
                request_id=str(uuid.uuid4()),
                member=M.Member(
                    home_store_id=store,
                    given_name="Ana",
                    mobile=mobile,
                    email=email,
                    preferred_language=language,
                    preferred_contact_channel=preferred,  # type: ignore[arg-type]
                    consents=[M.Consent(channel=c, granted=True) for c in consents],  # type: ignore[misc]
                ),
            ),
            metadata=HQ,
        )
        return created.member_id

    async def messages_of(self, **recipient: str) -> list[dict[str, Any]]:
        (column, value), *_ = recipient.items()
        async with self.notify.db.sessions() as session:
            rows = await session.execute(
                sa.select(messages_table)
                .where(messages_table.c[column] == value)
                .order_by(messages_table.c.created_at)
            )
            return [dict(r._mapping) for r in rows]

    async def message(self, template: str, **recipient: str) -> dict[str, Any]:
        found = await eventually(
            lambda: self.messages_of(**recipient),
            lambda rows: any(r["template"] == template for r in rows),
        )
        return next(r for r in found if r["template"] == template)

    async def policy(self, **changes: Any) -> None:
        current = await self.templates.GetNotifyPolicy(T.GetNotifyPolicyRequest(), metadata=HQ)
        wanted = T.NotifyPolicy()
        wanted.CopyFrom(current)
        for name, value in changes.items():
            if isinstance(value, dict):
                getattr(wanted, name).update(value)
            else:
                setattr(wanted, name, value)
        await self.templates.UpdateNotifyPolicy(
            T.UpdateNotifyPolicyRequest(
                request_id=str(uuid.uuid4()), policy=wanted, etag=current.etag
            ),
            metadata=HQ,
        )


async def start(suite: Suite, database_url: DatabaseFactory) -> Rig:
    await suite.start(members_definition, await database_url("members"))
    org = await seed_organisation(suite)
    organisation = organisation_pb2_grpc.OrganisationServiceStub(suite.channels["members"])
    manager = await organisation.CreateStaffMember(
        organisation_pb2.CreateStaffMemberRequest(
            request_id="seed-manager",
            staff_member=organisation_pb2.StaffMember(
                login_id="manager.s001",
                display_name="店长",
                assignment=org_pb2.OrgUnitRef(level=org_pb2.ORG_LEVEL_STORE, id="S001"),
                roles=[organisation_pb2.STAFF_ROLE_STORE_MANAGER],
            ),
        ),
        metadata=HQ,
    )
    notify = await suite.start(notify_definition, await database_url("notify"))
    templates_server.planner(notify.context).clock = lambda: NOW
    return Rig(
        suite=suite,
        notify=notify,
        members=members_pb2_grpc.MembersServiceStub(suite.channels["members"]),
        templates=templates_pb2_grpc.TemplatesServiceStub(suite.channels["notify"]),
        preferences=preferences_pb2_grpc.PreferencesServiceStub(suite.channels["notify"]),
        consultant=org.consultants[0],
        manager=manager.staff_id,
    )


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_every_trigger_speaks_the_members_language_at_the_right_time(
    suite: Suite, database_url: DatabaseFactory, spans: InMemorySpanExporter
) -> None:
    rig = await start(suite, database_url)
    # Whoever has no language of their own (staff; members' files always
    # have one) reads S001's: Spanish. The cap is two a week.
    await rig.policy(store_locales={"S001": "es"}, marketing_weekly_cap=2)

    spans.clear()
    with trace.get_tracer("tests").start_as_current_span("enroll at the till") as root:
        en = await rig.enroll("13800138001", "en", consents=(M.CONTACT_CHANNEL_SMS,))
    es = await rig.enroll(
        "13800138002", "es", email="ana@example.com", preferred=M.CONTACT_CHANNEL_EMAIL
    )
    zh = await rig.enroll("13800138003", "zh-CN")

    # Welcome: each in their language, on their channel.
    welcome = {m: await rig.message("welcome", member_id=m) for m in (en, es, zh)}
    assert (welcome[en]["locale"], welcome[en]["channel"]) == ("en", "sms")
    assert welcome[en]["body"].startswith("Welcome to the club")
    assert (welcome[es]["locale"], welcome[es]["channel"]) == ("es", "email")
    assert welcome[es]["body"].startswith("¡Bienvenido") and welcome[es]["subject"]
    assert welcome[zh]["locale"] == "zh-CN" and welcome[zh]["body"].startswith("欢迎加入会员")
    assert all(
        w["category"] == "transactional" and w["not_before"] is None for w in welcome.values()
    )
    # The enrollment's trace goes on through notify's planning of the welcome.
    trace_id = root.get_span_context().trace_id
    planned = await eventually(
        lambda: _names_in(spans, trace_id), lambda names: "notify plan welcome" in names
    )
    assert "/cornucopia.members.v1.MembersService/CreateMember" in planned

    # Stored value: the amount and the new balance, as the reader writes money.
    recharge = card_events.StoredValueRecharged(
        movement=card_events.StoredValueMoved(
            movement_id="MV1",
            card_id="C1",
            member_id=es,
            amount=cny(20000),
            available_after=cny(53550),
        )
    )
    await publish(suite, "cards", "cards.v1.stored_value.recharged", recharge, "ev-recharge")
    got = await rig.message("stored_value_recharged", member_id=es)
    assert got["channel"] == "email" and got["subject"] == "Recarga confirmada"
    assert "200,00 ¥" in got["body"] and "535,50 ¥" in got["body"]

    debit = card_events.StoredValueDebited(
        movement=card_events.StoredValueMoved(
            movement_id="MV2",
            card_id="C2",
            member_id=zh,
            amount=cny(-5000),
            available_after=cny(48550),
        )
    )
    # Delivered twice: one message.
    for _ in range(2):
        await publish(suite, "cards", "cards.v1.stored_value.debited", debit, "ev-debit")
    got = await rig.message("stored_value_debited", member_id=zh)
    assert got["channel"] == "sms" and "¥50.00" in got["body"] and "¥485.50" in got["body"]

    # A checkout pays by a hold and its capture: the capture is the spend.
    capture = card_events.StoredValueCaptured(
        movement=card_events.StoredValueMoved(
            movement_id="MV3",
            card_id="C4",
            member_id=es,
            amount=cny(-30000),
            available_after=cny(23550),
            hold_id="H1",
        )
    )
    await publish(suite, "cards", "cards.v1.stored_value.captured", capture, "ev-capture")
    got = await rig.message("stored_value_debited", member_id=es)
    assert "300,00 ¥" in got["body"] and "235,50 ¥" in got["body"]

    for subject, event, template, text in (
        (
            "cards.v1.card.reported_lost",
            card_events.CardReportedLost(card_id="C3", member_id=es),
            "card_reported_lost",
            "Aviso de seguridad",
        ),
        (
            "cards.v1.card.frozen",
            card_events.CardFrozen(card_id="C3", member_id=es),
            "card_frozen",
            "se bloqueó",
        ),
    ):
        await publish(suite, "cards", subject, event, f"ev-{template}")
        got = await rig.message(template, member_id=es)
        assert got["category"] == "transactional" and text in got["body"]

    # Points expiring in 30 days and a half hour: told 30 days before (the
    # policy), not now. (A notification due further ahead is planned only
    # an hour before its time: see test_intents.)
    expires = NOW + dt.timedelta(days=30, minutes=30)
    expiring = loyalty_events.PointsExpiring(
        member_id=en, lot_id="L1", points=1200, expire_time=ts(expires), expiring_total=1500
    )
    await publish(suite, "loyalty", "loyalty.v1.points.expiring", expiring, "ev-expiring")
    got = await rig.message("points_expiring", member_id=en)
    assert got["not_before"] == expires - dt.timedelta(days=30)
    assert got["body"].startswith("1,200 of your points expire on")

    tier = loyalty_events.TierChanged(member_id=en, from_tier_id="SILVER", to_tier_id="GOLD")
    await publish(suite, "loyalty", "loyalty.v1.tier.changed", tier, "ev-tier")
    got = await rig.message("tier_changed", member_id=en)
    assert got["locale"] == "en" and "from SILVER to GOLD" in got["body"]

    # Marketing: only with consent; at 22:00 an SMS waits for 09:00 local.
    for member, event_id in ((en, "ev-coupon-en"), (zh, "ev-coupon-zh")):
        coupon = campaign_events.CouponIssued(
            coupon=campaign_events.CouponMoved(
                coupon_id=f"CP-{member}",
                member_id=member,
                expire_time=ts(NOW + dt.timedelta(days=30)),
            )
        )
        await publish(suite, "campaigns", "campaigns.v1.coupon.issued", coupon, event_id)
    got = await rig.message("coupon_issued", member_id=en)
    assert (got["status"], got["channel"]) == ("queued", "sms")
    assert got["not_before"] == NINE_NEXT_MORNING
    assert "/v1/unsubscribe/" in got["body"]
    refused = await rig.message("coupon_issued", member_id=zh)
    assert (refused["status"], refused["status_reason"]) == ("suppressed", "no_consent")
    assert refused["body"] == ""

    starts = NOW + dt.timedelta(days=18, hours=21)
    invited = campaign_events.EventInvited(
        event_id="EV1",
        member_id=en,
        store_id="S001",
        kind="vip_evening",
        start_time=ts(starts),
        rsvp_deadline=ts(NOW + dt.timedelta(days=17, hours=1)),
    )
    await publish(suite, "campaigns", "campaigns.v1.event.invited", invited, "ev-invite")
    got = await rig.message("event_invitation", member_id=en)
    # In English, at the store's time: 19:00 in Shanghai.
    when = f"{format_date(starts.astimezone(SHANGHAI).date(), 'en')}, 19:00"
    assert when in got["body"] and got["not_before"] == NINE_NEXT_MORNING

    # A third marketing message in the week: over the cap of two.
    again = campaign_events.CouponIssued(
        coupon=campaign_events.CouponMoved(coupon_id="CP-again", member_id=en)
    )
    await publish(suite, "campaigns", "campaigns.v1.coupon.issued", again, "ev-coupon-again")
    capped = await eventually(
        lambda: rig.messages_of(member_id=en),
        lambda rows: any(r["status_reason"] == "weekly_cap" for r in rows),
    )
    assert sum(r["template"] == "coupon_issued" for r in capped) == 2

    # Follow-up tasks: to the consultant; an unassigned one to the managers.
    due = NOW + dt.timedelta(days=1, hours=12)
    for event_id, assignee in (("ev-task-1", rig.consultant), ("ev-task-2", "")):
        task = campaign_events.FollowUpTaskCreated(
            task_id=f"T-{event_id}",
            member_id=zh,
            store_id="S001",
            assignee_staff_id=assignee,
            due_time=ts(due),
            reason="birthday",
        )
        await publish(suite, "campaigns", "campaigns.v1.followup.task_created", task, event_id)
    to_consultant = await rig.message("followup_task_created", staff_id=rig.consultant)
    to_manager = await rig.message("followup_task_created", staff_id=rig.manager)
    for got in (to_consultant, to_manager):
        assert (got["channel"], got["locale"], got["member_id"]) == ("push", "es", None)
        # In the staff's Spanish, at the store's time: 10:00 in Shanghai.
        due_text = f"{format_date(due.astimezone(SHANGHAI).date(), 'es')}, 10:00"
        assert zh in got["body"] and due_text in got["body"]
    assert to_manager["trigger_event_id"].startswith("ev-task-2")

    # Every event once, whatever the redeliveries.
    async with rig.notify.db.sessions() as session:
        debits = await session.execute(
            sa.select(sa.func.count()).where(messages_table.c.trigger_event_id == "ev-debit")
        )
        assert debits.scalar_one() == 1


def _names_in(spans: InMemorySpanExporter, trace_id: int) -> Any:
    async def names() -> set[str]:
        return {s.name for s in spans.get_finished_spans() if s.context.trace_id == trace_id}

    return names()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_opt_outs_by_reply_and_link_reach_the_member_file_and_stop_marketing(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_RECEIPT_SECRET", SECRET)
    rig = await start(suite, database_url)
    replier = await rig.enroll("13800138011", "zh-CN", consents=(M.CONTACT_CHANNEL_SMS,))
    clicker = await rig.enroll(
        "13800138012",
        "en",
        email="li@example.com",
        preferred=M.CONTACT_CHANNEL_EMAIL,
        consents=(M.CONTACT_CHANNEL_EMAIL,),
    )
    settings = Settings(
        service="gateway", environment="test", var_dir=suite.var_dir, nats_url=suite.nats_url
    )
    app = create_app(settings, members_channel=suite.channels["members"])
    app.state.notify_channel = suite.channels["notify"]
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")

    async def coupon(member: str, event_id: str) -> None:
        issued = campaign_events.CouponIssued(
            coupon=campaign_events.CouponMoved(coupon_id=event_id, member_id=member)
        )
        await publish(suite, "campaigns", "campaigns.v1.coupon.issued", issued, event_id)

    async def consent(member: str, channel: int) -> bool:
        found = await rig.members.GetMember(M.GetMemberRequest(member_id=member), metadata=HQ)
        return next(c.granted for c in found.consents if c.channel == channel)

    try:
        # An SMS reply "退订" from the member's mobile, through the provider.
        inbound = {"message_id": "in-1", "from": "+86 138 0013 8011", "text": " 退订 "}
        wrong = await http.post(
            "/v1/notify/providers/sms/inbound", json=inbound, headers={"X-Receipt-Secret": "no"}
        )
        assert wrong.status_code == 401
        taken = await http.post(
            "/v1/notify/providers/sms/inbound", json=inbound, headers={"X-Receipt-Secret": SECRET}
        )
        assert taken.json() == {"opted_out": True}
        assert not await consent(replier, M.CONTACT_CHANNEL_SMS)
        listed = await rig.preferences.ListOptOuts(
            preferences_pb2.ListOptOutsRequest(member_id=replier), metadata=HQ
        )
        assert [(o.source, o.scope) for o in listed.optouts] == [
            (preferences_pb2.OPT_OUT_SOURCE_REPLY_KEYWORD, preferences_pb2.OPT_OUT_SCOPE_MARKETING)
        ]
        chat = {"message_id": "in-2", "from": "+8613800138011", "text": "谢谢，明天到店"}
        answered = await http.post(
            "/v1/notify/providers/sms/inbound", json=chat, headers={"X-Receipt-Secret": SECRET}
        )
        assert answered.json() == {"opted_out": False}
        await coupon(replier, "ev-after-reply")
        got = await rig.message("coupon_issued", member_id=replier)
        assert (got["status"], got["status_reason"]) == ("suppressed", "opted_out")
        # A service message still goes.
        lost = card_events.CardReportedLost(card_id="C9", member_id=replier)
        await publish(suite, "cards", "cards.v1.card.reported_lost", lost, "ev-lost-replier")
        assert (await rig.message("card_reported_lost", member_id=replier))["status"] != (
            "suppressed"
        )

        # The link in a marketing e-mail.
        await coupon(clicker, "ev-before-click")
        mail = await rig.message("coupon_issued", member_id=clicker)
        assert mail["channel"] == "email" and mail["not_before"] is None  # not an SMS
        link = re.search(r"http://\S+/v1/unsubscribe/(\S+)", mail["body"])
        assert link is not None
        path = f"/v1/unsubscribe/{link.group(1)}"
        page = await http.get(path)
        assert page.status_code == 200 and "<form" in page.text
        assert await consent(clicker, M.CONTACT_CHANNEL_EMAIL)  # opening it changed nothing
        done = await http.post(path)
        assert done.json() == {"channel": "email", "already_unsubscribed": False}
        assert (await http.post(path)).json()["already_unsubscribed"] is True
        assert not await consent(clicker, M.CONTACT_CHANNEL_EMAIL)
        forged = await http.post(f"/v1/unsubscribe/{link.group(1)[:-3]}abc")
        assert forged.status_code == 400
        assert forged.headers["content-type"].startswith("application/problem+json")
        await coupon(clicker, "ev-after-click")
        rows = await eventually(
            lambda: rig.messages_of(member_id=clicker),
            lambda found: sum(r["template"] == "coupon_issued" for r in found) == 2,
        )
        assert rows[-1]["status_reason"] == "opted_out"
    finally:
        await http.aclose()
        await app.state.peers.close()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_templates_are_checked_when_saved_versioned_and_previewed(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    rig = await start(suite, database_url)
    member = await rig.enroll("13800138021", "es", store="S002")
    bodies = {
        "zh-CN": "您的会员等级现为 {to_tier}。",
        "en": "You are now {to_tier}.",
        "es": "Ahora es socio {to_tier} de {store_name}.",
    }

    # A variable the trigger does not give is refused when saved.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await rig.templates.CreateTemplate(
            T.CreateTemplateRequest(
                request_id="t-bad",
                template=T.Template(
                    name="tier_changed",
                    trigger="tier_changed",
                    bodies={**bodies, "en": "You are now {tier_name}."},
                ),
            ),
            metadata=HQ,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = rpc_details(refused.value)["violations"]
    assert list(violations) == ["template.bodies[en]"]
    assert "{tier_name}" in violations["template.bodies[en]"]

    # Staff may read, not write.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await rig.templates.UpdateTemplate(
            T.UpdateTemplateRequest(
                request_id="t-op",
                template=T.Template(name="tier_changed", trigger="tier_changed", bodies=bodies),
            ),
            metadata=auth(token((Role.STORE_OPERATOR,))),
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    saved = await rig.templates.UpdateTemplate(
        T.UpdateTemplateRequest(
            request_id="t-1",
            template=T.Template(name="tier_changed", trigger="tier_changed", bodies=bodies),
        ),
        metadata=HQ,
    )
    assert (saved.version, saved.built_in) == (1, False)
    again = await rig.templates.UpdateTemplate(
        T.UpdateTemplateRequest(
            request_id="t-1",
            template=T.Template(name="tier_changed", trigger="tier_changed", bodies=bodies),
        ),
        metadata=HQ,
    )
    assert again.version == 1  # the same request, answered once

    preview = await rig.templates.PreviewTemplate(
        T.PreviewTemplateRequest(
            name="tier_changed", member_id=member, variables={"to_tier": "ORO"}
        ),
        metadata=as_service(),
    )
    assert (preview.locale, preview.body) == ("es", "Ahora es socio ORO de Store S002.")
    listed = await rig.templates.ListTemplates(T.ListTemplatesRequest(), metadata=HQ)
    kinds = {(t.name, t.built_in) for t in listed.templates}
    assert ("tier_changed", False) in kinds and ("welcome", True) in kinds
    assert ("tier_changed", True) not in kinds

    tier = loyalty_events.TierChanged(member_id=member, from_tier_id="SILVER", to_tier_id="GOLD")
    await publish(suite, "loyalty", "loyalty.v1.tier.changed", tier, "ev-tier-saved")
    got = await rig.message("tier_changed", member_id=member)
    assert got["body"] == "Ahora es socio GOLD de Store S002."


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_members_outage_delays_the_welcome_and_loses_nothing(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    """Notify cannot plan a message without the member file: while members
    is down the notification waits and is tried again with a growing delay;
    when members is back the message is planned, once."""
    members_url = await database_url("members")
    members = await suite.start(members_definition, members_url)
    await seed_organisation(suite)
    notify = await suite.start(notify_definition, await database_url("notify"))
    member = await members_pb2_grpc.MembersServiceStub(suite.channels["members"]).CreateMember(
        M.CreateMemberRequest(
            request_id="outage-member",
            member=M.Member(
                home_store_id="S001",
                given_name="Ann",
                mobile="13800138009",
                preferred_language="en",
            ),
        ),
        metadata=HQ,
    )
    await eventually(lambda: _messages(notify, member.member_id), lambda rows: len(rows) == 1)

    # Members goes down; an event for the member arrives meanwhile.
    port = members.port
    await suite.stop("members")
    tier = loyalty_events.TierChanged(
        member_id=member.member_id, from_tier_id="SILVER", to_tier_id="GOLD"
    )
    await publish(suite, "loyalty", "loyalty.v1.tier.changed", tier, "ev-tier-outage")

    async def notification() -> dict[str, Any] | None:
        async with notify.db.sessions() as session:
            row = (
                await session.execute(
                    sa.select(notifications_table).where(
                        notifications_table.c.dedup_key == "tier_changed:ev-tier-outage"
                    )
                )
            ).first()
            return dict(row._mapping) if row else None

    waiting = await eventually(notification, lambda row: row is not None and row["attempts"] >= 1)
    assert waiting["planned_at"] is None
    assert "MEMBERS_UNAVAILABLE" in waiting["last_error"] or "members" in waiting["last_error"]
    assert [r["template"] for r in await _messages(notify, member.member_id)] == ["welcome"]

    # Members is back where notify looks for it: the message is planned, once.
    await suite.start(members_definition, members_url, port=port)
    rows = await eventually(
        lambda: _messages(notify, member.member_id),
        lambda rows: any(r["template"] == "tier_changed" for r in rows),
        timeout=60,
    )
    assert sorted(r["template"] for r in rows) == ["tier_changed", "welcome"]
    planned = await notification()
    assert planned is not None and planned["planned_at"] is not None


async def _messages(notify: ServiceRuntime, member_id: str) -> list[dict[str, Any]]:
    async with notify.db.sessions() as session:
        rows = await session.execute(
            sa.select(messages_table).where(messages_table.c.member_id == member_id)
        )
        return [dict(r._mapping) for r in rows]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_hq_keeps_templates_and_the_policy_over_http(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    rig = await start(suite, database_url)
    member = await rig.enroll("13800138021", "es")
    settings = Settings(
        service="gateway", environment="test", var_dir=suite.var_dir, nats_url=suite.nats_url
    )
    app = create_app(settings, members_channel=suite.channels["members"])
    app.state.notify_channel = suite.channels["notify"]
    hq = {"authorization": f"Bearer {token()}"}
    at_s001 = Scope(ScopeLevel.STORE, "S001")
    operator = {"authorization": f"Bearer {token((Role.STORE_OPERATOR,), at_s001)}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        triggers = (await http.get("/v1/notify/triggers", headers=hq)).json()
        debited = next(t for t in triggers["triggers"] if t["name"] == "stored_value_debited")
        assert "balance" in {v["name"] for v in debited["variables"]}

        wording = {
            "zh-CN": "消费提醒：{amount}",
            "en": "You spent {amount}; {nickname}",
            "es": "Ha gastado {amount}",
        }
        body = {
            "name": "stored_value_debited",
            "trigger": "stored_value_debited",
            "bodies": wording,
        }
        # A variable the trigger does not give is refused when saved.
        refused = await http.post(
            "/v1/notify/templates", json=body, headers={**hq, "Idempotency-Key": "t-1"}
        )
        assert refused.status_code == 400
        assert refused.headers["content-type"] == "application/problem+json"
        assert any("nickname" in e["description"] for e in refused.json()["errors"])

        wording["en"] = "You spent {amount} at the shop"
        # Staff may read templates, not write them.
        forbidden = await http.post(
            "/v1/notify/templates", json=body, headers={**operator, "Idempotency-Key": "t-2"}
        )
        assert forbidden.status_code == 403
        saved = await http.post(
            "/v1/notify/templates", json=body, headers={**hq, "Idempotency-Key": "t-3"}
        )
        assert saved.status_code == 201, saved.text

        # The preview renders the saved wording for the member, in Spanish.
        preview = await http.post(
            "/v1/notify/templates/preview",
            json={
                "name": "stored_value_debited",
                "member_id": member,
                "variables": {"amount": "12,00 ¥"},
            },
            headers=hq,
        )
        assert preview.status_code == 200, preview.text
        assert preview.json()["locale"] == "es"
        assert preview.json()["body"].startswith("Ha gastado 12,00 ¥")

        # The policy changes only against the ETag that was read.
        read = await http.get("/v1/notify/policy", headers=hq)
        policy = read.json()
        etag = read.headers["ETag"]
        for key in ("etag", "update_time", "updated_by"):
            policy.pop(key, None)
        policy["marketing_weekly_cap"] = 5
        changed = await http.put(
            "/v1/notify/policy",
            json=policy,
            headers={**hq, "If-Match": etag, "Idempotency-Key": "p-1"},
        )
        assert changed.status_code == 200, changed.text
        stale = await http.put(
            "/v1/notify/policy",
            json=policy,
            headers={**hq, "If-Match": etag, "Idempotency-Key": "p-2"},
        )
        assert stale.status_code == 412
        assert (await http.get("/v1/notify/policy", headers=hq)).json()["marketing_weekly_cap"] == 5
