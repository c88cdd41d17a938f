"""The JSON shapes of the gateway and their translation to and from the
protobuf messages of the services.

The gateway checks only the shape of a request (types, known fields, enum
names); the rules (a real phone number, a real calendar day, a known store)
belong to the service, which reports every violation at once.

Enum values are the lower-case short names of the proto enums
(``GENDER_FEMALE`` is ``"female"``), derived from the generated descriptors
so that a value added to a proto needs no change here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar, cast

from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from cornucopia.common.v1 import date_pb2
from cornucopia.members.v1 import members_pb2
from services.gateway.problems import Problem

# -- enums ----------------------------------------------------------------------


def enum_prefix(enum: EnumDescriptor) -> str:
    """``EnrollmentChannel`` -> ``ENROLLMENT_CHANNEL_``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def short_names(enum: EnumDescriptor) -> dict[str, int]:
    """Lower-case short name -> number, without the UNSPECIFIED zero value."""
    prefix = enum_prefix(enum)
    return {
        value.name.removeprefix(prefix).lower(): value.number
        for value in enum.values
        if value.number != 0
    }


GENDERS = short_names(members_pb2.Gender.DESCRIPTOR)
ENROLLMENT_CHANNELS = short_names(members_pb2.EnrollmentChannel.DESCRIPTOR)


def one_of(choices: Mapping[str, int]) -> Any:
    """A check that a string is one of these names (with enum_schema, the
    type of an enum field of a request)."""

    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return value

    return AfterValidator(check)


def enum_schema(choices: Mapping[str, int]) -> WithJsonSchema:
    """The JSON schema of a string that is one of these names."""
    return WithJsonSchema({"type": "string", "enum": list(choices)})


GenderName = Annotated[str, one_of(GENDERS), enum_schema(GENDERS)]
ChannelName = Annotated[str, one_of(ENROLLMENT_CHANNELS), enum_schema(ENROLLMENT_CHANNELS)]


def encodable(value: str) -> str:
    # JSON may carry lone UTF-16 surrogates ("\ud800"); protobuf strings
    # must be valid UTF-8.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid text") from None
    return value


Text = Annotated[str, AfterValidator(encodable)]


# -- dates ----------------------------------------------------------------------


class Birthday(BaseModel):
    """A calendar day; year 0 when the member did not give it. Whether it is
    a real day is the members service's rule, reported with the others."""

    model_config = ConfigDict(extra="forbid")

    # Bounds only keep the numbers inside the proto's int32.
    year: int = Field(default=0, ge=0, le=9999, examples=[1990])
    month: int = Field(ge=0, le=9999, examples=[4])
    day: int = Field(ge=0, le=9999, examples=[12])


_DATE_TEXT = re.compile(r"(\d{4}|-)-(\d{2})-(\d{2})")


def _birthday_from_text(value: Any) -> Any:
    if isinstance(value, str):
        match = _DATE_TEXT.fullmatch(value.strip())
        if match is None:
            raise ValueError("use YYYY-MM-DD, --MM-DD (year unknown) or {year, month, day}")
        year = 0 if match[1] == "-" else int(match[1])
        return {"year": year, "month": int(match[2]), "day": int(match[3])}
    return value


BirthdayInput = Annotated[
    Birthday,
    BeforeValidator(_birthday_from_text, json_schema_input_type=Birthday | str),
]


# -- members ----------------------------------------------------------------------


class NewMember(BaseModel):
    """A member to enroll."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "home_store_id": "S001",
                    "given_name": "Ana",
                    "family_name": "García",
                    "mobile": "+34 612 345 678",
                    "email": "ana@example.com",
                    "gender": "female",
                    "birthday": "1990-04-12",
                    "enrollment_channel": "store",
                    "preferred_language": "es",
                }
            ]
        },
    )

    home_store_id: Text = Field(description="The store the member belongs to.")
    given_name: Text
    family_name: Text | None = None
    mobile: Text = Field(
        description="Any usual format; stored as E.164. Unique in the chain: it is also the "
        "member's e-card."
    )
    email: Text | None = None
    gender: GenderName | None = None
    birthday: BirthdayInput | None = Field(
        default=None,
        description='`{"year", "month", "day"}` or `"YYYY-MM-DD"` (`"--MM-DD"` without year).',
    )
    enrollment_channel: ChannelName | None = Field(
        default=None,
        description="How the member came to the chain; by default from the caller's scope.",
    )
    preferred_language: Text | None = Field(
        default=None, description='Language for messages: "zh-CN", "en" or "es".'
    )

    def to_proto(self) -> members_pb2.Member:
        member = members_pb2.Member(
            home_store_id=self.home_store_id,
            given_name=self.given_name,
            family_name=self.family_name or "",
            mobile=self.mobile,
            email=self.email or "",
            preferred_language=self.preferred_language or "",
        )
        if self.gender is not None:
            member.gender = GENDERS[self.gender]  # type: ignore[assignment]
        if self.enrollment_channel is not None:
            member.enrollment_channel = ENROLLMENT_CHANNELS[self.enrollment_channel]  # type: ignore[assignment]
        if self.birthday is not None:
            member.birthday.CopyFrom(
                date_pb2.Date(
                    year=self.birthday.year, month=self.birthday.month, day=self.birthday.day
                )
            )
        return member


def member_field(name: str) -> str:
    """The members service's field names as the HTTP request spells them."""
    if name == "request_id":
        return "Idempotency-Key"
    if name == "member":
        return "body"
    return name.removeprefix("member.")


SKIN_TYPES = short_names(members_pb2.SkinType.DESCRIPTOR)
INCOME_BANDS = short_names(members_pb2.IncomeBand.DESCRIPTOR)
CONTACT_CHANNELS = short_names(members_pb2.ContactChannel.DESCRIPTOR)
MEMBER_STATES = short_names(members_pb2.MemberState.DESCRIPTOR)
FOLLOW_UP_CHANNELS = short_names(members_pb2.FollowUpChannel.DESCRIPTOR)
FOLLOW_UP_OUTCOMES = short_names(members_pb2.FollowUpOutcome.DESCRIPTOR)


class Coordinates(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)


class PostalAddress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    province: Text = ""
    city: Text = ""
    district: Text = ""
    street: Text = ""
    postcode: Text = ""
    coordinates: Coordinates | None = None


class Anniversary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Text = Field(examples=["wedding"])
    date: BirthdayInput


class ContactWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_time: Text = Field(examples=["18:00"])
    end_time: Text = Field(examples=["20:30"])


class Consent(BaseModel):
    channel: Annotated[str, enum_schema(CONTACT_CHANNELS)] | None = None
    granted: bool = False
    update_time: datetime | None = None
    recorded_by: AuditStamp | None = None
    source: str = ""


def expand_enums(data: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    """The inverse of _shorten_enums: short names back to proto names."""
    for field in descriptor.fields:
        value = data.get(field.name)
        if value is None:
            data.pop(field.name, None)
            continue
        enum, message = field.enum_type, field.message_type
        items = value if field.is_repeated else [value]
        if enum is not None:
            prefix = enum_prefix(enum)
            expanded = [prefix + str(item).upper() for item in items]
            data[field.name] = expanded if field.is_repeated else expanded[0]
        elif message is not None and not message.GetOptions().map_entry:
            for item in items:
                if isinstance(item, dict):
                    expand_enums(item, message)
    return data


class MemberPatch(BaseModel):
    """The fields to change; only the fields sent are changed (a field sent
    as null or empty is cleared). Consents change through their own call."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"email": "ana@example.org", "tags": ["vip"]}]},
    )

    home_store_id: Text | None = None
    given_name: Text | None = None
    family_name: Text | None = None
    mobile: Text | None = None
    email: Text | None = None
    gender: GenderName | None = None
    birthday: BirthdayInput | None = None
    preferred_language: Text | None = None
    landline: Text | None = None
    address: PostalAddress | None = None
    anniversaries: list[Anniversary] | None = None
    skin_type: Annotated[str, one_of(SKIN_TYPES), enum_schema(SKIN_TYPES)] | None = None
    skin_concerns: list[Text] | None = None
    occupation: Text | None = None
    income_band: Annotated[str, one_of(INCOME_BANDS), enum_schema(INCOME_BANDS)] | None = None
    brands_used: list[Text] | None = None
    preferences: list[Text] | None = None
    tags: list[Text] | None = None
    preferred_contact_channel: (
        Annotated[str, one_of(CONTACT_CHANNELS), enum_schema(CONTACT_CHANNELS)] | None
    ) = None
    contact_windows: list[ContactWindow] | None = None
    consultant_id: Text | None = None
    referrer_member_id: Text | None = None
    notes: Text | None = None
    attributes: dict[Text, Text] | None = None

    def to_proto(self, member_id: str, etag: str) -> tuple[members_pb2.Member, list[str]]:
        """The member message and the field mask (the fields sent)."""
        data = self.model_dump(exclude_unset=True, mode="json")
        paths = sorted(data)
        member = members_pb2.Member(member_id=member_id, etag=etag)
        ParseDict(expand_enums(data, members_pb2.Member.DESCRIPTOR), member)
        return member, paths


class NewFollowUp(BaseModel):
    """A call, message or visit with a member."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "channel": "phone",
                    "outcome": "reached",
                    "duration_seconds": 95,
                    "next_step": "call back when the serum is in",
                }
            ]
        },
    )

    channel: Annotated[str, one_of(FOLLOW_UP_CHANNELS), enum_schema(FOLLOW_UP_CHANNELS)]
    outcome: Annotated[str, one_of(FOLLOW_UP_OUTCOMES), enum_schema(FOLLOW_UP_OUTCOMES)]
    duration_seconds: int = Field(default=0, ge=0, le=2**31 - 1)
    next_step: Text = ""
    staff_id: Text | None = Field(default=None, description="Who called; by default the caller.")
    occur_time: datetime | None = Field(default=None, description="By default now.")

    def to_proto(self, member_id: str) -> members_pb2.FollowUp:
        follow_up = members_pb2.FollowUp(
            member_id=member_id,
            channel=FOLLOW_UP_CHANNELS[self.channel],  # type: ignore[arg-type]
            outcome=FOLLOW_UP_OUTCOMES[self.outcome],  # type: ignore[arg-type]
            duration_seconds=self.duration_seconds,
            next_step=self.next_step,
            staff_id=self.staff_id or "",
        )
        if self.occur_time is not None:
            follow_up.occur_time.FromDatetime(self.occur_time)
        return follow_up


class FollowUp(BaseModel):
    follow_up_id: str
    member_id: str
    channel: Annotated[str, enum_schema(FOLLOW_UP_CHANNELS)] | None = None
    outcome: Annotated[str, enum_schema(FOLLOW_UP_OUTCOMES)] | None = None
    duration_seconds: int = 0
    next_step: str = ""
    staff_id: str = ""
    store_id: str = ""
    occur_time: datetime | None = None
    create_time: datetime | None = None


def follow_up_from_proto(follow_up: members_pb2.FollowUp) -> FollowUp:
    return FollowUp.model_validate(proto_to_json(follow_up))


class AuditStamp(BaseModel):
    principal: str = Field(default="", description="Who enrolled the member.")
    store_id: str = Field(default="", description="The store they acted from, if any.")
    time: datetime | None = None


class Member(BaseModel):
    """A member file."""

    member_id: str = Field(examples=["M7Q2K9X4TD"])
    home_store_id: str
    given_name: str
    family_name: str = ""
    mobile: str = Field(default="", description="E.164.", examples=["+34612345678"])
    email: str = ""
    gender: Annotated[str, enum_schema(GENDERS)] | None = None
    birthday: Birthday | None = None
    enrollment_channel: Annotated[str, enum_schema(ENROLLMENT_CHANNELS)] | None = None
    preferred_language: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    etag: str = Field(default="", description="Changes with every update.")
    enrolled_by: AuditStamp | None = None
    # The full file (issue 3). Personal fields come masked for callers whose
    # role may not read them (then `masked` is true).
    landline: str = ""
    address: PostalAddress | None = None
    anniversaries: list[Anniversary] = Field(default_factory=list)
    skin_type: Annotated[str, enum_schema(SKIN_TYPES)] | None = None
    skin_concerns: list[str] = Field(default_factory=list)
    occupation: str = ""
    income_band: Annotated[str, enum_schema(INCOME_BANDS)] | None = None
    brands_used: list[str] = Field(default_factory=list)
    preferences: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    preferred_contact_channel: Annotated[str, enum_schema(CONTACT_CHANNELS)] | None = None
    contact_windows: list[ContactWindow] = Field(default_factory=list)
    consultant_id: str = ""
    referrer_member_id: str = ""
    enroll_time: datetime | None = None
    consents: list[Consent] = Field(default_factory=list)
    notes: str = ""
    attributes: dict[str, str] = Field(default_factory=dict)
    state: Annotated[str, enum_schema(MEMBER_STATES)] | None = None
    merged_into: str = ""
    masked: bool = False


class Health(BaseModel):
    status: Literal["ok"] = "ok"


_CHECKS_DESCRIPTION = (
    "Each service the gateway calls, with the answer to its gRPC health check: "
    "the status it reported (`SERVING`, `NOT_SERVING`, `UNKNOWN`), or why it could "
    "not be checked (`UNREACHABLE`, `DEADLINE_EXCEEDED`, `SERVICE_UNKNOWN`, or "
    "another gRPC code). Only `members` decides readiness; the others are "
    "reported for the operators."
)
_CHECKS_SERVING = {
    "members": "SERVING",
    "cards": "SERVING",
    "loyalty": "SERVING",
    "campaigns": "SERVING",
    "notify": "SERVING",
}


class Readiness(BaseModel):
    """The gateway is ready: the members service is `SERVING`. The other
    services may be down; their routes then answer 503 or 504 while the
    member routes keep working."""

    status: Literal["ok"] = "ok"
    checks: dict[str, str] = Field(
        default_factory=dict,
        description=_CHECKS_DESCRIPTION,
        examples=[_CHECKS_SERVING, {**_CHECKS_SERVING, "loyalty": "UNREACHABLE"}],
    )


class NotReady(Problem):
    """The 503 of `/readyz` (`reason` `NOT_READY`): the members service is
    not `SERVING` or cannot be checked; `checks` says how every service
    answered."""

    checks: dict[str, str] = Field(
        default_factory=dict,
        description=_CHECKS_DESCRIPTION,
        examples=[{**_CHECKS_SERVING, "members": "UNREACHABLE"}],
    )


# -- protobuf to JSON ---------------------------------------------------------------


def _short_enum(enum: EnumDescriptor, name: Any) -> str | None:
    prefix = enum_prefix(enum)
    if not isinstance(name, str) or name == f"{prefix}UNSPECIFIED":
        return None  # unset, or a number this build does not know
    return name.removeprefix(prefix).lower()


def _shorten_enums(data: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        items = value if field.is_repeated else [value]
        enum, message = field.enum_type, field.message_type
        if enum is not None:
            shortened = [_short_enum(enum, item) for item in items]
            data[field.name] = shortened if field.is_repeated else shortened[0]
        elif message is not None and not message.GetOptions().map_entry:
            for item in items:
                # Well-known types (Timestamp) are already JSON scalars.
                if isinstance(item, dict):
                    _shorten_enums(item, message)
    return data


def proto_to_json(message: Message) -> dict[str, Any]:
    """A message as JSON: proto field names, every scalar field present,
    enums as their lower-case short names (null when unspecified)."""
    data = MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return _shorten_enums(data, cast(Descriptor, message.DESCRIPTOR))


M = TypeVar("M", bound=BaseModel)


def from_proto(model: type[M], message: Message) -> M:
    """A message as one of the gateway's JSON shapes (nested shapes
    included)."""
    return model.model_validate(proto_to_json(message))


def member_from_proto(member: members_pb2.Member) -> Member:
    return Member.model_validate(proto_to_json(member))
