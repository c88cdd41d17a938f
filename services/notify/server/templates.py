"""TemplatesService: the trigger catalogue, templates (checked when saved,
versioned, previewed for a member) and the notification policy; and the
planner that turns notifications into messages."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Role, current_principal
from chassis.db import utcnow
from chassis.errors import (
    Aborted,
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
)
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, run_idempotent
from chassis.service import ServiceContext
from cornucopia.notify.v1 import notify_pb2, templates_pb2, templates_pb2_grpc
from services.notify import planner as planning
from services.notify.domain import templates, triggers
from services.notify.domain.messages import LOCALES, Category, Channel
from services.notify.domain.policy import NotifyPolicy, QuietHours, parse_time_of_day
from services.notify.links import Links
from services.notify.peers import shared_peers
from services.notify.store import policy as policy_store
from services.notify.store import templates as template_store

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)

CHANNELS: dict[int, Channel] = {
    notify_pb2.CHANNEL_DEV_LOG: Channel.DEV_LOG,
    notify_pb2.CHANNEL_SMS: Channel.SMS,
    notify_pb2.CHANNEL_EMAIL: Channel.EMAIL,
    notify_pb2.CHANNEL_PUSH: Channel.PUSH,
    notify_pb2.CHANNEL_CALL_TASK: Channel.CALL_TASK,
    notify_pb2.CHANNEL_POST: Channel.POST,
}
CHANNELS_PROTO: dict[Channel, notify_pb2.Channel.ValueType] = {
    Channel(channel): notify_pb2.Channel.ValueType(value) for value, channel in CHANNELS.items()
}
CATEGORIES_PROTO = {
    Category.TRANSACTIONAL: notify_pb2.MESSAGE_CATEGORY_TRANSACTIONAL,
    Category.MARKETING: notify_pb2.MESSAGE_CATEGORY_MARKETING,
}
RECIPIENTS_PROTO = {
    triggers.Recipient.MEMBER: templates_pb2.RECIPIENT_MEMBER,
    triggers.Recipient.STAFF: templates_pb2.RECIPIENT_STAFF,
}
KINDS_PROTO = {
    triggers.Kind.TEXT: templates_pb2.VARIABLE_KIND_TEXT,
    triggers.Kind.NUMBER: templates_pb2.VARIABLE_KIND_NUMBER,
    triggers.Kind.MONEY: templates_pb2.VARIABLE_KIND_MONEY,
    triggers.Kind.INSTANT: templates_pb2.VARIABLE_KIND_INSTANT,
    triggers.Kind.DATE: templates_pb2.VARIABLE_KIND_DATE,
}
MAX_KEYWORDS = 50
MAX_KEYWORD_CHARS = 20
MAX_WEEKLY_CAP = 100
MAX_DAYS_BEFORE = 365
DAYS_IN_WEEK = 7


def channel_of(value: int, field: str, violations: Violations) -> Channel | None:
    """A request's channel; UNSPECIFIED is None."""
    if value == notify_pb2.CHANNEL_UNSPECIFIED:
        return None
    channel = CHANNELS.get(value)
    if channel is None:
        violations.add(field, "unknown channel")
    return channel


def timestamp(at: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


# --- triggers -----------------------------------------------------------------


def _source(name: str, trigger: triggers.Trigger) -> str:
    if name in trigger.variables:
        return "trigger"
    if name in triggers.MARKETING_VARIABLES:
        return "marketing"
    return "staff" if trigger.recipient is triggers.Recipient.STAFF else "member"


def trigger_proto(trigger: triggers.Trigger) -> templates_pb2.Trigger:
    return templates_pb2.Trigger(
        name=trigger.name,
        category=CATEGORIES_PROTO[trigger.category],
        recipient=RECIPIENTS_PROTO[trigger.recipient],
        event_subject=trigger.subject,
        variables=[
            templates_pb2.Variable(name=name, kind=KINDS_PROTO[kind], source=_source(name, trigger))
            for name, kind in sorted(trigger.allowed_variables().items())
        ],
        channels=[CHANNELS_PROTO[c] for c in trigger.channels],
        description=trigger.description,
    )


# --- templates ----------------------------------------------------------------


def template_proto(stored: template_store.StoredTemplate) -> templates_pb2.Template:
    t = stored.template
    out = templates_pb2.Template(
        name=t.name,
        trigger=t.trigger,
        channel=CHANNELS_PROTO[t.channel] if t.channel else notify_pb2.CHANNEL_UNSPECIFIED,
        bodies=dict(t.bodies),
        subjects=dict(t.subjects),
        version=t.version,
        built_in=stored.built_in,
        created_by=stored.created_by,
        variables=sorted(t.variables()),
    )
    if stored.created_at is not None:
        out.create_time.CopyFrom(timestamp(stored.created_at))
    return out


def template_of(
    message: templates_pb2.Template, prefix: str = "template"
) -> templates.MessageTemplate:
    """The template a request gives, checked as a save checks it."""
    violations = Violations()
    channel = channel_of(message.channel, f"{prefix}.channel", violations)
    problems = templates.check_template(
        name=message.name.strip(),
        trigger=message.trigger.strip(),
        channel=channel,
        bodies=dict(message.bodies),
        subjects=dict(message.subjects),
        prefix=prefix,
    )
    for problem in problems:
        violations.add(problem.field, problem.description)
    violations.raise_if_any("the template cannot be saved")
    return templates.MessageTemplate(
        name=message.name.strip(),
        trigger=message.trigger.strip(),
        bodies={k: v for k, v in message.bodies.items() if v.strip()},
        subjects={k: v for k, v in message.subjects.items() if v.strip()},
        channel=channel,
    )


# --- the policy ---------------------------------------------------------------


def policy_proto(record: policy_store.PolicyRecord) -> templates_pb2.NotifyPolicy:
    p = record.policy
    out = templates_pb2.NotifyPolicy(
        quiet_hours=templates_pb2.QuietHours(
            start_time=p.quiet_hours.start.strftime("%H:%M"),
            end_time=p.quiet_hours.end.strftime("%H:%M"),
            channels=[CHANNELS_PROTO[c] for c in sorted(p.quiet_hours.channels)],
        ),
        marketing_weekly_cap=p.marketing_weekly_cap,
        approval_threshold=p.approval_threshold,
        points_expiring_days_before=p.points_expiring_days_before,
        greeting_time=p.greeting_time.strftime("%H:%M"),
        default_locale=p.default_locale,
        store_locales=dict(p.store_locales),
        optout_keywords=sorted(p.optout_keywords),
        digest_weekday=p.digest_weekday,
        digest_time=p.digest_time.strftime("%H:%M"),
        etag=record.etag,
        updated_by=record.updated_by,
    )
    if record.updated_at is not None:
        out.update_time.CopyFrom(timestamp(record.updated_at))
    return out


def _time_of_day(text: str, field: str, violations: Violations) -> dt.time | None:
    try:
        return parse_time_of_day(text.strip())
    except ValueError:
        violations.add(field, "a time of day HH:MM, 00:00 to 23:59")
        return None


def _locale(text: str, field: str, violations: Violations) -> str:
    if text not in LOCALES:
        violations.add(field, f"one of {', '.join(LOCALES)}")
    return text


def _bounded(value: int, field: str, least: int, most: int, violations: Violations) -> int:
    if not least <= value <= most:
        violations.add(field, f"{least} to {most}")
    return value


def policy_of(message: templates_pb2.NotifyPolicy, current: NotifyPolicy) -> NotifyPolicy:
    """The policy the request gives, every problem reported at once. Fields
    of the policy this API does not carry keep their current values."""
    v = Violations()
    quiet_channels: set[Channel] = set()
    for i, value in enumerate(message.quiet_hours.channels):
        channel = channel_of(value, f"policy.quiet_hours.channels[{i}]", v)
        if channel is not None:
            quiet_channels.add(channel)
    start = _time_of_day(message.quiet_hours.start_time, "policy.quiet_hours.start_time", v)
    end = _time_of_day(message.quiet_hours.end_time, "policy.quiet_hours.end_time", v)
    greeting = _time_of_day(message.greeting_time, "policy.greeting_time", v)
    digest = _time_of_day(message.digest_time, "policy.digest_time", v)
    cap = _bounded(
        message.marketing_weekly_cap, "policy.marketing_weekly_cap", 0, MAX_WEEKLY_CAP, v
    )
    threshold = _bounded(message.approval_threshold, "policy.approval_threshold", 1, 10**9, v)
    days = _bounded(
        message.points_expiring_days_before,
        "policy.points_expiring_days_before",
        1,
        MAX_DAYS_BEFORE,
        v,
    )
    weekday = _bounded(message.digest_weekday, "policy.digest_weekday", 0, DAYS_IN_WEEK - 1, v)
    default_locale = _locale(message.default_locale, "policy.default_locale", v)
    for store_id, locale in message.store_locales.items():
        _locale(locale, f"policy.store_locales[{store_id}]", v)
    keywords = {k.strip() for k in message.optout_keywords if k.strip()}
    if not keywords:
        v.add("policy.optout_keywords", "at least one keyword (e.g. STOP, TD, 退订, BAJA)")
    elif len(keywords) > MAX_KEYWORDS:
        v.add("policy.optout_keywords", f"at most {MAX_KEYWORDS}")
    for i, keyword in enumerate(message.optout_keywords):
        if len(keyword.strip()) > MAX_KEYWORD_CHARS:
            v.add(f"policy.optout_keywords[{i}]", f"at most {MAX_KEYWORD_CHARS} characters")
    v.raise_if_any("the policy has invalid fields")
    assert start is not None and end is not None and greeting is not None and digest is not None
    return dataclasses.replace(
        current,
        quiet_hours=QuietHours(start=start, end=end, channels=frozenset(quiet_channels)),
        marketing_weekly_cap=cap,
        approval_threshold=threshold,
        points_expiring_days_before=days,
        greeting_time=greeting,
        default_locale=default_locale,
        store_locales=dict(message.store_locales),
        optout_keywords=frozenset(keywords),
        digest_weekday=weekday,
        digest_time=digest,
    )


# --- the servicer -------------------------------------------------------------


class TemplatesServicer(templates_pb2_grpc.TemplatesServiceServicer):
    def __init__(self, ctx: ServiceContext, directory: planning.MembersDirectory) -> None:
        self.db = ctx.db
        self.directory = directory

    async def ListTriggers(
        self, request: templates_pb2.ListTriggersRequest, context: Context
    ) -> templates_pb2.ListTriggersResponse:
        current_principal().require_role(*READING_ROLES)
        return templates_pb2.ListTriggersResponse(
            triggers=[trigger_proto(t) for t in triggers.CATALOGUE.values()]
        )

    async def CreateTemplate(
        self, request: templates_pb2.CreateTemplateRequest, context: Context
    ) -> templates_pb2.Template:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        template = template_of(request.template)

        async def create(session: AsyncSession) -> templates_pb2.Template:
            if await template_store.get_version(session, template.name, template.channel):
                raise AlreadyExists(
                    "a template of that name and channel exists; update it instead",
                    reason="TEMPLATE_EXISTS",
                    metadata={"name": template.name},
                )
            return await self._save(session, template, principal.subject, principal.store_id)

        return await run_idempotent(
            self.db,
            method="notify.CreateTemplate",
            request_id=request.request_id,
            request=request,
            response_type=templates_pb2.Template,
            work=create,
        )

    async def UpdateTemplate(
        self, request: templates_pb2.UpdateTemplateRequest, context: Context
    ) -> templates_pb2.Template:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        template = template_of(request.template)

        async def update(session: AsyncSession) -> templates_pb2.Template:
            current = await template_store.get_version(session, template.name, template.channel)
            if current is None and template.channel is None:
                # A trigger's own wording is there before anyone saves it.
                current = template_store.built_in(template.name)
            if current is None:
                raise NotFound(
                    "no such template; create it first",
                    reason="TEMPLATE_NOT_FOUND",
                    metadata={"name": template.name},
                )
            if current.template.trigger != template.trigger:
                raise InvalidArgument(
                    [
                        FieldViolation(
                            "template.trigger",
                            f"a template keeps its trigger ({current.template.trigger})",
                        )
                    ]
                )
            return await self._save(session, template, principal.subject, principal.store_id)

        return await run_idempotent(
            self.db,
            method="notify.UpdateTemplate",
            request_id=request.request_id,
            request=request,
            response_type=templates_pb2.Template,
            work=update,
        )

    @staticmethod
    async def _save(
        session: AsyncSession, template: templates.MessageTemplate, principal: str, store_id: str
    ) -> templates_pb2.Template:
        saved = await template_store.save_version(
            session,
            template,
            principal=principal,
            store_id=store_id,
            now=utcnow(),
            template_id=uuid.uuid4().hex,
        )
        return template_proto(saved)

    async def GetTemplate(
        self, request: templates_pb2.GetTemplateRequest, context: Context
    ) -> templates_pb2.Template:
        current_principal().require_role(*READING_ROLES)
        violations = Violations()
        if not request.name.strip():
            violations.add("name", "required")
        if request.version < 0:
            violations.add("version", "0 (the one in use) or a version number")
        channel = channel_of(request.channel, "channel", violations)
        violations.raise_if_any()
        async with self.db.sessions() as session:
            if request.version:
                found = await template_store.get_version(
                    session, request.name.strip(), channel, request.version
                )
            else:
                found = await template_store.in_use(session, request.name.strip(), channel)
        if found is None:
            raise NotFound(
                "no such template", reason="TEMPLATE_NOT_FOUND", metadata={"name": request.name}
            )
        return template_proto(found)

    async def ListTemplates(
        self, request: templates_pb2.ListTemplatesRequest, context: Context
    ) -> templates_pb2.ListTemplatesResponse:
        current_principal().require_role(*READING_ROLES)
        async with self.db.sessions() as session:
            found = await template_store.list_in_use(session, request.trigger.strip() or None)
        return templates_pb2.ListTemplatesResponse(templates=[template_proto(s) for s in found])

    async def PreviewTemplate(
        self, request: templates_pb2.PreviewTemplateRequest, context: Context
    ) -> templates_pb2.PreviewTemplateResponse:
        current_principal().require_role(*READING_ROLES)
        violations = Violations()
        channel = channel_of(request.channel, "channel", violations)
        if request.locale and not templates.normalise_locale(request.locale):
            violations.add("locale", f"one of {', '.join(LOCALES)}")
        violations.raise_if_any()
        template = await self._template_to_preview(request, channel)
        trigger = triggers.trigger(template.trigger)
        allowed = trigger.allowed_variables()
        for name in request.variables:
            if name not in allowed:
                violations.add(f"variables[{name}]", f"not a variable of {trigger.name}")
        violations.raise_if_any()
        async with self.db.sessions() as session:
            policy = await policy_store.load_policy(session)
        values = triggers.samples(trigger)
        addressee = planning.Addressee()
        if request.member_id.strip():
            cache = planning.PassCache(self.directory)
            addressee = await planning.member_addressee(cache, request.member_id.strip())
            if addressee.suppressed == "member_not_found":
                raise NotFound(
                    "no such member",
                    reason="MEMBER_NOT_FOUND",
                    metadata={"member_id": request.member_id},
                )
            values.update({k: v for k, v in addressee.values.items() if v})
        values.update(request.variables)
        locale = templates.choose_locale(
            request.locale or addressee.language,
            policy.store_locale(addressee.store_id),
            policy.default_locale,
        )
        if not values.get("given_name"):
            values["given_name"] = templates.NAMELESS[locale]
        rendered = template.render(
            locale,
            templates.formatted(allowed, values, locale, addressee.time_zone),
            fallback=policy.default_locale,
        )
        return templates_pb2.PreviewTemplateResponse(
            locale=rendered.locale,
            subject=rendered.subject,
            body=rendered.body,
            template=template.name,
            version=template.version,
        )

    async def _template_to_preview(
        self, request: templates_pb2.PreviewTemplateRequest, channel: Channel | None
    ) -> templates.MessageTemplate:
        if request.WhichOneof("source") == "template":
            return template_of(request.template)
        name = request.name.strip()
        if not name:
            raise InvalidArgument([FieldViolation("name", "a template's name, or a template")])
        async with self.db.sessions() as session:
            found = await template_store.in_use(session, name, channel)
        if found is None:
            raise NotFound("no such template", reason="TEMPLATE_NOT_FOUND", metadata={"name": name})
        return found.template

    async def GetNotifyPolicy(
        self, request: templates_pb2.GetNotifyPolicyRequest, context: Context
    ) -> templates_pb2.NotifyPolicy:
        current_principal().require_role(*READING_ROLES)
        async with self.db.sessions() as session:
            return policy_proto(await policy_store.get_policy(session))

    async def UpdateNotifyPolicy(
        self, request: templates_pb2.UpdateNotifyPolicyRequest, context: Context
    ) -> templates_pb2.NotifyPolicy:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        if not request.etag:
            raise InvalidArgument([FieldViolation("etag", "required: the etag last read")])
        async with self.db.sessions() as session:
            current = await policy_store.get_policy(session)
        policy = policy_of(request.policy, current.policy)

        async def update(session: AsyncSession) -> templates_pb2.NotifyPolicy:
            current = await policy_store.get_policy(session, for_update=True)
            if current.etag != request.etag:
                raise Aborted(
                    "the policy changed since you read it; read it again",
                    reason="ETAG_MISMATCH",
                    metadata={"etag": current.etag},
                )
            await policy_store.save_policy(
                session,
                policy,
                principal=principal.subject,
                store_id=principal.store_id,
                now=utcnow(),
            )
            return policy_proto(await policy_store.get_policy(session))

        return await run_idempotent(
            self.db,
            method="notify.UpdateNotifyPolicy",
            request_id=request.request_id,
            request=request,
            response_type=templates_pb2.NotifyPolicy,
            work=update,
        )


# --- wiring -------------------------------------------------------------------


def links(ctx: ServiceContext) -> Links:
    return ctx.shared("notify.links", lambda: Links.from_env(ctx.settings))


def planner(ctx: ServiceContext) -> planning.Planner:
    return ctx.shared(
        "notify.planner",
        lambda: planning.Planner(ctx.db, shared_peers(ctx).members, links(ctx)),
    )


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=templates_pb2.DESCRIPTOR.services_by_name["TemplatesService"].full_name,
            servicer=TemplatesServicer(ctx, shared_peers(ctx).members),
            add_to_server=templates_pb2_grpc.add_TemplatesServiceServicer_to_server,
        )
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [planner(ctx).run]
