"""PreferencesService: opt-outs recorded by staff, by an SMS reply with a
keyword, and by an unsubscribe link.

Every opt-out first withdraws the member's marketing consent on the member
file (members' UpdateConsent, as notify's service), so that every service
selecting members by consent sees it; then, in one transaction, it is kept
here and published as ``notify.v1.optout.recorded``. A members service
that does not answer fails the call before anything is kept: the caller
(a provider retrying, a member clicking again) tries again. The planner
reads the opt-outs for the next message it plans."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Role, current_principal
from chassis.db import utcnow
from chassis.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
)
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, run_idempotent
from chassis.logs import get_logger
from chassis.service import ServiceContext
from cornucopia.notify.v1 import preferences_pb2, preferences_pb2_grpc
from services.notify import events
from services.notify import planner as planning
from services.notify.domain.messages import Channel
from services.notify.domain.optouts import BadLink, Scope, Source, is_optout_reply
from services.notify.links import Links
from services.notify.peers import shared_peers
from services.notify.server.templates import CHANNELS_PROTO, channel_of, links
from services.notify.store import optouts
from services.notify.store import policy as policy_store

log = get_logger(__name__)

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
RECORDING_ROLES = (*STAFF_ROLES, Role.SERVICE)
# Who records the opt-outs members make themselves.
SELF = "notify"
MAX_REPLY_CHARS = 1600

SCOPES = {
    preferences_pb2.OPT_OUT_SCOPE_UNSPECIFIED: Scope.MARKETING,
    preferences_pb2.OPT_OUT_SCOPE_MARKETING: Scope.MARKETING,
    preferences_pb2.OPT_OUT_SCOPE_ALL: Scope.ALL,
}
SCOPES_PROTO = {
    Scope.MARKETING: preferences_pb2.OPT_OUT_SCOPE_MARKETING,
    Scope.ALL: preferences_pb2.OPT_OUT_SCOPE_ALL,
}
SOURCES_PROTO = {
    Source.REPLY_KEYWORD: preferences_pb2.OPT_OUT_SOURCE_REPLY_KEYWORD,
    Source.UNSUBSCRIBE_LINK: preferences_pb2.OPT_OUT_SOURCE_UNSUBSCRIBE_LINK,
    Source.STAFF: preferences_pb2.OPT_OUT_SOURCE_STAFF,
}
# The source the member file's consent history records.
CONSENT_SOURCES = {
    Source.REPLY_KEYWORD: "sms reply",
    Source.UNSUBSCRIBE_LINK: "unsubscribe link",
    Source.STAFF: "opt-out by staff",
}


def optout_proto(record: optouts.OptOutRecord) -> preferences_pb2.OptOut:
    out = preferences_pb2.OptOut(
        optout_id=record.optout_id,
        member_id=record.member_id,
        channel=CHANNELS_PROTO[record.channel],
        scope=SCOPES_PROTO[record.scope],
        source=SOURCES_PROTO[record.source],
        recorded_by=record.recorded_by,
    )
    out.create_time.FromDatetime(record.created_at)
    return out


async def keep(  # noqa: PLR0917 - one opt-out's facts
    session: AsyncSession,
    member_id: str,
    channel: Channel,
    scope: Scope,
    source: Source,
    recorded_by: str,
) -> tuple[optouts.OptOutRecord, bool]:
    """Keeps the opt-out and publishes it, once."""
    now = utcnow()
    record, added = await optouts.record(
        session,
        optout_id=uuid.uuid4().hex,
        member_id=member_id,
        channel=channel,
        scope=scope,
        source=source,
        recorded_by=recorded_by,
        now=now,
    )
    if added:
        await events.optout_recorded(
            session,
            record.optout_id,
            member_id,
            channel,
            scope.value,
            source.value,
            now,
        )
        log.info(
            "opt-out recorded", member_id=member_id, channel=channel.value, source=source.value
        )
    return record, added


class PreferencesServicer(preferences_pb2_grpc.PreferencesServiceServicer):
    def __init__(
        self, ctx: ServiceContext, directory: planning.MembersDirectory, links: Links
    ) -> None:
        self.db = ctx.db
        self.directory = directory
        self.links = links

    async def _withdraw(
        self, member_id: str, channel: Channel, source: Source, *, strict: bool
    ) -> None:
        """Withdraws marketing consent on the member file. A file that
        cannot change (erased, merged) has nothing to withdraw: a member's
        own click is still kept; staff are told (``strict``)."""
        try:
            await self.directory.withdraw_consent(member_id, channel, CONSENT_SOURCES[source])
        except (FailedPrecondition, NotFound):
            if strict:
                raise

    async def RecordOptOut(
        self, request: preferences_pb2.RecordOptOutRequest, context: Context
    ) -> preferences_pb2.OptOut:
        principal = current_principal()
        principal.require_role(*RECORDING_ROLES)
        check_request_id(request.request_id)
        violations = Violations()
        member_id = request.member_id.strip()
        if not member_id:
            violations.add("member_id", "required")
        channel = channel_of(request.channel, "channel", violations)
        if channel is None or channel is Channel.DEV_LOG:
            violations.add("channel", "required: sms, email, push, call_task or post")
        scope = SCOPES.get(request.scope)
        if scope is None:
            violations.add("scope", "marketing or all")
        violations.raise_if_any()
        assert channel is not None and scope is not None
        await self._withdraw(member_id, channel, Source.STAFF, strict=True)

        async def record(session: AsyncSession) -> preferences_pb2.OptOut:
            kept, _ = await keep(
                session, member_id, channel, scope, Source.STAFF, principal.subject
            )
            return optout_proto(kept)

        return await run_idempotent(
            self.db,
            method="notify.RecordOptOut",
            request_id=request.request_id,
            request=request,
            response_type=preferences_pb2.OptOut,
            work=record,
        )

    async def ListOptOuts(
        self, request: preferences_pb2.ListOptOutsRequest, context: Context
    ) -> preferences_pb2.ListOptOutsResponse:
        current_principal().require_role(*READING_ROLES)
        if not request.member_id.strip():
            raise InvalidArgument([FieldViolation("member_id", "required")])
        async with self.db.sessions() as session:
            found = await optouts.of_member(session, request.member_id.strip())
        return preferences_pb2.ListOptOutsResponse(optouts=[optout_proto(r) for r in found])

    async def RecordInboundMessage(
        self, request: preferences_pb2.RecordInboundMessageRequest, context: Context
    ) -> preferences_pb2.RecordInboundMessageResponse:
        current_principal().require_role(Role.SERVICE)
        check_request_id(request.request_id)
        violations = Violations()
        if not request.from_number.strip():
            violations.add("from_number", "required")
        if len(request.text) > MAX_REPLY_CHARS:
            violations.add("text", f"at most {MAX_REPLY_CHARS} characters")
        violations.raise_if_any()
        async with self.db.sessions() as session:
            keywords = (await policy_store.load_policy(session)).optout_keywords
        if not is_optout_reply(request.text, keywords):
            return preferences_pb2.RecordInboundMessageResponse(opted_out=False)
        member = await self.directory.lookup_mobile(request.from_number.strip())
        if member is None:
            # Not a member's number (or no longer): nothing to record, and
            # the provider learns nothing about who is a member.
            return preferences_pb2.RecordInboundMessageResponse(opted_out=False)
        member_id = member.member_id
        await self._withdraw(member_id, Channel.SMS, Source.REPLY_KEYWORD, strict=False)

        async def record(session: AsyncSession) -> preferences_pb2.RecordInboundMessageResponse:
            await keep(session, member_id, Channel.SMS, Scope.MARKETING, Source.REPLY_KEYWORD, SELF)
            return preferences_pb2.RecordInboundMessageResponse(opted_out=True)

        return await run_idempotent(
            self.db,
            method="notify.RecordInboundMessage",
            request_id=request.request_id,
            request=request,
            response_type=preferences_pb2.RecordInboundMessageResponse,
            work=record,
        )

    async def Unsubscribe(
        self, request: preferences_pb2.UnsubscribeRequest, context: Context
    ) -> preferences_pb2.UnsubscribeResponse:
        current_principal().require_role(Role.SERVICE)
        try:
            claim = self.links.verify(request.token)
        except BadLink:
            raise InvalidArgument(
                [FieldViolation("token", "not an unsubscribe link of ours")],
                reason="BAD_UNSUBSCRIBE_LINK",
            ) from None
        await self._withdraw(claim.member_id, claim.channel, Source.UNSUBSCRIBE_LINK, strict=False)
        async with self.db.transaction() as session:
            _, added = await keep(
                session,
                claim.member_id,
                claim.channel,
                Scope.MARKETING,
                Source.UNSUBSCRIBE_LINK,
                SELF,
            )
        return preferences_pb2.UnsubscribeResponse(
            channel=CHANNELS_PROTO[claim.channel], already_unsubscribed=not added
        )


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=preferences_pb2.DESCRIPTOR.services_by_name["PreferencesService"].full_name,
            servicer=PreferencesServicer(ctx, shared_peers(ctx).members, links(ctx)),
            add_to_server=preferences_pb2_grpc.add_PreferencesServiceServicer_to_server,
        )
    ]
