"""Writing tiers: what the tier rules decided, in the caller's unit of work,
with the member's tier, the history and the ``loyalty.v1.tier.changed``
event together.

The checkout calls ``tier_of`` (for pricing and earning), ``after_sale``
and ``after_refund`` inside its own transaction. Every change of one
member's tier first locks the member's row, so a member's sales, refunds
and reviews happen one at a time (on PostgreSQL; SQLite serialises all
writers). A sale counts once per sale id, a refund once per refund id.

Reviews run at the end of each period: the worker here (on every replica)
claims each period once in ``tier_reviews`` and reviews members in
batches, each batch its own transaction that also moves the review's
cursor, so a review cut short is resumed where it stopped (by any worker,
a restarted one included, once the claim's lease ran out) and no member is
reviewed twice. Grace periods that ended are dealt with
on every pass.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, utcnow
from chassis.direct import Executor
from chassis.errors import Aborted, FailedPrecondition, Violations
from chassis.logs import get_logger
from chassis.spreadsheets import amount_value
from cornucopia.common.v1 import org_pb2
from cornucopia.loyalty.v1 import events_pb2
from services.loyalty import events
from services.loyalty.domain.tiers import (
    Action,
    HistoryKind,
    Ladder,
    MemberTier,
    Period,
    ReviewDecision,
    Standing,
    Tier,
    TierProgress,
    TierStamp,
    decide_after_sale,
    decide_at_grace_end,
    decide_at_review,
    last_ended_period,
    member_tier,
    progress,
)
from services.loyalty.store import tiers as store
from services.loyalty.store.tiers import REFUND, SALE, Activity, MemberTierRecord

log = get_logger(__name__)

SYSTEM_PRINCIPAL = "loyalty-tier-review"
MAX_ID_LENGTH = 64
MAX_SPEND = 10**12
BATCH = 200
# How long a claim on a period's review holds without progress before
# another replica may take the review over.
LEASE = dt.timedelta(minutes=5)
DEFAULT_INTERVAL_SECONDS = 300.0

__all__ = [
    "MemberTier",
    "TierProgress",
    "TierStamp",
    "after_refund",
    "after_sale",
    "tier_of",
]


def _check(member_id: str, spend_minor_units: int, **ids: str) -> None:
    v = Violations()
    for name, value in {"member_id": member_id, **ids}.items():
        if not value.strip() or len(value) > MAX_ID_LENGTH:
            v.add(name, f"required, at most {MAX_ID_LENGTH} characters")
    if not 0 <= spend_minor_units <= MAX_SPEND:
        v.add("spend_minor_units", f"0 to {MAX_SPEND}")
    v.raise_if_any()


def _timestamp(at: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


def _spend_text(ladder: Ladder, standing: Standing) -> str:
    return (
        f"{amount_value(standing.spend, ladder.currency)} {ladder.currency} and "
        f"{standing.visits} visits in {ladder.window_days} days"
    )


async def _ladder(session: Executor) -> Ladder:
    return (await store.current_ladder(session)).ladder


# --- reading -------------------------------------------------------------------------------


async def tier_of(session: AsyncSession, member_id: str) -> MemberTier:
    """The member's tier and its benefits (for pricing and earning); the
    lowest tier for a member not seen yet."""
    return await tier_of_record(session, await store.get_member(session, member_id))


async def tier_of_record(session: Executor, record: MemberTierRecord | None) -> MemberTier:
    """``tier_of`` for the member's tier row as read (None: not seen yet)."""
    ladder = await _ladder(session)
    if record is None:
        return member_tier(ladder.lowest, None)
    return member_tier(ladder.tier_or_lowest(record.tier_id), record.since)


@dataclass(frozen=True)
class MemberStatus:
    """What GetMemberTier shows."""

    ladder: Ladder
    tier: Tier
    record: MemberTierRecord | None
    progress: TierProgress


async def status_of(session: AsyncSession, member_id: str, at: dt.datetime) -> MemberStatus:
    """The member's tier and progress over the window up to ``at``'s day."""
    ladder = await _ladder(session)
    record = await store.get_member(session, member_id)
    tier = ladder.tier_or_lowest(record.tier_id) if record else ladder.lowest
    standing = await store.standing(session, member_id, *ladder.window(ladder.local_day(at)))
    since = record.since if record else None
    return MemberStatus(ladder, tier, record, progress(ladder, tier, since, standing))


# --- changes -----------------------------------------------------------------------------


async def _changed(
    session: Executor,
    member_id: str,
    from_tier: Tier,
    to_tier: Tier,
    *,
    reason: str,
    stamp: TierStamp,
    sale_id: str = "",
    period: str = "",
) -> None:
    upgrade = to_tier.rank > from_tier.rank
    await store.update_member(
        session, member_id, now=stamp.at, tier_id=to_tier.tier_id, since=stamp.at, grace_until=None
    )
    await store.add_history(
        session,
        member_id,
        HistoryKind.UPGRADED if upgrade else HistoryKind.DOWNGRADED,
        from_tier_id=from_tier.tier_id,
        to_tier_id=to_tier.tier_id,
        reason=reason,
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
        sale_id=sale_id,
        period=period,
    )
    await events.publish(
        session,
        events.TIER_CHANGED,
        events_pb2.TierChanged(
            member_id=member_id,
            from_tier_id=from_tier.tier_id,
            to_tier_id=to_tier.tier_id,
            upgrade=upgrade,
            reason=reason,
            stamp=org_pb2.AuditStamp(
                principal=stamp.principal, store_id=stamp.store_id, time=_timestamp(stamp.at)
            ),
        ),
    )


async def _left_grace(
    session: Executor,
    member_id: str,
    tier: Tier,
    *,
    reason: str,
    stamp: TierStamp,
    period: str = "",
) -> None:
    await store.update_member(session, member_id, now=stamp.at, grace_until=None)
    await store.add_history(
        session,
        member_id,
        HistoryKind.GRACE_ENDED,
        from_tier_id=tier.tier_id,
        to_tier_id=tier.tier_id,
        reason=reason,
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
        period=period,
    )


async def after_sale(
    session: Executor,
    member_id: str,
    *,
    sale_id: str,
    spend_minor_units: int,
    business_day: dt.date,
    stamp: TierStamp,
    unseen_sale: bool = False,
) -> TierProgress:
    """Records a sale's qualifying spend (money actually paid, without the
    part paid with points, in the ladder's currency) on its business day,
    and moves the member up at once to the highest tier now qualified
    (history and ``loyalty.v1.tier.changed``). The same sale again changes
    nothing and returns the same progress.

    ``unseen_sale``: the caller knows the sale was not counted before (the
    checkout's commit, which holds its log's row and records the sale and
    COMMITTED in one transaction), so that is not read; the activity's
    primary key stays the backstop."""
    _check(member_id, spend_minor_units, sale_id=sale_id)
    ladder = await _ladder(session)
    member = await store.locked_member(session, member_id, ladder.lowest.tier_id, stamp.at)
    current = ladder.tier_or_lowest(member.tier_id)
    done = None if unseen_sale else await store.get_activity(session, SALE, sale_id)
    if done is not None:
        if done.member_id != member_id:
            raise FailedPrecondition(
                "this sale counted for another member",
                reason="SALE_OF_ANOTHER_MEMBER",
                metadata={"sale_id": sale_id},
            )
        upgrade = await store.upgrade_by_sale(session, sale_id)
        standing = await store.standing(session, member_id, *ladder.window(done.business_day))
        changed_from = upgrade.from_tier_id if upgrade else ""
        return progress(ladder, current, member.since, standing, changed_from)

    first_day, last_day = ladder.window(business_day)
    standing = await store.insert_activity_with_standing(
        session,
        Activity(SALE, sale_id, sale_id, member_id, business_day, spend_minor_units),
        stamp.at,
        first_day=first_day,
        last_day=last_day,
    )
    decision = decide_after_sale(ladder, current, member.grace_until is not None, standing)
    if decision.upgrade_to is not None:
        await _changed(
            session,
            member_id,
            current,
            decision.upgrade_to,
            reason=f"sale {sale_id}: {_spend_text(ladder, standing)}",
            stamp=stamp,
            sale_id=sale_id,
        )
        return progress(ladder, decision.upgrade_to, stamp.at, standing, current.tier_id)
    if decision.leave_grace:
        await _left_grace(
            session,
            member_id,
            current,
            reason=f"sale {sale_id}: qualifies again with {_spend_text(ladder, standing)}",
            stamp=stamp,
        )
    return progress(ladder, current, member.since, standing)


async def after_refund(
    session: AsyncSession,
    member_id: str,
    *,
    sale_id: str,
    refund_id: str,
    spend_minor_units: int,
    business_day: dt.date,
    stamp: TierStamp,
) -> None:
    """Takes back the spend a refund gave back (money, not the part paid
    with points; its sign does not matter: a refund always takes spend
    back), on the business day of its sale, at most what the sale counted
    (a sale the tiers never saw counted nothing, so its refunds take
    nothing; ``business_day`` is then where the zero is recorded). Never
    moves the member down by itself: that is the review's job. The same
    refund again changes nothing."""
    spend_minor_units = abs(spend_minor_units)
    _check(member_id, spend_minor_units, sale_id=sale_id, refund_id=refund_id)
    ladder = await _ladder(session)
    await store.locked_member(session, member_id, ladder.lowest.tier_id, stamp.at)
    if await store.get_activity(session, REFUND, refund_id) is not None:
        return
    sale = await store.get_activity(session, SALE, sale_id)
    taken, day = 0, business_day
    if sale is not None:
        if sale.member_id != member_id:
            raise FailedPrecondition(
                "this sale counted for another member",
                reason="SALE_OF_ANOTHER_MEMBER",
                metadata={"sale_id": sale_id},
            )
        left = sale.spend_minor_units - await store.refunded_of_sale(session, sale_id)
        taken, day = min(spend_minor_units, max(0, left)), sale.business_day
    await store.insert_activity(
        session,
        Activity(REFUND, refund_id, sale_id, member_id, day, -taken),
        stamp.at,
    )


# --- reviews -----------------------------------------------------------------------------


@dataclass
class ReviewCounts:
    members_reviewed: int = 0
    entered_grace: int = 0
    left_grace: int = 0
    downgraded: int = 0
    graces_ended: int = 0

    def add(self, other: ReviewCounts) -> None:
        self.members_reviewed += other.members_reviewed
        self.entered_grace += other.entered_grace
        self.left_grace += other.left_grace
        self.downgraded += other.downgraded
        self.graces_ended += other.graces_ended


@dataclass(frozen=True)
class ReviewOutcome:
    period: Period
    # The period had been reviewed before: its counts are not in ``counts``.
    already_reviewed: bool
    counts: ReviewCounts


def review_in_progress(period: str) -> Aborted:
    return Aborted(
        "a review of this period is running elsewhere; try again later",
        reason="REVIEW_IN_PROGRESS",
        metadata={"period": period},
    )


async def _apply(
    session: AsyncSession,
    ladder: Ladder,
    member: MemberTierRecord,
    decision: ReviewDecision,
    *,
    standing: Standing,
    stamp: TierStamp,
    period: str,
    counts: ReviewCounts,
) -> None:
    current = ladder.tier_or_lowest(member.tier_id)
    activity = _spend_text(ladder, standing)
    label = f"review {period}" if period else "grace ended"
    if decision.action == Action.ENTER_GRACE:
        assert decision.grace_until is not None
        counts.entered_grace += 1
        await store.update_member(
            session, member.member_id, now=stamp.at, grace_until=decision.grace_until
        )
        await store.add_history(
            session,
            member.member_id,
            HistoryKind.GRACE_STARTED,
            from_tier_id=current.tier_id,
            to_tier_id=ladder.qualified(standing).tier_id,
            reason=f"{label}: {activity} no longer qualify for {current.name}",
            principal=stamp.principal,
            store_id=stamp.store_id,
            at=stamp.at,
            period=period,
            grace_until=decision.grace_until,
        )
    elif decision.action == Action.LEAVE_GRACE:
        counts.left_grace += 1
        await _left_grace(
            session,
            member.member_id,
            current,
            reason=f"{label}: qualifies again with {activity}",
            stamp=stamp,
            period=period,
        )
    elif decision.action == Action.DOWNGRADE:
        assert decision.to_tier is not None
        counts.downgraded += 1
        await _changed(
            session,
            member.member_id,
            current,
            decision.to_tier,
            reason=f"{label}: {activity} after the grace period",
            stamp=stamp,
            period=period,
        )


async def _claim(
    db: Database, period: Period, as_of: dt.datetime, stamp: TierStamp, worker_id: str
) -> str:
    """'new' or 'resume' when this worker is to review the period; 'done'
    when it was reviewed; 'busy' when another is reviewing it now."""
    async with db.transaction() as session:
        now = utcnow()
        if await store.start_review(
            session,
            period.key,
            period_end=period.end,
            as_of=as_of,
            claimed_by=worker_id,
            lease_until=now + LEASE,
            requested_by=stamp.principal,
            now=now,
        ):
            return "new"
        review = await store.get_review(session, period.key, for_update=True)
        assert review is not None  # the insert found it
        if review.state == store.DONE:
            return "done"
        if review.claimed_by != worker_id and review.lease_until > now:
            return "busy"
        await store.update_review(
            session, period.key, claimed_by=worker_id, lease_until=now + LEASE
        )
        return "resume"


async def _review_batch(
    db: Database, period: Period, stamp: TierStamp, worker_id: str, counts: ReviewCounts
) -> bool:
    """Reviews the next members; True when the review is done."""
    async with db.transaction() as session:
        review = await store.get_review(session, period.key, for_update=True)
        if review is None or review.state == store.DONE:
            return True
        if review.claimed_by != worker_id:
            raise review_in_progress(period.key)
        ladder = await _ladder(session)
        members = await store.members_to_review(
            session, after=review.cursor, lowest_tier_id=ladder.lowest.tier_id, limit=BATCH
        )
        standings = await store.standings(
            session, [m.member_id for m in members], *ladder.window(period.last_day)
        )
        batch = ReviewCounts(members_reviewed=len(members))
        at = TierStamp(stamp.principal, stamp.store_id, review.as_of)
        for member in members:
            standing = standings[member.member_id]
            decision = decide_at_review(
                ladder,
                ladder.tier_or_lowest(member.tier_id),
                member.grace_until,
                standing,
                period=period,
                at=review.as_of,
            )
            await _apply(
                session,
                ladder,
                member,
                decision,
                standing=standing,
                stamp=at,
                period=period.key,
                counts=batch,
            )
        finished = len(members) < BATCH
        now = utcnow()
        await store.update_review(
            session,
            period.key,
            cursor=members[-1].member_id if members else review.cursor,
            members_reviewed=review.members_reviewed + batch.members_reviewed,
            entered_grace=review.entered_grace + batch.entered_grace,
            left_grace=review.left_grace + batch.left_grace,
            downgraded=review.downgraded + batch.downgraded,
            lease_until=now + LEASE,
            **({"state": store.DONE, "finished_at": now} if finished else {}),
        )
    counts.add(batch)
    return finished


async def review_period(
    db: Database, as_of: dt.datetime, stamp: TierStamp, *, worker_id: str
) -> ReviewOutcome:
    """Reviews the last period that ended at or before ``as_of``, unless
    it was reviewed already. Aborted (REVIEW_IN_PROGRESS) when another
    worker is reviewing it now."""
    async with db.sessions() as session:
        ladder = await _ladder(session)
    period = last_ended_period(ladder, as_of)
    claim = await _claim(db, period, as_of, stamp, worker_id)
    counts = ReviewCounts()
    if claim == "done":
        return ReviewOutcome(period, True, counts)
    if claim == "busy":
        raise review_in_progress(period.key)
    while not await _review_batch(db, period, stamp, worker_id, counts):
        pass
    return ReviewOutcome(period, False, counts)


async def end_graces(db: Database, at: dt.datetime, stamp: TierStamp) -> ReviewCounts:
    """Members whose grace period ended by ``at``: down to the highest tier
    they qualify for over the window up to ``at``'s day, or out of grace
    when they qualify for their tier again."""
    counts = ReviewCounts()
    moment = TierStamp(stamp.principal, stamp.store_id, at)
    while True:
        async with db.transaction() as session:
            ladder = await _ladder(session)
            due = await store.graces_due(session, at, BATCH)
            standings = await store.standings(
                session, [m.member_id for m in due], *ladder.window(ladder.local_day(at))
            )
            for member in due:
                standing = standings[member.member_id]
                decision = decide_at_grace_end(
                    ladder, ladder.tier_or_lowest(member.tier_id), standing
                )
                await _apply(
                    session,
                    ladder,
                    member,
                    decision,
                    standing=standing,
                    stamp=moment,
                    period="",
                    counts=counts,
                )
        counts.graces_ended += len(due)
        if len(due) < BATCH:
            return counts


async def run_review(
    db: Database, as_of: dt.datetime, stamp: TierStamp, *, worker_id: str
) -> ReviewOutcome:
    """The review of the last period ended by ``as_of`` (if not done yet),
    then the grace periods due by then."""
    outcome = await review_period(db, as_of, stamp, worker_id=worker_id)
    outcome.counts.add(await end_graces(db, as_of, stamp))
    return outcome


class TierReviewWorker:
    """Runs each period's review once it has ended, and ends grace periods
    as they fall due; checks every LOYALTY_TIER_REVIEW_INTERVAL_SECONDS."""

    def __init__(self, db: Database, interval_seconds: float | None = None) -> None:
        self.db = db
        self.interval = interval_seconds or float(
            os.environ.get("LOYALTY_TIER_REVIEW_INTERVAL_SECONDS", DEFAULT_INTERVAL_SECONDS)
        )
        # Claims are per process: a restarted worker takes its own
        # unfinished review over once the lease has run out.
        self.worker_id = f"worker-{uuid.uuid4()}"

    async def run_once(self, now: dt.datetime | None = None) -> ReviewOutcome:
        at = now or utcnow()
        return await run_review(
            self.db, at, TierStamp(SYSTEM_PRINCIPAL, "", at), worker_id=self.worker_id
        )

    async def run(self) -> None:
        while True:
            try:
                outcome = await self.run_once()
                counts = outcome.counts
                if counts.downgraded or counts.entered_grace or counts.left_grace:
                    log.info(
                        "tier review",
                        period=outcome.period.key,
                        entered_grace=counts.entered_grace,
                        left_grace=counts.left_grace,
                        downgraded=counts.downgraded,
                    )
            except asyncio.CancelledError:
                raise
            except Aborted:
                pass  # another replica is reviewing; its work is as good
            except Exception:
                log.exception("tier review pass failed; will retry")
            await asyncio.sleep(self.interval)
