"""Recipients' addresses, looked up in the members service when a message
is sent (or a mailing list written), never kept in notify's tables: a
member who changes their number gets the next message on the new one, and
an erased member has nothing left here.

notify asks with a service token of its own, which members answers in
clear. Answers are cached for a short while (a burst of messages to one
member asks once) and only in memory; nothing of them is logged: the
dataclasses hide their values from ``repr``.

Staff get their messages in the staff app (the push channel), keyed by
their staff id: no address is needed for them."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from chassis.config import Settings
from chassis.grpcclient import Peer, passed_on, rich_error
from cornucopia.members.v1 import members_pb2, members_pb2_grpc

SUBJECT = "notify"
CALL_TIMEOUT_SECONDS = 5.0
CACHE_SECONDS = 60.0
CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class PostalAddress:
    name: str = field(repr=False)
    province: str = field(repr=False)
    city: str = field(repr=False)
    district: str = field(repr=False)
    street: str = field(repr=False)
    postcode: str = field(repr=False)


@dataclass(frozen=True)
class Contact:
    """What notify may use to reach a member; empty strings for what the
    member did not give."""

    member_id: str
    mobile: str = field(default="", repr=False)
    email: str = field(default="", repr=False)
    address: PostalAddress | None = field(default=None, repr=False)


class ContactsUnavailable(Exception):
    """The members service did not answer: try again later."""


class Directory(Protocol):
    async def contact(self, member_id: str, *, fresh: bool = False) -> Contact | None: ...


def contact_of(member: members_pb2.Member) -> Contact:
    address = None
    a = member.address
    if member.HasField("address") and (a.street or a.city):
        address = PostalAddress(
            name=f"{member.family_name}{member.given_name}"
            if _cjk(member.family_name + member.given_name)
            else f"{member.given_name} {member.family_name}".strip(),
            province=a.province,
            city=a.city,
            district=a.district,
            street=a.street,
            postcode=a.postcode,
        )
    return Contact(
        member_id=member.member_id, mobile=member.mobile, email=member.email, address=address
    )


def _cjk(text: str) -> bool:
    """Chinese names are written family name first, without a space."""
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


class MembersContacts:
    """notify's channel to members, for addresses."""

    def __init__(
        self,
        settings: Settings,
        *,
        ttl_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.peer = Peer(
            settings.peer("members"),
            [members_pb2.DESCRIPTOR.services_by_name["MembersService"]],
            token_secret=settings.token_secret,
            subject=SUBJECT,
        )
        self.ttl = ttl_seconds
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Contact | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Contact | None]] = {}

    async def contact(self, member_id: str, *, fresh: bool = False) -> Contact | None:
        """The member's contact, None when members knows no such member (or
        they were erased); ``fresh`` asks members even when a recent answer
        is cached. Raises ContactsUnavailable when members does not
        answer."""
        now = self._clock()
        cached = self._cache.get(member_id)
        if not fresh and cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        # Concurrent sends to one member ask once.
        waiting = self._inflight.get(member_id)
        if waiting is not None:
            return await asyncio.shield(waiting)
        future: asyncio.Future[Contact | None] = asyncio.get_running_loop().create_future()
        self._inflight[member_id] = future
        try:
            found = await self._ask(member_id)
        except BaseException as exc:
            # Those waiting on this lookup try again later; a cancelled
            # lookup is not their cancellation.
            failure = exc if isinstance(exc, Exception) else ContactsUnavailable("lookup stopped")
            future.set_exception(failure)
            # Nobody else may be waiting: keep the loop from warning.
            future.exception()
            raise
        finally:
            self._inflight.pop(member_id, None)
        future.set_result(found)
        self._cache[member_id] = (self._clock(), found)
        self._cache.move_to_end(member_id)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return found

    async def _ask(self, member_id: str) -> Contact | None:
        stub = members_pb2_grpc.MembersServiceStub(self.peer.channel)
        try:
            member = await stub.GetMember(
                members_pb2.GetMemberRequest(member_id=member_id),
                metadata=self.peer.metadata(),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            problem = passed_on(rich_error(exc), peer="members")
            raise ContactsUnavailable(problem.message) from None
        if member.state in (members_pb2.MEMBER_STATE_ERASED, members_pb2.MEMBER_STATE_MERGED):
            return None
        return contact_of(member)

    async def close(self) -> None:
        await self.peer.close()
