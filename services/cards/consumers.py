"""What the cards service consumes: members' lifecycle events (to know a
member exists and is active when a card is issued, and to move or cancel
cards when a member is merged or erased) and the stores' regions (for the
scope of region managers). Each handler runs in the inbox's transaction."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bus import STREAMS
from chassis.db import utcnow
from chassis.inbox import Envelope, Subscription
from cornucopia.members.v1 import events_pb2 as member_events
from services.cards import lifecycle
from services.cards.domain.cards import LIVE_STATES, Action
from services.cards.store import cards as store
from services.cards.store import projections
from services.cards.store.cards import Stamp
from services.cards.store.projections import MemberStatus

# Who the history names for what the service does on its own.
SYSTEM_PRINCIPAL = "cards"
MEMBER_SUBJECTS = (
    "members.v1.member.enrolled",
    "members.v1.member.archived",
    "members.v1.member.reactivated",
    "members.v1.member.merged",
    "members.v1.member.erased",
    "members.v1.store.opened",
    "members.v1.store.reopened",
)


def _at(ts: Timestamp) -> dt.datetime:
    return ts.ToDatetime(dt.UTC) if ts.seconds or ts.nanos else utcnow()


async def on_enrolled(
    session: AsyncSession, event: member_events.MemberEnrolled, _envelope: Envelope
) -> None:
    await projections.note_member(
        session, event.member_id, MemberStatus.ACTIVE, _at(event.enroll_time)
    )


async def on_archived(
    session: AsyncSession, event: member_events.MemberArchived, _envelope: Envelope
) -> None:
    await projections.note_member(
        session, event.member_id, MemberStatus.ARCHIVED, _at(event.archive_time)
    )


async def on_reactivated(
    session: AsyncSession, event: member_events.MemberReactivated, _envelope: Envelope
) -> None:
    await projections.note_member(
        session, event.member_id, MemberStatus.ACTIVE, _at(event.reactivate_time)
    )


async def on_merged(
    session: AsyncSession, event: member_events.MemberMerged, _envelope: Envelope
) -> None:
    """The duplicate's cards follow the survivor, with their state, number
    and account; each card's history says so."""
    at = _at(event.merge_time)
    duplicate, survivor = event.duplicate_member_id, event.survivor_member_id
    await projections.note_member(session, duplicate, MemberStatus.MERGED, at, merged_into=survivor)
    stamp = Stamp(SYSTEM_PRINCIPAL, "", at)
    for card in await store.all_cards_of_member(session, duplicate):
        await store.record_history(
            session,
            card,
            Action.CHANGE_HOLDER,
            stamp,
            reason=f"member {duplicate} merged into {survivor}",
        )
    await store.change_holder(session, duplicate, survivor)


async def on_erased(
    session: AsyncSession, event: member_events.MemberErased, _envelope: Envelope
) -> None:
    """An erased member's cards stop working for good."""
    at = _at(event.erase_time)
    await projections.note_member(session, event.member_id, MemberStatus.ERASED, at)
    stamp = Stamp(SYSTEM_PRINCIPAL, "", at)
    for card in await store.live_cards_of_member(session, event.member_id):
        # A supplementary card cancelled with its principal earlier in
        # this loop is no longer live.
        current = await store.get_card(session, card.card_id, for_update=True)
        if current is not None and current.state in LIVE_STATES:
            await lifecycle.cancel(session, current, stamp, "member erased", member_erased=True)


async def on_store_opened(
    session: AsyncSession, event: member_events.StoreOpened, _envelope: Envelope
) -> None:
    await projections.note_store(session, event.store_id, event.region_id)


async def on_store_reopened(
    session: AsyncSession, event: member_events.StoreReopened, _envelope: Envelope
) -> None:
    await projections.note_store(session, event.store_id, event.region_id)


def subscriptions() -> list[Subscription]:
    return [
        Subscription(
            name="member-events",
            stream=STREAMS["members"],
            subjects=MEMBER_SUBJECTS,
            handlers={
                member_events.MemberEnrolled: on_enrolled,
                member_events.MemberArchived: on_archived,
                member_events.MemberReactivated: on_reactivated,
                member_events.MemberMerged: on_merged,
                member_events.MemberErased: on_erased,
                member_events.StoreOpened: on_store_opened,
                member_events.StoreReopened: on_store_reopened,
            },
        )
    ]
