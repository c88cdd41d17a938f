"""The full member file's rules: validation of the profile, custom
attributes, update masks and etags, lifecycle, merge rules and the masking
policy."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chassis.auth import Principal, Role, Scope, ScopeLevel
from chassis.errors import Aborted, FailedPrecondition, InvalidArgument
from services.members.domain import members as d

TODAY = dt.date(2026, 11, 22)
HAIR = d.AttributeDefinition("hair_type", d.AttributeType.ENUM, ("curly", "straight"))
DEFINITIONS = {
    "hair_type": HAIR,
    "shoe_size": d.AttributeDefinition("shoe_size", d.AttributeType.NUMBER),
    "vegan": d.AttributeDefinition("vegan", d.AttributeType.BOOLEAN),
    "first_visit": d.AttributeDefinition("first_visit", d.AttributeType.DATE),
    "nickname": d.AttributeDefinition("nickname", d.AttributeType.STRING),
}


def enrollment(**changes: object) -> d.Enrollment:
    fields: dict[str, object] = {
        "home_store_id": "S001",
        "given_name": "娜",
        "family_name": "李",
        "mobile": "13800138000",
    }
    fields.update(changes)
    return d.Enrollment(**fields)  # type: ignore[arg-type]


def validate(request: d.Enrollment) -> d.NewMember:
    return d.validate_enrollment(
        request,
        today=TODAY,
        default_region="CN",
        default_channel=d.EnrollmentChannel.STORE,
        definitions=DEFINITIONS,
    )


def violations(request: d.Enrollment) -> set[str]:
    with pytest.raises(InvalidArgument) as caught:
        validate(request)
    return {v.field for v in caught.value.violations}


def test_the_full_file_is_normalised() -> None:
    member = validate(
        enrollment(
            landline="010-6552-9988",
            address=d.Address(" 北京市 ", "北京市", "朝阳区", "建国路 88 号", "100022"),
            anniversaries=(d.Anniversary("wedding", d.Birthday(2015, 5, 20)),),
            skin_concerns=(" acne ", "acne", "dryness"),
            tags=("VIP", "spring-event", "vip"),
            contact_windows=(d.ContactWindow("09:00", "12:00"),),
            consents=(d.ConsentChoice(d.ContactChannel.SMS, True, "form"),),
            attributes={"hair_type": "curly", "vegan": "TRUE", "first_visit": "2026-01-05"},
            notes="  likes roses ",
        )
    )
    assert member.landline == "+861065529988"
    assert member.address == d.Address("北京市", "北京市", "朝阳区", "建国路 88 号", "100022")
    assert member.skin_concerns == ("acne", "dryness")
    assert member.tags == ("spring-event", "vip")
    assert member.attributes == {
        "first_visit": "2026-01-05",
        "hair_type": "curly",
        "vegan": "true",
    }
    assert member.notes == "likes roses"


def test_an_empty_address_is_no_address() -> None:
    assert validate(enrollment(address=d.Address())).address is None


def test_every_profile_problem_is_reported_with_its_path() -> None:
    assert violations(
        enrollment(
            landline="12",
            address=d.Address(postcode="#", coordinates=d.Coordinates(91, 181)),
            anniversaries=(d.Anniversary("Wedding", d.Birthday(2030, 2, 30)),),
            tags=("no spaces allowed",),
            contact_windows=(d.ContactWindow("20:00", "08:00"), d.ContactWindow("9", "10:00")),
            consultant_id="bad id!",
            referrer_member_id="nope",
            enrolled_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
            consents=(
                d.ConsentChoice(d.ContactChannel.UNSPECIFIED, True),
                d.ConsentChoice(d.ContactChannel.SMS, True),
                d.ConsentChoice(d.ContactChannel.SMS, False),
            ),
            notes="x" * (d.MAX_NOTES_LENGTH + 1),
            attributes={"unknown": "1", "shoe_size": "big", "hair_type": "wavy"},
        )
    ) == {
        "member.landline",
        "member.address.postcode",
        "member.address.coordinates.latitude",
        "member.address.coordinates.longitude",
        "member.anniversaries[0].kind",
        "member.anniversaries[0].date",
        "member.tags[0]",
        "member.contact_windows[0]",
        "member.contact_windows[1]",
        "member.consultant_id",
        "member.referrer_member_id",
        "member.enroll_time",
        "member.consents[0].channel",
        "member.consents[2].channel",
        "member.notes",
        "member.attributes[unknown]",
        "member.attributes[shoe_size]",
        "member.attributes[hair_type]",
    }


@pytest.mark.parametrize(
    ("definition", "raw", "expected"),
    [
        (d.AttributeType.NUMBER, "12.5", "12.5"),
        (d.AttributeType.NUMBER, "nan", None),
        (d.AttributeType.NUMBER, "inf", None),
        (d.AttributeType.BOOLEAN, "False", "false"),
        (d.AttributeType.BOOLEAN, "yes", None),
        (d.AttributeType.DATE, "2026-02-30", None),
        (d.AttributeType.STRING, "anything", "anything"),
        (d.AttributeType.STRING, "x" * 201, None),
    ],
)
def test_attribute_values_fit_their_type(
    definition: d.AttributeType, raw: str, expected: str | None
) -> None:
    v = d.Violations()
    out = d.check_attributes({"a": raw}, {"a": d.AttributeDefinition("a", definition)}, v)
    assert out.get("a") == expected
    assert bool(v) == (expected is None)


def test_attribute_definitions_are_validated() -> None:
    assert d.validate_attribute_definition(
        d.AttributeDefinition("hair", d.AttributeType.ENUM, ("a", "b", "a"))
    ).allowed_values == ("a", "b")
    for bad in (
        d.AttributeDefinition("Hair Type", d.AttributeType.STRING),
        d.AttributeDefinition("hair", d.AttributeType.ENUM, ()),
        d.AttributeDefinition("hair", d.AttributeType.NUMBER, ("1",)),
    ):
        with pytest.raises(InvalidArgument):
            d.validate_attribute_definition(bad)


def test_an_update_mask_names_updatable_fields_only() -> None:
    assert d.check_update_mask(["email", "tags", "email"]) == ("email", "tags")
    for bad in ([], ["state"], ["member_id"], ["consents"], ["address.city"]):
        with pytest.raises(InvalidArgument):
            d.check_update_mask(bad)


def test_apply_mask_takes_only_the_masked_fields() -> None:
    current = d.profile_of(validate(enrollment(email="a@example.com", occupation="teacher")))
    patch = enrollment(given_name="X", email="b@example.com", occupation="")
    after = validate(d.apply_mask(current, patch, ("email", "occupation")))
    assert (after.given_name, after.email, after.occupation) == ("娜", "b@example.com", "")
    assert d.changed_fields(current, after) == ("email", "occupation")


def test_etags() -> None:
    d.check_etag("", 3)
    d.check_etag('W/"3"', 3)
    with pytest.raises(Aborted):
        d.check_etag('W/"2"', 3)


def test_lifecycle_states() -> None:
    d.require_state(d.MemberState.ACTIVE, d.MemberState.ACTIVE)
    with pytest.raises(FailedPrecondition) as caught:
        d.require_state(d.MemberState.MERGED, d.MemberState.ACTIVE)
    assert caught.value.reason == "MEMBER_MERGED"


def test_merge_keeps_the_survivors_values_and_fills_its_gaps() -> None:
    survivor = enrollment(
        email="",
        occupation="teacher",
        tags=("vip",),
        attributes={"hair_type": "curly"},
    )
    duplicate = enrollment(
        given_name="Other",
        mobile="13900139000",
        email="dup@example.com",
        occupation="nurse",
        skin_type=d.SkinType.DRY,
        tags=("new", "vip"),
        attributes={"hair_type": "straight", "vegan": "true"},
        consents=(d.ConsentChoice(d.ContactChannel.SMS, True),),
    )
    merged = d.merge_profiles(survivor, duplicate)
    assert merged.given_name == "娜"
    assert merged.mobile == "13800138000"
    assert merged.email == "dup@example.com"
    assert merged.occupation == "teacher"
    assert merged.skin_type == d.SkinType.DRY
    assert merged.tags == ("new", "vip")
    assert merged.attributes == {"hair_type": "curly", "vegan": "true"}
    assert merged.consents == ()


def test_age_bounds_become_birth_years() -> None:
    assert d.birth_years_for_ages(20, 30, TODAY) == (1996, 2006)
    assert d.birth_years_for_ages(0, 0, TODAY) == (None, None)
    with pytest.raises(InvalidArgument):
        d.birth_years_for_ages(30, 20, TODAY)


def principal(role: Role, level: ScopeLevel, ident: str = "") -> Principal:
    return Principal("someone", frozenset({role}), Scope(level, ident))


@pytest.mark.parametrize(
    ("who", "clear"),
    [
        (principal(Role.HQ_ADMIN, ScopeLevel.HQ), True),
        (principal(Role.CALL_CENTER, ScopeLevel.CALL_CENTER), True),
        (principal(Role.SERVICE, ScopeLevel.HQ), True),
        (principal(Role.STORE_OPERATOR, ScopeLevel.STORE, "S001"), True),
        (principal(Role.STORE_MANAGER, ScopeLevel.STORE, "S001"), True),
        (principal(Role.STORE_OPERATOR, ScopeLevel.STORE, "S002"), False),
        (principal(Role.REGION_MANAGER, ScopeLevel.REGION, "EAST"), False),
        (principal(Role.PARTNER, ScopeLevel.PARTNER, "BANK"), False),
    ],
)
def test_who_sees_personal_fields_in_clear(who: Principal, clear: bool) -> None:
    assert d.sees_in_clear(who, "S001") is clear


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+8613812345678", "+86138****5678"),
        ("+861065529988", "+8610****9988"),
        ("+14155550123", "+141****0123"),
        ("12345", "*****"),
    ],
)
def test_phone_masks(number: str, masked: str) -> None:
    assert d.mask_phone(number) == masked


def test_name_and_email_masks() -> None:
    assert d.mask_name("李娜") == "李*"
    assert d.mask_name("Wei") == "W**"
    assert d.mask_name("") == ""
    assert d.mask_email("zhang.wei@163.com") == "z***@163.com"
    assert d.mask_email("") == ""


def test_mask_personal_hides_all_but_what_was_typed() -> None:
    personal = d.Personal(
        given_name="娜",
        family_name="李",
        mobile="+8613812345678",
        email="li@example.com",
        landline="+861065529988",
        birthday=d.Birthday(1990, 3, 14),
        address=d.Address("北京市", "北京市", "朝阳区", "建国路", "100022"),
        anniversaries=(d.Anniversary("wedding", d.Birthday(2015, 5, 20)),),
        notes="private",
    )
    masked = d.mask_personal(personal, clear_mobile=True)
    assert masked.mobile == "+8613812345678"
    assert masked.email == "l***@example.com"
    assert masked.birthday is None
    assert masked.address == d.Address("北京市", "北京市")
    assert masked.anniversaries == (d.Anniversary("wedding", d.Birthday(0, 0, 0)),)
    assert masked.notes == ""


@given(st.text(alphabet="0123456789", min_size=8, max_size=15))
def test_a_masked_phone_keeps_its_length_and_last_four(digits: str) -> None:
    number = "+" + digits
    masked = d.mask_phone(number)
    assert len(masked) == len(number)
    assert masked[-4:] == number[-4:]
    assert "****" in masked


def test_follow_ups_and_feedback_are_validated() -> None:
    now = dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC)
    ok = d.NewFollowUp(
        "M0000000000",
        d.FollowUpChannel.PHONE,
        d.FollowUpOutcome.REACHED,
        60,
        " call again ",
        "staff-1",
        now,
    )
    assert d.validate_follow_up(ok, now).next_step == "call again"
    bad = d.NewFollowUp(
        "",
        d.FollowUpChannel.UNSPECIFIED,
        d.FollowUpOutcome.UNSPECIFIED,
        -1,
        "",
        "bad id!",
        now + dt.timedelta(hours=1),
    )
    with pytest.raises(InvalidArgument) as caught:
        d.validate_follow_up(bad, now)
    assert {v.field for v in caught.value.violations} == {
        "follow_up.member_id",
        "follow_up.channel",
        "follow_up.outcome",
        "follow_up.duration_seconds",
        "follow_up.staff_id",
        "follow_up.occur_time",
    }
    with pytest.raises(InvalidArgument) as caught:
        d.validate_feedback(d.NewFeedback("M1", d.FeedbackSubject.PRODUCT, "", 6, ""))
    assert {v.field for v in caught.value.violations} == {"feedback.subject_ref", "feedback.rating"}
