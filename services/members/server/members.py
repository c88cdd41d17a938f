"""The members gRPC edge: proto <-> domain, authorisation, errors."""

from __future__ import annotations

import os

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, ScopeLevel, current_principal
from chassis.crypto import keys_from_env
from chassis.db import utcnow
from chassis.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound
from chassis.grpcserver import Context
from chassis.idempotency import run_idempotent
from chassis.service import ServiceContext
from cornucopia.common.v1 import date_pb2, org_pb2
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.members import events
from services.members.domain import members as domain
from services.members.store import members as store

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

ENROLLING_ROLES = (*STAFF_ROLES, Role.PARTNER)
READING_ROLES = (*STAFF_ROLES, Role.SERVICE)


def _default_channel(principal: Principal) -> domain.EnrollmentChannel:
    return {
        ScopeLevel.CALL_CENTER: domain.EnrollmentChannel.CALL_CENTER,
        ScopeLevel.PARTNER: domain.EnrollmentChannel.PARTNER,
    }.get(principal.scope.level, domain.EnrollmentChannel.STORE)


def to_enrollment(member: members_pb2.Member) -> domain.Enrollment:
    violations: list[FieldViolation] = []
    if member.gender not in GENDERS:
        violations.append(FieldViolation("member.gender", "unknown value"))
    channel = None
    if member.enrollment_channel != members_pb2.ENROLLMENT_CHANNEL_UNSPECIFIED:
        channel = CHANNELS.get(member.enrollment_channel)
        if channel is None:
            violations.append(FieldViolation("member.enrollment_channel", "unknown value"))
    if violations:
        raise InvalidArgument(violations)
    birthday = None
    if member.HasField("birthday"):
        b = member.birthday
        birthday = domain.Birthday(b.year, b.month, b.day)
    return domain.Enrollment(
        home_store_id=member.home_store_id.strip(),
        given_name=member.given_name,
        family_name=member.family_name,
        mobile=member.mobile,
        email=member.email,
        gender=GENDERS[member.gender],
        birthday=birthday,
        enrollment_channel=channel,
        preferred_language=member.preferred_language,
    )


def to_proto(record: store.MemberRecord) -> members_pb2.Member:
    msg = members_pb2.Member(
        member_id=record.member_id,
        home_store_id=record.home_store_id,
        given_name=record.given_name,
        family_name=record.family_name,
        mobile=record.mobile,
        email=record.email,
        gender=GENDERS_PROTO[record.gender],
        enrollment_channel=CHANNELS_PROTO[record.enrollment_channel],
        preferred_language=record.preferred_language,
        etag=f'W/"{record.version}"',
        enrolled_by=org_pb2.AuditStamp(
            principal=record.enrolled_by,
            store_id=record.enrolled_from_store,
            time=events.timestamp(record.created_at),
        ),
    )
    if record.birthday is not None:
        msg.birthday.CopyFrom(
            date_pb2.Date(
                year=record.birthday.year, month=record.birthday.month, day=record.birthday.day
            )
        )
    msg.create_time.FromDatetime(record.created_at)
    msg.update_time.FromDatetime(record.updated_at)
    return msg


class MembersServicer(members_pb2_grpc.MembersServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.default_region = os.environ.get("CORNUCOPIA_DEFAULT_REGION", "CN")
        ring, index = keys_from_env("MEMBERS", os.environ, production=ctx.settings.production)
        self.keys = store.Keys(ring, index)

    async def CreateMember(
        self, request: members_pb2.CreateMemberRequest, context: Context
    ) -> members_pb2.Member:
        principal = current_principal()
        principal.require_role(*ENROLLING_ROLES)
        if not request.HasField("member"):
            raise InvalidArgument([FieldViolation("member", "required")])
        now = utcnow()
        member = domain.validate_enrollment(
            to_enrollment(request.member),
            today=now.date(),
            default_region=self.default_region,
            default_channel=_default_channel(principal),
        )
        # Enrolling into a store's files is that store's business (or its
        # region's, or HQ's and the call center's for the whole chain).
        principal.require_store(member.home_store_id)

        async def enroll(session: AsyncSession) -> members_pb2.Member:
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
                existing = await store.member_id_by_mobile(session, self.keys, member.mobile)
                raise AlreadyExists(
                    "a member with this mobile number already exists",
                    reason="MOBILE_IN_USE",
                    metadata={"member_id": existing or ""},
                ) from None
            await events.member_enrolled(
                session,
                member_id=record.member_id,
                home_store_id=record.home_store_id,
                channel=CHANNELS_PROTO[record.enrollment_channel],
                language=record.preferred_language,
                enrolled_at=now,
            )
            return to_proto(record)

        return await run_idempotent(
            self.db,
            method="members.CreateMember",
            request_id=request.request_id,
            request=request,
            response_type=members_pb2.Member,
            work=enroll,
        )

    async def GetMember(
        self, request: members_pb2.GetMemberRequest, context: Context
    ) -> members_pb2.Member:
        current_principal().require_role(*READING_ROLES)
        if not request.member_id:
            raise InvalidArgument([FieldViolation("member_id", "required")])
        async with self.db.sessions() as session:
            record = await store.get_member(session, self.keys, request.member_id)
        if record is None:
            raise NotFound(
                "no member with this id",
                reason="MEMBER_NOT_FOUND",
                metadata={"member_id": request.member_id},
            )
        return to_proto(record)
