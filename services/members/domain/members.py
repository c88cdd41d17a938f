"""Member file rules. Pure: no I/O, no clock of its own (today is passed in),
no protobuf, so they are fast to test and easy to read."""

from __future__ import annotations

import datetime as dt
import enum
import re
import secrets
from dataclasses import dataclass

import phonenumbers

from chassis.errors import Violations

LANGUAGES = ("zh-CN", "en", "es")
_STORE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,31}$")
# Deliberately simple: the part before @ is free, the domain must have a dot
# and no spaces. Real deliverability is proven by sending, not by regex.
_EMAIL = re.compile(
    r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9\-]{1,63})+$"
)
# Crockford's base32 without I, L, O, U: no look-alike characters for staff
# reading a member number over the phone.
_ID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MAX_NAME_LENGTH = 100


class Gender(enum.StrEnum):
    UNSPECIFIED = ""
    FEMALE = "female"
    MALE = "male"
    OTHER = "other"


class EnrollmentChannel(enum.StrEnum):
    STORE = "store"
    CALL_CENTER = "call_center"
    WEBSITE = "website"
    BATCH_IMPORT = "batch_import"
    PARTNER = "partner"


@dataclass(frozen=True)
class Birthday:
    """A day of the year with an optional year (0 when the member did not
    give it)."""

    year: int
    month: int
    day: int


@dataclass(frozen=True)
class Enrollment:
    """What a caller asks to enroll, before validation."""

    home_store_id: str
    given_name: str
    family_name: str = ""
    mobile: str = ""
    email: str = ""
    gender: Gender = Gender.UNSPECIFIED
    birthday: Birthday | None = None
    enrollment_channel: EnrollmentChannel | None = None
    preferred_language: str = ""


@dataclass(frozen=True)
class NewMember:
    """A validated, normalised enrollment."""

    home_store_id: str
    given_name: str
    family_name: str
    mobile: str
    email: str
    gender: Gender
    birthday: Birthday | None
    enrollment_channel: EnrollmentChannel
    preferred_language: str


def new_member_id() -> str:
    return "M" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def normalise_mobile(raw: str, default_region: str) -> str | None:
    """E.164 form of a mobile number typed in any local or international
    format; None when it is not a valid number."""
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


def normalise_email(raw: str) -> str | None:
    text = raw.strip()
    if not _EMAIL.match(text):
        return None
    local, _, domain = text.rpartition("@")
    return f"{local}@{domain.lower()}"


def check_birthday(birthday: Birthday, today: dt.date, violations: Violations) -> None:
    year = birthday.year or 2000  # a leap year, so 29 February is accepted without a year
    try:
        day = dt.date(year, birthday.month, birthday.day)
    except ValueError:
        violations.add("member.birthday", "not a real calendar day")
        return
    if birthday.year and (birthday.year < 1900 or day > today):
        violations.add("member.birthday", "must be a past day after 1900")


def validate_enrollment(
    request: Enrollment,
    *,
    today: dt.date,
    default_region: str,
    default_channel: EnrollmentChannel,
    default_language: str = "zh-CN",
) -> NewMember:
    """Check every field, report every problem at once, and return the
    normalised member. Field names in violations are the API's."""
    v = Violations()
    if not request.home_store_id:
        v.add("member.home_store_id", "required")
    elif not _STORE_ID.match(request.home_store_id):
        v.add("member.home_store_id", "letters, digits, '-' and '_', at most 32")
    given = request.given_name.strip()
    family = request.family_name.strip()
    if not given:
        v.add("member.given_name", "required")
    if len(given) > MAX_NAME_LENGTH:
        v.add("member.given_name", f"at most {MAX_NAME_LENGTH} characters")
    if len(family) > MAX_NAME_LENGTH:
        v.add("member.family_name", f"at most {MAX_NAME_LENGTH} characters")
    mobile = ""
    if not request.mobile.strip():
        v.add("member.mobile", "required: the mobile number is the member's e-card")
    else:
        mobile = normalise_mobile(request.mobile, default_region) or ""
        if not mobile:
            v.add("member.mobile", "not a valid phone number")
    email = ""
    if request.email.strip():
        email = normalise_email(request.email) or ""
        if not email:
            v.add("member.email", "not a valid e-mail address")
    if request.birthday is not None:
        check_birthday(request.birthday, today, v)
    language = request.preferred_language or default_language
    if language not in LANGUAGES:
        v.add("member.preferred_language", f"one of {', '.join(LANGUAGES)}")
    v.raise_if_any()
    return NewMember(
        home_store_id=request.home_store_id,
        given_name=given,
        family_name=family,
        mobile=mobile,
        email=email,
        gender=request.gender,
        birthday=request.birthday,
        enrollment_channel=request.enrollment_channel or default_channel,
        preferred_language=language,
    )
