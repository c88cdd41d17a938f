"""SMS through an HTTP provider API, its request format configured
(``SmsSettings``): JSON or form body, which fields carry the number, the
text and our reference, how to authenticate, where the provider's id of
the message is in its reply.

The provider's answers: 2xx took it (its id is read from the reply); 429
is "slow down" (retried, not before its Retry-After); any other 4xx refused
it for good, with the provider's reason; 5xx, timeouts and connection
errors are retried with backoff."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import httpx

from chassis.logs import redact_text
from services.notify.channels import ChannelError, Needs, PermanentChannelError, Sent
from services.notify.channels.config import SmsSettings
from services.notify.store import MessageRecord

PROVIDER = "sms"


def dotted(value: Any, path: str) -> Any:
    """``data.message_id`` of a parsed JSON reply; None when absent."""
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def retry_after_seconds(header: str | None, now: float | None = None) -> float | None:
    """A Retry-After header: seconds, or an HTTP date."""
    if not header:
        return None
    text = header.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def provider_reason(response: httpx.Response, field: str) -> str:
    """The provider's reason for a refusal, without anything that looks
    like a number or an address (a provider may quote the destination)."""
    reason: Any = None
    try:
        reason = dotted(response.json(), field)
    except ValueError:
        reason = response.text[:200]
    text = str(reason).strip() if reason not in (None, "") else f"HTTP {response.status_code}"
    return redact_text(text)[:300]


class SmsChannel:
    needs = Needs.MOBILE

    def __init__(self, settings: SmsSettings, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self._client = client or httpx.AsyncClient(timeout=settings.timeout_seconds)
        self._owns_client = client is None

    def _request(self, message: MessageRecord, mobile: str) -> dict[str, Any]:
        s = self.settings
        fields: dict[str, str] = {s.to_field: mobile, s.text_field: message.body}
        if s.reference_field:
            fields[s.reference_field] = message.message_id
        if s.sender:
            fields[s.sender_field] = s.sender
        headers = {}
        if s.api_key:
            headers[s.auth_header] = f"{s.auth_scheme} {s.api_key}" if s.auth_scheme else s.api_key
        if s.body_format == "form":
            return {"data": fields, "headers": headers}
        return {"json": fields, "headers": headers}

    async def send(self, message: MessageRecord, address: str) -> Sent:
        try:
            response = await self._client.post(self.settings.url, **self._request(message, address))
        except httpx.TimeoutException as exc:
            raise ChannelError(
                f"the SMS provider did not answer in time ({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:
            raise ChannelError(
                f"the SMS provider cannot be reached ({type(exc).__name__})"
            ) from None
        status = response.status_code
        if status == 429:
            raise ChannelError(
                "the SMS provider asks to slow down (429)",
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        if 400 <= status < 500 and status != 408:
            raise PermanentChannelError(provider_reason(response, self.settings.error_field))
        if status >= 400 or status == 408:
            raise ChannelError(
                f"the SMS provider failed (HTTP {status})",
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        try:
            provider_id = dotted(response.json(), self.settings.id_field)
        except ValueError:
            provider_id = None
        if provider_id in (None, ""):
            # Taken, but without an id no receipt can be matched to it.
            provider_id = message.message_id
        return Sent(PROVIDER, str(provider_id))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
