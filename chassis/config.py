"""Configuration from environment variables only, with safe local defaults.

In production mode (``CORNUCOPIA_ENV=production``) secrets and the addresses
of shared infrastructure have no defaults: a service refuses to start rather
than run against a development secret or a throwaway SQLite file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

GRPC_SERVICES = ("members", "cards", "loyalty", "campaigns", "notify")
ALL_SERVICES = (*GRPC_SERVICES, "gateway")

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


class ConfigError(RuntimeError):
    """The environment does not describe a service that can start safely."""


@dataclass(frozen=True)
class Settings:
    service: str
    environment: str = "development"
    var_dir: Path = Path("var")
    database_url: str = ""
    nats_url: str = "nats://127.0.0.1:4222"
    grpc_listen: str = ""
    http_listen: str = f"127.0.0.1:{DEFAULT_HTTP_PORT}"
    token_secret: str = DEVELOPMENT_TOKEN_SECRET
    log_level: str = "INFO"
    log_json: bool = True
    peers: Mapping[str, str] = field(default_factory=dict)
    # How long idempotency keys and consumed event ids are kept.
    idempotency_retention_hours: int = 48
    inbox_retention_hours: int = 24 * 7

    @property
    def production(self) -> bool:
        return self.environment == "production"

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
        if service != "gateway":
            database_url = required_in_production(
                f"{prefix}_DATABASE_URL",
                f"sqlite+aiosqlite:///{var_dir / (service + '.db')}",
            )
        nats_url = required_in_production("NATS_URL", "nats://127.0.0.1:4222")
        token_secret = required_in_production("CORNUCOPIA_TOKEN_SECRET", DEVELOPMENT_TOKEN_SECRET)
        if missing:
            raise ConfigError(
                "production mode needs these environment variables: " + ", ".join(missing)
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
            http_listen=env.get("HTTP_LISTEN", f"127.0.0.1:{DEFAULT_HTTP_PORT}"),
            token_secret=token_secret,
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            log_json=env.get("LOG_FORMAT", "json").lower() != "console",
            peers=peers,
        )


def normalise_database_url(url: str) -> str:
    """Accept the URLs operators usually have and pick the async drivers."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    return url
