"""A partner PKI for the mutual-TLS tests: a partner CA with a server
certificate for localhost and the client certificates of two banks and of a
stranger (signed, but registered nowhere), a CA nobody trusts with a
forged bank certificate, and what a service and a bank need of them."""

from __future__ import annotations

from pathlib import Path

import grpc

from chassis.config import PartnerGrpc, TlsFiles
from chassis.mtls import (
    CertificateFiles,
    certificate_info,
    create_ca,
    issue_client_certificate,
    issue_server_certificate,
)


class Pki:
    """A partner CA with the server's certificate and two banks' client
    certificates, and a CA nobody trusts."""

    def __init__(self, root: Path) -> None:
        trusted, foreign = root / "trusted", root / "foreign"
        trusted.mkdir(parents=True)
        foreign.mkdir(parents=True)
        self.ca = create_ca(trusted, "Cornucopia partner CA")
        self.server = issue_server_certificate(self.ca, trusted)
        self.bank_a = issue_client_certificate(self.ca, trusted, "bank-a", organisation="Bank A")
        self.bank_b = issue_client_certificate(self.ca, trusted, "bank-b", organisation="Bank B")
        self.stranger = issue_client_certificate(
            self.ca, trusted, "stranger", organisation="Nobody"
        )
        other_ca = create_ca(foreign, "Someone else's CA")
        self.forged = issue_client_certificate(other_ca, foreign, "bank-a", organisation="Bank A")

    def partner_grpc(self, service: str) -> PartnerGrpc:
        """A service's partner endpoint on a free port, with this PKI's
        server certificate, trusting its CA."""
        return PartnerGrpc(
            "127.0.0.1:0",
            TlsFiles(f"{service.upper()}_PARTNER", self.server.cert, self.server.key, self.ca.cert),
        )


def fingerprint(files: CertificateFiles) -> str:
    return certificate_info(files.cert.read_bytes()).sha256_fingerprint


def channel(pki: Pki, port: int, client: CertificateFiles | None) -> grpc.aio.Channel:
    """A bank's channel to a partner port, with its client certificate (or
    none), checking the server against the partner CA."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)
