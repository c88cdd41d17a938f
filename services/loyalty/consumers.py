"""What the loyalty service consumes of members' events: whether a member
exists and is active (points are adjusted, transferred and redeemed only
for a member it knows), and the merges and erasures that move or forfeit
points. Each handler runs in the inbox's transaction, so a redelivery
changes nothing."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bus import STREAMS
from chassis.db import utcnow
from chassis.inbox import Envelope, Subscription
from cornucopia.members.v1 import events_pb2 as member_events
from services.loyalty import points_ledger
from services.loyalty.domain.points import Stamp
from services.loyalty.store import members
from services.loyalty.store.members import MemberStatus

MEMBER_SUBJECTS = (
    "members.v1.member.enrolled",
    "members.v1.member.archived",
    "members.v1.member.reactivated",
    "members.v1.member.merged",
    "members.v1.member.erased",
)


def _at(ts: Timestamp) -> dt.datetime:
    return ts.ToDatetime(dt.UTC) if ts.seconds or ts.nanos else utcnow()


def _stamp(at: dt.datetime) -> Stamp:
    return Stamp(points_ledger.SYSTEM_PRINCIPAL, "", at)


async def on_enrolled(
    session: AsyncSession, event: member_events.MemberEnrolled, _envelope: Envelope
) -> None:
    await members.note_member(session, event.member_id, MemberStatus.ACTIVE, _at(event.enroll_time))


async def on_archived(
    session: AsyncSession, event: member_events.MemberArchived, _envelope: Envelope
) -> None:
    await members.note_member(
        session, event.member_id, MemberStatus.ARCHIVED, _at(event.archive_time)
    )


async def on_reactivated(
    session: AsyncSession, event: member_events.MemberReactivated, _envelope: Envelope
) -> None:
    await members.note_member(
        session, event.member_id, MemberStatus.ACTIVE, _at(event.reactivate_time)
    )


async def on_merged(
    session: AsyncSession, event: member_events.MemberMerged, _envelope: Envelope
) -> None:
    """The duplicate's points follow the survivor: its open lots as they
    are (expiry included), its balance and lifetime earnings; its holds are
    released and its account closed."""
    at = _at(event.merge_time)
    duplicate, survivor = event.duplicate_member_id, event.survivor_member_id
    await members.note_member(session, duplicate, MemberStatus.MERGED, at, merged_into=survivor)
    if await members.get_member(session, survivor) is None:
        # The survivor's enrollment has not arrived yet; a merge names a
        # member that exists.
        await members.note_member(session, survivor, MemberStatus.ACTIVE, at)
    await points_ledger.merge(session, duplicate, survivor, _stamp(at))


async def on_erased(
    session: AsyncSession, event: member_events.MemberErased, _envelope: Envelope
) -> None:
    """An erased member's points are forfeited and the account closed."""
    at = _at(event.erase_time)
    await members.note_member(session, event.member_id, MemberStatus.ERASED, at)
    await points_ledger.forfeit(session, event.member_id, _stamp(at), "member erased")


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
            },
        )
    ]
