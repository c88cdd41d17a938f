"""What the members service publishes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.outbox import enqueue, outbox_rows
from cornucopia.members.v1 import events_pb2

SOURCE = "cornucopia/members"
MEMBER_ENROLLED = "members.v1.member.enrolled"
MEMBER_UPDATED = "members.v1.member.updated"
MEMBER_MERGED = "members.v1.member.merged"
MEMBER_ARCHIVED = "members.v1.member.archived"
MEMBER_REACTIVATED = "members.v1.member.reactivated"
MEMBER_ERASED = "members.v1.member.erased"
MEMBER_CONSENT_CHANGED = "members.v1.member.consent_changed"
MEMBER_CONSULTANT_CHANGED = "members.v1.member.consultant_changed"
FOLLOWUP_RECORDED = "members.v1.followup.recorded"


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def member_enrolled_message(
    *,
    member_id: str,
    home_store_id: str,
    channel: int,
    language: str,
    enrolled_at: dt.datetime,
    referrer_member_id: str = "",
) -> events_pb2.MemberEnrolled:
    return events_pb2.MemberEnrolled(
        member_id=member_id,
        home_store_id=home_store_id,
        enrollment_channel=channel,  # type: ignore[arg-type]
        preferred_language=language,
        enroll_time=timestamp(enrolled_at),
        referrer_member_id=referrer_member_id,
    )


async def member_enrolled(
    session: AsyncSession,
    *,
    member_id: str,
    home_store_id: str,
    channel: int,
    language: str,
    enrolled_at: dt.datetime,
    referrer_member_id: str = "",
) -> str:
    return await enqueue(
        session,
        source=SOURCE,
        subject=MEMBER_ENROLLED,
        message=member_enrolled_message(
            member_id=member_id,
            home_store_id=home_store_id,
            channel=channel,
            language=language,
            enrolled_at=enrolled_at,
            referrer_member_id=referrer_member_id,
        ),
    )


def member_enrolled_rows(messages: Sequence[events_pb2.MemberEnrolled]) -> list[dict[str, Any]]:
    """The outbox rows of ``member.enrolled`` events, built ahead of the
    transaction that writes them (``chassis.outbox.enqueue_rows``): imports."""
    return outbox_rows(source=SOURCE, events=[(MEMBER_ENROLLED, m) for m in messages])


# -- the organisation tree ------------------------------------------------------------

STORE_OPENED = "members.v1.store.opened"
STORE_CLOSED = "members.v1.store.closed"
STORE_REOPENED = "members.v1.store.reopened"
STAFF_LEFT = "members.v1.staff.left"


async def store_opened(
    session: AsyncSession,
    *,
    store_id: str,
    region_id: str,
    time_zone: str,
    currency_code: str,
    opened_at: dt.datetime,
) -> str:
    return await enqueue(
        session,
        source=SOURCE,
        subject=STORE_OPENED,
        message=events_pb2.StoreOpened(
            store_id=store_id,
            region_id=region_id,
            time_zone=time_zone,
            currency_code=currency_code,
            open_time=timestamp(opened_at),
        ),
    )


async def store_closed(
    session: AsyncSession, *, store_id: str, region_id: str, closed_at: dt.datetime
) -> str:
    return await enqueue(
        session,
        source=SOURCE,
        subject=STORE_CLOSED,
        message=events_pb2.StoreClosed(
            store_id=store_id, region_id=region_id, close_time=timestamp(closed_at)
        ),
    )


async def store_reopened(
    session: AsyncSession,
    *,
    store_id: str,
    region_id: str,
    time_zone: str,
    currency_code: str,
    reopened_at: dt.datetime,
) -> str:
    return await enqueue(
        session,
        source=SOURCE,
        subject=STORE_REOPENED,
        message=events_pb2.StoreReopened(
            store_id=store_id,
            region_id=region_id,
            time_zone=time_zone,
            currency_code=currency_code,
            reopen_time=timestamp(reopened_at),
        ),
    )


async def staff_left(
    session: AsyncSession, *, staff_id: str, assignment: str, left_at: dt.datetime
) -> str:
    return await enqueue(
        session,
        source=SOURCE,
        subject=STAFF_LEFT,
        message=events_pb2.StaffLeft(
            staff_id=staff_id, assignment=assignment, leave_time=timestamp(left_at)
        ),
    )


# --- The member file's events (issue 3). None carries a personal value. ---


async def publish(session: AsyncSession, subject: str, message: Message) -> str:
    return await enqueue(session, source=SOURCE, subject=subject, message=message)


async def member_updated(
    session: AsyncSession, *, member_id: str, fields: list[str], at: dt.datetime
) -> str:
    return await publish(
        session,
        MEMBER_UPDATED,
        events_pb2.MemberUpdated(member_id=member_id, fields=fields, update_time=timestamp(at)),
    )


async def member_merged(
    session: AsyncSession, *, survivor_id: str, duplicate_id: str, at: dt.datetime
) -> str:
    return await publish(
        session,
        MEMBER_MERGED,
        events_pb2.MemberMerged(
            survivor_member_id=survivor_id,
            duplicate_member_id=duplicate_id,
            merge_time=timestamp(at),
        ),
    )


async def member_archived(session: AsyncSession, *, member_id: str, at: dt.datetime) -> str:
    return await publish(
        session,
        MEMBER_ARCHIVED,
        events_pb2.MemberArchived(member_id=member_id, archive_time=timestamp(at)),
    )


async def member_reactivated(session: AsyncSession, *, member_id: str, at: dt.datetime) -> str:
    return await publish(
        session,
        MEMBER_REACTIVATED,
        events_pb2.MemberReactivated(member_id=member_id, reactivate_time=timestamp(at)),
    )


async def member_erased(session: AsyncSession, *, member_id: str, at: dt.datetime) -> str:
    return await publish(
        session,
        MEMBER_ERASED,
        events_pb2.MemberErased(member_id=member_id, erase_time=timestamp(at)),
    )


async def consent_changed(
    session: AsyncSession, *, member_id: str, channel: int, granted: bool, at: dt.datetime
) -> str:
    return await publish(
        session,
        MEMBER_CONSENT_CHANGED,
        events_pb2.MemberConsentChanged(
            member_id=member_id,
            channel=channel,  # type: ignore[arg-type]
            granted=granted,
            change_time=timestamp(at),
        ),
    )


async def consultant_changed(
    session: AsyncSession, *, member_id: str, from_id: str, to_id: str, at: dt.datetime
) -> str:
    return await publish(
        session,
        MEMBER_CONSULTANT_CHANGED,
        events_pb2.MemberConsultantChanged(
            member_id=member_id,
            from_consultant_id=from_id,
            to_consultant_id=to_id,
            change_time=timestamp(at),
        ),
    )


async def follow_up_recorded(session: AsyncSession, *, message: events_pb2.FollowUpRecorded) -> str:
    return await publish(session, FOLLOWUP_RECORDED, message)
