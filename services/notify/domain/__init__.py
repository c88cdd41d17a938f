"""Notify's rules, pure and without I/O: messages and templates, the
chain's notification policy (quiet hours, caps), whom to tell and how.

The message-level names are re-exported here because nearly every module
needs them."""

from services.notify.domain.messages import (
    DEFAULT_LOCALE,
    LOCALES,
    WELCOME,
    Category,
    Channel,
    MessageStatus,
    Template,
    choose_locale,
)

__all__ = [
    "DEFAULT_LOCALE",
    "LOCALES",
    "WELCOME",
    "Category",
    "Channel",
    "MessageStatus",
    "Template",
    "choose_locale",
]
