"""Member tables and queries. Each function runs inside the caller's unit of
work (chassis.db.Database.transaction) so state and outbox rows commit
together."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime, is_unique_violation
from services.members.domain import Birthday, EnrollmentChannel, Gender, NewMember

metadata = sa.MetaData()

members = sa.Table(
    "members",
    metadata,
    sa.Column("member_id", sa.String(16), primary_key=True),
    sa.Column("home_store_id", sa.String(32), nullable=False, index=True),
    sa.Column("given_name", sa.String(100), nullable=False),
    sa.Column("family_name", sa.String(100), nullable=False, server_default=""),
    sa.Column("mobile", sa.String(20), nullable=False, unique=True),
    sa.Column("email", sa.String(254), nullable=False, server_default=""),
    sa.Column("gender", sa.String(10), nullable=False, server_default=""),
    sa.Column("birth_year", sa.SmallInteger, nullable=True),
    sa.Column("birth_month", sa.SmallInteger, nullable=True),
    sa.Column("birth_day", sa.SmallInteger, nullable=True),
    sa.Column("enrollment_channel", sa.String(20), nullable=False),
    sa.Column("preferred_language", sa.String(10), nullable=False),
    sa.Column("enrolled_by", sa.String(100), nullable=False),
    sa.Column("enrolled_from_store", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)


@dataclass(frozen=True)
class MemberRecord:
    member_id: str
    home_store_id: str
    given_name: str
    family_name: str
    mobile: str
    email: str
    gender: Gender
    birthday: Birthday | None
    enrollment_channel: EnrollmentChannel
    preferred_language: str
    enrolled_by: str
    enrolled_from_store: str
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int


class MobileTaken(Exception):
    """Another member already has this mobile number."""


def _record(row: sa.Row[tuple[object, ...]]) -> MemberRecord:
    m = row._mapping
    birthday = (
        Birthday(m["birth_year"] or 0, m["birth_month"], m["birth_day"])
        if m["birth_month"]
        else None
    )
    return MemberRecord(
        member_id=m["member_id"],
        home_store_id=m["home_store_id"],
        given_name=m["given_name"],
        family_name=m["family_name"],
        mobile=m["mobile"],
        email=m["email"],
        gender=Gender(m["gender"]),
        birthday=birthday,
        enrollment_channel=EnrollmentChannel(m["enrollment_channel"]),
        preferred_language=m["preferred_language"],
        enrolled_by=m["enrolled_by"],
        enrolled_from_store=m["enrolled_from_store"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        version=m["version"],
    )


async def insert_member(
    session: AsyncSession,
    member_id: str,
    member: NewMember,
    *,
    principal: str,
    from_store: str,
    now: dt.datetime,
) -> MemberRecord:
    """Insert a new member; ``MobileTaken`` when the mobile is in use (the
    unique constraint decides, so two concurrent enrollments of the same
    mobile cannot both win)."""
    values = {
        "member_id": member_id,
        "home_store_id": member.home_store_id,
        "given_name": member.given_name,
        "family_name": member.family_name,
        "mobile": member.mobile,
        "email": member.email,
        "gender": member.gender.value,
        "birth_year": member.birthday.year or None if member.birthday else None,
        "birth_month": member.birthday.month if member.birthday else None,
        "birth_day": member.birthday.day if member.birthday else None,
        "enrollment_channel": member.enrollment_channel.value,
        "preferred_language": member.preferred_language,
        "enrolled_by": principal,
        "enrolled_from_store": from_store,
        "created_at": now,
        "updated_at": now,
        "version": 1,
    }
    if await member_id_by_mobile(session, member.mobile) is not None:
        raise MobileTaken
    try:
        async with session.begin_nested():
            await session.execute(sa.insert(members).values(**values))
    except IntegrityError as exc:
        if is_unique_violation(exc) and "mobile" in str(exc.orig).lower():
            raise MobileTaken from exc
        raise
    row = (await session.execute(sa.select(members).where(members.c.member_id == member_id))).one()
    return _record(row)


async def get_member(session: AsyncSession, member_id: str) -> MemberRecord | None:
    row = (
        await session.execute(sa.select(members).where(members.c.member_id == member_id))
    ).first()
    return None if row is None else _record(row)


async def member_id_by_mobile(session: AsyncSession, mobile: str) -> str | None:
    result = await session.execute(sa.select(members.c.member_id).where(members.c.mobile == mobile))
    return result.scalar_one_or_none()
