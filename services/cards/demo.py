"""Demo card programs for development: what a till needs to issue a card,
recharge it and pay with it, and a demo bank to try the partner API with.

Loaded by ``cornucopia up`` in development only, after the members demo,
through the public gRPC API with fixed request ids: loading it again
changes nothing.
"""

from __future__ import annotations

import hashlib

import grpc

from chassis.grpcclient import bearer
from cornucopia.cards.v1 import (
    partners_pb2,
    partners_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    stored_value_pb2_grpc,
)
from cornucopia.cards.v1 import stored_value_pb2 as sv
from cornucopia.common.v1 import money_pb2

CALL_TIMEOUT_SECONDS = 10.0
DEMO_PARTNER = "demo-bank"


def _program(program_id: str, name: str, prefix: str, **extra: object) -> programs_pb2.CardProgram:
    values: dict[str, object] = {
        "program_id": program_id,
        "display_name": name,
        "form": programs_pb2.CARD_FORM_PHYSICAL,
        "number_format": programs_pb2.NumberFormat(prefix=prefix, length=16, luhn_check_digit=True),
        "validity_months": 36,
        "stored_value": True,
        "holding": programs_pb2.CARD_HOLDING_PERSONAL,
        "allows_linking": True,
    }
    values.update(extra)
    return programs_pb2.CardProgram(**values)  # type: ignore[arg-type]


PROGRAMS = (
    _program(
        "GOLD",
        "金卡",
        "881601",
        member_discount_bps=1200,
        allows_supplementary=True,
        max_supplementary_cards=2,
    ),
    _program("SILVER", "银卡", "881602", member_discount_bps=500),
    _program(
        "DEMOBANK",
        "演示银行联名卡",
        "622588",
        form=programs_pb2.CARD_FORM_VIRTUAL,
        partner_id=DEMO_PARTNER,
        member_discount_bps=800,
    ),
)


def _cny(yuan: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="CNY", minor_units=yuan * 100)


async def _ignoring_exists(call: object) -> None:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


async def load_demo_cards(
    channel: grpc.aio.Channel, token: str, demo_bank_certificate_pem: str | None
) -> None:
    """Programs GOLD, SILVER and the demo bank's DEMOBANK, a recharge bonus
    ("充1000送100"), and the demo bank registered with its certificate."""
    md = bearer(token)
    partners = partners_pb2_grpc.PartnersServiceStub(channel)
    programs = programs_pb2_grpc.CardProgramsServiceStub(channel)
    stored_value = stored_value_pb2_grpc.StoredValueServiceStub(channel)
    await _ignoring_exists(
        partners.CreatePartner(
            partners_pb2.CreatePartnerRequest(
                request_id="demo-partner",
                partner=partners_pb2.Partner(partner_id=DEMO_PARTNER, display_name="演示银行"),
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_SECONDS,
        )
    )
    if demo_bank_certificate_pem:
        # A new certificate (the dev files were made anew) is added beside
        # the old one; the same one again is ALREADY_EXISTS.
        digest = hashlib.sha256(demo_bank_certificate_pem.encode()).hexdigest()[:16]
        await _ignoring_exists(
            partners.AddPartnerCertificate(
                partners_pb2.AddPartnerCertificateRequest(
                    request_id=f"demo-partner-cert-{digest}",
                    partner_id=DEMO_PARTNER,
                    certificate_pem=demo_bank_certificate_pem,
                ),
                metadata=md,
                timeout=CALL_TIMEOUT_SECONDS,
            )
        )
    for program in PROGRAMS:
        await _ignoring_exists(
            programs.CreateCardProgram(
                programs_pb2.CreateCardProgramRequest(
                    request_id=f"demo-program-{program.program_id}", card_program=program
                ),
                metadata=md,
                timeout=CALL_TIMEOUT_SECONDS,
            )
        )
    rules = await stored_value.ListBonusRules(
        sv.ListBonusRulesRequest(page_size=100), metadata=md, timeout=CALL_TIMEOUT_SECONDS
    )
    if not any(rule.name == "充1000送100" for rule in rules.bonus_rules):
        await stored_value.CreateBonusRule(
            sv.CreateBonusRuleRequest(
                request_id="demo-bonus-1000",
                bonus_rule=sv.BonusRule(
                    name="充1000送100", threshold=_cny(1000), fixed_bonus=_cny(100)
                ),
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_SECONDS,
        )
