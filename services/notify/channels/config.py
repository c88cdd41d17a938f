"""The channels' configuration, from environment variables only (as
``chassis.config`` reads the rest). A channel whose variables are unset is
not configured: the dispatcher sends its messages to the development
channel instead, and says so at start-up.

Secrets (the SMTP password, the SMS API key, the push signing secret) come
from the environment too; the chart takes them from the Secret."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from chassis.config import ConfigError
from services.notify.domain.delivery import RetryPolicy


def _text(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, "").strip() or default


def _number(env: Mapping[str, str], name: str, default: float, *, least: float = 0.0) -> float:
    text = _text(env, name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < least:
        raise ConfigError(f"{name} must be a number, at least {least:g}, not {text!r}")
    return value


def _whole(env: Mapping[str, str], name: str, default: int, *, least: int = 0) -> int:
    text = _text(env, name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {text!r}") from None
    if value < least:
        raise ConfigError(f"{name} must be at least {least}, not {value}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = _text(env, name).lower()
    if not text:
        return default
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {text!r}")


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int = 587
    username: str = ""
    password: str = field(default="", repr=False)
    # STARTTLS on a plain connection (port 587); implicit TLS (port 465)
    # with ``use_tls``. Authentication only over TLS of either kind.
    starttls: bool = True
    use_tls: bool = False
    sender: str = ""
    # A CA bundle to trust instead of the system's (a private relay).
    ca_file: Path | None = None
    timeout_seconds: float = 20.0


@dataclass(frozen=True)
class SmsSettings:
    """An HTTP SMS provider's API: where to POST, how to authenticate, and
    which fields carry what. ``id_field`` is a dotted path into the JSON
    reply (``data.message_id``); ``error_field`` likewise for the reason of
    a refusal."""

    url: str
    api_key: str = field(default="", repr=False)
    auth_header: str = "Authorization"
    # The header's value is "<scheme> <key>"; an empty scheme sends the key alone.
    auth_scheme: str = "Bearer"
    body_format: str = "json"
    to_field: str = "to"
    text_field: str = "text"
    # Our message id, which providers use to drop a repeated send.
    reference_field: str = "reference"
    sender_field: str = "from"
    sender: str = ""
    id_field: str = "id"
    error_field: str = "error"
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class PushSettings:
    url: str
    secret: str = field(default="", repr=False)
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class ChannelSettings:
    smtp: SmtpSettings | None = None
    sms: SmsSettings | None = None
    push: PushSettings | None = None
    # Sends a second per provider, across all replicas (0: no limit), and
    # the bursts allowed; the pace is kept in the database (see
    # ``dispatch.RateLimiter``), so every replica must be given the same.
    rate_per_second: Mapping[str, float] = field(default_factory=dict)
    burst: Mapping[str, int] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Messages a dispatcher sends at once.
    concurrency: int = 8
    batch_size: int = 50

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ChannelSettings:
        env = os.environ if environ is None else environ
        smtp = None
        if host := _text(env, "NOTIFY_SMTP_HOST"):
            ca = _text(env, "NOTIFY_SMTP_CA_FILE")
            smtp = SmtpSettings(
                host=host,
                port=_whole(env, "NOTIFY_SMTP_PORT", 587, least=1),
                username=_text(env, "NOTIFY_SMTP_USERNAME"),
                password=env.get("NOTIFY_SMTP_PASSWORD", ""),
                starttls=_flag(env, "NOTIFY_SMTP_STARTTLS", True),
                use_tls=_flag(env, "NOTIFY_SMTP_TLS", False),
                sender=_text(env, "NOTIFY_SMTP_FROM"),
                ca_file=Path(ca) if ca else None,
                timeout_seconds=_number(env, "NOTIFY_SMTP_TIMEOUT_SECONDS", 20.0, least=0.1),
            )
            if not smtp.sender:
                raise ConfigError("NOTIFY_SMTP_FROM is required with NOTIFY_SMTP_HOST")
            if smtp.username and not (smtp.starttls or smtp.use_tls):
                raise ConfigError(
                    "NOTIFY_SMTP_USERNAME is set but neither STARTTLS nor TLS: "
                    "the password would cross the network in clear"
                )
        sms = None
        if url := _text(env, "NOTIFY_SMS_URL"):
            body_format = _text(env, "NOTIFY_SMS_FORMAT", "json").lower()
            if body_format not in ("json", "form"):
                raise ConfigError(f"NOTIFY_SMS_FORMAT must be json or form, not {body_format!r}")
            sms = SmsSettings(
                url=url,
                api_key=env.get("NOTIFY_SMS_API_KEY", "").strip(),
                auth_header=_text(env, "NOTIFY_SMS_AUTH_HEADER", "Authorization"),
                auth_scheme=env.get("NOTIFY_SMS_AUTH_SCHEME", "Bearer").strip(),
                body_format=body_format,
                to_field=_text(env, "NOTIFY_SMS_TO_FIELD", "to"),
                text_field=_text(env, "NOTIFY_SMS_TEXT_FIELD", "text"),
                reference_field=env.get("NOTIFY_SMS_REFERENCE_FIELD", "reference").strip(),
                sender_field=_text(env, "NOTIFY_SMS_SENDER_FIELD", "from"),
                sender=_text(env, "NOTIFY_SMS_SENDER"),
                id_field=_text(env, "NOTIFY_SMS_ID_FIELD", "id"),
                error_field=_text(env, "NOTIFY_SMS_ERROR_FIELD", "error"),
                timeout_seconds=_number(env, "NOTIFY_SMS_TIMEOUT_SECONDS", 10.0, least=0.1),
            )
        push = None
        if url := _text(env, "NOTIFY_PUSH_URL"):
            push = PushSettings(
                url=url,
                secret=env.get("NOTIFY_PUSH_SECRET", "").strip(),
                timeout_seconds=_number(env, "NOTIFY_PUSH_TIMEOUT_SECONDS", 10.0, least=0.1),
            )
            if not push.secret:
                raise ConfigError("NOTIFY_PUSH_SECRET is required with NOTIFY_PUSH_URL")
        rates: dict[str, float] = {}
        bursts: dict[str, int] = {}
        for name in ("SMS", "SMTP", "PUSH"):
            rate = _number(env, f"NOTIFY_{name}_RATE_PER_SECOND", 0.0)
            if rate > 0:
                key = "email" if name == "SMTP" else name.lower()
                rates[key] = rate
                bursts[key] = _whole(env, f"NOTIFY_{name}_BURST", 1, least=1)
        base = _number(env, "NOTIFY_RETRY_BASE_SECONDS", 30.0, least=0.001)
        retry = RetryPolicy(
            max_attempts=_whole(env, "NOTIFY_MAX_ATTEMPTS", 8, least=1),
            base_seconds=base,
            cap_seconds=max(base, _number(env, "NOTIFY_RETRY_CAP_SECONDS", 3600.0, least=0.001)),
        )
        return cls(
            smtp=smtp,
            sms=sms,
            push=push,
            rate_per_second=rates,
            burst=bursts,
            retry=retry,
            concurrency=_whole(env, "NOTIFY_DISPATCH_CONCURRENCY", 8, least=1),
            batch_size=_whole(env, "NOTIFY_DISPATCH_BATCH", 50, least=1),
        )
