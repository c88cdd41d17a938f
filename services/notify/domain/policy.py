"""The chain's notification policy and the rules of time that come with it:
quiet hours and the send time of scheduled greetings. Pure: no I/O.

Times of day are local to the member's home store; instants are UTC."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass, field

from services.notify.domain.messages import DEFAULT_LOCALE, Category, Channel


def parse_time_of_day(text: str) -> dt.time:
    """ "HH:MM", 24-hour clock."""
    try:
        hours, minutes = text.split(":")
        return dt.time(int(hours), int(minutes))
    except ValueError:
        raise ValueError(f"{text!r} is not a time of day HH:MM") from None


@dataclass(frozen=True)
class QuietHours:
    """No marketing on ``channels`` from ``start`` to ``end`` local time (a
    span that may cross midnight, as the default 21:00-09:00 does)."""

    start: dt.time = dt.time(21, 0)
    end: dt.time = dt.time(9, 0)
    channels: frozenset[Channel] = frozenset({Channel.SMS})

    def applies_to(self, category: Category, channel: Channel) -> bool:
        return (
            category is Category.MARKETING and channel in self.channels and self.start != self.end
        )

    def contains(self, local: dt.time) -> bool:
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


@dataclass(frozen=True)
class NotifyPolicy:
    quiet_hours: QuietHours = field(default_factory=QuietHours)
    # Marketing messages a member may get in any seven days, on all channels.
    marketing_weekly_cap: int = 3
    # A direct send to more members than this waits for a second person's
    # approval.
    approval_threshold: int = 1000
    # How long before points expire the member is told.
    points_expiring_days_before: int = 30
    # Local time of birthday and anniversary greetings.
    greeting_time: dt.time = dt.time(9, 0)
    # When store managers get the weekly digest of whom to call: the day of
    # the week (0 = Monday) and the local time of the store.
    digest_weekday: int = 0
    digest_time: dt.time = dt.time(9, 0)
    # The language of members who gave none, per store, then chain-wide.
    default_locale: str = DEFAULT_LOCALE
    store_locales: dict[str, str] = field(default_factory=dict)
    # A member's SMS reply that is one of these (any case, full-width
    # letters too) withdraws their marketing consent on SMS.
    optout_keywords: frozenset[str] = frozenset(
        {"STOP", "UNSUBSCRIBE", "TD", "退订", "取消订阅", "BAJA"}
    )

    def store_locale(self, store_id: str) -> str:
        return self.store_locales.get(store_id, self.default_locale)


def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone; UTC when the name is empty (a store without one)."""
    return zoneinfo.ZoneInfo(name or "UTC")


def quiet_hours_release(
    quiet: QuietHours,
    category: Category,
    channel: Channel,
    when: dt.datetime,
    time_zone: str,
) -> dt.datetime | None:
    """None when a message may go at ``when`` (aware, any zone); otherwise
    the first instant after it, in UTC, when quiet hours are over."""
    if not quiet.applies_to(category, channel):
        return None
    local = when.astimezone(zone(time_zone))
    if not quiet.contains(local.time().replace(tzinfo=None)):
        return None
    release_day = local.date()
    if local.time().replace(tzinfo=None) >= quiet.end:
        release_day += dt.timedelta(days=1)
    release = dt.datetime.combine(release_day, quiet.end, tzinfo=local.tzinfo)
    # A wall time skipped by a clock change still names one instant:
    # zoneinfo resolves it with the offset before the change.
    return release.astimezone(dt.UTC)


def local_instant(day: dt.date, at: dt.time, time_zone: str) -> dt.datetime:
    """``at`` on ``day`` in the zone, as a UTC instant (birthday greetings at
    09:00 in the member's store's time zone)."""
    return dt.datetime.combine(day, at, tzinfo=zone(time_zone)).astimezone(dt.UTC)


def same_local_day(first: dt.datetime, second: dt.datetime, time_zone: str) -> bool:
    """Whether two instants fall on one day in the zone."""
    where = zone(time_zone)
    return first.astimezone(where).date() == second.astimezone(where).date()
