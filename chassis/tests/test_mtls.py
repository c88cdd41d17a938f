"""Mutual TLS on a real grpc.aio server: only a client certificate signed by
the partner CA gets through the handshake, only one the resolver knows gets
to a handler (unary or streaming), and that handler runs as the principal
the resolver named. Also the settings and the runtime that serve a
service's partner endpoint, and the certificates made for trying it."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chassis import mtls
from chassis.auth import Principal, Role, Scope, ScopeLevel, current_principal
from chassis.config import ConfigError, PartnerGrpc, Settings, TlsFiles
from chassis.errors import Unauthenticated
from chassis.grpcclient import rich_error
from chassis.grpcserver import GrpcServer, GrpcService
from chassis.mtls import CertificateFiles, ClientCertificate, MutualTlsAuthInterceptor
from chassis.natsserver import NatsServer
from chassis.service import PartnerEndpoint, ServiceDefinition, ServiceRuntime

SECRET = "test-secret-of-a-reasonable-length-0123456789"
SERVICE = "test.partners.v1.PartnerService"
WHOAMI = f"/{SERVICE}/WhoAmI"
REPEAT = f"/{SERVICE}/Repeat"
LOYALTY_MIGRATIONS = Path(__file__).parents[2] / "services" / "loyalty" / "migrations"


@dataclass
class Pki:
    ca: CertificateFiles
    server: CertificateFiles
    bank_a: CertificateFiles  # registered with the resolver
    bank_b: CertificateFiles  # signed by the partner CA, but nobody registered it
    stranger: CertificateFiles  # signed by another CA

    def tls_files(self, prefix: str = "TEST_PARTNER") -> TlsFiles:
        return TlsFiles(prefix, self.server.cert, self.server.key, self.ca.cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca = mtls.create_ca(out, "Test partner CA")
    other = mtls.create_ca(out / "other", "Some other CA")
    return Pki(
        ca=ca,
        server=mtls.issue_server_certificate(ca, out),
        bank_a=mtls.issue_client_certificate(ca, out, "bank-a-cards", organisation="Bank A"),
        bank_b=mtls.issue_client_certificate(ca, out, "bank-b-cards", organisation="Bank B"),
        # Bank A's name, from a CA the server does not trust.
        stranger=mtls.issue_client_certificate(
            other, out / "other", "bank-a-cards", organisation="Bank A"
        ),
    )


class Registry:
    """The resolver: the certificates registered to a partner, by fingerprint."""

    def __init__(self, **partners: CertificateFiles) -> None:
        self.partners = {
            mtls.certificate_info(files.cert.read_bytes()).sha256_fingerprint: partner
            for partner, files in partners.items()
        }
        self.seen: list[ClientCertificate] = []

    async def resolve(self, certificate: ClientCertificate) -> Principal:
        self.seen.append(certificate)
        partner = self.partners.get(certificate.sha256_fingerprint)
        if partner is None:
            raise Unauthenticated("unknown client certificate", reason="CERTIFICATE_UNKNOWN")
        return Principal(
            subject=f"partner:{partner}",
            roles=frozenset({Role.PARTNER}),
            scope=Scope(ScopeLevel.PARTNER, partner),
        )


class Partners:
    """A unary and a server-streaming method that answer with who calls."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def who_am_i(self, _request: bytes, _context: Any) -> bytes:
        self.ran.append("who_am_i")
        return current_principal().subject.encode()

    async def repeat(self, request: bytes, _context: Any) -> AsyncIterator[bytes]:
        self.ran.append("repeat")
        for _ in range(int(request)):
            yield current_principal().subject.encode()

    def service(self) -> GrpcService:
        def same(message: bytes) -> bytes:
            return message

        codec: dict[str, Any] = {"request_deserializer": same, "response_serializer": same}
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "WhoAmI": grpc.unary_unary_rpc_method_handler(self.who_am_i, **codec),
                "Repeat": grpc.unary_stream_rpc_method_handler(self.repeat, **codec),
            },
        )
        return GrpcService(
            full_name=SERVICE,
            servicer=handler,
            add_to_server=lambda h, server: server.add_generic_rpc_handlers((h,)),
        )


@dataclass
class Edge:
    port: int
    partners: Partners
    registry: Registry
    pki: Pki

    def channel(self, client: CertificateFiles | None) -> grpc.aio.Channel:
        """A channel that trusts the partner CA and shows ``client``."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca.cert.read_bytes(),
            private_key=None if client is None else client.key.read_bytes(),
            certificate_chain=None if client is None else client.cert.read_bytes(),
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{self.port}", credentials)


@pytest.fixture
async def edge(pki: Pki) -> AsyncIterator[Edge]:
    partners = Partners()
    registry = Registry(**{"bank-a": pki.bank_a})
    server = GrpcServer(
        "cards",
        "127.0.0.1:0",
        SECRET,
        [partners.service()],
        credentials=mtls.server_credentials(pki.tls_files()),
        auth=MutualTlsAuthInterceptor(registry.resolve),
    )
    await server.start()
    await server.set_serving(True)
    yield Edge(server.port, partners, registry, pki)
    await server.stop(grace=0)


async def call(channel: grpc.aio.Channel, method: str, request: bytes) -> list[bytes]:
    """The replies of a unary or server-streaming call, on a closed channel."""
    async with channel:
        if method == REPEAT:
            return [reply async for reply in channel.unary_stream(method)(request, timeout=5)]
        return [await channel.unary_unary(method)(request, timeout=5)]


async def refused(channel: grpc.aio.Channel, method: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel, method, b"2")
    return caught.value


# -- the handshake and the resolver ----------------------------------------------


@pytest.mark.parametrize(
    ("method", "replies"),
    [(WHOAMI, [b"partner:bank-a"]), (REPEAT, [b"partner:bank-a", b"partner:bank-a"])],
    ids=["unary", "server-streaming"],
)
async def test_a_registered_certificate_calls_as_its_partner(
    edge: Edge, method: str, replies: list[bytes]
) -> None:
    assert await call(edge.channel(edge.pki.bank_a), method, b"2") == replies

    [seen] = edge.registry.seen
    assert seen == mtls.certificate_info(edge.pki.bank_a.cert.read_bytes())
    assert seen.subject == "CN=bank-a-cards,O=Bank A"


@pytest.mark.parametrize("method", [WHOAMI, REPEAT], ids=["unary", "server-streaming"])
async def test_a_certificate_of_the_ca_the_resolver_does_not_know_is_unauthenticated(
    edge: Edge, method: str
) -> None:
    error = await refused(edge.channel(edge.pki.bank_b), method)

    problem = rich_error(error)
    assert (problem.code, problem.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CERTIFICATE_UNKNOWN",
    )
    assert [c.subject for c in edge.registry.seen] == ["CN=bank-b-cards,O=Bank B"]
    assert edge.partners.ran == [], "refused before the handler ran"


async def test_a_certificate_of_another_ca_fails_the_handshake(edge: Edge) -> None:
    error = await refused(edge.channel(edge.pki.stranger), WHOAMI)

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert edge.registry.seen == [], "the server never saw a call"


async def test_a_client_without_a_certificate_fails_the_handshake(edge: Edge) -> None:
    error = await refused(edge.channel(None), WHOAMI)

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert edge.registry.seen == []


async def test_health_needs_the_handshake_but_no_registered_certificate(edge: Edge) -> None:
    async with edge.channel(edge.pki.bank_b) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert edge.registry.seen == []


async def test_without_tls_there_is_no_certificate_and_no_call() -> None:
    """The interceptor on a plain-text port (a configuration mistake) lets
    nobody in."""
    partners = Partners()
    registry = Registry()
    server = GrpcServer(
        "cards",
        "127.0.0.1:0",
        SECRET,
        [partners.service()],
        auth=MutualTlsAuthInterceptor(registry.resolve),
    )
    await server.start()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"), WHOAMI, b"")
    finally:
        await server.stop(grace=0)
    problem = rich_error(caught.value)
    assert (problem.code, problem.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CLIENT_CERTIFICATE_REQUIRED",
    )
    assert registry.seen == []
    assert partners.ran == []


# -- certificates ----------------------------------------------------------------


def test_certificate_info_describes_a_certificate(pki: Pki) -> None:
    pem = pki.bank_a.cert.read_text()
    info = mtls.certificate_info(pem)
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)
    assert info.sha256_fingerprint == hashlib.sha256(der).hexdigest()
    assert info.subject == "CN=bank-a-cards,O=Bank A"
    assert info.not_after.tzinfo is dt.UTC
    assert info.not_after > dt.datetime.now(dt.UTC) + dt.timedelta(days=800)
    assert info.pem == pem.encode()
    assert mtls.certificate_info(info.pem) == info


@pytest.mark.parametrize("text", ["", "not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_certificate_info_refuses_what_is_not_a_certificate(text: str) -> None:
    with pytest.raises(ValueError):
        mtls.certificate_info(text)


def test_keys_are_private_and_nothing_is_overwritten(pki: Pki, tmp_path: Path) -> None:
    for files in (pki.ca, pki.server, pki.bank_a):
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    ca = mtls.create_ca(tmp_path, "CA")
    with pytest.raises(FileExistsError):
        mtls.create_ca(tmp_path, "CA again")
    assert mtls.certificate_info(ca.cert.read_bytes()).subject == "CN=CA"


def test_the_server_certificate_names_its_hosts(pki: Pki) -> None:
    certificate = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_a_client_certificate_needs_the_ca_s_own_key(pki: Pki, tmp_path: Path) -> None:
    mismatched = CertificateFiles(pki.ca.cert, pki.bank_a.key)
    with pytest.raises(ValueError, match="is not the EC or RSA private key"):
        mtls.issue_client_certificate(mismatched, tmp_path, "bank-c")


# -- settings and runtime --------------------------------------------------------


def partner_env(pki: Pki) -> dict[str, str]:
    return {
        "CARDS_PARTNER_GRPC_LISTEN": "127.0.0.1:0",
        "CARDS_PARTNER_TLS_CERT": str(pki.server.cert),
        "CARDS_PARTNER_TLS_KEY": str(pki.server.key),
        "CARDS_PARTNER_CLIENT_CA": str(pki.ca.cert),
    }


def test_the_partner_endpoint_is_off_unless_its_address_is_set(pki: Pki) -> None:
    assert Settings.from_env("cards", {}).partner_grpc is None
    assert Settings.from_env("cards", partner_env(pki)).partner_grpc == PartnerGrpc(
        "127.0.0.1:0", pki.tls_files("CARDS_PARTNER")
    )
    assert Settings.from_env("members", partner_env(pki)).partner_grpc is None


@pytest.mark.parametrize(
    "missing", ["CARDS_PARTNER_TLS_CERT", "CARDS_PARTNER_TLS_KEY", "CARDS_PARTNER_CLIENT_CA"]
)
def test_a_partner_address_without_one_of_its_files_is_refused(pki: Pki, missing: str) -> None:
    env = partner_env(pki)
    env[missing] = " "
    with pytest.raises(ConfigError, match=missing):
        Settings.from_env("cards", env)


def test_a_file_that_cannot_be_read_names_its_setting(pki: Pki, tmp_path: Path) -> None:
    files = TlsFiles("CARDS_PARTNER", pki.server.cert, tmp_path / "nowhere.pem", pki.ca.cert)
    with pytest.raises(ConfigError, match="CARDS_PARTNER_TLS_KEY: cannot read"):
        mtls.server_credentials(files)
    (tmp_path / "ca.txt").write_text("not PEM")
    files = TlsFiles("CARDS_PARTNER", pki.server.cert, pki.server.key, tmp_path / "ca.txt")
    with pytest.raises(ConfigError, match=r"CARDS_PARTNER_CLIENT_CA: .* is not a PEM file"):
        mtls.server_credentials(files)


def definition(registry: Registry, partners: Partners | None) -> ServiceDefinition:
    """A service with loyalty's tables (the runtime needs an outbox) and,
    when ``partners`` is given, a partner endpoint serving them."""
    return ServiceDefinition(
        name="loyalty",
        migrations_dir=LOYALTY_MIGRATIONS,
        grpc_services=lambda _ctx: [],
        partner_endpoint=None
        if partners is None
        else lambda _ctx: PartnerEndpoint([partners.service()], registry.resolve),
    )


def runtime_settings(tmp_path: Path, nats_url: str, pki: Pki) -> Settings:
    return Settings(
        service="loyalty",
        environment="test",
        var_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'loyalty.db'}",
        nats_url=nats_url,
        grpc_listen="127.0.0.1:0",
        partner_grpc=PartnerGrpc("127.0.0.1:0", pki.tls_files("LOYALTY_PARTNER")),
    )


async def test_the_runtime_serves_the_partner_endpoint_with_the_main_one(
    pki: Pki, tmp_path: Path
) -> None:
    partners = Partners()
    registry = Registry(**{"bank-a": pki.bank_a})
    with NatsServer(tmp_path / "nats") as nats:
        runtime = ServiceRuntime(
            definition(registry, partners), runtime_settings(tmp_path, nats.url, pki)
        )
        await runtime.start()
        try:
            await asyncio.wait_for(runtime.ready.wait(), timeout=20)
            port = runtime.partner_port
            assert port and port != runtime.port
            edge = Edge(port, partners, registry, pki)
            async with edge.channel(pki.bank_a) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert await call(edge.channel(pki.bank_a), WHOAMI, b"") == [b"partner:bank-a"]
        finally:
            await runtime.stop(grace=1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(edge.channel(pki.bank_a), WHOAMI, b"")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, "stopped with the main server"


async def test_a_service_without_a_partner_endpoint_ignores_the_settings(
    pki: Pki, tmp_path: Path
) -> None:
    settings = runtime_settings(tmp_path, "nats://127.0.0.1:1", pki)
    runtime = ServiceRuntime(definition(Registry(), None), settings)
    assert runtime.partner is None
    assert runtime.partner_port is None
    assert runtime.servers == [runtime.grpc]


async def test_the_runtime_refuses_a_partner_endpoint_whose_files_it_cannot_read(
    pki: Pki, tmp_path: Path
) -> None:
    tls = TlsFiles("LOYALTY_PARTNER", tmp_path / "missing.pem", pki.server.key, pki.ca.cert)
    settings = dataclasses.replace(
        runtime_settings(tmp_path, "nats://127.0.0.1:1", pki),
        partner_grpc=PartnerGrpc("127.0.0.1:0", tls),
    )
    with pytest.raises(ConfigError, match="LOYALTY_PARTNER_TLS_CERT"):
        ServiceRuntime(definition(Registry(), Partners()), settings)
