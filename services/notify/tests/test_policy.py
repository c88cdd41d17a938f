"""Quiet hours and greeting times: local rules, UTC instants."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from services.notify.domain import Category, Channel
from services.notify.domain.policy import (
    QuietHours,
    local_instant,
    parse_time_of_day,
    quiet_hours_release,
)

SHANGHAI = "Asia/Shanghai"  # UTC+8, no daylight saving
NEW_YORK = "America/New_York"


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)


def test_marketing_sms_at_22_local_waits_until_9_next_morning() -> None:
    # 22:30 in Shanghai is 14:30 UTC.
    release = quiet_hours_release(
        QuietHours(), Category.MARKETING, Channel.SMS, utc(2026, 11, 30, 14, 30), SHANGHAI
    )
    assert release == utc(2026, 12, 1, 1, 0)  # 09:00 on 1 December in Shanghai


def test_marketing_sms_after_midnight_waits_until_9_the_same_morning() -> None:
    release = quiet_hours_release(
        QuietHours(), Category.MARKETING, Channel.SMS, utc(2026, 11, 30, 18, 0), SHANGHAI
    )
    assert release == utc(2026, 12, 1, 1, 0)  # 02:00 local → 09:00 local


@pytest.mark.parametrize(
    ("category", "channel"),
    [
        (Category.TRANSACTIONAL, Channel.SMS),  # a receipt is not marketing
        (Category.MARKETING, Channel.EMAIL),  # quiet hours are for SMS by default
    ],
)
def test_quiet_hours_leave_other_messages_alone(category: Category, channel: Channel) -> None:
    assert (
        quiet_hours_release(QuietHours(), category, channel, utc(2026, 11, 30, 15), SHANGHAI)
        is None
    )


def test_marketing_sms_in_the_day_goes_now() -> None:
    assert (
        quiet_hours_release(
            QuietHours(), Category.MARKETING, Channel.SMS, utc(2026, 11, 30, 4), SHANGHAI
        )
        is None
    )


def test_quiet_hours_within_one_day() -> None:
    lunch = QuietHours(start=dt.time(12), end=dt.time(14))
    assert lunch.contains(dt.time(13))
    assert not lunch.contains(dt.time(14))
    assert not lunch.contains(dt.time(11, 59))


def test_empty_quiet_hours_never_apply() -> None:
    none = QuietHours(start=dt.time(9), end=dt.time(9))
    assert (
        quiet_hours_release(none, Category.MARKETING, Channel.SMS, utc(2026, 1, 1), SHANGHAI)
        is None
    )


@given(
    when=st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2027, 12, 31)).map(
        lambda d: d.replace(tzinfo=dt.UTC)
    ),
    zone=st.sampled_from([SHANGHAI, NEW_YORK, "Europe/Madrid", "UTC", "Pacific/Chatham"]),
)
# 21:00 in New York on the night the clocks go back: released at 09:00, 13 h on.
@example(when=utc(2026, 11, 1, 1), zone=NEW_YORK)
def test_a_release_is_later_and_outside_quiet_hours(when: dt.datetime, zone: str) -> None:
    quiet = QuietHours()
    release = quiet_hours_release(quiet, Category.MARKETING, Channel.SMS, when, zone)
    if release is None:
        return
    assert release > when
    # Twelve quiet hours by the clock on the wall, which a night that puts
    # the clocks back makes thirteen.
    assert release - when <= dt.timedelta(hours=13, minutes=1)
    assert quiet_hours_release(quiet, Category.MARKETING, Channel.SMS, release, zone) is None


def test_greeting_at_9_local_in_two_zones() -> None:
    day = dt.date(2026, 7, 1)
    assert local_instant(day, dt.time(9), SHANGHAI) == utc(2026, 7, 1, 1)
    assert local_instant(day, dt.time(9), NEW_YORK) == utc(2026, 7, 1, 13)  # summer time


def test_times_of_day_are_read_strictly() -> None:
    assert parse_time_of_day("21:00") == dt.time(21)
    with pytest.raises(ValueError, match="HH:MM"):
        parse_time_of_day("9pm")
