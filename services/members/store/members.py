"""Member tables and queries. Each function runs inside the caller's unit of
work (chassis.db.Database.transaction) so state, history and outbox rows
commit together.

Personal fields (names, mobile, e-mail, birthday, and in ``extra_enc`` the
landline, address, anniversaries and notes) are stored only encrypted, each
member under a data key of their own (``member_keys``), wrapped by the
service's master key. So are the free texts of follow-ups and feedback and
the values in the history. Mobile and e-mail are found through blind
indexes. Deleting a member's key row makes everything personal about them
unreadable. What filters need and identifies no one (gender, birth month and
year, tags, home store, consultant, enrollment, consents, state) is kept in
clear.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.bulk import insert_rows
from chassis.crypto import (
    BlindIndex,
    DecryptionError,
    FieldCipher,
    KeyRing,
    UnknownMasterKey,
    WrappedKey,
)
from chassis.db import BigIntKey, UTCDateTime, is_unique_violation
from chassis.direct import Direct, Executor
from chassis.errors import FailedPrecondition
from chassis.paging import newest_first
from services.members.domain.members import (
    Address,
    Anniversary,
    AttributeDefinition,
    AttributeType,
    Birthday,
    ConsentChoice,
    ContactChannel,
    ContactWindow,
    Coordinates,
    EnrollmentChannel,
    FeedbackSubject,
    FollowUpChannel,
    FollowUpOutcome,
    Gender,
    IncomeBand,
    MemberState,
    NewFeedback,
    NewFollowUp,
    NewMember,
    SkinType,
    plain,
)
from services.members.store import metadata
from services.members.store.organisation import stores

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
    # 0003: the full file.
    # Landline, address, anniversaries and notes, one sealed JSON document.
    sa.Column("extra_enc", sa.LargeBinary, nullable=True),
    # The year alone, for age filters; with the month it still names no one.
    sa.Column("birth_year", sa.SmallInteger, nullable=True),
    # Skin, occupation, income band, brands, preferences, contact channel and
    # windows, custom attributes: descriptive, not identifying.
    sa.Column("profile", sa.JSON, nullable=True),
    sa.Column("consultant_id", sa.String(100), nullable=False, server_default="", index=True),
    sa.Column("referrer_member_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("enrolled_at", UTCDateTime, nullable=True),
    sa.Column("state", sa.String(10), nullable=False, server_default="active", index=True),
    sa.Column("merged_into", sa.String(16), nullable=False, server_default=""),
    sa.Index("ix_members_enrolled", "enrolled_at", "member_id"),
)

member_tags = sa.Table(
    "member_tags",
    metadata,
    sa.Column("member_id", sa.String(16), primary_key=True),
    sa.Column("tag", sa.String(40), primary_key=True),
    sa.Index("ix_member_tags_tag", "tag", "member_id"),
)

member_consents = sa.Table(
    "member_consents",
    metadata,
    sa.Column("member_id", sa.String(16), primary_key=True),
    sa.Column("channel", sa.String(10), primary_key=True),
    sa.Column("granted", sa.Boolean, nullable=False),
    sa.Column("source", sa.String(60), nullable=False, server_default=""),
    sa.Column("changed_at", UTCDateTime, nullable=False),
    sa.Column("changed_by", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Index("ix_member_consents_granted", "channel", "granted", "member_id"),
)

member_changes = sa.Table(
    "member_changes",
    metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("member_id", sa.String(16), nullable=False),
    sa.Column("operation", sa.String(20), nullable=False),
    sa.Column("fields", sa.JSON, nullable=False),
    # {"old": {...}, "new": {...}} sealed with the member's data key.
    sa.Column("values_enc", sa.LargeBinary, nullable=True),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("changed_at", UTCDateTime, nullable=False),
    sa.Index("ix_member_changes_member", "member_id", "seq"),
)

member_follow_ups = sa.Table(
    "member_follow_ups",
    metadata,
    sa.Column("follow_up_id", sa.String(32), primary_key=True),
    sa.Column("member_id", sa.String(16), nullable=False),
    sa.Column("channel", sa.String(10), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("duration_seconds", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_step_enc", sa.LargeBinary, nullable=True),
    sa.Column("staff_id", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("occurred_at", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_member_follow_ups_member", "member_id", "occurred_at"),
)

member_feedback = sa.Table(
    "member_feedback",
    metadata,
    sa.Column("feedback_id", sa.String(32), primary_key=True),
    sa.Column("member_id", sa.String(16), nullable=False),
    sa.Column("subject", sa.String(10), nullable=False),
    sa.Column("subject_ref", sa.String(60), nullable=False, server_default=""),
    sa.Column("rating", sa.SmallInteger, nullable=False),
    sa.Column("text_enc", sa.LargeBinary, nullable=True),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_member_feedback_member", "member_id", "created_at"),
)

attribute_definitions = sa.Table(
    "attribute_definitions",
    metadata,
    sa.Column("name", sa.String(40), primary_key=True),
    sa.Column("type", sa.String(10), nullable=False),
    sa.Column("allowed_values", sa.JSON, nullable=False),
    sa.Column("description", sa.String(2000), nullable=False, server_default=""),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
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
class Stamp:
    """Who does something, from which store, when."""

    principal: str
    store_id: str
    at: dt.datetime


@dataclass(frozen=True)
class ConsentRecord:
    channel: ContactChannel
    granted: bool
    source: str
    changed_at: dt.datetime
    changed_by: str
    store_id: str


@dataclass(frozen=True)
class MemberRecord:
    member_id: str
    # The file as stored (personal fields empty once unreadable).
    file: NewMember
    enrolled_by: str
    enrolled_from_store: str
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int
    state: MemberState = MemberState.ACTIVE
    merged_into: str = ""
    consents: tuple[ConsentRecord, ...] = ()
    # False once the member's data key is gone: the personal fields are then
    # empty, and nothing can bring them back.
    readable: bool = True

    # The enrollment's fields by their old names, for callers of the first
    # version of this module.
    @property
    def home_store_id(self) -> str:
        return self.file.home_store_id

    @property
    def given_name(self) -> str:
        return self.file.given_name

    @property
    def family_name(self) -> str:
        return self.file.family_name

    @property
    def mobile(self) -> str:
        return self.file.mobile

    @property
    def email(self) -> str:
        return self.file.email

    @property
    def gender(self) -> Gender:
        return self.file.gender

    @property
    def birthday(self) -> Birthday | None:
        return self.file.birthday

    @property
    def enrollment_channel(self) -> EnrollmentChannel:
        return self.file.enrollment_channel

    @property
    def preferred_language(self) -> str:
        return self.file.preferred_language


@dataclass(frozen=True)
class ChangeRecord:
    seq: int
    member_id: str
    operation: str
    fields: tuple[str, ...]
    old_values: Mapping[str, Any]
    new_values: Mapping[str, Any]
    principal: str
    store_id: str
    changed_at: dt.datetime


@dataclass(frozen=True)
class FollowUpRecord:
    follow_up_id: str
    follow_up: NewFollowUp
    store_id: str
    created_at: dt.datetime


@dataclass(frozen=True)
class FeedbackRecord:
    feedback_id: str
    feedback: NewFeedback
    principal: str
    store_id: str
    created_at: dt.datetime


@dataclass(frozen=True)
class MemberFilter:
    home_store_ids: tuple[str, ...] | None = None
    gender: Gender | None = None
    earliest_birth_year: int | None = None
    latest_birth_year: int | None = None
    birth_month: int | None = None
    tags: tuple[str, ...] = ()
    enrolled_after: dt.datetime | None = None
    enrolled_before: dt.datetime | None = None
    consultant_id: str = ""
    consent_channel: ContactChannel | None = None
    state: MemberState | None = MemberState.ACTIVE
    member_ids: tuple[str, ...] | None = None


class MobileTaken(Exception):
    """Another member already has this mobile number (``member_id`` when
    known)."""

    def __init__(self, member_id: str = "") -> None:
        super().__init__("mobile in use")
        self.member_id = member_id


class StaleVersion(Exception):
    """The file changed since it was read."""


class AttributeExists(Exception):
    pass


def new_record_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


def _birthday_text(birthday: Birthday) -> str:
    return f"{birthday.year:04d}-{birthday.month:02d}-{birthday.day:02d}"


def _birthday(text: str) -> Birthday:
    year, month, day = (int(part) for part in text.split("-"))
    return Birthday(year, month, day)


def _seal_json(cipher: FieldCipher, name: str, value: object) -> bytes:
    return cipher.encrypt(name, json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _open_json(cipher: FieldCipher | None, name: str, sealed: bytes | None) -> Any:
    if cipher is None or not sealed:
        return None
    try:
        return json.loads(cipher.decrypt(name, sealed))
    except DecryptionError:
        return None


def _extra_doc(member: NewMember) -> dict[str, Any]:
    return {
        "landline": member.landline,
        "address": plain(member.address),
        "anniversaries": plain(member.anniversaries),
        "notes": member.notes,
    }


def _address(doc: Any) -> Address | None:
    if not doc:
        return None
    coordinates = doc.get("coordinates")
    return Address(
        province=doc.get("province", ""),
        city=doc.get("city", ""),
        district=doc.get("district", ""),
        street=doc.get("street", ""),
        postcode=doc.get("postcode", ""),
        coordinates=Coordinates(coordinates["latitude"], coordinates["longitude"])
        if coordinates
        else None,
    )


def _profile_doc(member: NewMember) -> dict[str, Any]:
    return {
        "skin_type": member.skin_type.value,
        "skin_concerns": list(member.skin_concerns),
        "occupation": member.occupation,
        "income_band": member.income_band.value,
        "brands_used": list(member.brands_used),
        "preferences": list(member.preferences),
        "preferred_contact_channel": member.preferred_contact_channel.value,
        "contact_windows": plain(member.contact_windows),
        "attributes": dict(member.attributes),
        "tags": list(member.tags),
    }


def _columns(keys: Keys, cipher: FieldCipher, member: NewMember) -> dict[str, Any]:
    def seal(name: str, value: str) -> bytes | None:
        return cipher.encrypt(name, value) if value else None

    birthday = member.birthday
    return {
        "home_store_id": member.home_store_id,
        "given_name_enc": cipher.encrypt("given_name", member.given_name),
        "family_name_enc": seal("family_name", member.family_name),
        "mobile_enc": cipher.encrypt("mobile", member.mobile),
        "mobile_index": keys.mobile_index(member.mobile),
        "email_enc": seal("email", member.email),
        "email_index": keys.email_index(member.email) if member.email else None,
        "birthday_enc": seal("birthday", _birthday_text(birthday)) if birthday else None,
        "birth_month": birthday.month if birthday else None,
        "birth_year": birthday.year or None if birthday else None,
        "gender": member.gender.value,
        "preferred_language": member.preferred_language,
        "extra_enc": _seal_json(cipher, "extra", _extra_doc(member)),
        "profile": _profile_doc(member),
        "consultant_id": member.consultant_id,
        "referrer_member_id": member.referrer_member_id,
    }


def _record(m: Any, cipher: FieldCipher | None, consents: Sequence[ConsentRecord]) -> MemberRecord:
    def text(name: str) -> str:
        sealed = m[f"{name}_enc"]
        if cipher is None or not sealed:
            return ""
        try:
            return cipher.decrypt(name, sealed)
        except DecryptionError:
            return ""

    birthday_text = text("birthday")
    extra = _open_json(cipher, "extra", m["extra_enc"]) or {}
    profile = m["profile"] or {}
    file = NewMember(
        home_store_id=m["home_store_id"],
        given_name=text("given_name"),
        family_name=text("family_name"),
        mobile=text("mobile"),
        email=text("email"),
        gender=Gender(m["gender"]),
        birthday=_birthday(birthday_text) if birthday_text else None,
        enrollment_channel=EnrollmentChannel(m["enrollment_channel"]),
        preferred_language=m["preferred_language"],
        landline=extra.get("landline", ""),
        address=_address(extra.get("address")),
        anniversaries=tuple(
            Anniversary(a["kind"], Birthday(**a["date"])) for a in extra.get("anniversaries", [])
        ),
        skin_type=SkinType(profile.get("skin_type", "")),
        skin_concerns=tuple(profile.get("skin_concerns", ())),
        occupation=profile.get("occupation", ""),
        income_band=IncomeBand(profile.get("income_band", "")),
        brands_used=tuple(profile.get("brands_used", ())),
        preferences=tuple(profile.get("preferences", ())),
        tags=tuple(profile.get("tags", ())),
        preferred_contact_channel=ContactChannel(profile.get("preferred_contact_channel", "")),
        contact_windows=tuple(ContactWindow(**w) for w in profile.get("contact_windows", ())),
        consultant_id=m["consultant_id"],
        referrer_member_id=m["referrer_member_id"],
        enrolled_at=m["enrolled_at"] or m["created_at"],
        consents=tuple(ConsentChoice(c.channel, c.granted, c.source) for c in consents),
        notes=extra.get("notes", ""),
        attributes=dict(profile.get("attributes", {})),
    )
    return MemberRecord(
        member_id=m["member_id"],
        file=file,
        enrolled_by=m["enrolled_by"],
        enrolled_from_store=m["enrolled_from_store"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        version=m["version"],
        state=MemberState(m["state"]),
        merged_into=m["merged_into"],
        consents=tuple(consents),
        readable=cipher is not None,
    )


def _cipher_of(
    keys: Keys, member_id: str, master_key_id: str | None, wrapped: bytes | None
) -> FieldCipher | None:
    """The member's field cipher; None for an erased member (no key row).
    A key row that cannot be unwrapped is a configuration fault, never
    erasure: it fails the call rather than read back as empty fields."""
    if master_key_id is None or wrapped is None:
        return None
    try:
        return FieldCipher(
            keys.ring.unwrap(WrappedKey(master_key_id, wrapped), member_id), member_id
        )
    except UnknownMasterKey:
        raise FailedPrecondition(
            f"this member's data key is wrapped by master key {master_key_id!r}, which is "
            "not in MEMBERS_MASTER_KEYS; the key must be restored (see key rotation)",
            reason="MASTER_KEY_UNKNOWN",
            metadata={"master_key_id": master_key_id},
        ) from None
    except DecryptionError:
        raise FailedPrecondition(
            f"this member's data key does not open with master key {master_key_id!r}: "
            "MEMBERS_MASTER_KEYS holds a different key under that id",
            reason="MASTER_KEY_MISMATCH",
            metadata={"master_key_id": master_key_id},
        ) from None


async def cipher_for(session: AsyncSession, keys: Keys, member_id: str) -> FieldCipher | None:
    row = (
        await session.execute(sa.select(member_keys).where(member_keys.c.member_id == member_id))
    ).first()
    if row is None:
        return None
    return _cipher_of(keys, member_id, row.master_key_id, row.wrapped_key)


_SELECT = sa.select(members, member_keys.c.master_key_id, member_keys.c.wrapped_key).select_from(
    members.outerjoin(member_keys, member_keys.c.member_id == members.c.member_id)
)


def _consent(row: Any) -> ConsentRecord:
    return ConsentRecord(
        ContactChannel(row.channel),
        row.granted,
        row.source,
        row.changed_at,
        row.changed_by,
        row.store_id,
    )


async def _consents(
    session: AsyncSession, member_ids: Sequence[str]
) -> dict[str, list[ConsentRecord]]:
    out: dict[str, list[ConsentRecord]] = {member_id: [] for member_id in member_ids}
    if not member_ids:
        return out
    c = member_consents.c
    rows = await session.execute(
        sa.select(member_consents).where(c.member_id.in_(member_ids)).order_by(c.channel)
    )
    for row in rows:
        out[row.member_id].append(_consent(row))
    return out


async def _records(
    session: AsyncSession, keys: Keys, rows: Sequence[sa.Row[Any]]
) -> list[MemberRecord]:
    consents = await _consents(session, [row.member_id for row in rows])
    out = []
    for row in rows:
        m = row._mapping
        cipher = _cipher_of(keys, m["member_id"], m["master_key_id"], m["wrapped_key"])
        out.append(_record(m, cipher, consents[m["member_id"]]))
    return out


@dataclass(frozen=True)
class PreparedMember:
    """A new member's rows, sealed under a fresh data key and ready to be
    inserted: what ``insert_member`` writes, built without touching the
    database so that an import can prepare a batch and insert it in bulk."""

    member_id: str
    member: NewMember
    member_row: Mapping[str, Any]
    key_row: Mapping[str, Any]
    tag_rows: Sequence[Mapping[str, Any]]
    consent_rows: Sequence[Mapping[str, Any]]
    change_row: Mapping[str, Any]
    consents: Sequence[ConsentRecord]

    @property
    def mobile_index(self) -> str:
        index: str = self.member_row["mobile_index"]
        return index

    def record(self) -> MemberRecord:
        """The member as stored, as insert_member returns it (built here
        rather than read back: enrollment is the hot write path)."""
        row, consents = self.member_row, self.consents
        return MemberRecord(
            member_id=self.member_id,
            file=replace(
                self.member,
                enrolled_at=row["enrolled_at"],
                consents=tuple(ConsentChoice(c.channel, c.granted, c.source) for c in consents),
            ),
            enrolled_by=row["enrolled_by"],
            enrolled_from_store=row["enrolled_from_store"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            version=1,
            consents=tuple(sorted(consents, key=lambda c: c.channel.value)),
        )


def prepare_member(
    keys: Keys,
    member_id: str,
    member: NewMember,
    *,
    principal: str,
    from_store: str,
    now: dt.datetime,
) -> PreparedMember:
    """The rows of a new member with its consents, tags and first history
    entry (pure: keys and encryption only)."""
    data_key, wrapped = keys.ring.new_data_key(member_id)
    cipher = FieldCipher(data_key, member_id)
    values = {
        **_columns(keys, cipher, member),
        "member_id": member_id,
        "enrollment_channel": member.enrollment_channel.value,
        "enrolled_by": principal,
        "enrolled_from_store": from_store,
        "enrolled_at": member.enrolled_at or now,
        "created_at": now,
        "updated_at": now,
        "version": 1,
        "state": MemberState.ACTIVE.value,
    }
    stamp = Stamp(principal, from_store, now)
    consents = [
        ConsentRecord(c.channel, c.granted, c.source[:60], now, principal, from_store)
        for c in member.consents
    ]
    # What plain(replace(member, enrolled_at=...)) gives, without copying
    # the member first.
    enrolled = plain(member)
    assert isinstance(enrolled, dict)
    enrolled["enrolled_at"] = plain(values["enrolled_at"])
    return PreparedMember(
        member_id=member_id,
        member=member,
        member_row=values,
        key_row={
            "member_id": member_id,
            "master_key_id": wrapped.master_key_id,
            "wrapped_key": wrapped.ciphertext,
        },
        tag_rows=[{"member_id": member_id, "tag": tag} for tag in member.tags],
        consent_rows=[
            {
                "member_id": member_id,
                "channel": c.channel.value,
                "granted": c.granted,
                "source": c.source,
                "changed_at": now,
                "changed_by": principal,
                "store_id": from_store,
            }
            for c in consents
        ],
        change_row=_change_row(
            cipher,
            member_id,
            operation="create",
            fields=("member",),
            old={},
            new={"member": enrolled},
            stamp=stamp,
        ),
        consents=consents,
    )


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
    """Insert a new member with its consents, tags and first history entry;
    ``MobileTaken`` when the mobile is in use (the unique blind index
    decides, so two concurrent enrollments of the same mobile cannot both
    win)."""
    if await member_id_by_mobile(session, keys, member.mobile) is not None:
        raise MobileTaken
    prepared = prepare_member(
        keys, member_id, member, principal=principal, from_store=from_store, now=now
    )
    try:
        async with session.begin_nested():
            await session.execute(sa.insert(members).values(**prepared.member_row))
            await session.execute(sa.insert(member_keys).values(**prepared.key_row))
    except IntegrityError as exc:
        if is_unique_violation(exc) and "mobile" in str(exc.orig).lower():
            raise MobileTaken from exc
        raise
    if prepared.tag_rows:
        await session.execute(sa.insert(member_tags), list(prepared.tag_rows))
    if prepared.consent_rows:
        await session.execute(sa.insert(member_consents), list(prepared.consent_rows))
    await session.execute(sa.insert(member_changes).values(**prepared.change_row))
    return prepared.record()


async def insert_members(session: AsyncSession, prepared: Sequence[PreparedMember]) -> None:
    """Insert many prepared members, one bulk insert per table (COPY on
    PostgreSQL). ``MobileTaken`` when a mobile is already a member's (the
    unique blind index decides); the caller's transaction is then to be
    rolled back, as nothing here runs under a savepoint."""
    if not prepared:
        return
    try:
        await insert_rows(session, members, [p.member_row for p in prepared])
    except IntegrityError as exc:
        if is_unique_violation(exc) and "mobile" in str(exc.orig).lower():
            raise MobileTaken from exc
        raise
    await insert_rows(session, member_keys, [p.key_row for p in prepared])
    await insert_rows(session, member_tags, [row for p in prepared for row in p.tag_rows])
    await insert_rows(session, member_consents, [row for p in prepared for row in p.consent_rows])
    await insert_rows(session, member_changes, [p.change_row for p in prepared])


async def existing_mobile_indexes(session: AsyncSession, indexes: Iterable[str]) -> set[str]:
    """Which of these mobile blind indexes are already members' (one query)."""
    wanted = sorted(set(indexes))
    if not wanted:
        return set()
    if (await session.connection()).dialect.name == "postgresql":
        # The statement is prepared once per connection; a generic plan made
        # while the table was small (an import into an empty file) would go
        # on scanning all of it, testing every row against every index. A
        # plan for the values at hand uses the unique index.
        await session.execute(sa.text("SET LOCAL plan_cache_mode = force_custom_plan"))
    result = await session.execute(
        sa.select(members.c.mobile_index).where(members.c.mobile_index.in_(wanted))
    )
    return set(result.scalars())


async def _write_tags(session: AsyncSession, member_id: str, tags: Iterable[str]) -> None:
    await session.execute(sa.delete(member_tags).where(member_tags.c.member_id == member_id))
    rows = [{"member_id": member_id, "tag": tag} for tag in sorted(set(tags))]
    if rows:
        await session.execute(sa.insert(member_tags), rows)


# One member's file with its consents, the hot read (every GetMember): one
# statement (a row a consent, the file's columns on each), built once, run
# straight on the driver.
_CONSENT_COLUMNS = ("channel", "granted", "source", "changed_at", "changed_by", "store_id")
_ONE_MEMBER = Direct(
    sa.select(
        *_SELECT.selected_columns,
        *(member_consents.c[name].label(f"consent_{name}") for name in _CONSENT_COLUMNS),
    )
    .select_from(
        members.outerjoin(member_keys, member_keys.c.member_id == members.c.member_id).outerjoin(
            member_consents, member_consents.c.member_id == members.c.member_id
        )
    )
    .where(members.c.member_id == sa.bindparam("member_id"))
    .order_by(member_consents.c.channel)
)


async def get_member(session: Executor, keys: Keys, member_id: str) -> MemberRecord | None:
    rows = (await _ONE_MEMBER.execute(session, {"member_id": member_id})).all()
    if not rows:
        return None
    consents = [
        ConsentRecord(
            ContactChannel(row.consent_channel),
            row.consent_granted,
            row.consent_source,
            row.consent_changed_at,
            row.consent_changed_by,
            row.consent_store_id,
        )
        for row in rows
        if row.consent_channel is not None
    ]
    m = rows[0]._mapping
    cipher = _cipher_of(keys, member_id, m["master_key_id"], m["wrapped_key"])
    return _record(m, cipher, consents)


async def member_id_by_mobile(session: AsyncSession, keys: Keys, mobile: str) -> str | None:
    result = await session.execute(
        sa.select(members.c.member_id).where(members.c.mobile_index == keys.mobile_index(mobile))
    )
    return result.scalar_one_or_none()


async def member_id_by_email(session: AsyncSession, keys: Keys, email: str) -> str | None:
    """The file holding this e-mail; e-mail is not unique, so the oldest
    active one wins."""
    m = members.c
    result = await session.execute(
        sa.select(m.member_id)
        .where(m.email_index == keys.email_index(email))
        .order_by((m.state == MemberState.ACTIVE.value).desc(), m.created_at, m.member_id)
        .limit(1)
    )
    return result.scalar_one_or_none()


async def update_member(
    session: AsyncSession,
    keys: Keys,
    before: MemberRecord,
    after: NewMember,
    fields: Sequence[str],
    *,
    stamp: Stamp,
    operation: str = "update",
) -> MemberRecord:
    """Write the changed file if nobody changed it since ``before`` was read
    (``StaleVersion`` otherwise), with its history entry."""
    cipher = await cipher_for(session, keys, before.member_id)
    if cipher is None:
        raise StaleVersion
    m = members.c
    values = _columns(keys, cipher, after)
    if "mobile" in fields:
        holder = await member_id_by_mobile(session, keys, after.mobile)
        if holder is not None and holder != before.member_id:
            raise MobileTaken(holder)
    # No savepoint here: on SQLite a savepoint opened before the unit of
    # work's first write commits on release, apart from the history and
    # outbox rows. A concurrent taker of the same mobile fails the whole
    # unit of work instead.
    try:
        result = await session.execute(
            sa.update(members)
            .where(m.member_id == before.member_id, m.version == before.version)
            .values(**values, updated_at=stamp.at, version=m.version + 1)
        )
    except IntegrityError as exc:
        if is_unique_violation(exc) and "mobile" in str(exc.orig).lower():
            raise MobileTaken from exc
        raise
    if getattr(result, "rowcount", 0) != 1:
        raise StaleVersion
    if "tags" in fields:
        await _write_tags(session, before.member_id, after.tags)
    await record_change(
        session,
        cipher,
        before.member_id,
        operation=operation,
        fields=tuple(fields),
        old={name: plain(getattr(before.file, name)) for name in fields},
        new={name: plain(getattr(after, name)) for name in fields},
        stamp=stamp,
    )
    found = await get_member(session, keys, before.member_id)
    assert found is not None
    return found


async def set_state(
    session: AsyncSession,
    keys: Keys,
    before: MemberRecord,
    state: MemberState,
    stamp: Stamp,
    *,
    merged_into: str = "",
    note: Mapping[str, Any] | None = None,
) -> MemberRecord:
    m = members.c
    result = await session.execute(
        sa.update(members)
        .where(m.member_id == before.member_id, m.version == before.version)
        .values(
            state=state.value, merged_into=merged_into, updated_at=stamp.at, version=m.version + 1
        )
    )
    if getattr(result, "rowcount", 0) != 1:
        raise StaleVersion
    cipher = await cipher_for(session, keys, before.member_id)
    await record_change(
        session,
        cipher,
        before.member_id,
        operation={
            MemberState.ACTIVE: "reactivate",
            MemberState.ARCHIVED: "archive",
            MemberState.MERGED: "merge",
            MemberState.ERASED: "erase",
        }[state],
        fields=("state",),
        old={"state": before.state.value},
        new={"state": state.value, **(note or {})},
        stamp=stamp,
    )
    found = await get_member(session, keys, before.member_id)
    assert found is not None
    return found


async def record_change(
    session: AsyncSession,
    cipher: FieldCipher | None,
    member_id: str,
    *,
    operation: str,
    fields: Sequence[str],
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    stamp: Stamp,
) -> None:
    await session.execute(
        sa.insert(member_changes).values(
            **_change_row(
                cipher, member_id, operation=operation, fields=fields, old=old, new=new, stamp=stamp
            )
        )
    )


def _change_row(
    cipher: FieldCipher | None,
    member_id: str,
    *,
    operation: str,
    fields: Sequence[str],
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    stamp: Stamp,
) -> dict[str, Any]:
    sealed = None
    if cipher is not None and (old or new):
        sealed = _seal_json(cipher, "history", {"old": old, "new": new})
    return {
        "member_id": member_id,
        "operation": operation,
        "fields": list(fields),
        "values_enc": sealed,
        "principal": stamp.principal,
        "store_id": stamp.store_id,
        "changed_at": stamp.at,
    }


async def list_changes(
    session: AsyncSession, keys: Keys, member_id: str, *, before_seq: int | None, limit: int
) -> list[ChangeRecord]:
    c = member_changes.c
    query = sa.select(member_changes).where(c.member_id == member_id)
    if before_seq is not None:
        query = query.where(c.seq < before_seq)
    rows = (await session.execute(query.order_by(c.seq.desc()).limit(limit))).all()
    cipher = await cipher_for(session, keys, member_id)
    out = []
    for row in rows:
        values = _open_json(cipher, "history", row.values_enc) or {}
        out.append(
            ChangeRecord(
                seq=row.seq,
                member_id=row.member_id,
                operation=row.operation,
                fields=tuple(row.fields),
                old_values=values.get("old", {}),
                new_values=values.get("new", {}),
                principal=row.principal,
                store_id=row.store_id,
                changed_at=row.changed_at,
            )
        )
    return out


async def set_consent(
    session: AsyncSession, member_id: str, consent: ConsentChoice, stamp: Stamp
) -> bool:
    """Record a consent choice; False when it was already so (nothing to
    tell anyone)."""
    c = member_consents.c
    current = (
        await session.execute(
            sa.select(c.granted).where(c.member_id == member_id, c.channel == consent.channel.value)
        )
    ).scalar_one_or_none()
    if current is not None and current == consent.granted:
        return False
    values = {
        "granted": consent.granted,
        "source": consent.source[:60],
        "changed_at": stamp.at,
        "changed_by": stamp.principal,
        "store_id": stamp.store_id,
    }
    if current is None:
        await session.execute(
            sa.insert(member_consents).values(
                member_id=member_id, channel=consent.channel.value, **values
            )
        )
    else:
        await session.execute(
            sa.update(member_consents)
            .where(c.member_id == member_id, c.channel == consent.channel.value)
            .values(**values)
        )
    return True


async def touch(session: AsyncSession, member_id: str, now: dt.datetime) -> None:
    """A new version (and etag) for a change kept outside the members row."""
    m = members.c
    await session.execute(
        sa.update(members)
        .where(m.member_id == member_id)
        .values(updated_at=now, version=m.version + 1)
    )


def _filtered(query: Any, where: MemberFilter) -> Any:
    m = members.c
    if where.member_ids is not None:
        query = query.where(m.member_id.in_(where.member_ids))
    if where.home_store_ids is not None:
        query = query.where(m.home_store_id.in_(where.home_store_ids))
    if where.gender is not None:
        query = query.where(m.gender == where.gender.value)
    if where.earliest_birth_year is not None:
        query = query.where(m.birth_year >= where.earliest_birth_year)
    if where.latest_birth_year is not None:
        query = query.where(m.birth_year <= where.latest_birth_year)
    if where.birth_month is not None:
        query = query.where(m.birth_month == where.birth_month)
    for tag in where.tags:
        query = query.where(
            sa.exists().where(member_tags.c.member_id == m.member_id, member_tags.c.tag == tag)
        )
    if where.enrolled_after is not None:
        query = query.where(m.enrolled_at >= where.enrolled_after)
    if where.enrolled_before is not None:
        query = query.where(m.enrolled_at < where.enrolled_before)
    if where.consultant_id:
        query = query.where(m.consultant_id == where.consultant_id)
    if where.consent_channel is not None:
        c = member_consents.c
        query = query.where(
            sa.exists().where(
                c.member_id == m.member_id,
                c.channel == where.consent_channel.value,
                c.granted.is_(True),
            )
        )
    if where.state is not None:
        query = query.where(m.state == where.state.value)
    return query


async def list_members(
    session: AsyncSession,
    keys: Keys,
    where: MemberFilter,
    *,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[MemberRecord]:
    """Newest enrollment first, keyset paged on (enrolled_at, member_id)."""
    m = members.c
    query = newest_first(_filtered(_SELECT, where), m.enrolled_at, m.member_id, after, limit)
    return await _records(session, keys, (await session.execute(query)).all())


async def home_store_ids(session: AsyncSession) -> list[str]:
    """Every store that is some member's home (to resolve region filters)."""
    rows = await session.execute(sa.select(members.c.home_store_id).distinct())
    return [row[0] for row in rows]


async def members_of_consultant(session: AsyncSession, consultant_id: str) -> list[tuple[str, str]]:
    """(member_id, home_store_id) of the active and archived members a
    consultant looks after."""
    m = members.c
    rows = await session.execute(
        sa.select(m.member_id, m.home_store_id)
        .where(
            m.consultant_id == consultant_id,
            m.state.in_((MemberState.ACTIVE.value, MemberState.ARCHIVED.value)),
        )
        .order_by(m.member_id)
    )
    return [(row.member_id, row.home_store_id) for row in rows]


async def set_consultant(
    session: AsyncSession, keys: Keys, member_id: str, from_id: str, to_id: str, *, stamp: Stamp
) -> bool:
    m = members.c
    result = await session.execute(
        sa.update(members)
        .where(m.member_id == member_id, m.consultant_id == from_id)
        .values(consultant_id=to_id, updated_at=stamp.at, version=m.version + 1)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    await record_change(
        session,
        await cipher_for(session, keys, member_id),
        member_id,
        operation="consultant",
        fields=("consultant_id",),
        old={"consultant_id": from_id},
        new={"consultant_id": to_id},
        stamp=stamp,
    )
    return True


async def erase_member(session: AsyncSession, member_id: str, stamp: Stamp) -> None:
    """Destroy the data key and everything that could single the member out;
    keep the anonymous shell (store, gender, enrollment, state) for counts.
    The blind indexes go, so the mobile and e-mail may enroll again."""
    m = members.c
    await session.execute(sa.delete(member_keys).where(member_keys.c.member_id == member_id))
    await session.execute(
        sa.update(members)
        .where(m.member_id == member_id)
        .values(
            given_name_enc=b"",
            family_name_enc=None,
            mobile_enc=b"",
            # Unique and matching no digest: the number is free again.
            mobile_index=f"erased:{member_id}",
            email_enc=None,
            email_index=None,
            birthday_enc=None,
            birth_month=None,
            birth_year=None,
            extra_enc=None,
            profile=None,
            referrer_member_id="",
            state=MemberState.ERASED.value,
            merged_into="",
            updated_at=stamp.at,
            version=m.version + 1,
        )
    )
    await session.execute(sa.delete(member_tags).where(member_tags.c.member_id == member_id))
    await session.execute(
        sa.delete(member_consents).where(member_consents.c.member_id == member_id)
    )
    await session.execute(
        sa.update(member_follow_ups)
        .where(member_follow_ups.c.member_id == member_id)
        .values(next_step_enc=None)
    )
    await session.execute(
        sa.update(member_feedback)
        .where(member_feedback.c.member_id == member_id)
        .values(text_enc=None)
    )
    await session.execute(
        sa.update(member_changes)
        .where(member_changes.c.member_id == member_id)
        .values(values_enc=None)
    )
    await record_change(
        session, None, member_id, operation="erase", fields=("state",), old={}, new={}, stamp=stamp
    )


# --- Follow-ups and feedback -------------------------------------------------


async def insert_follow_up(
    session: AsyncSession, cipher: FieldCipher, follow_up: NewFollowUp, stamp: Stamp
) -> FollowUpRecord:
    follow_up_id = new_record_id("F")
    await session.execute(
        sa.insert(member_follow_ups).values(
            follow_up_id=follow_up_id,
            member_id=follow_up.member_id,
            channel=follow_up.channel.value,
            outcome=follow_up.outcome.value,
            duration_seconds=follow_up.duration_seconds,
            next_step_enc=cipher.encrypt(f"follow_up/{follow_up_id}", follow_up.next_step)
            if follow_up.next_step
            else None,
            staff_id=follow_up.staff_id,
            store_id=stamp.store_id,
            occurred_at=follow_up.occurred_at,
            created_at=stamp.at,
        )
    )
    return FollowUpRecord(follow_up_id, follow_up, stamp.store_id, stamp.at)


def _open_text(cipher: FieldCipher | None, name: str, sealed: bytes | None) -> str:
    if cipher is None or not sealed:
        return ""
    try:
        return cipher.decrypt(name, sealed)
    except DecryptionError:
        return ""


async def list_follow_ups(
    session: AsyncSession,
    keys: Keys,
    member_id: str,
    *,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[FollowUpRecord]:
    f = member_follow_ups.c
    query = sa.select(member_follow_ups).where(f.member_id == member_id)
    rows = (
        await session.execute(newest_first(query, f.occurred_at, f.follow_up_id, after, limit))
    ).all()
    cipher = await cipher_for(session, keys, member_id)
    return [
        FollowUpRecord(
            row.follow_up_id,
            NewFollowUp(
                member_id=row.member_id,
                channel=FollowUpChannel(row.channel),
                outcome=FollowUpOutcome(row.outcome),
                duration_seconds=row.duration_seconds,
                next_step=_open_text(cipher, f"follow_up/{row.follow_up_id}", row.next_step_enc),
                staff_id=row.staff_id,
                occurred_at=row.occurred_at,
            ),
            row.store_id,
            row.created_at,
        )
        for row in rows
    ]


async def insert_feedback(
    session: AsyncSession, cipher: FieldCipher, feedback: NewFeedback, stamp: Stamp
) -> FeedbackRecord:
    feedback_id = new_record_id("B")
    await session.execute(
        sa.insert(member_feedback).values(
            feedback_id=feedback_id,
            member_id=feedback.member_id,
            subject=feedback.subject.value,
            subject_ref=feedback.subject_ref,
            rating=feedback.rating,
            text_enc=cipher.encrypt(f"feedback/{feedback_id}", feedback.text)
            if feedback.text
            else None,
            principal=stamp.principal,
            store_id=stamp.store_id,
            created_at=stamp.at,
        )
    )
    return FeedbackRecord(feedback_id, feedback, stamp.principal, stamp.store_id, stamp.at)


async def list_feedback(
    session: AsyncSession,
    keys: Keys,
    member_id: str,
    *,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[FeedbackRecord]:
    b = member_feedback.c
    query = sa.select(member_feedback).where(b.member_id == member_id)
    rows = (
        await session.execute(newest_first(query, b.created_at, b.feedback_id, after, limit))
    ).all()
    cipher = await cipher_for(session, keys, member_id)
    return [
        FeedbackRecord(
            row.feedback_id,
            NewFeedback(
                member_id=row.member_id,
                subject=FeedbackSubject(row.subject),
                subject_ref=row.subject_ref,
                rating=row.rating,
                text=_open_text(cipher, f"feedback/{row.feedback_id}", row.text_enc),
            ),
            row.principal,
            row.store_id,
            row.created_at,
        )
        for row in rows
    ]


async def move_dynamic_file(session: AsyncSession, keys: Keys, from_id: str, to_id: str) -> None:
    """A merge: follow-ups and feedback go to the survivor, their free texts
    sealed again under the survivor's key."""
    source = await cipher_for(session, keys, from_id)
    target = await cipher_for(session, keys, to_id)
    f = member_follow_ups.c
    for row in (
        await session.execute(sa.select(member_follow_ups).where(f.member_id == from_id))
    ).all():
        name = f"follow_up/{row.follow_up_id}"
        text = _open_text(source, name, row.next_step_enc)
        await session.execute(
            sa.update(member_follow_ups)
            .where(f.follow_up_id == row.follow_up_id)
            .values(
                member_id=to_id,
                next_step_enc=target.encrypt(name, text) if target and text else None,
            )
        )
    b = member_feedback.c
    for row in (
        await session.execute(sa.select(member_feedback).where(b.member_id == from_id))
    ).all():
        name = f"feedback/{row.feedback_id}"
        text = _open_text(source, name, row.text_enc)
        await session.execute(
            sa.update(member_feedback)
            .where(b.feedback_id == row.feedback_id)
            .values(
                member_id=to_id, text_enc=target.encrypt(name, text) if target and text else None
            )
        )


# --- Custom attributes -------------------------------------------------------


async def insert_attribute_definition(
    session: AsyncSession, definition: AttributeDefinition, stamp: Stamp
) -> None:
    try:
        async with session.begin_nested():
            await session.execute(
                sa.insert(attribute_definitions).values(
                    name=definition.name,
                    type=definition.type.value,
                    allowed_values=list(definition.allowed_values),
                    description=definition.description,
                    created_by=stamp.principal,
                    created_at=stamp.at,
                )
            )
    except IntegrityError as exc:
        if is_unique_violation(exc):
            raise AttributeExists from exc
        raise


async def attribute_definitions_by_name(
    session: AsyncSession,
) -> dict[str, AttributeDefinition]:
    rows = await session.execute(
        sa.select(attribute_definitions).order_by(attribute_definitions.c.name)
    )
    return {
        row.name: AttributeDefinition(
            row.name, AttributeType(row.type), tuple(row.allowed_values), row.description
        )
        for row in rows
    }


# --- Segments: selecting members by what the file keeps in clear -------------


@dataclass(frozen=True)
class Criteria:
    """A segment's rules, checked already. ``None``/empty: no restriction
    (except ``states``, which the edge defaults to active). Only clear
    columns are read: nothing personal is decrypted to select."""

    home_store_ids: tuple[str, ...] = ()
    region_ids: tuple[str, ...] = ()
    birth_months: tuple[int, ...] = ()
    genders: tuple[Gender, ...] = ()
    enrolled_after: dt.datetime | None = None
    enrolled_before: dt.datetime | None = None
    states: tuple[MemberState, ...] = (MemberState.ACTIVE,)
    consent_channels: tuple[ContactChannel, ...] = ()
    tags: tuple[str, ...] = ()


def _criteria_where(where: Criteria) -> list[Any]:
    m = members.c
    out: list[Any] = []
    if where.home_store_ids:
        out.append(m.home_store_id.in_(where.home_store_ids))
    if where.region_ids:
        out.append(
            m.home_store_id.in_(
                sa.select(stores.c.store_id).where(stores.c.region_id.in_(where.region_ids))
            )
        )
    if where.birth_months:
        out.append(m.birth_month.in_(where.birth_months))
    if where.genders:
        out.append(m.gender.in_([g.value for g in where.genders]))
    if where.enrolled_after is not None:
        out.append(m.enrolled_at >= where.enrolled_after)
    if where.enrolled_before is not None:
        out.append(m.enrolled_at < where.enrolled_before)
    if where.states:
        out.append(m.state.in_([s.value for s in where.states]))
    c = member_consents.c
    for channel in where.consent_channels:
        out.append(
            sa.exists().where(
                c.member_id == m.member_id, c.channel == channel.value, c.granted.is_(True)
            )
        )
    for tag in where.tags:
        out.append(
            sa.exists().where(member_tags.c.member_id == m.member_id, member_tags.c.tag == tag)
        )
    return out


async def select_member_ids(
    session: AsyncSession, where: Criteria, *, after: str, limit: int
) -> list[str]:
    """Matching member ids in member_id order, after ``after`` (keyset)."""
    m = members.c
    query = sa.select(m.member_id).where(*_criteria_where(where))
    if after:
        query = query.where(m.member_id > after)
    rows = await session.execute(query.order_by(m.member_id).limit(limit))
    return [row[0] for row in rows]


async def count_members(session: AsyncSession, where: Criteria) -> int:
    query = sa.select(sa.func.count()).select_from(members).where(*_criteria_where(where))
    return int((await session.execute(query)).scalar_one())
