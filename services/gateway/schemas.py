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
from typing import Annotated, Any, Literal, cast

from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from cornucopia.common.v1 import date_pb2
from cornucopia.members.v1 import members_pb2

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


def _one_of(choices: Mapping[str, int]) -> Any:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return value

    return AfterValidator(check)


def _enum_schema(choices: Mapping[str, int]) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "enum": list(choices)})


GenderName = Annotated[str, _one_of(GENDERS), _enum_schema(GENDERS)]
ChannelName = Annotated[str, _one_of(ENROLLMENT_CHANNELS), _enum_schema(ENROLLMENT_CHANNELS)]


def _encodable(value: str) -> str:
    # JSON may carry lone UTF-16 surrogates ("\ud800"); protobuf strings
    # must be valid UTF-8.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid text") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]


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
    gender: Annotated[str, _enum_schema(GENDERS)] | None = None
    birthday: Birthday | None = None
    enrollment_channel: Annotated[str, _enum_schema(ENROLLMENT_CHANNELS)] | None = None
    preferred_language: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    etag: str = Field(default="", description="Changes with every update.")
    enrolled_by: AuditStamp | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok"] = "ok"
    checks: dict[str, str] = Field(
        default_factory=dict,
        description="Each service the gateway needs, with its gRPC health status.",
        examples=[{"members": "SERVING"}],
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


def member_from_proto(member: members_pb2.Member) -> Member:
    return Member.model_validate(proto_to_json(member))
