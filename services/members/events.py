"""What the members service publishes."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.outbox import enqueue
from cornucopia.members.v1 import events_pb2

SOURCE = "cornucopia/members"
MEMBER_ENROLLED = "members.v1.member.enrolled"


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


async def member_enrolled(
    session: AsyncSession,
    *,
    member_id: str,
    home_store_id: str,
    channel: int,
    language: str,
    enrolled_at: dt.datetime,
) -> str:
    return await enqueue(
        session,
        source=SOURCE,
        subject=MEMBER_ENROLLED,
        message=events_pb2.MemberEnrolled(
            member_id=member_id,
            home_store_id=home_store_id,
            enrollment_channel=channel,  # type: ignore[arg-type]
            preferred_language=language,
            enroll_time=timestamp(enrolled_at),
        ),
    )
