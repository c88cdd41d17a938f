"""Member events as data: validation of an event, when answers and
check-ins are taken, and what an answer does to the seats. Pure: no I/O.

A YES takes a seat and a NO after a YES gives it back; the store applies
the move with a conditional update on the event's count (never past the
capacity), so the rules here only say which move an answer asks for.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass

from chassis.errors import FailedPrecondition, Violations
from chassis.ids import random_id


class EventKind(enum.StrEnum):
    VIP_EVENING = "vip_evening"
    CLASS = "class"
    CHARITY = "charity"
    OTHER = "other"


class Answer(enum.StrEnum):
    NONE = ""
    YES = "yes"
    NO = "no"


NAME_LIMIT = 100
MAX_CAPACITY = 100_000
MAX_INVITES = 1000
# A segment counting at most this many members is invited within the call
# (as a list of that length would be); a larger one by the invite-job worker.
INLINE_INVITE_LIMIT = MAX_INVITES
# Why an invite job stopped before its last page.
STOPPED_RSVP_CLOSED = "RSVP_CLOSED"
MAX_DURATION = dt.timedelta(days=31)
# The door opens this long before the start.
CHECK_IN_OPENS = dt.timedelta(hours=2)
_MEMBER_ID = re.compile(r"^[A-Z0-9]{1,16}$")
_STORE_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def new_event_id() -> str:
    return random_id("EV", 14)


def new_invite_job_id() -> str:
    return random_id("IJ", 14)


class InviteJobState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class MemberEvent:
    event_id: str
    name: str
    kind: EventKind
    store_id: str
    start_at: dt.datetime
    end_at: dt.datetime
    capacity: int
    rsvp_deadline: dt.datetime

    def rsvp_open(self, at: dt.datetime) -> bool:
        return at < self.rsvp_deadline

    def door_open(self, at: dt.datetime) -> bool:
        return self.start_at - CHECK_IN_OPENS <= at < self.end_at


def validate_event(  # noqa: PLR0917
    event_id: str,
    name: str,
    kind: EventKind | None,
    store_id: str,
    start_at: dt.datetime | None,
    end_at: dt.datetime | None,
    capacity: int,
    rsvp_deadline: dt.datetime | None,
    now: dt.datetime,
) -> MemberEvent:
    """The event, or INVALID_ARGUMENT naming every field at fault."""
    v = Violations()
    name = name.strip()
    if not name:
        v.add("event.display_name", "required")
    elif len(name) > NAME_LIMIT:
        v.add("event.display_name", f"at most {NAME_LIMIT} characters")
    if kind is None:
        v.add("event.kind", "one of the event kinds")
    if not _STORE_ID.match(store_id):
        v.add("event.store_id", "required: a store id")
    if start_at is None:
        v.add("event.start_time", "required")
    elif start_at <= now:
        v.add("event.start_time", "must be in the future")
    if end_at is None:
        v.add("event.end_time", "required")
    elif start_at is not None and not start_at < end_at <= start_at + MAX_DURATION:
        v.add("event.end_time", "after start_time, at most 31 days after it")
    if not 1 <= capacity <= MAX_CAPACITY:
        v.add("event.capacity", f"1 to {MAX_CAPACITY}")
    if rsvp_deadline is not None and start_at is not None and rsvp_deadline > start_at:
        v.add("event.rsvp_deadline", "at or before start_time")
    v.raise_if_any()
    assert kind is not None and start_at is not None and end_at is not None
    return MemberEvent(
        event_id=event_id,
        name=name,
        kind=kind,
        store_id=store_id,
        start_at=start_at,
        end_at=end_at,
        capacity=capacity,
        rsvp_deadline=rsvp_deadline or start_at,
    )


def invite_targets(values: list[str], segment_id: str) -> tuple[list[str], str]:
    """Whom to invite: the member ids (each once, in the order given) or a
    segment id, one of the two."""
    segment_id = segment_id.strip()
    if not segment_id:
        return member_ids(values), ""
    v = Violations()
    if values:
        v.add("segment_id", "one of member_ids and segment_id, not both")
    v.raise_if_any()
    return [], segment_id


def member_ids(values: list[str]) -> list[str]:
    """The invited ids, each once, in the order given."""
    v = Violations()
    if not values:
        v.add("member_ids", "at least one member, or a segment_id")
    if len(values) > MAX_INVITES:
        v.add("member_ids", f"at most {MAX_INVITES}")
    out: dict[str, None] = {}
    for i, raw in enumerate(values):
        member_id = raw.strip()
        if not _MEMBER_ID.match(member_id):
            v.add(f"member_ids[{i}]", "not a member id")
        out[member_id] = None
    v.raise_if_any()
    return list(out)


def valid_member_id(value: str) -> bool:
    return bool(_MEMBER_ID.match(value))


class SeatMove(enum.Enum):
    """What an answer does to the event's count of seats taken."""

    NONE = 0
    TAKE = 1
    GIVE_BACK = -1


def seat_move(before: Answer, after: Answer) -> SeatMove:
    if before != Answer.YES and after == Answer.YES:
        return SeatMove.TAKE
    if before == Answer.YES and after != Answer.YES:
        return SeatMove.GIVE_BACK
    return SeatMove.NONE


def require_rsvp_open(event: MemberEvent, at: dt.datetime) -> None:
    if not event.rsvp_open(at):
        raise FailedPrecondition(
            "answers for this event are closed",
            reason="RSVP_CLOSED",
            metadata={"event_id": event.event_id},
        )


def require_door_open(event: MemberEvent, at: dt.datetime) -> None:
    if not event.door_open(at):
        raise FailedPrecondition(
            "check-in is open from two hours before the start to the end",
            reason="CHECK_IN_CLOSED",
            metadata={"event_id": event.event_id},
        )


def event_full(event: MemberEvent) -> FailedPrecondition:
    return FailedPrecondition(
        "the event has no seat left",
        reason="EVENT_FULL",
        metadata={"event_id": event.event_id, "capacity": str(event.capacity)},
    )


def not_invited(event_id: str, member_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        "the member is not invited to this event",
        reason="NOT_INVITED",
        metadata={"event_id": event_id, "member_id": member_id},
    )


def is_walk_in(answer: Answer) -> bool:
    """Came without a YES: not invited, no answer, or a NO."""
    return answer != Answer.YES
