"""What loyalty asks other services, with a token of loyalty's own: cards
(resolve the card, hold, capture, void and refund stored value; which
partner a client certificate belongs to) and members (a store's time zone
and currency, a member's birthday month, who owns a mobile and what state a
member is in).

A refusal a peer meant for the caller (CARD_FROZEN, INSUFFICIENT_BALANCE,
PIN_INCORRECT...) is passed on as it is; a peer that does not answer is
UNAVAILABLE, which the saga treats as nobody's fault."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf.duration_pb2 import Duration

from chassis.config import Settings
from chassis.errors import ServiceError
from chassis.grpcclient import Peer
from chassis.service import ServiceContext
from cornucopia.campaigns.v1 import pricing_pb2, pricing_pb2_grpc
from cornucopia.cards.v1 import (
    cards_pb2,
    cards_pb2_grpc,
    partners_pb2,
    partners_pb2_grpc,
    stored_value_pb2,
    stored_value_pb2_grpc,
)
from cornucopia.common.v1 import money_pb2
from cornucopia.members.v1 import (
    members_pb2,
    members_pb2_grpc,
    organisation_pb2,
    organisation_pb2_grpc,
)
from services.loyalty.store.members import MemberStatus

if TYPE_CHECKING:
    pass

SUBJECT = "loyalty"
CALL_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class ResolvedCard:
    """Who buys, as cards sees it. A member with no card has no card_id."""

    member_id: str
    card_id: str = ""
    program_id: str = ""
    can_pay: bool = False
    refusal_reason: str = ""
    discount_bps: int = 0
    stored_value: bool = False
    # The card's available stored value when it was resolved (0 for a card
    # with no stored-value account).
    stored_value_available: int = 0


@dataclass(frozen=True)
class HeldValue:
    hold_id: str
    state: str
    # Once captured: the capture's movement and, from a hold captured as it
    # was made, the card's available stored value after it.
    capture_movement_id: str = ""
    available_after: int | None = None

    @property
    def captured(self) -> bool:
        return self.state == "HOLD_STATE_CAPTURED"


@dataclass(frozen=True)
class Captured:
    movement_id: str
    # The card's available stored value after the capture (None: cards did
    # not say).
    available_after: int | None


def _available_after(held: stored_value_pb2.Hold) -> int | None:
    """The card's stored value left after a capture, as cards' reply says
    it; None when it does not."""
    if not held.HasField("available_after"):
        return None
    return int(held.available_after.minor_units)


@dataclass(frozen=True)
class RegisteredPartner:
    """The partner a client certificate is bound to, as cards' registry says."""

    partner_id: str
    active: bool


@dataclass(frozen=True)
class MemberFacts:
    """A member as the members service says now."""

    member_id: str
    status: MemberStatus
    merged_into: str
    as_of: dt.datetime


MEMBER_STATUSES = {
    members_pb2.MEMBER_STATE_ACTIVE: MemberStatus.ACTIVE,
    members_pb2.MEMBER_STATE_ARCHIVED: MemberStatus.ARCHIVED,
    members_pb2.MEMBER_STATE_MERGED: MemberStatus.MERGED,
    members_pb2.MEMBER_STATE_ERASED: MemberStatus.ERASED,
}


class CardsClient:
    def __init__(self, settings: Settings) -> None:
        self.peer = Peer(
            settings.peer("cards"),
            [
                cards_pb2.DESCRIPTOR.services_by_name["CardsService"],
                stored_value_pb2.DESCRIPTOR.services_by_name["StoredValueService"],
                partners_pb2.DESCRIPTOR.services_by_name["PartnersService"],
            ],
            token_secret=settings.token_secret,
            subject=SUBJECT,
            timeout=CALL_TIMEOUT_SECONDS,
        )

    @property
    def _cards(self) -> cards_pb2_grpc.CardsServiceAsyncStub:
        return self.peer.stub(cards_pb2_grpc.CardsServiceStub)  # type: ignore[return-value]

    @property
    def _sv(self) -> stored_value_pb2_grpc.StoredValueServiceAsyncStub:
        return self.peer.stub(stored_value_pb2_grpc.StoredValueServiceStub)  # type: ignore[return-value]

    @property
    def _partners(self) -> partners_pb2_grpc.PartnersServiceAsyncStub:
        return self.peer.stub(partners_pb2_grpc.PartnersServiceStub)  # type: ignore[return-value]

    async def certificate_partner(self, sha256_fingerprint: str) -> RegisteredPartner | None:
        """The partner a client certificate is bound to; None when it is not
        registered or was revoked. Asked at every partner call, never
        cached: a revocation takes effect at the next call."""
        try:
            partner = await self.peer.call(
                self._partners.LookupPartnerCertificate,
                partners_pb2.LookupPartnerCertificateRequest(sha256_fingerprint=sha256_fingerprint),
            )
        except ServiceError as error:
            if error.reason == "CERTIFICATE_NOT_REGISTERED":
                return None
            raise
        return RegisteredPartner(
            partner.partner_id, partner.state == partners_pb2.PARTNER_STATE_ACTIVE
        )

    async def partner_exists(self, partner_id: str) -> bool:
        try:
            await self.peer.call(
                self._partners.GetPartner, partners_pb2.GetPartnerRequest(partner_id=partner_id)
            )
        except ServiceError as error:
            if error.reason == "PARTNER_NOT_FOUND":
                return False
            raise
        return True

    async def resolve(self, *, card_number: str, mobile: str, member_id: str) -> ResolvedCard:
        try:
            found = await self.peer.call(
                self._cards.ResolveCard,
                cards_pb2.ResolveCardRequest(
                    card_number=card_number, mobile=mobile, member_id=member_id
                ),
            )
        except ServiceError as error:
            # A member without a card still earns points.
            if error.reason == "MEMBER_HAS_NO_CARD" and error.metadata.get("member_id"):
                return ResolvedCard(member_id=error.metadata["member_id"])
            raise
        return ResolvedCard(
            member_id=found.card.member_id,
            card_id=found.card.card_id,
            program_id=found.card.program_id,
            can_pay=found.can_pay,
            refusal_reason=found.refusal_reason,
            discount_bps=found.member_discount_bps,
            stored_value=found.stored_value,
            # Unset: the card has no stored-value account, nothing to spend.
            stored_value_available=int(found.stored_value_available.minor_units),
        )

    async def available(self, card_id: str) -> int:
        """The card's available stored value, asked on its own: only when
        recovering a checkout (the replies of ResolveCard and CaptureHold
        carry it otherwise)."""
        balance = await self.peer.call(
            self._sv.GetBalance, stored_value_pb2.GetBalanceRequest(card_id=card_id)
        )
        return int(balance.available.minor_units)

    async def hold(
        self,
        *,
        request_id: str,
        card_id: str,
        amount: money_pb2.Money,
        pin: str,
        reference: str,
        ttl: dt.timedelta,
        capture: bool = False,
    ) -> HeldValue:
        """The hold this request id names (made now, or as an earlier ask
        made it); with ``capture``, captured as it is made."""
        duration = Duration()
        duration.FromTimedelta(ttl)
        held = await self.peer.call(
            self._sv.HoldStoredValue,
            stored_value_pb2.HoldStoredValueRequest(
                request_id=request_id,
                card_id=card_id,
                amount=amount,
                pin=pin,
                reference=reference,
                ttl=duration,
                capture=capture,
            ),
        )
        return HeldValue(
            held.hold_id,
            stored_value_pb2.HoldState.Name(held.state),
            capture_movement_id=held.capture_movement_id,
            available_after=_available_after(held),
        )

    async def capture(self, *, request_id: str, hold_id: str) -> Captured:
        """Captures the whole hold; returns the capture's movement id and
        what the card has left."""
        held = await self.peer.call(
            self._sv.CaptureHold,
            stored_value_pb2.CaptureHoldRequest(request_id=request_id, hold_id=hold_id),
        )
        return Captured(str(held.capture_movement_id), _available_after(held))

    async def hold_captured(self, hold_id: str) -> bool:
        """Whether cards captured the hold."""
        held = await self.peer.call(
            self._sv.GetHold, stored_value_pb2.GetHoldRequest(hold_id=hold_id)
        )
        return bool(held.state == stored_value_pb2.HOLD_STATE_CAPTURED)

    async def void(self, *, request_id: str, hold_id: str, reason: str) -> None:
        await self.peer.call(
            self._sv.VoidHold,
            stored_value_pb2.VoidHoldRequest(request_id=request_id, hold_id=hold_id, reason=reason),
        )

    async def refund(
        self, *, request_id: str, movement_id: str, amount: money_pb2.Money, reason: str
    ) -> str:
        done = await self.peer.call(
            self._sv.Refund,
            stored_value_pb2.RefundRequest(
                request_id=request_id, movement_id=movement_id, amount=amount, reason=reason
            ),
        )
        return str(done.movement.movement_id)

    async def close(self) -> None:
        await self.peer.close()


@dataclass(frozen=True)
class StoreFacts:
    store_id: str
    region_id: str
    time_zone: str
    currency: str


class MembersClient:
    def __init__(self, settings: Settings) -> None:
        self.peer = Peer(
            settings.peer("members"),
            [
                members_pb2.DESCRIPTOR.services_by_name["MembersService"],
                organisation_pb2.DESCRIPTOR.services_by_name["OrganisationService"],
            ],
            token_secret=settings.token_secret,
            subject=SUBJECT,
            timeout=CALL_TIMEOUT_SECONDS,
        )

    @property
    def _organisation(self) -> organisation_pb2_grpc.OrganisationServiceAsyncStub:
        return self.peer.stub(organisation_pb2_grpc.OrganisationServiceStub)  # type: ignore[return-value]

    async def store(self, store_id: str) -> StoreFacts:
        found = await self.peer.call(
            self._organisation.GetStore, organisation_pb2.GetStoreRequest(store_id=store_id)
        )
        return StoreFacts(found.store_id, found.region_id, found.time_zone, found.currency_code)

    async def birthday_month(self, member_id: str) -> int | None:
        member = await self.peer.call(
            self._members.GetMember, members_pb2.GetMemberRequest(member_id=member_id)
        )
        month = member.birthday.month if member.HasField("birthday") else 0
        return month or None

    @property
    def _members(self) -> members_pb2_grpc.MembersServiceAsyncStub:
        return self.peer.stub(members_pb2_grpc.MembersServiceStub)  # type: ignore[return-value]

    async def member_id_by_mobile(self, mobile: str) -> str:
        """The member whose mobile this is (a merged duplicate's mobile
        gives the survivor); NOT_FOUND MEMBER_NOT_FOUND for none."""
        member = await self.peer.call(
            self._members.LookupMember, members_pb2.LookupMemberRequest(mobile=mobile)
        )
        return str(member.member_id)

    async def member_facts(self, member_id: str) -> MemberFacts:
        """What state a member is in now; NOT_FOUND MEMBER_NOT_FOUND for an
        unknown one."""
        member = await self.peer.call(
            self._members.GetMember, members_pb2.GetMemberRequest(member_id=member_id)
        )
        as_of = member.update_time.ToDatetime(dt.UTC) if member.HasField("update_time") else None
        return MemberFacts(
            member.member_id,
            MEMBER_STATUSES.get(member.state, MemberStatus.ACTIVE),
            member.merged_into,
            as_of or dt.datetime.now(dt.UTC),
        )

    async def close(self) -> None:
        await self.peer.close()


def cards_client(ctx: ServiceContext) -> CardsClient:
    """The service's one client of cards, closed when it stops."""

    def make() -> CardsClient:
        client = CardsClient(ctx.settings)
        ctx.on_close(client.close)
        return client

    return ctx.shared("loyalty.cards", make)


def members_client(ctx: ServiceContext) -> MembersClient:
    """The service's one client of members, closed when it stops."""

    def make() -> MembersClient:
        client = MembersClient(ctx.settings)
        ctx.on_close(client.close)
        return client

    return ctx.shared("loyalty.members", make)


class CampaignsClient:
    """Pricing with promotions and coupons, and the coupons' reservation
    kept with the checkout id."""

    def __init__(self, settings: Settings) -> None:
        self.peer = Peer(
            settings.peer("campaigns"),
            [
                pricing_pb2.DESCRIPTOR.services_by_name["PricingService"],
                pricing_pb2.DESCRIPTOR.services_by_name["CouponsService"],
            ],
            token_secret=settings.token_secret,
            subject=SUBJECT,
            timeout=CALL_TIMEOUT_SECONDS,
        )

    @property
    def _coupons(self) -> pricing_pb2_grpc.CouponsServiceAsyncStub:
        return self.peer.stub(pricing_pb2_grpc.CouponsServiceStub)  # type: ignore[return-value]

    async def price(self, request: pricing_pb2.PriceBasketRequest) -> pricing_pb2.PricedBasket:
        stub: pricing_pb2_grpc.PricingServiceAsyncStub
        stub = self.peer.stub(pricing_pb2_grpc.PricingServiceStub)  # type: ignore[assignment]
        return await self.peer.call(stub.PriceBasket, request)

    async def commit(self, *, reservation_id: str, sale_id: str, total: money_pb2.Money) -> None:
        await self.peer.call(
            self._coupons.CommitCoupons,
            pricing_pb2.CommitCouponsRequest(
                reservation_id=reservation_id, sale_id=sale_id, sale_total=total
            ),
        )

    async def release(self, *, reservation_id: str, reason: str) -> None:
        await self.peer.call(
            self._coupons.ReleaseCoupons,
            pricing_pb2.ReleaseCouponsRequest(reservation_id=reservation_id, reason=reason),
        )

    async def restore(self, *, sale_id: str, refund_id: str, whole_sale: bool) -> None:
        await self.peer.call(
            self._coupons.RestoreCoupons,
            pricing_pb2.RestoreCouponsRequest(
                sale_id=sale_id, refund_id=refund_id, whole_sale=whole_sale
            ),
        )

    async def close(self) -> None:
        await self.peer.close()


def campaigns_client(ctx: ServiceContext) -> CampaignsClient:
    """The service's one client of campaigns, closed when it stops."""

    def make() -> CampaignsClient:
        client = CampaignsClient(ctx.settings)
        ctx.on_close(client.close)
        return client

    return ctx.shared("loyalty.campaigns", make)
