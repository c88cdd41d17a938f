"""Referral rewards at work: the consumers of members' enrollments and
loyalty's sales that trigger them, the coupon reward given in the
consumer's unit of work, and the worker that awards points through
loyalty.

Once per (campaign, referred member): the referral row is inserted under
that UNIQUE key before anything is given, so a redelivered enrollment, a
replayed sale or a second sale finds it and gives nothing. A coupon is
issued by the coupon ledger's own issuing (a one-member issue job keyed by
the referral), inside a savepoint: a template that cannot give one (ended,
exhausted, the member's limit) leaves the referral SKIPPED with the
ledger's reason. Points cannot be given inside campaigns' transaction: the
referral stays PENDING and the worker calls loyalty's AwardPoints with the
referral's key (idempotent there), then marks it REWARDED.

``campaigns.v1.referral.rewarded`` is published in the same transaction
as the referral becomes REWARDED, once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bus import STREAMS
from chassis.config import Settings
from chassis.db import Database, utcnow
from chassis.grpcclient import Peer, passed_on, rich_error
from chassis.inbox import Envelope, Subscription
from chassis.logs import get_logger
from cornucopia.campaigns.v1 import events_pb2
from cornucopia.loyalty.v1 import events_pb2 as loyalty_events
from cornucopia.loyalty.v1 import points_pb2, points_pb2_grpc
from cornucopia.members.v1 import events_pb2 as member_events
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.campaigns import events
from services.campaigns.coupon_ledger import SYSTEM_PRINCIPAL, Skip, Stamp, _issue_in
from services.campaigns.domain import coupons as coupon_rules
from services.campaigns.domain import referrals as domain
from services.campaigns.domain.coupons import JobState
from services.campaigns.domain.referrals import Campaign, ReferralState, RewardKind, Trigger
from services.campaigns.followup_planner import CALL_TIMEOUT_SECONDS, SUBJECT, MembersClient
from services.campaigns.store import coupons as coupon_store
from services.campaigns.store import referrals as store

log = get_logger(__name__)

ENROLL_SUBJECTS = ("members.v1.member.enrolled",)
SALE_SUBJECTS = ("loyalty.v1.sale.recorded",)
DEFAULT_INTERVAL_SECONDS = 60.0
BATCH = 100
# A points award that keeps failing is given up after this many tries.
MAX_ATTEMPTS = 20
SKIP_POINTS_REFUSED = "POINTS_AWARD_REFUSED"
SKIP_POINTS_FAILED = "POINTS_AWARD_FAILED"


def _ts(at: dt.datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(at)
    return message


# --- what campaigns asks others -------------------------------------------------------


class ReferrerDirectory(Protocol):
    async def referrer_of(self, member_id: str) -> str | None:
        """Who referred the member ("" nobody); None: no such member."""


class MembersReferrers:
    """Asks members, with campaigns' own token, for a member enrolled before
    campaigns kept who referred whom (or whose enrollment event has not
    arrived yet)."""

    def __init__(self, client: MembersClient) -> None:
        self.client = client

    async def referrer_of(self, member_id: str) -> str | None:
        stub: members_pb2_grpc.MembersServiceAsyncStub = self.client.peer.stub(  # type: ignore[assignment]
            members_pb2_grpc.MembersServiceStub
        )
        found = await self.client.peer.call(
            stub.GetMember, members_pb2.GetMemberRequest(member_id=member_id), missing_ok=True
        )
        return None if found is None else str(found.referrer_member_id)


class RewardRefused(Exception):
    """Loyalty refused the award for good (the member is gone, say)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PointsAwarder(Protocol):
    async def award(
        self, *, request_id: str, member_id: str, points: int, reason: str, reference: str
    ) -> None:
        """Awards the points once per request_id; RewardRefused when loyalty
        says it never will, any other exception for a try later."""


# Loyalty's answers that no retry changes. MEMBER_NOT_FOUND is not one: the
# referrer's enrollment may not have reached loyalty yet.
_REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


class LoyaltyPoints:
    """campaigns' channel to loyalty's PointsService, with a token of its
    own (AwardPoints is for services)."""

    def __init__(self, settings: Settings) -> None:
        self.peer = Peer(
            settings.peer("loyalty"),
            [points_pb2.DESCRIPTOR.services_by_name["PointsService"]],
            token_secret=settings.token_secret,
            subject=SUBJECT,
            timeout=CALL_TIMEOUT_SECONDS,
        )

    async def award(
        self, *, request_id: str, member_id: str, points: int, reason: str, reference: str
    ) -> None:
        stub: points_pb2_grpc.PointsServiceAsyncStub = self.peer.stub(  # type: ignore[assignment]
            points_pb2_grpc.PointsServiceStub
        )
        # By status code, not by passed_on: a refusal without ErrorInfo is
        # for good too, where Peer.call would make it LOYALTY_UNAVAILABLE.
        try:
            await stub.AwardPoints(
                points_pb2.AwardPointsRequest(
                    request_id=request_id,
                    member_id=member_id,
                    points=points,
                    reason=reason,
                    reference=reference,
                ),
                metadata=self.peer.metadata(),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REFUSALS:
                raise RewardRefused(SKIP_POINTS_REFUSED) from None
            raise passed_on(rich_error(exc), peer="loyalty") from None

    async def close(self) -> None:
        await self.peer.close()


# --- giving the reward ----------------------------------------------------------------


async def _rewarded(
    session: AsyncSession, campaign: Campaign, referral: store.Referral, at: dt.datetime
) -> None:
    done = await store.get_referral(session, campaign.campaign_id, referral.referred_member_id)
    assert done is not None
    await events.publish(
        session,
        events.REFERRAL_REWARDED,
        events_pb2.ReferralRewarded(
            campaign_id=campaign.campaign_id,
            referrer_member_id=done.referrer_member_id,
            referred_member_id=done.referred_member_id,
            trigger=campaign.trigger.value,
            coupon_id=done.coupon_id,
            points=done.points,
            reward_time=_ts(at),
        ),
    )


async def _give_coupon(
    session: AsyncSession, campaign: Campaign, referral: store.Referral, now: dt.datetime
) -> None:
    referrer, referred = referral.referrer_member_id, referral.referred_member_id
    template = await coupon_store.get_template(session, campaign.template_id)
    if template is None:
        await store.settle_referral(
            session,
            campaign.campaign_id,
            referred,
            state=ReferralState.SKIPPED,
            at=now,
            skip_reason=domain.SKIP_TEMPLATE_NOT_FOUND,
        )
        return
    request_id = domain.reward_request_id(campaign.campaign_id, referred)
    job_id = coupon_rules.new_job_id()
    await coupon_store.insert_job(
        session,
        coupon_store.JobRecord(
            job_id=job_id,
            request_id=request_id,
            request_hash=hashlib.sha256(request_id.encode()).hexdigest(),
            template_id=template.template.template_id,
            state=JobState.RUNNING,
            total=1,
            processed=0,
            issued=0,
            skipped=0,
            created_by=SYSTEM_PRINCIPAL,
            created_store_id="",
            created_at=now,
            finished_at=None,
        ),
        [referrer],
    )
    try:
        # The ledger's issuing, undone as a whole when it skips.
        async with session.begin_nested():
            await _issue_in(session, template, job_id, referrer, Stamp(SYSTEM_PRINCIPAL, "", now))
    except Skip as skip:
        await coupon_store.settle_member(session, job_id, referrer, skip.reason)
        await coupon_store.finish_job(session, job_id, now)
        await store.settle_referral(
            session,
            campaign.campaign_id,
            referred,
            state=ReferralState.SKIPPED,
            at=now,
            skip_reason=skip.reason,
        )
        log.info("referral coupon skipped", campaign_id=campaign.campaign_id, reason=skip.reason)
        return
    await coupon_store.finish_job(session, job_id, now)
    issued = await coupon_store.coupons_where(session, coupon_store.coupons.c.job_id == job_id)
    assert len(issued) == 1
    await store.settle_referral(
        session,
        campaign.campaign_id,
        referred,
        state=ReferralState.REWARDED,
        at=now,
        coupon_id=issued[0].coupon_id,
    )
    await _rewarded(session, campaign, referral, now)


async def trigger_reward(
    session: AsyncSession,
    campaign: Campaign,
    *,
    referrer_member_id: str,
    referred_member_id: str,
    reference: str,
    now: dt.datetime,
) -> bool:
    """Records the referral and gives a coupon at once (points: later, by
    the worker). False when the referral was there already."""
    if not referrer_member_id or referrer_member_id == referred_member_id:
        return False
    if not await store.insert_referral(
        session,
        campaign,
        referrer_member_id=referrer_member_id,
        referred_member_id=referred_member_id,
        trigger_reference=reference,
        now=now,
    ):
        return False
    referral = await store.get_referral(session, campaign.campaign_id, referred_member_id)
    assert referral is not None
    if campaign.reward == RewardKind.COUPON:
        await _give_coupon(session, campaign, referral, now)
    return True


# --- the consumers --------------------------------------------------------------------


def _time(ts: object, fallback: dt.datetime) -> dt.datetime:
    seconds = getattr(ts, "seconds", 0)
    if not seconds:
        return fallback
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


class Referrals:
    """The consumers' handlers and the points pass."""

    def __init__(self, directory: ReferrerDirectory, awarder: PointsAwarder | None) -> None:
        self.directory = directory
        self.awarder = awarder

    async def on_enrolled(
        self, session: AsyncSession, event: member_events.MemberEnrolled, _e: Envelope
    ) -> None:
        referrer = event.referrer_member_id.strip()
        await store.note_member(session, event.member_id, referrer)
        if not referrer:
            return
        now = utcnow()
        at = _time(event.enroll_time, now)
        for campaign in await store.campaigns_covering(session, Trigger.ENROLL, at):
            await trigger_reward(
                session,
                campaign,
                referrer_member_id=referrer,
                referred_member_id=event.member_id,
                reference=domain.ENROLL_REFERENCE,
                now=now,
            )

    async def on_sale_recorded(
        self, session: AsyncSession, event: loyalty_events.SaleRecorded, _e: Envelope
    ) -> None:
        if not event.member_id:
            return
        known = await store.get_member(session, event.member_id)
        if known is None:
            referrer = await self.directory.referrer_of(event.member_id)
            if referrer is None:
                return
            if await store.note_member(session, event.member_id, referrer):
                # The row just written, as a read would give it back.
                known = store.KnownMember(event.member_id, referrer, "")
            else:
                # Another writer got there first: its word stays.
                known = await store.get_member(session, event.member_id)
                assert known is not None
        if not known.referrer_member_id:
            return
        now = utcnow()
        at = _time(event.stamp.time, now)
        if not await store.take_first_sale(session, event.member_id, event.sale_id, at):
            return
        for campaign in await store.campaigns_covering(session, Trigger.FIRST_PURCHASE, at):
            await trigger_reward(
                session,
                campaign,
                referrer_member_id=known.referrer_member_id,
                referred_member_id=event.member_id,
                reference=event.sale_id,
                now=now,
            )

    def subscriptions(self) -> list[Subscription]:
        return [
            Subscription(
                name="referral-enrollments",
                stream=STREAMS["members"],
                subjects=ENROLL_SUBJECTS,
                handlers={member_events.MemberEnrolled: self.on_enrolled},
            ),
            Subscription(
                name="referral-sales",
                stream=STREAMS["loyalty"],
                subjects=SALE_SUBJECTS,
                handlers={loyalty_events.SaleRecorded: self.on_sale_recorded},
            ),
        ]

    # -- points ------------------------------------------------------------

    async def award_pending_points(self, db: Database) -> int:
        """Awards the PENDING points rewards; returns how many were given.
        Without an awarder (a test's), nothing."""
        if self.awarder is None:
            return 0
        async with db.sessions() as session:
            pending = await store.pending_points(session, BATCH)
        given = 0
        for referral in pending:
            given += await self._award(db, referral)
        return given

    async def _award(self, db: Database, referral: store.Referral) -> int:
        assert self.awarder is not None
        key = domain.reward_request_id(referral.campaign_id, referral.referred_member_id)
        state, reason = ReferralState.REWARDED, ""
        try:
            await self.awarder.award(
                request_id=key,
                member_id=referral.referrer_member_id,
                points=referral.points,
                reason="referral",
                reference=key,
            )
        except RewardRefused as refused:
            state, reason = ReferralState.SKIPPED, refused.reason or SKIP_POINTS_REFUSED
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "referral points not awarded; will retry",
                campaign_id=referral.campaign_id,
                error=type(exc).__name__,
            )
            async with db.transaction() as session:
                await store.note_attempt(session, referral.campaign_id, referral.referred_member_id)
            if referral.attempts + 1 < MAX_ATTEMPTS:
                return 0
            state, reason = ReferralState.SKIPPED, SKIP_POINTS_FAILED
        now = utcnow()
        async with db.transaction() as session:
            campaign = await store.get_campaign(session, referral.campaign_id)
            assert campaign is not None
            if not await store.settle_referral(
                session,
                referral.campaign_id,
                referral.referred_member_id,
                state=state,
                at=now,
                skip_reason=reason,
            ):
                return 0
            if state == ReferralState.REWARDED:
                await _rewarded(session, campaign.campaign, referral, now)
                return 1
        return 0


class ReferralWorker:
    """Runs the points pass every ``CAMPAIGNS_REFERRAL_INTERVAL_SECONDS``."""

    def __init__(
        self, db: Database, referrals: Referrals, interval_seconds: float | None = None
    ) -> None:
        self.db = db
        self.referrals = referrals
        self.interval = interval_seconds or float(
            os.environ.get("CAMPAIGNS_REFERRAL_INTERVAL_SECONDS", DEFAULT_INTERVAL_SECONDS)
        )

    async def run(self) -> None:
        while True:
            try:
                given = await self.referrals.award_pending_points(self.db)
                if given:
                    log.info("referral points awarded", count=given)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("referral points pass failed; will retry")
            await asyncio.sleep(self.interval)
