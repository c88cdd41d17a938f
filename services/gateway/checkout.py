"""The checkout over HTTP: what a store terminal calls to sell (and to price
a basket first), the sales it records (read, listed by member or store,
downloaded as XLSX), refunds and voids, in front of the loyalty service's
CheckoutService.

As with the card routes, who may do what is the loyalty service's business
(a store's staff check out at their own store, managers refund): the
gateway checks the token is genuine, forwards it and maps the answer. A
checkout's Idempotency-Key is its checkout_id, the terminal's key for the
sale: sent again after a timeout it returns the same receipt, never a
second sale. Refunds and voids take an Idempotency-Key as their request_id.
PINs travel only in request bodies, are held as SecretStr, and are never
logged or sent back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime

from chassis.grpcclient import bearer
from cornucopia.loyalty.v1 import checkout_pb2
from services.gateway.deps import (
    READ_PROBLEMS,
    Key,
    PageSize,
    PageToken,
    Token,
    Window,
    peers_of,
    problem_responses,
    required_key,
    window_fields,
)
from services.gateway.downloads import WORKBOOK_RESPONSES, stream_file
from services.gateway.loyalty_client import (
    CALL_TIMEOUT_SECONDS,
    SAGA_TIMEOUT_SECONDS,
    MemberId,
    SaleId,
    StoreId,
    call_loyalty,
    loyalty_failed,
)
from services.gateway.loyalty_schemas import (
    CheckoutBasket,
    CheckoutPreview,
    NewCheckout,
    Receipt,
    RefundReceipt,
    Sale,
    SalePage,
    SaleRefund,
    SaleVoid,
    checkout_field,
    loyalty_field,
)
from services.gateway.schemas import from_proto

T = TypeVar("T")

# The service writes the whole workbook before its first chunk.
EXPORT_TIMEOUT_SECONDS = 120.0

router = APIRouter()

StartTime = Annotated[
    AwareDatetime | None,
    Query(
        description="RFC 3339, with its offset: only sales at or after it.",
        examples=["2026-01-01T00:00:00+08:00"],
    ),
]
EndTime = Annotated[
    AwareDatetime | None,
    Query(description="RFC 3339, with its offset: only sales before it."),
]


async def checkout_key(
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="The terminal's key for the sale, at most 64 characters (a UUID is "
            "best): it becomes the checkout's `checkout_id`. After a timeout, a 503 or a 409, "
            "send the same checkout with the same key: you get the sale's receipt, never a "
            "second sale. A refused checkout (422) may be sent again under its key once the "
            "cause is fixed; the same key with another basket or other tenders is refused "
            "(422, IDEMPOTENCY_KEY_REUSED).",
        ),
    ] = None,
) -> str:
    return required_key(key)


CheckoutKey = Annotated[str, Depends(checkout_key)]

_KEY_422 = "an Idempotency-Key reused for a different request (IDEMPOTENCY_KEY_REUSED)"
_CHECKOUT_422 = (
    "Refused, and nothing taken: the card's state (CARD_LOST, CARD_FROZEN, CARD_EXPIRED, "
    "...); stored value refused by the cards service (INSUFFICIENT_BALANCE, "
    "DAILY_LIMIT_EXCEEDED, SPENDING_LIMIT_EXCEEDED); the payment PIN (PIN_REQUIRED, "
    "PIN_INCORRECT whose detail says how many tries are left, PIN_LOCKED with Retry-After); "
    "points as cash (POINTS_INSUFFICIENT, POINTS_SHARE_EXCEEDED); TENDERS_DO_NOT_MATCH_TOTAL; "
    f"or {_KEY_422}."
)

# The problems of each kind of route.
READ = READ_PROBLEMS
CHECKOUT = problem_responses(
    400,
    401,
    403,
    404,
    409,
    422,
    429,
    500,
    503,
    504,
    overrides={
        409: "CHECKOUT_IN_PROGRESS: the same checkout (the same Idempotency-Key) is under way; "
        "send it again after Retry-After.",
        422: _CHECKOUT_422,
        503: "CHECKOUT_COMPLETING: the sale passed its point of no return and is being "
        "completed; send the same checkout again after Retry-After for the receipt. Otherwise "
        "a service behind the gateway is unavailable and nothing was taken.",
    },
)
PREVIEW = problem_responses(400, 401, 403, 404, 422, 429, 500, 503, 504)
REFUND = problem_responses(
    400,
    401,
    403,
    404,
    409,
    422,
    429,
    500,
    503,
    504,
    overrides={
        409: "REFUND_IN_PROGRESS or CONCURRENT_REFUND: another refund of the sale is under way; "
        "send it again after Retry-After.",
        422: "REFUND_EXCEEDS_SALE (more than is left of a line), SALE_VOIDED, VOID_TOO_LATE "
        f"(a void after the sale's business day), SALE_ALREADY_REFUNDED, or {_KEY_422}.",
        503: "REFUND_COMPLETING: the refund is being completed; send it again after "
        "Retry-After for its receipt.",
    },
)


async def _call(
    method: Callable[..., Awaitable[T]],
    message: Any,
    token: str,
    rename: Callable[[str], str] = loyalty_field,
    timeout: float = CALL_TIMEOUT_SECONDS,
) -> T:
    """A call to the loyalty service whose problems name the sale routes'
    fields (unless ``rename`` spells them otherwise)."""
    return await call_loyalty(method, message, token, rename, timeout)


# -- the checkout ---------------------------------------------------------------------


@router.post(
    "/v1/checkouts",
    tags=["checkout"],
    summary="Check out a sale",
    description="What a POS terminal calls to sell: the store, the terminal, who the member is "
    "(`card_number`, `mobile` or `member_id`, or none for a guest), the basket, coupon codes "
    "and the tenders, which together pay the total exactly. The card is resolved, the basket "
    "priced (member or tier discount), points and stored value taken, the points earned "
    "accrued and the member's tier brought up to date, all or nothing. Needs an "
    "`Idempotency-Key`: the terminal's key for the sale, which becomes its `checkout_id`. "
    "Staff check out at their own store; region managers in their region; HQ and services "
    "anywhere.",
    status_code=201,
    response_description="The receipt; `Location` names the sale.",
    responses=CHECKOUT,
    operation_id="checkout",
)
async def checkout(
    body: NewCheckout, request: Request, response: Response, token: Token, key: CheckoutKey
) -> Receipt:
    receipt = await _call(
        peers_of(request).checkout.Checkout,
        body.to_proto(key),
        token,
        checkout_field,
        SAGA_TIMEOUT_SECONDS,
    )
    response.headers["Location"] = f"/v1/sales/{quote(receipt.sale_id, safe='')}"
    return from_proto(Receipt, receipt)


@router.post(
    "/v1/checkouts:preview",
    tags=["checkout"],
    summary="Price a basket",
    description="The basket priced for the member without taking anything: the lines with "
    "their discounts, the total, the points it would earn (and why), the most points the "
    "member may pay with and what they are worth, the balances, and whether the card can pay. "
    "Changes nothing; needs no Idempotency-Key.",
    responses=PREVIEW,
    operation_id="previewCheckout",
)
async def preview_checkout(body: CheckoutBasket, request: Request, token: Token) -> CheckoutPreview:
    preview = await _call(peers_of(request).checkout.PreviewCheckout, body.to_proto(), token)
    return from_proto(CheckoutPreview, preview)


# -- sales ----------------------------------------------------------------------------


@router.get(
    "/v1/sales/{sale_id}",
    tags=["sales"],
    summary="Read a sale",
    description="The receipt, the state (completed, partly refunded, refunded, voided), what "
    "was given back and the refunds. Any staff member.",
    responses=READ,
    operation_id="getSale",
)
async def get_sale(sale_id: SaleId, request: Request, token: Token) -> Sale:
    sale = await _call(
        peers_of(request).checkout.GetSale, checkout_pb2.GetSaleRequest(sale_id=sale_id), token
    )
    return from_proto(Sale, sale)


_SALES = "Newest first, a page at a time; optionally only those in [`start_time`, `end_time`)."


async def _sales(
    request: Request, token: str, page: tuple[int, str], window: Window, **owner: str
) -> SalePage:
    """A page of the sales of ``owner``, a member_id or a store_id."""
    page_size, page_token = page
    where: dict[str, Any] = {**owner, **window_fields(*window)}
    reply = await _call(
        peers_of(request).checkout.ListSales,
        checkout_pb2.ListSalesRequest(page_size=page_size, page_token=page_token, **where),
        token,
    )
    return from_proto(SalePage, reply)


@router.get(
    "/v1/members/{member_id}/sales",
    tags=["sales"],
    summary="A member's sales",
    description=f"{_SALES} Any staff member.",
    responses=READ,
    operation_id="listMemberSales",
)
async def list_member_sales(
    member_id: MemberId,
    request: Request,
    token: Token,
    *,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    start_time: StartTime = None,
    end_time: EndTime = None,
) -> SalePage:
    return await _sales(
        request, token, (page_size, page_token), (start_time, end_time), member_id=member_id
    )


@router.get(
    "/v1/stores/{store_id}/sales",
    tags=["sales"],
    summary="A store's sales",
    description=f"{_SALES} The store's staff, its region's managers and HQ.",
    responses=READ,
    operation_id="listStoreSales",
)
async def list_store_sales(
    store_id: StoreId,
    request: Request,
    token: Token,
    *,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    start_time: StartTime = None,
    end_time: EndTime = None,
) -> SalePage:
    return await _sales(
        request, token, (page_size, page_token), (start_time, end_time), store_id=store_id
    )


async def _export(request: Request, token: str, window: Window, **owner: str) -> StreamingResponse:
    """The sales of ``owner``, a member_id or a store_id, as the service's
    workbook, streamed as it comes."""
    [owner_id] = owner.values()
    where: dict[str, Any] = {**owner, **window_fields(*window)}
    call = peers_of(request).checkout.ExportSales(
        checkout_pb2.ExportSalesRequest(**where),
        metadata=bearer(token),
        timeout=EXPORT_TIMEOUT_SECONDS,
    )
    return await stream_file(
        call, lambda exc: loyalty_failed(exc, loyalty_field), f"sales-{owner_id}.xlsx"
    )


_EXPORT = (
    "The sales as an XLSX workbook, streamed as an attachment, newest first; optionally only "
    "those in [`start_time`, `end_time`). An error before the first chunk is a problem."
)


@router.get(
    "/v1/members/{member_id}/sales.xlsx",
    tags=["sales"],
    summary="Download a member's sales",
    description=f"{_EXPORT} The rows are those of `listMemberSales`.",
    response_class=StreamingResponse,
    responses=WORKBOOK_RESPONSES,
    operation_id="exportMemberSales",
)
async def export_member_sales(
    member_id: MemberId,
    request: Request,
    token: Token,
    start_time: StartTime = None,
    end_time: EndTime = None,
) -> StreamingResponse:
    return await _export(request, token, (start_time, end_time), member_id=member_id)


@router.get(
    "/v1/stores/{store_id}/sales.xlsx",
    tags=["sales"],
    summary="Download a store's sales",
    description=f"{_EXPORT} The rows are those of `listStoreSales`.",
    response_class=StreamingResponse,
    responses=WORKBOOK_RESPONSES,
    operation_id="exportStoreSales",
)
async def export_store_sales(
    store_id: StoreId,
    request: Request,
    token: Token,
    start_time: StartTime = None,
    end_time: EndTime = None,
) -> StreamingResponse:
    return await _export(request, token, (start_time, end_time), store_id=store_id)


# -- refunds and voids ------------------------------------------------------------------


@router.post(
    "/v1/sales/{sale_id}/refunds",
    tags=["sales"],
    summary="Refund a sale",
    description="Gives back some quantity of some lines, or (no `lines`) all that is left: "
    "the money to the tenders that paid (stored value to the card, cash and bank card at the "
    "till, as the receipt says), points paid with as a new lot; the points earned are taken "
    "back in proportion. Store managers of the sale's store, region managers and HQ admins. "
    "Needs an `Idempotency-Key`: a retry gets the first refund.",
    status_code=201,
    response_description="What was given back, and how.",
    responses=REFUND,
    operation_id="refundSale",
)
async def refund_sale(
    sale_id: SaleId, body: SaleRefund, request: Request, token: Token, key: Key
) -> RefundReceipt:
    refund = await _call(
        peers_of(request).checkout.RefundSale,
        body.to_proto(key, sale_id),
        token,
        timeout=SAGA_TIMEOUT_SECONDS,
    )
    return from_proto(RefundReceipt, refund)


@router.post(
    "/v1/sales/{sale_id}/void",
    tags=["sales"],
    summary="Void a sale",
    description="Cancels a whole sale on its business day (the store's local day): everything "
    "is given back as by a whole refund and the sale is `voided`. Who may refund may void. "
    "Needs an `Idempotency-Key`.",
    response_description="What was given back, and how.",
    responses=REFUND,
    operation_id="voidSale",
)
async def void_sale(
    sale_id: SaleId, body: SaleVoid, request: Request, token: Token, key: Key
) -> RefundReceipt:
    voided = await _call(
        peers_of(request).checkout.VoidSale,
        body.to_proto(key, sale_id),
        token,
        timeout=SAGA_TIMEOUT_SECONDS,
    )
    return from_proto(RefundReceipt, voided)
