"""Points conversions with partners over real mutual TLS, with real members,
cards and loyalty services on both databases: HQ's terms, a bank
converting its points into the chain's and back at the configured rates
with rounding in the chain's favour, idempotent retries, concurrent
conversions that never overdraw, the refusals (a revoked certificate at
once, a suspended partner, a partner without an enabled conversion, an
unknown member, too few points, the terms' limits), a foreign CA or no
certificate failing the handshake, and the points ledger's own check after
each test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from chassis import supervisor
from chassis.auth import Role, Scope, ScopeLevel
from chassis.config import DEFAULT_GRPC_PORTS, Settings
from chassis.mtls import CertificateFiles
from chassis.service import ServiceRuntime
from cornucopia.cards.v1 import partners_pb2 as PT
from cornucopia.loyalty.v1 import (
    events_pb2,
    partner_points_pb2,
    partner_points_pb2_grpc,
    points_pb2_grpc,
)
from cornucopia.loyalty.v1 import points_pb2 as P
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.cards.demo import load_demo_cards
from services.loyalty.demo import load_demo_conversion
from services.loyalty.server import definition as loyalty_definition
from services.loyalty.store import members as member_store
from services.members.server import definition as members_definition
from tests.integration.conftest import (
    Suite,
    auth,
    eventually,
    rpc_details,
    seed_organisation,
    token,
)
from tests.integration.infra import DatabaseFactory, migrate, schema_drift
from tests.integration.pki import Pki, channel, fingerprint
from tests.integration.test_cards_lifecycle import Cards, refused
from tests.integration.test_cards_partners import register, start_cards_with_partners
from tests.integration.test_loyalty_points import Loyalty, events_of

PP = partner_points_pb2
HQ = auth()
MGR_S001 = auth(token((Role.STORE_MANAGER,), Scope(ScopeLevel.STORE, "S001"), "mgr-1"))
OP_S001 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1"))
TO_CHAIN, TO_PARTNER = PP.CONVERSION_DIRECTION_TO_CHAIN, PP.CONVERSION_DIRECTION_TO_PARTNER


def rid() -> str:
    return str(uuid.uuid4())


def way(partner_points: int, chain_points: int, **limits: int) -> P.ConversionTerms:
    return P.ConversionTerms(
        rate=P.ConversionRate(partner_points=partner_points, chain_points=chain_points), **limits
    )


# The bank of the issue: 10 bank points for 1 chain point, 1 chain point for 8.
BANK_A_TERMS = P.PartnerConversion(
    partner_id="bank-a", enabled=True, to_chain=way(10, 1), to_partner=way(8, 1)
)


@dataclass
class Rig:
    """Members, cards (with its partner port) and loyalty (with its
    partner port), with bank-a and bank-b registered in cards."""

    suite: Suite
    pki: Pki
    cards: Cards
    loyalty: Loyalty
    partner_port: int
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def bank(
        self, client: CertificateFiles | None
    ) -> partner_points_pb2_grpc.PartnerPointsServiceStub:
        opened = channel(self.pki, self.partner_port, client)
        self.channels.append(opened)
        return partner_points_pb2_grpc.PartnerPointsServiceStub(opened)

    @property
    def terms(self) -> points_pb2_grpc.PartnerConversionServiceStub:
        return points_pb2_grpc.PartnerConversionServiceStub(self.suite.channels["loyalty"])

    async def set_terms(
        self, conversion: P.PartnerConversion, *, etag: str = "", metadata: Any = HQ
    ) -> P.PartnerConversion:
        return await self.terms.SetPartnerConversion(
            P.SetPartnerConversionRequest(
                request_id=rid(), partner_conversion=conversion, etag=etag
            ),
            metadata=metadata,
        )

    async def enroll(self, mobile: str) -> str:
        """A member enrolled with the chain, once loyalty has heard of it."""
        members = members_pb2_grpc.MembersServiceStub(self.suite.channels["members"])
        member = await members.CreateMember(
            members_pb2.CreateMemberRequest(
                request_id=rid(),
                member=members_pb2.Member(
                    home_store_id="S001",
                    given_name="娜",
                    mobile=mobile,
                    preferred_language="zh-CN",
                ),
            ),
            metadata=OP_S001,
        )
        await eventually(lambda: self.known(member.member_id), lambda k: k is not None)
        return str(member.member_id)

    async def known(self, member_id: str) -> member_store.KnownMember | None:
        async with self.loyalty.db.sessions() as session:
            return await member_store.get_member(session, member_id)

    async def available(self, member_id: str) -> int:
        return int((await self.loyalty.account(member_id)).available)


async def start_loyalty_with_partners(
    suite: Suite, database_url: str, cards_port: int, members_port: int, pki: Pki
) -> int:
    settings = Settings(
        service="loyalty",
        environment="test",
        var_dir=suite.var_dir,
        database_url=database_url,
        nats_url=suite.nats_url,
        grpc_listen="127.0.0.1:0",
        peers={"cards": f"127.0.0.1:{cards_port}", "members": f"127.0.0.1:{members_port}"},
        partner_grpc=pki.partner_grpc("loyalty"),
    )
    runtime = ServiceRuntime(loyalty_definition, settings)
    await runtime.start()
    await asyncio.wait_for(runtime.ready.wait(), timeout=20)
    suite.runtimes["loyalty"] = runtime
    suite.channels["loyalty"] = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    assert runtime.partner_port
    return runtime.partner_port


@pytest.fixture
async def rig(suite: Suite, database_url: DatabaseFactory, tmp_path: Path) -> AsyncIterator[Rig]:
    """The services running; after the test, the points ledger must hold."""
    pki = Pki(tmp_path / "pki")
    members = await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    cards, _ = await start_cards_with_partners(suite, database_url, pki)
    await register(cards, "bank-a", pki.bank_a)
    await register(cards, "bank-b", pki.bank_b)
    port = await start_loyalty_with_partners(
        suite, await database_url("loyalty"), cards.runtime.port, members.port, pki
    )
    test_rig = Rig(suite, pki, cards, Loyalty(suite), port)
    yield test_rig
    for opened in test_rig.channels:
        await opened.close()
    assert await test_rig.loyalty.problems() == []


def to_chain(member: str = "", points: int = 0, **extra: Any) -> PP.ConvertToChainPointsRequest:
    extra.setdefault("request_id", rid())
    extra.setdefault("partner_reference", "bank-debit-1")
    # A mobile (13800138000, +86 138 0013 8000) or a member id.
    if member[:1] in ("1", "+"):
        extra["mobile"] = member
    else:
        extra["member_id"] = member
    return PP.ConvertToChainPointsRequest(partner_points=points, **extra)


def to_partner(member: str, points: int, **extra: Any) -> PP.ConvertToPartnerPointsRequest:
    extra.setdefault("request_id", rid())
    return PP.ConvertToPartnerPointsRequest(member_id=member, chain_points=points, **extra)


# -- converting ---------------------------------------------------------------------------


async def test_a_bank_converts_points_both_ways(rig: Rig) -> None:
    await rig.set_terms(BANK_A_TERMS)
    ann = await rig.enroll("13800138001")
    bank = rig.bank(rig.pki.bank_a)

    # In: 25 bank points are worth 2.5 chain points; 2, for 20 bank points.
    first = await bank.ConvertToChainPoints(to_chain(ann, 25, request_id="in-1"))
    assert first.direction == TO_CHAIN and first.member_id == ann
    assert (first.requested_points, first.partner_points, first.chain_points) == (25, 20, 2)
    assert (first.rate.partner_points, first.rate.chain_points) == (10, 1)
    assert first.sequence == 1 and first.balance_after == 2
    assert first.partner_reference == "bank-debit-1"
    # By mobile, in any usual form.
    second = await bank.ConvertToChainPoints(
        to_chain("+86 138 0013 8001", 10_000, request_id="in-2")
    )
    assert second.member_id == ann and second.chain_points == 1_000
    assert second.sequence == 2 and second.balance_after == 1_002
    # A retry is the same conversion, days later too; another request
    # under the same id is refused.
    again = await bank.ConvertToChainPoints(to_chain(ann, 25, request_id="in-1"))
    assert again == first
    details = await refused(
        bank.ConvertToChainPoints(to_chain(ann, 26, request_id="in-1")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"

    # The chain's side: a lot of source PARTNER_CONVERSION expiring by the
    # policy, in the history as an accrual that names the conversion.
    lots = await rig.loyalty.lots(ann)
    assert sorted(lot.points for lot in lots) == [2, 1_000]
    assert {lot.source for lot in lots} == {events_pb2.POINTS_SOURCE_PARTNER_CONVERSION}
    assert {lot.reference for lot in lots} == {first.conversion_id, second.conversion_id}
    account = await rig.loyalty.account(ann)
    assert account.balance == 1_002 and account.lifetime_earned == 1_002

    # Out: 1 chain point for 8 bank points.
    out = await bank.ConvertToPartnerPoints(
        to_partner(ann, 100, request_id="out-1", partner_reference="bank-credit-1")
    )
    assert out.direction == TO_PARTNER
    assert (out.requested_points, out.chain_points, out.partner_points) == (100, 100, 800)
    assert out.balance_after == 902 and out.sequence == 3
    assert (
        await bank.ConvertToPartnerPoints(
            to_partner(ann, 100, request_id="out-1", partner_reference="bank-credit-1")
        )
        == out
    )
    assert await rig.available(ann) == 902
    history = await rig.loyalty.history(ann)
    assert [(m.kind, m.points, m.source, m.reference) for m in history] == [
        (
            P.POINTS_MOVEMENT_KIND_CONVERT_OUT,
            -100,
            events_pb2.POINTS_SOURCE_PARTNER_CONVERSION,
            out.conversion_id,
        ),
        (
            P.POINTS_MOVEMENT_KIND_ACCRUE,
            1_000,
            events_pb2.POINTS_SOURCE_PARTNER_CONVERSION,
            second.conversion_id,
        ),
        (
            P.POINTS_MOVEMENT_KIND_ACCRUE,
            2,
            events_pb2.POINTS_SOURCE_PARTNER_CONVERSION,
            first.conversion_id,
        ),
    ]
    outbox = await rig.loyalty.outbox()
    accrued = events_of(outbox, "loyalty.v1.points.accrued", events_pb2.PointsAccrued)
    assert [(e.points, e.source) for e in accrued] == [
        (2, events_pb2.POINTS_SOURCE_PARTNER_CONVERSION),
        (1_000, events_pb2.POINTS_SOURCE_PARTNER_CONVERSION),
    ]
    spent = events_of(outbox, "loyalty.v1.points.spent", events_pb2.PointsSpent)
    assert [(e.points, e.source, e.reference, e.balance_after) for e in spent] == [
        (100, events_pb2.POINTS_SOURCE_PARTNER_CONVERSION, out.conversion_id, 902)
    ]

    # Rounding out, at 3 chain points for 2 bank points: 10 chain points
    # are worth 6.67 bank points; 6, for 9 chain points (the 10th stays).
    await rig.set_terms(
        P.PartnerConversion(partner_id="bank-a", enabled=True, to_partner=way(2, 3))
    )
    rounded = await bank.ConvertToPartnerPoints(to_partner(ann, 10))
    assert (rounded.requested_points, rounded.chain_points, rounded.partner_points) == (10, 9, 6)
    assert rounded.balance_after == 893
    # That took the way in away.
    details = await refused(
        bank.ConvertToChainPoints(to_chain(ann, 100)), grpc.StatusCode.PERMISSION_DENIED
    )
    assert details["reason"] == "CONVERSION_NOT_ENABLED"

    # Reconciling: the bank's conversions, oldest first, and one by id.
    listed = await bank.ListConversions(PP.ListConversionsRequest())
    assert [c.sequence for c in listed.conversions] == [1, 2, 3, 4]
    assert [c.conversion_id for c in listed.conversions] == [
        first.conversion_id,
        second.conversion_id,
        out.conversion_id,
        rounded.conversion_id,
    ]
    later = await bank.ListConversions(PP.ListConversionsRequest(after_sequence=2, page_size=1))
    assert [c.conversion_id for c in later.conversions] == [out.conversion_id]
    assert await bank.GetConversion(PP.GetConversionRequest(conversion_id=out.conversion_id)) == out

    # Turned off: conversions are refused, but what was done can still be
    # read, and a retry of it still answers.
    await rig.set_terms(P.PartnerConversion(partner_id="bank-a", enabled=False))
    details = await refused(
        bank.ConvertToPartnerPoints(to_partner(ann, 10)), grpc.StatusCode.PERMISSION_DENIED
    )
    assert details["reason"] == "CONVERSION_NOT_ENABLED"
    assert await bank.ConvertToChainPoints(to_chain(ann, 25, request_id="in-1")) == first
    assert len((await bank.ListConversions(PP.ListConversionsRequest())).conversions) == 4

    # Another bank sees none of it, and may use the same request ids.
    other = rig.bank(rig.pki.bank_b)
    await refused(
        other.GetConversion(PP.GetConversionRequest(conversion_id=out.conversion_id)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert (await other.ListConversions(PP.ListConversionsRequest())).conversions == []
    await rig.set_terms(P.PartnerConversion(partner_id="bank-b", enabled=True, to_chain=way(5, 2)))
    theirs = await other.ConvertToChainPoints(to_chain(ann, 12, request_id="in-1"))
    assert theirs.conversion_id != first.conversion_id and theirs.sequence == 1
    assert (theirs.partner_points, theirs.chain_points) == (10, 4)


async def test_concurrent_conversions_out_never_overdraw(rig: Rig) -> None:
    await rig.set_terms(BANK_A_TERMS)
    bob = await rig.enroll("13800138002")
    bank = rig.bank(rig.pki.bank_a)
    await bank.ConvertToChainPoints(to_chain(bob, 1_000))  # 100 chain points
    requests = [to_partner(bob, 30) for _ in range(8)]
    outcomes = await asyncio.gather(
        *(bank.ConvertToPartnerPoints(r) for r in requests), return_exceptions=True
    )
    done = [o for o in outcomes if isinstance(o, PP.Conversion)]
    failed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(done) == 3 and len(failed) == 5
    for error in failed:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rpc_details(error)["reason"] == "POINTS_INSUFFICIENT"
    assert await rig.available(bob) == 10
    # Numbered with no gaps, in commit order, the refused ones not at all.
    listed = (await bank.ListConversions(PP.ListConversionsRequest())).conversions
    assert [c.sequence for c in listed] == [1, 2, 3, 4]
    assert sorted(c.balance_after for c in listed[1:]) == [10, 40, 70]
    # Retries of all of them together: the same answers, nothing more.
    retried = await asyncio.gather(
        *(bank.ConvertToPartnerPoints(r) for r in requests), return_exceptions=True
    )
    assert {r.conversion_id for r in retried if isinstance(r, PP.Conversion)} == {
        c.conversion_id for c in done
    }
    assert await rig.available(bob) == 10


# -- refusals -----------------------------------------------------------------------------


async def test_what_is_refused(rig: Rig) -> None:
    cat = await rig.enroll("13800138003")
    bank = rig.bank(rig.pki.bank_a)

    # No terms yet, then terms that leave a way out.
    details = await refused(
        bank.ConvertToChainPoints(to_chain(cat, 100)), grpc.StatusCode.PERMISSION_DENIED
    )
    assert details["reason"] == "CONVERSION_NOT_ENABLED"
    await rig.set_terms(
        P.PartnerConversion(
            partner_id="bank-a",
            enabled=True,
            to_chain=way(10, 1, min_points=50, max_points=5_000, daily_chain_points_per_member=600),
        )
    )
    details = await refused(
        bank.ConvertToPartnerPoints(to_partner(cat, 1)), grpc.StatusCode.PERMISSION_DENIED
    )
    assert details["reason"] == "CONVERSION_NOT_ENABLED"

    # The terms' limits.
    for points in (49, 5_001):
        details = await refused(
            bank.ConvertToChainPoints(to_chain(cat, points)), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert details["reason"] == "CONVERSION_AMOUNT_OUT_OF_RANGE"
        assert details["metadata"]["min"] == "50" and details["metadata"]["max"] == "5000"
    for _ in range(2):
        await bank.ConvertToChainPoints(to_chain(cat, 3_000))  # 300 chain points each
    details = await refused(
        bank.ConvertToChainPoints(to_chain(cat, 50)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "CONVERSION_DAILY_LIMIT_EXCEEDED"
    assert details["metadata"]["used"] == "600"

    # Too few points to convert out.
    await rig.set_terms(BANK_A_TERMS)
    details = await refused(
        bank.ConvertToPartnerPoints(to_partner(cat, 601)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "POINTS_INSUFFICIENT"
    assert details["metadata"] == {"available": "600", "asked": "601"}

    # Unknown members, by id or by mobile; malformed requests.
    for request in (to_chain("M-NOBODY", 100), to_chain("13900000000", 100)):
        details = await refused(bank.ConvertToChainPoints(request), grpc.StatusCode.NOT_FOUND)
        assert details["reason"] == "MEMBER_NOT_FOUND"
    details = await refused(
        bank.ConvertToPartnerPoints(to_partner("M-NOBODY", 1)), grpc.StatusCode.NOT_FOUND
    )
    assert details["reason"] == "MEMBER_NOT_FOUND"
    for bad, field_name in (
        (to_chain(cat, 0), "partner_points"),
        (to_chain(cat, 100, partner_reference=""), "partner_reference"),
        (to_chain(cat, 100, request_id=""), "request_id"),
        (
            PP.ConvertToChainPointsRequest(
                request_id=rid(), partner_points=100, partner_reference="x"
            ),
            "member_id",
        ),
    ):
        details = await refused(bank.ConvertToChainPoints(bad), grpc.StatusCode.INVALID_ARGUMENT)
        assert field_name in details["violations"]
    assert await rig.available(cat) == 600

    # A member loyalty has not heard of yet (the enrollment's event still on
    # its way) is asked of members.
    dan = await rig.enroll("13800138004")
    async with rig.loyalty.db.transaction() as session:
        await session.execute(
            sa.delete(member_store.known_members).where(
                member_store.known_members.c.member_id == dan
            )
        )
    assert (await bank.ConvertToChainPoints(to_chain(dan, 100))).chain_points == 10
    assert await rig.known(dan) is not None

    # A suspended partner is refused; a stranger's certificate (the partner
    # CA's, registered nowhere) too.
    await rig.set_terms(P.PartnerConversion(partner_id="bank-b", enabled=True, to_chain=way(1, 1)))
    await rig.cards.partners.SuspendPartner(
        PT.SuspendPartnerRequest(request_id=rid(), partner_id="bank-b", reason="audit"),
        metadata=HQ,
    )
    details = await refused(
        rig.bank(rig.pki.bank_b).ConvertToChainPoints(to_chain(cat, 100)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert details["reason"] == "PARTNER_SUSPENDED"
    details = await refused(
        rig.bank(rig.pki.stranger).ListConversions(PP.ListConversionsRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert details["reason"] == "CERTIFICATE_NOT_REGISTERED"

    # Another CA's certificate, or none: the handshake fails, no call is made.
    for client in (rig.pki.forged, None):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rig.bank(client).ListConversions(PP.ListConversionsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    # A revoked certificate is refused at the very next call, on a channel
    # that worked a moment ago.
    assert len((await bank.ListConversions(PP.ListConversionsRequest())).conversions) == 3
    await rig.cards.partners.RevokePartnerCertificate(
        PT.RevokePartnerCertificateRequest(
            request_id=rid(), partner_id="bank-a", sha256_fingerprint=fingerprint(rig.pki.bank_a)
        ),
        metadata=HQ,
    )
    for call in (
        bank.ListConversions(PP.ListConversionsRequest()),
        bank.ConvertToChainPoints(to_chain(cat, 100)),
    ):
        details = await refused(call, grpc.StatusCode.UNAUTHENTICATED)
        assert details["reason"] == "CERTIFICATE_NOT_REGISTERED"

    # The ordinary port does not serve partners, and a token is no partner.
    await refused(
        partner_points_pb2_grpc.PartnerPointsServiceStub(
            rig.suite.channels["loyalty"]
        ).ListConversions(PP.ListConversionsRequest(), metadata=HQ),
        grpc.StatusCode.UNIMPLEMENTED,
    )
    assert await rig.available(cat) == 600


# -- HQ's terms ---------------------------------------------------------------------------


async def test_hq_sets_the_terms(rig: Rig) -> None:
    saved = await rig.set_terms(BANK_A_TERMS)
    assert saved.partner_id == "bank-a" and saved.enabled and saved.etag
    assert (saved.to_chain.rate.partner_points, saved.to_chain.rate.chain_points) == (10, 1)
    assert saved.updated_by.principal == "test-admin"
    read = await rig.terms.GetPartnerConversion(
        P.GetPartnerConversionRequest(partner_id="bank-a"), metadata=OP_S001
    )
    assert read == saved
    # Only HQ admins set them; staff read them.
    await refused(rig.set_terms(BANK_A_TERMS, metadata=MGR_S001), grpc.StatusCode.PERMISSION_DENIED)
    # The etag last read, when sent, must be the current one.
    changed = P.PartnerConversion()
    changed.CopyFrom(BANK_A_TERMS)
    changed.to_partner.rate.partner_points = 7
    updated = await rig.set_terms(changed, etag=saved.etag)
    assert updated.to_partner.rate.partner_points == 7 and updated.etag != saved.etag
    details = await refused(rig.set_terms(changed, etag=saved.etag), grpc.StatusCode.ABORTED)
    assert details["reason"] == "ETAG_MISMATCH"
    # A retry of the same request is the first answer.
    request = P.SetPartnerConversionRequest(request_id=rid(), partner_conversion=BANK_A_TERMS)
    first = await rig.terms.SetPartnerConversion(request, metadata=HQ)
    assert await rig.terms.SetPartnerConversion(request, metadata=HQ) == first

    # The partner must be in cards' registry; the terms must make sense.
    details = await refused(
        rig.set_terms(P.PartnerConversion(partner_id="bank-z", enabled=False)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details["reason"] == "PARTNER_NOT_FOUND"
    details = await refused(
        rig.set_terms(
            P.PartnerConversion(
                partner_id="bank-b",
                enabled=True,
                to_chain=way(0, 1),
                to_partner=way(10, 1, max_points=0, daily_chain_points_per_member=-1),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {
        "partner_conversion.to_chain.rate.partner_points",
        "partner_conversion.to_partner.daily_chain_points_per_member",
    }
    await refused(
        rig.terms.GetPartnerConversion(
            P.GetPartnerConversionRequest(partner_id="bank-b"), metadata=HQ
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await rig.set_terms(P.PartnerConversion(partner_id="bank-b", enabled=False))
    listed: list[str] = []
    page_token = ""
    while True:
        page = await rig.terms.ListPartnerConversions(
            P.ListPartnerConversionsRequest(page_size=1, page_token=page_token), metadata=OP_S001
        )
        listed.extend(c.partner_id for c in page.partner_conversions)
        page_token = page.next_page_token
        if not page_token:
            break
    assert listed == ["bank-a", "bank-b"]

    # What `cornucopia up` loads: the demo bank, then its terms; again, nothing changes.
    await load_demo_cards(rig.suite.channels["cards"], token(), None)
    for _ in range(2):
        await load_demo_conversion(rig.suite.channels["loyalty"], token())
    demo = await rig.terms.GetPartnerConversion(
        P.GetPartnerConversionRequest(partner_id="demo-bank"), metadata=HQ
    )
    assert demo.enabled
    assert (demo.to_chain.rate.partner_points, demo.to_chain.rate.chain_points) == (10, 1)
    assert (demo.to_partner.rate.partner_points, demo.to_partner.rate.chain_points) == (8, 1)


# -- the migration and `cornucopia up` ------------------------------------------------------


async def test_the_conversion_migration_matches_the_tables(database_url: DatabaseFactory) -> None:
    """The migrated schema of the conversion tables is the one the code
    declares; 0005 rolls back and applies again."""
    from chassis.db import Database
    from services.loyalty.store import conversions, metadata  # noqa: F401

    db = Database(await database_url("loyalty"))
    migrations = loyalty_definition.migrations_dir
    mine = {"conversion_terms", "conversions"}
    try:
        await migrate(db, migrations, "loyalty", "0005")
        assert await schema_drift(db, metadata, mine) == []
        await migrate(db, migrations, "loyalty", "0004", down=True)
        async with db.engine.connect() as conn:
            assert not await conn.run_sync(lambda c: sa.inspect(c).has_table("conversions"))
        await migrate(db, migrations, "loyalty", "0005")
        assert await schema_drift(db, metadata, mine) == []
    finally:
        await db.engine.dispose()


def test_cornucopia_up_gives_loyalty_a_partner_port() -> None:
    partners = supervisor.partner_services()
    assert "loyalty" in partners and "cards" in partners
    ports = supervisor.preferred_ports(nats=True, partners=partners)
    assert ports["loyalty-partner"] == DEFAULT_GRPC_PORTS["loyalty"] + 1000
