"""Configuration from environment variables only, with safe local defaults.

In production mode (``CORNUCOPIA_ENV=production``) secrets and the addresses
of shared infrastructure have no defaults: a service refuses to start rather
than run against a development secret or a throwaway SQLite file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

GRPC_SERVICES = ("members", "cards", "loyalty", "campaigns", "notify")
ALL_SERVICES = (*GRPC_SERVICES, "gateway")
# What each component uses of the shared infrastructure, so that production
# mode requires exactly that: the gateway keeps nothing and publishes nothing.
USES_DATABASE = frozenset(GRPC_SERVICES)
USES_NATS = frozenset(GRPC_SERVICES)

DEFAULT_GRPC_PORTS = {
    "members": 50051,
    "cards": 50052,
    "loyalty": 50053,
    "campaigns": 50054,
    "notify": 50055,
}
DEFAULT_HTTP_PORT = 8080

# Only ever used outside production: tokens signed with it are worthless
# anywhere that sets a real secret.
DEVELOPMENT_TOKEN_SECRET = "cornucopia-development-only-secret-do-not-use-in-production"  # noqa: S105

# How long the DEADLETTER stream keeps a parked event, and so how late an
# operator can replay one.
DEAD_LETTER_RETENTION_DAYS = 90
# Consumed event ids must outlive every dead letter: a replay is delivered to
# every consumer of the subject, and those that handled the event the first
# time skip it only while its id is still in their inbox. The extra day
# covers the retries before an event is parked and the hourly housekeeping.
INBOX_RETENTION_HOURS = (DEAD_LETTER_RETENTION_DAYS + 1) * 24
# JetStream allows at most five replicas of a stream.
MAX_STREAM_REPLICAS = 5


class ConfigError(RuntimeError):
    """The environment does not describe a service that can start safely."""


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a server that authenticates its clients by
    certificate, set by ``<prefix>_TLS_CERT`` (the server's certificate,
    then any intermediates), ``<prefix>_TLS_KEY`` (its private key) and
    ``<prefix>_CLIENT_CA`` (the CAs a client certificate must be signed by).
    ``chassis.mtls.server_credentials`` reads them."""

    prefix: str
    cert_chain: Path
    private_key: Path
    client_ca: Path

    SUFFIXES: ClassVar[tuple[str, str, str]] = ("TLS_CERT", "TLS_KEY", "CLIENT_CA")

    def by_setting(self) -> list[tuple[str, Path]]:
        """(setting, path) of the chain, the key and the client CAs, so that
        an error about a file names the setting to fix."""
        paths = (self.cert_chain, self.private_key, self.client_ca)
        return [
            (f"{self.prefix}_{suffix}", path)
            for suffix, path in zip(self.SUFFIXES, paths, strict=True)
        ]

    @classmethod
    def from_env(cls, prefix: str, env: Mapping[str, str]) -> TlsFiles:
        values = {
            f"{prefix}_{suffix}": env.get(f"{prefix}_{suffix}", "").strip()
            for suffix in cls.SUFFIXES
        }
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} not set: mutual TLS needs the server's certificate "
                "chain, its private key and the CAs that sign client certificates"
            )
        cert_chain, private_key, client_ca = (Path(value) for value in values.values())
        return cls(prefix, cert_chain, private_key, client_ca)


@dataclass(frozen=True)
class PartnerGrpc:
    """A service's partner endpoint: a second gRPC port where partners (banks,
    co-brand issuers) authenticate by client certificate instead of a token.
    Set by ``<SERVICE>_PARTNER_GRPC_LISTEN`` and the ``<SERVICE>_PARTNER_``
    TLS files (see ``TlsFiles``); off while the listen address is unset."""

    listen: str
    tls: TlsFiles

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str]) -> PartnerGrpc | None:
        prefix = f"{service.upper()}_PARTNER"
        listen = env.get(f"{prefix}_GRPC_LISTEN", "").strip()
        if not listen:
            return None
        return cls(listen, TlsFiles.from_env(prefix, env))


@dataclass(frozen=True)
class GrpcConnections:
    """How long a gRPC server keeps its callers' connections.

    A connection older than ``max_age_seconds`` (gRPC adds up to 10 % of
    jitter either way) is told to go away: the caller resolves the address
    again and reconnects, so callers of a headless Service spread over the
    pods added since they first connected. Calls still running then have
    ``max_age_grace_seconds`` to finish before the connection is closed;
    the default covers the longest call the suite makes (a member file
    import or export, allowed ten minutes), since new calls already move
    to the new connection the moment the old one is told to go.
    A maximum age of 0 means none. Keepalive pings (every
    ``keepalive_time_seconds`` of silence, each answered within
    ``keepalive_timeout_seconds``) find connections whose peer has gone
    without closing them."""

    max_age_seconds: float = 300.0
    max_age_grace_seconds: float = 600.0
    keepalive_time_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GrpcConnections:
        def seconds(name: str, default: float, *, zero_allowed: bool) -> float:
            text = env.get(name, "").strip()
            if not text:
                return default
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
                least = "0 or more" if zero_allowed else "more than 0"
                raise ConfigError(f"{name} must be a number of seconds, {least}, not {text!r}")
            return value

        return cls(
            max_age_seconds=seconds(
                "GRPC_MAX_CONNECTION_AGE_SECONDS", cls.max_age_seconds, zero_allowed=True
            ),
            max_age_grace_seconds=seconds(
                "GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS",
                cls.max_age_grace_seconds,
                zero_allowed=True,
            ),
            keepalive_time_seconds=seconds(
                "GRPC_KEEPALIVE_TIME_SECONDS", cls.keepalive_time_seconds, zero_allowed=False
            ),
            keepalive_timeout_seconds=seconds(
                "GRPC_KEEPALIVE_TIMEOUT_SECONDS",
                cls.keepalive_timeout_seconds,
                zero_allowed=False,
            ),
        )


@dataclass(frozen=True)
class Settings:
    service: str
    environment: str = "development"
    var_dir: Path = Path("var")
    database_url: str = ""
    nats_url: str = "nats://127.0.0.1:4222"
    grpc_listen: str = ""
    # GRPC_MAX_CONNECTION_AGE_SECONDS and the other GRPC_* durations.
    grpc_connections: GrpcConnections = field(default_factory=GrpcConnections)
    # Only for a service whose definition declares a partner endpoint.
    partner_grpc: PartnerGrpc | None = None
    http_listen: str = f"127.0.0.1:{DEFAULT_HTTP_PORT}"
    token_secret: str = DEVELOPMENT_TOKEN_SECRET
    log_level: str = "INFO"
    log_json: bool = True
    peers: Mapping[str, str] = field(default_factory=dict)
    # NATS_STREAM_REPLICAS: how many servers of a NATS cluster hold each
    # stream (1 on a single server; 3 on a three-node cluster).
    stream_replicas: int = 1
    # How long idempotency keys, consumed event ids and sent outbox rows are
    # kept. The inbox must keep ids at least as long as dead letters are kept
    # (checked by ``check_retention``).
    idempotency_retention_hours: int = 48
    inbox_retention_hours: int = INBOX_RETENTION_HOURS
    sent_outbox_retention_hours: int = 24 * 7

    @property
    def production(self) -> bool:
        return self.environment == "production"

    def check_retention(self) -> None:
        """Refuse an inbox that forgets event ids before the dead letters
        that could replay them are gone."""
        if self.inbox_retention_hours < DEAD_LETTER_RETENTION_DAYS * 24:
            raise ConfigError(
                f"inbox_retention_hours ({self.inbox_retention_hours}) is shorter than the "
                f"dead-letter retention ({DEAD_LETTER_RETENTION_DAYS} days): a replayed dead "
                "letter would be handled again by consumers that had already handled it"
            )

    def peer(self, service: str) -> str:
        """The address (host:port) where another service's gRPC API listens."""
        return self.peers.get(service, f"127.0.0.1:{DEFAULT_GRPC_PORTS[service]}")

    @classmethod
    def from_env(cls, service: str, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        if service not in ALL_SERVICES:
            raise ConfigError(f"unknown service {service!r}; expected one of {ALL_SERVICES}")
        environment = env.get("CORNUCOPIA_ENV", "development").strip().lower()
        if environment not in ("development", "production", "test"):
            raise ConfigError("CORNUCOPIA_ENV must be development, production or test")
        production = environment == "production"
        var_dir = Path(env.get("CORNUCOPIA_VAR_DIR", "var"))
        prefix = service.upper()

        missing: list[str] = []

        def required_in_production(name: str, default: str) -> str:
            value = env.get(name, "").strip()
            if value:
                return value
            if production:
                missing.append(name)
            return default

        database_url = ""
        if service in USES_DATABASE:
            database_url = required_in_production(
                f"{prefix}_DATABASE_URL",
                f"sqlite+aiosqlite:///{var_dir / (service + '.db')}",
            )
        nats_default = "nats://127.0.0.1:4222"
        if service in USES_NATS:
            nats_url = required_in_production("NATS_URL", nats_default)
        else:
            nats_url = env.get("NATS_URL", "").strip() or nats_default
        token_secret = required_in_production("CORNUCOPIA_TOKEN_SECRET", DEVELOPMENT_TOKEN_SECRET)
        if missing:
            raise ConfigError(
                f"production mode needs these environment variables for {service}: "
                + ", ".join(missing)
            )
        if production and token_secret == DEVELOPMENT_TOKEN_SECRET:
            raise ConfigError("CORNUCOPIA_TOKEN_SECRET is the development secret")

        peers = {
            name: env[f"{name.upper()}_GRPC_ADDR"]
            for name in GRPC_SERVICES
            if env.get(f"{name.upper()}_GRPC_ADDR")
        }
        default_listen = (
            f"127.0.0.1:{DEFAULT_GRPC_PORTS[service]}" if service in DEFAULT_GRPC_PORTS else ""
        )
        return cls(
            service=service,
            environment=environment,
            var_dir=var_dir,
            database_url=normalise_database_url(database_url) if database_url else "",
            nats_url=nats_url,
            grpc_listen=env.get("GRPC_LISTEN", default_listen),
            grpc_connections=GrpcConnections.from_env(env),
            partner_grpc=PartnerGrpc.from_env(service, env),
            http_listen=env.get("HTTP_LISTEN", f"127.0.0.1:{DEFAULT_HTTP_PORT}"),
            token_secret=token_secret,
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            log_json=env.get("LOG_FORMAT", "json").lower() != "console",
            peers=peers,
            stream_replicas=stream_replicas_from(env),
        )


def stream_replicas_from(env: Mapping[str, str]) -> int:
    text = env.get("NATS_STREAM_REPLICAS", "").strip()
    if not text:
        return 1
    try:
        replicas = int(text)
    except ValueError:
        replicas = 0
    if not 1 <= replicas <= MAX_STREAM_REPLICAS:
        raise ConfigError(
            f"NATS_STREAM_REPLICAS must be a whole number from 1 to {MAX_STREAM_REPLICAS}, "
            f"not {text!r}"
        )
    return replicas


def normalise_database_url(url: str) -> str:
    """Accept the URLs operators usually have and pick the async drivers."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    return url
