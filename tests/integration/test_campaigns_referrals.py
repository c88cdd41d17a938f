"""Referrals driven by real events on SQLite and PostgreSQL: a real members
service enrolls friends with a referrer, loyalty's sale events are
published onto the LOYALTY stream as loyalty's relay would, and a real
loyalty service awards points. Each reward is given once per campaign and
referred member, however often its event is delivered."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.message import Message

from chassis.bus import STREAMS, Bus, cloudevent_headers
from chassis.config import Settings
from chassis.db import outbox_table, utcnow
from chassis.service import ServiceRuntime
from cornucopia.campaigns.v1 import pricing_pb2 as pb
from cornucopia.campaigns.v1 import pricing_pb2_grpc, referrals_pb2_grpc
from cornucopia.campaigns.v1 import referrals_pb2 as R
from cornucopia.common.v1 import money_pb2
from cornucopia.loyalty.v1 import points_pb2, points_pb2_grpc
from cornucopia.members.v1 import events_pb2 as member_events
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc
from services.campaigns.server import definition as campaigns_definition
from services.loyalty.server import definition as loyalty_definition
from services.members.server import definition as members_definition
from tests.integration.conftest import Suite, auth, eventually, rpc_details, seed_organisation
from tests.integration.infra import DatabaseFactory
from tests.integration.test_campaigns_followups import publish, sale, ts

HQ = auth()


def rid() -> str:
    return str(uuid.uuid4())


async def publish_member_event(suite: Suite, message: Message, event_id: str) -> None:
    """An enrollment event as members' relay would publish it again."""
    bus = Bus(suite.nats_url, "test-members")
    await bus.connect()
    try:
        await bus.ensure_stream(STREAMS["members"])
        headers = cloudevent_headers(
            event_id=event_id,
            event_type=message.DESCRIPTOR.full_name,
            source="cornucopia/members",
            time=utcnow(),
            subject="members.v1.member.enrolled",
        )
        headers["Nats-Msg-Id"] = str(uuid.uuid4())
        await bus.publish("members.v1.member.enrolled", message.SerializeToString(), headers)
    finally:
        await bus.close()


async def start_campaigns(suite: Suite, url: str) -> ServiceRuntime:
    settings = Settings(
        service="campaigns",
        environment="test",
        var_dir=suite.var_dir,
        database_url=url,
        nats_url=suite.nats_url,
        grpc_listen="127.0.0.1:0",
        peers={
            "members": f"127.0.0.1:{suite.runtimes['members'].port}",
            "loyalty": f"127.0.0.1:{suite.runtimes['loyalty'].port}",
        },
    )
    runtime = ServiceRuntime(campaigns_definition, settings)
    await runtime.start()
    await asyncio.wait_for(runtime.ready.wait(), timeout=20)
    suite.runtimes["campaigns"] = runtime
    suite.channels["campaigns"] = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    return runtime


async def rewarded_subjects(suite: Suite) -> list[str]:
    db = suite.runtimes["campaigns"].db
    async with db.sessions() as session:
        rows = await session.execute(
            sa.select(outbox_table.c.subject).where(
                outbox_table.c.subject == "campaigns.v1.referral.rewarded"
            )
        )
        return [r.subject for r in rows]


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_referrers_are_rewarded_once_for_enrollments_and_first_purchases(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAMPAIGNS_REFERRAL_INTERVAL_SECONDS", "0.2")
    await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    await suite.start(loyalty_definition, await database_url("loyalty"))
    await start_campaigns(suite, await database_url("campaigns"))
    members = members_pb2_grpc.MembersServiceStub(suite.channels["members"])
    referrals = referrals_pb2_grpc.ReferralsServiceStub(suite.channels["campaigns"])
    coupons = pricing_pb2_grpc.CouponsServiceStub(suite.channels["campaigns"])
    points = points_pb2_grpc.PointsServiceStub(suite.channels["loyalty"])

    async def enroll(mobile: str, referrer: str = "") -> str:
        created = await members.CreateMember(
            M.CreateMemberRequest(
                request_id=rid(),
                member=M.Member(
                    home_store_id="S001",
                    given_name="娜",
                    mobile=mobile,
                    preferred_language="zh-CN",
                    referrer_member_id=referrer,
                ),
            ),
            metadata=HQ,
        )
        return created.member_id

    async def referrals_of(member_id: str) -> list[R.Referral]:
        found = await referrals.ListReferrals(
            R.ListReferralsRequest(member_id=member_id), metadata=HQ
        )
        return list(found.referrals)

    now = utcnow()
    template = await coupons.CreateCouponTemplate(
        pb.CreateCouponTemplateRequest(
            request_id=rid(),
            template=pb.CouponTemplate(
                display_name="Thanks for a friend",
                kind=pb.COUPON_KIND_AMOUNT_OFF,
                currency_code="CNY",
                amount_off=money_pb2.Money(currency_code="CNY", minor_units=1_000),
                valid_days=30,
            ),
        ),
        metadata=HQ,
    )
    window = {
        "start_time": ts(now - dt.timedelta(days=1)),
        "end_time": ts(now + dt.timedelta(days=30)),
    }
    bad = await asyncio.gather(
        referrals.CreateReferralCampaign(
            R.CreateReferralCampaignRequest(
                request_id=rid(),
                campaign=R.ReferralCampaign(
                    campaign_id="nope",
                    display_name="x",
                    trigger=R.REFERRAL_TRIGGER_ENROLL,
                    coupon_template_id="T-NONE",
                    **window,
                ),
            ),
            metadata=HQ,
        ),
        return_exceptions=True,
    )
    assert isinstance(bad[0], grpc.aio.AioRpcError)
    assert set(rpc_details(bad[0])["violations"]) == {"campaign.coupon_template_id"}
    enroll_campaign = await referrals.CreateReferralCampaign(
        R.CreateReferralCampaignRequest(
            request_id=rid(),
            campaign=R.ReferralCampaign(
                campaign_id="bring-a-friend",
                display_name="Bring a friend",
                trigger=R.REFERRAL_TRIGGER_ENROLL,
                coupon_template_id=template.template_id,
                **window,
            ),
        ),
        metadata=HQ,
    )
    assert enroll_campaign.WhichOneof("reward") == "coupon_template_id"
    await referrals.CreateReferralCampaign(
        R.CreateReferralCampaignRequest(
            request_id=rid(),
            campaign=R.ReferralCampaign(
                campaign_id="first-buy",
                display_name="Their first purchase",
                trigger=R.REFERRAL_TRIGGER_FIRST_PURCHASE,
                points=500,
                **window,
            ),
        ),
        metadata=HQ,
    )
    listed = await referrals.ListReferralCampaigns(R.ListReferralCampaignsRequest(), metadata=HQ)
    assert [c.campaign_id for c in listed.campaigns] == ["bring-a-friend", "first-buy"]

    # Members refuses a referrer that is not an active member.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await enroll("+8613800138200", referrer="M0000000000")
    assert set(rpc_details(refused.value)["violations"]) == {"member.referrer_member_id"}

    # Alice brings Bob: Alice gets the coupon for his enrollment.
    alice = await enroll("+8613800138201")
    bob = await enroll("+8613800138202", referrer=alice)
    found = await eventually(lambda: referrals_of(alice), lambda r: len(r) == 1)
    assert found[0].campaign_id == "bring-a-friend"
    assert found[0].referred_member_id == bob
    assert found[0].state == R.REFERRAL_STATE_REWARDED
    assert found[0].coupon_id
    wallet = await coupons.ListMemberCoupons(
        pb.ListMemberCouponsRequest(member_id=alice), metadata=HQ
    )
    assert [c.coupon_id for c in wallet.coupons] == [found[0].coupon_id]

    # The enrollment delivered again (same id, and as a new event): once.
    again = member_events.MemberEnrolled(
        member_id=bob, home_store_id="S001", referrer_member_id=alice, enroll_time=ts(now)
    )
    await publish_member_event(suite, again, "evt-bob-again")
    await publish_member_event(suite, again, "evt-bob-again")
    await publish_member_event(suite, again, "evt-bob-third")
    carol = await enroll("+8613800138203", referrer=alice)
    await eventually(lambda: referrals_of(alice), lambda r: len(r) == 2)
    await asyncio.sleep(1.0)
    mine = await referrals_of(alice)
    assert sorted(r.referred_member_id for r in mine) == sorted([bob, carol])
    wallet = await coupons.ListMemberCoupons(
        pb.ListMemberCouponsRequest(member_id=alice), metadata=HQ
    )
    assert len(wallet.coupons) == 2
    assert len(await rewarded_subjects(suite)) == 2

    # Bob's first purchase: Alice gets 500 points, once; his second sale and
    # a redelivered first one give nothing more.
    day = dt.date.today()
    first = sale(bob, day, "skincare")
    await publish(suite, "loyalty.v1.sale.recorded", first, "evt-bob-sale-1")
    await publish(suite, "loyalty.v1.sale.recorded", first, "evt-bob-sale-1")
    await publish(suite, "loyalty.v1.sale.recorded", first, "evt-bob-sale-1b")
    await publish(suite, "loyalty.v1.sale.recorded", sale(bob, day), "evt-bob-sale-2")
    # Alice's own purchase: nobody referred her.
    await publish(suite, "loyalty.v1.sale.recorded", sale(alice, day), "evt-alice-sale")

    def points_rewarded(found: list[R.Referral]) -> bool:
        return any(
            r.campaign_id == "first-buy" and r.state == R.REFERRAL_STATE_REWARDED for r in found
        )

    found = await eventually(lambda: referrals_of(alice), points_rewarded)
    by_campaign = {(r.campaign_id, r.referred_member_id): r for r in found}
    purchase = by_campaign[("first-buy", bob)]
    assert purchase.points == 500 and purchase.trigger_reference == first.sale_id
    assert ("first-buy", carol) not in by_campaign

    async def balance() -> int:
        account = await points.GetPointsAccount(
            points_pb2.GetPointsAccountRequest(member_id=alice), metadata=HQ
        )
        return int(account.available)

    assert await eventually(balance, lambda b: b == 500) == 500
    await asyncio.sleep(1.0)
    assert len(await referrals_of(alice)) == 3
    assert await balance() == 500
    assert len(await rewarded_subjects(suite)) == 3
