"""The event triggers: one consumer per stream of the services notify
listens to, each handler writing a notification (which trigger, for whom,
with which values) in the consumer's transaction, and nothing else: no
call to another service, no rendering. The planner does the rest.

An event delivered twice writes one notification: the inbox drops a
redelivery, and each notification's dedup key is the event's id.

Values are written as the catalogue's kinds say (money "CNY:12550",
instants in ISO 8601 UTC); none is personal."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bus import STREAMS
from chassis.db import utcnow
from chassis.direct import Executor
from chassis.inbox import DirectSubscription, Envelope, Subscription
from chassis.telemetry import current_traceparent
from cornucopia.campaigns.v1 import events_pb2 as campaign_events
from cornucopia.cards.v1 import events_pb2 as card_events
from cornucopia.common.v1 import money_pb2
from cornucopia.loyalty.v1 import events_pb2 as loyalty_events
from cornucopia.members.v1 import events_pb2 as member_events
from services.notify.domain import triggers
from services.notify.store import intents
from services.notify.store import policy as policy_store


def instant(ts: Timestamp) -> str:
    """ISO 8601 UTC, or "" for an unset timestamp."""
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(dt.UTC).isoformat()


def money(amount: money_pb2.Money, *, unsigned: bool = False) -> str:
    units = abs(amount.minor_units) if unsigned else amount.minor_units
    return f"{amount.currency_code}:{units}"


async def notify(
    session: Executor,
    envelope: Envelope,
    trigger_name: str,
    *,
    member_id: str | None = None,
    staff_id: str | None = None,
    variables: Mapping[str, str] | None = None,
    not_before: dt.datetime | None = None,
) -> bool:
    """Writes the trigger's notification for this event, once."""
    trigger = triggers.trigger(trigger_name)
    return await intents.add_notification(
        session,
        notification_id=str(uuid.uuid4()),
        dedup_key=f"{trigger_name}:{envelope.event_id}"[:120],
        trigger=trigger_name,
        category=trigger.category,
        variables=dict(variables or {}),
        created_at=utcnow(),
        trace_headers=current_traceparent(),
        member_id=member_id,
        staff_id=staff_id,
        not_before=not_before,
        trigger_event_id=envelope.event_id or None,
    )


# --- members ----------------------------------------------------------------------


async def on_member_enrolled(
    session: AsyncSession, event: member_events.MemberEnrolled, envelope: Envelope
) -> None:
    await notify(session, envelope, triggers.WELCOME, member_id=event.member_id)


# --- cards ------------------------------------------------------------------------


async def _stored_value(
    session: Executor, trigger: str, movement: card_events.StoredValueMoved, envelope: Envelope
) -> None:
    if not movement.member_id:
        return  # an anonymous gift card: nobody to tell
    await notify(
        session,
        envelope,
        trigger,
        member_id=movement.member_id,
        variables={
            "amount": money(movement.amount, unsigned=True),
            "balance": money(movement.available_after),
            "card_id": movement.card_id,
        },
    )


async def on_recharged(
    session: Executor, event: card_events.StoredValueRecharged, envelope: Envelope
) -> None:
    await _stored_value(session, triggers.STORED_VALUE_RECHARGED, event.movement, envelope)


async def on_debited(
    session: Executor, event: card_events.StoredValueDebited, envelope: Envelope
) -> None:
    await _stored_value(session, triggers.STORED_VALUE_DEBITED, event.movement, envelope)


async def on_captured(
    session: Executor, event: card_events.StoredValueCaptured, envelope: Envelope
) -> None:
    """A checkout paid with the card: the same alert as a debit."""
    await _stored_value(session, triggers.STORED_VALUE_DEBITED, event.movement, envelope)


async def _card(
    session: Executor,
    trigger: str,
    event: card_events.CardReportedLost | card_events.CardFrozen,
    envelope: Envelope,
    time_variable: str,
) -> None:
    """A card's member told what happened to it, and when."""
    if event.member_id:
        await notify(
            session,
            envelope,
            trigger,
            member_id=event.member_id,
            variables={
                "card_id": event.card_id,
                time_variable: instant(event.stamp.time) or envelope.time,
            },
        )


async def on_reported_lost(
    session: Executor, event: card_events.CardReportedLost, envelope: Envelope
) -> None:
    await _card(session, triggers.CARD_REPORTED_LOST, event, envelope, "reported_time")


async def on_frozen(session: Executor, event: card_events.CardFrozen, envelope: Envelope) -> None:
    await _card(session, triggers.CARD_FROZEN, event, envelope, "frozen_time")


# --- loyalty ----------------------------------------------------------------------


async def on_points_expiring(
    session: AsyncSession, event: loyalty_events.PointsExpiring, envelope: Envelope
) -> None:
    """Told the policy's number of days before the points expire: an early
    warning waits (not_before) until then."""
    expires = event.expire_time.ToDatetime(dt.UTC) if event.HasField("expire_time") else None
    not_before = None
    if expires is not None:
        policy = await policy_store.load_policy(session)
        tell_at = expires - dt.timedelta(days=policy.points_expiring_days_before)
        not_before = tell_at if tell_at > utcnow() else None
    await notify(
        session,
        envelope,
        triggers.POINTS_EXPIRING,
        member_id=event.member_id,
        variables={
            "points": str(event.points),
            "expiring_total": str(event.expiring_total or event.points),
            "expire_date": instant(event.expire_time),
        },
        not_before=not_before,
    )


async def on_tier_changed(
    session: AsyncSession, event: loyalty_events.TierChanged, envelope: Envelope
) -> None:
    await notify(
        session,
        envelope,
        triggers.TIER_CHANGED,
        member_id=event.member_id,
        variables={
            "from_tier": event.from_tier_id,
            "to_tier": event.to_tier_id,
            "direction": "up" if event.upgrade else "down",
        },
    )


# --- campaigns --------------------------------------------------------------------


async def on_coupon_issued(
    session: AsyncSession, event: campaign_events.CouponIssued, envelope: Envelope
) -> None:
    if event.coupon.member_id:
        await notify(
            session,
            envelope,
            triggers.COUPON_ISSUED,
            member_id=event.coupon.member_id,
            variables={
                "coupon_id": event.coupon.coupon_id,
                "expire_date": instant(event.coupon.expire_time),
            },
        )


async def on_event_invited(
    session: AsyncSession, event: campaign_events.EventInvited, envelope: Envelope
) -> None:
    await notify(
        session,
        envelope,
        triggers.EVENT_INVITATION,
        member_id=event.member_id,
        variables={
            "event_id": event.event_id,
            "event_kind": event.kind,
            "start_time": instant(event.start_time),
            "rsvp_deadline": instant(event.rsvp_deadline),
        },
    )


async def on_task_created(
    session: AsyncSession, event: campaign_events.FollowUpTaskCreated, envelope: Envelope
) -> None:
    """To the consultant it is assigned to; an unassigned task to the
    store's managers, whom the planner looks up."""
    await notify(
        session,
        envelope,
        triggers.FOLLOWUP_TASK_CREATED,
        staff_id=event.assignee_staff_id or triggers.STORE_MANAGERS,
        variables={
            "task_id": event.task_id,
            "member_id": event.member_id,
            "store_id": event.store_id,
            "reason": event.reason,
            "due_time": instant(event.due_time),
        },
    )


def subscriptions() -> list[Subscription]:
    # The first keeps the name of the consumer notify had before it had any
    # other, so an upgrade carries on where it left off.
    return [
        Subscription(
            name="member-events",
            stream=STREAMS["members"],
            subjects=(triggers.trigger(triggers.WELCOME).subject,),
            handlers={member_events.MemberEnrolled: on_member_enrolled},
        ),
        # Every stored-value payment's alert: its handlers run chassis.direct
        # statements alone.
        DirectSubscription(
            name="card-events",
            stream=STREAMS["cards"],
            subjects=(
                triggers.trigger(triggers.STORED_VALUE_RECHARGED).subject,
                *triggers.trigger(triggers.STORED_VALUE_DEBITED).subjects,
                triggers.trigger(triggers.CARD_REPORTED_LOST).subject,
                triggers.trigger(triggers.CARD_FROZEN).subject,
            ),
            handlers={
                card_events.StoredValueRecharged: on_recharged,
                card_events.StoredValueDebited: on_debited,
                card_events.StoredValueCaptured: on_captured,
                card_events.CardReportedLost: on_reported_lost,
                card_events.CardFrozen: on_frozen,
            },
        ),
        Subscription(
            name="loyalty-events",
            stream=STREAMS["loyalty"],
            subjects=(
                triggers.trigger(triggers.POINTS_EXPIRING).subject,
                triggers.trigger(triggers.TIER_CHANGED).subject,
            ),
            handlers={
                loyalty_events.PointsExpiring: on_points_expiring,
                loyalty_events.TierChanged: on_tier_changed,
            },
        ),
        Subscription(
            name="campaign-events",
            stream=STREAMS["campaigns"],
            subjects=(
                triggers.trigger(triggers.COUPON_ISSUED).subject,
                triggers.trigger(triggers.EVENT_INVITATION).subject,
                triggers.trigger(triggers.FOLLOWUP_TASK_CREATED).subject,
            ),
            handlers={
                campaign_events.CouponIssued: on_coupon_issued,
                campaign_events.EventInvited: on_event_invited,
                campaign_events.FollowUpTaskCreated: on_task_created,
            },
        ),
    ]
