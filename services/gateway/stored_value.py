"""Stored value over HTTP: balances, recharges (and their quotes), holds and
their capture or void, debits, refunds, statements (as JSON pages and as an
XLSX download), the chain's policy and its bonus rules, in front of the
cards service's StoredValueService.

As with the card routes, who may do what is the cards service's business:
the gateway checks the token is genuine, forwards it and maps the answer.
Every POST takes an Idempotency-Key, the service's request_id: a till that
retries after a timeout gets the first movement, never a second charge.
PINs travel only in request bodies, are held as SecretStr, and are never
logged or sent back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime

from chassis.grpcclient import bearer
from cornucopia.cards.v1 import stored_value_pb2 as sv_pb2
from cornucopia.common.v1 import money_pb2
from services.gateway.cards_client import CardId, call_cards, cards_failed, id_path
from services.gateway.deps import (
    READ_PROBLEMS,
    Key,
    PageSize,
    PageToken,
    Token,
    Window,
    change_problems,
    peers_of,
    window_fields,
)
from services.gateway.downloads import WORKBOOK_RESPONSES, stream_file
from services.gateway.schemas import from_proto
from services.gateway.stored_value_schemas import (
    Balance,
    BonusRulePage,
    CallerChannel,
    Hold,
    HoldCapture,
    HoldVoid,
    MovementPage,
    MovementResult,
    NewDebit,
    NewHold,
    NewRecharge,
    NewRefund,
    RechargeQuote,
    StoredValuePolicy,
    policy_from_proto,
    quote_field,
    stored_value_field,
)

T = TypeVar("T")

# A statement is built whole before its first chunk; a long one takes a while.
EXPORT_TIMEOUT_SECONDS = 120.0

router = APIRouter(tags=["stored value"])

AccountId = Annotated[str, id_path("The account a card draws on.")]
HoldId = Annotated[str, id_path("e.g. H7Q2K9X4TD8M")]
MovementId = Annotated[str, id_path("A debit's or a capture's movement.")]
StartTime = Annotated[
    AwareDatetime | None,
    Query(
        description="RFC 3339, with its offset: only movements at or after it.",
        examples=["2026-01-01T00:00:00+08:00"],
    ),
]
EndTime = Annotated[
    AwareDatetime | None,
    Query(description="RFC 3339, with its offset: only movements before it."),
]

_PIN_422 = (
    "PIN_REQUIRED (the card has a PIN and none was sent), PIN_INCORRECT (the detail says how "
    "many tries are left), PIN_LOCKED (with Retry-After)"
)
_STATE_422 = (
    "the card's state (CARD_LOST, CARD_FROZEN, ...), STORED_VALUE_NOT_OFFERED, ACCOUNT_CLOSED"
)
_KEY_422 = "an Idempotency-Key reused for a different request (IDEMPOTENCY_KEY_REUSED)"

# The problems of each kind of route.
READ = READ_PROBLEMS
RECHARGE = change_problems(
    "RECHARGE_CHANNEL_NOT_ALLOWED (the policy does not let this store or login use the "
    "channel), RECHARGE_AMOUNT_OUT_OF_RANGE, MAX_BALANCE_EXCEEDED, DAILY_LIMIT_EXCEEDED, "
    f"{_STATE_422}, or {_KEY_422}."
)
PAYMENT = change_problems(
    "INSUFFICIENT_BALANCE, DAILY_LIMIT_EXCEEDED, SPENDING_LIMIT_EXCEEDED (a supplementary "
    f"card's own monthly limit), {_PIN_422}, {_STATE_422}, or {_KEY_422}."
)
HOLD_CHANGE = change_problems(
    "The hold's state: HOLD_VOIDED, HOLD_EXPIRED, HOLD_CAPTURED; HOLD_AMOUNT_EXCEEDED "
    f"(capturing more than was held); or {_KEY_422}."
)
REFUND = change_problems(
    "REFUND_EXCEEDS_PAYMENT (more than is left to refund), MOVEMENT_NOT_REFUNDABLE (not a "
    f"debit or a capture), ACCOUNT_CLOSED, or {_KEY_422}."
)
STATEMENT = WORKBOOK_RESPONSES


async def _call(
    method: Callable[..., Awaitable[T]],
    message: Any,
    token: str,
    rename: Callable[[str], str] = stored_value_field,
) -> T:
    """A call to the cards service whose problems name the stored-value
    routes' fields (unless ``rename`` spells them otherwise)."""
    return await call_cards(method, message, token, rename)


# -- balances and recharges ----------------------------------------------------------


@router.get(
    "/v1/cards/{card_id}/balance",
    summary="A card's balance",
    description="The balances of the card's account (paid and bonus funds, what holds set "
    "aside) and what the card may still spend today. Any staff member.",
    responses=READ,
    operation_id="getCardBalance",
)
async def get_card_balance(card_id: CardId, request: Request, token: Token) -> Balance:
    balance = await _call(
        peers_of(request).stored_value.GetBalance,
        sv_pb2.GetBalanceRequest(card_id=card_id),
        token,
    )
    return from_proto(Balance, balance)


@router.post(
    "/v1/cards/{card_id}/recharges",
    summary="Recharge a card",
    description="Puts money on the card through a channel the chain's policy allows for your "
    "store and login, with the best bonus rule that applies. `bank_card` and "
    "`online_self_service` need the payment's `payment_reference`; `online_self_service` is "
    "for the payment service. Needs an `Idempotency-Key`: a retry gets the first movement.",
    status_code=201,
    response_description="The recharge and the balances right after it.",
    responses=RECHARGE,
    operation_id="rechargeCard",
)
async def recharge_card(
    card_id: CardId, body: NewRecharge, request: Request, token: Token, key: Key
) -> MovementResult:
    reply = await _call(peers_of(request).stored_value.Recharge, body.to_proto(key, card_id), token)
    return from_proto(MovementResult, reply)


@router.get(
    "/v1/cards/{card_id}/recharge-quote",
    summary="Quote a recharge",
    description="The bonus a recharge of this amount through this channel would get now, "
    "and the rule that gives it, without recharging.",
    responses=READ,
    operation_id="quoteRecharge",
)
async def quote_recharge(
    card_id: CardId,
    request: Request,
    token: Token,
    *,
    amount_minor_units: Annotated[
        int, Query(ge=-(2**63), le=2**63 - 1, description="The recharge, in minor units.")
    ],
    currency_code: Annotated[str, Query(max_length=3, examples=["CNY"])],
    channel: Annotated[CallerChannel, Query(description="The channel of the recharge.")],
) -> RechargeQuote:
    reply = await _call(
        peers_of(request).stored_value.QuoteRecharge,
        sv_pb2.QuoteRechargeRequest(
            card_id=card_id,
            amount=money_pb2.Money(currency_code=currency_code, minor_units=amount_minor_units),
            channel=sv_pb2.RechargeChannel.Value(f"RECHARGE_CHANNEL_{channel.upper()}"),
        ),
        token,
        quote_field,
    )
    return from_proto(RechargeQuote, reply)


# -- paying --------------------------------------------------------------------------


@router.post(
    "/v1/cards/{card_id}/debits",
    summary="Debit a card",
    description="Takes funds at once (a sale without a checkout, a service fee); the chain's "
    "policy says whether bonus or paid funds go first. A card with a payment PIN needs it. "
    "Needs an `Idempotency-Key`: a retry gets the first movement and is not another try at "
    "the PIN. Any staff member, and services.",
    status_code=201,
    response_description="The debit and the balances right after it.",
    responses=PAYMENT,
    operation_id="debitCard",
)
async def debit_card(
    card_id: CardId, body: NewDebit, request: Request, token: Token, key: Key
) -> MovementResult:
    reply = await _call(peers_of(request).stored_value.Debit, body.to_proto(key, card_id), token)
    return from_proto(MovementResult, reply)


@router.post(
    "/v1/cards/{card_id}/holds",
    summary="Hold funds for a sale",
    description="Sets funds aside until captured or voided; a hold not captured within "
    "`ttl_seconds` (15 minutes by default) is voided by the service. A card with a payment "
    "PIN needs it. Needs an `Idempotency-Key`: a retry gets the first hold.",
    status_code=201,
    response_description="The hold; `Location` names it.",
    responses=PAYMENT,
    operation_id="holdStoredValue",
)
async def hold_stored_value(
    card_id: CardId, body: NewHold, request: Request, response: Response, *, token: Token, key: Key
) -> Hold:
    hold = await _call(
        peers_of(request).stored_value.HoldStoredValue, body.to_proto(key, card_id), token
    )
    response.headers["Location"] = f"/v1/holds/{quote(hold.hold_id, safe='')}"
    return from_proto(Hold, hold)


@router.get(
    "/v1/holds/{hold_id}",
    summary="Read a hold",
    responses=READ,
    operation_id="getHold",
)
async def get_hold(hold_id: HoldId, request: Request, token: Token) -> Hold:
    hold = await _call(
        peers_of(request).stored_value.GetHold, sv_pb2.GetHoldRequest(hold_id=hold_id), token
    )
    return from_proto(Hold, hold)


@router.post(
    "/v1/holds/{hold_id}/capture",
    summary="Capture a hold",
    description="Takes the held funds, all (no body, or no `amount`) or part; what is not "
    "captured goes back. Needs an `Idempotency-Key`.",
    responses=HOLD_CHANGE,
    operation_id="captureHold",
)
async def capture_hold(
    hold_id: HoldId,
    request: Request,
    token: Token,
    key: Key,
    body: Annotated[HoldCapture | None, Body()] = None,
) -> Hold:
    hold = await _call(
        peers_of(request).stored_value.CaptureHold,
        (body or HoldCapture()).to_proto(key, hold_id),
        token,
    )
    return from_proto(Hold, hold)


@router.post(
    "/v1/holds/{hold_id}/void",
    summary="Void a hold",
    description="Gives the held funds back; voiding a hold already voided or expired returns "
    "it unchanged, a captured one is a 422 `HOLD_CAPTURED`. The body and its `reason` are "
    "optional. Needs an `Idempotency-Key`.",
    responses=HOLD_CHANGE,
    operation_id="voidHold",
)
async def void_hold(
    hold_id: HoldId,
    request: Request,
    token: Token,
    key: Key,
    body: Annotated[HoldVoid | None, Body()] = None,
) -> Hold:
    hold = await _call(
        peers_of(request).stored_value.VoidHold, (body or HoldVoid()).to_proto(key, hold_id), token
    )
    return from_proto(Hold, hold)


@router.post(
    "/v1/movements/{movement_id}/refunds",
    summary="Refund a payment",
    description="Gives back to the card all (no body, or no `amount`) or part of what a debit "
    "or a captured hold took, into the funds it came from (bonus stays bonus). Needs an "
    "`Idempotency-Key`.",
    status_code=201,
    response_description="The refund and the balances right after it.",
    responses=REFUND,
    operation_id="refundMovement",
)
async def refund_movement(
    movement_id: MovementId,
    request: Request,
    token: Token,
    key: Key,
    body: Annotated[NewRefund | None, Body()] = None,
) -> MovementResult:
    reply = await _call(
        peers_of(request).stored_value.Refund,
        (body or NewRefund()).to_proto(key, movement_id),
        token,
    )
    return from_proto(MovementResult, reply)


# -- statements ----------------------------------------------------------------------

_MOVEMENTS = (
    "Newest first, a page at a time, with the balances after each movement; optionally only "
    "those in [`start_time`, `end_time`)."
)


async def _movements(
    request: Request,
    token: str,
    page: tuple[int, str],
    window: Window,
    **owner: str,
) -> MovementPage:
    """A page of the statement of ``owner``, a card_id or an account_id."""
    page_size, page_token = page
    where: dict[str, Any] = {**owner, **window_fields(*window)}
    reply = await _call(
        peers_of(request).stored_value.ListMovements,
        sv_pb2.ListMovementsRequest(page_size=page_size, page_token=page_token, **where),
        token,
    )
    return from_proto(MovementPage, reply)


@router.get(
    "/v1/cards/{card_id}/movements",
    summary="A card's statement",
    description=f"{_MOVEMENTS} What the card did and, for a principal card, the account's "
    "recharges and settlements as well.",
    responses=READ,
    operation_id="listCardMovements",
)
async def list_card_movements(
    card_id: CardId,
    request: Request,
    token: Token,
    *,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    start_time: StartTime = None,
    end_time: EndTime = None,
) -> MovementPage:
    return await _movements(
        request, token, (page_size, page_token), (start_time, end_time), card_id=card_id
    )


@router.get(
    "/v1/accounts/{account_id}/movements",
    summary="An account's statement",
    description=f"{_MOVEMENTS} Every card of the account.",
    responses=READ,
    operation_id="listAccountMovements",
)
async def list_account_movements(
    account_id: AccountId,
    request: Request,
    token: Token,
    *,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    start_time: StartTime = None,
    end_time: EndTime = None,
) -> MovementPage:
    return await _movements(
        request, token, (page_size, page_token), (start_time, end_time), account_id=account_id
    )


async def _statement(
    request: Request, token: str, window: Window, **owner: str
) -> StreamingResponse:
    """The statement of ``owner``, a card_id or an account_id, streamed as
    the service writes it."""
    [owner_id] = owner.values()
    where: dict[str, Any] = {**owner, **window_fields(*window)}
    call = peers_of(request).stored_value.ExportStatement(
        sv_pb2.ExportStatementRequest(**where),
        metadata=bearer(token),
        timeout=EXPORT_TIMEOUT_SECONDS,
    )
    return await stream_file(
        call, lambda exc: cards_failed(exc, stored_value_field), f"statement-{owner_id}.xlsx"
    )


_STATEMENT = (
    "The statement as an XLSX workbook, streamed as an attachment: every movement, oldest "
    "first, optionally only those in [`start_time`, `end_time`)."
)


@router.get(
    "/v1/cards/{card_id}/statement.xlsx",
    summary="Download a card's statement",
    description=f"{_STATEMENT} The rows are those of `listCardMovements`.",
    response_class=StreamingResponse,
    responses=STATEMENT,  # type: ignore[arg-type]
    operation_id="exportCardStatement",
)
async def export_card_statement(
    card_id: CardId,
    request: Request,
    token: Token,
    start_time: StartTime = None,
    end_time: EndTime = None,
) -> StreamingResponse:
    return await _statement(request, token, (start_time, end_time), card_id=card_id)


@router.get(
    "/v1/accounts/{account_id}/statement.xlsx",
    summary="Download an account's statement",
    description=f"{_STATEMENT} The rows are those of `listAccountMovements`.",
    response_class=StreamingResponse,
    responses=STATEMENT,  # type: ignore[arg-type]
    operation_id="exportAccountStatement",
)
async def export_account_statement(
    account_id: AccountId,
    request: Request,
    token: Token,
    start_time: StartTime = None,
    end_time: EndTime = None,
) -> StreamingResponse:
    return await _statement(request, token, (start_time, end_time), account_id=account_id)


# -- the policy and bonus rules ---------------------------------------------------------


@router.get(
    "/v1/stored-value/policy",
    summary="The chain's stored-value policy",
    description="The currency, which funds a payment takes first, where and by whom each "
    "recharge channel may be used, the maximum balance and the daily limits. Any staff "
    "member may read it; HQ admins change it (over gRPC).",
    responses=READ,
    operation_id="getStoredValuePolicy",
)
async def get_stored_value_policy(request: Request, token: Token) -> StoredValuePolicy:
    policy = await _call(
        peers_of(request).stored_value.GetStoredValuePolicy,
        sv_pb2.GetStoredValuePolicyRequest(),
        token,
    )
    return policy_from_proto(policy)


@router.get(
    "/v1/stored-value/bonus-rules",
    summary="List recharge bonus rules",
    description="Newest first, a page at a time: rules in force and ended, or with "
    "`in_force_only` only those in force now. When several apply to a recharge, the largest "
    "bonus wins. Any staff member.",
    responses=READ,
    operation_id="listBonusRules",
)
async def list_bonus_rules(
    request: Request,
    token: Token,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    in_force_only: Annotated[bool, Query(description="Only the rules in force now.")] = False,
) -> BonusRulePage:
    reply = await _call(
        peers_of(request).stored_value.ListBonusRules,
        sv_pb2.ListBonusRulesRequest(
            page_size=page_size, page_token=page_token, in_force_only=in_force_only
        ),
        token,
    )
    return from_proto(BonusRulePage, reply)
