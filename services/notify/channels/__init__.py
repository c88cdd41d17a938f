"""Channels hand a message to the outside world, one plugin each behind the
``Channel`` protocol: the development log, e-mail (SMTP), SMS (an HTTP
provider), app push (a signed webhook), staff call tasks (campaigns' task
lists) and postal mail (a mailing list for a print shop).

A channel says which address it needs (``needs``); the dispatcher looks it
up in the members service at send time and passes it in, so that notify
never keeps a phone number or an e-mail address. A channel either returns
``Sent`` (the provider took the message, with its id for it), raises
``PermanentChannelError`` (the provider refused it and trying again will
not help: the message fails at once with the provider's reason) or raises
``ChannelError`` or anything else (tried again later, with backoff)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from services.notify.store import MessageRecord


class Needs(enum.Enum):
    """The address a channel sends to."""

    NOTHING = "nothing"
    MOBILE = "mobile"
    EMAIL = "email"


class ChannelError(Exception):
    """The channel could not take the message now; it is retried, not
    before ``retry_after`` seconds when the provider said so."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentChannelError(ChannelError):
    """Refused for good (an invalid number, a mailbox that does not exist):
    retrying will not help. ``reason`` is the provider's, kept on the
    message; it must not quote the address."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Sent:
    """The provider took the message: its name and its own id of it."""

    provider: str
    provider_message_id: str


class Channel(Protocol):
    @property
    def needs(self) -> Needs: ...

    async def send(self, message: MessageRecord, address: str) -> Sent: ...


__all__ = ["Channel", "ChannelError", "Needs", "PermanentChannelError", "Sent"]
