"""The gift catalogue's gRPC edge: gifts, their stock per store and
chain-wide, redemptions. The checks are in domain/gifts.py; a redemption's
writes (stock, points, history, events) in points_ledger.py."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, ScopeLevel, current_principal
from chassis.db import utcnow
from chassis.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, request_fingerprint, run_idempotent
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.loyalty.v1 import points_pb2 as pb
from cornucopia.loyalty.v1 import points_pb2_grpc
from services.loyalty import points_ledger as ledger
from services.loyalty.domain import gifts as rules
from services.loyalty.domain.gifts import CHAIN_WIDE, Gift
from services.loyalty.domain.points import Stamp
from services.loyalty.points_ledger import audit_stamp
from services.loyalty.store import gifts as store
from services.loyalty.store.gifts import GiftRecord, RedemptionRecord

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
REDEEMING_ROLES = (*STAFF_ROLES, Role.SERVICE)
STOCKING_ROLES = (Role.HQ_ADMIN, Role.STORE_MANAGER)


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def _stamp(principal: Principal, now: dt.datetime) -> Stamp:
    return Stamp(principal.subject, principal.store_id, now)


def gift_not_found(gift_id: str) -> NotFound:
    return NotFound("no gift with this id", reason="GIFT_NOT_FOUND", metadata={"gift_id": gift_id})


def gift_to_proto(record: GiftRecord, store_id: str, stock: dict[Any, int]) -> pb.Gift:
    gift = record.gift
    return pb.Gift(
        gift_id=gift.gift_id,
        name=gift.name,
        points_price=gift.points_price,
        active=gift.active,
        etag=record.etag,
        store_id=store_id,
        store_quantity=stock.get((gift.gift_id, store_id), 0) if store_id else 0,
        chain_quantity=stock.get((gift.gift_id, CHAIN_WIDE), 0),
        created_by=audit_stamp(record.created),
        updated_by=audit_stamp(record.updated),
    )


def redemption_to_proto(record: RedemptionRecord) -> pb.GiftRedemption:
    return pb.GiftRedemption(
        redemption_id=record.redemption_id,
        member_id=record.member_id,
        gift_id=record.gift_id,
        store_id=record.store_id,
        quantity=record.quantity,
        points=record.points,
        stock_store_id=record.stock_store_id,
        balance_after=record.balance_after,
        stamp=audit_stamp(record.stamp),
    )


def _reading_store(principal: Principal, store_id: str) -> str:
    """The store whose stock a reader sees: a store's staff their own."""
    wanted = store_id.strip()
    if principal.scope.level == ScopeLevel.STORE:
        wanted = wanted or principal.scope.id
    if wanted:
        principal.require_store(wanted)
    return wanted


def _redeeming_store(principal: Principal, store_id: str) -> str:
    """Where a redemption happens: a store's staff at their own store;
    others name a store, or none for the chain-wide stock."""
    return _reading_store(principal, store_id)


class GiftsServicer(points_pb2_grpc.GiftsServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db

    @staticmethod
    async def _gift(session: AsyncSession, gift_id: str, store_id: str) -> pb.Gift:
        record = await store.get_gift(session, gift_id)
        if record is None:
            raise gift_not_found(gift_id)
        return gift_to_proto(record, store_id, await store.stock(session, [gift_id], store_id))

    async def CreateGift(self, request: pb.CreateGiftRequest, context: Context) -> pb.Gift:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        given = request.gift
        gift = rules.check_gift(
            Gift(given.gift_id.strip(), given.name, given.points_price, given.active)
        )
        stamp = _stamp(principal, utcnow())

        async def create(session: AsyncSession) -> pb.Gift:
            if not await store.insert_gift(session, gift, stamp):
                raise AlreadyExists(
                    "a gift with this id exists",
                    reason="GIFT_EXISTS",
                    metadata={"gift_id": gift.gift_id},
                )
            return await self._gift(session, gift.gift_id, "")

        return await run_idempotent(
            self.db,
            method="loyalty.CreateGift",
            request_id=request.request_id,
            request=request,
            response_type=pb.Gift,
            work=create,
        )

    async def UpdateGift(self, request: pb.UpdateGiftRequest, context: Context) -> pb.Gift:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        mask = rules.check_update_mask(request.update_mask.paths)
        gift_id = _required(request.gift.gift_id, "gift.gift_id")
        given = request.gift
        stamp = _stamp(principal, utcnow())

        async def update(session: AsyncSession) -> pb.Gift:
            current = await store.get_gift(session, gift_id, for_update=True)
            if current is None:
                raise gift_not_found(gift_id)
            if given.etag and given.etag != current.etag:
                raise Aborted(
                    "the gift changed since you read it; read it again",
                    reason="ETAG_MISMATCH",
                    metadata={"etag": current.etag},
                )
            before = current.gift
            changed = rules.check_gift(
                Gift(
                    gift_id,
                    given.name if "name" in mask else before.name,
                    given.points_price if "points_price" in mask else before.points_price,
                    given.active if "active" in mask else before.active,
                )
            )
            await store.update_gift(session, changed, stamp)
            return await self._gift(session, gift_id, "")

        return await run_idempotent(
            self.db,
            method="loyalty.UpdateGift",
            request_id=request.request_id,
            request=request,
            response_type=pb.Gift,
            work=update,
        )

    async def GetGift(self, request: pb.GetGiftRequest, context: Context) -> pb.Gift:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        gift_id = _required(request.gift_id, "gift_id")
        store_id = _reading_store(principal, request.store_id)
        async with self.db.sessions() as session:
            return await self._gift(session, gift_id, store_id)

    async def ListGifts(
        self, request: pb.ListGiftsRequest, context: Context
    ) -> pb.ListGiftsResponse:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        store_id = _reading_store(principal, request.store_id)
        size = page_size(request.page_size)
        key = decode_token(request.page_token) or {}
        after = str(key["id"]) if "id" in key else None
        async with self.db.sessions() as session:
            found = await store.list_gifts(
                session, active_only=request.active_only, after=after, limit=size + 1
            )
            page = found[:size]
            stock = await store.stock(session, [r.gift.gift_id for r in page], store_id)
        response = pb.ListGiftsResponse(gifts=[gift_to_proto(r, store_id, stock) for r in page])
        if len(found) > size:
            response.next_page_token = encode_token({"id": page[-1].gift.gift_id})
        return response

    async def AddGiftStock(self, request: pb.AddGiftStockRequest, context: Context) -> pb.GiftStock:
        principal = current_principal()
        principal.require_role(*STOCKING_ROLES)
        check_request_id(request.request_id)
        gift_id = _required(request.gift_id, "gift_id")
        store_id = request.store_id.strip()
        delta = rules.check_stock_delta(request.delta)
        if store_id == CHAIN_WIDE and Role.HQ_ADMIN not in principal.roles:
            raise PermissionDenied(
                "only HQ changes the chain-wide stock",
                reason="ROLE_NOT_ALLOWED",
                metadata={"required_any_of": Role.HQ_ADMIN.value},
            )
        if store_id:
            principal.require_store(store_id)
        stamp = _stamp(principal, utcnow())

        async def add(session: AsyncSession) -> pb.GiftStock:
            if await store.get_gift(session, gift_id) is None:
                raise gift_not_found(gift_id)
            after = await store.change_stock(
                session, gift_id, store_id, delta, reference=request.request_id, stamp=stamp
            )
            if after is None:
                have = await store.stock(session, [gift_id], store_id)
                raise FailedPrecondition(
                    "the stock would go below zero",
                    reason="GIFT_STOCK_INSUFFICIENT",
                    metadata={
                        "gift_id": gift_id,
                        "store_id": store_id,
                        "quantity": str(have.get((gift_id, store_id), 0)),
                    },
                )
            return pb.GiftStock(gift_id=gift_id, store_id=store_id, quantity=after)

        return await run_idempotent(
            self.db,
            method="loyalty.AddGiftStock",
            request_id=request.request_id,
            request=request,
            response_type=pb.GiftStock,
            work=add,
        )

    async def RedeemGift(
        self, request: pb.RedeemGiftRequest, context: Context
    ) -> pb.GiftRedemption:
        principal = current_principal()
        principal.require_role(*REDEEMING_ROLES)
        check_request_id(request.request_id)
        member_id = _required(request.member_id, "member_id")
        gift_id = _required(request.gift_id, "gift_id")
        quantity = rules.check_quantity(request.quantity)
        store_id = _redeeming_store(principal, request.store_id)
        async with self.db.transaction() as session:
            done = await ledger.redeem_gift(
                session,
                member_id,
                gift_id,
                quantity,
                store_id=store_id,
                stamp=_stamp(principal, utcnow()),
                request_id=request.request_id,
                request_hash=request_fingerprint(request),
            )
        return redemption_to_proto(done)

    async def ListRedemptions(
        self, request: pb.ListRedemptionsRequest, context: Context
    ) -> pb.ListRedemptionsResponse:
        current_principal().require_role(*READING_ROLES)
        member_id = _required(request.member_id, "member_id")
        size = page_size(request.page_size)
        key = decode_token(request.page_token) or {}
        try:
            before = int(key["seq"]) if "seq" in key else None
        except (TypeError, ValueError):
            raise InvalidArgument(
                [FieldViolation("page_token", "not a token this service issued")]
            ) from None
        async with self.db.sessions() as session:
            found = await store.redemptions(session, member_id, before_seq=before, limit=size + 1)
        response = pb.ListRedemptionsResponse(
            redemptions=[redemption_to_proto(r) for r in found[:size]]
        )
        if len(found) > size:
            response.next_page_token = encode_token({"seq": found[size - 1].seq})
        return response


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["GiftsService"].full_name,
            servicer=GiftsServicer(ctx),
            add_to_server=points_pb2_grpc.add_GiftsServiceServicer_to_server,
        )
    ]
