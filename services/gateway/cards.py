"""Member cards over HTTP: card programs, issuing, resolving a card at the
till, the lifecycle (lost, frozen, replaced, cancelled), links, history and
the payment PIN, in front of the cards service's CardsService and
CardProgramsService.

Who may do what is the cards service's business (a store operator may
report a card lost, only managers freeze it): the gateway checks the token
is genuine, forwards it, and maps the answer. Every change takes an
Idempotency-Key, the service's request_id. Two routes are custom methods in
the AIP-136 manner, ``GET /v1/cards:resolve`` and ``POST
/v1/cards/{card_id}/pin:verify``: they act on what they are given, not on a
resource of their own. PINs travel only in request bodies, are held as
SecretStr, and are never logged or sent back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Body, Query, Request, Response

from cornucopia.cards.v1 import cards_pb2, programs_pb2
from services.gateway.card_schemas import (
    MAX_ID_LENGTH,
    Card,
    CardHistoryPage,
    CardLink,
    CardPage,
    CardProgram,
    CardProgramPage,
    CardReplacement,
    CardResolution,
    LinkRequest,
    NewCard,
    NewPin,
    OptionalReason,
    PinCheck,
    RequiredReason,
    card_field,
)
from services.gateway.cards_client import CardId, call_cards, id_path
from services.gateway.deps import (
    READ_PROBLEMS,
    Key,
    PageSize,
    PageToken,
    Token,
    change_problems,
    peers_of,
)
from services.gateway.schemas import from_proto

T = TypeVar("T")

router = APIRouter()

# The problems of each kind of route.
READ = READ_PROBLEMS
CHANGE = change_problems(
    "Refused by the card's state (the `reason` names it: CARD_LOST, CARD_FROZEN, "
    "CARD_NOT_LOST, ...), another business rule, or an Idempotency-Key reused for a "
    "different request (IDEMPOTENCY_KEY_REUSED)."
)
PIN = change_problems(
    "PIN_INCORRECT (the detail says how many tries are left), PIN_LOCKED after three "
    "wrong tries in a row (with Retry-After), PIN_NOT_SET, or the card's state (CARD_LOST, "
    "...)."
)


async def _call(method: Callable[..., Awaitable[T]], message: Any, token: str) -> T:
    """A call to the cards service whose problems name the card routes' fields."""
    return await call_cards(method, message, token, card_field)


async def _card(method: Callable[..., Awaitable[cards_pb2.Card]], message: Any, token: str) -> Card:
    """A call whose answer is a card, as the caller gets it."""
    return from_proto(Card, await _call(method, message, token))


def _location(card_id: str) -> str:
    return f"/v1/cards/{quote(card_id, safe='')}"


# -- programs -----------------------------------------------------------------------


@router.get(
    "/v1/card-programs",
    tags=["card programs"],
    summary="List card programs",
    description="In program id order, a page at a time. Any staff member may read them.",
    responses=READ,
    operation_id="listCardPrograms",
)
async def list_card_programs(
    request: Request,
    token: Token,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    partner_id: Annotated[
        str, Query(max_length=MAX_ID_LENGTH, description="Only this co-brand partner's.")
    ] = "",
) -> CardProgramPage:
    reply = await _call(
        peers_of(request).card_programs.ListCardPrograms,
        programs_pb2.ListCardProgramsRequest(
            page_size=page_size, page_token=page_token, partner_id=partner_id
        ),
        token,
    )
    return from_proto(CardProgramPage, reply)


@router.get(
    "/v1/card-programs/{program_id}",
    tags=["card programs"],
    summary="Read a card program",
    responses=READ,
    operation_id="getCardProgram",
)
async def get_card_program(
    program_id: Annotated[str, id_path("e.g. GOLD")],
    request: Request,
    token: Token,
) -> CardProgram:
    program = await _call(
        peers_of(request).card_programs.GetCardProgram,
        programs_pb2.GetCardProgramRequest(program_id=program_id),
        token,
    )
    return from_proto(CardProgram, program)


# -- issue and read -----------------------------------------------------------------


@router.post(
    "/v1/cards",
    tags=["cards"],
    summary="Issue a card",
    description="Issues a card of a program to a member, with a number from the program's "
    "range; any staff member, from any store. Needs an `Idempotency-Key`: a retry gets the "
    "card issued the first time. The member must be active (422 `MEMBER_NOT_ACTIVE`, "
    "`MEMBER_MERGED`) and may hold one live card of a program (422 `CARD_ALREADY_HELD`). "
    "With `principal_card_id` the card is a supplementary card; with `group_card_id` a new "
    "holder of a group account.",
    status_code=201,
    response_description="The new card; `Location` names it.",
    responses=CHANGE,
    operation_id="issueCard",
)
async def issue_card(
    body: NewCard, request: Request, response: Response, token: Token, key: Key
) -> Card:
    card = await _card(peers_of(request).cards.IssueCard, body.to_proto(key), token)
    response.headers["Location"] = _location(card.card_id)
    return card


@router.get(
    "/v1/cards:resolve",
    tags=["cards"],
    summary="Resolve a card at the till",
    description="Exactly one of `card_number` (as printed; spaces and dashes are ignored), "
    "`mobile` (the member's e-card, any usual format) or `member_id`. Answers with the card "
    "(for a mobile or a member: their newest active card, else their newest card not "
    "replaced), whether it can pay now and why not (`refusal_reason`), the program's member "
    "discount and whether it carries stored value. A card that cannot pay is still a 200.",
    responses=READ,
    operation_id="resolveCard",
)
async def resolve_card(
    request: Request,
    token: Token,
    card_number: Annotated[str, Query(max_length=40, examples=["8816 0427 3519 0318"])] = "",
    mobile: Annotated[str, Query(max_length=40, examples=["138 0013 8000"])] = "",
    member_id: Annotated[str, Query(max_length=MAX_ID_LENGTH)] = "",
) -> CardResolution:
    reply = await _call(
        peers_of(request).cards.ResolveCard,
        cards_pb2.ResolveCardRequest(card_number=card_number, mobile=mobile, member_id=member_id),
        token,
    )
    return from_proto(CardResolution, reply)


@router.get(
    "/v1/cards/{card_id}",
    tags=["cards"],
    summary="Read a card",
    responses=READ,
    operation_id="getCard",
)
async def get_card(card_id: CardId, request: Request, token: Token) -> Card:
    return await _card(
        peers_of(request).cards.GetCard, cards_pb2.GetCardRequest(card_id=card_id), token
    )


@router.get(
    "/v1/members/{member_id}/cards",
    tags=["cards"],
    summary="List a member's cards",
    description="Newest first, a page at a time; every state (replaced and cancelled cards "
    "too). A merged member's id lists the survivor's cards.",
    responses=READ,
    operation_id="listMemberCards",
)
async def list_member_cards(
    member_id: Annotated[str, id_path("e.g. M7Q2K9X4TD")],
    request: Request,
    token: Token,
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> CardPage:
    reply = await _call(
        peers_of(request).cards.ListCards,
        cards_pb2.ListCardsRequest(member_id=member_id, page_size=page_size, page_token=page_token),
        token,
    )
    return from_proto(CardPage, reply)


@router.get(
    "/v1/cards/{card_id}/history",
    tags=["cards"],
    summary="A card's history",
    description="Oldest first, a page at a time: every move, link and PIN change, who made it, "
    "from which store, when and why; a replacement card's history includes the cards it "
    "replaced.",
    responses=READ,
    operation_id="listCardHistory",
)
async def list_card_history(
    card_id: CardId,
    request: Request,
    token: Token,
    page_size: PageSize = 0,
    page_token: PageToken = "",
) -> CardHistoryPage:
    reply = await _call(
        peers_of(request).cards.ListCardHistory,
        cards_pb2.ListCardHistoryRequest(
            card_id=card_id, page_size=page_size, page_token=page_token
        ),
        token,
    )
    return from_proto(CardHistoryPage, reply)


# -- the lifecycle ------------------------------------------------------------------

_ANY_STAFF = "Any staff member, from any store, and the call center."
_MANAGERS = (
    "Store managers of the store that issued the card, region managers of its region and "
    "HQ admins; anyone else gets a 403."
)


def _reason(body: OptionalReason | None) -> str:
    return body.reason if body is not None else ""


@router.post(
    "/v1/cards/{card_id}/report-lost",
    tags=["cards"],
    summary="Report a card lost",
    description=f"ACTIVE -> LOST: the card stops paying. {_ANY_STAFF} The body and its "
    "`reason` are optional. Needs an `Idempotency-Key`.",
    responses=CHANGE,
    operation_id="reportCardLost",
)
async def report_card_lost(
    card_id: CardId,
    request: Request,
    token: Token,
    key: Key,
    body: Annotated[OptionalReason | None, Body()] = None,
) -> Card:
    return await _card(
        peers_of(request).cards.ReportCardLost,
        cards_pb2.ReportCardLostRequest(request_id=key, card_id=card_id, reason=_reason(body)),
        token,
    )


@router.post(
    "/v1/cards/{card_id}/cancel-loss",
    tags=["cards"],
    summary="Cancel a card's loss",
    description=f"LOST -> ACTIVE: the card was found. {_ANY_STAFF} The body and its `reason` "
    "are optional. Needs an `Idempotency-Key`.",
    responses=CHANGE,
    operation_id="cancelCardLoss",
)
async def cancel_card_loss(
    card_id: CardId,
    request: Request,
    token: Token,
    key: Key,
    body: Annotated[OptionalReason | None, Body()] = None,
) -> Card:
    return await _card(
        peers_of(request).cards.CancelCardLoss,
        cards_pb2.CancelCardLossRequest(request_id=key, card_id=card_id, reason=_reason(body)),
        token,
    )


@router.post(
    "/v1/cards/{card_id}/freeze",
    tags=["cards"],
    summary="Freeze a card",
    description=f"ACTIVE -> FROZEN. {_MANAGERS} A `reason` is required. Needs an "
    "`Idempotency-Key`.",
    responses=CHANGE,
    operation_id="freezeCard",
)
async def freeze_card(
    card_id: CardId, body: RequiredReason, request: Request, token: Token, key: Key
) -> Card:
    return await _card(
        peers_of(request).cards.FreezeCard,
        cards_pb2.FreezeCardRequest(request_id=key, card_id=card_id, reason=body.reason),
        token,
    )


@router.post(
    "/v1/cards/{card_id}/unfreeze",
    tags=["cards"],
    summary="Unfreeze a card",
    description=f"FROZEN -> ACTIVE. {_MANAGERS} A `reason` is required. Needs an "
    "`Idempotency-Key`.",
    responses=CHANGE,
    operation_id="unfreezeCard",
)
async def unfreeze_card(
    card_id: CardId, body: RequiredReason, request: Request, token: Token, key: Key
) -> Card:
    return await _card(
        peers_of(request).cards.UnfreezeCard,
        cards_pb2.UnfreezeCardRequest(request_id=key, card_id=card_id, reason=body.reason),
        token,
    )


@router.post(
    "/v1/cards/{card_id}/cancel",
    tags=["cards"],
    summary="Cancel a card",
    description=f"ACTIVE, LOST or FROZEN -> CANCELLED, for good. {_MANAGERS} A `reason` is "
    "required. Needs an `Idempotency-Key`.",
    responses=CHANGE,
    operation_id="cancelCard",
)
async def cancel_card(
    card_id: CardId, body: RequiredReason, request: Request, token: Token, key: Key
) -> Card:
    return await _card(
        peers_of(request).cards.CancelCard,
        cards_pb2.CancelCardRequest(request_id=key, card_id=card_id, reason=body.reason),
        token,
    )


@router.post(
    "/v1/cards/{card_id}/replace",
    tags=["cards"],
    summary="Replace a lost or damaged card",
    description="ACTIVE or LOST -> REPLACED, and a new ACTIVE card of the same program, "
    "holder, account, validity, PIN and link with a new number; the old number is dead for "
    f"good. {_ANY_STAFF} The body and its `reason` are optional. Needs an `Idempotency-Key`.",
    status_code=201,
    response_description="Both cards; `Location` names the new one.",
    responses=CHANGE,
    operation_id="replaceCard",
)
async def replace_card(
    card_id: CardId,
    request: Request,
    response: Response,
    token: Token,
    key: Key,
    *,
    body: Annotated[OptionalReason | None, Body()] = None,
) -> CardReplacement:
    reply = await _call(
        peers_of(request).cards.ReplaceCard,
        cards_pb2.ReplaceCardRequest(request_id=key, card_id=card_id, reason=_reason(body)),
        token,
    )
    response.headers["Location"] = _location(reply.card.card_id)
    return CardReplacement(
        replaced_card=from_proto(Card, reply.replaced_card), card=from_proto(Card, reply.card)
    )


@router.post(
    "/v1/cards/{card_id}/link",
    tags=["cards"],
    summary="Link two members' cards",
    description="Links two live cards of different members (e.g. a family) when both "
    f"programs allow it; a card has at most one link. {_ANY_STAFF} Needs an "
    "`Idempotency-Key`.",
    responses=CHANGE,
    operation_id="linkCards",
)
async def link_cards(
    card_id: CardId, body: LinkRequest, request: Request, token: Token, key: Key
) -> CardLink:
    reply = await _call(
        peers_of(request).cards.LinkCards,
        cards_pb2.LinkCardsRequest(
            request_id=key, card_id=card_id, other_card_id=body.other_card_id
        ),
        token,
    )
    return CardLink(
        card=from_proto(Card, reply.card), other_card=from_proto(Card, reply.other_card)
    )


@router.post(
    "/v1/cards/{card_id}/unlink",
    tags=["cards"],
    summary="Undo a card's link",
    description=f"On both cards. {_ANY_STAFF} No body. Needs an `Idempotency-Key`.",
    responses=CHANGE,
    operation_id="unlinkCard",
)
async def unlink_card(card_id: CardId, request: Request, token: Token, key: Key) -> Card:
    return await _card(
        peers_of(request).cards.UnlinkCard,
        cards_pb2.UnlinkCardRequest(request_id=key, card_id=card_id),
        token,
    )


# -- the payment PIN ----------------------------------------------------------------


@router.put(
    "/v1/cards/{card_id}/pin",
    tags=["cards"],
    summary="Set or change the payment PIN",
    description="Six digits, neither all alike nor a run such as 123456. When the card has a "
    "PIN, `current_pin` is required and a wrong one counts as a wrong try; a manager may "
    "leave it out to reset the PIN after checking the holder's identity. Needs an "
    "`Idempotency-Key` (a retry is not another try at the PIN). The PINs are never logged "
    "or sent back.",
    responses=PIN,
    operation_id="setCardPin",
)
async def set_card_pin(
    card_id: CardId, body: NewPin, request: Request, token: Token, key: Key
) -> Card:
    return await _card(peers_of(request).cards.SetCardPin, body.to_proto(key, card_id), token)


@router.post(
    "/v1/cards/{card_id}/pin:verify",
    tags=["cards"],
    summary="Check a payment PIN",
    description="204 when the PIN is right; otherwise a 422 problem: `PIN_INCORRECT`, "
    "`PIN_LOCKED` after three wrong tries in a row (for 30 minutes; see Retry-After), "
    "`PIN_NOT_SET`. Staff and services (the checkout) may check a PIN.",
    status_code=204,
    response_class=Response,
    responses=PIN,
    operation_id="verifyCardPin",
)
async def verify_card_pin(
    card_id: CardId, body: PinCheck, request: Request, token: Token
) -> Response:
    await _call(
        peers_of(request).cards.VerifyCardPin,
        cards_pb2.VerifyCardPinRequest(card_id=card_id, pin=body.pin.get_secret_value()),
        token,
    )
    return Response(status_code=204)
