"""Mutual TLS for partner-facing gRPC endpoints.

A partner (a bank issuing co-brand cards, say) calls with a client
certificate signed by a CA the chain trusts for partners: the TLS handshake
refuses a caller without one, or with one from another CA. The service then
says which partner the certificate belongs to with a resolver of its own (a
registry of fingerprints), so a certificate can be revoked at once, without
waiting for it to expire or for a revocation list.

Also here: making a CA and the server and client certificates it signs, for
``cornucopia up`` and the ``dev-ca`` and ``partner-cert`` commands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chassis.auth import Principal, Role, Scope, ScopeLevel, current_principal
from chassis.config import ConfigError, TlsFiles
from chassis.errors import PermissionDenied, Unauthenticated
from chassis.grpcserver import PUBLIC_METHOD_PREFIXES, Context, WrappingInterceptor, acting_as

# Where gRPC puts the peer's certificate in a call's auth context.
PEER_CERTIFICATE_KEY = "x509_pem_cert"


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS with the server's certificate chain and key, requiring a client
    certificate signed by one of the CAs in ``files.client_ca``."""
    chain, key, client_ca = (_read(setting, path) for setting, path in files.by_setting())
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=True
    )


def _read(setting: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    # gRPC would only fail later, at the first handshake, and say less.
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{setting}: {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class ClientCertificate:
    """What a service needs to know of a client certificate, to register it
    and to recognise it."""

    # Lower-case hex SHA-256 of the certificate (DER).
    sha256_fingerprint: str
    # RFC 4514, e.g. "CN=bank-a-cards,O=Bank A".
    subject: str
    not_after: dt.datetime
    pem: bytes


def certificate_info(pem: bytes | str) -> ClientCertificate:
    """The first certificate of ``pem``; ValueError if there is none."""
    data = pem.encode() if isinstance(pem, str) else pem
    certificate = x509.load_pem_x509_certificate(data)
    return ClientCertificate(
        sha256_fingerprint=certificate.fingerprint(hashes.SHA256()).hex(),
        subject=certificate.subject.rfc4514_string(),
        not_after=certificate.not_valid_after_utc,
        pem=certificate.public_bytes(serialization.Encoding.PEM),
    )


def issued_by_any(pem: bytes | str, ca_bundle: bytes) -> bool:
    """Whether the certificate in ``pem`` was signed by one of the CAs in
    ``ca_bundle`` (PEM): one that the TLS handshake would accept, checked
    before it is registered rather than at its first call."""
    data = pem.encode() if isinstance(pem, str) else pem
    certificate = x509.load_pem_x509_certificate(data)
    for ca in x509.load_pem_x509_certificates(ca_bundle):
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def client_certificate(context: Context) -> ClientCertificate | None:
    """The certificate the caller presented in the TLS handshake (which has
    checked its signature and dates), or None: no TLS, or no certificate."""
    pems = context.auth_context().get(PEER_CERTIFICATE_KEY)
    if not pems:
        return None
    return certificate_info(next(iter(pems)))


# Who a client certificate belongs to; raises Unauthenticated or
# PermissionDenied for one it does not know or that was revoked.
CertificateResolver = Callable[[ClientCertificate], Awaitable[Principal]]


def principal_for_partner(partner_id: str | None, *, active: bool) -> Principal:
    """What a resolver answers once it knows which partner a certificate
    is bound to (None: no binding in force, the certificate unknown or
    revoked) and whether that partner is active: the partner's principal
    (role PARTNER, scope partner:<id>), or the refusal every partner
    endpoint gives (UNAUTHENTICATED CERTIFICATE_NOT_REGISTERED, or
    PERMISSION_DENIED PARTNER_SUSPENDED)."""
    if not partner_id:
        raise Unauthenticated(
            "this client certificate is not bound to a partner",
            reason="CERTIFICATE_NOT_REGISTERED",
        )
    if not active:
        raise PermissionDenied(
            "this partner is suspended",
            reason="PARTNER_SUSPENDED",
            metadata={"partner_id": partner_id},
        )
    return Principal(
        subject=f"partner:{partner_id}",
        roles=frozenset({Role.PARTNER}),
        scope=Scope(ScopeLevel.PARTNER, partner_id),
    )


class MutualTlsAuthInterceptor(WrappingInterceptor):
    """Authenticates callers by their client certificate, in place of the
    bearer token of ``AuthInterceptor``: before the handler is called (before
    a streaming call reads its first message), ``resolve`` turns the
    certificate into the principal that is current for the call."""

    def __init__(self, resolve: CertificateResolver) -> None:
        self.resolve = resolve

    @contextlib.asynccontextmanager
    async def scope(self, context: Context, method: str) -> AsyncIterator[None]:
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            yield
            return
        certificate = client_certificate(context)
        if certificate is None:
            raise Unauthenticated(
                "call with a client certificate (mutual TLS)",
                reason="CLIENT_CERTIFICATE_REQUIRED",
            )
        with acting_as(await self.resolve(certificate)):
            yield


def current_partner() -> tuple[Principal, str]:
    """The partner calling a partner endpoint (its principal and id);
    PERMISSION_DENIED ROLE_NOT_ALLOWED for any other caller."""
    principal = current_principal()
    principal.require_role(Role.PARTNER)
    if principal.scope.level != ScopeLevel.PARTNER or not principal.scope.id:
        raise PermissionDenied("partners only", reason="ROLE_NOT_ALLOWED")
    return principal, principal.scope.id


# -- making certificates ---------------------------------------------------------

CA_DAYS = 3650
CERTIFICATE_DAYS = 825
IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path

    @classmethod
    def named(cls, out_dir: Path, name: str) -> CertificateFiles:
        """``<name>.pem`` and ``<name>-key.pem`` in ``out_dir``."""
        return cls(out_dir / f"{name}.pem", out_dir / f"{name}-key.pem")


def create_ca(out_dir: Path, common_name: str) -> CertificateFiles:
    """A new CA, ``ca.pem`` and ``ca-key.pem``: a key and a self-signed
    certificate that may sign only end-entity certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(common_name)
    certificate = _sign(
        subject,
        key,
        issuer=subject,
        issuer_key=key,
        days=CA_DAYS,
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (_key_usage(signs_certificates=True), True),
        ],
    )
    return _write(CertificateFiles.named(out_dir, "ca"), certificate, key)


def issue_server_certificate(
    ca: CertificateFiles,
    out_dir: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
) -> CertificateFiles:
    """A TLS server certificate for ``hosts`` (DNS names or IP addresses),
    ``server.pem`` and ``server-key.pem``."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return _issue(
        ca,
        CertificateFiles.named(out_dir, "server"),
        _name(hosts[0]),
        CERTIFICATE_DAYS,
        [
            (x509.SubjectAlternativeName(names), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )


def issue_client_certificate(
    ca: CertificateFiles,
    out_dir: Path,
    common_name: str,
    *,
    organisation: str = "",
    days: int = CERTIFICATE_DAYS,
) -> CertificateFiles:
    """A TLS client certificate, ``CN=<common_name>,O=<organisation>``,
    written as ``<common_name>.pem`` and ``<common_name>-key.pem``."""
    file_name = re.sub(r"[^A-Za-z0-9._-]+", "-", common_name).strip(".-") or "client"
    return _issue(
        ca,
        CertificateFiles.named(out_dir, file_name),
        _name(common_name, organisation),
        days,
        [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    )


def _issue(
    ca: CertificateFiles,
    files: CertificateFiles,
    subject: x509.Name,
    days: int,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> CertificateFiles:
    ca_certificate, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _sign(
        subject,
        key,
        issuer=ca_certificate.subject,
        issuer_key=ca_key,
        days=days,
        extensions=[
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_key_usage(signs_certificates=False), True),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
            *extensions,
        ],
    )
    return _write(files, certificate, key)


def _load_ca(ca: CertificateFiles) -> tuple[x509.Certificate, IssuerKey]:
    certificate = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        # What it signed would be refused at every handshake.
        raise ValueError(f"{ca.cert} is not a CA certificate")
    try:
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except TypeError:
        raise ValueError(f"{ca.key} is encrypted; give an unencrypted copy") from None
    if not isinstance(key, IssuerKey) or key.public_key() != certificate.public_key():
        raise ValueError(f"{ca.key} is not the EC or RSA private key of {ca.cert}")
    return certificate, key


def _name(common_name: str, organisation: str = "") -> x509.Name:
    # Organisation first, so that the RFC 4514 form reads "CN=...,O=...".
    attributes = (
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)] if organisation else []
    )
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: x509.Name,
    issuer_key: IssuerKey,
    days: int,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A little in the past, for peers whose clocks are a little behind.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    files: CertificateFiles, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertificateFiles:
    """Writes both files; never over existing ones (a CA key overwritten
    would orphan every certificate it signed)."""
    for path in (files.cert, files.key):
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting it")
    files.key.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600: the key is never readable by others, not even for a moment.
    descriptor = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(key_pem)
    files.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return files
