"""The ``cornucopia`` command: tokens, usage errors, and dead letters against a
real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chassis import cli, deadletters
from chassis.auth import Role, Scope, ScopeLevel, verify_token
from chassis.bus import STREAMS, Bus, cloudevent_headers, header_map
from chassis.config import DEVELOPMENT_TOKEN_SECRET, ConfigError
from chassis.errors import Unauthenticated
from chassis.inbox import dead_letter_subject
from chassis.mtls import certificate_info
from chassis.natsserver import NatsServer

ORIGINAL_SUBJECT = "members.v1.member_created"
CONSUMER = "notify-welcome"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CORNUCOPIA_ENV", "CORNUCOPIA_TOKEN_SECRET", "NATS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CORNUCOPIA_VAR_DIR", str(tmp_path / "var"))


# -- token --------------------------------------------------------------------


def _token(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(["token", *argv]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out, "only the token goes to stdout, for $(cornucopia token)"
    return out


def test_token_defaults_to_an_hq_admin(capsys: pytest.CaptureFixture[str]) -> None:
    principal = verify_token(DEVELOPMENT_TOKEN_SECRET, _token(capsys))
    assert principal.subject == "dev-admin"
    assert principal.roles == frozenset({Role.HQ_ADMIN})
    assert principal.scope == Scope(ScopeLevel.HQ)


def test_token_carries_the_roles_scope_and_lifetime(capsys: pytest.CaptureFixture[str]) -> None:
    token = _token(
        capsys,
        "--role",
        "store_operator",
        "--role",
        "store_manager",
        "--scope",
        "store:S001",
        "--subject",
        "till-7",
        "--ttl-hours",
        "2",
    )
    principal = verify_token(DEVELOPMENT_TOKEN_SECRET, token)
    assert principal.subject == "till-7"
    assert principal.roles == frozenset({Role.STORE_OPERATOR, Role.STORE_MANAGER})
    assert principal.scope == Scope(ScopeLevel.STORE, "S001")
    assert principal.store_id == "S001"
    lifetime = principal.claims["exp"] - principal.claims["iat"]
    assert lifetime == 2 * 3600
    assert abs(principal.claims["iat"] - time.time()) < 60


@pytest.mark.parametrize("scope", ["region:R01", "call_center", "partner:P01"])
def test_token_accepts_every_scope_level(capsys: pytest.CaptureFixture[str], scope: str) -> None:
    principal = verify_token(DEVELOPMENT_TOKEN_SECRET, _token(capsys, "--scope", scope))
    assert str(principal.scope) == scope


def test_token_is_signed_with_the_configured_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "a-real-secret-" + "x" * 40
    monkeypatch.setenv("CORNUCOPIA_TOKEN_SECRET", secret)
    token = _token(capsys, "--role", "call_center", "--scope", "call_center")
    assert verify_token(secret, token).roles == frozenset({Role.CALL_CENTER})
    with pytest.raises(Unauthenticated):
        verify_token(DEVELOPMENT_TOKEN_SECRET, token)


@pytest.mark.parametrize(
    "argv",
    [
        ["token", "--scope", "store"],  # a store scope needs an id
        ["token", "--scope", "galaxy"],
        ["token", "--role", "emperor"],
        ["token", "--ttl-hours", "0"],
    ],
)
def test_token_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().out == ""


def test_token_refuses_a_production_environment_without_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORNUCOPIA_ENV", "production")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["token"])
    assert exit_info.value.code == 2
    assert "CORNUCOPIA_TOKEN_SECRET" in capsys.readouterr().err


# -- certificates for partner endpoints --------------------------------------


def test_partner_cert_prints_the_fingerprint_of_what_it_issued(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["dev-ca", "--out-dir", str(tmp_path / "ca")]) == 0
    capsys.readouterr()
    argv = [
        "partner-cert",
        *("--ca-cert", str(tmp_path / "ca" / "ca.pem")),
        *("--ca-key", str(tmp_path / "ca" / "ca-key.pem")),
        *("--common-name", "bank-a-cards", "--organisation", "Bank A"),
        *("--out-dir", str(tmp_path / "partners"), "--days", "30"),
    ]
    assert cli.main(argv) == 0

    info = certificate_info((tmp_path / "partners" / "bank-a-cards.pem").read_bytes())
    assert capsys.readouterr().out == info.sha256_fingerprint + "\n"
    assert info.subject == "CN=bank-a-cards,O=Bank A"
    assert info.not_after < dt.datetime.now(dt.UTC) + dt.timedelta(days=31)
    # Issued again into the same folder: refused, the first key is kept.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "exists; not overwriting it" in capsys.readouterr().err


def test_partner_cert_needs_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dev-ca", "--out-dir", str(tmp_path)]) == 0
    argv = ["partner-cert", "--common-name", "x", "--out-dir", str(tmp_path / "x")]
    server = [
        "--ca-cert",
        str(tmp_path / "server.pem"),
        "--ca-key",
        str(tmp_path / "server-key.pem"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, *server])
    assert exit_info.value.code == 2
    assert "is not a CA certificate" in capsys.readouterr().err


# -- serve / migrate ----------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["serve", "warehouse"], ["migrate", "warehouse"], ["migrate", "gateway"]]
)
def test_unknown_service_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown service {argv[1]!r}" in err
    assert "members" in err


def test_a_missing_service_module_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "ALL_SERVICES", (*cli.ALL_SERVICES, "ghost"))
    with pytest.raises(cli.UsageError, match=r"services\.ghost\.server cannot be imported"):
        cli.load_server_module("ghost")


def test_redact_url_hides_the_password() -> None:
    assert (
        cli.redact_url("postgresql+asyncpg://app:s3cret@db:5432/members")
        == "postgresql+asyncpg://app:***@db:5432/members"
    )
    assert cli.redact_url("sqlite+aiosqlite:///var/members.db") == (
        "sqlite+aiosqlite:///var/members.db"
    )


# -- where the dead letters are -----------------------------------------------


def test_nats_url_prefers_flag_then_env_then_running_suite(tmp_path: Path) -> None:
    var = tmp_path / "suite"
    var.mkdir()
    env = {"CORNUCOPIA_VAR_DIR": str(var)}
    assert cli.nats_url(None, env) == "nats://127.0.0.1:4222"
    (var / "endpoints.json").write_text(json.dumps({"nats_url": "nats://127.0.0.1:4333"}))
    assert cli.nats_url(None, env) == "nats://127.0.0.1:4333"
    env["NATS_URL"] = "nats://elsewhere:4222"
    assert cli.nats_url(None, env) == "nats://elsewhere:4222"
    assert cli.nats_url("nats://flag:1", env) == "nats://flag:1"


def test_nats_url_in_production_is_never_guessed(tmp_path: Path) -> None:
    env = {
        "CORNUCOPIA_ENV": "production",
        "CORNUCOPIA_TOKEN_SECRET": "a-real-secret",
        "CORNUCOPIA_VAR_DIR": str(tmp_path),
    }
    with pytest.raises(ConfigError, match="NATS_URL"):
        cli.nats_url(None, env)
    assert cli.nats_url(None, {**env, "NATS_URL": "nats://nats:4222"}) == "nats://nats:4222"


def test_deadletters_cannot_connect_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["deadletters", "--nats-url", "nats://127.0.0.1:1", "list"]) == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1" in capsys.readouterr().err


# -- dead letters on a real JetStream -----------------------------------------


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    b = Bus(nats_server.url, client_name="test-deadletters")
    await b.connect()
    await b.ensure_stream(STREAMS["members"])
    await b.ensure_stream(STREAMS["deadletter"])
    try:
        yield b
    finally:
        await b.close()


async def park(
    bus: Bus,
    event_id: str,
    *,
    payload: bytes = b"\x0a\x0aM7Q2K9X4TD",
    error: str = "RuntimeError: channel down",
) -> int:
    """Publish an event to its stream, then park a copy in DEADLETTER exactly
    as ``chassis.inbox`` does; returns the dead letter's sequence."""
    headers = cloudevent_headers(
        event_id=event_id,
        event_type="cornucopia.members.v1.MemberCreated",
        source="cornucopia/members",
        time=dt.datetime.now(dt.UTC),
        subject="M7Q2K9X4TD",
    )
    headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await bus.publish(ORIGINAL_SUBJECT, payload, headers)
    stored = await bus.js.get_last_msg(STREAMS["members"].name, ORIGINAL_SUBJECT)
    parked = header_map(stored)
    parked.update(
        {
            "Nats-Msg-Id": f"{event_id}:{CONSUMER}:dead",
            "Cornucopia-Original-Subject": ORIGINAL_SUBJECT,
            "Cornucopia-Consumer": CONSUMER,
            "Cornucopia-Deliveries": "5",
            "Cornucopia-Error": error,
        }
    )
    ack = await bus.publish(dead_letter_subject(CONSUMER, ORIGINAL_SUBJECT), payload, parked)
    return ack.seq


async def test_list_shows_what_was_parked(bus: Bus) -> None:
    first = await park(bus, "evt-0001", error="ValueError: 模板缺失 for zh-CN")
    second = await park(bus, "evt-0002")

    letters = await deadletters.list_dead_letters(bus.js, limit=10)

    assert [d.sequence for d in letters] == [first, second]
    letter = letters[0]
    assert letter.consumer == CONSUMER
    assert letter.original_subject == ORIGINAL_SUBJECT
    assert letter.subject == f"deadletter.{CONSUMER}.{ORIGINAL_SUBJECT}"
    assert letter.event_id == "evt-0001"
    assert letter.event_type == "cornucopia.members.v1.MemberCreated"
    assert letter.deliveries == 5
    assert letter.error == "ValueError: 模板缺失 for zh-CN"
    assert letter.data == b"\x0a\x0aM7Q2K9X4TD"
    assert letter.time is not None
    assert abs((dt.datetime.now(dt.UTC) - letter.time).total_seconds()) < 60

    line = deadletters.format_line(letter).split("\t")
    assert line[0] == str(first)
    assert line[2:6] == [CONSUMER, ORIGINAL_SUBJECT, "evt-0001", "5"]
    assert line[6] == "ValueError: 模板缺失 for zh-CN"


async def test_list_honours_the_limit_and_skips_deleted_letters(bus: Bus) -> None:
    seqs = [await park(bus, f"evt-{i:04d}") for i in range(5)]
    await bus.js.delete_msg(deadletters.STREAM, seqs[1])

    assert [d.sequence for d in await deadletters.list_dead_letters(bus.js, 2)] == [
        seqs[0],
        seqs[2],
    ]
    assert [d.sequence for d in await deadletters.list_dead_letters(bus.js, 100)] == [
        seqs[0],
        *seqs[2:],
    ]


async def test_list_without_a_deadletter_stream_is_empty(nats_server: NatsServer) -> None:
    b = Bus(nats_server.url, client_name="test-empty")
    await b.connect()
    try:
        assert await deadletters.list_dead_letters(b.js, 10) == []
    finally:
        await b.close()


async def test_replay_republishes_to_the_original_subject_and_removes_the_letter(
    bus: Bus,
) -> None:
    seq = await park(bus, "evt-0042")
    arrivals = await bus.nc.subscribe(ORIGINAL_SUBJECT)
    before = await bus.js.stream_info(STREAMS["members"].name)

    done = await deadletters.replay(bus.js, seq)

    msg = await arrivals.next_msg(timeout=5)
    headers = header_map(msg)
    assert msg.data == b"\x0a\x0aM7Q2K9X4TD"
    assert headers["ce-id"] == "evt-0042"
    assert headers["ce-type"] == "cornucopia.members.v1.MemberCreated"
    assert headers["traceparent"].startswith("00-0af7651916cd43dd")
    assert headers["Nats-Msg-Id"] == f"evt-0042:replay:{seq}"
    assert not [k for k in headers if k.lower().startswith("cornucopia-")]

    # Stored, not dropped as a duplicate of the original event id.
    assert done.duplicate is False
    assert done.stream == STREAMS["members"].name
    assert done.subject == ORIGINAL_SUBJECT
    assert done.event_id == "evt-0042"
    after = await bus.js.stream_info(STREAMS["members"].name)
    assert after.state.messages == before.state.messages + 1
    assert done.stream_sequence == after.state.last_seq

    assert await deadletters.list_dead_letters(bus.js, 10) == []
    with pytest.raises(deadletters.DeadLetterNotFound):
        await deadletters.replay(bus.js, seq)


async def test_replay_leaves_other_letters_alone(bus: Bus) -> None:
    keep = await park(bus, "evt-0001")
    go = await park(bus, "evt-0002")
    await deadletters.replay(bus.js, go)
    assert [d.sequence for d in await deadletters.list_dead_letters(bus.js, 10)] == [keep]


async def test_discard_deletes_without_republishing(bus: Bus) -> None:
    seq = await park(bus, "evt-0007")
    before = await bus.js.stream_info(STREAMS["members"].name)

    letter = await deadletters.discard(bus.js, seq)

    assert letter.event_id == "evt-0007"
    assert await deadletters.list_dead_letters(bus.js, 10) == []
    after = await bus.js.stream_info(STREAMS["members"].name)
    assert after.state.messages == before.state.messages
    with pytest.raises(deadletters.DeadLetterNotFound):
        await deadletters.discard(bus.js, seq)


def test_replay_headers_keep_the_event_and_drop_directives() -> None:
    letter = deadletters.DeadLetter(
        sequence=9,
        time=None,
        subject="deadletter.c.members.v1.x",
        consumer="c",
        original_subject="members.v1.x",
        event_id="evt-9",
        event_type="t",
        deliveries=5,
        error="e",
        headers={
            "ce-id": "evt-9",
            "ce-type": "t",
            "Nats-Msg-Id": "evt-9:c:dead",
            "Nats-Expected-Stream": "MEMBERS",
            "Cornucopia-Error": "e",
            "cornucopia-consumer": "c",
        },
        data=b"",
    )
    assert deadletters.replay_headers(letter) == {
        "ce-id": "evt-9",
        "ce-type": "t",
        "Nats-Msg-Id": "evt-9:replay:9",
    }


def test_deadletters_commands(nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    async def seed() -> list[int]:
        b = Bus(nats_server.url, client_name="test-seed")
        await b.connect()
        try:
            await b.ensure_stream(STREAMS["members"])
            await b.ensure_stream(STREAMS["deadletter"])
            return [await park(b, "evt-0100"), await park(b, "evt-0101")]
        finally:
            await b.close()

    first, second = asyncio.run(seed())
    capsys.readouterr()  # the bus's own log lines while seeding
    url = ["--nats-url", nats_server.url]

    assert cli.main(["deadletters", *url, "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split("\t")[0] == "SEQ"
    assert [line.split("\t")[0] for line in out[1:]] == [str(first), str(second)]
    assert "evt-0100" in out[1]
    assert CONSUMER in out[1]
    assert ORIGINAL_SUBJECT in out[1]

    assert cli.main(["deadletters", *url, "replay", str(first)]) == 0
    assert f"replayed evt-0100 to {ORIGINAL_SUBJECT}" in capsys.readouterr().out

    assert cli.main(["deadletters", *url, "discard", str(second)]) == 0
    assert "discarded evt-0101" in capsys.readouterr().out

    assert cli.main(["deadletters", *url, "replay", str(first)]) == 1
    assert f"no dead letter with sequence {first}" in capsys.readouterr().err

    assert cli.main(["deadletters", *url, "list"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no dead letters" in captured.err
