"""Message rules: which template an event calls for and how it reads in the
member's language. Pure: no I/O."""

from __future__ import annotations

import enum
import string
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_LOCALE = "zh-CN"
LOCALES = ("zh-CN", "en", "es")


class MessageStatus(enum.StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    # Given up on: the provider refused it for good, or every retry failed.
    # Failed messages are the dead letters an operator lists and replays.
    FAILED = "failed"
    # Never sent, on purpose: no consent, opted out, over the frequency cap.
    # Kept so that "why did this member not hear from us" has an answer.
    SUPPRESSED = "suppressed"


class Category(enum.StrEnum):
    """Transactional messages (a receipt, a security notice) need no
    marketing consent; marketing messages do, and obey quiet hours and the
    weekly cap. Messages to staff are transactional."""

    TRANSACTIONAL = "transactional"
    MARKETING = "marketing"


class Channel(enum.StrEnum):
    DEV_LOG = "dev_log"
    SMS = "sms"
    EMAIL = "email"
    PUSH = "push"
    CALL_TASK = "call_task"
    POST = "post"


@dataclass(frozen=True)
class Template:
    name: str
    bodies: Mapping[str, str]

    def variables(self) -> set[str]:
        names: set[str] = set()
        for body in self.bodies.values():
            names.update(
                field for _, field, _, _ in string.Formatter().parse(body) if field is not None
            )
        return names

    def render(self, locale: str, values: Mapping[str, str]) -> str:
        """The body in the locale (the default locale when the template has
        none for it), with every variable filled; a missing variable is an
        error, never a message with a hole in it."""
        body = self.bodies.get(locale) or self.bodies[DEFAULT_LOCALE]
        missing = self.variables() - set(values)
        if missing:
            raise KeyError(f"template {self.name} needs {sorted(missing)}")
        return body.format(**values)


# The welcome carries no personal values: the member number is enough to
# greet a member and to find them again at the counter.
WELCOME = Template(
    name="welcome",
    bodies={
        "zh-CN": "欢迎加入会员！您的会员号是 {member_id}，到店出示手机号即可享受会员权益。",
        "en": "Welcome to the club! Your member number is {member_id}; "
        "give your mobile number at the till to enjoy your benefits.",
        "es": "¡Bienvenido al club! Su número de socio es {member_id}; "
        "indique su móvil en caja para disfrutar de sus ventajas.",
    },
)


def choose_locale(preferred: str, store_default: str = DEFAULT_LOCALE) -> str:
    if preferred in LOCALES:
        return preferred
    return store_default if store_default in LOCALES else DEFAULT_LOCALE
