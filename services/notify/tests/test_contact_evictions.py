"""The dispatcher's contact cache forgets a member as soon as members says
their file changed, and a lookup that was under way when it changed does
not put the old answer back. Members is a stand-in here (``_get_member``);
the events go through the listener's handlers and its decoding of the
suite's envelope. The same on real NATS and a real members service:
``test_contact_evictions_live``."""

from __future__ import annotations

import asyncio
from collections import Counter

from google.protobuf.message import Message
from nats.aio.msg import Msg

from chassis.bus import Bus, Listener, cloudevent_headers
from chassis.config import Settings
from chassis.db import utcnow
from chassis.errors import Unavailable
from chassis.service import ServiceContext
from cornucopia.members.v1 import events_pb2, members_pb2
from services.notify.contacts import ContactsUnavailable
from services.notify.peers import (
    MEMBER_CHANGE_SUBJECTS,
    MembersPeer,
    Peers,
    contact_evictions,
)

# Long enough that no test ever sees it run out: only evictions forget.
HOUR = 3600.0


class Members(MembersPeer):
    """MembersPeer over a dict of mobiles instead of the members service;
    a member whose gate is set is answered only once the gate opens, with
    the mobile they had when they were asked."""

    def __init__(self) -> None:
        super().__init__(Settings(service="notify", environment="test"), contact_ttl_seconds=HOUR)
        self.mobiles: dict[str, str] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.asked: Counter[str] = Counter()
        self.failing: set[str] = set()

    async def _get_member(self, member_id: str) -> members_pb2.Member | None:
        self.asked[member_id] += 1
        mobile = self.mobiles.get(member_id)
        gate = self.gates.get(member_id)
        if gate is not None:
            await gate.wait()
        if member_id in self.failing:
            raise Unavailable("members is away", reason="UNAVAILABLE")
        return None if mobile is None else members_pb2.Member(member_id=member_id, mobile=mobile)


async def mobile(members: MembersPeer, member_id: str) -> str | None:
    found = await members.contact(member_id)
    return None if found is None else found.mobile


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_cached_contact_is_kept_until_evicted() -> None:
    members = Members()
    members.mobiles["M1"] = "+8613800138001"
    assert await mobile(members, "M1") == "+8613800138001"
    members.mobiles["M1"] = "+8613900139001"
    # Cached: members is not asked again, the old number stands.
    assert await mobile(members, "M1") == "+8613800138001"
    assert members.asked["M1"] == 1

    members.evict("M1")
    assert await mobile(members, "M1") == "+8613900139001"
    assert members.asked["M1"] == 2
    # Other members' entries are untouched.
    members.mobiles["M2"] = "+8613800138002"
    await members.contact("M2")
    members.evict("M1", "")
    await members.contact("M2")
    assert members.asked["M2"] == 1


async def test_a_lookup_under_way_when_the_file_changes_does_not_cache_the_old_answer() -> None:
    members = Members()
    members.mobiles["M1"] = "+8613800138001"
    old_gate = members.gates["M1"] = asyncio.Event()
    before = asyncio.create_task(members.contact("M1"))
    joined = asyncio.create_task(members.contact("M1"))
    await settle()
    assert members.asked["M1"] == 1  # the second caller waits on the first lookup

    # The number changes and the event arrives while members is being asked.
    members.mobiles["M1"] = "+8613900139001"
    members.evict("M1")
    # Who asks now does not join the lookup that started before the change.
    new_gate = members.gates["M1"] = asyncio.Event()
    after = asyncio.create_task(members.contact("M1"))
    await settle()
    assert members.asked["M1"] == 2

    # The new lookup answers first, then the old one with the number it read.
    new_gate.set()
    assert (await after).mobile == "+8613900139001"  # type: ignore[union-attr]
    old_gate.set()
    assert (await before).mobile == "+8613800138001"  # type: ignore[union-attr]
    assert (await joined).mobile == "+8613800138001"  # type: ignore[union-attr]
    # The old answer did not overwrite the new one in the cache.
    assert await mobile(members, "M1") == "+8613900139001"
    assert members.asked["M1"] == 2


async def test_an_old_lookup_finishing_after_the_new_one_does_not_overwrite_it() -> None:
    members = Members()
    members.mobiles["M1"] = "+8613800138001"
    old_gate = members.gates["M1"] = asyncio.Event()
    before = asyncio.create_task(members.contact("M1"))
    await settle()
    members.mobiles["M1"] = "+8613900139001"
    members.evict("M1")
    del members.gates["M1"]
    # A new lookup runs to the end while the old one is still out.
    assert await mobile(members, "M1") == "+8613900139001"
    old_gate.set()
    assert (await before).mobile == "+8613800138001"  # type: ignore[union-attr]
    assert await mobile(members, "M1") == "+8613900139001"
    assert members.asked["M1"] == 2


async def test_a_failed_old_lookup_leaves_the_new_one_alone() -> None:
    members = Members()
    members.mobiles["M1"] = "+8613800138001"
    old_gate = members.gates["M1"] = asyncio.Event()
    members.failing.add("M1")
    before = asyncio.create_task(members.contact("M1"))
    await settle()
    members.evict("M1")
    members.failing.clear()
    new_gate = members.gates["M1"] = asyncio.Event()
    after = asyncio.create_task(members.contact("M1"))
    await settle()
    members.failing.add("M1")
    old_gate.set()
    try:
        await before
    except ContactsUnavailable:
        pass
    else:
        raise AssertionError("the old lookup should have failed")
    members.failing.clear()
    # Who asks now joins the new lookup: the old one's end did not drop it.
    joined = asyncio.create_task(members.contact("M1"))
    await settle()
    assert members.asked["M1"] == 2
    new_gate.set()
    assert (await after).mobile == (await joined).mobile == "+8613800138001"  # type: ignore[union-attr]


# -- the events ----------------------------------------------------------------------


def published(subject: str, message: Message) -> Msg:
    """``message`` as the outbox relay publishes it on ``subject``."""
    headers = cloudevent_headers(
        event_id="e-1",
        event_type=message.DESCRIPTOR.full_name,
        source="cornucopia/members",
        time=utcnow(),
        subject=subject,
    )
    # What nats-py hands a core subscription's callback.
    return Msg(None, subject=subject, data=message.SerializeToString(), headers=headers)  # type: ignore[arg-type]


def wired() -> tuple[Members, Listener]:
    """A stand-in members and notify's listener over it (not subscribed)."""
    members = Members()
    settings = Settings(service="notify", environment="test")
    ctx = ServiceContext(settings=settings, db=None, bus=Bus("nats://unused:4222", "tests"))  # type: ignore[arg-type]
    peers = Peers(settings)
    peers.members = members
    ctx.shared("notify.peers", lambda: peers)
    return members, contact_evictions(ctx)


async def test_every_member_event_evicts_whom_it_is_about() -> None:
    members, listener = wired()
    assert set(listener.subjects) == set(MEMBER_CHANGE_SUBJECTS)
    cases: list[tuple[str, Message, set[str]]] = [
        (
            "members.v1.member.updated",
            events_pb2.MemberUpdated(member_id="M1", fields=["mobile"]),
            {"M1"},
        ),
        (
            "members.v1.member.merged",
            events_pb2.MemberMerged(survivor_member_id="M1", duplicate_member_id="M2"),
            {"M1", "M2"},
        ),
        ("members.v1.member.archived", events_pb2.MemberArchived(member_id="M2"), {"M2"}),
        ("members.v1.member.reactivated", events_pb2.MemberReactivated(member_id="M1"), {"M1"}),
        ("members.v1.member.erased", events_pb2.MemberErased(member_id="M3"), {"M3"}),
        (
            "members.v1.member.consent_changed",
            events_pb2.MemberConsentChanged(member_id="M1", granted=False),
            {"M1"},
        ),
    ]
    assert {subject for subject, _, _ in cases} == set(MEMBER_CHANGE_SUBJECTS)
    for subject, event, evicted in cases:
        for member_id in ("M1", "M2", "M3"):
            members.mobiles[member_id] = f"old-{member_id}"
        for member_id in ("M1", "M2", "M3"):
            await members.contact(member_id)
        for member_id in ("M1", "M2", "M3"):
            members.mobiles[member_id] = f"new-{member_id}"
        await listener._deliver(published(subject, event))
        seen = {m: await mobile(members, m) for m in ("M1", "M2", "M3")}
        assert seen == {m: (f"new-{m}" if m in evicted else f"old-{m}") for m in seen}, subject
        members.forget_contacts()


async def test_other_events_and_garbage_evict_nothing() -> None:
    members, listener = wired()
    members.mobiles["M1"] = "old"
    await members.contact("M1")
    members.mobiles["M1"] = "new"
    consultant = events_pb2.MemberConsultantChanged(member_id="M1", to_consultant_id="S1")
    await listener._deliver(published("members.v1.member.updated", consultant))
    garbage = published("members.v1.member.updated", events_pb2.MemberUpdated(member_id="M1"))
    garbage.data = b"\xff\xff\xff"
    await listener._deliver(garbage)
    assert await mobile(members, "M1") == "old"


async def test_a_gap_in_hearing_forgets_every_contact_and_lookup() -> None:
    members, listener = wired()
    members.mobiles.update({"M1": "old-1", "M2": "old-2"})
    await members.contact("M1")
    members.gates["M2"] = asyncio.Event()
    under_way = asyncio.create_task(members.contact("M2"))
    await settle()
    members.mobiles.update({"M1": "new-1", "M2": "new-2"})
    assert listener.on_gap is not None
    await listener.on_gap()
    members.gates["M2"].set()
    assert (await under_way).mobile == "old-2"  # type: ignore[union-attr]
    assert await mobile(members, "M1") == "new-1"
    assert await mobile(members, "M2") == "new-2"


async def test_the_dispatcher_sends_to_the_file_planning_read_without_asking_again() -> None:
    members = Members()
    members.mobiles["M1"] = "+8613800138001"
    # Planning reads the file as it is now, every time: consent is decided on it.
    planned = await members.member("M1")
    assert planned is not None and planned.mobile == "+8613800138001"
    members.mobiles["M1"] = "+8613900139001"
    again = await members.member("M1")
    assert again is not None and again.mobile == "+8613900139001"
    assert members.asked["M1"] == 2
    # The send a moment later uses what planning read last.
    assert await mobile(members, "M1") == "+8613900139001"
    assert members.asked["M1"] == 2
    # An unknown member is kept as unknown too.
    assert await members.member("M9") is None
    assert await members.contact("M9") is None
    assert members.asked["M9"] == 1
