"""What notify asks other services, with a service token of its own: members
(member files, stores, staff; a consent withdrawn when a member opts out)
and campaigns (follow-up tasks for the weekly digest, segments for direct
sends). One ``Peers`` per process, made by the server wiring and closed when
the service stops.

Members answers notify in clear. Nothing personal is kept but the member
files of a short cache (planning reads a file, and the dispatcher sends to
its address a moment later without asking again; a burst of messages to
one member asks once), in memory only; nothing of them is logged. Each
process drops a member's file as soon as it hears that members changed it
(``contact_evictions``), so the cache's time to live only matters when
such an event is lost.

A refusal a peer meant for notify is passed on as it is; a peer that does
not answer is UNAVAILABLE (``chassis.grpcclient.Peer.call``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from chassis.bus import Heard, Listener, ListenerHandler
from chassis.config import Settings
from chassis.errors import InvalidArgument, ServiceError
from chassis.grpcclient import Peer
from chassis.service import ServiceContext
from cornucopia.campaigns.v1 import (
    followups_pb2,
    followups_pb2_grpc,
    segments_pb2,
    segments_pb2_grpc,
)
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import (
    events_pb2,
    members_pb2,
    members_pb2_grpc,
    organisation_pb2,
    organisation_pb2_grpc,
)
from services.notify.contacts import Contact, ContactsUnavailable, contact_of
from services.notify.domain.messages import Channel
from services.notify.store.messages import timestamp

SUBJECT = "notify"
# Members and staff read a page at a time.
PAGE = 100
# How long, and for how many members, member files are kept for the
# dispatcher's contact lookups.
CACHE_SECONDS = 60.0
CACHE_ENTRIES = 10_000
# How long a store's name and time zone are kept: members publishes no event
# when they change, and a message a minute late to see a new store name, or
# its quiet hours in the old zone for that minute, is the worst of it.
STORE_CACHE_SECONDS = 60.0

CONTACT_CHANNELS: dict[int, Channel] = {
    members_pb2.CONTACT_CHANNEL_SMS: Channel.SMS,
    members_pb2.CONTACT_CHANNEL_EMAIL: Channel.EMAIL,
    members_pb2.CONTACT_CHANNEL_APP: Channel.PUSH,
    members_pb2.CONTACT_CHANNEL_POST: Channel.POST,
    members_pb2.CONTACT_CHANNEL_PHONE: Channel.CALL_TASK,
}
CONTACT_CHANNELS_OF = {channel: contact for contact, channel in CONTACT_CHANNELS.items()}


def _peer(settings: Settings, name: str, *services: ServiceDescriptor) -> Peer:
    """The channel to the peer service ``name``, with notify's own token."""
    return Peer(
        settings.peer(name),
        services,
        token_secret=settings.token_secret,
        subject=SUBJECT,
        name=name,
    )


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


Q = TypeVar("Q")
P = TypeVar("P", bound=_Page)


async def pages(
    peer: Peer, method: grpc.aio.UnaryUnaryMultiCallable[Q, P], request: Callable[[str], Q]
) -> AsyncGenerator[P, None]:
    """Every page of a listing, from the first; ``request`` asks for the
    page of a page token."""
    token = ""
    while True:
        page = await peer.call(method, request(token))
        yield page
        token = page.next_page_token
        if not token:
            return


@dataclass(frozen=True)
class StoreFacts:
    store_id: str
    display_name: str
    # As the store says; "" when it says none.
    time_zone: str
    open: bool = True


@dataclass(frozen=True)
class StaffFacts:
    staff_id: str
    display_name: str
    # The store they work at; "" for HQ and region staff.
    store_id: str
    active: bool
    manager: bool


def store_facts(found: organisation_pb2.Store) -> StoreFacts:
    return StoreFacts(
        store_id=found.store_id,
        display_name=found.display_name,
        time_zone=found.time_zone,
        open=found.state != organisation_pb2.ORG_UNIT_STATE_CLOSED,
    )


def staff_facts(staff: organisation_pb2.StaffMember) -> StaffFacts:
    at_store = staff.assignment.level == org_pb2.ORG_LEVEL_STORE
    return StaffFacts(
        staff_id=staff.staff_id,
        display_name=staff.display_name,
        store_id=staff.assignment.id if at_store else "",
        active=staff.state != organisation_pb2.STAFF_STATE_LEFT,
        manager=organisation_pb2.STAFF_ROLE_STORE_MANAGER in staff.roles,
    )


class MembersPeer:
    """notify's channel to members: notify reads files, stores and staff as
    a service, and withdraws consent on a member's behalf when they opt
    out."""

    def __init__(
        self,
        settings: Settings,
        *,
        contact_ttl_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.peer = _peer(
            settings,
            "members",
            members_pb2.DESCRIPTOR.services_by_name["MembersService"],
            organisation_pb2.DESCRIPTOR.services_by_name["OrganisationService"],
        )
        self.contact_ttl = contact_ttl_seconds
        self._clock = clock
        self._files: OrderedDict[str, tuple[float, members_pb2.Member | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[members_pb2.Member | None]] = {}
        self._stores: dict[str, tuple[float, StoreFacts]] = {}

    @property
    def _members(self) -> members_pb2_grpc.MembersServiceAsyncStub:
        return self.peer.stub(members_pb2_grpc.MembersServiceStub)  # type: ignore[return-value]

    @property
    def _organisation(self) -> organisation_pb2_grpc.OrganisationServiceAsyncStub:
        return self.peer.stub(organisation_pb2_grpc.OrganisationServiceStub)  # type: ignore[return-value]

    # -- member files -------------------------------------------------------------------

    async def member(self, member_id: str) -> members_pb2.Member | None:
        """The member's file as members has it now (planning decides on its
        consents), None when there is no such member. The answer is kept
        for the dispatcher: the message planned from it is sent a moment
        later, to the address it had, without asking again."""
        return await self._file(member_id, fresh=True)

    async def _get_member(self, member_id: str) -> members_pb2.Member | None:
        return await self.peer.call(
            self._members.GetMember,
            members_pb2.GetMemberRequest(member_id=member_id),
            missing_ok=True,
        )

    async def lookup_mobile(self, mobile: str) -> members_pb2.Member | None:
        try:
            return await self.peer.call(
                self._members.LookupMember,
                members_pb2.LookupMemberRequest(mobile=mobile),
                missing_ok=True,
            )
        except InvalidArgument:
            # A number members cannot parse is no member's either.
            return None

    async def withdraw_consent(self, member_id: str, channel: Channel, source: str) -> None:
        contact = CONTACT_CHANNELS_OF.get(channel)
        if contact is None:
            return
        await self.peer.call(
            self._members.UpdateConsent,
            members_pb2.UpdateConsentRequest(
                member_id=member_id,
                channel=contact,  # type: ignore[arg-type]
                granted=False,
                source=source,
            ),
        )

    async def select_members(
        self, criteria: members_pb2.MemberCriteria, page_token: str, page_size: int
    ) -> tuple[list[str], str]:
        found = await self.peer.call(
            self._members.SelectMembers,
            members_pb2.SelectMembersRequest(
                criteria=criteria, page_token=page_token, page_size=page_size
            ),
        )
        return list(found.member_ids), str(found.next_page_token)

    async def count_members(self, criteria: members_pb2.MemberCriteria) -> int:
        found = await self.peer.call(
            self._members.CountMembers, members_pb2.CountMembersRequest(criteria=criteria)
        )
        return int(found.count)

    # -- addresses, for the dispatcher ---------------------------------------------------

    async def contact(self, member_id: str, *, fresh: bool = False) -> Contact | None:
        """The member's contact, None when members knows no such member (or
        they were erased or merged); ``fresh`` asks members even when a
        recent answer is kept. Raises ContactsUnavailable when members
        does not answer."""
        try:
            member = await self._file(member_id, fresh=fresh)
        except ServiceError as error:
            raise ContactsUnavailable(error.message) from None
        if member is None or member.state in (
            members_pb2.MEMBER_STATE_ERASED,
            members_pb2.MEMBER_STATE_MERGED,
        ):
            return None
        return contact_of(member)

    async def _file(self, member_id: str, *, fresh: bool) -> members_pb2.Member | None:
        """The member's file: kept, unless ``fresh`` or too old, else asked
        of members (concurrent askers ask once) and kept."""
        now = self._clock()
        kept = self._files.get(member_id)
        if not fresh and kept is not None and now - kept[0] < self.contact_ttl:
            return kept[1]
        waiting = self._inflight.get(member_id)
        if waiting is not None:
            return await asyncio.shield(waiting)
        future: asyncio.Future[members_pb2.Member | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._inflight[member_id] = future
        try:
            found = await self._get_member(member_id)
        except BaseException as exc:
            self._done_asking(member_id, future)
            # Those waiting on this lookup try again later; a cancelled
            # lookup is not their cancellation.
            failure = exc if isinstance(exc, Exception) else ContactsUnavailable("lookup stopped")
            future.set_exception(failure)
            # Nobody else may be waiting: keep the loop from warning.
            future.exception()
            raise
        current = self._done_asking(member_id, future)
        future.set_result(found)
        if not current:
            # The member's file changed while members was being asked: the
            # answer may predate the change. Those who asked before the
            # change have it; the next lookup asks again.
            return found
        self._files[member_id] = (self._clock(), found)
        self._files.move_to_end(member_id)
        while len(self._files) > CACHE_ENTRIES:
            self._files.popitem(last=False)
        return found

    def _done_asking(
        self, member_id: str, future: asyncio.Future[members_pb2.Member | None]
    ) -> bool:
        """The lookup ``future`` is over: whether it is still the member's
        current one (no eviction came while it was asked)."""
        if self._inflight.get(member_id) is not future:
            return False
        del self._inflight[member_id]
        return True

    def evict(self, *member_ids: str) -> None:
        """Forget what is kept about these members, and what lookups of
        them already under way will answer: the next lookup asks members
        again."""
        for member_id in member_ids:
            if not member_id:
                continue
            self._files.pop(member_id, None)
            # Later callers must not join a lookup that started before the
            # change; the lookup itself sees it is no longer current and
            # does not keep its answer.
            self._inflight.pop(member_id, None)

    def forget_contacts(self) -> None:
        """Forget every kept file and every lookup under way (the changes
        of member files may have been missed)."""
        self._files.clear()
        self._inflight.clear()

    # -- stores and staff ----------------------------------------------------------------

    async def store(self, store_id: str) -> StoreFacts | None:
        """The store's name and zone, kept for ``STORE_CACHE_SECONDS``."""
        kept = self._stores.get(store_id)
        if kept is not None and self._clock() - kept[0] < STORE_CACHE_SECONDS:
            return kept[1]
        found = await self.peer.call(
            self._organisation.GetStore,
            organisation_pb2.GetStoreRequest(store_id=store_id),
            missing_ok=True,
        )
        if found is None:
            return None
        facts = store_facts(found)
        # A chain has hundreds of stores, not millions: no bound needed.
        self._stores[store_id] = (self._clock(), facts)
        return facts

    async def open_stores(self) -> list[StoreFacts]:
        listing = pages(
            self.peer,
            self._organisation.ListStores,
            lambda token: organisation_pb2.ListStoresRequest(
                page_size=PAGE, page_token=token, state=organisation_pb2.ORG_UNIT_STATE_OPEN
            ),
        )
        return [store_facts(found) async for page in listing for found in page.stores]

    async def staff(self, staff_id: str) -> StaffFacts | None:
        found = await self.peer.call(
            self._organisation.GetStaffMember,
            organisation_pb2.GetStaffMemberRequest(staff_id=staff_id),
            missing_ok=True,
        )
        return staff_facts(found) if found is not None else None

    async def store_managers(self, store_id: str) -> list[StaffFacts]:
        """The active store managers members lists for the store."""
        listing = pages(
            self.peer,
            self._organisation.ListStaff,
            lambda token: organisation_pb2.ListStaffRequest(
                store_id=store_id,
                state=organisation_pb2.STAFF_STATE_ACTIVE,
                page_size=PAGE,
                page_token=token,
            ),
        )
        staff = [staff_facts(found) async for page in listing for found in page.staff]
        return [f for f in staff if f.manager and f.active]

    async def close(self) -> None:
        await self.peer.close()


class CampaignsPeer:
    """notify's channel to campaigns: the follow-up tasks of the weekly
    digest, and the segments of direct sends."""

    def __init__(self, settings: Settings) -> None:
        self.peer = _peer(
            settings,
            "campaigns",
            followups_pb2.DESCRIPTOR.services_by_name["FollowUpService"],
            segments_pb2.DESCRIPTOR.services_by_name["SegmentsService"],
        )

    async def open_tasks(
        self, store_id: str, due_before: dt.datetime, limit: int
    ) -> tuple[list[followups_pb2.FollowUpTask], bool]:
        """The store's open tasks due before ``due_before`` (overdue ones
        included), at most ``limit``; and whether there were more."""
        stub: followups_pb2_grpc.FollowUpServiceAsyncStub = (
            self.peer.stub(followups_pb2_grpc.FollowUpServiceStub)  # type: ignore[assignment]
        )
        tasks: list[followups_pb2.FollowUpTask] = []
        listing = pages(
            self.peer,
            stub.ListFollowUpTasks,
            lambda token: followups_pb2.ListFollowUpTasksRequest(
                page_size=PAGE,
                page_token=token,
                store_id=store_id,
                due_before=timestamp(due_before),
            ),
        )
        async with aclosing(listing):
            async for page in listing:
                tasks.extend(page.tasks)
                if page.next_page_token and len(tasks) >= limit:
                    return tasks[:limit], True
        return tasks, False

    async def segment(self, segment_id: str) -> segments_pb2.Segment | None:
        stub: segments_pb2_grpc.SegmentsServiceAsyncStub = (
            self.peer.stub(segments_pb2_grpc.SegmentsServiceStub)  # type: ignore[assignment]
        )
        return await self.peer.call(
            stub.GetSegment, segments_pb2.GetSegmentRequest(segment_id=segment_id), missing_ok=True
        )

    async def close(self) -> None:
        await self.peer.close()


class Peers:
    """notify's peers, one of each per process."""

    def __init__(self, settings: Settings) -> None:
        self.members = MembersPeer(settings)
        self.campaigns = CampaignsPeer(settings)

    async def close(self) -> None:
        await self.members.close()
        await self.campaigns.close()


def shared_peers(ctx: ServiceContext) -> Peers:
    """The service's peers: made on first ask, shared by its servicers and
    workers, and closed when it stops."""

    def make() -> Peers:
        made = Peers(ctx.settings)
        ctx.on_close(made.close)
        return made

    return ctx.shared("notify.peers", make)


# -- dropping cached contacts when members changes a file ---------------------------------

# What members publishes when a member's file changes in a way that may
# change their contact (or whether there is one to send to).
MEMBER_CHANGE_SUBJECTS = (
    "members.v1.member.updated",
    "members.v1.member.merged",
    "members.v1.member.archived",
    "members.v1.member.reactivated",
    "members.v1.member.erased",
    "members.v1.member.consent_changed",
)


def _member_changes(members: MembersPeer) -> dict[type[Message], ListenerHandler]:
    """What each member event evicts: the member it is about; for a
    merge, both the member merged away and the survivor."""

    async def about(event: Any, _heard: Heard) -> None:
        members.evict(event.member_id)

    async def merged(event: events_pb2.MemberMerged, _heard: Heard) -> None:
        members.evict(event.duplicate_member_id, event.survivor_member_id)

    return {
        events_pb2.MemberUpdated: about,
        events_pb2.MemberMerged: merged,
        events_pb2.MemberArchived: about,
        events_pb2.MemberReactivated: about,
        events_pb2.MemberErased: about,
        events_pb2.MemberConsentChanged: about,
    }


def contact_evictions(ctx: ServiceContext) -> Listener:
    """This process's own subscription to the member events (every replica
    keeps its own cache, so every replica hears them: not a durable
    consumer): each evicts the member's cached contact. Whatever may have
    been missed (before the subscription, while NATS was away) empties the
    whole cache."""
    members = shared_peers(ctx).members

    async def gap() -> None:
        members.forget_contacts()

    return Listener(
        ctx.bus,
        name="notify-contacts",
        subjects=MEMBER_CHANGE_SUBJECTS,
        handlers=_member_changes(members),
        on_gap=gap,
    )
