"""The JSON shapes of the card routes and their translation to and from the
cards service's protobuf messages, in the manner of schemas.py: the gateway
checks shapes, the cards service the rules (and reports every violation).

Enum values are the lower-case short names of the proto enums
(``CARD_STATE_LOST`` is ``"lost"``); money is ``{"currency_code",
"minor_units"}``, never a float. PINs are ``SecretStr``: they never show in
a repr, a log line or an error.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from cornucopia.cards.v1 import cards_pb2, programs_pb2
from cornucopia.common.v1 import money_pb2
from services.gateway.schemas import Text, encodable, enum_schema, short_names

CARD_STATES = short_names(cards_pb2.CardState.DESCRIPTOR)
CARD_ROLES = short_names(cards_pb2.CardRole.DESCRIPTOR)
CARD_ACTIONS = short_names(cards_pb2.CardAction.DESCRIPTOR)
RESOLVED_BY = short_names(cards_pb2.ResolvedBy.DESCRIPTOR)
CARD_FORMS = short_names(programs_pb2.CardForm.DESCRIPTOR)
CARD_HOLDINGS = short_names(programs_pb2.CardHolding.DESCRIPTOR)
CANCEL_SETTLEMENTS = short_names(programs_pb2.CancelSettlement.DESCRIPTOR)

# Ids are short codes; the bound keeps nonsense away from the service.
MAX_ID_LENGTH = 64
# Six digits today; the bound only keeps megabytes away from the PIN hash.
MAX_PIN_LENGTH = 32


CardStateName = Annotated[str, enum_schema(CARD_STATES)]
Id = Annotated[Text, Field(min_length=1, max_length=MAX_ID_LENGTH)]


def _pin_text(value: SecretStr) -> SecretStr:
    # The messages name the rule, never the value.
    secret = value.get_secret_value()
    if len(secret) > MAX_PIN_LENGTH:
        raise ValueError(f"at most {MAX_PIN_LENGTH} characters")
    encodable(secret)
    return value


Pin = Annotated[SecretStr, AfterValidator(_pin_text)]


def pin_value(pin: SecretStr | None) -> str:
    """A PIN as the service takes it: empty for none."""
    return pin.get_secret_value() if pin else ""


def card_field(name: str) -> str:
    """The cards service's field names as the HTTP request spells them: the
    same, but for the idempotency key."""
    return "Idempotency-Key" if name == "request_id" else name


# -- shared shapes ------------------------------------------------------------------


class Money(BaseModel):
    """An amount: an integer count of the currency's minor units (cents, fen)."""

    model_config = ConfigDict(extra="forbid")

    currency_code: Text = Field(max_length=3, description="ISO 4217, e.g. CNY.", examples=["CNY"])
    # Bounds only keep the number inside the proto's int64.
    minor_units: int = Field(ge=-(2**63), le=2**63 - 1, examples=[50000])

    def to_proto(self) -> money_pb2.Money:
        return money_pb2.Money(currency_code=self.currency_code, minor_units=self.minor_units)


class Stamp(BaseModel):
    """Who did something, from which store, when."""

    principal: str = Field(default="", description="A staff id, partner id or service name.")
    store_id: str = Field(default="", description="The store they acted from, if any.")
    time: datetime | None = None


# -- programs -----------------------------------------------------------------------


class NumberFormat(BaseModel):
    prefix: str = Field(default="", examples=["8816"])
    length: int = Field(default=0, description="Digits in all, check digit included.")
    luhn_check_digit: bool = False


class CardProgram(BaseModel):
    """A card type of the chain (gold, silver, VIP, a co-branded card, ...)."""

    program_id: str = Field(examples=["GOLD"])
    display_name: str = Field(default="", examples=["金卡"])
    form: Annotated[str, enum_schema(CARD_FORMS)] | None = None
    number_format: NumberFormat | None = None
    validity_months: int = Field(default=0, description="0: its cards never expire.")
    stored_value: bool = False
    member_discount_bps: int = Field(
        default=0, description="Basis points off the price: 500 is 5 % off.", examples=[500]
    )
    holding: Annotated[str, enum_schema(CARD_HOLDINGS)] | None = None
    max_group_holders: int = 0
    allows_supplementary: bool = False
    max_supplementary_cards: int = 0
    allows_linking: bool = False
    partner_id: str = Field(default="", description="The co-brand issuer, if any.")
    number_capacity: int = 0
    numbers_issued: int = 0
    created_by: Stamp | None = None
    cancel_settlement: Annotated[str, enum_schema(CANCEL_SETTLEMENTS)] | None = Field(
        default=None,
        description="What happens to the paid stored value when an account's last card is "
        "cancelled; pay_out when null.",
    )


class CardProgramPage(BaseModel):
    card_programs: list[CardProgram]
    next_page_token: str = Field(default="", description="Empty on the last page.")


# -- cards --------------------------------------------------------------------------


class Card(BaseModel):
    """A member card."""

    card_id: str = Field(examples=["C7Q2K9X4TD8M"])
    card_number: str = Field(
        default="", description="As printed on the card.", examples=["8816042735190318"]
    )
    program_id: str = Field(default="", examples=["GOLD"])
    member_id: str = Field(default="", examples=["M7Q2K9X4TD"])
    account_id: str = Field(default="", description="The account the card draws on.")
    state: CardStateName | None = None
    role: Annotated[str, enum_schema(CARD_ROLES)] | None = None
    form: Annotated[str, enum_schema(CARD_FORMS)] | None = None
    principal_card_id: str = Field(
        default="", description="Supplementary cards: the principal card."
    )
    spending_limit: Money | None = Field(
        default=None, description="Supplementary cards: the most the card may spend."
    )
    linked_card_id: str = ""
    replaces_card_id: str = ""
    replaced_by_card_id: str = ""
    issue_time: datetime | None = None
    expire_time: datetime | None = Field(default=None, description="Null: never expires.")
    issued_by: Stamp | None = None
    state_changed_by: Stamp | None = None
    state_reason: str = Field(default="", description="Why the state last changed.")
    pin_set: bool = Field(default=False, description="Whether a payment PIN is set.")
    partner_id: str = ""


class CardPage(BaseModel):
    cards: list[Card]
    next_page_token: str = Field(default="", description="Empty on the last page.")


class CardResolution(BaseModel):
    """The card behind what a till was given, and whether it can pay now."""

    card: Card
    resolved_by: Annotated[str, enum_schema(RESOLVED_BY)] | None = None
    can_pay: bool = Field(description="Active and within its validity.")
    refusal_reason: str = Field(
        default="",
        description="When it cannot pay: CARD_LOST, CARD_FROZEN, CARD_REPLACED, "
        "CARD_CANCELLED or CARD_EXPIRED; empty when it can.",
        examples=["CARD_LOST"],
    )
    member_discount_bps: int = Field(
        default=0, description="The program's member discount, in basis points off the price."
    )
    stored_value: bool = Field(
        default=False, description="Whether the program's cards carry stored value."
    )


class CardReplacement(BaseModel):
    replaced_card: Card = Field(description="The old card, now replaced.")
    card: Card = Field(description="The new card.")


class CardLink(BaseModel):
    card: Card
    other_card: Card


class CardHistoryEntry(BaseModel):
    card_id: str
    action: Annotated[str, enum_schema(CARD_ACTIONS)] | None = None
    from_state: CardStateName | None = None
    to_state: CardStateName | None = None
    reason: str = ""
    related_card_id: str = Field(
        default="", description="The new card of a replacement, the linked card."
    )
    stamp: Stamp | None = None


class CardHistoryPage(BaseModel):
    entries: list[CardHistoryEntry]
    next_page_token: str = Field(default="", description="Empty on the last page.")


# -- requests -----------------------------------------------------------------------


class NewCard(BaseModel):
    """A card to issue to a member."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"program_id": "GOLD", "member_id": "M7Q2K9X4TD"}]},
    )

    program_id: Id
    member_id: Id
    principal_card_id: Id | None = Field(
        default=None,
        description="Issue a supplementary card drawing on this principal card's account.",
    )
    group_card_id: Id | None = Field(
        default=None, description="Add the member as a holder of this group card's account."
    )
    spending_limit: Money | None = Field(
        default=None, description="Supplementary cards only: a spending limit of their own."
    )

    def to_proto(self, request_id: str) -> cards_pb2.IssueCardRequest:
        request = cards_pb2.IssueCardRequest(
            request_id=request_id,
            program_id=self.program_id,
            member_id=self.member_id,
            principal_card_id=self.principal_card_id or "",
            group_card_id=self.group_card_id or "",
        )
        if self.spending_limit is not None:
            request.spending_limit.CopyFrom(self.spending_limit.to_proto())
        return request


class OptionalReason(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reason": "left on the bus"}]}
    )

    reason: Text = Field(
        default="",
        description="Optional, at most 200 characters; kept in the card's history. "
        "Write no personal data.",
    )


class RequiredReason(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reason": "fraud suspected"}]}
    )

    reason: Text = Field(
        description="Why; required, at most 200 characters; kept in the card's history. "
        "Write no personal data."
    )


class LinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    other_card_id: Id = Field(description="Another member's live card.")


class NewPin(BaseModel):
    """A new payment PIN; the current one when the card has a PIN (a manager
    may leave it out to reset a PIN after checking the holder's identity)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"new_pin": "284751"}]}
    )

    new_pin: Pin = Field(description="Six digits, not all alike and not a run like 123456.")
    current_pin: Pin | None = None

    def to_proto(self, request_id: str, card_id: str) -> cards_pb2.SetCardPinRequest:
        return cards_pb2.SetCardPinRequest(
            request_id=request_id,
            card_id=card_id,
            new_pin=self.new_pin.get_secret_value(),
            current_pin=pin_value(self.current_pin),
        )


class PinCheck(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"pin": "284751"}]})

    pin: Pin
