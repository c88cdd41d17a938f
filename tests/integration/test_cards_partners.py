"""Co-brand partners over real mutual TLS: the registry, a bank's calls
authenticated by its client certificate and kept to its own programs and
cards, pushed recharges, and the feed of its cards' changes. A missing,
foreign, unregistered or revoked certificate is refused."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest

from chassis.config import Settings
from chassis.mtls import CertificateFiles
from chassis.service import ServiceRuntime
from cornucopia.cards.v1 import (
    cards_pb2,
    partners_pb2,
    partners_pb2_grpc,
    programs_pb2,
    stored_value_pb2,
    stored_value_pb2_grpc,
)
from cornucopia.common.v1 import money_pb2
from services.cards.domain.programs import luhn_check_digit
from services.cards.server import definition as cards_definition
from tests.integration.conftest import Suite
from tests.integration.infra import DatabaseFactory
from tests.integration.pki import Pki, channel, fingerprint
from tests.integration.test_cards_lifecycle import (
    CHECKOUT,
    HQ,
    MGR_S001,
    OP_S001,
    Cards,
    create_program,
    enroll,
    issue,
    program,
    refused,
    rid,
)

C, PT = cards_pb2, partners_pb2


async def start_cards_with_partners(
    suite: Suite, database_url: DatabaseFactory, pki: Pki
) -> tuple[Cards, int]:
    settings = Settings(
        service="cards",
        environment="test",
        var_dir=suite.var_dir,
        database_url=await database_url("cards"),
        nats_url=suite.nats_url,
        grpc_listen="127.0.0.1:0",
        peers={"members": "127.0.0.1:1"},
        partner_grpc=pki.partner_grpc("cards"),
    )
    runtime = ServiceRuntime(cards_definition, settings)
    await runtime.start()
    await asyncio.wait_for(runtime.ready.wait(), timeout=20)
    suite.runtimes["cards"] = runtime
    suite.channels["cards"] = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    assert runtime.partner_port
    return Cards(suite), runtime.partner_port


async def register(c: Cards, partner_id: str, certificate: CertificateFiles) -> PT.Partner:
    await c.partners.CreatePartner(
        PT.CreatePartnerRequest(
            request_id=rid(), partner=PT.Partner(partner_id=partner_id, display_name=partner_id)
        ),
        metadata=HQ,
    )
    return await c.partners.AddPartnerCertificate(
        PT.AddPartnerCertificateRequest(
            request_id=rid(), partner_id=partner_id, certificate_pem=certificate.cert.read_text()
        ),
        metadata=HQ,
    )


def cny(minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="CNY", minor_units=minor_units)


async def test_a_bank_over_mutual_tls(
    suite: Suite, database_url: DatabaseFactory, tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    c, port = await start_cards_with_partners(suite, database_url, pki)
    bank_a = await register(c, "bank-a", pki.bank_a)
    assert len(bank_a.certificates) == 1
    await register(c, "bank-b", pki.bank_b)
    await create_program(c, program("GOLD"))
    await create_program(
        c, program("BANKA", "6201", partner_id="bank-a", form=programs_pb2.CARD_FORM_VIRTUAL)
    )
    await create_program(
        c, program("BANKB", "6202", partner_id="bank-b", form=programs_pb2.CARD_FORM_VIRTUAL)
    )
    listed = await c.partners.GetPartner(PT.GetPartnerRequest(partner_id="bank-a"), metadata=HQ)
    assert list(listed.program_ids) == ["BANKA"]
    await enroll(c, "M-ANN")
    await enroll(c, "M-BOB")
    await enroll(c, "M-CAT")
    gold = await issue(c, "M-ANN")

    a = channel(pki, port, pki.bank_a)
    bank = partners_pb2_grpc.PartnerCardsServiceStub(a)
    issue_request = PT.IssueCobrandCardRequest(
        request_id="a-1", program_id="BANKA", member_id="M-ANN", partner_reference="acct-001"
    )
    card = await bank.IssueCobrandCard(issue_request)
    assert card.program_id == "BANKA" and card.state == C.CARD_STATE_ACTIVE and card.can_pay
    assert card.partner_reference == "acct-001" and card.available_balance.minor_units == 0
    # A retry is the same card; the same reference on another request is refused.
    assert (await bank.IssueCobrandCard(issue_request)).card_id == card.card_id
    details = await refused(
        bank.IssueCobrandCard(
            PT.IssueCobrandCardRequest(
                request_id="a-2",
                program_id="BANKA",
                member_id="M-BOB",
                partner_reference="acct-001",
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details["reason"] == "PARTNER_REFERENCE_EXISTS"
    # Another partner's program, or the chain's own, is not the bank's to issue.
    for program_id in ("BANKB", "GOLD"):
        details = await refused(
            bank.IssueCobrandCard(
                PT.IssueCobrandCardRequest(
                    request_id=rid(),
                    program_id=program_id,
                    member_id="M-BOB",
                    partner_reference="x",
                )
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert details["reason"] == "PROGRAM_NOT_PARTNERS"

    # A card the bank printed itself, linked to a member.
    printed = "6201" + "00004242" + "123"
    printed += luhn_check_digit(printed)
    link = PT.LinkCobrandCardRequest(
        request_id="a-link",
        program_id="BANKA",
        mobile="",
        member_id="M-BOB",
        card_number=" ".join(printed[k : k + 4] for k in range(0, 16, 4)),
        partner_reference="acct-002",
    )
    linked = await bank.LinkCobrandCard(link)
    assert linked.card_number == printed and linked.member_id == "M-BOB"
    resolved = await c.cards.ResolveCard(
        C.ResolveCardRequest(card_number=printed), metadata=OP_S001
    )
    assert resolved.card.card_id == linked.card_id and resolved.can_pay
    for number, code, reason in (
        (printed[:-1] + str((int(printed[-1]) + 1) % 10), grpc.StatusCode.INVALID_ARGUMENT, None),
        (gold.card_number, grpc.StatusCode.INVALID_ARGUMENT, None),
        (card.card_number, grpc.StatusCode.ALREADY_EXISTS, "CARD_NUMBER_TAKEN"),
    ):
        bad = PT.LinkCobrandCardRequest()
        bad.CopyFrom(link)
        bad.request_id, bad.card_number, bad.partner_reference = rid(), number, rid()[:20]
        bad.member_id = "M-CAT"
        details = await refused(bank.LinkCobrandCard(bad), code)
        if reason:
            assert details["reason"] == reason

    # Recharges pushed by the bank land on the card's stored value.
    pushed = await bank.PushRecharge(
        PT.PushRechargeRequest(
            request_id="push-1",
            partner_reference="acct-001",
            amount=cny(20_000),
            payment_reference="bank-tx-9",
        )
    )
    assert pushed.available_balance.minor_units == 20_000
    again = await bank.PushRecharge(
        PT.PushRechargeRequest(
            request_id="push-1",
            partner_reference="acct-001",
            amount=cny(20_000),
            payment_reference="bank-tx-9",
        )
    )
    assert again.movement_id == pushed.movement_id
    sv = stored_value_pb2_grpc.StoredValueServiceStub(suite.channels["cards"])
    balance = await sv.GetBalance(
        stored_value_pb2.GetBalanceRequest(card_id=card.card_id), metadata=OP_S001
    )
    assert balance.available.minor_units == 20_000

    # The bank sees the changes of its cards, and only of its cards.
    await c.cards.FreezeCard(
        C.FreezeCardRequest(request_id=rid(), card_id=card.card_id, reason="bank asked"),
        metadata=HQ,
    )
    status = await bank.GetCobrandCard(PT.GetCobrandCardRequest(card_id=card.card_id))
    assert status.state == C.CARD_STATE_FROZEN and not status.can_pay
    changes = (await bank.ListCardChanges(PT.ListCardChangesRequest())).changes
    assert [(ch.card_id, ch.action, ch.state) for ch in changes] == [
        (card.card_id, C.CARD_ACTION_ISSUE, C.CARD_STATE_ACTIVE),
        (linked.card_id, C.CARD_ACTION_ISSUE, C.CARD_STATE_ACTIVE),
        (card.card_id, C.CARD_ACTION_FREEZE, C.CARD_STATE_FROZEN),
    ]
    assert [ch.partner_reference for ch in changes] == ["acct-001", "acct-002", "acct-001"]
    # The partner's own numbering: no gaps, so nothing can be skipped.
    assert [ch.sequence for ch in changes] == [1, 2, 3]
    later = await bank.ListCardChanges(
        PT.ListCardChangesRequest(after_sequence=changes[1].sequence)
    )
    assert [ch.action for ch in later.changes] == [C.CARD_ACTION_FREEZE]

    # A stream gets what is there, then what happens next.
    stream = bank.WatchCardChanges(PT.WatchCardChangesRequest(after_sequence=changes[-1].sequence))
    await c.cards.UnfreezeCard(
        C.UnfreezeCardRequest(request_id=rid(), card_id=card.card_id, reason="cleared"),
        metadata=HQ,
    )
    seen = await asyncio.wait_for(stream.read(), timeout=10)
    assert seen.action == C.CARD_ACTION_UNFREEZE and seen.state == C.CARD_STATE_ACTIVE
    stream.cancel()

    b = channel(pki, port, pki.bank_b)
    other_bank = partners_pb2_grpc.PartnerCardsServiceStub(b)
    await refused(
        other_bank.GetCobrandCard(PT.GetCobrandCardRequest(card_id=card.card_id)),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        other_bank.PushRecharge(
            PT.PushRechargeRequest(
                request_id=rid(),
                card_id=card.card_id,
                amount=cny(100),
                payment_reference="x",
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert (await other_bank.ListCardChanges(PT.ListCardChangesRequest())).changes == []

    # Suspended, revoked, unknown, foreign or no certificate: refused.
    await c.partners.SuspendPartner(
        PT.SuspendPartnerRequest(request_id=rid(), partner_id="bank-b", reason="contract ended"),
        metadata=HQ,
    )
    details = await refused(
        other_bank.ListCardChanges(PT.ListCardChangesRequest()), grpc.StatusCode.PERMISSION_DENIED
    )
    assert details["reason"] == "PARTNER_SUSPENDED"
    stranger = partners_pb2_grpc.PartnerCardsServiceStub(channel(pki, port, pki.stranger))
    details = await refused(
        stranger.ListCardChanges(PT.ListCardChangesRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
    assert details["reason"] == "CERTIFICATE_NOT_REGISTERED"
    for client in (pki.forged, None):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await partners_pb2_grpc.PartnerCardsServiceStub(
                channel(pki, port, client)
            ).ListCardChanges(PT.ListCardChangesRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await c.partners.RevokePartnerCertificate(
        PT.RevokePartnerCertificateRequest(
            request_id=rid(),
            partner_id="bank-a",
            sha256_fingerprint=bank_a.certificates[0].sha256_fingerprint,
        ),
        metadata=HQ,
    )
    await refused(
        bank.ListCardChanges(PT.ListCardChangesRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
    # The token port does not serve partners, and a token does not open the partner port.
    await refused(
        partners_pb2_grpc.PartnerCardsServiceStub(suite.channels["cards"]).ListCardChanges(
            PT.ListCardChangesRequest(), metadata=HQ
        ),
        grpc.StatusCode.UNIMPLEMENTED,
    )
    for ch in (a, b):
        await ch.close()


async def test_the_registry_is_hqs(
    suite: Suite, database_url: DatabaseFactory, tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    c, _ = await start_cards_with_partners(suite, database_url, pki)
    await refused(
        c.partners.CreatePartner(
            PT.CreatePartnerRequest(
                request_id=rid(), partner=PT.Partner(partner_id="bank-z", display_name="Z")
            ),
            metadata=MGR_S001,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    details = await refused(
        c.partners.CreatePartner(
            PT.CreatePartnerRequest(
                request_id=rid(), partner=PT.Partner(partner_id="Bank Z!", display_name="")
            ),
            metadata=HQ,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"partner.partner_id", "partner.display_name"}
    await register(c, "bank-a", pki.bank_a)
    details = await refused(
        c.partners.CreatePartner(
            PT.CreatePartnerRequest(
                request_id=str(uuid.uuid4()),
                partner=PT.Partner(partner_id="bank-a", display_name="again"),
            ),
            metadata=HQ,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details["reason"] == "PARTNER_EXISTS"
    details = await refused(
        c.partners.AddPartnerCertificate(
            PT.AddPartnerCertificateRequest(
                request_id=rid(), partner_id="bank-a", certificate_pem="not a certificate"
            ),
            metadata=HQ,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "certificate_pem" in details["violations"]
    details = await refused(
        c.partners.AddPartnerCertificate(
            PT.AddPartnerCertificateRequest(
                request_id=rid(),
                partner_id="bank-a",
                certificate_pem=pki.bank_a.cert.read_text(),
            ),
            metadata=HQ,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details["reason"] == "CERTIFICATE_EXISTS"
    details = await refused(
        c.partners.AddPartnerCertificate(
            PT.AddPartnerCertificateRequest(
                request_id=rid(),
                partner_id="bank-a",
                certificate_pem=pki.forged.cert.read_text(),
            ),
            metadata=HQ,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "partner CA" in details["violations"]["certificate_pem"]
    listed = await c.partners.ListPartners(PT.ListPartnersRequest(), metadata=OP_S001)
    assert [p.partner_id for p in listed.partners] == ["bank-a"]


async def test_services_look_up_a_certificates_partner(
    suite: Suite, database_url: DatabaseFactory, tmp_path: Path
) -> None:
    """What another service's partner endpoint asks (loyalty's): the partner
    a certificate is bound to, with its state; nothing for a certificate
    never registered or revoked; for services only."""
    pki = Pki(tmp_path / "pki")
    c, _ = await start_cards_with_partners(suite, database_url, pki)
    await register(c, "bank-a", pki.bank_a)
    await register(c, "bank-b", pki.bank_b)
    service = CHECKOUT  # role SERVICE, as loyalty's own token

    def lookup(sha256: str, metadata: object = service) -> object:
        return c.partners.LookupPartnerCertificate(
            PT.LookupPartnerCertificateRequest(sha256_fingerprint=sha256), metadata=metadata
        )

    found = await lookup(fingerprint(pki.bank_a))
    assert found.partner_id == "bank-a" and found.state == PT.PARTNER_STATE_ACTIVE
    # Upper case (as some tools print it) finds it too.
    assert (await lookup(fingerprint(pki.bank_a).upper())).partner_id == "bank-a"
    for unknown in (fingerprint(pki.stranger), fingerprint(pki.forged)):
        details = await refused(lookup(unknown), grpc.StatusCode.NOT_FOUND)
        assert details["reason"] == "CERTIFICATE_NOT_REGISTERED"
    await refused(lookup(""), grpc.StatusCode.INVALID_ARGUMENT)
    # Staff, even HQ, do not resolve certificates.
    for metadata in (HQ, OP_S001):
        await refused(lookup(fingerprint(pki.bank_a), metadata), grpc.StatusCode.PERMISSION_DENIED)

    # A suspended partner is returned as such, for the caller to refuse.
    await c.partners.SuspendPartner(
        PT.SuspendPartnerRequest(request_id=rid(), partner_id="bank-b", reason="audit"),
        metadata=HQ,
    )
    suspended = await lookup(fingerprint(pki.bank_b))
    assert suspended.partner_id == "bank-b" and suspended.state == PT.PARTNER_STATE_SUSPENDED
    # A revoked certificate is unknown from the moment it is revoked.
    await c.partners.RevokePartnerCertificate(
        PT.RevokePartnerCertificateRequest(
            request_id=rid(), partner_id="bank-a", sha256_fingerprint=fingerprint(pki.bank_a)
        ),
        metadata=HQ,
    )
    details = await refused(lookup(fingerprint(pki.bank_a)), grpc.StatusCode.NOT_FOUND)
    assert details["reason"] == "CERTIFICATE_NOT_REGISTERED"
