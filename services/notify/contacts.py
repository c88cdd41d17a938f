"""Recipients' addresses, looked up in the members service when a message
is sent (or a mailing list written), never kept in notify's tables: a
member who changes their number gets the next message on the new one, and
an erased member has nothing left here.

notify asks with a service token of its own, which members answers in
clear (``peers.MembersPeer.contact``). Answers are cached for a short while
(a burst of messages to one member asks once) and only in memory; nothing
of them is logged: the dataclasses hide their values from ``repr``.

Staff get their messages in the staff app (the push channel), keyed by
their staff id: no address is needed for them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cornucopia.members.v1 import members_pb2


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
