"""Member file rules: validation and normalisation of an enrollment, member
numbers."""

from __future__ import annotations

import datetime as dt
import re

import phonenumbers
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from services.members.domain.members import (
    LANGUAGES,
    MAX_NAME_LENGTH,
    Birthday,
    Enrollment,
    EnrollmentChannel,
    Gender,
    NewMember,
    new_member_id,
    normalise_email,
    normalise_mobile,
    validate_enrollment,
)

TODAY = dt.date(2026, 11, 22)


def enroll(
    request: Enrollment,
    *,
    default_channel: EnrollmentChannel = EnrollmentChannel.STORE,
    **kwargs: str,
) -> NewMember:
    return validate_enrollment(
        request,
        today=TODAY,
        default_region=kwargs.pop("default_region", "CN"),
        default_channel=default_channel,
        **kwargs,
    )


def valid(**changes: object) -> Enrollment:
    fields: dict[str, object] = {
        "home_store_id": "S001",
        "given_name": "Wei",
        "family_name": "Wang",
        "mobile": "13800138000",
    }
    fields.update(changes)
    return Enrollment(**fields)  # type: ignore[arg-type]


def violations(request: Enrollment, **kwargs: str) -> dict[str, list[str]]:
    with pytest.raises(InvalidArgument) as caught:
        enroll(request, **kwargs)
    found: dict[str, list[str]] = {}
    for v in caught.value.violations:
        found.setdefault(v.field, []).append(v.description)
    return found


def test_a_valid_enrollment_is_normalised() -> None:
    member = enroll(
        Enrollment(
            home_store_id="S001",
            given_name="  Wei ",
            family_name=" Wang  ",
            mobile="138 0013 8000",
            email="Wang.Wei@Example.COM",
            gender=Gender.MALE,
            birthday=Birthday(1990, 5, 17),
            preferred_language="en",
        )
    )
    assert member == NewMember(
        home_store_id="S001",
        given_name="Wei",
        family_name="Wang",
        mobile="+8613800138000",
        # The domain is case-insensitive, the local part is the owner's.
        email="Wang.Wei@example.com",
        gender=Gender.MALE,
        birthday=Birthday(1990, 5, 17),
        enrollment_channel=EnrollmentChannel.STORE,
        preferred_language="en",
    )


@pytest.mark.parametrize(
    ("typed", "region"),
    [
        ("13800138000", "CN"),
        ("138 0013 8000", "CN"),
        ("138-0013-8000", "CN"),
        ("+86 138 0013 8000", "CN"),
        ("+8613800138000", "ES"),
        ("0086 138 0013 8000", "CN"),
    ],
)
def test_a_chinese_mobile_in_any_format_becomes_e164(typed: str, region: str) -> None:
    assert enroll(valid(mobile=typed), default_region=region).mobile == "+8613800138000"


def test_the_default_region_decides_local_numbers() -> None:
    assert enroll(valid(mobile="612 345 678"), default_region="ES").mobile == "+34612345678"
    assert "member.mobile" in violations(valid(mobile="612 345 678"), default_region="CN")


def test_every_invalid_field_is_reported_at_once_with_api_field_names() -> None:
    found = violations(
        Enrollment(
            home_store_id="not a store!",
            given_name="   ",
            family_name="x" * (MAX_NAME_LENGTH + 1),
            mobile="12345",
            email="wei-at-example.com",
            birthday=Birthday(1990, 2, 30),
            preferred_language="fr",
        )
    )
    assert set(found) == {
        "member.home_store_id",
        "member.given_name",
        "member.family_name",
        "member.mobile",
        "member.email",
        "member.birthday",
        "member.preferred_language",
    }
    assert found["member.given_name"] == ["required"]
    assert found["member.mobile"] == ["not a valid phone number"]
    assert found["member.preferred_language"] == [f"one of {', '.join(LANGUAGES)}"]


def test_required_fields() -> None:
    found = violations(Enrollment(home_store_id="", given_name="", mobile="  "))
    assert set(found) == {"member.home_store_id", "member.given_name", "member.mobile"}
    assert found["member.home_store_id"] == ["required"]
    assert found["member.mobile"][0].startswith("required")


def test_optional_fields_may_be_left_out() -> None:
    member = enroll(Enrollment(home_store_id="S001", given_name="Wei", mobile="13800138000"))
    assert (member.family_name, member.email, member.birthday) == ("", "", None)
    assert member.gender is Gender.UNSPECIFIED


@pytest.mark.parametrize(
    ("store_id", "ok"),
    [
        ("S001", True),
        ("store_01-a", True),
        ("A" * 32, True),
        ("A" * 33, False),
        ("-S001", False),
        ("S 001", False),
        ("S001/2", False),
        ("门店1", False),
    ],
)
def test_home_store_ids(store_id: str, ok: bool) -> None:
    if ok:
        assert enroll(valid(home_store_id=store_id)).home_store_id == store_id
    else:
        assert set(violations(valid(home_store_id=store_id))) == {"member.home_store_id"}


def test_names_are_at_most_100_characters() -> None:
    longest = "伟" * MAX_NAME_LENGTH
    assert enroll(valid(given_name=longest, family_name=longest)).given_name == longest
    found = violations(valid(given_name=longest + "伟"))
    assert set(found) == {"member.given_name"}


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("wei@example.com", "wei@example.com"),
        ("  Wei@Mail.Example.CN ", "Wei@mail.example.cn"),
        ("first.last+tag@example.co.uk", "first.last+tag@example.co.uk"),
    ],
)
def test_emails_are_normalised(typed: str, expected: str) -> None:
    assert enroll(valid(email=typed)).email == expected


@pytest.mark.parametrize(
    "typed", ["wei", "wei@", "@example.com", "wei@example", "wei @example.com", "a@b@c.com"]
)
def test_invalid_emails_are_refused(typed: str) -> None:
    assert set(violations(valid(email=typed))) == {"member.email"}


@pytest.mark.parametrize(
    "birthday",
    [
        Birthday(0, 2, 29),  # no year given: 29 February is a real birthday
        Birthday(2000, 2, 29),
        Birthday(0, 12, 31),
        Birthday(1900, 1, 1),
        Birthday(TODAY.year, TODAY.month, TODAY.day),  # born today
    ],
)
def test_birthdays_accepted(birthday: Birthday) -> None:
    assert enroll(valid(birthday=birthday)).birthday == birthday


@pytest.mark.parametrize(
    "birthday",
    [
        Birthday(0, 2, 30),
        Birthday(0, 4, 31),
        Birthday(2023, 2, 29),  # not a leap year
        Birthday(0, 13, 1),
        Birthday(0, 0, 1),
        Birthday(0, 1, 0),
        Birthday(TODAY.year + 1, 1, 1),  # in the future
        Birthday(TODAY.year, TODAY.month, TODAY.day + 1),  # tomorrow
        Birthday(1899, 12, 31),
    ],
)
def test_birthdays_refused(birthday: Birthday) -> None:
    assert set(violations(valid(birthday=birthday))) == {"member.birthday"}


def test_default_channel_and_language_are_applied() -> None:
    member = enroll(valid(), default_channel=EnrollmentChannel.CALL_CENTER)
    assert member.enrollment_channel is EnrollmentChannel.CALL_CENTER
    assert member.preferred_language == "zh-CN"
    member = enroll(valid(), default_language="es")
    assert member.preferred_language == "es"


def test_explicit_channel_and_language_win_over_defaults() -> None:
    member = enroll(
        valid(enrollment_channel=EnrollmentChannel.WEBSITE, preferred_language="en"),
        default_channel=EnrollmentChannel.STORE,
        default_language="es",
    )
    assert member.enrollment_channel is EnrollmentChannel.WEBSITE
    assert member.preferred_language == "en"


MEMBER_ID = re.compile(r"M[0-9A-HJKMNP-TV-Z]{10}")


def test_member_ids_are_m_and_ten_crockford_characters() -> None:
    ids = [new_member_id() for _ in range(2000)]
    for member_id in ids:
        assert MEMBER_ID.fullmatch(member_id), member_id
        assert not set(member_id[1:]) & set("ILOU")
    assert len(set(ids)) == len(ids)
    # Random, not a counter: over 2000 ids every character of the alphabet shows up.
    assert len({c for member_id in ids for c in member_id[1:]}) == 32


# -- properties of the normalisation --------------------------------------------------

regions = st.sampled_from(sorted(phonenumbers.SUPPORTED_REGIONS))


@st.composite
def typed_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """A number as someone might type it for a region: an example number of
    that region with its last digits changed, in one of several styles."""
    region = draw(regions)
    kind = draw(
        st.sampled_from(
            [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]
        )
    )
    example = phonenumbers.example_number_for_type(region, kind)
    assume(example is not None)
    national = phonenumbers.national_significant_number(example)
    changed = draw(st.integers(min_value=0, max_value=min(4, len(national) - 1)))
    tail = draw(st.text(alphabet="0123456789", min_size=changed, max_size=changed))
    digits = national[: len(national) - changed] + tail
    style = draw(st.sampled_from(["plain", "international", "spaced", "dashed"]))
    if style == "international":
        digits = f"+{example.country_code} {digits}"
    elif style == "spaced":
        digits = " ".join(digits[i : i + 3] for i in range(0, len(digits), 3))
    elif style == "dashed":
        digits = "-".join(digits[i : i + 4] for i in range(0, len(digits), 4))
    return digits, region


@given(typed=typed_numbers(), other_region=regions)
def test_normalising_an_e164_result_changes_nothing(
    typed: tuple[str, str], other_region: str
) -> None:
    raw, region = typed
    first = normalise_mobile(raw, region)
    assume(first is not None)
    assert re.fullmatch(r"\+[1-9][0-9]{4,14}", first)
    assert normalise_mobile(first, region) == first
    assert normalise_mobile(first, other_region) == first


@given(raw=st.text(max_size=24), region=regions)
def test_anything_typed_is_e164_or_refused(raw: str, region: str) -> None:
    result = normalise_mobile(raw, region)
    if result is not None:
        assert re.fullmatch(r"\+[1-9][0-9]{4,14}", result)
        assert normalise_mobile(result, region) == result


# phonenumbers reads a region's metadata on its first use: a first example
# may take longer than hypothesis's deadline on a busy machine.
@settings(deadline=None)
@given(region=regions, other_region=regions)
def test_a_local_example_number_normalises_once_and_for_all(region: str, other_region: str) -> None:
    example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    assume(example is not None)
    national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
    e164 = normalise_mobile(national, region)
    assert e164 == phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
    assert normalise_mobile(e164, other_region) == e164


@given(st.from_regex(r"[A-Za-z0-9._+\-]{1,20}@([a-z0-9]{1,10}\.){1,3}[a-z]{2,6}", fullmatch=True))
def test_email_normalisation_is_idempotent(address: str) -> None:
    once = normalise_email(address.upper())
    assert once is not None
    assert normalise_email(once) == once
    assert once.split("@")[1] == once.split("@")[1].lower()
