"""Member events' and referral campaigns' pure rules: validation, answer
and door windows, what an answer does to the seats."""

from __future__ import annotations

import datetime as dt

import pytest

from chassis.errors import FailedPrecondition, InvalidArgument
from services.campaigns.domain import member_events as d
from services.campaigns.domain import referrals as r
from services.campaigns.domain.member_events import Answer, EventKind, SeatMove

NOW = dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC)
START = NOW + dt.timedelta(days=7)
END = START + dt.timedelta(hours=3)


def event(**changes: object) -> d.MemberEvent:
    values: dict[str, object] = {
        "event_id": "EV1",
        "name": " VIP 之夜 ",
        "kind": EventKind.VIP_EVENING,
        "store_id": "S001",
        "start_at": START,
        "end_at": END,
        "capacity": 5,
        "rsvp_deadline": None,
        "now": NOW,
    }
    values.update(changes)
    return d.validate_event(**values)  # type: ignore[arg-type]


def violations(exc: InvalidArgument) -> set[str]:
    return {v.field for v in exc.violations}


def test_an_event_is_validated_and_answers_close_at_the_start_by_default() -> None:
    e = event()
    assert e.name == "VIP 之夜"
    assert e.rsvp_deadline == START
    assert e.rsvp_open(START - dt.timedelta(seconds=1))
    assert not e.rsvp_open(START)
    early = event(rsvp_deadline=START - dt.timedelta(days=2))
    assert not early.rsvp_open(START - dt.timedelta(days=1))


def test_every_problem_of_an_event_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as caught:
        event(
            name="",
            kind=None,
            store_id="",
            start_at=NOW - dt.timedelta(hours=1),
            end_at=NOW - dt.timedelta(hours=2),
            capacity=0,
        )
    assert violations(caught.value) == {
        "event.display_name",
        "event.kind",
        "event.store_id",
        "event.start_time",
        "event.end_time",
        "event.capacity",
    }
    with pytest.raises(InvalidArgument) as caught:
        event(rsvp_deadline=START + dt.timedelta(minutes=1), capacity=100_001)
    assert violations(caught.value) == {"event.rsvp_deadline", "event.capacity"}
    with pytest.raises(InvalidArgument) as caught:
        event(end_at=START + dt.timedelta(days=32))
    assert violations(caught.value) == {"event.end_time"}


def test_the_door_opens_two_hours_before_the_start_and_closes_at_the_end() -> None:
    e = event()
    assert not e.door_open(START - dt.timedelta(hours=2, seconds=1))
    assert e.door_open(START - dt.timedelta(hours=2))
    assert e.door_open(END - dt.timedelta(seconds=1))
    assert not e.door_open(END)
    with pytest.raises(FailedPrecondition) as caught:
        d.require_door_open(e, END)
    assert caught.value.reason == "CHECK_IN_CLOSED"
    with pytest.raises(FailedPrecondition) as closed:
        d.require_rsvp_open(e, START)
    assert closed.value.reason == "RSVP_CLOSED"


@pytest.mark.parametrize(
    ("before", "after", "move"),
    [
        (Answer.NONE, Answer.YES, SeatMove.TAKE),
        (Answer.NO, Answer.YES, SeatMove.TAKE),
        (Answer.YES, Answer.NO, SeatMove.GIVE_BACK),
        (Answer.YES, Answer.YES, SeatMove.NONE),
        (Answer.NONE, Answer.NO, SeatMove.NONE),
        (Answer.NO, Answer.NO, SeatMove.NONE),
    ],
)
def test_only_a_yes_takes_a_seat_and_only_leaving_a_yes_gives_it_back(
    before: Answer, after: Answer, move: SeatMove
) -> None:
    assert d.seat_move(before, after) == move


def test_a_walk_in_is_anyone_at_the_door_without_a_yes() -> None:
    assert not d.is_walk_in(Answer.YES)
    assert d.is_walk_in(Answer.NO)
    assert d.is_walk_in(Answer.NONE)


def test_invited_ids_are_checked_and_kept_once_in_order() -> None:
    assert d.member_ids([" M2 ", "M1", "M2"]) == ["M2", "M1"]
    with pytest.raises(InvalidArgument) as caught:
        d.member_ids(["M1", "not an id"])
    assert violations(caught.value) == {"member_ids[1]"}
    with pytest.raises(InvalidArgument):
        d.member_ids([])
    with pytest.raises(InvalidArgument):
        d.member_ids([f"M{i}" for i in range(d.MAX_INVITES + 1)])


def test_a_list_or_a_segment_is_invited_not_both_nor_neither() -> None:
    assert d.invite_targets(["M1", "M1"], "") == (["M1"], "")
    assert d.invite_targets([], " JUNE ") == ([], "JUNE")
    with pytest.raises(InvalidArgument) as both:
        d.invite_targets(["M1"], "JUNE")
    assert violations(both.value) == {"segment_id"}
    with pytest.raises(InvalidArgument) as neither:
        d.invite_targets([], "  ")
    assert violations(neither.value) == {"member_ids"}
    assert d.new_invite_job_id().startswith("IJ") and len(d.new_invite_job_id()) == 16


def campaign(**changes: object) -> r.Campaign:
    values: dict[str, object] = {
        "campaign_id": "bring-a-friend",
        "name": "Bring a friend",
        "trigger": r.Trigger.ENROLL,
        "template_id": "T1",
        "points": 0,
        "start_at": NOW,
        "end_at": NOW + dt.timedelta(days=30),
    }
    values.update(changes)
    return r.validate_campaign(**values)  # type: ignore[arg-type]


def test_a_referral_campaign_has_exactly_one_reward_and_a_window() -> None:
    coupon = campaign()
    assert (coupon.reward, coupon.template_id, coupon.points) == (r.RewardKind.COUPON, "T1", 0)
    points = campaign(template_id="", points=500, trigger=r.Trigger.FIRST_PURCHASE)
    assert (points.reward, points.template_id, points.points) == (r.RewardKind.POINTS, "", 500)
    assert coupon.covers(NOW)
    assert not coupon.covers(NOW - dt.timedelta(seconds=1))
    assert not coupon.covers(NOW + dt.timedelta(days=30))
    with pytest.raises(InvalidArgument) as caught:
        campaign(points=10)
    assert violations(caught.value) == {"campaign.reward"}
    with pytest.raises(InvalidArgument) as caught:
        campaign(template_id="")
    assert violations(caught.value) == {"campaign.reward"}
    with pytest.raises(InvalidArgument) as caught:
        campaign(
            campaign_id="Bad Id",
            name="",
            trigger=None,
            template_id="",
            points=2_000_000,
            end_at=NOW,
        )
    assert violations(caught.value) == {
        "campaign.campaign_id",
        "campaign.display_name",
        "campaign.trigger",
        "campaign.points",
        "campaign.end_time",
    }


def test_the_reward_key_is_the_campaign_and_the_referred_member() -> None:
    assert r.reward_request_id("bring-a-friend", "M1") == "referral:bring-a-friend:M1"
