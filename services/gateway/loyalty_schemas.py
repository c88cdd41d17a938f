"""The JSON shapes of the loyalty routes (the checkout and its sales, points,
gifts, members' tiers) and their translation to and from the loyalty
service's messages, in the manner of card_schemas.py: the gateway checks
shapes, the loyalty service the rules (a basket of known lines, tenders that
pay the total, a reason, points within bounds) and reports every violation
at once.

Enum values are the lower-case short names of the proto enums
(``TENDER_KIND_STORED_VALUE`` is ``"stored_value"``, ``SALE_STATE_VOIDED``
is ``"voided"``); money is ``{"currency_code", "minor_units"}``; points are
whole numbers. PINs are ``SecretStr``: they never show in a repr, a log line
or an error, and no answer carries them.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from cornucopia.loyalty.v1 import checkout_pb2, events_pb2, points_pb2, rules_pb2
from services.gateway.card_schemas import MAX_ID_LENGTH, Id, Money, Pin, Stamp, pin_value
from services.gateway.schemas import Text, enum_schema, one_of, proto_to_json, short_names

TENDER_KINDS = short_names(checkout_pb2.TenderKind.DESCRIPTOR)
SALE_STATES = short_names(checkout_pb2.SaleState.DESCRIPTOR)
POINTS_MOVEMENT_KINDS = short_names(points_pb2.PointsMovementKind.DESCRIPTOR)
POINTS_SOURCES = short_names(events_pb2.PointsSource.DESCRIPTOR)
TIER_QUALIFICATIONS = short_names(rules_pb2.TierQualification.DESCRIPTOR)
TIER_HISTORY_KINDS = short_names(rules_pb2.TierHistoryKind.DESCRIPTOR)

# Bounds only keep the numbers inside the proto's integers; the service's
# rules are far narrower (1 to 9,999 of a line, points up to 1e9).
MIN_INT32, MAX_INT32 = -(2**31), 2**31 - 1
MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1

TenderKindName = Annotated[str, one_of(TENDER_KINDS), enum_schema(TENDER_KINDS)]
SaleStateName = Annotated[str, enum_schema(SALE_STATES)]
PointsMovementKindName = Annotated[str, enum_schema(POINTS_MOVEMENT_KINDS)]
PointsSourceName = Annotated[str, enum_schema(POINTS_SOURCES)]


def checkout_field(name: str) -> str:
    """The checkout's field names as the HTTP request spells them: the
    same, but the checkout_id is the Idempotency-Key."""
    return "Idempotency-Key" if name == "checkout_id" else name


def loyalty_field(name: str) -> str:
    """The loyalty service's field names as the HTTP request spells them:
    the same, but for the idempotency key."""
    return "Idempotency-Key" if name == "request_id" else name


# -- the checkout: requests -----------------------------------------------------------


class BasketLine(BaseModel):
    """One article of the basket."""

    model_config = ConfigDict(extra="forbid")

    sku: Text = Field(examples=["SERUM-30"])
    category: Text = Field(
        description="The SKU's category; earn rules and exclusions go by it.",
        examples=["skincare"],
    )
    description: Text | None = Field(default=None, description="Shown on the receipt.")
    quantity: int = Field(description="More than zero.", examples=[2], ge=MIN_INT32, le=MAX_INT32)
    unit_price: Money = Field(description="The shelf price of one unit, in the store's currency.")

    def to_proto(self) -> checkout_pb2.BasketLine:
        return checkout_pb2.BasketLine(
            sku=self.sku,
            category=self.category,
            description=self.description or "",
            quantity=self.quantity,
            unit_price=self.unit_price.to_proto(),
        )


class TenderInput(BaseModel):
    """One way the sale is paid."""

    model_config = ConfigDict(extra="forbid")

    kind: TenderKindName
    amount: Money | None = Field(
        default=None, description="Every kind but `points`: the money it pays."
    )
    points: int | None = Field(
        default=None, description="`points`: how many points to use.", ge=MIN_INT64, le=MAX_INT64
    )
    pin: Pin | None = Field(
        default=None,
        description="`stored_value`: the card's payment PIN, when it has one. Never stored, "
        "logged or sent back.",
    )
    reference: Text | None = Field(
        default=None, description="`bank_card`: the acquirer's reference."
    )

    def to_proto(self) -> checkout_pb2.Tender:
        tender = checkout_pb2.Tender(
            kind=TENDER_KINDS[self.kind],  # type: ignore[arg-type]
            points=self.points or 0,
            pin=pin_value(self.pin),
            reference=self.reference or "",
        )
        if self.amount is not None:
            tender.amount.CopyFrom(self.amount.to_proto())
        return tender


class _Basket(BaseModel):
    """What a checkout and its preview both take."""

    store_id: Id = Field(description="Your store, unless your scope covers others.")
    terminal_id: Text = Field(max_length=MAX_ID_LENGTH, examples=["T1"])
    card_number: Text | None = Field(
        default=None,
        max_length=MAX_ID_LENGTH,
        description="Who the member is: at most one of card_number, mobile and member_id; "
        "none for a guest.",
    )
    mobile: Text | None = Field(default=None, max_length=40, description="Any usual format.")
    member_id: Id | None = None
    lines: list[BasketLine]
    coupon_codes: list[Text] = Field(default_factory=list)

    def _call_fields(self) -> dict[str, Any]:
        return {
            "store_id": self.store_id,
            "terminal_id": self.terminal_id,
            "card_number": self.card_number or "",
            "mobile": self.mobile or "",
            "member_id": self.member_id or "",
            "lines": [line.to_proto() for line in self.lines],
            "coupon_codes": self.coupon_codes,
        }


_BASKET_EXAMPLE: dict[str, Any] = {
    "store_id": "S001",
    "terminal_id": "T1",
    "card_number": "8816042735190318",
    "lines": [
        {
            "sku": "SERUM-30",
            "category": "skincare",
            "quantity": 2,
            "unit_price": {"currency_code": "CNY", "minor_units": 19900},
        }
    ],
}


class NewCheckout(_Basket):
    """A sale: who buys, the basket and how it is paid."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    **_BASKET_EXAMPLE,
                    "tenders": [
                        {
                            "kind": "stored_value",
                            "amount": {"currency_code": "CNY", "minor_units": 30000},
                            "pin": "284751",
                        },
                        {"kind": "cash", "amount": {"currency_code": "CNY", "minor_units": 7810}},
                    ],
                }
            ]
        },
    )

    tenders: list[TenderInput] = Field(
        description="Each kind at most once; together they pay the total exactly."
    )

    def to_proto(self, checkout_id: str) -> checkout_pb2.CheckoutRequest:
        return checkout_pb2.CheckoutRequest(
            checkout_id=checkout_id,
            tenders=[tender.to_proto() for tender in self.tenders],
            **self._call_fields(),
        )


class CheckoutBasket(_Basket):
    """A basket to price for a member, without taking anything."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_BASKET_EXAMPLE]})

    def to_proto(self) -> checkout_pb2.PreviewCheckoutRequest:
        return checkout_pb2.PreviewCheckoutRequest(**self._call_fields())


# -- the checkout: answers -------------------------------------------------------------


class Discount(BaseModel):
    source: str = Field(default="", description='"MEMBER", "TIER" or a promotion\'s id.')
    description: str = Field(default="", examples=["GOLD 5 % off"])
    amount: Money | None = None


class ReceiptLine(BaseModel):
    line_no: int = Field(description="From 1, in the order of the basket.")
    sku: str = ""
    category: str = ""
    description: str = ""
    quantity: int = 0
    unit_price: Money | None = None
    gross: Money | None = Field(default=None, description="quantity × unit price.")
    discounts: list[Discount] = Field(default_factory=list)
    net: Money | None = Field(default=None, description="gross minus the discounts.")
    quantity_refunded: int = Field(default=0, description="How many were given back so far.")


class TenderLine(BaseModel):
    kind: Annotated[str, enum_schema(TENDER_KINDS)] | None = None
    amount: Money | None = None
    points: int = Field(default=0, description="`points`: the points used.")
    card_id: str = Field(default="", description="`stored_value`: the card that paid.")
    movement_id: str = Field(default="", description="`stored_value`: the card's movement.")
    reference: str = ""


class PointsSummary(BaseModel):
    earned: int = 0
    spent: int = 0
    explanations: list[str] = Field(
        default_factory=list, description="Why the points earned are what they are, per rule."
    )
    balance: int = Field(default=0, description="The member's points after the sale.")


class TierSummary(BaseModel):
    tier_id: str = Field(default="", examples=["VIP"])
    tier_name: str = ""
    upgraded_from: str = Field(default="", description="Set when this sale moved the member up.")
    next_tier_id: str = ""
    next_tier_name: str = ""
    spend_to_next: Money | None = Field(
        default=None, description="Still needed for the next tier, in its window."
    )
    visits_to_next: int = 0


class Receipt(BaseModel):
    """A recorded sale as the till prints it."""

    sale_id: str = Field(examples=["S7Q2K9X4TD8M3RW1"])
    checkout_id: str = Field(default="", description="The Idempotency-Key of the checkout.")
    store_id: str = ""
    terminal_id: str = ""
    member_id: str = Field(default="", description="Empty for a guest.")
    card_id: str = ""
    lines: list[ReceiptLine] = Field(default_factory=list)
    gross: Money | None = None
    discount: Money | None = None
    total: Money | None = None
    tenders: list[TenderLine] = Field(default_factory=list)
    points: PointsSummary | None = None
    stored_value_balance: Money | None = Field(
        default=None, description="The card's stored value left, when it paid or carries any."
    )
    tier: TierSummary | None = None
    sold_by: Stamp | None = None


class CheckoutPreview(BaseModel):
    """A basket priced for a member; nothing was taken."""

    lines: list[ReceiptLine] = Field(default_factory=list)
    gross: Money | None = None
    discount: Money | None = None
    total: Money | None = None
    points_to_earn: int = Field(default=0, description="If paid without points.")
    explanations: list[str] = Field(default_factory=list)
    max_points: int = Field(default=0, description="The most points the member may pay with.")
    max_points_value: Money | None = Field(default=None, description="What they are worth.")
    points_balance: int = 0
    stored_value_balance: Money | None = None
    card_can_pay: bool = False
    card_refusal_reason: str = Field(
        default="", description="Why the card cannot pay (CARD_FROZEN, ...); empty when it can."
    )


class RefundLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line_no: int = Field(description="The receipt's line_no.", ge=MIN_INT32, le=MAX_INT32)
    quantity: int = Field(
        description="How many of the line to give back.", ge=MIN_INT32, le=MAX_INT32
    )


class RefundReceipt(BaseModel):
    """What a refund or a void gave back, and how."""

    refund_id: str
    sale_id: str = ""
    lines: list[RefundLine] = Field(default_factory=list)
    amount: Money | None = None
    tenders: list[TenderLine] = Field(
        default_factory=list,
        description="How the money went back: stored value to the card, cash and bank card at "
        "the till, points as a new lot.",
    )
    points_returned: int = Field(default=0, description="Points paid with, given back.")
    points_reversed: int = Field(default=0, description="Points earned, taken back.")
    points_not_reversed: int = Field(
        default=0, description="Earned points the member had spent already."
    )
    void: bool = False
    reason: str = ""
    refunded_by: Stamp | None = None


class Sale(BaseModel):
    receipt: Receipt
    state: SaleStateName | None = None
    refunded: Money | None = Field(default=None, description="What was given back so far.")
    refunds: list[RefundReceipt] = Field(default_factory=list)
    sale_time: datetime | None = None


class SalePage(BaseModel):
    sales: list[Sale] = Field(description="Newest first.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


class SaleRefund(BaseModel):
    """Lines of a sale to give back; all that is left when none are given."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"lines": [{"line_no": 1, "quantity": 1}], "reason": "changed her mind"}]
        },
    )

    lines: list[RefundLine] | None = Field(
        default=None, description="Null or empty: the whole of what is left."
    )
    reason: Text = Field(description="Required, at most 200 characters. Write no personal data.")

    def to_proto(self, request_id: str, sale_id: str) -> checkout_pb2.RefundSaleRequest:
        return checkout_pb2.RefundSaleRequest(
            request_id=request_id,
            sale_id=sale_id,
            lines=[
                checkout_pb2.RefundLine(line_no=line.line_no, quantity=line.quantity)
                for line in self.lines or ()
            ],
            reason=self.reason,
        )


class SaleVoid(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reason": "wrong basket"}]}
    )

    reason: Text = Field(description="Required, at most 200 characters. Write no personal data.")

    def to_proto(self, request_id: str, sale_id: str) -> checkout_pb2.VoidSaleRequest:
        return checkout_pb2.VoidSaleRequest(
            request_id=request_id, sale_id=sale_id, reason=self.reason
        )


# -- points -------------------------------------------------------------------------


class PointsAccount(BaseModel):
    """A member's points."""

    member_id: str
    balance: int = Field(default=0, description="The open lots' remaining points.")
    held: int = Field(default=0, description="Set aside by checkouts in progress.")
    available: int = Field(default=0, description="What can be spent now.")
    lifetime_earned: int = 0
    available_cash_value: Money | None = Field(
        default=None, description="What `available` is worth at the chain's rate."
    )
    next_expire_time: datetime | None = Field(
        default=None, description="The next expiry: the first instant the points are gone."
    )
    next_expiry_date: date | None = Field(
        default=None, description="The last day they are valid, in the chain's time zone."
    )
    next_expiry_points: int = 0
    expiring_soon_points: int = Field(
        default=0, description="Expiring within the chain's warning days."
    )
    expiring_soon_until_time: datetime | None = None
    closed: bool = Field(default=False, description="The member was erased or merged.")
    merged_into_member_id: str = ""


def _date(value: Any) -> date | None:
    """A common.v1.Date as MessageToDict writes it, or None when unset."""
    if not isinstance(value, dict) or not value.get("year"):
        return None
    return date(int(value["year"]), int(value["month"]), int(value["day"]))


def points_account_from_proto(message: points_pb2.PointsAccount) -> PointsAccount:
    data = proto_to_json(message)
    data["next_expiry_date"] = _date(data.get("next_expiry_date"))
    return PointsAccount.model_validate(data)


class PointsLot(BaseModel):
    """Points gained at once, spent in order of expiry."""

    lot_id: str
    member_id: str = ""
    source: PointsSourceName | None = None
    reference: str = Field(default="", description="The sale, adjustment or transfer.")
    points: int = Field(default=0, description="What it started with.")
    remaining: int = 0
    earn_time: datetime | None = None
    expire_time: datetime | None = None
    warn_time: datetime | None = Field(default=None, description="When its warning went out.")
    expired_time: datetime | None = None


class PointsLotPage(BaseModel):
    lots: list[PointsLot] = Field(description="Earliest expiry first: the order spending takes.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


class PointsMovement(BaseModel):
    """One line of a member's points history."""

    movement_id: str
    member_id: str = ""
    kind: PointsMovementKindName | None = None
    points: int = Field(default=0, description="Signed: positive in, negative out.")
    balance_after: int = 0
    source: PointsSourceName | None = None
    reference: str = ""
    reason: str = ""
    related_member_id: str = Field(
        default="", description="The other member of a transfer or a merge."
    )
    lot_id: str = ""
    requested_points: int = Field(default=0, description="Reversals: the points asked back.")
    stamp: Stamp | None = None


class PointsHistoryPage(BaseModel):
    movements: list[PointsMovement] = Field(description="Newest first.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


class PointsAdjustment(BaseModel):
    """Points added or taken away by hand, with the reason."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"points": 500, "reason": "goodwill: late delivery"}]},
    )

    points: int = Field(
        description="Not zero: positive to add, negative to take away.", ge=MIN_INT64, le=MAX_INT64
    )
    reason: Text = Field(description="Required, at most 200 characters; kept in the history.")

    def to_proto(self, request_id: str, member_id: str) -> points_pb2.AdjustPointsRequest:
        return points_pb2.AdjustPointsRequest(
            request_id=request_id, member_id=member_id, points=self.points, reason=self.reason
        )


class PointsAdjustmentResult(BaseModel):
    movement: PointsMovement
    account: PointsAccount


def adjustment_from_proto(message: points_pb2.AdjustPointsResponse) -> PointsAdjustmentResult:
    return PointsAdjustmentResult(
        movement=PointsMovement.model_validate(proto_to_json(message.movement)),
        account=points_account_from_proto(message.account),
    )


class PointsTransfer(BaseModel):
    """Points moved from one member to another (a family)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"from_member_id": "M7Q2K9X4TD", "to_member_id": "M3RW1Q2K9X", "points": 1000}
            ]
        },
    )

    from_member_id: Id
    to_member_id: Id
    points: int = Field(description="More than zero.", ge=MIN_INT64, le=MAX_INT64)
    note: Text | None = Field(default=None, description="Optional, at most 200 characters.")

    def to_proto(self, request_id: str) -> points_pb2.TransferPointsRequest:
        return points_pb2.TransferPointsRequest(
            request_id=request_id,
            from_member_id=self.from_member_id,
            to_member_id=self.to_member_id,
            points=self.points,
            note=self.note or "",
        )


class PointsTransferResult(BaseModel):
    transfer_id: str
    sent: PointsMovement
    received: PointsMovement
    lots: list[PointsLot] = Field(
        default_factory=list, description="The receiver's new lots, with the sender's expiry."
    )


# -- gifts --------------------------------------------------------------------------


class Gift(BaseModel):
    """A gift of the catalogue, with the stock the store sees."""

    gift_id: str = Field(examples=["TOTE-BAG"])
    name: str = ""
    points_price: int = Field(default=0, description="The points one of it costs.")
    active: bool = Field(default=False, description="Only active gifts can be redeemed.")
    etag: str = ""
    store_id: str = Field(default="", description="The store whose stock is shown.")
    store_quantity: int = 0
    chain_quantity: int = Field(default=0, description="The chain-wide stock.")
    created_by: Stamp | None = None
    updated_by: Stamp | None = None


class GiftPage(BaseModel):
    gifts: list[Gift] = Field(description="By gift_id.")
    next_page_token: str = Field(default="", description="Empty on the last page.")


class NewGiftRedemption(BaseModel):
    """A member takes a gift for points."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"member_id": "M7Q2K9X4TD", "quantity": 1}]},
    )

    member_id: Id
    quantity: int = Field(default=1, description="1 to 100.", ge=MIN_INT32, le=MAX_INT32)
    store_id: Id | None = Field(
        default=None,
        description="Where it is taken: a store's staff at their own store (by default); HQ "
        "and services name a store, or none for the chain-wide stock.",
    )

    def to_proto(self, request_id: str, gift_id: str) -> points_pb2.RedeemGiftRequest:
        return points_pb2.RedeemGiftRequest(
            request_id=request_id,
            member_id=self.member_id,
            gift_id=gift_id,
            quantity=self.quantity,
            store_id=self.store_id or "",
        )


class GiftRedemption(BaseModel):
    redemption_id: str
    member_id: str = ""
    gift_id: str = ""
    store_id: str = ""
    quantity: int = 0
    points: int = Field(default=0, description="What it cost in all.")
    stock_store_id: str = Field(
        default="", description="Whose stock it took: the store, or empty for chain-wide."
    )
    balance_after: int = Field(default=0, description="The member's points after it.")
    stamp: Stamp | None = None


# -- tiers --------------------------------------------------------------------------


class TierBenefits(BaseModel):
    discount_bps: int = Field(default=0, description="Basis points off the price: 300 is 3 %.")
    points_multiplier_bps: int = Field(
        default=0, description="Applied to the points a sale earns: 12000 is ×1.2."
    )


class Tier(BaseModel):
    tier_id: str = Field(examples=["VIP"])
    name: str = ""
    rank: int = Field(default=0, description="Higher is better.")
    min_spend: Money | None = Field(default=None, description="Spend over the window to qualify.")
    min_visits: int = 0
    qualification: Annotated[str, enum_schema(TIER_QUALIFICATIONS)] | None = None
    benefits: TierBenefits | None = None


class TierProgress(BaseModel):
    tier_id: str = ""
    next_tier_id: str = Field(default="", description="Empty at the top of the ladder.")
    next_tier_name: str = ""
    spend_to_next: Money | None = None
    visits_to_next: int = 0
    window_spend: Money | None = Field(default=None, description="Qualifying spend so far.")
    window_visits: int = 0
    changed_from_tier_id: str = ""


class MemberTier(BaseModel):
    """A member's tier and how far the next one is."""

    member_id: str
    tier: Tier | None = None
    since: datetime | None = Field(default=None, description="Null: never changed tier.")
    grace_end_time: datetime | None = Field(
        default=None, description="Set during a grace period: when it ends."
    )
    progress: TierProgress | None = None


class TierHistoryEntry(BaseModel):
    kind: Annotated[str, enum_schema(TIER_HISTORY_KINDS)] | None = None
    from_tier_id: str = ""
    to_tier_id: str = ""
    reason: str = ""
    sale_id: str = Field(default="", description="The sale that moved the member up.")
    period: str = Field(default="", description="The review period.", examples=["2026-Q1"])
    grace_end_time: datetime | None = None
    stamp: Stamp | None = None


class TierHistoryPage(BaseModel):
    entries: list[TierHistoryEntry] = Field(description="Newest first.")
    next_page_token: str = Field(default="", description="Empty on the last page.")
