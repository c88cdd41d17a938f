"""The JSON shapes of notify's triggers, templates, policy and opt-outs, and
their translation to and from the notify service's messages."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from cornucopia.notify.v1 import notify_pb2, preferences_pb2, templates_pb2
from services.gateway.schemas import enum_schema, one_of, short_names

CHANNELS = short_names(notify_pb2.Channel.DESCRIPTOR)
CATEGORIES = short_names(notify_pb2.MessageCategory.DESCRIPTOR)
RECIPIENTS = short_names(templates_pb2.Recipient.DESCRIPTOR)
KINDS = short_names(templates_pb2.VariableKind.DESCRIPTOR)
SCOPES = short_names(preferences_pb2.OptOutScope.DESCRIPTOR)
SOURCES = short_names(preferences_pb2.OptOutSource.DESCRIPTOR)

ChannelName = Annotated[str, one_of(CHANNELS), enum_schema(CHANNELS)]
ScopeName = Annotated[str, one_of(SCOPES), enum_schema(SCOPES)]


def name_of(choices: dict[str, int], number: int) -> str | None:
    for name, value in choices.items():
        if value == number:
            return name
    return None


def stamp(
    message: templates_pb2.Template | templates_pb2.NotifyPolicy, field: str
) -> datetime | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    moment: datetime = getattr(message, field).ToDatetime()
    return moment


# --- triggers ---------------------------------------------------------------------


class Variable(BaseModel):
    name: str = Field(examples=["balance"])
    kind: Annotated[str, enum_schema(KINDS)] | None = None
    source: str = Field(examples=["trigger"], description="trigger, member, marketing or staff")


class Trigger(BaseModel):
    name: str = Field(examples=["stored_value_debited"])
    category: Annotated[str, enum_schema(CATEGORIES)] | None = None
    recipient: Annotated[str, enum_schema(RECIPIENTS)] | None = None
    event_subject: str = Field(default="", examples=["cards.v1.stored_value.debited"])
    variables: list[Variable] = []
    channels: list[Annotated[str, enum_schema(CHANNELS)]] = []
    description: str = ""


def trigger_from_proto(t: templates_pb2.Trigger) -> Trigger:
    return Trigger(
        name=t.name,
        category=name_of(CATEGORIES, t.category),
        recipient=name_of(RECIPIENTS, t.recipient),
        event_subject=t.event_subject,
        variables=[
            Variable(name=v.name, kind=name_of(KINDS, v.kind), source=v.source) for v in t.variables
        ],
        channels=[n for c in t.channels if (n := name_of(CHANNELS, c))],
        description=t.description,
    )


class TriggerList(BaseModel):
    triggers: list[Trigger]


# --- templates --------------------------------------------------------------------

Texts = Annotated[
    dict[str, Annotated[str, Field(max_length=2000)]],
    Field(
        max_length=3,
        examples=[
            {"zh-CN": "您的余额 {balance}", "en": "Balance {balance}", "es": "Saldo {balance}"}
        ],
    ),
]


class NewTemplate(BaseModel):
    """A template to save: bodies in zh-CN, en and es; e-mail subjects
    optional. Only the trigger's variables may be used, as ``{name}``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64, examples=["stored_value_debited"])
    trigger: str = Field(max_length=64, examples=["stored_value_debited"])
    channel: ChannelName | None = Field(
        default=None, description="Only this channel; absent for every channel."
    )
    bodies: Texts
    subjects: Texts = {}

    def to_proto(self) -> templates_pb2.Template:
        return templates_pb2.Template(
            name=self.name,
            trigger=self.trigger,
            channel=CHANNELS[self.channel] if self.channel else 0,  # type: ignore[arg-type]
            bodies=self.bodies,
            subjects=self.subjects,
        )


class TemplateVersion(BaseModel):
    """A template as the body of a new version: its name is in the path."""

    model_config = ConfigDict(extra="forbid")

    trigger: str = Field(max_length=64, examples=["stored_value_debited"])
    channel: ChannelName | None = None
    bodies: Texts
    subjects: Texts = {}

    def to_proto(self, name: str) -> templates_pb2.Template:
        return NewTemplate(name=name, **self.model_dump()).to_proto()


class Template(BaseModel):
    name: str
    trigger: str
    channel: Annotated[str, enum_schema(CHANNELS)] | None = None
    bodies: dict[str, str]
    subjects: dict[str, str] = {}
    version: int = Field(description="0 for the built-in wording.")
    built_in: bool = False
    create_time: datetime | None = None
    created_by: str = ""
    variables: list[str] = []


def template_from_proto(t: templates_pb2.Template) -> Template:
    return Template(
        name=t.name,
        trigger=t.trigger,
        channel=name_of(CHANNELS, t.channel),
        bodies=dict(t.bodies),
        subjects=dict(t.subjects),
        version=t.version,
        built_in=t.built_in,
        create_time=stamp(t, "create_time"),
        created_by=t.created_by,
        variables=list(t.variables),
    )


class TemplateList(BaseModel):
    templates: list[Template]


class PreviewRequest(BaseModel):
    """Either ``template`` (unsaved) or ``name`` (saved or built in)."""

    model_config = ConfigDict(extra="forbid")

    template: NewTemplate | None = None
    name: str | None = Field(default=None, max_length=64, examples=["welcome"])
    channel: ChannelName | None = None
    member_id: str = Field(default="", max_length=64, examples=["M7Q2K9X4TD"])
    locale: str = Field(default="", max_length=10, examples=["es"])
    variables: dict[str, Annotated[str, Field(max_length=200)]] = Field(default={}, max_length=30)

    def to_proto(self) -> templates_pb2.PreviewTemplateRequest:
        out = templates_pb2.PreviewTemplateRequest(
            channel=CHANNELS[self.channel] if self.channel else 0,  # type: ignore[arg-type]
            member_id=self.member_id,
            locale=self.locale,
            variables=self.variables,
        )
        if self.template is not None:
            out.template.CopyFrom(self.template.to_proto())
        elif self.name is not None:
            out.name = self.name
        return out


class Preview(BaseModel):
    locale: str
    subject: str
    body: str
    template: str
    version: int


# --- policy -----------------------------------------------------------------------

TimeOfDay = Annotated[str, Field(pattern=r"^\d{2}:\d{2}$", examples=["21:00"])]


class QuietHours(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_time: TimeOfDay
    end_time: TimeOfDay
    channels: list[ChannelName] = Field(max_length=6, examples=[["sms"]])


class NotifyPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quiet_hours: QuietHours
    marketing_weekly_cap: int = Field(ge=0, le=100, examples=[3])
    approval_threshold: int = Field(ge=1, examples=[1000])
    points_expiring_days_before: int = Field(ge=1, le=365, examples=[30])
    greeting_time: TimeOfDay
    default_locale: str = Field(examples=["zh-CN"])
    store_locales: dict[str, str] = Field(default={}, examples=[{"S002": "es"}])
    optout_keywords: list[Annotated[str, Field(max_length=20)]] = Field(
        max_length=50, examples=[["STOP", "TD", "退订", "BAJA"]]
    )
    digest_weekday: int = Field(default=0, ge=0, le=6, description="0 = Monday")
    digest_time: TimeOfDay = "09:00"

    def to_proto(self) -> templates_pb2.NotifyPolicy:
        return templates_pb2.NotifyPolicy(
            quiet_hours=templates_pb2.QuietHours(
                start_time=self.quiet_hours.start_time,
                end_time=self.quiet_hours.end_time,
                channels=[CHANNELS[c] for c in self.quiet_hours.channels],  # type: ignore[misc]
            ),
            marketing_weekly_cap=self.marketing_weekly_cap,
            approval_threshold=self.approval_threshold,
            points_expiring_days_before=self.points_expiring_days_before,
            greeting_time=self.greeting_time,
            default_locale=self.default_locale,
            store_locales=self.store_locales,
            optout_keywords=self.optout_keywords,
            digest_weekday=self.digest_weekday,
            digest_time=self.digest_time,
        )


class StoredPolicy(NotifyPolicy):
    update_time: datetime | None = None
    updated_by: str = ""


def policy_from_proto(p: templates_pb2.NotifyPolicy) -> StoredPolicy:
    return StoredPolicy(
        quiet_hours=QuietHours(
            start_time=p.quiet_hours.start_time,
            end_time=p.quiet_hours.end_time,
            channels=[n for c in p.quiet_hours.channels if (n := name_of(CHANNELS, c))],
        ),
        marketing_weekly_cap=p.marketing_weekly_cap,
        approval_threshold=p.approval_threshold,
        points_expiring_days_before=p.points_expiring_days_before,
        greeting_time=p.greeting_time,
        default_locale=p.default_locale,
        store_locales=dict(p.store_locales),
        optout_keywords=list(p.optout_keywords),
        digest_weekday=p.digest_weekday,
        digest_time=p.digest_time,
        update_time=stamp(p, "update_time"),
        updated_by=p.updated_by,
    )


# --- opt-outs ---------------------------------------------------------------------


class NewOptOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: ChannelName = Field(examples=["sms"])
    scope: ScopeName = Field(
        default="marketing",
        description="marketing: no more marketing on the channel; all: nothing at all.",
    )


class OptOut(BaseModel):
    optout_id: str
    member_id: str
    channel: Annotated[str, enum_schema(CHANNELS)] | None = None
    scope: Annotated[str, enum_schema(SCOPES)] | None = None
    source: Annotated[str, enum_schema(SOURCES)] | None = None
    create_time: datetime | None = None
    recorded_by: str = ""


def optout_from_proto(o: preferences_pb2.OptOut) -> OptOut:
    return OptOut(
        optout_id=o.optout_id,
        member_id=o.member_id,
        channel=name_of(CHANNELS, o.channel),
        scope=name_of(SCOPES, o.scope),
        source=name_of(SOURCES, o.source),
        create_time=o.create_time.ToDatetime() if o.HasField("create_time") else None,
        recorded_by=o.recorded_by,
    )


class OptOutList(BaseModel):
    optouts: list[OptOut]


class Unsubscribed(BaseModel):
    channel: Annotated[str, enum_schema(CHANNELS)] | None = None
    already_unsubscribed: bool


class InboundMessage(BaseModel):
    """A message a member sent to the chain's SMS number, as the provider
    passes it on."""

    message_id: str = Field(min_length=1, max_length=200, description="The provider's id.")
    from_number: str = Field(min_length=1, max_length=40, alias="from", examples=["+8613800138000"])
    text: str = Field(max_length=1600, examples=["TD"])


class InboundTaken(BaseModel):
    opted_out: bool
