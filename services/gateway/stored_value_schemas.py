"""The JSON shapes of the stored-value routes and their translation to and
from the cards service's StoredValueService messages, in the manner of
card_schemas.py: the gateway checks shapes, the cards service the rules
(positive amounts in the chain's currency, known channels, lengths).

Enum values are the lower-case short names of the proto enums
(``MOVEMENT_KIND_RECHARGE`` is ``"recharge"``, ``HOLD_STATE_HELD`` is
``"held"``); money is ``{"currency_code", "minor_units"}``; durations are
whole seconds. PINs are ``SecretStr``: they never show in a repr, a log
line or an error.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from google.protobuf.duration_pb2 import Duration
from pydantic import BaseModel, ConfigDict, Field

from cornucopia.cards.v1 import stored_value_pb2 as sv_pb2
from services.gateway.card_schemas import Money, Pin, Stamp, pin_value
from services.gateway.schemas import Text, enum_schema, proto_to_json, short_names

MOVEMENT_KINDS = short_names(sv_pb2.MovementKind.DESCRIPTOR)
HOLD_STATES = short_names(sv_pb2.HoldState.DESCRIPTOR)
RECHARGE_CHANNELS = short_names(sv_pb2.RechargeChannel.DESCRIPTOR)
SPEND_ORDERS = short_names(sv_pb2.SpendOrder.DESCRIPTOR)

# The channels a recharge over HTTP may name: partner recharges come through
# the partners' own endpoint and enterprise ones as batches.
CallerChannel = Literal["store_terminal", "bank_card", "online_self_service"]

# google.protobuf.Duration's range; the service's rules are far narrower.
MAX_DURATION_SECONDS = 315_576_000_000


MovementKindName = Annotated[str, enum_schema(MOVEMENT_KINDS)]
HoldStateName = Annotated[str, enum_schema(HOLD_STATES)]
ChannelName = Annotated[str, enum_schema(RECHARGE_CHANNELS)]
SpendOrderName = Annotated[str, enum_schema(SPEND_ORDERS)]


def stored_value_field(name: str) -> str:
    """The stored-value service's field names as the HTTP request spells
    them: the same, but for the idempotency key and the hold's lifetime."""
    return {"request_id": "Idempotency-Key", "ttl": "ttl_seconds"}.get(name, name)


def quote_field(name: str) -> str:
    """The quote's amount arrives as two query parameters."""
    return {
        "amount.minor_units": "amount_minor_units",
        "amount.currency_code": "currency_code",
    }.get(name, name)


def _seconds(value: Any) -> int | None:
    """A Duration as MessageToDict writes it (``"900s"``, ``"0.5s"``), in
    whole seconds."""
    if not isinstance(value, str) or not value.endswith("s"):
        return None
    return int(float(value[:-1]))


# -- balances and movements -------------------------------------------------------


class Balance(BaseModel):
    """An account's balances, and what the card asked about may still spend."""

    account_id: str = Field(default="", examples=["A7Q2K9X4TD8M"])
    available: Money | None = Field(
        default=None, description="Paid plus bonus funds that can be spent now."
    )
    paid: Money | None = Field(default=None, description="The member's own money.")
    bonus: Money | None = Field(default=None, description="The chain's bonus money.")
    held: Money | None = Field(default=None, description="Set aside by holds still open.")
    closed: bool = Field(
        default=False,
        description="The account's last card was cancelled and its balance settled.",
    )
    spendable_today: Money | None = Field(
        default=None, description="What the card may still spend today; null: no daily limit."
    )
    spendable_this_month: Money | None = Field(
        default=None,
        description="A supplementary card with a limit of its own: what it may still spend "
        "this month.",
    )


class Movement(BaseModel):
    """One line of the statement: money in or out of an account."""

    movement_id: str = Field(examples=["V7Q2K9X4TD8M"])
    account_id: str = ""
    card_id: str = Field(default="", description="The card that made it.")
    kind: MovementKindName | None = None
    paid: Money | None = Field(
        default=None, description="What the paid funds changed by: positive in, negative out."
    )
    bonus: Money | None = Field(default=None, description="What the bonus funds changed by.")
    amount: Money | None = Field(default=None, description="The amount as asked (positive).")
    paid_after: Money | None = None
    bonus_after: Money | None = None
    held_after: Money | None = None
    channel: ChannelName | None = Field(default=None, description="Recharges: how.")
    reference: str = ""
    bonus_rule_id: str = ""
    hold_id: str = Field(default="", description="The hold of a hold, capture or release.")
    refunds_movement_id: str = Field(
        default="", description="Refunds: the debit or capture refunded."
    )
    note: str = ""
    stamp: Stamp | None = None


class MovementResult(BaseModel):
    """A movement and the account's balances right after it (on a retry,
    the first answer again)."""

    movement: Movement
    balance: Balance


class MovementPage(BaseModel):
    movements: list[Movement] = Field(description="Newest first.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


class RechargeQuote(BaseModel):
    bonus: Money | None = Field(default=None, description="The bonus a recharge would get.")
    bonus_rule_id: str = Field(default="", description="The rule giving it; empty for none.")
    bonus_rule_name: str = Field(default="", examples=["充1000送100"])


class Hold(BaseModel):
    """Funds set aside for a sale until captured, voided or expired."""

    hold_id: str = Field(examples=["H7Q2K9X4TD8M"])
    card_id: str = ""
    account_id: str = ""
    state: HoldStateName | None = None
    amount: Money | None = None
    paid: Money | None = Field(default=None, description="Of the amount, the paid funds.")
    bonus: Money | None = Field(default=None, description="Of the amount, the bonus funds.")
    captured: Money | None = Field(
        default=None, description="Once captured: what was taken (the rest went back)."
    )
    reference: str = ""
    expire_time: datetime | None = Field(
        default=None, description="Voided by then unless captured."
    )
    held_by: Stamp | None = None
    capture_movement_id: str = Field(default="", description="The capture, to refund it.")


# -- the policy and bonus rules -------------------------------------------------------


class ChannelRule(BaseModel):
    channel: ChannelName | None = None
    enabled: bool = False
    store_ids: list[str] = Field(default_factory=list, description="Empty: every store.")
    operator_ids: list[str] = Field(
        default_factory=list, description="Empty: any staff member whose role may recharge."
    )
    min_amount: Money | None = Field(default=None, description="Per recharge; null: no bound.")
    max_amount: Money | None = Field(default=None, description="Per recharge; null: no bound.")


class StoredValuePolicy(BaseModel):
    """The chain's stored-value rules (set by HQ admins over gRPC)."""

    currency_code: str = Field(default="", examples=["CNY"])
    spend_order: SpendOrderName | None = Field(
        default=None, description="Which funds a payment takes first."
    )
    channels: list[ChannelRule] = Field(default_factory=list)
    max_balance: Money | None = Field(default=None, description="Null: no bound.")
    daily_spend_limit: Money | None = Field(default=None, description="Per card and local day.")
    daily_recharge_limit: Money | None = Field(default=None, description="Per card and local day.")
    time_zone: str = Field(default="", examples=["Asia/Shanghai"])
    max_hold_ttl_seconds: int | None = Field(
        default=None, description="The longest a hold may last."
    )
    etag: str = ""
    updated_by: Stamp | None = None


class BonusRule(BaseModel):
    """A recharge bonus: a fixed amount or a share of the recharge (capped)."""

    bonus_rule_id: str
    name: str = Field(default="", examples=["充1000送100"])
    threshold: Money | None = Field(default=None, description="The least recharge it applies to.")
    fixed_bonus: Money | None = None
    bonus_bps: int | None = Field(default=None, description="Basis points: 1000 is 10 %.")
    max_bonus: Money | None = Field(default=None, description="With bonus_bps: the cap.")
    channels: list[ChannelName] = Field(
        default_factory=list, description="Empty: every channel but enterprise batches."
    )
    program_ids: list[str] = Field(default_factory=list, description="Empty: every program.")
    start_time: datetime | None = None
    end_time: datetime | None = Field(default=None, description="Null: open-ended.")
    created_by: Stamp | None = None


class BonusRulePage(BaseModel):
    bonus_rules: list[BonusRule] = Field(description="Newest first.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


def policy_from_proto(message: sv_pb2.StoredValuePolicy) -> StoredValuePolicy:
    data = proto_to_json(message)
    data["max_hold_ttl_seconds"] = _seconds(data.pop("max_hold_ttl", None))
    return StoredValuePolicy.model_validate(data)


# -- requests -----------------------------------------------------------------------


class NewRecharge(BaseModel):
    """Money put on a card, with the best bonus rule that applies."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "amount": {"currency_code": "CNY", "minor_units": 100000},
                    "channel": "store_terminal",
                }
            ]
        },
    )

    amount: Money = Field(description="More than zero, in the chain's currency.")
    channel: CallerChannel
    payment_reference: Text | None = Field(
        default=None,
        description="The payment's reference; required for bank_card and online_self_service. "
        "At most 100 characters.",
    )
    note: Text | None = Field(default=None, description="Optional, at most 200 characters.")

    def to_proto(self, request_id: str, card_id: str) -> sv_pb2.RechargeRequest:
        return sv_pb2.RechargeRequest(
            request_id=request_id,
            card_id=card_id,
            amount=self.amount.to_proto(),
            channel=sv_pb2.RechargeChannel.Value(f"RECHARGE_CHANNEL_{self.channel.upper()}"),
            payment_reference=self.payment_reference or "",
            note=self.note or "",
        )


class _Payment(BaseModel):
    """What a debit and a hold both take."""

    amount: Money
    pin: Pin | None = Field(default=None, description="The card's payment PIN, when it has one.")
    reference: Text | None = None

    def _call_fields(self, request_id: str, card_id: str) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "card_id": card_id,
            "amount": self.amount.to_proto(),
            "pin": pin_value(self.pin),
            "reference": self.reference or "",
        }


class NewDebit(_Payment):
    """Funds taken at once."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "amount": {"currency_code": "CNY", "minor_units": 2500},
                    "pin": "284751",
                    "reference": "receipt 0042",
                }
            ]
        },
    )

    reference: Text | None = Field(
        default=None, description="What it pays for; at most 100 characters."
    )

    def to_proto(self, request_id: str, card_id: str) -> sv_pb2.DebitRequest:
        return sv_pb2.DebitRequest(**self._call_fields(request_id, card_id))


class NewHold(_Payment):
    """Funds set aside for a sale."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "amount": {"currency_code": "CNY", "minor_units": 8800},
                    "reference": "checkout 7781",
                    "ttl_seconds": 900,
                }
            ]
        },
    )

    reference: Text | None = Field(
        default=None, description="What the hold is for; at most 100 characters."
    )
    ttl_seconds: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DURATION_SECONDS,
        description="How long the hold lasts uncaptured: 900 (15 minutes) when null, at least "
        "30 and at most the policy's `max_hold_ttl_seconds`.",
    )

    def to_proto(self, request_id: str, card_id: str) -> sv_pb2.HoldStoredValueRequest:
        request = sv_pb2.HoldStoredValueRequest(**self._call_fields(request_id, card_id))
        if self.ttl_seconds is not None:
            request.ttl.CopyFrom(Duration(seconds=self.ttl_seconds))
        return request


class HoldCapture(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"amount": {"currency_code": "CNY", "minor_units": 5000}}]},
    )

    amount: Money | None = Field(
        default=None, description="At most the held amount; null (or no body) to capture it all."
    )

    def to_proto(self, request_id: str, hold_id: str) -> sv_pb2.CaptureHoldRequest:
        request = sv_pb2.CaptureHoldRequest(request_id=request_id, hold_id=hold_id)
        if self.amount is not None:
            request.amount.CopyFrom(self.amount.to_proto())
        return request


class HoldVoid(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reason": "sale abandoned"}]}
    )

    reason: Text | None = Field(
        default=None, description="Optional, at most 200 characters. Write no personal data."
    )

    def to_proto(self, request_id: str, hold_id: str) -> sv_pb2.VoidHoldRequest:
        return sv_pb2.VoidHoldRequest(
            request_id=request_id, hold_id=hold_id, reason=self.reason or ""
        )


class NewRefund(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "amount": {"currency_code": "CNY", "minor_units": 1200},
                    "reason": "item returned",
                }
            ]
        },
    )

    amount: Money | None = Field(
        default=None,
        description="At most what is left to refund of the movement; null (or no body) for "
        "all of that.",
    )
    reason: Text | None = Field(
        default=None, description="Optional, at most 200 characters. Write no personal data."
    )

    def to_proto(self, request_id: str, movement_id: str) -> sv_pb2.RefundRequest:
        request = sv_pb2.RefundRequest(
            request_id=request_id, movement_id=movement_id, reason=self.reason or ""
        )
        if self.amount is not None:
            request.amount.CopyFrom(self.amount.to_proto())
        return request
