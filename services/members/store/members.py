"""Member tables and queries. Each function runs inside the caller's unit of
work (chassis.db.Database.transaction) so state and outbox rows commit
together.

Personal fields (names, mobile, e-mail, birthday) are stored only encrypted,
each member under a data key of their own (``member_keys``), wrapped by the
service's master key. Mobile and e-mail are found through blind indexes.
Deleting a member's key row makes everything personal about them unreadable.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.crypto import BlindIndex, DecryptionError, FieldCipher, KeyRing, WrappedKey
from chassis.db import UTCDateTime, is_unique_violation
from services.members.domain.members import Birthday, EnrollmentChannel, Gender, NewMember
from services.members.store import metadata

member_keys = sa.Table(
    "member_keys",
    metadata,
    sa.Column("member_id", sa.String(16), primary_key=True),
    sa.Column("master_key_id", sa.String(64), nullable=False),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
)

members = sa.Table(
    "members",
    metadata,
    sa.Column("member_id", sa.String(16), primary_key=True),
    sa.Column("home_store_id", sa.String(32), nullable=False, index=True),
    sa.Column("given_name_enc", sa.LargeBinary, nullable=False),
    sa.Column("family_name_enc", sa.LargeBinary, nullable=True),
    sa.Column("mobile_enc", sa.LargeBinary, nullable=False),
    sa.Column("mobile_index", sa.String(64), nullable=False, unique=True),
    sa.Column("email_enc", sa.LargeBinary, nullable=True),
    sa.Column("email_index", sa.String(64), nullable=True, index=True),
    sa.Column("birthday_enc", sa.LargeBinary, nullable=True),
    # The month alone identifies no one and drives birthday campaigns.
    sa.Column("birth_month", sa.SmallInteger, nullable=True),
    sa.Column("gender", sa.String(10), nullable=False, server_default=""),
    sa.Column("enrollment_channel", sa.String(20), nullable=False),
    sa.Column("preferred_language", sa.String(10), nullable=False),
    sa.Column("enrolled_by", sa.String(100), nullable=False),
    sa.Column("enrolled_from_store", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)


@dataclass(frozen=True)
class Keys:
    """The service's keys: the master key ring and the blind index."""

    ring: KeyRing
    index: BlindIndex

    def mobile_index(self, mobile: str) -> str:
        return self.index.digest("mobile", mobile)

    def email_index(self, email: str) -> str:
        return self.index.digest("email", email.lower())


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
    # False once the member's data key is gone: the personal fields above
    # are then empty, and nothing can bring them back.
    readable: bool = True


class MobileTaken(Exception):
    """Another member already has this mobile number."""


def _birthday_text(birthday: Birthday) -> str:
    return f"{birthday.year:04d}-{birthday.month:02d}-{birthday.day:02d}"


def _birthday(text: str) -> Birthday:
    year, month, day = (int(part) for part in text.split("-"))
    return Birthday(year, month, day)


def _record(row: sa.Row[tuple[object, ...]], cipher: FieldCipher | None) -> MemberRecord:
    m = row._mapping

    def field(name: str) -> str:
        sealed = m[f"{name}_enc"]
        if cipher is None or sealed is None:
            return ""
        return cipher.decrypt(name, sealed)

    birthday_text = field("birthday")
    return MemberRecord(
        member_id=m["member_id"],
        home_store_id=m["home_store_id"],
        given_name=field("given_name"),
        family_name=field("family_name"),
        mobile=field("mobile"),
        email=field("email"),
        gender=Gender(m["gender"]),
        birthday=_birthday(birthday_text) if birthday_text else None,
        enrollment_channel=EnrollmentChannel(m["enrollment_channel"]),
        preferred_language=m["preferred_language"],
        enrolled_by=m["enrolled_by"],
        enrolled_from_store=m["enrolled_from_store"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        version=m["version"],
        readable=cipher is not None,
    )


async def _cipher(session: AsyncSession, keys: Keys, member_id: str) -> FieldCipher | None:
    row = (
        await session.execute(sa.select(member_keys).where(member_keys.c.member_id == member_id))
    ).first()
    if row is None:
        return None
    wrapped = WrappedKey(row.master_key_id, row.wrapped_key)
    try:
        return FieldCipher(keys.ring.unwrap(wrapped, member_id), member_id)
    except DecryptionError:
        return None


async def insert_member(
    session: AsyncSession,
    keys: Keys,
    member_id: str,
    member: NewMember,
    *,
    principal: str,
    from_store: str,
    now: dt.datetime,
) -> MemberRecord:
    """Insert a new member; ``MobileTaken`` when the mobile is in use (the
    unique blind index decides, so two concurrent enrollments of the same
    mobile cannot both win)."""
    if await member_id_by_mobile(session, keys, member.mobile) is not None:
        raise MobileTaken
    data_key, wrapped = keys.ring.new_data_key(member_id)
    cipher = FieldCipher(data_key, member_id)

    def seal(name: str, value: str) -> bytes | None:
        return cipher.encrypt(name, value) if value else None

    values = {
        "member_id": member_id,
        "home_store_id": member.home_store_id,
        "given_name_enc": cipher.encrypt("given_name", member.given_name),
        "family_name_enc": seal("family_name", member.family_name),
        "mobile_enc": cipher.encrypt("mobile", member.mobile),
        "mobile_index": keys.mobile_index(member.mobile),
        "email_enc": seal("email", member.email),
        "email_index": keys.email_index(member.email) if member.email else None,
        "birthday_enc": seal("birthday", _birthday_text(member.birthday))
        if member.birthday
        else None,
        "birth_month": member.birthday.month if member.birthday else None,
        "gender": member.gender.value,
        "enrollment_channel": member.enrollment_channel.value,
        "preferred_language": member.preferred_language,
        "enrolled_by": principal,
        "enrolled_from_store": from_store,
        "created_at": now,
        "updated_at": now,
        "version": 1,
    }
    try:
        async with session.begin_nested():
            await session.execute(sa.insert(members).values(**values))
            await session.execute(
                sa.insert(member_keys).values(
                    member_id=member_id,
                    master_key_id=wrapped.master_key_id,
                    wrapped_key=wrapped.ciphertext,
                )
            )
    except IntegrityError as exc:
        if is_unique_violation(exc) and "mobile" in str(exc.orig).lower():
            raise MobileTaken from exc
        raise
    row = (await session.execute(sa.select(members).where(members.c.member_id == member_id))).one()
    return _record(row, cipher)


async def get_member(session: AsyncSession, keys: Keys, member_id: str) -> MemberRecord | None:
    row = (
        await session.execute(sa.select(members).where(members.c.member_id == member_id))
    ).first()
    if row is None:
        return None
    return _record(row, await _cipher(session, keys, member_id))


async def member_id_by_mobile(session: AsyncSession, keys: Keys, mobile: str) -> str | None:
    result = await session.execute(
        sa.select(members.c.member_id).where(members.c.mobile_index == keys.mobile_index(mobile))
    )
    return result.scalar_one_or_none()
