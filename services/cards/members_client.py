"""Calls to the members service: who owns a mobile (the e-card) and what
state a member is in, for a member the cards service has not heard of yet.
Cards calls with a short-lived service token of its own; the caller's token
would not do, since members masks and scopes what staff may see."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chassis.config import Settings
from chassis.errors import FieldViolation, InvalidArgument, NotFound, ServiceError, Unavailable
from chassis.grpcclient import Peer
from chassis.logs import get_logger
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.cards.store.projections import MemberStatus

if TYPE_CHECKING:
    from cornucopia.members.v1.members_pb2_grpc import MembersServiceAsyncStub

log = get_logger(__name__)

MEMBERS_SERVICE = members_pb2.DESCRIPTOR.services_by_name["MembersService"]
CALL_TIMEOUT_SECONDS = 3.0
SUBJECT = "cards"

STATUSES = {
    members_pb2.MEMBER_STATE_ACTIVE: MemberStatus.ACTIVE,
    members_pb2.MEMBER_STATE_ARCHIVED: MemberStatus.ARCHIVED,
    members_pb2.MEMBER_STATE_MERGED: MemberStatus.MERGED,
    members_pb2.MEMBER_STATE_ERASED: MemberStatus.ERASED,
}


@dataclass(frozen=True)
class MemberFacts:
    member_id: str
    status: MemberStatus
    merged_into: str
    as_of: dt.datetime


class MembersClient:
    """One channel to members, opened on first use inside the running loop
    and closed when the service stops."""

    def __init__(self, settings: Settings) -> None:
        self.peer = Peer(
            settings.peer("members"),
            [MEMBERS_SERVICE],
            token_secret=settings.token_secret,
            subject=SUBJECT,
            timeout=CALL_TIMEOUT_SECONDS,
        )

    @property
    def _members(self) -> MembersServiceAsyncStub:
        return self.peer.stub(members_pb2_grpc.MembersServiceStub)  # type: ignore[return-value]

    async def member_id_by_mobile(self, mobile: str) -> str:
        """The member whose mobile (their e-card) this is; a merged
        duplicate's mobile gives the survivor."""
        try:
            member = await self.peer.call(
                self._members.LookupMember,
                members_pb2.LookupMemberRequest(mobile=mobile),
                missing_ok=True,
            )
        except ServiceError as error:
            raise _translated(error, field="mobile") from None
        if member is None:
            raise NotFound("no member with this identifier", reason="MEMBER_NOT_FOUND")
        return str(member.member_id)

    async def member_facts(self, member_id: str) -> MemberFacts | None:
        try:
            member = await self.peer.call(
                self._members.GetMember,
                members_pb2.GetMemberRequest(member_id=member_id),
                missing_ok=True,
            )
        except ServiceError as error:
            raise _translated(error, field="member_id") from None
        if member is None:
            return None
        status = STATUSES.get(member.state, MemberStatus.ACTIVE)
        as_of = member.update_time.ToDatetime(dt.UTC) if member.HasField("update_time") else None
        return MemberFacts(
            member.member_id,
            status,
            member.merged_into,
            as_of or dt.datetime.now(dt.UTC),
        )

    async def close(self) -> None:
        """Close the channel; the service's context calls this at shutdown."""
        await self.peer.close()


def _translated(error: ServiceError, *, field: str) -> ServiceError:
    """A refusal of members as the cards caller should see it: an invalid
    identifier is the caller's, on the field they gave; anything else is
    members failing us (MEMBERS_UNAVAILABLE), not the caller's mistake."""
    if isinstance(error, InvalidArgument):
        description = error.violations[0].description if error.violations else "invalid"
        return InvalidArgument([FieldViolation(field, description)])
    log.warning("members call failed", reason=error.reason)
    if isinstance(error, Unavailable):
        return error
    return Unavailable(
        "the members service did not answer; try again",
        reason="MEMBERS_UNAVAILABLE",
        retry_after_seconds=1.0,
    )
