"""The trigger catalogue: every reason notify has to send a message, with
its category, whom it goes to, the values it gives its template, and the
channels it prefers in order. Pure: no I/O.

Templates are checked against this catalogue when they are saved: a
template may use the variables its trigger gives, the member variables the
planner adds for member-addressed triggers (and ``unsubscribe_url`` for
marketing ones), or the staff variables for staff-addressed ones; nothing
else. A template can therefore never fail at send time for want of a value.

Variables carry a kind so that the planner renders them for the reader:
money in the member's currency style, instants and dates in the member's
home store's time zone and in their language."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from services.notify.domain.messages import Category, Channel


class Recipient(enum.StrEnum):
    MEMBER = "member"
    STAFF = "staff"


class Kind(enum.StrEnum):
    """How a variable's value is written in a notification (always a string)
    and how the planner renders it."""

    # As it is.
    TEXT = "text"
    # A whole number, e.g. "1200": grouped for the reader ("1,200").
    NUMBER = "number"
    # "<ISO 4217>:<minor units>", e.g. "CNY:12550": "¥125.50".
    MONEY = "money"
    # An ISO 8601 UTC instant: the local date and time of the recipient.
    INSTANT = "instant"
    # An ISO 8601 UTC instant or a day "YYYY-MM-DD": the local day.
    DATE = "date"


# Every member-addressed template may use these; the planner fills them from
# the member file and the home store at planning time.
MEMBER_VARIABLES: Mapping[str, Kind] = MappingProxyType(
    {"member_id": Kind.TEXT, "given_name": Kind.TEXT, "store_name": Kind.TEXT}
)
# Marketing templates may (and should) give the member a way out.
UNSUBSCRIBE_URL = "unsubscribe_url"
MARKETING_VARIABLES: Mapping[str, Kind] = MappingProxyType({UNSUBSCRIBE_URL: Kind.TEXT})
# Staff-addressed templates: the staff member and the store they work at.
STAFF_VARIABLES: Mapping[str, Kind] = MappingProxyType(
    {"staff_id": Kind.TEXT, "staff_name": Kind.TEXT, "store_name": Kind.TEXT}
)

# Marks a staff notification for "the managers of the store in the
# variable store_id", resolved at planning time (follow-up tasks nobody is
# assigned to). The table needs one recipient column set; an empty staff id
# names no one in particular.
STORE_MANAGERS = ""

# The channels a member can be reached on, best first, for each kind.
_SERVICE_NOTICE = (Channel.SMS, Channel.PUSH, Channel.EMAIL)
_PROMOTION = (Channel.SMS, Channel.PUSH, Channel.EMAIL, Channel.POST)
# Staff have no phone or e-mail in the member service: the staff app gets
# their messages (a push to the webhook, keyed by staff id).
_STAFF = (Channel.PUSH,)


@dataclass(frozen=True)
class Trigger:
    name: str
    category: Category
    recipient: Recipient
    # The event subject it consumes; empty for schedules and direct sends.
    subject: str
    # The values it gives its template, by name.
    variables: Mapping[str, Kind]
    channels: tuple[Channel, ...]
    description: str
    # Values for a preview when the caller gives none.
    samples: Mapping[str, str] = field(default_factory=dict)
    # A greeting: said on its day (the local day of its time) or not at all,
    # e.g. when notify was down past the day.
    on_its_day_only: bool = False
    # Other subjects whose events it handles the same way.
    also_subjects: tuple[str, ...] = ()

    @property
    def subjects(self) -> tuple[str, ...]:
        """Every subject it consumes."""
        return (self.subject, *self.also_subjects) if self.subject else self.also_subjects

    def allowed_variables(self) -> dict[str, Kind]:
        """Every variable a template of this trigger may use."""
        allowed = dict(self.variables)
        if self.recipient is Recipient.MEMBER:
            allowed.update(MEMBER_VARIABLES)
            if self.category is Category.MARKETING:
                allowed.update(MARKETING_VARIABLES)
        else:
            allowed.update(STAFF_VARIABLES)
        return allowed


def _trigger(  # noqa: PLR0917 - the catalogue below reads as a table
    name: str,
    category: Category,
    recipient: Recipient,
    subject: str,
    variables: dict[str, Kind],
    channels: tuple[Channel, ...],
    description: str,
    samples: dict[str, str] | None = None,
    *,
    on_its_day_only: bool = False,
    also_subjects: tuple[str, ...] = (),
) -> Trigger:
    return Trigger(
        name=name,
        category=category,
        recipient=recipient,
        subject=subject,
        variables=MappingProxyType(variables),
        channels=channels,
        description=description,
        samples=MappingProxyType(samples or {}),
        on_its_day_only=on_its_day_only,
        also_subjects=also_subjects,
    )


T, M = Category.TRANSACTIONAL, Category.MARKETING
MEMBER, STAFF = Recipient.MEMBER, Recipient.STAFF

WELCOME = "welcome"
STORED_VALUE_RECHARGED = "stored_value_recharged"
STORED_VALUE_DEBITED = "stored_value_debited"
POINTS_EXPIRING = "points_expiring"
COUPON_ISSUED = "coupon_issued"
TIER_CHANGED = "tier_changed"
EVENT_INVITATION = "event_invitation"
FOLLOWUP_TASK_CREATED = "followup_task_created"
CARD_REPORTED_LOST = "card_reported_lost"
CARD_FROZEN = "card_frozen"
BIRTHDAY = "birthday"
ANNIVERSARY = "anniversary"
WEEKLY_CALL_DIGEST = "weekly_call_digest"
MARKETING = "marketing"

_BALANCE = {"amount": Kind.MONEY, "balance": Kind.MONEY, "card_id": Kind.TEXT}
_BALANCE_SAMPLES = {"amount": "CNY:20000", "balance": "CNY:53550", "card_id": "C7Q2K9X4TD8M"}

CATALOGUE: Mapping[str, Trigger] = MappingProxyType(
    {
        t.name: t
        for t in (
            _trigger(
                WELCOME,
                T,
                MEMBER,
                "members.v1.member.enrolled",
                {},
                _SERVICE_NOTICE,
                "A member enrolled: welcome them.",
            ),
            _trigger(
                STORED_VALUE_RECHARGED,
                T,
                MEMBER,
                "cards.v1.stored_value.recharged",
                dict(_BALANCE),
                _SERVICE_NOTICE,
                "Money put on a card: the amount and the new balance.",
                _BALANCE_SAMPLES,
            ),
            _trigger(
                STORED_VALUE_DEBITED,
                T,
                MEMBER,
                "cards.v1.stored_value.debited",
                dict(_BALANCE),
                _SERVICE_NOTICE,
                "Money spent from a card, by a debit or a checkout's capture (a consumption "
                "alert): the amount and the new balance.",
                _BALANCE_SAMPLES,
                # A checkout pays with stored value by a hold and its capture.
                also_subjects=("cards.v1.stored_value.captured",),
            ),
            _trigger(
                POINTS_EXPIRING,
                T,
                MEMBER,
                "loyalty.v1.points.expiring",
                {"points": Kind.NUMBER, "expiring_total": Kind.NUMBER, "expire_date": Kind.DATE},
                _SERVICE_NOTICE,
                "Points about to expire, told the policy's points_expiring_days_before days ahead.",
                {"points": "1200", "expiring_total": "1500", "expire_date": "2026-12-31"},
            ),
            _trigger(
                COUPON_ISSUED,
                M,
                MEMBER,
                "campaigns.v1.coupon.issued",
                {"coupon_id": Kind.TEXT, "expire_date": Kind.DATE},
                _PROMOTION,
                "A coupon put into the member's wallet.",
                {"coupon_id": "CP7Q2K9X4TD8", "expire_date": "2026-12-31"},
            ),
            _trigger(
                TIER_CHANGED,
                T,
                MEMBER,
                "loyalty.v1.tier.changed",
                {"from_tier": Kind.TEXT, "to_tier": Kind.TEXT, "direction": Kind.TEXT},
                _SERVICE_NOTICE,
                "The member's tier went up or down; direction is 'up' or 'down'.",
                {"from_tier": "SILVER", "to_tier": "GOLD", "direction": "up"},
            ),
            _trigger(
                EVENT_INVITATION,
                M,
                MEMBER,
                "campaigns.v1.event.invited",
                {
                    "event_id": Kind.TEXT,
                    "event_kind": Kind.TEXT,
                    "start_time": Kind.INSTANT,
                    "rsvp_deadline": Kind.INSTANT,
                },
                _PROMOTION,
                "The member is invited to a member event.",
                {
                    "event_id": "EV7Q2K9X4TD3",
                    "event_kind": "vip_evening",
                    "start_time": "2026-12-20T11:00:00+00:00",
                    "rsvp_deadline": "2026-12-18T15:59:00+00:00",
                },
            ),
            _trigger(
                FOLLOWUP_TASK_CREATED,
                T,
                STAFF,
                "campaigns.v1.followup.task_created",
                {
                    "task_id": Kind.TEXT,
                    "member_id": Kind.TEXT,
                    "store_id": Kind.TEXT,
                    "reason": Kind.TEXT,
                    "due_time": Kind.INSTANT,
                },
                _STAFF,
                "A follow-up call to make: to the assigned consultant, else the store's managers.",
                {
                    "task_id": "T7Q2K9X4TD8M3RW1P0000",
                    "member_id": "M7Q2K9X4TD",
                    "store_id": "S001",
                    "reason": "birthday",
                    "due_time": "2026-12-20T02:00:00+00:00",
                },
            ),
            _trigger(
                CARD_REPORTED_LOST,
                T,
                MEMBER,
                "cards.v1.card.reported_lost",
                {"card_id": Kind.TEXT, "reported_time": Kind.INSTANT},
                _SERVICE_NOTICE,
                "Security notice: a card of the member was reported lost.",
                {"card_id": "C7Q2K9X4TD8M", "reported_time": "2026-12-01T06:30:00+00:00"},
            ),
            _trigger(
                CARD_FROZEN,
                T,
                MEMBER,
                "cards.v1.card.frozen",
                {"card_id": Kind.TEXT, "frozen_time": Kind.INSTANT},
                _SERVICE_NOTICE,
                "Security notice: a card of the member was frozen.",
                {"card_id": "C7Q2K9X4TD8M", "frozen_time": "2026-12-01T06:30:00+00:00"},
            ),
            _trigger(
                BIRTHDAY,
                M,
                MEMBER,
                "",
                {},
                _PROMOTION,
                "Birthday greetings at the policy's greeting time, local to the home store.",
                on_its_day_only=True,
            ),
            _trigger(
                ANNIVERSARY,
                M,
                MEMBER,
                "",
                {"kind": Kind.TEXT, "years": Kind.NUMBER},
                _PROMOTION,
                "An anniversary on the member file (kind e.g. 'wedding', 'enrollment').",
                {"kind": "enrollment", "years": "3"},
                on_its_day_only=True,
            ),
            _trigger(
                WEEKLY_CALL_DIGEST,
                T,
                STAFF,
                "",
                {
                    "store_id": Kind.TEXT,
                    "task_count": Kind.NUMBER,
                    "week_start": Kind.DATE,
                    # One call a line: local due time, member number, reason.
                    "call_list": Kind.TEXT,
                },
                _STAFF,
                "Monday's digest for store managers: how many members to call this week.",
                {
                    "store_id": "S001",
                    "task_count": "12",
                    "week_start": "2026-12-14",
                    "call_list": "12-14 11:00 M7Q2K9X4TD first purchase +3 days",
                },
            ),
            _trigger(
                MARKETING,
                M,
                MEMBER,
                "",
                {},
                _PROMOTION,
                "A direct send to a member or a segment: only the member variables.",
            ),
        )
    }
)

# The sample value of a member or staff variable in a preview.
COMMON_SAMPLES: Mapping[str, str] = MappingProxyType(
    {
        "member_id": "M7Q2K9X4TD",
        "given_name": "Na",
        "store_name": "Store S001",
        "unsubscribe_url": "https://shop.example/v1/unsubscribe/sample",
        "staff_id": "STQ2K9X4TD7M",
        "staff_name": "Manager",
    }
)


def trigger(name: str) -> Trigger:
    """The trigger of that name; KeyError when the catalogue has none."""
    return CATALOGUE[name]


def by_subject() -> dict[str, Trigger]:
    return {t.subject: t for t in CATALOGUE.values() if t.subject}


def samples(t: Trigger) -> dict[str, str]:
    """A value for every variable a template of ``t`` may use."""
    values = {name: COMMON_SAMPLES.get(name, name) for name in t.allowed_variables()}
    values.update(t.samples)
    return values
