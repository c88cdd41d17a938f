"""The pieces of ``cornucopia up``: ports, prefixed output, each child's
environment, readiness checks and stopping children. Nothing here starts the
suite itself."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chassis import supervisor
from chassis.auth import Role, ScopeLevel, verify_token
from chassis.config import (
    DEFAULT_GRPC_PORTS,
    DEFAULT_HTTP_PORT,
    GRPC_SERVICES,
    PartnerGrpc,
    Settings,
    TlsFiles,
)
from chassis.mtls import certificate_info
from chassis.natsserver import free_port

# -- ports --------------------------------------------------------------------


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something already listens on (like the system NATS on 4222)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_port_in_use_sees_a_listener(listening: int) -> None:
    assert supervisor.port_in_use(listening)
    assert not supervisor.port_in_use(free_port())


def test_a_taken_preferred_port_yields_another_free_port_and_says_so(listening: int) -> None:
    wanted = free_port()
    plan = supervisor.plan_ports({"nats": listening, "members": wanted})

    assert plan.ports["members"] == wanted
    chosen = plan.ports["nats"]
    assert chosen != listening
    assert not supervisor.port_in_use(chosen)
    assert plan.notes == [f"nats: port {listening} is in use, using {chosen} instead"]


def test_free_preferred_ports_are_kept_silently() -> None:
    plan = supervisor.plan_ports({"a": 50051, "b": 50052}, in_use=lambda _port: False)
    assert plan.ports == {"a": 50051, "b": 50052}
    assert plan.notes == []


def test_plan_never_hands_out_a_port_twice() -> None:
    # The kernel offers a port another component prefers, then one already given.
    offers = iter([50052, 40001, 40001, 40002])
    plan = supervisor.plan_ports(
        {"a": 50051, "b": 50052, "c": 50053},
        in_use=lambda port: port in (50051, 50053),
        pick_free=lambda: next(offers),
    )
    assert plan.ports == {"a": 40001, "b": 50052, "c": 40002}
    assert len(set(plan.ports.values())) == 3
    assert len(plan.notes) == 2


def test_preferred_ports_are_the_configured_defaults() -> None:
    ports = supervisor.preferred_ports(nats=True)
    assert ports["nats"] == 4222
    assert ports["gateway"] == DEFAULT_HTTP_PORT
    for name in GRPC_SERVICES:
        assert ports[name] == DEFAULT_GRPC_PORTS[name]
    assert "nats" not in supervisor.preferred_ports(nats=False)
    assert not any(name.endswith("-partner") for name in ports)


def test_a_partner_endpoint_gets_a_port_of_its_own() -> None:
    ports = supervisor.preferred_ports(nats=True, partners=["cards"])
    assert ports["cards-partner"] == DEFAULT_GRPC_PORTS["cards"] + 1000
    assert len(set(ports.values())) == len(ports)


def test_partner_services_are_those_whose_definitions_declare_an_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def import_module(name: str) -> SimpleNamespace:
        if name == "services.notify.server":
            raise ImportError("broken while someone edits it")
        endpoint = (lambda _ctx: None) if name == "services.cards.server" else None
        return SimpleNamespace(definition=SimpleNamespace(partner_endpoint=endpoint))

    monkeypatch.setattr(supervisor.importlib, "import_module", import_module)
    assert supervisor.partner_services() == ["cards"]


# -- output -------------------------------------------------------------------


def test_lines_are_prefixed_with_the_padded_service_name() -> None:
    assert supervisor.prefix_line("members", "serving port=50051") == (
        "members   | serving port=50051"
    )
    bars = {supervisor.prefix_line(name, "x").index("|") for name in (*supervisor.CHILDREN, "up")}
    assert len(bars) == 1, "every prefix is padded to the same width"


def test_colour_wraps_only_the_prefix() -> None:
    coloured = supervisor.prefix_line("cards", "hello", colour=True)
    assert coloured.startswith("\033[")
    assert coloured.endswith("\033[0m hello")
    assert "cards     |" in coloured
    others = {supervisor.colour_for(name) for name in supervisor.CHILDREN}
    assert len(others) == len(supervisor.CHILDREN)


def test_colour_only_on_a_terminal_and_not_with_no_color() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert supervisor.use_colour(Tty(), {})
    assert not supervisor.use_colour(Tty(), {"NO_COLOR": "1"})
    assert not supervisor.use_colour(io.StringIO(), {})


# -- the environment of each child --------------------------------------------

PORTS = {
    "members": 50051,
    "cards": 50052,
    "loyalty": 41000,
    "campaigns": 50054,
    "notify": 50055,
    "gateway": 8081,
}


def _env(name: str, base: dict[str, str] | None = None) -> dict[str, str]:
    return supervisor.child_env(
        name,
        PORTS,
        nats_url="nats://127.0.0.1:42222",
        var_dir=Path("var"),
        base=base if base is not None else {"PATH": "/usr/bin"},
    )


@pytest.mark.parametrize("name", GRPC_SERVICES)
def test_a_grpc_service_gets_its_listen_address_and_every_peer(name: str) -> None:
    env = _env(name)
    assert env["GRPC_LISTEN"] == f"127.0.0.1:{PORTS[name]}"
    assert "HTTP_LISTEN" not in env
    assert env["NATS_URL"] == "nats://127.0.0.1:42222"
    assert env["CORNUCOPIA_VAR_DIR"] == "var"
    assert env["LOG_FORMAT"] == "console"
    assert env["PATH"] == "/usr/bin"
    for peer in GRPC_SERVICES:
        assert env[f"{peer.upper()}_GRPC_ADDR"] == f"127.0.0.1:{PORTS[peer]}"

    settings = Settings.from_env(name, env)
    assert settings.grpc_listen == f"127.0.0.1:{PORTS[name]}"
    assert settings.nats_url == "nats://127.0.0.1:42222"
    assert settings.var_dir == Path("var")
    assert settings.log_json is False
    assert settings.peer("loyalty") == "127.0.0.1:41000"
    assert settings.database_url == f"sqlite+aiosqlite:///var/{name}.db"


def test_the_gateway_gets_its_http_address_and_every_grpc_service() -> None:
    env = _env("gateway")
    assert env["HTTP_LISTEN"] == "127.0.0.1:8081"
    assert "GRPC_LISTEN" not in env
    settings = Settings.from_env("gateway", env)
    assert settings.http_listen == "127.0.0.1:8081"
    assert {name: settings.peer(name) for name in GRPC_SERVICES} == {
        name: f"127.0.0.1:{PORTS[name]}" for name in GRPC_SERVICES
    }


def test_the_users_environment_passes_through_but_addresses_are_ours() -> None:
    base = {
        "MEMBERS_DATABASE_URL": "postgresql://app@db/members",
        "CORNUCOPIA_TOKEN_SECRET": "s" * 40,
        "LOG_FORMAT": "json",
        "GRPC_LISTEN": "0.0.0.0:9999",
        "HTTP_LISTEN": "0.0.0.0:9998",
        "CARDS_GRPC_ADDR": "elsewhere:1",
        "NATS_URL": "nats://stale:1",
    }
    members = _env("members", base)
    assert members["MEMBERS_DATABASE_URL"] == "postgresql://app@db/members"
    assert members["CORNUCOPIA_TOKEN_SECRET"] == "s" * 40
    assert members["LOG_FORMAT"] == "json"
    assert members["GRPC_LISTEN"] == "127.0.0.1:50051"
    assert "HTTP_LISTEN" not in members
    assert members["CARDS_GRPC_ADDR"] == "127.0.0.1:50052"
    assert members["NATS_URL"] == "nats://127.0.0.1:42222"
    assert "GRPC_LISTEN" not in _env("gateway", base)
    assert base["GRPC_LISTEN"] == "0.0.0.0:9999", "the caller's mapping is not changed"


def test_a_service_with_a_partner_port_serves_it_with_the_development_certificates(
    tmp_path: Path,
) -> None:
    tls = supervisor.dev_partner_tls(tmp_path)
    ports = {**PORTS, "cards-partner": 51052}

    def env(name: str) -> dict[str, str]:
        return supervisor.child_env(
            name, ports, nats_url="nats://x:1", var_dir=tmp_path, base={}, partner_tls=tls
        )

    assert Settings.from_env("cards", env("cards")).partner_grpc == PartnerGrpc(
        "127.0.0.1:51052",
        TlsFiles("CARDS_PARTNER", tls.server.cert, tls.server.key, tls.ca.cert),
    )
    assert Settings.from_env("members", env("members")).partner_grpc is None
    assert not any("PARTNER" in name for name in env("gateway"))


def test_development_partner_certificates_are_made_once_and_kept(tmp_path: Path) -> None:
    tls = supervisor.dev_partner_tls(tmp_path)
    assert tls == supervisor.DevPartnerTls.under(tmp_path)
    assert tls.ca.cert.parent == tmp_path / "partner-tls"
    demo = certificate_info(tls.demo_client.cert.read_bytes())
    assert demo.subject == "CN=demo-bank,O=Demo Bank"

    again = supervisor.dev_partner_tls(tmp_path)
    assert certificate_info(again.demo_client.cert.read_bytes()) == demo, "kept"

    tls.server.key.unlink()
    remade = supervisor.dev_partner_tls(tmp_path)
    assert remade.usable()
    assert certificate_info(remade.demo_client.cert.read_bytes()) != demo, "a new set"


def test_var_dir_comes_from_the_environment() -> None:
    assert supervisor.default_var_dir({}) == Path("var")
    assert supervisor.default_var_dir({"CORNUCOPIA_VAR_DIR": "/srv/c"}) == Path("/srv/c")


# -- what it prints when ready ------------------------------------------------


def test_banner_names_every_endpoint_and_gives_working_examples() -> None:
    info = supervisor.endpoints(PORTS, "nats://127.0.0.1:42222")
    assert info["grpc"]["loyalty"] == "127.0.0.1:41000"
    assert info["gateway"] == "http://127.0.0.1:8081"
    assert info["docs"] == "http://127.0.0.1:8081/docs"
    json.dumps(info)

    text = supervisor.banner(info, "TOKEN123", nats_note="started here", var_dir=Path("var"))
    for name in GRPC_SERVICES:
        assert f"127.0.0.1:{PORTS[name]}" in text
    assert "http://127.0.0.1:8081/docs" in text
    assert "nats://127.0.0.1:42222" in text
    assert "export TOKEN=TOKEN123" in text
    assert "curl --protocol grpc --http2-prior-knowledge" in text
    assert "http://127.0.0.1:50051/cornucopia.members.v1.MembersService/CreateMember" in text
    assert "POST http://127.0.0.1:8081/v1/members" in text
    assert "Idempotency-Key: " in text
    assert 'Bearer $TOKEN"' in text
    # The --data bodies are valid JSON.
    bodies = [
        line.split("'")[1] for line in text.splitlines() if "--data '" in line or "-d '" in line
    ]
    assert len(bodies) == 2
    for body in bodies:
        json.loads(body)
    assert "mtls" not in text, "no partner endpoint, no word of one"


def test_banner_and_endpoints_name_the_partner_endpoint_and_its_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tls = supervisor.dev_partner_tls(Path("var").resolve())
    info = supervisor.endpoints({**PORTS, "cards-partner": 51052}, "nats://x:1", tls)
    assert info["partner_grpc"] == {"cards": "127.0.0.1:51052"}
    assert info["partner_tls"] == {
        "ca_cert": str(tls.ca.cert),
        "demo_client_cert": str(tls.demo_client.cert),
        "demo_client_key": str(tls.demo_client.key),
    }
    json.dumps(info)

    text = supervisor.banner(info, "TOKEN123", nats_note="started here", var_dir=Path("var"))
    assert "cards      mtls  127.0.0.1:51052  (partners)" in text
    assert "--cert var/partner-tls/demo-bank.pem" in text
    assert "--key var/partner-tls/demo-bank-key.pem" in text
    assert "https://127.0.0.1:51052" in text


# -- readiness checks ---------------------------------------------------------


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[int, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(None)


async def test_grpc_readiness_follows_the_health_service(
    health_server: tuple[int, health.aio.HealthServicer],
) -> None:
    port, servicer = health_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not await supervisor.grpc_serving(channel)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert await supervisor.grpc_serving(channel)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as nobody:
        assert not await supervisor.grpc_serving(nobody, timeout=0.3)


@pytest.fixture
def readyz() -> Iterator[tuple[str, list[int]]]:
    status = [503]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/readyz", status
    finally:
        server.shutdown()
        server.server_close()


async def test_http_readiness_needs_a_200(readyz: tuple[str, list[int]]) -> None:
    url, status = readyz
    assert not await supervisor.http_ok(url)
    status[0] = 200
    assert await supervisor.http_ok(url)
    assert not await supervisor.http_ok(f"http://127.0.0.1:{free_port()}/readyz", timeout=0.3)


# -- children: relayed output, unexpected exits, stopping ---------------------


async def _child(sup: supervisor.Supervisor, name: str, code: str) -> supervisor.Child:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    child = supervisor.Child(name, 0, process)
    child.reader = asyncio.create_task(sup._relay(child))
    sup.children[name] = child
    return child


def _supervisor(tmp_path: Path) -> tuple[supervisor.Supervisor, io.StringIO]:
    out = io.StringIO()
    sup = supervisor.Supervisor(
        tmp_path / "var", start_nats=False, stop_grace=0.5, environ={}, out=out
    )
    return sup, out


async def test_a_child_that_exits_early_is_reported_with_its_last_lines(tmp_path: Path) -> None:
    sup, out = _supervisor(tmp_path)
    code = "import sys; print('migrating'); print('boom', file=sys.stderr); sys.exit(3)"
    await _child(sup, "cards", code)

    await asyncio.wait_for(sup.stop_requested.wait(), 10)

    assert sup.failure == "cards exited with code 3"
    lines = out.getvalue().splitlines()
    assert "cards     | migrating" in lines
    assert "cards     | boom" in lines
    assert "up        | cards exited unexpectedly with code 3; stopping" in lines
    assert "cards     |     boom" in lines, "the tail is printed again"
    await sup.stop_all()


async def test_stop_terminates_children_and_kills_those_that_linger(tmp_path: Path) -> None:
    sup, out = _supervisor(tmp_path)
    polite = await _child(sup, "members", "import time; print('up', flush=True); time.sleep(60)")
    stubborn = await _child(
        sup,
        "notify",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('up', flush=True); time.sleep(60)",
    )
    # Both are running (and the stubborn one ignores SIGTERM) before we stop.
    for _ in range(200):
        if out.getvalue().count("| up") == 2:
            break
        await asyncio.sleep(0.05)

    await asyncio.wait_for(sup.stop_all(), 10)

    assert polite.process.returncode == -15
    assert stubborn.process.returncode == -9
    assert sup.failure is None, "exits during a stop are not failures"
    text = out.getvalue()
    assert "notify did not stop in time; killing it" in text
    assert "members did not stop" not in text


def test_the_banner_token_is_a_twelve_hour_hq_admin() -> None:
    secret = Settings.from_env("gateway", {}).token_secret
    principal = verify_token(secret, supervisor.development_token(secret))
    assert principal.subject == "dev-admin"
    assert principal.roles == frozenset({Role.HQ_ADMIN})
    assert principal.scope.level == ScopeLevel.HQ
    assert principal.claims["exp"] - principal.claims["iat"] == 12 * 3600
