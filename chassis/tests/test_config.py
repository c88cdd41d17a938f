"""Settings from an explicit environment mapping: safe development defaults,
and a production mode that refuses to start without real secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from chassis.bus import STREAMS
from chassis.config import (
    DEAD_LETTER_RETENTION_DAYS,
    DEFAULT_GRPC_PORTS,
    DEFAULT_HTTP_PORT,
    DEVELOPMENT_TOKEN_SECRET,
    GRPC_SERVICES,
    ConfigError,
    Settings,
    normalise_database_url,
)

PRODUCTION = {
    "CORNUCOPIA_ENV": "production",
    "CORNUCOPIA_TOKEN_SECRET": "a-real-secret-from-the-vault-0123456789",
    "NATS_URL": "nats://nats.internal:4222",
    "MEMBERS_DATABASE_URL": "postgres://members@db.internal:5432/members",
}


def test_development_defaults() -> None:
    settings = Settings.from_env("members", {})
    assert settings.environment == "development"
    assert not settings.production
    assert settings.var_dir == Path("var")
    assert settings.database_url == "sqlite+aiosqlite:///var/members.db"
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.token_secret == DEVELOPMENT_TOKEN_SECRET
    assert settings.grpc_listen == f"127.0.0.1:{DEFAULT_GRPC_PORTS['members']}"
    assert settings.http_listen == f"127.0.0.1:{DEFAULT_HTTP_PORT}"
    assert settings.log_level == "INFO"
    assert settings.log_json is True
    assert dict(settings.peers) == {}


def test_the_sqlite_file_lives_under_the_var_dir() -> None:
    settings = Settings.from_env("cards", {"CORNUCOPIA_VAR_DIR": "data/run"})
    assert settings.var_dir == Path("data/run")
    assert settings.database_url == "sqlite+aiosqlite:///data/run/cards.db"


@pytest.mark.parametrize("service", GRPC_SERVICES)
def test_each_service_gets_its_own_database_and_port(service: str) -> None:
    settings = Settings.from_env(service, {})
    assert settings.database_url.endswith(f"/{service}.db")
    assert settings.grpc_listen.endswith(f":{DEFAULT_GRPC_PORTS[service]}")


def test_the_gateway_has_no_database_and_no_grpc_port() -> None:
    settings = Settings.from_env("gateway", {})
    assert settings.database_url == ""
    assert settings.grpc_listen == ""


def test_explicit_values_are_taken() -> None:
    settings = Settings.from_env(
        "notify",
        {
            "CORNUCOPIA_ENV": "Test ",
            "NOTIFY_DATABASE_URL": "sqlite:///data/notify-test.db",
            "NATS_URL": "nats://10.0.0.5:4222",
            "CORNUCOPIA_TOKEN_SECRET": "s3cret",
            "GRPC_LISTEN": "0.0.0.0:6000",
            "HTTP_LISTEN": "0.0.0.0:9000",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "console",
        },
    )
    assert settings.environment == "test"
    assert settings.database_url == "sqlite+aiosqlite:///data/notify-test.db"
    assert settings.nats_url == "nats://10.0.0.5:4222"
    assert settings.token_secret == "s3cret"
    assert settings.grpc_listen == "0.0.0.0:6000"
    assert settings.http_listen == "0.0.0.0:9000"
    assert settings.log_level == "DEBUG"
    assert settings.log_json is False


def test_peer_addresses_are_read_from_grpc_addr_variables() -> None:
    settings = Settings.from_env(
        "gateway",
        {
            "MEMBERS_GRPC_ADDR": "members.internal:50051",
            "LOYALTY_GRPC_ADDR": "10.1.2.3:7000",
            "CARDS_GRPC_ADDR": "",
            "UNKNOWN_GRPC_ADDR": "elsewhere:1",
        },
    )
    assert dict(settings.peers) == {
        "members": "members.internal:50051",
        "loyalty": "10.1.2.3:7000",
    }
    assert settings.peer("members") == "members.internal:50051"
    assert settings.peer("loyalty") == "10.1.2.3:7000"
    # Not set (or empty): the local default port.
    assert settings.peer("cards") == f"127.0.0.1:{DEFAULT_GRPC_PORTS['cards']}"
    assert settings.peer("notify") == f"127.0.0.1:{DEFAULT_GRPC_PORTS['notify']}"


def test_production_with_everything_set_starts() -> None:
    settings = Settings.from_env("members", PRODUCTION)
    assert settings.production
    assert settings.token_secret == PRODUCTION["CORNUCOPIA_TOKEN_SECRET"]
    assert settings.nats_url == "nats://nats.internal:4222"
    assert settings.database_url == "postgresql+asyncpg://members@db.internal:5432/members"


def test_production_without_secrets_names_every_missing_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env("members", {"CORNUCOPIA_ENV": "production"})
    message = str(caught.value)
    for name in ("CORNUCOPIA_TOKEN_SECRET", "NATS_URL", "MEMBERS_DATABASE_URL"):
        assert name in message


@pytest.mark.parametrize("missing", ["CORNUCOPIA_TOKEN_SECRET", "NATS_URL", "MEMBERS_DATABASE_URL"])
@pytest.mark.parametrize("empty", [None, "", "   "])
def test_production_refuses_each_missing_variable(missing: str, empty: str | None) -> None:
    environ = dict(PRODUCTION)
    if empty is None:
        del environ[missing]
    else:
        environ[missing] = empty
    with pytest.raises(ConfigError, match=missing) as caught:
        Settings.from_env("members", environ)
    others = {"CORNUCOPIA_TOKEN_SECRET", "NATS_URL", "MEMBERS_DATABASE_URL"} - {missing}
    assert not any(name in str(caught.value) for name in others)


def test_the_gateway_in_production_needs_no_database() -> None:
    environ = {k: v for k, v in PRODUCTION.items() if k != "MEMBERS_DATABASE_URL"}
    assert Settings.from_env("gateway", environ).production
    with pytest.raises(ConfigError, match="CARDS_DATABASE_URL"):
        Settings.from_env("cards", environ)


def test_the_gateway_in_production_needs_no_nats() -> None:
    """The gateway publishes and consumes nothing: NATS_URL is not its concern."""
    environ = {
        "CORNUCOPIA_ENV": "production",
        "CORNUCOPIA_TOKEN_SECRET": PRODUCTION["CORNUCOPIA_TOKEN_SECRET"],
    }
    assert Settings.from_env("gateway", environ).production
    # Still required by every service that uses the bus, named alone.
    for service in GRPC_SERVICES:
        env = {**environ, f"{service.upper()}_DATABASE_URL": "postgresql://u@db/x"}
        with pytest.raises(ConfigError, match="NATS_URL") as caught:
            Settings.from_env(service, env)
        assert "DATABASE_URL" not in str(caught.value)


def test_the_stream_replica_count_comes_from_the_environment() -> None:
    assert Settings.from_env("members", {}).stream_replicas == 1
    assert Settings.from_env("notify", {"NATS_STREAM_REPLICAS": " 3 "}).stream_replicas == 3
    for wrong in ("0", "6", "three", "-1", "2.5"):
        with pytest.raises(ConfigError, match="NATS_STREAM_REPLICAS"):
            Settings.from_env("members", {"NATS_STREAM_REPLICAS": wrong})


def test_consumed_event_ids_outlive_the_dead_letters() -> None:
    """A replayed dead letter reaches every consumer of its subject; those
    that handled the event before must still find its id in their inbox."""
    assert STREAMS["deadletter"].max_age_days == DEAD_LETTER_RETENTION_DAYS
    settings = Settings.from_env("notify", {})
    assert settings.inbox_retention_hours >= DEAD_LETTER_RETENTION_DAYS * 24
    settings.check_retention()
    # Sent outbox rows are only history: they need not be kept as long.
    assert settings.sent_outbox_retention_hours < settings.inbox_retention_hours
    short = Settings(service="notify", inbox_retention_hours=24 * 7)
    with pytest.raises(ConfigError, match="dead-letter retention"):
        short.check_retention()


def test_production_refuses_the_development_secret() -> None:
    environ = {**PRODUCTION, "CORNUCOPIA_TOKEN_SECRET": DEVELOPMENT_TOKEN_SECRET}
    with pytest.raises(ConfigError, match="development secret"):
        Settings.from_env("members", environ)
    # The same environment outside production is fine.
    assert Settings.from_env("members", {**environ, "CORNUCOPIA_ENV": "development"})


@pytest.mark.parametrize("environment", ["staging", "prod"])
def test_an_unknown_environment_is_refused(environment: str) -> None:
    with pytest.raises(ConfigError, match="CORNUCOPIA_ENV"):
        Settings.from_env("members", {"CORNUCOPIA_ENV": environment})


def test_an_unknown_service_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown service"):
        Settings.from_env("billing", {})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@db:5432/members", "postgresql+asyncpg://u:p@db:5432/members"),
        (
            "postgresql://u@db/members?sslmode=require",
            "postgresql+asyncpg://u@db/members?sslmode=require",
        ),
        ("postgresql+asyncpg://u@db/members", "postgresql+asyncpg://u@db/members"),
        ("sqlite:///var/members.db", "sqlite+aiosqlite:///var/members.db"),
        ("sqlite+aiosqlite:///var/members.db", "sqlite+aiosqlite:///var/members.db"),
    ],
)
def test_database_urls_pick_the_async_drivers(url: str, expected: str) -> None:
    assert normalise_database_url(url) == expected
    assert normalise_database_url(expected) == expected


def test_the_database_url_from_the_environment_is_normalised() -> None:
    settings = Settings.from_env("loyalty", {"LOYALTY_DATABASE_URL": "postgres://l@db/loyalty"})
    assert settings.database_url == "postgresql+asyncpg://l@db/loyalty"
