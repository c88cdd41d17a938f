"""The checkout's gRPC edge: who may check out, refund and read sales, and
the proto around the sagas (services/loyalty/saga.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from chassis.auth import STAFF_ROLES, Principal, Role, ScopeLevel, current_principal
from chassis.db import utcnow
from chassis.errors import FieldViolation, InvalidArgument
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, request_fingerprint
from chassis.logs import get_logger
from chassis.paging import newest_first_after, newest_first_token, page_size
from chassis.service import ServiceContext
from chassis.spreadsheets import XLSX_CONTENT_TYPE, Column, chunks, write_xlsx
from cornucopia.loyalty.v1 import checkout_pb2 as pb
from cornucopia.loyalty.v1 import checkout_pb2_grpc
from services.loyalty.convert_checkout import money, receipt_lines, sale_to_proto
from services.loyalty.domain import checkout as rules
from services.loyalty.peers import campaigns_client, cards_client, members_client
from services.loyalty.saga import Caller, Sagas, sale_not_found
from services.loyalty.store import sales as store
from services.loyalty.store.sales import SaleRecord

log = get_logger(__name__)

SELLING_ROLES = (*STAFF_ROLES, Role.SERVICE)
READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
# Money given back is a manager's decision (or the checkout service's own).
REFUNDING_ROLES = (Role.HQ_ADMIN, Role.REGION_MANAGER, Role.STORE_MANAGER, Role.SERVICE)
MAX_EXPORT_SALES = 50_000
DEFAULT_RECOVERY_SECONDS = 10.0


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def _caller(principal: Principal) -> Caller:
    return Caller(principal.subject, principal.store_id)


def _window(
    message: pb.ListSalesRequest | pb.ExportSalesRequest,
) -> tuple[dt.datetime | None, dt.datetime | None]:
    start = message.start_time.ToDatetime(dt.UTC) if message.HasField("start_time") else None
    end = message.end_time.ToDatetime(dt.UTC) if message.HasField("end_time") else None
    if start and end and end <= start:
        raise InvalidArgument([FieldViolation("end_time", "after start_time")])
    return start, end


class CheckoutServicer(checkout_pb2_grpc.CheckoutServiceServicer):
    def __init__(self, ctx: ServiceContext, sagas: Sagas) -> None:
        self.db = ctx.db
        self.sagas = sagas

    async def _require_store(self, principal: Principal, store_id: str) -> None:
        """Store staff act for their own store, region managers for their
        region's, HQ, the call center and services for every store."""
        region = None
        if principal.scope.level == ScopeLevel.REGION:
            region = (await self.sagas.store_facts(store_id)).region_id
        principal.require_store(store_id, region)

    async def Checkout(self, request: pb.CheckoutRequest, context: Context) -> pb.Receipt:
        principal = current_principal()
        principal.require_role(*SELLING_ROLES)
        rules.check_checkout_id(request.checkout_id)
        store_id = _required(request.store_id, "store_id")
        await self._require_store(principal, store_id)
        # The PINs are no part of the request's identity: a stored hash of a
        # six-digit PIN would be a cheap way back to it.
        anonymous = pb.CheckoutRequest.FromString(request.SerializeToString())
        for tender in anonymous.tenders:
            tender.pin = ""
        return await self.sagas.checkout(
            request, request_fingerprint(anonymous), _caller(principal)
        )

    async def PreviewCheckout(
        self, request: pb.PreviewCheckoutRequest, context: Context
    ) -> pb.CheckoutPreview:
        principal = current_principal()
        principal.require_role(*SELLING_ROLES)
        store_id = _required(request.store_id, "store_id")
        await self._require_store(principal, store_id)
        facts = await self.sagas.store_facts(store_id)
        card = await self.sagas.resolve(request)
        plan = await self.sagas.plan(request, facts, card, utcnow(), None)
        c = plan["currency"]
        preview = pb.CheckoutPreview(
            lines=receipt_lines(plan),
            gross=money(c, plan["gross"]),
            discount=money(c, plan["discount"]),
            total=money(c, plan["total"]),
            points_to_earn=plan["earn"]["points"],
            explanations=plan["earn"]["explanations"],
            max_points=plan["max_points"],
            max_points_value=money(c, plan["max_points_value"]),
            points_balance=plan["points_available"],
            card_can_pay=plan["card_can_pay"],
            card_refusal_reason=plan["card_refusal"],
        )
        if card is not None and card.card_id and card.stored_value:
            preview.stored_value_balance.CopyFrom(
                money(c, await self.sagas.cards.available(card.card_id))
            )
        return preview

    # --- sales -------------------------------------------------------------

    async def _sale(self, sale: SaleRecord) -> pb.Sale:
        async with self.db.sessions() as session:
            refunds = await store.refunds_of(session, sale.sale_id)
            lines = await store.lines_of(session, sale.sale_id)
        return sale_to_proto(
            sale, refunds, {line.line_no: line.quantity_refunded for line in lines}
        )

    async def GetSale(self, request: pb.GetSaleRequest, context: Context) -> pb.Sale:
        current_principal().require_role(*READING_ROLES)
        sale_id = _required(request.sale_id, "sale_id")
        async with self.db.sessions() as session:
            sale = await store.get_sale(session, sale_id)
        if sale is None:
            raise sale_not_found(sale_id)
        return await self._sale(sale)

    async def _scope(self, principal: Principal, member_id: str, store_id: str) -> tuple[str, str]:
        if bool(member_id) == bool(store_id):
            raise InvalidArgument([FieldViolation("member_id", "give a member_id or a store_id")])
        if store_id:
            await self._require_store(principal, store_id)
        return member_id, store_id

    async def ListSales(
        self, request: pb.ListSalesRequest, context: Context
    ) -> pb.ListSalesResponse:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        member_id, store_id = await self._scope(
            principal, request.member_id.strip(), request.store_id.strip()
        )
        start, end = _window(request)
        size = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            found = await store.list_sales(
                session,
                member_id=member_id,
                store_id=store_id,
                start=start,
                end=end,
                after=after,
                limit=size + 1,
            )
        response = pb.ListSalesResponse(sales=[await self._sale(s) for s in found[:size]])
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = newest_first_token(last.sold_at, last.sale_id)
        return response

    async def ExportSales(
        self, request: pb.ExportSalesRequest, context: Context
    ) -> AsyncIterator[pb.ExportSalesChunk]:
        principal = current_principal()
        principal.require_role(*READING_ROLES)
        member_id, store_id = await self._scope(
            principal, request.member_id.strip(), request.store_id.strip()
        )
        start, end = _window(request)
        found: list[SaleRecord] = []
        after = None
        while len(found) < MAX_EXPORT_SALES:
            async with self.db.sessions() as session:
                page = await store.list_sales(
                    session,
                    member_id=member_id,
                    store_id=store_id,
                    start=start,
                    end=end,
                    after=after,
                    limit=1_000,
                )
            found.extend(page)
            if len(page) < 1_000:
                break
            after = (page[-1].sold_at, page[-1].sale_id)
        data = await asyncio.to_thread(_sales_workbook, found[:MAX_EXPORT_SALES])
        name = f"sales-{member_id or store_id}-{utcnow():%Y%m%d}.xlsx"
        for index, piece in enumerate(chunks(data)):
            chunk = pb.ExportSalesChunk(data=piece)
            if index == 0:
                chunk.file_name = name
                chunk.content_type = XLSX_CONTENT_TYPE
            yield chunk

    # --- refunds and voids -------------------------------------------------------

    async def _refund(
        self,
        request: pb.RefundSaleRequest | pb.VoidSaleRequest,
        lines: list[tuple[int, int]],
        *,
        void: bool,
    ) -> pb.RefundReceipt:
        principal = current_principal()
        principal.require_role(*REFUNDING_ROLES)
        check_request_id(request.request_id)
        sale_id = _required(request.sale_id, "sale_id")
        reason = request.reason.strip()
        if not reason or len(reason) > rules.MAX_REASON_LENGTH:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "reason", f"required, at most {rules.MAX_REASON_LENGTH} characters"
                    )
                ]
            )
        region = None
        if principal.scope.level == ScopeLevel.REGION:
            async with self.db.sessions() as session:
                sale = await store.get_sale(session, sale_id)
            if sale is not None:
                region = (await self.sagas.store_facts(sale.store_id)).region_id

        def may_refund(sale: SaleRecord) -> None:
            principal.require_store(sale.store_id, region)

        return await self.sagas.refund(
            sale_id=sale_id,
            request_id=request.request_id,
            request_hash=request_fingerprint(request),
            lines=lines,
            reason=reason,
            void=void,
            caller=_caller(principal),
            may_refund=may_refund,
        )

    async def RefundSale(self, request: pb.RefundSaleRequest, context: Context) -> pb.RefundReceipt:
        return await self._refund(
            request, [(line.line_no, line.quantity) for line in request.lines], void=False
        )

    async def VoidSale(self, request: pb.VoidSaleRequest, context: Context) -> pb.RefundReceipt:
        return await self._refund(request, [], void=True)


SALES_COLUMNS = (
    Column("Time (UTC)", 20, "time"),
    Column("Sale ID", 18),
    Column("Store", 10),
    Column("Terminal", 12),
    Column("Member", 14),
    Column("Gross", 14, "amount"),
    Column("Discount", 14, "amount"),
    Column("Total", 14, "amount"),
    Column("Refunded", 14, "amount"),
    Column("Points earned", 14),
    Column("Points spent", 14),
    Column("State", 16),
    Column("By", 20),
)


def _sales_workbook(found: Sequence[SaleRecord]) -> bytes:
    return write_xlsx(
        "Sales",
        SALES_COLUMNS,
        (
            (
                s.sold_at,
                s.sale_id,
                s.store_id,
                s.terminal_id,
                s.member_id,
                s.gross,
                s.discount,
                s.total,
                s.refunded,
                s.points_earned - s.points_reversed,
                s.points_spent,
                s.state,
                s.principal,
            )
            for s in found
        ),
        currency=found[0].currency if found else "",
    )


class RecoveryWorker:
    """Finishes or undoes the checkouts and refunds whose driver went away:
    at start (a restart after a crash) and then every few seconds."""

    def __init__(self, sagas: Sagas, interval_seconds: float | None = None) -> None:
        self.sagas = sagas
        self.interval = interval_seconds or float(
            os.environ.get("LOYALTY_RECOVERY_INTERVAL_SECONDS", DEFAULT_RECOVERY_SECONDS)
        )

    async def run(self) -> None:
        while True:
            try:
                handled = await self.sagas.recover()
                if handled:
                    log.info("sagas recovered", count=handled)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("saga recovery pass failed; will retry")
            await asyncio.sleep(self.interval)


def sagas_of(ctx: ServiceContext) -> Sagas:
    """One Sagas per service, shared by the servicer and the worker."""

    def make() -> Sagas:
        return Sagas(ctx.db, cards_client(ctx), members_client(ctx), campaigns_client(ctx))

    return ctx.shared("loyalty.sagas", make)


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["CheckoutService"].full_name,
            servicer=CheckoutServicer(ctx, sagas_of(ctx)),
            add_to_server=checkout_pb2_grpc.add_CheckoutServiceServicer_to_server,
        )
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [RecoveryWorker(sagas_of(ctx)).run]
