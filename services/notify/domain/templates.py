"""Templates: bodies in zh-CN, en and es (and an e-mail subject) per
trigger, checked when saved, rendered for one reader. Pure: no I/O.

A template's text uses ``{name}`` for a variable and ``{{``/``}}`` for a
literal brace; nothing else of Python's format language (no attribute or
index access, no conversions, no format specs: a template is written by HQ
staff and must not be able to reach into the values or blow a message up
to megabytes)."""

from __future__ import annotations

import datetime as dt
import re
import string
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from chassis.errors import FieldViolation
from services.notify.domain.messages import DEFAULT_LOCALE, LOCALES, WELCOME, Channel
from services.notify.domain.triggers import (
    ANNIVERSARY,
    BIRTHDAY,
    CARD_FROZEN,
    CARD_REPORTED_LOST,
    CATALOGUE,
    COUPON_ISSUED,
    EVENT_INVITATION,
    FOLLOWUP_TASK_CREATED,
    MARKETING,
    POINTS_EXPIRING,
    STORED_VALUE_DEBITED,
    STORED_VALUE_RECHARGED,
    TIER_CHANGED,
    WEEKLY_CALL_DIGEST,
    Kind,
    Trigger,
)
from services.notify.domain.triggers import WELCOME as WELCOME_TRIGGER

NAME = re.compile(r"^[a-z][a-z0-9_]{1,63}$")
_VARIABLE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_BODY = 2000
MAX_SUBJECT = 200


class TemplateSyntaxError(ValueError):
    """The text is not a template: a stray brace, or more than a name
    between braces."""


def parse(text: str) -> list[str | tuple[str]]:
    """The text as literal pieces (str) and variables (1-tuples)."""
    pieces: list[str | tuple[str]] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateSyntaxError(f"malformed braces: {exc}") from None
    for literal, name, spec, conversion in parsed:
        if literal:
            pieces.append(literal)
        if name is None:
            continue
        if conversion is not None or spec:
            raise TemplateSyntaxError(f"{{{name}}}: only {{name}} is allowed between braces")
        if not _VARIABLE.match(name):
            raise TemplateSyntaxError(
                f"{{{name}}} is not a variable name (lower-case letters, digits and '_')"
            )
        pieces.append((name,))
    return pieces


def variables_of(text: str) -> set[str]:
    return {piece[0] for piece in parse(text) if isinstance(piece, tuple)}


def fill(text: str, values: Mapping[str, str]) -> str:
    """The text with every variable replaced; KeyError names a missing one."""
    out: list[str] = []
    for piece in parse(text):
        if isinstance(piece, tuple):
            out.append(values[piece[0]])
        else:
            out.append(piece)
    return "".join(out)


@dataclass(frozen=True)
class Rendered:
    locale: str
    body: str
    subject: str


@dataclass(frozen=True)
class MessageTemplate:
    """One version of a template. ``channel`` None: for every channel of
    its trigger. ``version`` 0: the built-in default."""

    name: str
    trigger: str
    bodies: Mapping[str, str]
    subjects: Mapping[str, str] = field(default_factory=dict)
    channel: Channel | None = None
    version: int = 0
    active: bool = True

    def variables(self) -> set[str]:
        used: set[str] = set()
        for text in (*self.bodies.values(), *self.subjects.values()):
            used |= variables_of(text)
        return used

    def locale_of(self, locale: str, fallback: str = DEFAULT_LOCALE) -> str:
        """The locale it renders in: the one asked for when it has a body
        for it, else the fallback, else the chain's default."""
        for candidate in (locale, fallback, DEFAULT_LOCALE):
            if candidate in self.bodies:
                return candidate
        return next(iter(self.bodies))

    def render(
        self, locale: str, values: Mapping[str, str], fallback: str = DEFAULT_LOCALE
    ) -> Rendered:
        """The body and subject in ``locale``; a missing value is a KeyError,
        never a message with a hole in it."""
        chosen = self.locale_of(locale, fallback)
        missing = self.variables() - set(values)
        if missing:
            raise KeyError(f"template {self.name} needs {sorted(missing)}")
        return Rendered(
            locale=chosen,
            body=fill(self.bodies[chosen], values),
            subject=fill(self.subjects.get(chosen, ""), values),
        )


def _check_identity(
    name: str, trigger: str, channel: Channel | None, prefix: str
) -> tuple[list[FieldViolation], Trigger | None]:
    problems: list[FieldViolation] = []
    if not NAME.match(name):
        problems.append(
            FieldViolation(
                f"{prefix}.name", "2 to 64 lower-case letters, digits and '_', starting a letter"
            )
        )
    found: Trigger | None = CATALOGUE.get(trigger)
    if found is None:
        problems.append(
            FieldViolation(f"{prefix}.trigger", f"one of: {', '.join(sorted(CATALOGUE))}")
        )
    elif name in CATALOGUE and name != trigger:
        problems.append(
            FieldViolation(f"{prefix}.trigger", f"the template {name} belongs to trigger {name}")
        )
    if channel is Channel.DEV_LOG:
        problems.append(FieldViolation(f"{prefix}.channel", "not a channel members are sent on"))
    elif found is not None and channel is not None and channel not in found.channels:
        problems.append(
            FieldViolation(
                f"{prefix}.channel",
                f"{found.name} is sent on {', '.join(c.value for c in found.channels)}",
            )
        )
    return problems, found


def _check_text(
    where: str, locale: str, text: str, *, limit: int, allowed: set[str] | None, trigger: str
) -> list[FieldViolation]:
    if locale not in LOCALES:
        return [FieldViolation(where, f"locale one of {', '.join(LOCALES)}")]
    problems: list[FieldViolation] = []
    if len(text) > limit:
        problems.append(FieldViolation(where, f"at most {limit} characters"))
    if limit == MAX_SUBJECT and ("\n" in text or "\r" in text):
        problems.append(FieldViolation(where, "one line"))
    try:
        used = variables_of(text)
    except TemplateSyntaxError as exc:
        return [*problems, FieldViolation(where, str(exc))]
    for unknown in sorted(used - allowed) if allowed is not None else ():
        problems.append(
            FieldViolation(
                where,
                f"uses {{{unknown}}} in {locale}, which trigger {trigger} does not "
                f"give; it gives: {', '.join(sorted(allowed or ())) or 'nothing'}",
            )
        )
    return problems


def check_template(
    *,
    name: str,
    trigger: str,
    channel: Channel | None,
    bodies: Mapping[str, str],
    subjects: Mapping[str, str],
    prefix: str = "template",
) -> list[FieldViolation]:
    """Every reason the template cannot be saved, each naming its field
    (``template.bodies[en]`` and the like)."""
    problems, found = _check_identity(name, trigger, channel, prefix)
    missing = [locale for locale in LOCALES if not bodies.get(locale, "").strip()]
    if missing:
        problems.append(
            FieldViolation(f"{prefix}.bodies", f"a body is needed in {', '.join(missing)}")
        )
    allowed = set(found.allowed_variables()) if found is not None else None
    for kind, texts, limit in (("bodies", bodies, MAX_BODY), ("subjects", subjects, MAX_SUBJECT)):
        for locale, text in texts.items():
            problems += _check_text(
                f"{prefix}.{kind}[{locale}]",
                locale,
                text,
                limit=limit,
                allowed=allowed,
                trigger=trigger,
            )
    return problems


# --- the reader's language ------------------------------------------------------

_LANGUAGES = {"zh": "zh-CN", "en": "en", "es": "es"}


def normalise_locale(text: str) -> str:
    """A member's BCP 47 tag as one of LOCALES ("zh-cn", "zh-Hans", "en-GB",
    "es-MX" and the like), or "" when it is none of them."""
    tag = text.strip().replace("_", "-")
    for locale in LOCALES:
        if tag.lower() == locale.lower():
            return locale
    return _LANGUAGES.get(tag.split("-", 1)[0].lower(), "")


def choose_locale(preferred: str, store_default: str, chain_default: str = DEFAULT_LOCALE) -> str:
    """The member's language when it is one of ours, else the store's
    default, else the chain's."""
    for candidate in (preferred, store_default, chain_default):
        chosen = normalise_locale(candidate)
        if chosen:
            return chosen
    return DEFAULT_LOCALE


# --- values as the reader reads them --------------------------------------------------

_SYMBOLS = {"CNY": "¥", "USD": "$", "EUR": "€", "GBP": "£", "HKD": "HK$", "JPY": "¥"}
_NO_MINOR_UNITS = frozenset({"JPY", "KRW", "CLP"})
_MONTHS_EN = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_MONTHS_ES = ["ene", "feb", "mar", "abr", "may", "jun", "jul", "ago", "sep", "oct", "nov", "dic"]
# What a member without a given name is called.
NAMELESS = MappingProxyType({"zh-CN": "会员", "en": "valued member", "es": "estimado socio"})


def _grouped(number: int, locale: str) -> str:
    text = f"{number:,}"
    return text.replace(",", ".") if locale == "es" else text


def format_money(raw: str, locale: str) -> str:
    currency, _, minor = raw.partition(":")
    units = int(minor)
    sign = "-" if units < 0 else ""
    units = abs(units)
    if currency in _NO_MINOR_UNITS:
        amount = _grouped(units, locale)
    else:
        whole, cents = divmod(units, 100)
        mark = "," if locale == "es" else "."
        amount = f"{_grouped(whole, locale)}{mark}{cents:02d}"
    symbol = _SYMBOLS.get(currency, currency + " ")
    if locale == "es":
        return f"{sign}{amount} {symbol.strip()}"
    return f"{sign}{symbol}{amount}"


def _local(raw: str, time_zone: str) -> dt.datetime | dt.date:
    if len(raw) == 10:
        return dt.date.fromisoformat(raw)
    instant = dt.datetime.fromisoformat(raw)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=dt.UTC)
    return instant.astimezone(zoneinfo.ZoneInfo(time_zone or "UTC"))


def format_date(day: dt.date, locale: str) -> str:
    if locale == "zh-CN":
        return f"{day.year}年{day.month}月{day.day}日"
    if locale == "es":
        return f"{day.day} {_MONTHS_ES[day.month - 1]} {day.year}"
    return f"{day.day} {_MONTHS_EN[day.month - 1]} {day.year}"


def _format_time(kind: Kind, raw: str, locale: str, time_zone: str) -> str:
    local = _local(raw, time_zone)
    if not isinstance(local, dt.datetime):
        return format_date(local, locale)
    if kind is Kind.DATE:
        return format_date(local.date(), locale)
    joiner = " " if locale == "zh-CN" else ", "
    return f"{format_date(local.date(), locale)}{joiner}{local.hour:02d}:{local.minute:02d}"


def format_value(kind: Kind, raw: str, locale: str, time_zone: str) -> str:
    """A variable's value as the reader reads it; a value that does not
    parse as its kind is shown as it is (a message with an odd number beats
    no message)."""
    try:
        if raw and kind is Kind.MONEY:
            return format_money(raw, locale)
        if raw and kind is Kind.NUMBER:
            return _grouped(int(raw), locale)
        if raw and kind in (Kind.INSTANT, Kind.DATE):
            return _format_time(kind, raw, locale, time_zone)
    except (ValueError, KeyError, zoneinfo.ZoneInfoNotFoundError):
        pass
    return raw


def formatted(
    kinds: Mapping[str, Kind], values: Mapping[str, str], locale: str, time_zone: str
) -> dict[str, str]:
    return {
        name: format_value(kinds.get(name, Kind.TEXT), value, locale, time_zone)
        for name, value in values.items()
    }


# --- the defaults ---------------------------------------------------------------------

_UNSUBSCRIBE = {
    "zh-CN": "退订回复TD或点击 {unsubscribe_url}",
    "en": "Unsubscribe: {unsubscribe_url}",
    "es": "Darse de baja: {unsubscribe_url}",
}


def _with_unsubscribe(bodies: Mapping[str, str]) -> dict[str, str]:
    joiner = {"zh-CN": "", "en": " ", "es": " "}
    return {
        locale: f"{text}{joiner[locale]}{_UNSUBSCRIBE[locale]}" for locale, text in bodies.items()
    }


def _default(
    trigger: str,
    bodies: Mapping[str, str],
    subjects: Sequence[str],
) -> MessageTemplate:
    return MessageTemplate(
        name=trigger,
        trigger=trigger,
        bodies=MappingProxyType(dict(bodies)),
        subjects=MappingProxyType(dict(zip(LOCALES, subjects, strict=True))),
    )


# Written as a shop writes to its members: short enough for one or two SMS,
# the reason for the message first, what to do next last. Marketing ones end
# with the way out.
DEFAULTS: Mapping[str, MessageTemplate] = MappingProxyType(
    {
        t.name: t
        for t in (
            _default(
                WELCOME_TRIGGER,
                WELCOME.bodies,
                ("欢迎加入会员", "Welcome to the club", "Bienvenido al club"),
            ),
            _default(
                STORED_VALUE_RECHARGED,
                {
                    "zh-CN": "您的会员卡已成功充值 {amount}，当前余额 {balance}。"
                    "如非本人操作，请及时联系门店。",
                    "en": "Your member card has been topped up with {amount}. Your balance "
                    "is now {balance}. If this wasn't you, please contact your store.",
                    "es": "Se han recargado {amount} en su tarjeta de socio. Su saldo actual "
                    "es de {balance}. Si no ha sido usted, contacte con su tienda.",
                },
                ("会员卡充值成功", "Card top-up confirmed", "Recarga confirmada"),
            ),
            _default(
                STORED_VALUE_DEBITED,
                {
                    "zh-CN": "您的会员卡消费 {amount}，当前余额 {balance}。"
                    "如非本人操作，请立即联系门店冻结卡片。",
                    "en": "{amount} was paid with your member card. Your balance is now "
                    "{balance}. If this wasn't you, contact your store straight away to "
                    "freeze the card.",
                    "es": "Se ha pagado {amount} con su tarjeta de socio. Su saldo actual es "
                    "de {balance}. Si no ha sido usted, contacte de inmediato con su tienda "
                    "para bloquear la tarjeta.",
                },
                ("会员卡消费提醒", "Card payment alert", "Aviso de pago con su tarjeta"),
            ),
            _default(
                POINTS_EXPIRING,
                {
                    "zh-CN": "您有 {points} 积分将于 {expire_date} 到期，"
                    "到期前可到店兑换礼品或抵扣消费。",
                    "en": "{points} of your points expire on {expire_date}. Use them in store "
                    "before then for gifts or money off your shopping.",
                    "es": "{points} de sus puntos caducan el {expire_date}. Úselos antes en "
                    "tienda para conseguir regalos o descuentos en sus compras.",
                },
                (
                    "积分即将到期",
                    "Your points are about to expire",
                    "Sus puntos están a punto de caducar",
                ),
            ),
            _default(
                COUPON_ISSUED,
                _with_unsubscribe(
                    {
                        "zh-CN": "一张优惠券已放入您的会员账户，有效期至 {expire_date}，"
                        "结账时出示会员码即可使用。",
                        "en": "A coupon is waiting in your member account, valid until "
                        "{expire_date}. Show your member code at the till to use it.",
                        "es": "Tiene un cupón nuevo en su cuenta de socio, válido hasta el "
                        "{expire_date}. Muestre su código de socio en caja para usarlo.",
                    }
                ),
                ("您有一张新优惠券", "A new coupon for you", "Un cupón nuevo para usted"),
            ),
            _default(
                TIER_CHANGED,
                {
                    "zh-CN": "您的会员等级已由 {from_tier} 调整为 {to_tier}，"
                    "新等级权益即日起生效。",
                    "en": "Your membership tier has changed from {from_tier} to {to_tier}. "
                    "Your new benefits apply from today.",
                    "es": "Su nivel de socio ha cambiado de {from_tier} a {to_tier}. Sus "
                    "nuevas ventajas se aplican desde hoy.",
                },
                ("会员等级变更通知", "Your membership tier", "Su nivel de socio"),
            ),
            _default(
                EVENT_INVITATION,
                _with_unsubscribe(
                    {
                        "zh-CN": "诚邀您参加会员专属活动，时间：{start_time}。"
                        "请于 {rsvp_deadline} 前回复报名，名额有限。",
                        "en": "You're invited to a members' event on {start_time}. Places are "
                        "limited: please reply by {rsvp_deadline}.",
                        "es": "Le invitamos a un evento exclusivo para socios el {start_time}. "
                        "Las plazas son limitadas: confirme antes del {rsvp_deadline}.",
                    }
                ),
                ("会员活动邀请", "You're invited", "Está invitado"),
            ),
            _default(
                FOLLOWUP_TASK_CREATED,
                {
                    "zh-CN": "新的回访任务：请于 {due_time} 起联系会员 {member_id}"
                    "（原因：{reason}）。",
                    "en": "New follow-up call: please call member {member_id} from "
                    "{due_time} (reason: {reason}).",
                    "es": "Nueva llamada de seguimiento: llame al socio {member_id} a partir "
                    "del {due_time} (motivo: {reason}).",
                },
                ("新的回访任务", "New follow-up call", "Nueva llamada de seguimiento"),
            ),
            _default(
                CARD_REPORTED_LOST,
                {
                    "zh-CN": "安全提醒：您的会员卡已于 {reported_time} 挂失，卡内余额和积分"
                    "已受保护。如非本人操作，请立即联系门店。",
                    "en": "Security notice: your member card was reported lost on "
                    "{reported_time}. Your balance and points are protected. If you did "
                    "not report it, contact your store at once.",
                    "es": "Aviso de seguridad: su tarjeta de socio se declaró perdida el "
                    "{reported_time}. Su saldo y sus puntos están protegidos. Si no lo ha "
                    "hecho usted, contacte de inmediato con su tienda.",
                },
                ("会员卡挂失提醒", "Your card was reported lost", "Tarjeta declarada perdida"),
            ),
            _default(
                CARD_FROZEN,
                {
                    "zh-CN": "安全提醒：您的会员卡已于 {frozen_time} 冻结，暂时无法使用。"
                    "如需解冻或非本人操作，请联系门店。",
                    "en": "Security notice: your member card was frozen on {frozen_time} and "
                    "cannot be used for now. To unfreeze it, or if this wasn't you, contact "
                    "your store.",
                    "es": "Aviso de seguridad: su tarjeta de socio se bloqueó el "
                    "{frozen_time} y no puede usarse por ahora. Para desbloquearla, o si no "
                    "ha sido usted, contacte con su tienda.",
                },
                ("会员卡冻结提醒", "Your card was frozen", "Tarjeta bloqueada"),
            ),
            _default(
                BIRTHDAY,
                _with_unsubscribe(
                    {
                        "zh-CN": "亲爱的{given_name}，{store_name}祝您生日快乐！"
                        "生日当月到店可享会员专属生日礼遇。",
                        "en": "Happy birthday, {given_name}! Everyone at {store_name} wishes "
                        "you a wonderful day. Visit us this month for your birthday treat.",
                        "es": "¡Feliz cumpleaños, {given_name}! Todo el equipo de {store_name} "
                        "le desea un día estupendo. Visítenos este mes para recoger su "
                        "regalo de cumpleaños.",
                    }
                ),
                ("生日快乐", "Happy birthday", "Feliz cumpleaños"),
            ),
            _default(
                ANNIVERSARY,
                _with_unsubscribe(
                    {
                        "zh-CN": "感谢您与我们相伴 {years} 年！{store_name}为您准备了"
                        "周年礼遇，欢迎到店领取。",
                        "en": "Thank you for {years} years with us! {store_name} has an "
                        "anniversary treat waiting for you in store.",
                        "es": "¡Gracias por estos {years} años con nosotros! En {store_name} le "
                        "espera un detalle de aniversario.",
                    }
                ),
                ("周年纪念", "Happy anniversary", "Feliz aniversario"),
            ),
            _default(
                WEEKLY_CALL_DIGEST,
                {
                    "zh-CN": "本周回访提醒：门店 {store_id} 自 {week_start} 起共有 "
                    "{task_count} 位会员待回访，请在任务列表中查看。\n{call_list}",
                    "en": "This week's calls: {task_count} members of store {store_id} are "
                    "waiting for a call from {week_start}. See the task list for details."
                    "\n{call_list}",
                    "es": "Llamadas de esta semana: {task_count} socios de la tienda "
                    "{store_id} esperan una llamada a partir del {week_start}. Consulte la "
                    "lista de tareas.\n{call_list}",
                },
                ("本周回访任务", "This week's calls", "Llamadas de esta semana"),
            ),
            _default(
                MARKETING,
                _with_unsubscribe(
                    {
                        "zh-CN": "{store_name}会员专享：最新优惠已上线，欢迎到店选购。",
                        "en": "Members only at {store_name}: our latest offers are in store now.",
                        "es": "Exclusivo para socios de {store_name}: ya tiene nuestras "
                        "últimas ofertas en tienda.",
                    }
                ),
                ("会员专享优惠", "Members-only offers", "Ofertas exclusivas para socios"),
            ),
        )
    }
)
