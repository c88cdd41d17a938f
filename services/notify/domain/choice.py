"""Which channel a message goes on, or why it goes on none. Pure: no I/O.

Transactional messages (a receipt, a security notice) go on the member's
preferred channel when they can be reached there, else on the first of the
trigger's channels they can be reached on: they need no marketing consent,
but a member who opted out of everything on a channel is not written to on
it. Marketing goes only where the member granted consent and has not opted
out since. Reasons for sending nothing are kept on the suppressed message."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.notify.domain.messages import Category, Channel
from services.notify.domain.optouts import Scope

NO_CONSENT = "no_consent"
OPTED_OUT = "opted_out"
NO_ADDRESS = "no_address"
WEEKLY_CAP = "weekly_cap"
MEMBER_INACTIVE = "member_inactive"
MEMBER_NOT_FOUND = "member_not_found"
NO_CHANNEL = "no_channel"
TEMPLATE_ERROR = "template_error"
# A greeting whose day had passed when it could be sent.
TOO_LATE = "too_late"

# When several channels were possible and each was ruled out, the reason
# reported is the most telling: the member said no; else they said yes
# somewhere we cannot reach them (an address to ask for); else no consent.
_REASON_ORDER = (OPTED_OUT, NO_ADDRESS, NO_CONSENT, NO_CHANNEL)


@dataclass(frozen=True)
class Consent:
    granted: bool
    # When it was last given or withdrawn (None: unknown).
    at: dt.datetime | None = None


@dataclass(frozen=True)
class OptOut:
    channel: Channel
    scope: Scope
    at: dt.datetime


@dataclass(frozen=True)
class Reach:
    """What the planner knows of how a member can be reached: the channels
    they have an address for (never the addresses themselves), their
    marketing consents, their preferred channel, their opt-outs."""

    addresses: frozenset[Channel]
    consents: Mapping[Channel, Consent] = field(default_factory=dict)
    preferred: Channel | None = None
    optouts: Sequence[OptOut] = ()


@dataclass(frozen=True)
class Choice:
    channel: Channel | None
    # Empty when a channel was chosen.
    reason: str = ""


def candidates(order: Sequence[Channel], preferred: Channel | None) -> list[Channel]:
    """The trigger's channels, the member's preferred one first when it is
    among them."""
    ordered = list(order)
    if preferred in ordered:
        ordered.remove(preferred)  # type: ignore[arg-type]
        ordered.insert(0, preferred)  # type: ignore[arg-type]
    return ordered


def _blocked(category: Category, channel: Channel, reach: Reach) -> str:
    """Why the message may not go on ``channel``; "" when it may."""
    consent = reach.consents.get(channel)
    for optout in reach.optouts:
        if optout.channel is not channel:
            continue
        if optout.scope is Scope.ALL:
            return OPTED_OUT
        # A consent granted again after a marketing opt-out (at the counter,
        # on the member file) is the member's latest word.
        regranted = (
            consent is not None and consent.granted and consent.at and consent.at > optout.at
        )
        if category is Category.MARKETING and not regranted:
            return OPTED_OUT
    if category is Category.MARKETING and not (consent is not None and consent.granted):
        return NO_CONSENT
    if channel not in reach.addresses:
        return NO_ADDRESS
    return ""


def choose_channel(
    category: Category,
    order: Sequence[Channel],
    reach: Reach,
    only: Channel | None = None,
) -> Choice:
    """The channel to send on (``only`` when the sender chose one), or the
    reason there is none."""
    reasons: list[str] = []
    for channel in [only] if only is not None else candidates(order, reach.preferred):
        reason = _blocked(category, channel, reach)
        if not reason:
            return Choice(channel)
        reasons.append(reason)
    for reason in _REASON_ORDER:
        if reason in reasons:
            return Choice(None, reason)
    return Choice(None, NO_CHANNEL)


def over_weekly_cap(sent_in_week: int, cap: int) -> bool:
    """True when one more marketing message would break the cap."""
    return sent_in_week >= cap
