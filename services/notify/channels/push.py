"""App push and messaging webhooks: an HTTP POST of a JSON payload, signed
so that the receiver knows it came from us and was not replayed later.

Signature: ``X-Cornucopia-Signature: sha256=<hex HMAC-SHA256 of
"<timestamp>.<body>">`` with the shared secret, and
``X-Cornucopia-Timestamp: <unix seconds>``; the receiver recomputes it
over the raw body and refuses old timestamps. Staff messages go to the
staff app keyed by ``staff_id``; members' by ``member_id``: the app
knows its own devices, no address leaves notify.

2xx took it (a JSON ``id`` in the reply is kept as the provider's id);
408, 429 and 5xx are retried (the dispatcher backs off); other 4xx
refuse it for good."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable

import httpx

from services.notify.channels import ChannelError, Needs, PermanentChannelError, Sent
from services.notify.channels.config import PushSettings
from services.notify.channels.sms import dotted, provider_reason, retry_after_seconds
from services.notify.store import MessageRecord

PROVIDER = "push"
SIGNATURE_HEADER = "X-Cornucopia-Signature"
TIMESTAMP_HEADER = "X-Cornucopia-Timestamp"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify(
    secret: str, timestamp: str, body: bytes, signed: str, *, now: float, tolerance: float = 300.0
) -> bool:
    """What a receiver does: the signature matches (compared in constant
    time) and the timestamp is recent."""
    try:
        age = abs(now - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(signature(secret, timestamp, body), signed)


def payload(message: MessageRecord) -> bytes:
    return json.dumps(
        {
            "message_id": message.message_id,
            "member_id": message.member_id,
            "staff_id": message.staff_id,
            "template": message.template,
            "category": message.category.value,
            "locale": message.locale,
            "subject": message.subject,
            "body": message.body,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


class PushChannel:
    needs = Needs.NOTHING

    def __init__(
        self,
        settings: PushSettings,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._client = client or httpx.AsyncClient(timeout=settings.timeout_seconds)
        self._owns_client = client is None
        self._clock = clock

    async def send(self, message: MessageRecord, address: str = "") -> Sent:
        body = payload(message)
        stamp = str(int(self._clock()))
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: signature(self.settings.secret, stamp, body),
            "Idempotency-Key": message.message_id,
        }
        try:
            response = await self._client.post(self.settings.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ChannelError(
                f"the push webhook cannot be reached ({type(exc).__name__})"
            ) from None
        status = response.status_code
        if status in (408, 429) or status >= 500:
            raise ChannelError(
                f"the push webhook failed (HTTP {status})",
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        if status >= 400:
            raise PermanentChannelError(provider_reason(response, "error"))
        try:
            provider_id = dotted(response.json(), "id")
        except ValueError:
            provider_id = None
        return Sent(PROVIDER, str(provider_id or message.message_id))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
