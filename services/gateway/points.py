"""Members' points, gifts and tiers over HTTP, in front of the loyalty
service's PointsService, GiftsService and TiersService: a member's points
account, history and lots, adjustments and transfers, the gift catalogue
and redemptions, a member's tier and its history.

As with the card routes, who may do what is the loyalty service's business
(any staff member reads and redeems; managers adjust): the gateway checks
the token is genuine, forwards it and maps the answer. Every POST takes an
Idempotency-Key, the service's request_id: a retry gets the first answer,
never points moved twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request

from cornucopia.loyalty.v1 import points_pb2, rules_pb2
from services.gateway.card_schemas import MAX_ID_LENGTH
from services.gateway.deps import (
    READ_PROBLEMS,
    Key,
    PageSize,
    PageToken,
    Token,
    change_problems,
    peers_of,
)
from services.gateway.loyalty_client import GiftId, MemberId, call_loyalty
from services.gateway.loyalty_schemas import (
    GiftPage,
    GiftRedemption,
    MemberTier,
    NewGiftRedemption,
    PointsAccount,
    PointsAdjustment,
    PointsAdjustmentResult,
    PointsHistoryPage,
    PointsLotPage,
    PointsTransfer,
    PointsTransferResult,
    TierHistoryPage,
    adjustment_from_proto,
    loyalty_field,
    points_account_from_proto,
)
from services.gateway.schemas import from_proto

T = TypeVar("T")

router = APIRouter()

_KEY_422 = "an Idempotency-Key reused for a different request (IDEMPOTENCY_KEY_REUSED)"
_MEMBER_422 = "the member's state (MEMBER_MERGED, MEMBER_ERASED, MEMBER_ARCHIVED)"

# The problems of each kind of route.
READ = READ_PROBLEMS
ADJUST = change_problems(
    "POINTS_INSUFFICIENT (taking away more than is available; the metadata says how many "
    f"are), {_MEMBER_422}, or {_KEY_422}."
)
TRANSFER = change_problems(
    f"POINTS_INSUFFICIENT (the sender has too few available), {_MEMBER_422}, or {_KEY_422}."
)
REDEEM = change_problems(
    "GIFT_INACTIVE, GIFT_OUT_OF_STOCK (neither the store nor the chain has enough), "
    f"POINTS_INSUFFICIENT, {_MEMBER_422}, or {_KEY_422}."
)


async def _call(method: Callable[..., Awaitable[T]], message: Any, token: str) -> T:
    """A call to the loyalty service whose problems name these routes' fields."""
    return await call_loyalty(method, message, token, loyalty_field)


# -- points -------------------------------------------------------------------------


@router.get(
    "/v1/members/{member_id}/points",
    tags=["points"],
    summary="A member's points",
    description="The balance, what checkouts in progress hold, what is available and its cash "
    "value, what expires next and what expires soon. A member with no points reads as zero. "
    "Any staff member, and services.",
    responses=READ,
    operation_id="getPointsAccount",
)
async def get_points_account(member_id: MemberId, request: Request, token: Token) -> PointsAccount:
    account = await _call(
        peers_of(request).points.GetPointsAccount,
        points_pb2.GetPointsAccountRequest(member_id=member_id),
        token,
    )
    return points_account_from_proto(account)


@router.get(
    "/v1/members/{member_id}/points/history",
    tags=["points"],
    summary="A member's points history",
    description="Every movement (earned, spent, redeemed, expired, adjusted, reversed, "
    "transferred, ...), newest first, a page at a time, with the balance after each.",
    responses=READ,
    operation_id="listPointsHistory",
)
async def list_points_history(
    member_id: MemberId,
    request: Request,
    token: Token,
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> PointsHistoryPage:
    reply = await _call(
        peers_of(request).points.ListPointsHistory,
        points_pb2.ListPointsHistoryRequest(
            member_id=member_id, page_size=page_size, page_token=page_token
        ),
        token,
    )
    return from_proto(PointsHistoryPage, reply)


@router.get(
    "/v1/members/{member_id}/points/lots",
    tags=["points"],
    summary="A member's points lots",
    description="Each gain of points with its source and expiry, in the order spending takes "
    "them (earliest expiry first), a page at a time.",
    responses=READ,
    operation_id="listPointsLots",
)
async def list_points_lots(
    member_id: MemberId,
    request: Request,
    token: Token,
    *,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    only_open: Annotated[bool, Query(description="Only lots with points left.")] = False,
) -> PointsLotPage:
    reply = await _call(
        peers_of(request).points.ListPointsLots,
        points_pb2.ListPointsLotsRequest(
            member_id=member_id, only_open=only_open, page_size=page_size, page_token=page_token
        ),
        token,
    )
    return from_proto(PointsLotPage, reply)


@router.post(
    "/v1/members/{member_id}/points/adjustments",
    tags=["points"],
    summary="Adjust a member's points",
    description="Adds points (a new lot expiring by the chain's policy) or takes them away "
    "(from the lots that expire first), with a reason kept in the history. HQ admins and "
    "store managers. Needs an `Idempotency-Key`.",
    status_code=201,
    response_description="The movement and the account right after it.",
    responses=ADJUST,
    operation_id="adjustPoints",
)
async def adjust_points(
    member_id: MemberId, body: PointsAdjustment, request: Request, token: Token, key: Key
) -> PointsAdjustmentResult:
    reply = await _call(peers_of(request).points.AdjustPoints, body.to_proto(key, member_id), token)
    return adjustment_from_proto(reply)


@router.post(
    "/v1/points/transfers",
    tags=["points"],
    summary="Transfer points",
    description="Moves points from one member to another (a family): they are taken from the "
    "sender's lots that expire first and the receiver gets lots with the same expiry. Any "
    "staff member. Needs an `Idempotency-Key`.",
    status_code=201,
    response_description="Both movements and the receiver's new lots.",
    responses=TRANSFER,
    operation_id="transferPoints",
)
async def transfer_points(
    body: PointsTransfer, request: Request, token: Token, key: Key
) -> PointsTransferResult:
    reply = await _call(peers_of(request).points.TransferPoints, body.to_proto(key), token)
    return from_proto(PointsTransferResult, reply)


# -- gifts --------------------------------------------------------------------------


@router.get(
    "/v1/gifts",
    tags=["gifts"],
    summary="List gifts",
    description="The gift catalogue by gift id, a page at a time, with the stock a store sees "
    "(its own and the chain-wide). A store's staff see their own store's stock by default. "
    "HQ admins manage the catalogue and the stock (over gRPC).",
    responses=READ,
    operation_id="listGifts",
)
async def list_gifts(
    request: Request,
    token: Token,
    *,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    store_id: Annotated[
        str, Query(max_length=MAX_ID_LENGTH, description="The store whose stock to show.")
    ] = "",
    active_only: Annotated[bool, Query(description="Only gifts that can be redeemed.")] = False,
) -> GiftPage:
    reply = await _call(
        peers_of(request).gifts.ListGifts,
        points_pb2.ListGiftsRequest(
            store_id=store_id, active_only=active_only, page_size=page_size, page_token=page_token
        ),
        token,
    )
    return from_proto(GiftPage, reply)


@router.post(
    "/v1/gifts/{gift_id}/redemptions",
    tags=["gifts"],
    summary="Redeem a gift",
    description="A member takes `quantity` of the gift for its points price each, from the "
    "store's stock when it has enough, otherwise the chain-wide stock. Any staff member, at "
    "their own store. Needs an `Idempotency-Key`: a retry gets the first redemption.",
    status_code=201,
    response_description="The redemption and the member's points after it.",
    responses=REDEEM,
    operation_id="redeemGift",
)
async def redeem_gift(
    gift_id: GiftId, body: NewGiftRedemption, request: Request, token: Token, key: Key
) -> GiftRedemption:
    reply = await _call(peers_of(request).gifts.RedeemGift, body.to_proto(key, gift_id), token)
    return from_proto(GiftRedemption, reply)


# -- tiers --------------------------------------------------------------------------


@router.get(
    "/v1/members/{member_id}/tier",
    tags=["tiers"],
    summary="A member's tier",
    description="The member's tier with its benefits, since when, the end of a grace period "
    "if in one, and the progress to the next tier (spend and visits still needed). The "
    "lowest tier for a member who never bought. Any staff member.",
    responses=READ,
    operation_id="getMemberTier",
)
async def get_member_tier(member_id: MemberId, request: Request, token: Token) -> MemberTier:
    tier = await _call(
        peers_of(request).tiers.GetMemberTier,
        rules_pb2.GetMemberTierRequest(member_id=member_id),
        token,
    )
    return from_proto(MemberTier, tier)


@router.get(
    "/v1/members/{member_id}/tier/history",
    tags=["tiers"],
    summary="A member's tier history",
    description="Upgrades, downgrades and grace periods, newest first, a page at a time.",
    responses=READ,
    operation_id="listTierHistory",
)
async def list_tier_history(
    member_id: MemberId,
    request: Request,
    token: Token,
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> TierHistoryPage:
    reply = await _call(
        peers_of(request).tiers.ListTierHistory,
        rules_pb2.ListTierHistoryRequest(
            member_id=member_id, page_size=page_size, page_token=page_token
        ),
        token,
    )
    return from_proto(TierHistoryPage, reply)
