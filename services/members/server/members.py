"""The members gRPC edge: proto <-> domain, authorisation, errors. The scope
and masking rules are written down in members.proto; the masking policy
itself is domain.sees_in_clear / domain.mask_personal."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, ScopeLevel, current_principal
from chassis.crypto import keys_from_env
from chassis.db import utcnow
from chassis.direct import Executor
from chassis.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from chassis.grpcserver import Context
from chassis.idempotency import run_idempotent
from chassis.paging import (
    decode_token,
    encode_token,
    newest_first_after,
    newest_first_token,
    page_size,
)
from chassis.service import ServiceContext
from cornucopia.common.v1 import date_pb2, money_pb2, org_pb2
from cornucopia.members.v1 import events_pb2, members_pb2, members_pb2_grpc
from services.members import events
from services.members.domain import members as domain
from services.members.domain import organisation as org_rules
from services.members.store import members as store
from services.members.store import organisation

E = TypeVar("E", bound=StrEnum)

GENDERS = {
    members_pb2.GENDER_UNSPECIFIED: domain.Gender.UNSPECIFIED,
    members_pb2.GENDER_FEMALE: domain.Gender.FEMALE,
    members_pb2.GENDER_MALE: domain.Gender.MALE,
    members_pb2.GENDER_OTHER: domain.Gender.OTHER,
}
GENDERS_PROTO = {v: k for k, v in GENDERS.items()}
CHANNELS = {
    members_pb2.ENROLLMENT_CHANNEL_STORE: domain.EnrollmentChannel.STORE,
    members_pb2.ENROLLMENT_CHANNEL_CALL_CENTER: domain.EnrollmentChannel.CALL_CENTER,
    members_pb2.ENROLLMENT_CHANNEL_WEBSITE: domain.EnrollmentChannel.WEBSITE,
    members_pb2.ENROLLMENT_CHANNEL_BATCH_IMPORT: domain.EnrollmentChannel.BATCH_IMPORT,
    members_pb2.ENROLLMENT_CHANNEL_PARTNER: domain.EnrollmentChannel.PARTNER,
}
CHANNELS_PROTO = {v: k for k, v in CHANNELS.items()}


def _by_name(wrapper: Any, prefix: str, kind: type[E]) -> dict[Any, E]:
    """Proto enum numbers to the domain's values, matched by name
    (SKIN_TYPE_DRY -> "dry"; UNSPECIFIED -> "")."""
    values = {member.value for member in kind}
    out: dict[Any, E] = {}
    for name, number in wrapper.items():
        suffix = name.removeprefix(prefix).lower()
        value = "" if suffix == "unspecified" else suffix
        if value in values:
            out[number] = kind(value)
    return out


SKIN_TYPES = _by_name(members_pb2.SkinType, "SKIN_TYPE_", domain.SkinType)
INCOME_BANDS = _by_name(members_pb2.IncomeBand, "INCOME_BAND_", domain.IncomeBand)
CONTACT_CHANNELS = _by_name(members_pb2.ContactChannel, "CONTACT_CHANNEL_", domain.ContactChannel)
STATES = _by_name(members_pb2.MemberState, "MEMBER_STATE_", domain.MemberState)
ATTRIBUTE_TYPES = _by_name(members_pb2.AttributeType, "ATTRIBUTE_TYPE_", domain.AttributeType)
FOLLOW_UP_CHANNELS = _by_name(
    members_pb2.FollowUpChannel, "FOLLOW_UP_CHANNEL_", domain.FollowUpChannel
)
FOLLOW_UP_OUTCOMES = _by_name(
    members_pb2.FollowUpOutcome, "FOLLOW_UP_OUTCOME_", domain.FollowUpOutcome
)
FEEDBACK_SUBJECTS = _by_name(
    members_pb2.FeedbackSubject, "FEEDBACK_SUBJECT_", domain.FeedbackSubject
)


def _proto_of(table: Mapping[Any, E]) -> dict[E, Any]:
    return {v: k for k, v in table.items()}


ENROLLING_ROLES = (*STAFF_ROLES, Role.PARTNER)
READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
# Anyone at any store: a member's card works everywhere.
ANY_STORE_ROLES = tuple(STAFF_ROLES)
UPDATING_ROLES = (*STAFF_ROLES, Role.SERVICE)
MANAGING_ROLES = (Role.HQ_ADMIN, Role.REGION_MANAGER, Role.STORE_MANAGER)
DATA_SUBJECT_ROLES = (Role.HQ_ADMIN, Role.CALL_CENTER)
SELECTING_ROLES = (Role.SERVICE, Role.HQ_ADMIN)
SELECT_DEFAULT_PAGE = 1000
SELECT_MAX_PAGE = 5000
MAX_CRITERIA_STORES = 500
MAX_CRITERIA_REGIONS = 100
MAX_CRITERIA_TAGS = 20


def _default_channel(principal: Principal) -> domain.EnrollmentChannel:
    return {
        ScopeLevel.CALL_CENTER: domain.EnrollmentChannel.CALL_CENTER,
        ScopeLevel.PARTNER: domain.EnrollmentChannel.PARTNER,
    }.get(principal.scope.level, domain.EnrollmentChannel.STORE)


def _enum(table: Mapping[Any, E], value: int, path: str, violations: list[FieldViolation]) -> E:
    found = table.get(value)
    if found is None:
        violations.append(FieldViolation(path, "unknown value"))
        return next(iter(table.values()))
    return found


def _date(value: date_pb2.Date) -> domain.Birthday:
    return domain.Birthday(value.year, value.month, value.day)


def _time(message: Any, name: str) -> dt.datetime | None:
    return message.__getattribute__(name).ToDatetime(dt.UTC) if message.HasField(name) else None


def to_enrollment(member: members_pb2.Member) -> domain.Enrollment:
    violations: list[FieldViolation] = []
    gender = _enum(GENDERS, member.gender, "member.gender", violations)
    channel = None
    if member.enrollment_channel != members_pb2.ENROLLMENT_CHANNEL_UNSPECIFIED:
        channel = _enum(
            CHANNELS, member.enrollment_channel, "member.enrollment_channel", violations
        )
    skin_type = _enum(SKIN_TYPES, member.skin_type, "member.skin_type", violations)
    income_band = _enum(INCOME_BANDS, member.income_band, "member.income_band", violations)
    contact = _enum(
        CONTACT_CHANNELS,
        member.preferred_contact_channel,
        "member.preferred_contact_channel",
        violations,
    )
    consents = tuple(
        domain.ConsentChoice(
            _enum(CONTACT_CHANNELS, c.channel, f"member.consents[{i}].channel", violations),
            c.granted,
            c.source.strip(),
        )
        for i, c in enumerate(member.consents)
    )
    if violations:
        raise InvalidArgument(violations)
    address = None
    if member.HasField("address"):
        a = member.address
        address = domain.Address(
            province=a.province,
            city=a.city,
            district=a.district,
            street=a.street,
            postcode=a.postcode,
            coordinates=domain.Coordinates(a.coordinates.latitude, a.coordinates.longitude)
            if a.HasField("coordinates")
            else None,
        )
    return domain.Enrollment(
        home_store_id=member.home_store_id.strip(),
        given_name=member.given_name,
        family_name=member.family_name,
        mobile=member.mobile,
        email=member.email,
        gender=gender,
        birthday=_date(member.birthday) if member.HasField("birthday") else None,
        enrollment_channel=channel,
        preferred_language=member.preferred_language,
        landline=member.landline,
        address=address,
        anniversaries=tuple(
            domain.Anniversary(a.kind.strip(), _date(a.date)) for a in member.anniversaries
        ),
        skin_type=skin_type,
        skin_concerns=tuple(member.skin_concerns),
        occupation=member.occupation,
        income_band=income_band,
        brands_used=tuple(member.brands_used),
        preferences=tuple(member.preferences),
        tags=tuple(member.tags),
        preferred_contact_channel=contact,
        contact_windows=tuple(
            domain.ContactWindow(w.start_time, w.end_time) for w in member.contact_windows
        ),
        consultant_id=member.consultant_id,
        referrer_member_id=member.referrer_member_id.strip(),
        enrolled_at=_time(member, "enroll_time"),
        consents=consents,
        notes=member.notes,
        attributes=dict(member.attributes),
    )


def _stamp(principal: str, store_id: str, at: dt.datetime) -> org_pb2.AuditStamp:
    return org_pb2.AuditStamp(principal=principal, store_id=store_id, time=events.timestamp(at))


def _date_proto(value: domain.Birthday) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def personal_of(file: domain.NewMember) -> domain.Personal:
    return domain.Personal(
        given_name=file.given_name,
        family_name=file.family_name,
        mobile=file.mobile,
        email=file.email,
        landline=file.landline,
        birthday=file.birthday,
        address=file.address,
        anniversaries=file.anniversaries,
        notes=file.notes,
    )


def to_proto(
    record: store.MemberRecord,
    principal: Principal | None = None,
    *,
    clear_mobile: bool = False,
    clear_email: bool = False,
) -> members_pb2.Member:
    """The file as the caller may see it (masked per the proto's rules;
    ``principal`` None means in clear, for internal use)."""
    f = record.file
    personal = personal_of(f)
    masked = (
        principal is not None
        and record.readable
        and not domain.sees_in_clear(principal, f.home_store_id)
    )
    if masked:
        personal = domain.mask_personal(
            personal, clear_mobile=clear_mobile, clear_email=clear_email
        )
    msg = members_pb2.Member(
        member_id=record.member_id,
        home_store_id=f.home_store_id,
        given_name=personal.given_name,
        family_name=personal.family_name,
        mobile=personal.mobile,
        email=personal.email,
        gender=GENDERS_PROTO[f.gender],
        enrollment_channel=CHANNELS_PROTO[f.enrollment_channel],
        preferred_language=f.preferred_language,
        landline=personal.landline,
        anniversaries=[
            members_pb2.Anniversary(kind=a.kind, date=_date_proto(a.date))
            for a in personal.anniversaries
        ],
        skin_type=_proto_of(SKIN_TYPES)[f.skin_type],
        skin_concerns=f.skin_concerns,
        occupation=f.occupation,
        income_band=_proto_of(INCOME_BANDS)[f.income_band],
        brands_used=f.brands_used,
        preferences=f.preferences,
        etag=domain.etag_of(record.version),
        enrolled_by=_stamp(record.enrolled_by, record.enrolled_from_store, record.created_at),
        tags=f.tags,
        preferred_contact_channel=_proto_of(CONTACT_CHANNELS)[f.preferred_contact_channel],
        contact_windows=[
            members_pb2.ContactWindow(start_time=w.start_time, end_time=w.end_time)
            for w in f.contact_windows
        ],
        consultant_id=f.consultant_id,
        referrer_member_id=f.referrer_member_id,
        consents=[
            members_pb2.Consent(
                channel=_proto_of(CONTACT_CHANNELS)[c.channel],
                granted=c.granted,
                update_time=events.timestamp(c.changed_at),
                recorded_by=_stamp(c.changed_by, c.store_id, c.changed_at),
                source=c.source,
            )
            for c in record.consents
        ],
        notes=personal.notes,
        attributes=dict(f.attributes),
        state=_proto_of(STATES)[record.state],
        merged_into=record.merged_into,
        # Zero until the analytics work feeds sales in.
        purchase_summary=members_pb2.PurchaseSummary(
            total_spent=money_pb2.Money(currency_code="", minor_units=0)
        ),
        masked=masked,
    )
    if personal.birthday is not None:
        msg.birthday.CopyFrom(_date_proto(personal.birthday))
    if personal.address is not None:
        a = personal.address
        msg.address.CopyFrom(
            members_pb2.PostalAddress(
                province=a.province,
                city=a.city,
                district=a.district,
                street=a.street,
                postcode=a.postcode,
            )
        )
        if a.coordinates is not None:
            msg.address.coordinates.latitude = a.coordinates.latitude
            msg.address.coordinates.longitude = a.coordinates.longitude
    if f.enrolled_at is not None:
        msg.enroll_time.FromDatetime(f.enrolled_at)
    msg.create_time.FromDatetime(record.created_at)
    msg.update_time.FromDatetime(record.updated_at)
    return msg


def _not_found(member_id: str) -> NotFound:
    return NotFound(
        "no member with this id", reason="MEMBER_NOT_FOUND", metadata={"member_id": member_id}
    )


def _required(value: str, path: str) -> None:
    if not value.strip():
        raise InvalidArgument([FieldViolation(path, "required")])


def _mobile_in_use(existing: str | None) -> AlreadyExists:
    return AlreadyExists(
        "a member with this mobile number already exists",
        reason="MOBILE_IN_USE",
        metadata={"member_id": existing or ""},
    )


def _stale() -> Aborted:
    return Aborted(
        "the member file changed since you read it; read it again", reason="ETAG_MISMATCH"
    )


class MembersServicer(members_pb2_grpc.MembersServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.default_region = os.environ.get("CORNUCOPIA_DEFAULT_REGION", "CN")
        ring, index = keys_from_env("MEMBERS", os.environ, production=ctx.settings.production)
        self.keys = store.Keys(ring, index)

    # --- helpers ---------------------------------------------------------

    @staticmethod
    def _stamp(principal: Principal, now: dt.datetime) -> store.Stamp:
        return store.Stamp(principal.subject, principal.store_id, now)

    @staticmethod
    async def _require_scope(session: AsyncSession, principal: Principal, store_id: str) -> None:
        """The member's home store must be within the caller's scope (the
        region is looked up only for region-scoped callers)."""
        region = None
        if principal.scope.level == ScopeLevel.REGION:
            region = await organisation.region_of_store(session, store_id)
        principal.require_store(store_id, region)

    async def _load(self, session: Executor, member_id: str) -> store.MemberRecord:
        _required(member_id, "member_id")
        record = await store.get_member(session, self.keys, member_id)
        if record is None:
            raise _not_found(member_id)
        return record

    async def _read(self, member_id: str, principal: Principal) -> members_pb2.Member:
        # One statement of the driver's (chassis.direct), without a session.
        async with self.db.direct_reads() as session:
            return to_proto(await self._load(session, member_id), principal)

    async def _validate(
        self,
        session: AsyncSession,
        candidate: domain.Enrollment,
        principal: Principal,
        now: dt.datetime,
        *,
        member_id: str = "",
        referrer_before: str = "",
    ) -> domain.NewMember:
        member = domain.validate_enrollment(
            candidate,
            today=now.date(),
            default_region=self.default_region,
            default_channel=_default_channel(principal),
            definitions=await store.attribute_definitions_by_name(session),
        )
        referrer = member.referrer_member_id
        if referrer:
            found = None
            if referrer != member_id:
                found = await store.get_member(session, self.keys, referrer)
            if found is None:
                raise InvalidArgument(
                    [FieldViolation("member.referrer_member_id", "no such other member")]
                )
            # A new referrer must be an active member (referral rewards go to
            # them); one recorded before may have been archived since.
            if referrer != referrer_before and found.state != domain.MemberState.ACTIVE:
                raise InvalidArgument(
                    [FieldViolation("member.referrer_member_id", "not an active member")]
                )
        return member

    # --- the static file -------------------------------------------------

    async def CreateMember(
        self, request: members_pb2.CreateMemberRequest, context: Context
    ) -> members_pb2.Member:
        principal = current_principal()
        principal.require_role(*ENROLLING_ROLES)
        if not request.HasField("member"):
            raise InvalidArgument([FieldViolation("member", "required")])
        now = utcnow()
        enrollment = to_enrollment(request.member)
        async with self.db.sessions() as session:
            member = await self._validate(session, enrollment, principal, now)
            # Enrolling puts the member into the caller's own files.
            await self._require_scope(session, principal, member.home_store_id)

        async def enroll(session: AsyncSession) -> members_pb2.Member:
            # In the unit of work, not before it: a replay of an enrollment
            # returns the member even if the store has closed since.
            await self._check_links(
                session,
                home_store_id=member.home_store_id,
                consultant_id=member.consultant_id,
            )
            member_id = domain.new_member_id()
            try:
                record = await store.insert_member(
                    session,
                    self.keys,
                    member_id,
                    member,
                    principal=principal.subject,
                    from_store=principal.store_id,
                    now=now,
                )
            except store.MobileTaken:
                raise _mobile_in_use(
                    await store.member_id_by_mobile(session, self.keys, member.mobile)
                ) from None
            await events.member_enrolled(
                session,
                member_id=record.member_id,
                home_store_id=record.home_store_id,
                channel=CHANNELS_PROTO[record.enrollment_channel],
                language=record.preferred_language,
                enrolled_at=now,
                referrer_member_id=member.referrer_member_id,
            )
            # Only the id is kept with the idempotency key: no personal value
            # outside the encrypted columns.
            return members_pb2.Member(member_id=record.member_id)

        created = await run_idempotent(
            self.db,
            method="members.CreateMember",
            request_id=request.request_id,
            request=request,
            response_type=members_pb2.Member,
            work=enroll,
        )
        return await self._read(created.member_id, principal)

    async def GetMember(
        self, request: members_pb2.GetMemberRequest, context: Context
    ) -> members_pb2.Member:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        return await self._read(request.member_id, principal)

    async def UpdateMember(
        self, request: members_pb2.UpdateMemberRequest, context: Context
    ) -> members_pb2.Member:
        principal = current_principal()
        principal.require_role(*UPDATING_ROLES)
        paths = domain.check_update_mask(request.update_mask.paths)
        patch = to_enrollment(request.member)
        now = utcnow()
        async with self.db.transaction() as session:
            before = await self._load(session, request.member.member_id)
            await self._require_scope(session, principal, before.home_store_id)
            domain.require_state(before.state, domain.MemberState.ACTIVE)
            domain.check_etag(request.member.etag, before.version)
            current = domain.profile_of(before.file)
            after = await self._validate(
                session,
                domain.apply_mask(current, patch, paths),
                principal,
                now,
                member_id=before.member_id,
                referrer_before=current.referrer_member_id,
            )
            changed = [name for name in domain.changed_fields(current, after) if name in paths]
            if not changed:
                return to_proto(before, principal)
            await self._check_links(
                session,
                home_store_id=after.home_store_id if "home_store_id" in changed else None,
                consultant_id=after.consultant_id if "consultant_id" in changed else None,
            )
            if "home_store_id" in changed:
                await self._require_scope(session, principal, after.home_store_id)
            try:
                record = await store.update_member(
                    session, self.keys, before, after, changed, stamp=self._stamp(principal, now)
                )
            except store.MobileTaken as taken:
                raise _mobile_in_use(taken.member_id) from None
            except store.StaleVersion:
                raise _stale() from None
            await events.member_updated(session, member_id=record.member_id, fields=changed, at=now)
            if "consultant_id" in changed:
                await events.consultant_changed(
                    session,
                    member_id=record.member_id,
                    from_id=before.file.consultant_id,
                    to_id=after.consultant_id,
                    at=now,
                )
        return to_proto(record, principal)

    @staticmethod
    async def _check_links(
        session: AsyncSession, *, home_store_id: str | None, consultant_id: str | None
    ) -> None:
        """A member's new home store is a store of the tree (a field
        violation otherwise) and open (FAILED_PRECONDITION otherwise); a new
        consultant is an active staff member. None: not changing. The rows
        read stay locked until the change commits (see the organisation
        store)."""
        v = Violations()
        home = None
        if home_store_id is not None:
            home = await organisation.get_store(session, home_store_id, lock="share")
            if home is None:
                v.add("member.home_store_id", "no such store")
        if consultant_id:
            staff = await organisation.get_staff(session, consultant_id, lock="share")
            problem = org_rules.consultant_problem(None if staff is None else staff.state)
            if problem is not None:
                v.add("member.consultant_id", problem)
        v.raise_if_any()
        if home is not None:
            org_rules.require_open_store(home.store_id, closed=home.closed)

    async def LookupMember(
        self, request: members_pb2.LookupMemberRequest, context: Context
    ) -> members_pb2.Member:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        mobile = email = ""
        if bool(request.mobile.strip()) == bool(request.email.strip()):
            raise InvalidArgument([FieldViolation("mobile", "give a mobile or an e-mail")])
        if request.mobile.strip():
            mobile = domain.normalise_mobile(request.mobile, self.default_region) or ""
            if not mobile:
                raise InvalidArgument([FieldViolation("mobile", "not a valid phone number")])
        else:
            email = domain.normalise_email(request.email) or ""
            if not email:
                raise InvalidArgument([FieldViolation("email", "not a valid e-mail address")])
        async with self.db.sessions() as session:
            member_id = (
                await store.member_id_by_mobile(session, self.keys, mobile)
                if mobile
                else await store.member_id_by_email(session, self.keys, email)
            )
            record = await store.get_member(session, self.keys, member_id) if member_id else None
            # A merged duplicate's identifiers find the survivor.
            for _ in range(5):
                if record is None or record.state != domain.MemberState.MERGED:
                    break
                record = await store.get_member(session, self.keys, record.merged_into)
        if record is None:
            raise NotFound("no member with this identifier", reason="MEMBER_NOT_FOUND")
        return to_proto(
            record,
            principal,
            clear_mobile=bool(mobile) and record.mobile == mobile,
            clear_email=bool(email) and record.email.lower() == email.lower(),
        )

    async def ListMembers(
        self, request: members_pb2.ListMembersRequest, context: Context
    ) -> members_pb2.ListMembersResponse:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        limit = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        now = utcnow()
        violations: list[FieldViolation] = []
        gender = _enum(GENDERS, request.gender, "gender", violations)
        consent = _enum(CONTACT_CHANNELS, request.consent_channel, "consent_channel", violations)
        state = domain.MemberState.ACTIVE
        if request.state != members_pb2.MEMBER_STATE_UNSPECIFIED:
            state = _enum(STATES, request.state, "state", violations)
        if not 0 <= request.birth_month <= 12:
            violations.append(FieldViolation("birth_month", "1 to 12"))
        if violations:
            raise InvalidArgument(violations)
        earliest, latest = domain.birth_years_for_ages(request.min_age, request.max_age, now.date())
        async with self.db.sessions() as session:
            stores: tuple[str, ...] | None = None
            if request.home_store_id:
                stores = (request.home_store_id,)
            if request.region_id:
                in_region = [
                    s
                    for s in (stores or await store.home_store_ids(session))
                    if await organisation.region_of_store(session, s) == request.region_id
                ]
                stores = tuple(in_region)
            where = store.MemberFilter(
                home_store_ids=stores,
                gender=gender if gender != domain.Gender.UNSPECIFIED else None,
                earliest_birth_year=earliest,
                latest_birth_year=latest,
                birth_month=request.birth_month or None,
                tags=tuple(t.strip().lower() for t in request.tags if t.strip()),
                enrolled_after=_time(request, "enrolled_after"),
                enrolled_before=_time(request, "enrolled_before"),
                consultant_id=request.consultant_id.strip(),
                consent_channel=consent if consent != domain.ContactChannel.UNSPECIFIED else None,
                state=state,
            )
            records = await store.list_members(
                session, self.keys, where, after=after, limit=limit + 1
            )
        response = members_pb2.ListMembersResponse(
            members=[to_proto(r, principal) for r in records[:limit]]
        )
        if len(records) > limit:
            last = records[limit - 1]
            assert last.file.enrolled_at is not None
            response.next_page_token = newest_first_token(last.file.enrolled_at, last.member_id)
        return response

    async def SelectMembers(
        self, request: members_pb2.SelectMembersRequest, context: Context
    ) -> members_pb2.SelectMembersResponse:
        current_principal().require_role(*SELECTING_ROLES)
        where = criteria_of(request.criteria)
        limit = page_size(request.page_size, SELECT_DEFAULT_PAGE, SELECT_MAX_PAGE)
        key = decode_token(request.page_token)
        after = ""
        if key is not None:
            if not isinstance(key.get("after"), str):
                raise InvalidArgument(
                    [FieldViolation("page_token", "not a token this service issued")]
                )
            after = key["after"]
        async with self.db.sessions() as session:
            ids = await store.select_member_ids(session, where, after=after, limit=limit + 1)
        response = members_pb2.SelectMembersResponse(member_ids=ids[:limit])
        if len(ids) > limit:
            response.next_page_token = encode_token({"after": ids[limit - 1]})
        return response

    async def CountMembers(
        self, request: members_pb2.CountMembersRequest, context: Context
    ) -> members_pb2.CountMembersResponse:
        current_principal().require_role(*SELECTING_ROLES)
        where = criteria_of(request.criteria)
        async with self.db.sessions() as session:
            count = await store.count_members(session, where)
        return members_pb2.CountMembersResponse(count=count)

    async def ListMemberChanges(
        self, request: members_pb2.ListMemberChangesRequest, context: Context
    ) -> members_pb2.ListMemberChangesResponse:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        limit = page_size(request.page_size)
        key = decode_token(request.page_token)
        before_seq = int(key["seq"]) if key and isinstance(key.get("seq"), int) else None
        async with self.db.sessions() as session:
            record = await self._load(session, request.member_id)
            changes = await store.list_changes(
                session, self.keys, record.member_id, before_seq=before_seq, limit=limit + 1
            )
        clear = domain.sees_in_clear(principal, record.home_store_id)
        response = members_pb2.ListMemberChangesResponse()
        for change in changes[:limit]:
            item = response.changes.add(
                change_id=str(change.seq),
                member_id=change.member_id,
                operation=change.operation,
                fields=change.fields,
                changed_by=_stamp(change.principal, change.store_id, change.changed_at),
            )
            if clear:
                for name, value in change.old_values.items():
                    item.old_values[name] = json.dumps(value, ensure_ascii=False)
                for name, value in change.new_values.items():
                    item.new_values[name] = json.dumps(value, ensure_ascii=False)
        if len(changes) > limit:
            response.next_page_token = encode_token({"seq": changes[limit - 1].seq})
        return response

    # --- lifecycle -------------------------------------------------------

    async def _change_state(
        self,
        member_id: str,
        etag: str,
        allowed: domain.MemberState,
        target: domain.MemberState,
        note: Mapping[str, Any] | None = None,
    ) -> members_pb2.Member:
        principal = current_principal()
        principal.require_role(*MANAGING_ROLES)
        now = utcnow()
        async with self.db.transaction() as session:
            before = await self._load(session, member_id)
            await self._require_scope(session, principal, before.home_store_id)
            domain.require_state(before.state, allowed)
            domain.check_etag(etag, before.version)
            try:
                record = await store.set_state(
                    session, self.keys, before, target, self._stamp(principal, now), note=note
                )
            except store.StaleVersion:
                raise _stale() from None
            if target == domain.MemberState.ARCHIVED:
                await events.member_archived(session, member_id=member_id, at=now)
            else:
                await events.member_reactivated(session, member_id=member_id, at=now)
        return to_proto(record, principal)

    async def ArchiveMember(
        self, request: members_pb2.ArchiveMemberRequest, context: Context
    ) -> members_pb2.Member:
        if len(request.reason) > domain.MAX_WORD_LENGTH * 4:
            raise InvalidArgument([FieldViolation("reason", "at most 240 characters")])
        return await self._change_state(
            request.member_id,
            request.etag,
            domain.MemberState.ACTIVE,
            domain.MemberState.ARCHIVED,
            {"reason": request.reason.strip()} if request.reason.strip() else None,
        )

    async def ReactivateMember(
        self, request: members_pb2.ReactivateMemberRequest, context: Context
    ) -> members_pb2.Member:
        return await self._change_state(
            request.member_id,
            request.etag,
            domain.MemberState.ARCHIVED,
            domain.MemberState.ACTIVE,
        )

    async def MergeMembers(
        self, request: members_pb2.MergeMembersRequest, context: Context
    ) -> members_pb2.Member:
        principal = current_principal()
        principal.require_role(*MANAGING_ROLES)
        violations = []
        if not request.survivor_member_id:
            violations.append(FieldViolation("survivor_member_id", "required"))
        if not request.duplicate_member_id:
            violations.append(FieldViolation("duplicate_member_id", "required"))
        elif request.duplicate_member_id == request.survivor_member_id:
            violations.append(FieldViolation("duplicate_member_id", "must be another member"))
        if violations:
            raise InvalidArgument(violations)
        now = utcnow()

        async def merge(session: AsyncSession) -> members_pb2.Member:
            survivor = await self._load(session, request.survivor_member_id)
            duplicate = await self._load(session, request.duplicate_member_id)
            for record in (survivor, duplicate):
                await self._require_scope(session, principal, record.home_store_id)
            domain.require_state(survivor.state, domain.MemberState.ACTIVE)
            domain.require_state(
                duplicate.state, domain.MemberState.ACTIVE, domain.MemberState.ARCHIVED
            )
            stamp = self._stamp(principal, now)
            current = domain.profile_of(survivor.file)
            merged = domain.merge_profiles(current, domain.profile_of(duplicate.file))
            if merged.referrer_member_id in (survivor.member_id, duplicate.member_id):
                merged = dataclasses.replace(merged, referrer_member_id=current.referrer_member_id)
            after = await self._validate(
                session,
                merged,
                principal,
                now,
                member_id=survivor.member_id,
                referrer_before=current.referrer_member_id,
            )
            changed = list(domain.changed_fields(current, after))
            try:
                if changed:
                    await store.update_member(
                        session, self.keys, survivor, after, changed, stamp=stamp, operation="merge"
                    )
                await store.move_dynamic_file(
                    session, self.keys, duplicate.member_id, survivor.member_id
                )
                await store.set_state(
                    session,
                    self.keys,
                    duplicate,
                    domain.MemberState.MERGED,
                    stamp,
                    merged_into=survivor.member_id,
                )
            except store.StaleVersion:
                raise _stale() from None
            await store.record_change(
                session,
                await store.cipher_for(session, self.keys, survivor.member_id),
                survivor.member_id,
                operation="merge",
                fields=("merged_from",),
                old={},
                new={"merged_from": duplicate.member_id},
                stamp=stamp,
            )
            await store.touch(session, survivor.member_id, now)
            await events.member_merged(
                session,
                survivor_id=survivor.member_id,
                duplicate_id=duplicate.member_id,
                at=now,
            )
            if changed:
                await events.member_updated(
                    session, member_id=survivor.member_id, fields=changed, at=now
                )
            return members_pb2.Member(member_id=survivor.member_id)

        done = await run_idempotent(
            self.db,
            method="members.MergeMembers",
            request_id=request.request_id,
            request=request,
            response_type=members_pb2.Member,
            work=merge,
        )
        return await self._read(done.member_id, principal)

    async def ReassignConsultant(
        self, request: members_pb2.ReassignConsultantRequest, context: Context
    ) -> members_pb2.ReassignConsultantResponse:
        principal = current_principal()
        principal.require_role(*MANAGING_ROLES)
        source, target = request.from_consultant_id.strip(), request.to_consultant_id.strip()
        violations = []
        if not source:
            violations.append(FieldViolation("from_consultant_id", "required"))
        if not target:
            violations.append(FieldViolation("to_consultant_id", "required"))
        elif target == source:
            violations.append(FieldViolation("to_consultant_id", "must differ"))
        if violations:
            raise InvalidArgument(violations)
        now = utcnow()

        async def reassign(session: AsyncSession) -> members_pb2.ReassignConsultantResponse:
            # The members' new consultant must be able to look after them;
            # the old one may have left (that is when this is needed most).
            await self._require_active_staff(session, target)
            theirs = dict(await store.members_of_consultant(session, source))
            chosen: list[tuple[str, str]] = []
            if request.member_ids:
                bad = [
                    FieldViolation(f"member_ids[{i}]", "not looked after by from_consultant_id")
                    for i, member_id in enumerate(request.member_ids)
                    if member_id not in theirs
                ]
                if bad:
                    raise InvalidArgument(bad)
                chosen = [(m, theirs[m]) for m in dict.fromkeys(request.member_ids)]
                for _, store_id in chosen:
                    await self._require_scope(session, principal, store_id)
            else:
                for member_id, store_id in theirs.items():
                    if await self._in_scope(session, principal, store_id):
                        chosen.append((member_id, store_id))
            moved = []
            stamp = self._stamp(principal, now)
            for member_id, _ in chosen:
                if await store.set_consultant(
                    session, self.keys, member_id, source, target, stamp=stamp
                ):
                    moved.append(member_id)
                    await events.consultant_changed(
                        session, member_id=member_id, from_id=source, to_id=target, at=now
                    )
            return members_pb2.ReassignConsultantResponse(member_ids=moved)

        return await run_idempotent(
            self.db,
            method="members.ReassignConsultant",
            request_id=request.request_id,
            request=request,
            response_type=members_pb2.ReassignConsultantResponse,
            work=reassign,
        )

    @staticmethod
    async def _require_active_staff(session: AsyncSession, staff_id: str) -> None:
        found = await organisation.get_staff(session, staff_id, lock="share")
        problem = org_rules.consultant_problem(None if found is None else found.state)
        if problem is not None:
            raise FailedPrecondition(
                f"to_consultant_id: {problem}",
                reason="STAFF_NOT_FOUND" if found is None else "STAFF_LEFT",
                metadata={"staff_id": staff_id},
            )

    async def _in_scope(self, session: AsyncSession, principal: Principal, store_id: str) -> bool:
        try:
            await self._require_scope(session, principal, store_id)
        except PermissionDenied:
            return False
        return True

    # --- the dynamic file --------------------------------------------------

    async def UpdateConsent(
        self, request: members_pb2.UpdateConsentRequest, context: Context
    ) -> members_pb2.Member:
        principal = current_principal()
        # Services too: notify withdraws consent when a member opts out by
        # an SMS reply or an unsubscribe link.
        principal.require_role(*ANY_STORE_ROLES, Role.SERVICE)
        violations: list[FieldViolation] = []
        channel = _enum(CONTACT_CHANNELS, request.channel, "channel", violations)
        if channel == domain.ContactChannel.UNSPECIFIED:
            violations.append(FieldViolation("channel", "required"))
        if len(request.source) > 60:
            violations.append(FieldViolation("source", "at most 60 characters"))
        if violations:
            raise InvalidArgument(violations)
        now = utcnow()
        async with self.db.transaction() as session:
            record = await self._load(session, request.member_id)
            domain.require_state(
                record.state, domain.MemberState.ACTIVE, domain.MemberState.ARCHIVED
            )
            stamp = self._stamp(principal, now)
            choice = domain.ConsentChoice(channel, request.granted, request.source.strip())
            if await store.set_consent(session, record.member_id, choice, stamp):
                await store.record_change(
                    session,
                    await store.cipher_for(session, self.keys, record.member_id),
                    record.member_id,
                    operation="consent",
                    fields=(f"consents.{channel.value}",),
                    old={},
                    new={f"consents.{channel.value}": request.granted},
                    stamp=stamp,
                )
                await store.touch(session, record.member_id, now)
                await events.consent_changed(
                    session,
                    member_id=record.member_id,
                    channel=request.channel,
                    granted=request.granted,
                    at=now,
                )
            record = await self._load(session, record.member_id)
        return to_proto(record, principal)

    async def _writable_member(
        self, session: AsyncSession, member_id: str
    ) -> tuple[store.MemberRecord, Any]:
        record = await self._load(session, member_id)
        domain.require_state(record.state, domain.MemberState.ACTIVE, domain.MemberState.ARCHIVED)
        cipher = await store.cipher_for(session, self.keys, member_id)
        if cipher is None:
            domain.require_state(domain.MemberState.ERASED, domain.MemberState.ACTIVE)
        return record, cipher

    async def RecordFollowUp(
        self, request: members_pb2.RecordFollowUpRequest, context: Context
    ) -> members_pb2.FollowUp:
        principal = current_principal()
        principal.require_role(*ANY_STORE_ROLES)
        f = request.follow_up
        violations: list[FieldViolation] = []
        channel = _enum(FOLLOW_UP_CHANNELS, f.channel, "follow_up.channel", violations)
        outcome = _enum(FOLLOW_UP_OUTCOMES, f.outcome, "follow_up.outcome", violations)
        if violations:
            raise InvalidArgument(violations)
        now = utcnow()
        follow_up = domain.validate_follow_up(
            domain.NewFollowUp(
                member_id=f.member_id.strip(),
                channel=channel,
                outcome=outcome,
                duration_seconds=f.duration_seconds,
                next_step=f.next_step,
                staff_id=f.staff_id.strip() or principal.subject,
                occurred_at=_time(f, "occur_time") or now,
            ),
            now,
        )

        async def record(session: AsyncSession) -> members_pb2.FollowUp:
            _, cipher = await self._writable_member(session, follow_up.member_id)
            saved = await store.insert_follow_up(
                session, cipher, follow_up, self._stamp(principal, now)
            )
            message = self._follow_up_proto(saved, with_text=False)
            await events.follow_up_recorded(
                session,
                message=events_pb2.FollowUpRecorded(
                    follow_up_id=message.follow_up_id,
                    member_id=message.member_id,
                    channel=message.channel,
                    outcome=message.outcome,
                    staff_id=message.staff_id,
                    store_id=message.store_id,
                    occur_time=message.occur_time,
                ),
            )
            # The free text stays out of the idempotency record.
            return message

        saved = await run_idempotent(
            self.db,
            method="members.RecordFollowUp",
            request_id=request.request_id,
            request=request,
            response_type=members_pb2.FollowUp,
            work=record,
        )
        saved.next_step = follow_up.next_step
        return saved

    @staticmethod
    def _follow_up_proto(saved: store.FollowUpRecord, *, with_text: bool) -> members_pb2.FollowUp:
        f = saved.follow_up
        return members_pb2.FollowUp(
            follow_up_id=saved.follow_up_id,
            member_id=f.member_id,
            channel=_proto_of(FOLLOW_UP_CHANNELS)[f.channel],
            outcome=_proto_of(FOLLOW_UP_OUTCOMES)[f.outcome],
            duration_seconds=f.duration_seconds,
            next_step=f.next_step if with_text else "",
            staff_id=f.staff_id,
            store_id=saved.store_id,
            occur_time=events.timestamp(f.occurred_at),
            create_time=events.timestamp(saved.created_at),
        )

    async def ListFollowUps(
        self, request: members_pb2.ListFollowUpsRequest, context: Context
    ) -> members_pb2.ListFollowUpsResponse:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        limit = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            record = await self._load(session, request.member_id)
            found = await store.list_follow_ups(
                session, self.keys, record.member_id, after=after, limit=limit + 1
            )
        clear = domain.sees_in_clear(principal, record.home_store_id)
        response = members_pb2.ListFollowUpsResponse(
            follow_ups=[self._follow_up_proto(f, with_text=clear) for f in found[:limit]]
        )
        if len(found) > limit:
            last = found[limit - 1]
            response.next_page_token = newest_first_token(
                last.follow_up.occurred_at, last.follow_up_id
            )
        return response

    async def RecordFeedback(
        self, request: members_pb2.RecordFeedbackRequest, context: Context
    ) -> members_pb2.Feedback:
        principal = current_principal()
        principal.require_role(*ANY_STORE_ROLES)
        b = request.feedback
        violations: list[FieldViolation] = []
        subject = _enum(FEEDBACK_SUBJECTS, b.subject, "feedback.subject", violations)
        if violations:
            raise InvalidArgument(violations)
        feedback = domain.validate_feedback(
            domain.NewFeedback(
                member_id=b.member_id.strip(),
                subject=subject,
                subject_ref=b.subject_ref,
                rating=b.rating,
                text=b.text,
            )
        )
        now = utcnow()

        async def record(session: AsyncSession) -> members_pb2.Feedback:
            _, cipher = await self._writable_member(session, feedback.member_id)
            saved = await store.insert_feedback(
                session, cipher, feedback, self._stamp(principal, now)
            )
            return self._feedback_proto(saved, with_text=False)

        saved = await run_idempotent(
            self.db,
            method="members.RecordFeedback",
            request_id=request.request_id,
            request=request,
            response_type=members_pb2.Feedback,
            work=record,
        )
        saved.text = feedback.text
        return saved

    @staticmethod
    def _feedback_proto(saved: store.FeedbackRecord, *, with_text: bool) -> members_pb2.Feedback:
        b = saved.feedback
        return members_pb2.Feedback(
            feedback_id=saved.feedback_id,
            member_id=b.member_id,
            subject=_proto_of(FEEDBACK_SUBJECTS)[b.subject],
            subject_ref=b.subject_ref,
            rating=b.rating,
            text=b.text if with_text else "",
            recorded_by=_stamp(saved.principal, saved.store_id, saved.created_at),
        )

    async def ListFeedback(
        self, request: members_pb2.ListFeedbackRequest, context: Context
    ) -> members_pb2.ListFeedbackResponse:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        limit = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            record = await self._load(session, request.member_id)
            found = await store.list_feedback(
                session, self.keys, record.member_id, after=after, limit=limit + 1
            )
        clear = domain.sees_in_clear(principal, record.home_store_id)
        response = members_pb2.ListFeedbackResponse(
            feedback=[self._feedback_proto(b, with_text=clear) for b in found[:limit]]
        )
        if len(found) > limit:
            last = found[limit - 1]
            response.next_page_token = newest_first_token(last.created_at, last.feedback_id)
        return response

    # --- data-subject rights ---------------------------------------------------

    async def ExportMemberData(
        self, request: members_pb2.ExportMemberDataRequest, context: Context
    ) -> members_pb2.ExportMemberDataResponse:
        principal = current_principal()
        principal.require_role(*DATA_SUBJECT_ROLES)
        async with self.db.sessions() as session:
            record = await self._load(session, request.member_id)
            changes = await store.list_changes(
                session, self.keys, record.member_id, before_seq=None, limit=1_000_000
            )
            follow_ups = await store.list_follow_ups(
                session, self.keys, record.member_id, after=None, limit=1_000_000
            )
            feedback = await store.list_feedback(
                session, self.keys, record.member_id, after=None, limit=1_000_000
            )
        document = {
            "member_id": record.member_id,
            "state": record.state.value,
            "merged_into": record.merged_into,
            "file": domain.plain(record.file),
            "consents": domain.plain(record.consents),
            "enrolled_by": record.enrolled_by,
            "enrolled_from_store": record.enrolled_from_store,
            "created_at": record.created_at.isoformat(),
            "updated_at": record.updated_at.isoformat(),
            "history": domain.plain(changes),
            "follow_ups": domain.plain(follow_ups),
            "feedback": domain.plain(feedback),
        }
        return members_pb2.ExportMemberDataResponse(
            json=json.dumps(document, ensure_ascii=False, indent=2)
        )

    async def EraseMember(
        self, request: members_pb2.EraseMemberRequest, context: Context
    ) -> members_pb2.Member:
        principal = current_principal()
        principal.require_role(*DATA_SUBJECT_ROLES)
        now = utcnow()
        async with self.db.transaction() as session:
            record = await self._load(session, request.member_id)
            if record.state != domain.MemberState.ERASED:
                await store.erase_member(session, record.member_id, self._stamp(principal, now))
                await events.member_erased(session, member_id=record.member_id, at=now)
            record = await self._load(session, record.member_id)
        return to_proto(record, principal)

    # --- custom attributes -------------------------------------------------------

    async def CreateAttributeDefinition(
        self, request: members_pb2.CreateAttributeDefinitionRequest, context: Context
    ) -> members_pb2.AttributeDefinition:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        d = request.attribute_definition
        violations: list[FieldViolation] = []
        kind = ATTRIBUTE_TYPES.get(d.type)
        if kind is None:
            violations.append(FieldViolation("attribute_definition.type", "required"))
        if violations or kind is None:
            raise InvalidArgument(violations)
        definition = domain.validate_attribute_definition(
            domain.AttributeDefinition(
                name=d.name.strip(),
                type=kind,
                allowed_values=tuple(d.allowed_values),
                description=d.description.strip(),
            )
        )
        async with self.db.transaction() as session:
            try:
                await store.insert_attribute_definition(
                    session, definition, self._stamp(principal, utcnow())
                )
            except store.AttributeExists:
                raise AlreadyExists(
                    "an attribute with this name exists",
                    reason="ATTRIBUTE_EXISTS",
                    metadata={"name": definition.name},
                ) from None
        return _definition_proto(definition)

    async def ListAttributeDefinitions(
        self, request: members_pb2.ListAttributeDefinitionsRequest, context: Context
    ) -> members_pb2.ListAttributeDefinitionsResponse:
        current_principal().require_role(*READING_ROLES)
        async with self.db.sessions() as session:
            found = await store.attribute_definitions_by_name(session)
        return members_pb2.ListAttributeDefinitionsResponse(
            attribute_definitions=[_definition_proto(d) for d in found.values()]
        )


def criteria_of(criteria: members_pb2.MemberCriteria) -> store.Criteria:
    """Checks segment criteria; every problem named as criteria.<field>."""
    v = Violations()

    def ids(values: Any, name: str, most: int, longest: int) -> tuple[str, ...]:
        out = tuple(dict.fromkeys(x.strip() for x in values))
        if len(out) > most:
            v.add(f"criteria.{name}", f"at most {most}")
        if any(not x or len(x) > longest for x in out):
            v.add(f"criteria.{name}", f"each non-empty, at most {longest} characters")
        return out

    stores = ids(criteria.home_store_ids, "home_store_ids", MAX_CRITERIA_STORES, 32)
    regions = ids(criteria.region_ids, "region_ids", MAX_CRITERIA_REGIONS, 32)
    tags = tuple(dict.fromkeys(t.strip().lower() for t in criteria.tags))
    if len(tags) > MAX_CRITERIA_TAGS:
        v.add("criteria.tags", f"at most {MAX_CRITERIA_TAGS}")
    if any(not t or len(t) > 40 for t in tags):
        v.add("criteria.tags", "each non-empty, at most 40 characters")
    months = tuple(sorted(set(criteria.birth_months)))
    if any(not 1 <= month <= 12 for month in months):
        v.add("criteria.birth_months", "each 1 to 12")
    genders: list[domain.Gender] = []
    for number in dict.fromkeys(criteria.genders):
        gender = GENDERS.get(number)
        if gender is None or gender == domain.Gender.UNSPECIFIED:
            v.add("criteria.genders", "each a gender (not UNSPECIFIED)")
            break
        genders.append(gender)
    states: list[domain.MemberState] = []
    for state_number in dict.fromkeys(criteria.states):
        state = STATES.get(state_number)
        if state is None:
            v.add("criteria.states", "each a member state (not UNSPECIFIED)")
            break
        states.append(state)
    channels: list[domain.ContactChannel] = []
    for channel_number in dict.fromkeys(criteria.consent_channels):
        channel = CONTACT_CHANNELS.get(channel_number)
        if channel is None or channel == domain.ContactChannel.UNSPECIFIED:
            v.add("criteria.consent_channels", "each a contact channel (not UNSPECIFIED)")
            break
        channels.append(channel)
    after = _time(criteria, "enrolled_after")
    before = _time(criteria, "enrolled_before")
    if after is not None and before is not None and after >= before:
        v.add("criteria.enrolled_before", "after enrolled_after")
    v.raise_if_any("the segment criteria are invalid")
    return store.Criteria(
        home_store_ids=stores,
        region_ids=regions,
        birth_months=months,
        genders=tuple(genders),
        enrolled_after=after,
        enrolled_before=before,
        states=tuple(states) or (domain.MemberState.ACTIVE,),
        consent_channels=tuple(channels),
        tags=tags,
    )


def _definition_proto(definition: domain.AttributeDefinition) -> members_pb2.AttributeDefinition:
    return members_pb2.AttributeDefinition(
        name=definition.name,
        type=_proto_of(ATTRIBUTE_TYPES)[definition.type],
        allowed_values=definition.allowed_values,
        description=definition.description,
    )
