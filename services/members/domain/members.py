"""Member file rules. Pure: no I/O, no clock of its own (today is passed in),
no protobuf, so they are fast to test and easy to read."""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import phonenumbers

from chassis.auth import Principal, Role, ScopeLevel
from chassis.errors import Aborted, FailedPrecondition, Violations
from chassis.ids import random_id

LANGUAGES = ("zh-CN", "en", "es")
_STORE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,31}$")
# Deliberately simple: the part before @ is free, the domain must have a dot
# and no spaces. Real deliverability is proven by sending, not by regex.
_EMAIL = re.compile(
    r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9\-]{1,63})+$"
)
MAX_NAME_LENGTH = 100
MAX_WORD_LENGTH = 60
MAX_LIST_LENGTH = 50
MAX_ADDRESS_PART = 200
MAX_NOTES_LENGTH = 2000
MAX_ATTRIBUTE_LENGTH = 200
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_ATTRIBUTE_NAME = _KIND
_TAG = re.compile(r"^[a-z0-9\u4e00-\u9fff][a-z0-9_\-\u4e00-\u9fff]{0,39}$")
_POSTCODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 \-]{0,11}$")
_CLOCK = re.compile(r"^(\d{2}):(\d{2})$")
_STAFF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,99}$")
_MEMBER_ID = re.compile(r"^M[0-9A-Z]{10}$")


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


class SkinType(enum.StrEnum):
    UNSPECIFIED = ""
    NORMAL = "normal"
    DRY = "dry"
    OILY = "oily"
    COMBINATION = "combination"
    SENSITIVE = "sensitive"


class IncomeBand(enum.StrEnum):
    UNSPECIFIED = ""
    LOW = "low"
    LOWER_MIDDLE = "lower_middle"
    MIDDLE = "middle"
    UPPER_MIDDLE = "upper_middle"
    HIGH = "high"


class ContactChannel(enum.StrEnum):
    UNSPECIFIED = ""
    SMS = "sms"
    EMAIL = "email"
    PHONE = "phone"
    POST = "post"
    APP = "app"


class MemberState(enum.StrEnum):
    ACTIVE = "active"
    ARCHIVED = "archived"
    MERGED = "merged"
    ERASED = "erased"


class AttributeType(enum.StrEnum):
    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    DATE = "date"
    ENUM = "enum"


@dataclass(frozen=True)
class AttributeDefinition:
    name: str
    type: AttributeType
    allowed_values: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Birthday:
    """A day of the year with an optional year (0 when the member did not
    give it)."""

    year: int
    month: int
    day: int


@dataclass(frozen=True)
class Coordinates:
    latitude: float
    longitude: float


@dataclass(frozen=True)
class Address:
    province: str = ""
    city: str = ""
    district: str = ""
    street: str = ""
    postcode: str = ""
    coordinates: Coordinates | None = None

    def is_empty(self) -> bool:
        return self == Address()


@dataclass(frozen=True)
class Anniversary:
    kind: str
    date: Birthday


@dataclass(frozen=True)
class ContactWindow:
    start_time: str
    end_time: str


@dataclass(frozen=True)
class ConsentChoice:
    channel: ContactChannel
    granted: bool
    source: str = ""


@dataclass(frozen=True)
class Enrollment:
    """What a caller asks to enroll (or an update would leave), before
    validation."""

    home_store_id: str
    given_name: str
    family_name: str = ""
    mobile: str = ""
    email: str = ""
    gender: Gender = Gender.UNSPECIFIED
    birthday: Birthday | None = None
    enrollment_channel: EnrollmentChannel | None = None
    preferred_language: str = ""
    landline: str = ""
    address: Address | None = None
    anniversaries: tuple[Anniversary, ...] = ()
    skin_type: SkinType = SkinType.UNSPECIFIED
    skin_concerns: tuple[str, ...] = ()
    occupation: str = ""
    income_band: IncomeBand = IncomeBand.UNSPECIFIED
    brands_used: tuple[str, ...] = ()
    preferences: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    preferred_contact_channel: ContactChannel = ContactChannel.UNSPECIFIED
    contact_windows: tuple[ContactWindow, ...] = ()
    consultant_id: str = ""
    referrer_member_id: str = ""
    enrolled_at: dt.datetime | None = None
    consents: tuple[ConsentChoice, ...] = ()
    notes: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


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
    landline: str = ""
    address: Address | None = None
    anniversaries: tuple[Anniversary, ...] = ()
    skin_type: SkinType = SkinType.UNSPECIFIED
    skin_concerns: tuple[str, ...] = ()
    occupation: str = ""
    income_band: IncomeBand = IncomeBand.UNSPECIFIED
    brands_used: tuple[str, ...] = ()
    preferences: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    preferred_contact_channel: ContactChannel = ContactChannel.UNSPECIFIED
    contact_windows: tuple[ContactWindow, ...] = ()
    consultant_id: str = ""
    referrer_member_id: str = ""
    enrolled_at: dt.datetime | None = None
    consents: tuple[ConsentChoice, ...] = ()
    notes: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


def new_member_id() -> str:
    # Ten characters of a 32-letter alphabet: 50 random bits.
    return random_id("M", 10)


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


def check_birthday(
    birthday: Birthday, today: dt.date, violations: Violations, path: str = "member.birthday"
) -> None:
    year = birthday.year or 2000  # a leap year, so 29 February is accepted without a year
    try:
        day = dt.date(year, birthday.month, birthday.day)
    except ValueError:
        violations.add(path, "not a real calendar day")
        return
    if birthday.year and (birthday.year < 1900 or day > today):
        violations.add(path, "must be a past day after 1900")


def normalise_phone(raw: str, default_region: str) -> str | None:
    """E.164 form of any phone number (landlines included)."""
    return normalise_mobile(raw, default_region)


def _check_address(address: Address | None, v: Violations) -> Address | None:
    if address is None:
        return None
    cleaned = Address(
        province=address.province.strip(),
        city=address.city.strip(),
        district=address.district.strip(),
        street=address.street.strip(),
        postcode=address.postcode.strip(),
        coordinates=address.coordinates,
    )
    for name in ("province", "city", "district", "street"):
        if len(getattr(cleaned, name)) > MAX_ADDRESS_PART:
            v.add(f"member.address.{name}", f"at most {MAX_ADDRESS_PART} characters")
    if cleaned.postcode and not _POSTCODE.match(cleaned.postcode):
        v.add("member.address.postcode", "letters, digits, spaces and '-', at most 12")
    if cleaned.coordinates is not None:
        c = cleaned.coordinates
        if not -90 <= c.latitude <= 90:
            v.add("member.address.coordinates.latitude", "between -90 and 90")
        if not -180 <= c.longitude <= 180:
            v.add("member.address.coordinates.longitude", "between -180 and 180")
    return None if cleaned.is_empty() else cleaned


def _words(values: Iterable[str], path: str, v: Violations) -> tuple[str, ...]:
    out: list[str] = []
    for i, raw in enumerate(values):
        word = raw.strip()
        if not word or len(word) > MAX_WORD_LENGTH:
            v.add(f"{path}[{i}]", f"1 to {MAX_WORD_LENGTH} characters")
        elif word not in out:
            out.append(word)
    if len(out) > MAX_LIST_LENGTH:
        v.add(path, f"at most {MAX_LIST_LENGTH} entries")
    return tuple(out)


def _tags(values: Iterable[str], v: Violations) -> tuple[str, ...]:
    out: list[str] = []
    for i, raw in enumerate(values):
        tag = raw.strip().lower()
        if not _TAG.match(tag):
            v.add(f"member.tags[{i}]", "lower-case letters, digits, '-' and '_', at most 40")
        elif tag not in out:
            out.append(tag)
    if len(out) > MAX_LIST_LENGTH:
        v.add("member.tags", f"at most {MAX_LIST_LENGTH} tags")
    return tuple(sorted(out))


def _minutes(text: str) -> int | None:
    match = _CLOCK.match(text.strip())
    if match is None:
        return None
    hours, minutes = int(match[1]), int(match[2])
    return hours * 60 + minutes if hours < 24 and minutes < 60 else None


def check_attributes(
    values: Mapping[str, str], definitions: Mapping[str, AttributeDefinition], v: Violations
) -> dict[str, str]:
    """Values of the chain's attributes, normalised by type; unknown names
    and values that do not fit their type are violations."""
    out: dict[str, str] = {}
    for name in sorted(values):
        path = f"member.attributes[{name}]"
        definition = definitions.get(name)
        if definition is None:
            v.add(path, "no such attribute is defined")
            continue
        raw = values[name].strip()
        normalised = _attribute_value(definition, raw)
        if normalised is None:
            v.add(path, f"not a valid {definition.type.value}")
        else:
            out[name] = normalised
    return out


def _attribute_value(definition: AttributeDefinition, raw: str) -> str | None:  # noqa: PLR0911
    if len(raw) > MAX_ATTRIBUTE_LENGTH:
        return None
    match definition.type:
        case AttributeType.STRING:
            return raw
        case AttributeType.NUMBER:
            try:
                number = float(raw)
            except ValueError:
                return None
            return raw if math.isfinite(number) else None
        case AttributeType.BOOLEAN:
            lowered = raw.lower()
            return lowered if lowered in ("true", "false") else None
        case AttributeType.DATE:
            try:
                return dt.date.fromisoformat(raw).isoformat()
            except ValueError:
                return None
        case AttributeType.ENUM:
            return raw if raw in definition.allowed_values else None


def validate_attribute_definition(definition: AttributeDefinition) -> AttributeDefinition:
    v = Violations()
    if not _ATTRIBUTE_NAME.match(definition.name):
        v.add("attribute_definition.name", "lower-case letters, digits and '_', at most 40")
    allowed = tuple(dict.fromkeys(a.strip() for a in definition.allowed_values))
    if definition.type == AttributeType.ENUM:
        if not allowed or any(not a or len(a) > MAX_ATTRIBUTE_LENGTH for a in allowed):
            v.add("attribute_definition.allowed_values", "an enum needs its values")
    elif allowed:
        v.add("attribute_definition.allowed_values", "only an enum has allowed values")
    if len(definition.description) > MAX_NOTES_LENGTH:
        v.add("attribute_definition.description", f"at most {MAX_NOTES_LENGTH} characters")
    v.raise_if_any()
    return replace(definition, allowed_values=allowed)


def _check_windows(windows: Iterable[ContactWindow], v: Violations) -> None:
    for i, window in enumerate(windows):
        start, end = _minutes(window.start_time), _minutes(window.end_time)
        if start is None or end is None or start >= end:
            v.add(f"member.contact_windows[{i}]", "HH:MM to a later HH:MM")


def _check_consents(consents: Iterable[ConsentChoice], v: Violations) -> None:
    seen: set[ContactChannel] = set()
    for i, consent in enumerate(consents):
        if consent.channel == ContactChannel.UNSPECIFIED:
            v.add(f"member.consents[{i}].channel", "required")
        elif consent.channel in seen:
            v.add(f"member.consents[{i}].channel", "given twice")
        seen.add(consent.channel)


def _check_profile(
    request: Enrollment,
    today: dt.date,
    default_region: str,
    definitions: Mapping[str, AttributeDefinition],
    v: Violations,
) -> dict[str, Any]:
    """The file beyond the enrollment basics, normalised, as NewMember
    fields."""
    landline = ""
    if request.landline.strip():
        landline = normalise_phone(request.landline, default_region) or ""
        if not landline:
            v.add("member.landline", "not a valid phone number")
    address = _check_address(request.address, v)
    for i, anniversary in enumerate(request.anniversaries):
        if not _KIND.match(anniversary.kind):
            v.add(f"member.anniversaries[{i}].kind", "lower-case letters, digits and '_'")
        check_birthday(anniversary.date, today, v, f"member.anniversaries[{i}].date")
    skin_concerns = _words(request.skin_concerns, "member.skin_concerns", v)
    brands = _words(request.brands_used, "member.brands_used", v)
    preferences = _words(request.preferences, "member.preferences", v)
    tags = _tags(request.tags, v)
    occupation = request.occupation.strip()
    if len(occupation) > MAX_WORD_LENGTH:
        v.add("member.occupation", f"at most {MAX_WORD_LENGTH} characters")
    _check_windows(request.contact_windows, v)
    consultant = request.consultant_id.strip()
    if consultant and not _STAFF_ID.match(consultant):
        v.add("member.consultant_id", "not a staff id")
    referrer = request.referrer_member_id.strip()
    if referrer and not _MEMBER_ID.match(referrer):
        v.add("member.referrer_member_id", "not a member id")
    if request.enrolled_at is not None and request.enrolled_at.date() > today:
        v.add("member.enroll_time", "must not be in the future")
    _check_consents(request.consents, v)
    notes = request.notes.strip()
    if len(notes) > MAX_NOTES_LENGTH:
        v.add("member.notes", f"at most {MAX_NOTES_LENGTH} characters")
    attributes = check_attributes(request.attributes, definitions, v)
    return {
        "landline": landline,
        "address": address,
        "anniversaries": tuple(request.anniversaries),
        "skin_type": request.skin_type,
        "skin_concerns": skin_concerns,
        "occupation": occupation,
        "income_band": request.income_band,
        "brands_used": brands,
        "preferences": preferences,
        "tags": tags,
        "preferred_contact_channel": request.preferred_contact_channel,
        "contact_windows": tuple(request.contact_windows),
        "consultant_id": consultant,
        "referrer_member_id": referrer,
        "enrolled_at": request.enrolled_at,
        "consents": tuple(request.consents),
        "notes": notes,
        "attributes": attributes,
    }


def validate_enrollment(
    request: Enrollment,
    *,
    today: dt.date,
    default_region: str,
    default_channel: EnrollmentChannel,
    default_language: str = "zh-CN",
    definitions: Mapping[str, AttributeDefinition] | None = None,
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
    profile = _check_profile(request, today, default_region, definitions or {}, v)
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
        **profile,
    )


# --- Updates, history, lifecycle ------------------------------------------

# Fields an UpdateMember mask may name (the API's names). Consents change
# through UpdateConsent, state through the lifecycle verbs.
UPDATABLE_FIELDS = frozenset(
    {
        "home_store_id",
        "given_name",
        "family_name",
        "mobile",
        "email",
        "gender",
        "birthday",
        "preferred_language",
        "landline",
        "address",
        "anniversaries",
        "skin_type",
        "skin_concerns",
        "occupation",
        "income_band",
        "brands_used",
        "preferences",
        "tags",
        "preferred_contact_channel",
        "contact_windows",
        "consultant_id",
        "referrer_member_id",
        "notes",
        "attributes",
    }
)
# Identifying values: encrypted at rest, masked for most roles, never in
# events or logs.
PERSONAL_FIELDS = frozenset(
    {
        "given_name",
        "family_name",
        "mobile",
        "email",
        "landline",
        "address",
        "birthday",
        "anniversaries",
        "notes",
    }
)


def check_update_mask(paths: Iterable[str]) -> tuple[str, ...]:
    """The mask's paths, each an updatable field; violations otherwise."""
    v = Violations()
    out: list[str] = []
    for path in paths:
        if path not in UPDATABLE_FIELDS:
            v.add("update_mask", f"{path!r} cannot be updated")
        elif path not in out:
            out.append(path)
    if not out and not v:
        v.add("update_mask", "required: name the fields to change")
    v.raise_if_any()
    return tuple(out)


def apply_mask(current: Enrollment, patch: Enrollment, paths: Iterable[str]) -> Enrollment:
    """The file as it would be with the masked fields taken from patch."""
    return replace(current, **{path: getattr(patch, path) for path in paths})


def profile_of(member: NewMember) -> Enrollment:
    """A validated file as input again (to re-validate it after a change)."""
    return Enrollment(**{f.name: getattr(member, f.name) for f in fields(Enrollment)})


def changed_fields(before: Enrollment, after: NewMember) -> tuple[str, ...]:
    return tuple(
        name
        for name in sorted(UPDATABLE_FIELDS)
        if _comparable(getattr(before, name)) != _comparable(getattr(after, name))
    )


def _comparable(value: object) -> object:
    if isinstance(value, Mapping):
        return sorted(value.items())
    return value


# The field names of each dataclass plain() has met, in order.
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
# Most values of a member are exactly these (a fast path of plain).
_SCALARS = frozenset({str, int, float, bool, type(None)})


def plain(value: object) -> object:
    """A value as JSON-ready data (for history and exports)."""
    if type(value) in _SCALARS or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        names = _FIELD_NAMES.get(type(value))
        if names is None:
            names = _FIELD_NAMES[type(value)] = tuple(f.name for f in fields(value))  # type: ignore[arg-type]
        return {name: plain(getattr(value, name)) for name in names}
    raise TypeError(f"cannot serialise {type(value).__name__}")


def etag_of(version: int) -> str:
    return f'W/"{version}"'


def check_etag(sent: str, version: int) -> None:
    """A sent etag must be the current one; none sent means last write wins."""
    if sent and sent.strip() != etag_of(version):
        raise Aborted(
            "the member file changed since you read it; read it again",
            reason="ETAG_MISMATCH",
        )


def require_state(state: MemberState, *allowed: MemberState) -> None:
    if state not in allowed:
        raise FailedPrecondition(
            f"not possible for a member file that is {state.value}",
            reason=f"MEMBER_{state.value.upper()}",
        )


# Fields a merge may fill in the survivor from the duplicate. Not merged:
# the mobile (the survivor's e-card stays), the home store, the enrollment
# (the survivor's is the one that counts), consents (a consent is the
# person's word on that file; mixing two could grant what was withdrawn).
MERGEABLE_FIELDS = (
    "given_name",
    "family_name",
    "email",
    "gender",
    "birthday",
    "landline",
    "address",
    "anniversaries",
    "skin_type",
    "skin_concerns",
    "occupation",
    "income_band",
    "brands_used",
    "preferences",
    "preferred_contact_channel",
    "contact_windows",
    "consultant_id",
    "referrer_member_id",
    "notes",
)


def merge_profiles(survivor: Enrollment, duplicate: Enrollment) -> Enrollment:
    """The survivor's file after taking in a duplicate: the survivor's
    values win, its empty fields take the duplicate's, tags and custom
    attributes are united (the survivor's value winning)."""
    taken: dict[str, Any] = {}
    for name in MERGEABLE_FIELDS:
        mine, theirs = getattr(survivor, name), getattr(duplicate, name)
        if not _filled(mine) and _filled(theirs):
            taken[name] = theirs
    taken["tags"] = tuple(sorted(set(survivor.tags) | set(duplicate.tags)))
    taken["attributes"] = {**dict(duplicate.attributes), **dict(survivor.attributes)}
    return replace(survivor, **taken)


def _filled(value: object) -> bool:
    if isinstance(value, enum.Enum):
        return bool(value.value)
    return bool(value)


def birth_years_for_ages(
    min_age: int, max_age: int, today: dt.date
) -> tuple[int | None, int | None]:
    """Birth-year bounds for an age range (age counted by year: the exact
    birthday is encrypted, the year is not)."""
    v = Violations()
    if min_age < 0:
        v.add("min_age", "must not be negative")
    if max_age < 0:
        v.add("max_age", "must not be negative")
    if min_age and max_age and min_age > max_age:
        v.add("max_age", "must not be below min_age")
    v.raise_if_any()
    latest = today.year - min_age if min_age else None
    earliest = today.year - max_age if max_age else None
    return earliest, latest


# --- Masking ----------------------------------------------------------------


@dataclass(frozen=True)
class Personal:
    """The identifying part of a member file."""

    given_name: str = ""
    family_name: str = ""
    mobile: str = ""
    email: str = ""
    landline: str = ""
    birthday: Birthday | None = None
    address: Address | None = None
    anniversaries: tuple[Anniversary, ...] = ()
    notes: str = ""


def sees_in_clear(principal: Principal, home_store_id: str) -> bool:
    """Who reads personal fields in clear: HQ admins, the call center and
    other services everywhere; store staff in their own store's files.
    Region managers run stores, not customer calls, and partners and other
    stores' staff have no need: they see masks."""
    if principal.has_any((Role.HQ_ADMIN, Role.CALL_CENTER, Role.SERVICE)):
        return True
    return (
        principal.scope.level == ScopeLevel.STORE
        and principal.scope.id == home_store_id
        and principal.has_any((Role.STORE_MANAGER, Role.STORE_OPERATOR))
    )


def mask_phone(number: str) -> str:
    """``+8613812345678`` → ``+86138****5678``: the operator prefix and last
    four digits, enough to confirm with the member, not to call them."""
    if len(number) <= 6:
        return "*" * len(number)
    keep = max(len(number) - 8, 1)
    return number[:keep] + "*" * (len(number) - keep - 4) + number[-4:]


def mask_name(name: str) -> str:
    """``李娜`` → ``李*``; ``Wei`` → ``W**``."""
    return name[:1] + "*" * (len(name) - 1) if name else ""


def mask_email(email: str) -> str:
    """``zhang.wei@163.com`` → ``z***@163.com``."""
    local, at, domain = email.rpartition("@")
    if not at:
        return mask_name(email)
    return f"{local[:1]}***@{domain}"


def mask_personal(
    personal: Personal, *, clear_mobile: bool = False, clear_email: bool = False
) -> Personal:
    """What a caller without the right to read a file sees of it. The
    identifier they looked the member up with stays in clear (they typed
    it)."""
    address = None
    if personal.address is not None:
        address = Address(province=personal.address.province, city=personal.address.city)
    return Personal(
        given_name=mask_name(personal.given_name),
        family_name=mask_name(personal.family_name),
        mobile=personal.mobile if clear_mobile else mask_phone(personal.mobile),
        email=personal.email if clear_email else mask_email(personal.email),
        landline=mask_phone(personal.landline),
        birthday=None,
        address=address,
        anniversaries=tuple(Anniversary(a.kind, Birthday(0, 0, 0)) for a in personal.anniversaries),
        notes="",
    )


# --- Follow-ups and feedback -------------------------------------------------


class FollowUpChannel(enum.StrEnum):
    UNSPECIFIED = ""
    PHONE = "phone"
    SMS = "sms"
    EMAIL = "email"
    APP = "app"
    VISIT = "visit"


class FollowUpOutcome(enum.StrEnum):
    UNSPECIFIED = ""
    REACHED = "reached"
    NO_ANSWER = "no_answer"
    CALL_BACK = "call_back"
    DECLINED = "declined"
    WRONG_NUMBER = "wrong_number"


class FeedbackSubject(enum.StrEnum):
    UNSPECIFIED = ""
    PRODUCT = "product"
    SERVICE = "service"


MAX_CALL_SECONDS = 6 * 3600


@dataclass(frozen=True)
class NewFollowUp:
    member_id: str
    channel: FollowUpChannel
    outcome: FollowUpOutcome
    duration_seconds: int
    next_step: str
    staff_id: str
    occurred_at: dt.datetime


def validate_follow_up(follow_up: NewFollowUp, now: dt.datetime) -> NewFollowUp:
    v = Violations()
    if not follow_up.member_id:
        v.add("follow_up.member_id", "required")
    if follow_up.channel == FollowUpChannel.UNSPECIFIED:
        v.add("follow_up.channel", "required")
    if follow_up.outcome == FollowUpOutcome.UNSPECIFIED:
        v.add("follow_up.outcome", "required")
    if not 0 <= follow_up.duration_seconds <= MAX_CALL_SECONDS:
        v.add("follow_up.duration_seconds", f"0 to {MAX_CALL_SECONDS}")
    if len(follow_up.next_step) > MAX_NOTES_LENGTH:
        v.add("follow_up.next_step", f"at most {MAX_NOTES_LENGTH} characters")
    if follow_up.staff_id and not _STAFF_ID.match(follow_up.staff_id):
        v.add("follow_up.staff_id", "not a staff id")
    # A few minutes of clock skew between terminals and the service.
    if follow_up.occurred_at > now + dt.timedelta(minutes=5):
        v.add("follow_up.occur_time", "must not be in the future")
    v.raise_if_any()
    return replace(follow_up, next_step=follow_up.next_step.strip())


@dataclass(frozen=True)
class NewFeedback:
    member_id: str
    subject: FeedbackSubject
    subject_ref: str
    rating: int
    text: str


def validate_feedback(feedback: NewFeedback) -> NewFeedback:
    v = Violations()
    if not feedback.member_id:
        v.add("feedback.member_id", "required")
    if feedback.subject == FeedbackSubject.UNSPECIFIED:
        v.add("feedback.subject", "required")
    ref = feedback.subject_ref.strip()
    if feedback.subject == FeedbackSubject.PRODUCT and not ref:
        v.add("feedback.subject_ref", "required for a product: its SKU")
    if len(ref) > MAX_WORD_LENGTH:
        v.add("feedback.subject_ref", f"at most {MAX_WORD_LENGTH} characters")
    if not 1 <= feedback.rating <= 5:
        v.add("feedback.rating", "1 to 5")
    if len(feedback.text) > MAX_NOTES_LENGTH:
        v.add("feedback.text", f"at most {MAX_NOTES_LENGTH} characters")
    v.raise_if_any()
    return replace(feedback, subject_ref=ref, text=feedback.text.strip())
