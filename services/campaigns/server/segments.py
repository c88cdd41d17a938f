"""SegmentsService: named member segments kept as data (members'
MemberCriteria as JSON) with a version; members checks and evaluates the
criteria (CountMembers, SelectMembers). The rules are in segments.proto."""

from __future__ import annotations

import re

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import Role, current_principal
from chassis.db import utcnow
from chassis.errors import Aborted, AlreadyExists, NotFound, Violations
from chassis.grpcserver import Context
from chassis.idempotency import run_idempotent
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.campaigns.v1 import segments_pb2 as pb
from cornucopia.campaigns.v1 import segments_pb2_grpc
from cornucopia.members.v1 import members_pb2
from services.campaigns import coupon_ledger
from services.campaigns.server.followups import members_client
from services.campaigns.server.pricing import required, stamp_proto, timestamp
from services.campaigns.store import segments as store
from services.campaigns.store.segments import SegmentRecord

WRITING_ROLES = (Role.HQ_ADMIN,)
READING_ROLES = (Role.HQ_ADMIN, Role.SERVICE)
SEGMENT_ID = re.compile(r"^[A-Z0-9_-]{1,40}$")
SAMPLE_SIZE = 20


def segment_not_found(segment_id: str) -> NotFound:
    return NotFound(
        "no segment with this id", reason="SEGMENT_NOT_FOUND", metadata={"segment_id": segment_id}
    )


def to_proto(record: SegmentRecord) -> pb.Segment:
    return pb.Segment(
        segment_id=record.segment_id,
        name=record.name,
        criteria=coupon_ledger.criteria_of(record.criteria),
        version=record.version,
        created=stamp_proto(record.created_by, record.created_store_id, record.created_at),
        updated=stamp_proto(record.updated_by, record.updated_store_id, record.updated_at),
    )


def _checked(segment: pb.Segment) -> tuple[str, str]:
    v = Violations()
    segment_id = segment.segment_id.strip()
    name = segment.name.strip()
    if not SEGMENT_ID.match(segment_id):
        v.add("segment.segment_id", "1 to 40 upper-case letters, digits, '-' or '_'")
    if not 1 <= len(name) <= 100:
        v.add("segment.name", "1 to 100 characters")
    v.raise_if_any()
    return segment_id, name


class SegmentsServicer(segments_pb2_grpc.SegmentsServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db
        self.members = members_client(ctx)

    async def _load(self, session: AsyncSession, segment_id: str) -> SegmentRecord:
        found = await store.get_segment(session, segment_id)
        if found is None:
            raise segment_not_found(segment_id)
        return found

    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Context) -> pb.Segment:
        principal = current_principal()
        principal.require_role(*WRITING_ROLES)
        segment_id, name = _checked(request.segment)
        # Members checks the rules (and they are then known to evaluate).
        await self.members.count_members(request.segment.criteria)
        now = utcnow()
        record = SegmentRecord(
            segment_id=segment_id,
            name=name,
            criteria=coupon_ledger.criteria_json(request.segment.criteria),
            version=1,
            created_by=principal.subject,
            created_store_id=principal.store_id,
            created_at=now,
            updated_by=principal.subject,
            updated_store_id=principal.store_id,
            updated_at=now,
        )

        async def create(session: AsyncSession) -> pb.Segment:
            try:
                await store.insert_segment(session, record)
            except store.SegmentExists:
                raise AlreadyExists(
                    "a segment with this id exists",
                    reason="SEGMENT_EXISTS",
                    metadata={"segment_id": segment_id},
                ) from None
            return to_proto(record)

        return await run_idempotent(
            self.db,
            method="CreateSegment",
            request_id=request.request_id,
            request=request,
            response_type=pb.Segment,
            work=create,
        )

    async def UpdateSegment(self, request: pb.UpdateSegmentRequest, context: Context) -> pb.Segment:
        principal = current_principal()
        principal.require_role(*WRITING_ROLES)
        segment_id, name = _checked(request.segment)
        await self.members.count_members(request.segment.criteria)
        async with self.db.transaction() as session:
            current = await self._load(session, segment_id)
            expected = request.segment.version or current.version
            if not await store.update_segment(
                session,
                segment_id,
                version=expected,
                name=name,
                criteria=coupon_ledger.criteria_json(request.segment.criteria),
                by=principal.subject,
                store_id=principal.store_id,
                at=utcnow(),
            ):
                raise Aborted(
                    "the segment changed since it was read",
                    reason="VERSION_MISMATCH",
                    metadata={"segment_id": segment_id, "version": str(current.version)},
                )
            return to_proto(await self._load(session, segment_id))

    async def GetSegment(self, request: pb.GetSegmentRequest, context: Context) -> pb.Segment:
        current_principal().require_role(*READING_ROLES)
        segment_id = required(request.segment_id, "segment_id")
        async with self.db.sessions() as session:
            return to_proto(await self._load(session, segment_id))

    async def ListSegments(
        self, request: pb.ListSegmentsRequest, context: Context
    ) -> pb.ListSegmentsResponse:
        current_principal().require_role(*READING_ROLES)
        limit = page_size(request.page_size)
        key = decode_token(request.page_token)
        after = str(key.get("after", "")) if key else ""
        async with self.db.sessions() as session:
            found = await store.list_segments(session, after=after, limit=limit + 1)
        response = pb.ListSegmentsResponse(segments=[to_proto(r) for r in found[:limit]])
        if len(found) > limit:
            response.next_page_token = encode_token({"after": found[limit - 1].segment_id})
        return response

    async def PreviewSegment(
        self, request: pb.PreviewSegmentRequest, context: Context
    ) -> pb.PreviewSegmentResponse:
        current_principal().require_role(*READING_ROLES)
        segment_id = request.segment_id.strip()
        v = Violations()
        if bool(segment_id) == request.HasField("criteria"):
            v.add("segment_id", "one of segment_id and criteria")
        v.raise_if_any()
        criteria: members_pb2.MemberCriteria = request.criteria
        version = 0
        if segment_id:
            async with self.db.sessions() as session:
                record = await self._load(session, segment_id)
            criteria = coupon_ledger.criteria_of(record.criteria)
            version = record.version
        now = utcnow()
        size = await self.members.count_members(criteria)
        sample, _ = await self.members.select_members(criteria, "", SAMPLE_SIZE)
        return pb.PreviewSegmentResponse(
            size=size, sample_member_ids=sample, version=version, preview_time=timestamp(now)
        )
