"""Cards beside a real members service: a card issued right after the
enrollment (before its event arrives), the mobile as e-card resolved
through members' LookupMember, and members' merge and archive reaching the
cards through the bus. On SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

import grpc

from chassis.auth import Role, Scope, ScopeLevel
from cornucopia.cards.v1 import cards_pb2 as C
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc, organisation_pb2_grpc
from cornucopia.members.v1 import organisation_pb2 as O
from services.cards.store import projections
from services.members.server import definition as members_definition
from tests.integration.conftest import Suite, auth, eventually, token
from tests.integration.infra import DatabaseFactory
from tests.integration.test_cards_lifecycle import (
    create_program,
    issue,
    known_member,
    program,
    refused,
    start_cards,
)

HQ = auth()
OP_S001 = auth(token((Role.STORE_OPERATOR,), Scope(ScopeLevel.STORE, "S001"), "op-1"))


async def test_e_card_and_members_lifecycle_through_a_real_members_service(
    suite: Suite, database_url: DatabaseFactory
) -> None:
    await suite.start(members_definition, await database_url("members"))
    organisation = organisation_pb2_grpc.OrganisationServiceStub(suite.channels["members"])
    members = members_pb2_grpc.MembersServiceStub(suite.channels["members"])
    await organisation.CreateRegion(
        O.CreateRegionRequest(
            request_id="r", region=O.Region(region_id="EAST", display_name="华东")
        ),
        metadata=HQ,
    )
    await organisation.CreateStore(
        O.CreateStoreRequest(
            request_id="s",
            store=O.Store(
                store_id="S001",
                region_id="EAST",
                display_name="门店 S001",
                address=O.StoreAddress(province="江苏省", city="南京市", street="中山路 1 号"),
                time_zone="Asia/Shanghai",
                currency_code="CNY",
            ),
        ),
        metadata=HQ,
    )
    c = await start_cards(suite, database_url, members_port=suite.runtimes["members"].port)
    await create_program(c, program())

    async def enroll(mobile: str) -> str:
        created = await members.CreateMember(
            M.CreateMemberRequest(
                request_id=str(uuid.uuid4()),
                member=M.Member(
                    home_store_id="S001",
                    given_name="娜",
                    mobile=mobile,
                    preferred_language="zh-CN",
                ),
            ),
            metadata=HQ,
        )
        return created.member_id

    first = await enroll("+8613800138000")
    # Issued at once: cards asks members about a member it has not heard of.
    card = await issue(c, first)
    assert card.member_id == first

    resolved = await c.cards.ResolveCard(
        C.ResolveCardRequest(mobile="138 0013 8000"), metadata=OP_S001
    )
    assert (resolved.card.card_id, resolved.resolved_by, resolved.can_pay) == (
        card.card_id,
        C.RESOLVED_BY_MOBILE,
        True,
    )
    details = await refused(
        c.cards.ResolveCard(C.ResolveCardRequest(mobile="13900139000"), metadata=OP_S001),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details["reason"] == "MEMBER_NOT_FOUND"
    details = await refused(
        c.cards.ResolveCard(C.ResolveCardRequest(mobile="12"), metadata=OP_S001),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details["violations"]) == {"mobile"}
    # The member's mobile stops paying when the card is lost.
    await c.cards.ReportCardLost(
        C.ReportCardLostRequest(request_id="lost", card_id=card.card_id), metadata=OP_S001
    )
    resolved = await c.cards.ResolveCard(
        C.ResolveCardRequest(mobile="+86 138 0013 8000"), metadata=OP_S001
    )
    assert (resolved.can_pay, resolved.refusal_reason) == (False, "CARD_LOST")
    await c.cards.CancelCardLoss(
        C.CancelCardLossRequest(request_id="found", card_id=card.card_id), metadata=OP_S001
    )

    # A merge in members moves the duplicate's card to the survivor; the
    # duplicate's mobile then finds the survivor's card.
    second = await enroll("+8613900139001")
    await eventually(lambda: known_member(c, second), lambda m: m is not None)
    silver = program("SILVER", "7700")
    await create_program(c, silver)
    duplicate_card = await issue(c, second, program_id="SILVER")
    await members.MergeMembers(
        M.MergeMembersRequest(
            request_id="merge", survivor_member_id=first, duplicate_member_id=second
        ),
        metadata=HQ,
    )

    async def holder() -> str:
        got = await c.cards.GetCard(C.GetCardRequest(card_id=duplicate_card.card_id), metadata=HQ)
        return got.member_id

    await eventually(holder, lambda m: m == first)
    by_old_mobile = await c.cards.ResolveCard(
        C.ResolveCardRequest(mobile="13900139001"), metadata=OP_S001
    )
    assert by_old_mobile.card.member_id == first

    # Archived in members: no new card.
    third = await enroll("+8613700137002")
    await members.ArchiveMember(M.ArchiveMemberRequest(member_id=third), metadata=HQ)

    async def status() -> projections.MemberStatus | None:
        known = await known_member(c, third)
        return None if known is None else known.status

    await eventually(status, lambda s: s == projections.MemberStatus.ARCHIVED)
    details = await refused(issue(c, third), grpc.StatusCode.FAILED_PRECONDITION)
    assert details["reason"] == "MEMBER_NOT_ACTIVE"
