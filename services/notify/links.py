"""The signing key and public address of unsubscribe links, from the
environment: ``NOTIFY_LINK_SECRET`` (at least 32 characters) and
``NOTIFY_PUBLIC_BASE_URL`` (where members reach the gateway, e.g.
https://shop.example). Outside production a fixed development key and the
local gateway stand in, as for the chassis' other development keys; in
production both are required."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from chassis.config import DEFAULT_HTTP_PORT, ConfigError, Settings
from chassis.crypto import development_key
from services.notify.domain.messages import Channel
from services.notify.domain.optouts import LinkClaim, sign_link, unsubscribe_url, verify_link

MIN_SECRET_CHARS = 32


@dataclass(frozen=True)
class Links:
    key: bytes = field(repr=False)
    base_url: str

    def unsubscribe_url(self, member_id: str, channel: Channel) -> str:
        return unsubscribe_url(self.base_url, sign_link(self.key, member_id, channel))

    def verify(self, token: str) -> LinkClaim:
        return verify_link(self.key, token)

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> Links:
        env = os.environ if environ is None else environ
        secret = env.get("NOTIFY_LINK_SECRET", "").strip()
        base_url = env.get("NOTIFY_PUBLIC_BASE_URL", "").strip().rstrip("/")
        if settings.production:
            missing = [
                name
                for name, value in (
                    ("NOTIFY_LINK_SECRET", secret),
                    ("NOTIFY_PUBLIC_BASE_URL", base_url),
                )
                if not value
            ]
            if missing:
                raise ConfigError(
                    "production mode needs these environment variables for notify: "
                    + ", ".join(missing)
                )
        if secret and len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"NOTIFY_LINK_SECRET must be at least {MIN_SECRET_CHARS} characters")
        if base_url and not base_url.startswith(("https://", "http://")):
            raise ConfigError("NOTIFY_PUBLIC_BASE_URL must be an http(s) URL")
        return cls(
            key=secret.encode() if secret else development_key("notify-unsubscribe-links"),
            base_url=base_url or f"http://127.0.0.1:{DEFAULT_HTTP_PORT}",
        )
