"""``cornucopia up`` (what ``make up`` runs): the whole suite on a laptop.

No Docker, no root. Starts a NATS server with JetStream from the wheel (data
under ``var/nats``) unless ``NATS_URL`` names one, the five gRPC services and
the gateway as child processes on the usual ports (or free ones when those
are taken, saying so), prefixes their log lines with the service name, waits
until every health check says SERVING, then prints the endpoints, a
development token and commands to try. Ctrl-C or SIGTERM stops everything:
SIGTERM to each child, SIGKILL to those still running after a grace period,
then the NATS server. The data stays in ``var/`` for the next run.

A service whose definition declares a partner endpoint (mutual TLS, see
``chassis.mtls``) serves it on a port of its own too, with development
certificates made on the first run in ``var/partner-tls/``: ``ca.pem`` and
``ca-key.pem`` (the development partner CA), ``server.pem`` and
``server-key.pem`` (for localhost and 127.0.0.1) and ``demo-bank.pem`` and
``demo-bank-key.pem`` (the demo partner's client certificate). Their paths
are in ``var/endpoints.json`` under ``partner_tls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chassis import mtls
from chassis.auth import Role, Scope, ScopeLevel, mint_token
from chassis.config import (
    DEFAULT_GRPC_PORTS,
    DEFAULT_HTTP_PORT,
    GRPC_SERVICES,
    ConfigError,
    Settings,
)
from chassis.mtls import CertificateFiles
from chassis.natsserver import NatsServer, free_port, port_is_free
from chassis.wakeup import set_within

HOST = "127.0.0.1"
DEFAULT_NATS_PORT = 4222
GATEWAY = "gateway"
NATS = "nats"
CHILDREN = (*GRPC_SERVICES, GATEWAY)
PREFIX_WIDTH = max(len(name) for name in (*CHILDREN, "up"))
TAIL_LINES = 40
READY_TIMEOUT = 90.0
STOP_GRACE = 15.0
TOKEN_TTL_HOURS = 12
# A log line longer than this is dropped (with a note) rather than buffered.
LINE_LIMIT = 1024 * 1024
# A partner endpoint's preferred port: the service's own plus this (cards: 51052).
PARTNER_PORT_OFFSET = 1000
PARTNER_TLS_DIR = "partner-tls"
DEMO_PARTNER = "demo-bank"
# Development certificates this close to expiry are made again.
RENEW_BEFORE = dt.timedelta(days=30)

_COLOURS = ("36", "32", "33", "35", "34", "96", "92")
_RESET = "\033[0m"


# -- pure pieces (tested on their own) ----------------------------------------


def default_var_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("CORNUCOPIA_VAR_DIR") or "var")


def port_in_use(port: int, host: str = HOST) -> bool:
    """Something listens there (or the port cannot be bound)."""
    if not port_is_free(port, host):
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@dataclass
class PortPlan:
    ports: dict[str, int] = field(default_factory=dict)
    # One sentence per component that could not have its preferred port.
    notes: list[str] = field(default_factory=list)


def plan_ports(
    preferred: Mapping[str, int],
    *,
    in_use: Callable[[int], bool] = port_in_use,
    pick_free: Callable[[], int] = free_port,
) -> PortPlan:
    """The preferred port for each component if nothing listens there, else
    one the kernel hands out; never the same port twice."""
    plan = PortPlan()
    taken: set[int] = set()
    for name, port in preferred.items():
        chosen = port
        if port in taken or in_use(port):
            chosen = pick_free()
            while chosen in taken or chosen in preferred.values():
                chosen = pick_free()
            plan.notes.append(f"{name}: port {port} is in use, using {chosen} instead")
        taken.add(chosen)
        plan.ports[name] = chosen
    return plan


def partner_key(name: str) -> str:
    """A service's partner endpoint, in the port plan."""
    return f"{name}-partner"


def preferred_ports(nats: bool, partners: Collection[str] = ()) -> dict[str, int]:
    ports: dict[str, int] = {NATS: DEFAULT_NATS_PORT} if nats else {}
    ports.update({name: DEFAULT_GRPC_PORTS[name] for name in GRPC_SERVICES})
    ports.update(
        {partner_key(name): DEFAULT_GRPC_PORTS[name] + PARTNER_PORT_OFFSET for name in partners}
    )
    ports[GATEWAY] = DEFAULT_HTTP_PORT
    return ports


def partner_services() -> list[str]:
    """The services whose definitions declare a partner endpoint. One whose
    module does not import declares none here: its child will say why."""
    found = []
    for name in GRPC_SERVICES:
        try:
            module = importlib.import_module(f"services.{name}.server")
        except Exception:  # noqa: S112 - the child prints the traceback, prefixed
            continue
        if module.definition.partner_endpoint is not None:
            found.append(name)
    return found


@dataclass(frozen=True)
class DevPartnerTls:
    """The development certificates of partner endpoints, in one folder."""

    ca: CertificateFiles
    server: CertificateFiles
    demo_client: CertificateFiles

    @classmethod
    def under(cls, var_dir: Path) -> DevPartnerTls:
        folder = var_dir / PARTNER_TLS_DIR
        return cls(
            *(CertificateFiles.named(folder, name) for name in ("ca", "server", DEMO_PARTNER))
        )

    def usable(self) -> bool:
        """Every file is there and no certificate is about to expire."""
        soon = dt.datetime.now(dt.UTC) + RENEW_BEFORE
        for files in (self.ca, self.server, self.demo_client):
            try:
                expires = mtls.certificate_info(files.cert.read_bytes()).not_after
            except (OSError, ValueError):
                return False
            if expires < soon or not files.key.exists():
                return False
        return True


def dev_partner_tls(var_dir: Path) -> DevPartnerTls:
    """The certificates of the last run if they are all usable; else a new
    set (a new CA, and a server and a demo client certificate it signs)."""
    tls = DevPartnerTls.under(var_dir)
    if tls.usable():
        return tls
    for files in (tls.ca, tls.server, tls.demo_client):
        files.cert.unlink(missing_ok=True)
        files.key.unlink(missing_ok=True)
    folder = tls.ca.cert.parent
    ca = mtls.create_ca(folder, "Cornucopia development partner CA")
    return DevPartnerTls(
        ca,
        mtls.issue_server_certificate(ca, folder),
        mtls.issue_client_certificate(ca, folder, DEMO_PARTNER, organisation="Demo Bank"),
    )


def child_env(
    name: str,
    ports: Mapping[str, int],
    *,
    nats_url: str,
    var_dir: Path,
    base: Mapping[str, str],
    partner_tls: DevPartnerTls | None = None,
) -> dict[str, str]:
    """The environment of one child: the user's, plus where everything is.
    The addresses always win (a stray GRPC_LISTEN in the shell must not put
    five services on one port); LOG_FORMAT only defaults to console. A
    service with a partner port in ``ports`` serves it with ``partner_tls``."""
    env = dict(base)
    env.setdefault("LOG_FORMAT", "console")
    env["PYTHONUNBUFFERED"] = "1"
    env["CORNUCOPIA_VAR_DIR"] = str(var_dir)
    env["NATS_URL"] = nats_url
    for peer in GRPC_SERVICES:
        env[f"{peer.upper()}_GRPC_ADDR"] = f"{HOST}:{ports[peer]}"
    env.pop("GRPC_LISTEN", None)
    env.pop("HTTP_LISTEN", None)
    if name == GATEWAY:
        env["HTTP_LISTEN"] = f"{HOST}:{ports[GATEWAY]}"
    else:
        env["GRPC_LISTEN"] = f"{HOST}:{ports[name]}"
    if partner_tls is not None and partner_key(name) in ports:
        prefix = f"{name.upper()}_PARTNER"
        env[f"{prefix}_GRPC_LISTEN"] = f"{HOST}:{ports[partner_key(name)]}"
        env[f"{prefix}_TLS_CERT"] = str(partner_tls.server.cert)
        env[f"{prefix}_TLS_KEY"] = str(partner_tls.server.key)
        env[f"{prefix}_CLIENT_CA"] = str(partner_tls.ca.cert)
    return env


def colour_for(name: str) -> str:
    order = (*CHILDREN, "up")
    index = order.index(name) if name in order else sum(map(ord, name))
    return _COLOURS[index % len(_COLOURS)]


def prefix_line(name: str, line: str, *, colour: bool = False, width: int = PREFIX_WIDTH) -> str:
    """``members   | the line`` (the name padded so the bars line up)."""
    label = f"{name:<{width}} |"
    if colour:
        label = f"\033[{colour_for(name)}m{label}{_RESET}"
    return f"{label} {line}"


def use_colour(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def endpoints(
    ports: Mapping[str, int], nats_url: str, partner_tls: DevPartnerTls | None = None
) -> dict[str, Any]:
    gateway = f"http://{HOST}:{ports[GATEWAY]}"
    info: dict[str, Any] = {
        "nats_url": nats_url,
        "grpc": {name: f"{HOST}:{ports[name]}" for name in GRPC_SERVICES},
        "gateway": gateway,
        "docs": f"{gateway}/docs",
    }
    if partner_tls is not None:
        info["partner_grpc"] = {
            name: f"{HOST}:{ports[partner_key(name)]}"
            for name in GRPC_SERVICES
            if partner_key(name) in ports
        }
        info["partner_tls"] = {
            "ca_cert": str(partner_tls.ca.cert),
            "demo_client_cert": str(partner_tls.demo_client.cert),
            "demo_client_key": str(partner_tls.demo_client.key),
        }
    return info


def development_token(secret: str) -> str:
    """What the banner prints: an HQ admin for the next twelve hours."""
    return mint_token(
        secret,
        "dev-admin",
        [Role.HQ_ADMIN],
        Scope(ScopeLevel.HQ),
        ttl_seconds=TOKEN_TTL_HOURS * 3600,
    )


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def buf_command() -> str:
    candidate = Path(sys.executable).parent / "buf"
    return _display_path(candidate) if candidate.exists() else "buf"


def banner(info: Mapping[str, Any], token: str, *, nats_note: str, var_dir: Path) -> str:
    grpc_addrs: Mapping[str, str] = info["grpc"]
    partner_addrs: Mapping[str, str] = info.get("partner_grpc", {})
    width = PREFIX_WIDTH
    lines = ["", "Cornucopia is up.", ""]
    for name, addr in grpc_addrs.items():
        lines.append(f"  {name:<{width}}  grpc  {addr}")
        if name in partner_addrs:
            lines.append(f"  {name:<{width}}  mtls  {partner_addrs[name]}  (partners)")
    lines.append(f"  {GATEWAY:<{width}}  http  {info['gateway']}")
    lines.append(f"  {'docs':<{width}}  http  {info['docs']}")
    lines.append(f"  {NATS:<{width}}  nats  {info['nats_url']}  ({nats_note})")
    members = f"http://{grpc_addrs['members']}"
    request = json.dumps(
        {
            "request_id": "enroll-0001",
            "member": {
                "home_store_id": "S001",
                "given_name": "Li",
                "family_name": "Na",
                "mobile": "138 0013 8000",
                "preferred_language": "en",
            },
        }
    )
    body = json.dumps(
        {
            "home_store_id": "S001",
            "given_name": "Ana",
            "mobile": "+34 612 345 678",
            "preferred_language": "es",
        }
    )
    lines += [
        "",
        f"Development token (hq_admin, scope hq, valid {TOKEN_TTL_HOURS} h):",
        "",
        f"  export TOKEN={token}",
        "",
        "Enroll a member over gRPC (reflection is on, no proto files needed):",
        "",
        f"  {buf_command()} curl --protocol grpc --http2-prior-knowledge \\",
        '    -H "authorization: Bearer $TOKEN" \\',
        f"    --data '{request}' \\",
        f"    {members}/cornucopia.members.v1.MembersService/CreateMember",
        "",
        "or through the gateway, as a store terminal would:",
        "",
        f"  curl -s -X POST {info['gateway']}/v1/members \\",
        f'    -H "authorization: Bearer $TOKEN" -H "Idempotency-Key: {uuid.uuid4()}" \\',
        "    -H 'content-type: application/json' \\",
        f"    -d '{body}'",
        "",
        *_partner_example(info),
        f"Endpoints are in {_display_path(var_dir / 'endpoints.json')}. Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def _partner_example(info: Mapping[str, Any]) -> list[str]:
    partner_addrs: Mapping[str, str] = info.get("partner_grpc", {})
    if not partner_addrs:
        return []
    name, addr = next(iter(partner_addrs.items()))
    tls: Mapping[str, str] = info["partner_tls"]
    return [
        "Partner endpoints take a client certificate (mutual TLS) instead of a token,",
        f"e.g. the demo bank's, to list what {name} offers partners:",
        "",
        f"  {buf_command()} curl --protocol grpc --list-methods \\",
        f"    --cacert {_display_path(Path(tls['ca_cert']))} \\",
        f"    --cert {_display_path(Path(tls['demo_client_cert']))} \\",
        f"    --key {_display_path(Path(tls['demo_client_key']))} \\",
        f"    https://{addr}",
        "",
    ]


# -- the running suite --------------------------------------------------------


@dataclass
class Child:
    name: str
    port: int
    process: asyncio.subprocess.Process
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    reader: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.process.returncode is None


class Supervisor:
    def __init__(
        self,
        var_dir: Path,
        *,
        start_nats: bool = True,
        ready_timeout: float = READY_TIMEOUT,
        stop_grace: float = STOP_GRACE,
        environ: Mapping[str, str] | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.var_dir = var_dir
        self.environ = dict(os.environ if environ is None else environ)
        self.start_nats = start_nats and not self.environ.get("NATS_URL")
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.out = out or sys.stdout
        self.colour = use_colour(self.out, self.environ)
        self.nats: NatsServer | None = None
        self.nats_url = self.environ.get("NATS_URL") or "nats://127.0.0.1:4222"
        self.children: dict[str, Child] = {}
        self.stop_requested = asyncio.Event()
        self.kill_now = asyncio.Event()
        self.stopping = False
        self.failure: str | None = None

    # output

    def say(self, text: str, name: str = "up") -> None:
        for line in text.splitlines() or [""]:
            self.out.write(prefix_line(name, line, colour=self.colour) + "\n")
        self.out.flush()

    def print_raw(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # life cycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            return await self._run()
        finally:
            await self.stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        if self.stop_requested.is_set():
            self.kill_now.set()
            return
        self.stop_requested.set()

    async def _run(self) -> int:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        var_dir = self.var_dir.resolve()
        base_env = {**self.environ, "CORNUCOPIA_VAR_DIR": str(var_dir)}
        try:
            secret = Settings.from_env(GATEWAY, base_env).token_secret
        except ConfigError as exc:
            self.say(f"cannot start: {exc}")
            return 2

        partners = await asyncio.to_thread(partner_services)
        partner_tls = None
        if partners:
            partner_tls = await asyncio.to_thread(dev_partner_tls, var_dir)
            self.say(
                f"partner endpoints ({', '.join(partners)}) use the development certificates "
                f"in {_display_path(partner_tls.ca.cert.parent)}"
            )
        plan = plan_ports(preferred_ports(self.start_nats, partners))
        for note in plan.notes:
            self.say(note)

        if self.start_nats:
            try:
                nats_note = await self._start_nats(plan.ports[NATS])
            except (OSError, RuntimeError) as exc:
                self.say(f"cannot start nats-server: {exc}")
                self.failure = "nats"
                return 1
            if self.stop_requested.is_set():
                return 0
        else:
            source = "NATS_URL" if self.environ.get("NATS_URL") else "default, --no-nats"
            nats_note = f"not started here ({source})"
            self.say(f"using NATS at {self.nats_url} ({source})")

        for name in CHILDREN:
            env = child_env(
                name,
                plan.ports,
                nats_url=self.nats_url,
                var_dir=var_dir,
                base=base_env,
                partner_tls=partner_tls,
            )
            await self._spawn(name, plan.ports[name], env)

        if not await self._wait_ready():
            return 1 if self.failure else 0

        info = endpoints(plan.ports, self.nats_url, partner_tls)
        self._write_endpoints(info)
        token = development_token(secret)
        self.print_raw(banner(info, token, nats_note=nats_note, var_dir=self.var_dir))

        await self.stop_requested.wait()
        if self.failure:
            return 1
        return 0

    async def _start_nats(self, port: int) -> str:
        store = self.var_dir / "nats"
        self.nats = NatsServer(store, port=port, host=HOST)
        await asyncio.to_thread(self.nats.start)
        self.nats_url = self.nats.url
        where = "the usual port" if port == DEFAULT_NATS_PORT else "a free port"
        self.say(
            f"nats-server with JetStream on {self.nats_url} ({where}), "
            f"data in {_display_path(store)}, log in {_display_path(self.nats.log_path)}"
        )
        return f"started here, data in {_display_path(store)}"

    async def _spawn(self, name: str, port: int, env: Mapping[str, str]) -> None:
        module = f"services.{name}"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            limit=LINE_LIMIT,
            # Its own process group: Ctrl-C reaches only the supervisor,
            # which stops the children in order.
            start_new_session=True,
        )
        child = Child(name, port, process)
        child.reader = asyncio.create_task(self._relay(child), name=f"relay-{name}")
        self.children[name] = child
        kind = "http" if name == GATEWAY else "grpc"
        self.say(f"started {name} (pid {process.pid}, {kind} {HOST}:{port})")

    async def _relay(self, child: Child) -> None:
        """Re-print the child's lines; when its output ends, note its exit."""
        stream = child.process.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                line = f"[a line longer than {LINE_LIMIT} bytes was dropped]"
            else:
                if not raw:
                    break
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            child.tail.append(line)
            self.say(line, child.name)
        code = await child.process.wait()
        if not self.stopping and self.failure is None:
            self.failure = f"{child.name} exited with code {code}"
            self.say(f"{child.name} exited unexpectedly with code {code}; stopping")
            self._print_tail(child)
            self.stop_requested.set()

    def _print_tail(self, child: Child) -> None:
        if not child.tail:
            self.say(f"{child.name} printed nothing")
            return
        self.say(f"last lines of {child.name}:")
        for line in child.tail:
            self.say(f"    {line}", child.name)

    async def _wait_ready(self) -> bool:
        self.say(f"waiting for the health checks (up to {self.ready_timeout:.0f} s)")
        started = time.monotonic()
        deadline = started + self.ready_timeout
        pending = set(CHILDREN)
        channels = {
            name: grpc.aio.insecure_channel(f"{HOST}:{self.children[name].port}")
            for name in GRPC_SERVICES
        }
        try:
            while pending:
                if self.stop_requested.is_set():
                    return False
                checks = {name: self._check(name, channels) for name in sorted(pending)}
                results = await asyncio.gather(*checks.values())
                for name, ok in zip(checks, results, strict=True):
                    if ok:
                        pending.discard(name)
                        self.say(f"{name} is ready ({time.monotonic() - started:.1f} s)")
                if not pending:
                    return True
                if time.monotonic() >= deadline:
                    self.failure = "timeout"
                    self.say(
                        f"not ready after {self.ready_timeout:.0f} s: {', '.join(sorted(pending))}"
                        f" (services turn SERVING once connected to NATS at {self.nats_url})"
                    )
                    for name in sorted(pending):
                        self._print_tail(self.children[name])
                    return False
                await set_within(self.stop_requested, 0.5)
            return True
        finally:
            for channel in channels.values():
                await channel.close(grace=None)

    async def _check(self, name: str, channels: Mapping[str, grpc.aio.Channel]) -> bool:
        if not self.children[name].running:
            return False
        if name == GATEWAY:
            return await http_ok(f"http://{HOST}:{self.children[GATEWAY].port}/readyz")
        return await grpc_serving(channels[name])

    def _write_endpoints(self, info: Mapping[str, Any]) -> None:
        path = self.var_dir / "endpoints.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)

    async def stop_all(self) -> None:
        """SIGTERM to every child, SIGKILL to those still running after the
        grace period (or at a second Ctrl-C), then stop NATS."""
        if self.stopping:
            return
        self.stopping = True
        running = [c for c in self.children.values() if c.running]
        if running:
            self.say(f"stopping {', '.join(c.name for c in running)}")
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)

        async def all_exited() -> None:
            await asyncio.gather(*(c.process.wait() for c in running))

        async def kill_requested() -> None:
            await self.kill_now.wait()

        waiter = asyncio.create_task(all_exited())
        killer = asyncio.create_task(kill_requested())
        await asyncio.wait({waiter, killer}, timeout=self.stop_grace)
        killer.cancel()
        for child in running:
            if child.running:
                self.say(f"{child.name} did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
        await waiter
        readers = [c.reader for c in self.children.values() if c.reader is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), 5)
        for child in self.children.values():
            if child.reader is not None and not child.reader.done():
                child.reader.cancel()
        with contextlib.suppress(FileNotFoundError):
            (self.var_dir / "endpoints.json").unlink()
        if self.nats is not None:
            self.say("stopping nats-server")
            await asyncio.to_thread(self.nats.stop)
            self.nats = None
        self.say("stopped; the data stays in " + _display_path(self.var_dir))


async def grpc_serving(channel: grpc.aio.Channel, timeout: float = 1.0) -> bool:
    """The standard gRPC health check (service "", the whole server) says SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def http_ok(url: str, timeout: float = 1.0) -> bool:
    """A GET of ``url`` answers 200."""
    return await asyncio.to_thread(_http_ok, url, timeout)


def _http_ok(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own http URL
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def run(
    var_dir: Path | None = None, *, start_nats: bool = True, ready_timeout: float = READY_TIMEOUT
) -> int:
    """Entry point of ``cornucopia up``; returns the exit code."""
    supervisor = Supervisor(
        var_dir or default_var_dir(), start_nats=start_nats, ready_timeout=ready_timeout
    )
    return asyncio.run(supervisor.run())
