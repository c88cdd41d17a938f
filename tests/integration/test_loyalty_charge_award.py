"""PointsService's service-only calls, on SQLite and PostgreSQL through real
gRPC: ChargePoints (the lots that expire first, POINTS_INSUFFICIENT, bound
to its request id for good, loyalty.v1.points.spent of source CAMPAIGN)
and AwardPoints (a BONUS lot with its reason, idempotent), and who may call
them."""

from __future__ import annotations

import asyncio

import grpc

from chassis.auth import Role, Scope, ScopeLevel
from cornucopia.loyalty.v1 import events_pb2, points_pb2
from tests.integration.conftest import auth, token
from tests.integration.test_cards_lifecycle import refused
from tests.integration.test_loyalty_points import (
    HQ,
    OP_S001,
    Loyalty,
    enroll,
    events_of,
    loyalty,  # noqa: F401 - the fixture
)

P = points_pb2
CAMPAIGNS = auth(token((Role.SERVICE,), Scope(ScopeLevel.HQ), "campaigns"))


async def charge(
    lo: Loyalty, member_id: str, points: int, **extra: object
) -> P.ChargePointsResponse:
    metadata = extra.pop("metadata", CAMPAIGNS)
    fields: dict[str, object] = {"request_id": "c-1", "reason": "lottery draw", "reference": "D1"}
    fields.update(extra)
    return await lo.points.ChargePoints(
        P.ChargePointsRequest(member_id=member_id, points=points, **fields),  # type: ignore[arg-type]
        metadata=metadata,
    )


async def award(lo: Loyalty, member_id: str, points: int, **extra: object) -> P.AwardPointsResponse:
    metadata = extra.pop("metadata", CAMPAIGNS)
    fields: dict[str, object] = {"request_id": "a-1", "reason": "lottery prize", "reference": "D1"}
    fields.update(extra)
    return await lo.points.AwardPoints(
        P.AwardPointsRequest(member_id=member_id, points=points, **fields),  # type: ignore[arg-type]
        metadata=metadata,
    )


async def test_charge_and_award(loyalty: Loyalty) -> None:  # noqa: F811
    lo = loyalty
    await enroll(lo, "M-ANN")
    await lo.accrue("M-ANN", 300, reference="sale-1")
    await lo.accrue("M-ANN", 200, reference="sale-2")

    # Award: a BONUS lot with the reason in the history; the same request
    # is the same lot, another under the same id is refused.
    given = await award(lo, "M-ANN", 50, request_id="a-1")
    assert given.lot.points == 50 and given.lot.source == events_pb2.POINTS_SOURCE_BONUS
    assert given.lot.reference == "D1" and given.account.balance == 550
    assert await award(lo, "M-ANN", 50, request_id="a-1") == given
    details = await refused(
        award(lo, "M-ANN", 51, request_id="a-1"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"
    details = await refused(award(lo, "M-NOBODY", 5, request_id="a-2"), grpc.StatusCode.NOT_FOUND)
    assert details["reason"] == "MEMBER_NOT_FOUND"

    # Charge: from the lots that expire first, never more than available.
    done = await charge(lo, "M-ANN", 400, request_id="c-1")
    assert done.movement.kind == P.POINTS_MOVEMENT_KIND_CHARGE
    assert done.movement.points == -400 and done.movement.reason == "lottery draw"
    assert done.movement.source == events_pb2.POINTS_SOURCE_CAMPAIGN
    assert done.movement.stamp.principal == "campaigns"
    assert done.account.balance == 150
    assert await charge(lo, "M-ANN", 400, request_id="c-1") == done
    details = await refused(
        charge(lo, "M-ANN", 401, request_id="c-1"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["reason"] == "IDEMPOTENCY_KEY_REUSED"
    details = await refused(
        charge(lo, "M-ANN", 151, request_id="c-2"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details["reason"] == "POINTS_INSUFFICIENT"
    assert details["metadata"] == {"available": "150", "asked": "151"}
    lots = await lo.lots("M-ANN", only_open=True)
    assert [x.remaining for x in lots] == [100, 50]

    # Bad requests and callers who are not a service.
    for bad in ({"reason": ""}, {"request_id": ""}, {"reference": "x" * 101}):
        await refused(charge(lo, "M-ANN", 5, **bad), grpc.StatusCode.INVALID_ARGUMENT)
        await refused(award(lo, "M-ANN", 5, **bad), grpc.StatusCode.INVALID_ARGUMENT)
    await refused(charge(lo, "M-ANN", 0, request_id="c-3"), grpc.StatusCode.INVALID_ARGUMENT)
    for metadata in (HQ, OP_S001):
        await refused(
            charge(lo, "M-ANN", 5, request_id="c-4", metadata=metadata),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        await refused(
            award(lo, "M-ANN", 5, request_id="a-4", metadata=metadata),
            grpc.StatusCode.PERMISSION_DENIED,
        )

    outbox = await lo.outbox()
    spent = events_of(outbox, "loyalty.v1.points.spent", events_pb2.PointsSpent)
    assert [(e.points, e.source, e.reference) for e in spent] == [
        (400, events_pb2.POINTS_SOURCE_CAMPAIGN, "D1")
    ]
    history = await lo.history("M-ANN")
    assert history[1].reason == "lottery prize"


async def test_concurrent_charges_never_overspend(loyalty: Loyalty) -> None:  # noqa: F811
    lo = loyalty
    await enroll(lo, "M-ANN")
    await lo.accrue("M-ANN", 1_000)

    async def one(i: int) -> bool:
        try:
            await charge(lo, "M-ANN", 300, request_id=f"c-{i}")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(8)))
    assert sum(results) == 3
    assert (await lo.account("M-ANN")).balance == 100
