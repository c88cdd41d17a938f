"""What notify says and whom it may say it to, over HTTP: the triggers,
templates (saved, versioned, previewed) and the notification policy for
HQ; opt-outs for store staff; the public unsubscribe link; and the SMS
provider's inbound messages (replies such as "TD" or "BAJA").

Staff routes forward the caller's token. The unsubscribe link needs no
login: its signed token is the authority, and the gateway passes it on
with a service token of its own. The provider proves itself with the
shared secret its delivery receipts carry (``notify_client.provider_secret``)."""

from __future__ import annotations

import html
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse

from cornucopia.notify.v1 import preferences_pb2, templates_pb2
from services.gateway.deps import READ_PROBLEMS, Key, Token, change_problems, problem_responses
from services.gateway.notify_client import (
    call_notify,
    gateway_token,
    notify,
    notify_lifespan,
    provider_secret,
)
from services.gateway.notify_templates_schemas import (
    CHANNELS,
    SCOPES,
    ChannelName,
    InboundMessage,
    InboundTaken,
    NewOptOut,
    NewTemplate,
    NotifyPolicy,
    OptOut,
    OptOutList,
    Preview,
    PreviewRequest,
    StoredPolicy,
    Template,
    TemplateList,
    TemplateVersion,
    TriggerList,
    Unsubscribed,
    name_of,
    optout_from_proto,
    policy_from_proto,
    template_from_proto,
    trigger_from_proto,
)
from services.gateway.problems import FieldError, ProblemError

router = APIRouter(lifespan=notify_lifespan)

TemplateName = Annotated[
    str,
    Path(min_length=2, max_length=64, pattern=r"^[a-z][a-z0-9_]+$", examples=["welcome"]),
]
MemberId = Annotated[str, Path(min_length=1, max_length=64, description="e.g. M7Q2K9X4TD")]
LinkToken = Annotated[str, Path(min_length=10, max_length=300)]


# --- triggers and templates (HQ writes; staff read) -----------------------------------


@router.get(
    "/v1/notify/triggers",
    tags=["notify"],
    summary="The trigger catalogue",
    description="Every reason a message is sent: category, recipient, the variables its "
    "templates may use, and its channels in order of preference.",
    responses=READ_PROBLEMS,
    operation_id="listNotifyTriggers",
)
async def list_triggers(request: Request, token: Token) -> TriggerList:
    found = await call_notify(
        notify(request).templates.ListTriggers, templates_pb2.ListTriggersRequest(), token
    )
    return TriggerList(triggers=[trigger_from_proto(t) for t in found.triggers])


@router.get(
    "/v1/notify/templates",
    tags=["notify"],
    summary="The templates in use",
    description="The newest version of every saved template and the built-in wording of the "
    "triggers no saved template replaces.",
    responses=READ_PROBLEMS,
    operation_id="listNotifyTemplates",
)
async def list_templates(
    request: Request, token: Token, trigger: Annotated[str, Query(max_length=64)] = ""
) -> TemplateList:
    found = await call_notify(
        notify(request).templates.ListTemplates,
        templates_pb2.ListTemplatesRequest(trigger=trigger),
        token,
    )
    return TemplateList(templates=[template_from_proto(t) for t in found.templates])


@router.get(
    "/v1/notify/templates/{name}",
    tags=["notify"],
    summary="One template",
    description="The version in use (the channel's own, else the one for every channel, else "
    "the built-in wording), or the version asked for.",
    responses=READ_PROBLEMS,
    operation_id="getNotifyTemplate",
)
async def get_template(
    name: TemplateName,
    request: Request,
    token: Token,
    channel: Annotated[ChannelName | None, Query()] = None,
    version: Annotated[int, Query(ge=0)] = 0,
) -> Template:
    found = await call_notify(
        notify(request).templates.GetTemplate,
        templates_pb2.GetTemplateRequest(
            name=name,
            channel=CHANNELS[channel] if channel else 0,  # type: ignore[arg-type]
            version=version,
        ),
        token,
    )
    return template_from_proto(found)


_TEMPLATE_REFUSALS = (
    "A variable the trigger does not give, a stray brace or a missing language: "
    "`errors` names the body (e.g. `template.bodies[en]`) and the variable."
)


@router.post(
    "/v1/notify/templates",
    tags=["notify"],
    summary="Save a new template (HQ)",
    description="Its first version. Named after a trigger, it replaces that trigger's built-in "
    "wording; any other name is a template for direct sends. Needs an `Idempotency-Key`.",
    status_code=201,
    responses={
        **change_problems(_TEMPLATE_REFUSALS),
        **problem_responses(409, overrides={409: "A template of that name and channel exists."}),
    },
    operation_id="createNotifyTemplate",
)
async def create_template(body: NewTemplate, request: Request, token: Token, key: Key) -> Template:
    saved = await call_notify(
        notify(request).templates.CreateTemplate,
        templates_pb2.CreateTemplateRequest(request_id=key, template=body.to_proto()),
        token,
    )
    return template_from_proto(saved)


@router.put(
    "/v1/notify/templates/{name}",
    tags=["notify"],
    summary="Save a new version of a template (HQ)",
    description="The newest version is the one used. A trigger's own template may be saved "
    "this way before any was created. Needs an `Idempotency-Key`.",
    responses=change_problems(_TEMPLATE_REFUSALS),
    operation_id="updateNotifyTemplate",
)
async def update_template(
    name: TemplateName, body: TemplateVersion, request: Request, token: Token, key: Key
) -> Template:
    saved = await call_notify(
        notify(request).templates.UpdateTemplate,
        templates_pb2.UpdateTemplateRequest(request_id=key, template=body.to_proto(name)),
        token,
    )
    return template_from_proto(saved)


@router.post(
    "/v1/notify/templates/preview",
    tags=["notify"],
    summary="Preview a template for a member",
    description="Renders a saved, built-in or unsaved template as the member would read it: "
    "their language (or `locale`), their store's time zone, their name. Nothing is sent.",
    responses=problem_responses(400, 401, 403, 404, 500, 503, 504),
    operation_id="previewNotifyTemplate",
)
async def preview_template(body: PreviewRequest, request: Request, token: Token) -> Preview:
    if (body.template is None) == (body.name is None):
        raise ProblemError(
            400,
            "INVALID_FIELDS",
            "the request has invalid fields",
            errors=[FieldError(field="template", description="give either template or name")],
        )
    found = await call_notify(notify(request).templates.PreviewTemplate, body.to_proto(), token)
    return Preview(
        locale=found.locale,
        subject=found.subject,
        body=found.body,
        template=found.template,
        version=found.version,
    )


# --- the policy -------------------------------------------------------------------------


@router.get(
    "/v1/notify/policy",
    tags=["notify"],
    summary="The notification policy",
    description="Quiet hours, the weekly marketing cap, the approval threshold of direct "
    "sends, greeting times, languages and opt-out keywords. Its `ETag` goes back as "
    "`If-Match` to change it.",
    responses=READ_PROBLEMS,
    operation_id="getNotifyPolicy",
)
async def get_policy(request: Request, response: Response, token: Token) -> StoredPolicy:
    found = await call_notify(
        notify(request).templates.GetNotifyPolicy, templates_pb2.GetNotifyPolicyRequest(), token
    )
    response.headers["ETag"] = found.etag
    return policy_from_proto(found)


@router.put(
    "/v1/notify/policy",
    tags=["notify"],
    summary="Replace the notification policy (HQ)",
    description="Send the `ETag` you read as `If-Match` (a policy changed since is a 412) and "
    "an `Idempotency-Key`.",
    responses=problem_responses(400, 401, 403, 412, 422, 428, 429, 500, 503, 504),
    operation_id="updateNotifyPolicy",
)
async def update_policy(
    *,
    body: NotifyPolicy,
    request: Request,
    response: Response,
    token: Token,
    key: Key,
    if_match: Annotated[str | None, Header(description="The policy's ETag as read.")] = None,
) -> StoredPolicy:
    if if_match is None or not if_match.strip():
        raise ProblemError(
            428,
            "PRECONDITION_REQUIRED",
            "send the policy's ETag as If-Match so that no change is lost",
            errors=[FieldError(field="If-Match", description="required")],
        )
    call = templates_pb2.UpdateNotifyPolicyRequest(
        request_id=key, policy=body.to_proto(), etag=if_match.strip().strip('"')
    )
    try:
        saved = await call_notify(notify(request).templates.UpdateNotifyPolicy, call, token)
    except ProblemError as problem:
        if problem.reason == "ETAG_MISMATCH":
            raise ProblemError(
                412, "ETAG_MISMATCH", "the policy changed since you read it; read it again"
            ) from None
        raise
    response.headers["ETag"] = saved.etag
    return policy_from_proto(saved)


# --- opt-outs (staff) ---------------------------------------------------------------------


@router.post(
    "/v1/members/{member_id}/opt-outs",
    tags=["notify"],
    summary="Record a member's opt-out",
    description="The member asked not to be contacted on a channel: for marketing (default) "
    "or at all. Their marketing consent on the member file is withdrawn too. Any store may. "
    "Needs an `Idempotency-Key`.",
    status_code=201,
    responses=change_problems("The member file cannot change (erased or merged)."),
    operation_id="recordOptOut",
)
async def record_optout(
    member_id: MemberId, body: NewOptOut, request: Request, token: Token, key: Key
) -> OptOut:
    saved = await call_notify(
        notify(request).preferences.RecordOptOut,
        preferences_pb2.RecordOptOutRequest(
            request_id=key,
            member_id=member_id,
            channel=CHANNELS[body.channel],  # type: ignore[arg-type]
            scope=SCOPES[body.scope],  # type: ignore[arg-type]
        ),
        token,
    )
    return optout_from_proto(saved)


@router.get(
    "/v1/members/{member_id}/opt-outs",
    tags=["notify"],
    summary="A member's opt-outs",
    responses=READ_PROBLEMS,
    operation_id="listOptOuts",
)
async def list_optouts(member_id: MemberId, request: Request, token: Token) -> OptOutList:
    found = await call_notify(
        notify(request).preferences.ListOptOuts,
        preferences_pb2.ListOptOutsRequest(member_id=member_id),
        token,
    )
    return OptOutList(optouts=[optout_from_proto(o) for o in found.optouts])


# --- the public unsubscribe link ------------------------------------------------------------

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:3em auto;padding:0 1em">
{content}
</body></html>"""


def _page(title: str, content: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=title, content=content), status_code=status)


@router.get(
    "/v1/unsubscribe/{token}",
    tags=["notify"],
    summary="Unsubscribe page (public)",
    description="What the link in a marketing message opens: a page with one button. The "
    "click (a POST) unsubscribes; opening the link alone changes nothing, so that mail "
    "scanners that follow links unsubscribe nobody.",
    response_class=HTMLResponse,
    operation_id="unsubscribePage",
)
async def unsubscribe_page(token: LinkToken) -> HTMLResponse:
    action = html.escape(f"/v1/unsubscribe/{token}", quote=True)
    return _page(
        "退订 · Unsubscribe · Darse de baja",
        f'<form method="post" action="{action}">'
        "<p>不再接收我们的营销信息？<br>No more offers from us?<br>"
        "¿No desea recibir más ofertas?</p>"
        '<button type="submit">退订 · Unsubscribe · Darse de baja</button></form>',
    )


@router.post(
    "/v1/unsubscribe/{token}",
    tags=["notify"],
    summary="Unsubscribe (public)",
    description="No login: the link's signed token names the member and the channel. Their "
    "marketing consent on that channel is withdrawn; doing it again changes nothing. "
    "Answers JSON, or a short page to a browser. Also the one-click unsubscribe of "
    "RFC 8058.",
    responses=problem_responses(400, 500, 503, 504),
    operation_id="unsubscribe",
)
async def unsubscribe(
    token: LinkToken, request: Request, accept: Annotated[str, Header()] = ""
) -> Any:
    try:
        done = await call_notify(
            notify(request).preferences.Unsubscribe,
            preferences_pb2.UnsubscribeRequest(token=token),
            gateway_token(request),
        )
    except ProblemError as problem:
        if "text/html" in accept and problem.reason == "BAD_UNSUBSCRIBE_LINK":
            return _page("Link not valid", "<p>此链接无效 · This link is not valid.</p>", 400)
        raise
    if "text/html" in accept:
        return _page(
            "退订成功 · Unsubscribed · Baja confirmada",
            "<p>您已成功退订。<br>You have been unsubscribed.<br>Se ha dado de baja.</p>",
        )
    return Unsubscribed(
        channel=name_of(CHANNELS, done.channel), already_unsubscribed=done.already_unsubscribed
    )


# --- the SMS provider's inbound messages ------------------------------------------------------

PROVIDER_SECRET = provider_secret(
    "INVALID_PROVIDER_SECRET", "the provider secret is missing or wrong"
)


@router.post(
    "/v1/notify/providers/sms/inbound",
    tags=["notify"],
    summary="Inbound SMS (provider callback)",
    description="Where the SMS provider posts the messages members send to the chain's "
    "number. A reply that is one of the policy's opt-out keywords (STOP, TD, 退订, BAJA...) "
    "from a member's mobile unsubscribes them from marketing SMS. Authenticated by the shared "
    "secret in `X-Receipt-Secret`; idempotent by the provider's message id.",
    responses=problem_responses(400, 401, 500, 503, 504),
    operation_id="inboundSms",
    dependencies=[Depends(PROVIDER_SECRET)],
)
async def inbound_sms(body: InboundMessage, request: Request) -> InboundTaken:
    taken = await call_notify(
        notify(request).preferences.RecordInboundMessage,
        preferences_pb2.RecordInboundMessageRequest(
            request_id=f"sms:{body.message_id}", from_number=body.from_number, text=body.text
        ),
        gateway_token(request),
    )
    return InboundTaken(opted_out=taken.opted_out)
