"""What the gateway's routers share: the channels to the services behind it,
the caller's bearer token, the Idempotency-Key, paging parameters and time
windows, and the problems a route documents. Kept apart from server.py so
that every router can use them without importing the app that includes it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import grpc
import structlog
from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.auth import verify_token
from chassis.config import Settings
from chassis.grpcclient import Stubs, open_channel
from cornucopia.campaigns.v1 import (
    followups_pb2,
    followups_pb2_grpc,
    member_events_pb2,
    member_events_pb2_grpc,
    pricing_pb2,
    pricing_pb2_grpc,
    segments_pb2,
    segments_pb2_grpc,
)
from cornucopia.cards.v1 import (
    cards_pb2,
    cards_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    stored_value_pb2,
    stored_value_pb2_grpc,
)
from cornucopia.loyalty.v1 import (
    checkout_pb2,
    checkout_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    rules_pb2,
    rules_pb2_grpc,
)
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.gateway.problems import FieldError, Problem, ProblemError

if TYPE_CHECKING:
    from cornucopia.campaigns.v1.followups_pb2_grpc import FollowUpServiceAsyncStub
    from cornucopia.campaigns.v1.member_events_pb2_grpc import MemberEventsServiceAsyncStub
    from cornucopia.campaigns.v1.pricing_pb2_grpc import (
        CouponsServiceAsyncStub,
        PricingServiceAsyncStub,
    )
    from cornucopia.campaigns.v1.segments_pb2_grpc import SegmentsServiceAsyncStub
    from cornucopia.cards.v1.cards_pb2_grpc import CardsServiceAsyncStub
    from cornucopia.cards.v1.programs_pb2_grpc import CardProgramsServiceAsyncStub
    from cornucopia.cards.v1.stored_value_pb2_grpc import StoredValueServiceAsyncStub
    from cornucopia.loyalty.v1.checkout_pb2_grpc import CheckoutServiceAsyncStub
    from cornucopia.loyalty.v1.points_pb2_grpc import GiftsServiceAsyncStub, PointsServiceAsyncStub
    from cornucopia.loyalty.v1.rules_pb2_grpc import TiersServiceAsyncStub
    from cornucopia.members.v1.members_pb2_grpc import MembersServiceAsyncStub

S = TypeVar("S")

MEMBERS_SERVICE = members_pb2.DESCRIPTOR.services_by_name["MembersService"]
CARDS_SERVICE = cards_pb2.DESCRIPTOR.services_by_name["CardsService"]
CARD_PROGRAMS_SERVICE = programs_pb2.DESCRIPTOR.services_by_name["CardProgramsService"]
STORED_VALUE_SERVICE = stored_value_pb2.DESCRIPTOR.services_by_name["StoredValueService"]
CHECKOUT_SERVICE = checkout_pb2.DESCRIPTOR.services_by_name["CheckoutService"]
POINTS_SERVICE = points_pb2.DESCRIPTOR.services_by_name["PointsService"]
GIFTS_SERVICE = points_pb2.DESCRIPTOR.services_by_name["GiftsService"]
TIERS_SERVICE = rules_pb2.DESCRIPTOR.services_by_name["TiersService"]
COUPONS_SERVICE = pricing_pb2.DESCRIPTOR.services_by_name["CouponsService"]
FOLLOW_UP_SERVICE = followups_pb2.DESCRIPTOR.services_by_name["FollowUpService"]
MEMBER_EVENTS_SERVICE = member_events_pb2.DESCRIPTOR.services_by_name["MemberEventsService"]
PRICING_SERVICE = pricing_pb2.DESCRIPTOR.services_by_name["PricingService"]
SEGMENTS_SERVICE = segments_pb2.DESCRIPTOR.services_by_name["SegmentsService"]


# -- peers ------------------------------------------------------------------------


class Peers:
    """Channels to the services behind the gateway. A channel the gateway
    opens itself is opened on first use, inside the running event loop, and
    closed on shutdown; one passed in belongs to the caller."""

    def __init__(
        self,
        settings: Settings,
        members_channel: grpc.aio.Channel | None = None,
        cards_channel: grpc.aio.Channel | None = None,
        loyalty_channel: grpc.aio.Channel | None = None,
        campaigns_channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._members_target = settings.peer("members")
        self._cards_target = settings.peer("cards")
        self._loyalty_target = settings.peer("loyalty")
        self._campaigns_target = settings.peer("campaigns")
        self._members_channel = members_channel
        self._cards_channel = cards_channel
        self._loyalty_channel = loyalty_channel
        self._campaigns_channel = campaigns_channel
        self._owned: list[grpc.aio.Channel] = []
        self._stubs = Stubs()

    @property
    def members_channel(self) -> grpc.aio.Channel:
        if self._members_channel is None:
            self._members_channel = open_channel(self._members_target, services=[MEMBERS_SERVICE])
            self._owned.append(self._members_channel)
        return self._members_channel

    @property
    def members(self) -> MembersServiceAsyncStub:
        return self.stub(members_pb2_grpc.MembersServiceStub, self.members_channel)

    @property
    def cards_channel(self) -> grpc.aio.Channel:
        """One channel for the services of the cards process."""
        if self._cards_channel is None:
            self._cards_channel = open_channel(
                self._cards_target,
                services=[CARDS_SERVICE, CARD_PROGRAMS_SERVICE, STORED_VALUE_SERVICE],
            )
            self._owned.append(self._cards_channel)
        return self._cards_channel

    @property
    def cards(self) -> CardsServiceAsyncStub:
        return self.stub(cards_pb2_grpc.CardsServiceStub, self.cards_channel)

    @property
    def card_programs(self) -> CardProgramsServiceAsyncStub:
        return self.stub(programs_pb2_grpc.CardProgramsServiceStub, self.cards_channel)

    @property
    def stored_value(self) -> StoredValueServiceAsyncStub:
        return self.stub(stored_value_pb2_grpc.StoredValueServiceStub, self.cards_channel)

    @property
    def loyalty_channel(self) -> grpc.aio.Channel:
        """One channel for the services of the loyalty process."""
        if self._loyalty_channel is None:
            self._loyalty_channel = open_channel(
                self._loyalty_target,
                services=[CHECKOUT_SERVICE, POINTS_SERVICE, GIFTS_SERVICE, TIERS_SERVICE],
            )
            self._owned.append(self._loyalty_channel)
        return self._loyalty_channel

    @property
    def checkout(self) -> CheckoutServiceAsyncStub:
        return self.stub(checkout_pb2_grpc.CheckoutServiceStub, self.loyalty_channel)

    @property
    def points(self) -> PointsServiceAsyncStub:
        return self.stub(points_pb2_grpc.PointsServiceStub, self.loyalty_channel)

    @property
    def gifts(self) -> GiftsServiceAsyncStub:
        return self.stub(points_pb2_grpc.GiftsServiceStub, self.loyalty_channel)

    @property
    def tiers(self) -> TiersServiceAsyncStub:
        return self.stub(rules_pb2_grpc.TiersServiceStub, self.loyalty_channel)

    @property
    def campaigns_channel(self) -> grpc.aio.Channel:
        """One channel for the services of the campaigns process."""
        if self._campaigns_channel is None:
            self._campaigns_channel = open_channel(
                self._campaigns_target,
                services=[
                    COUPONS_SERVICE,
                    FOLLOW_UP_SERVICE,
                    MEMBER_EVENTS_SERVICE,
                    PRICING_SERVICE,
                    SEGMENTS_SERVICE,
                ],
            )
            self._owned.append(self._campaigns_channel)
        return self._campaigns_channel

    @property
    def coupons(self) -> CouponsServiceAsyncStub:
        return self.stub(pricing_pb2_grpc.CouponsServiceStub, self.campaigns_channel)

    @property
    def followups(self) -> FollowUpServiceAsyncStub:
        return self.stub(followups_pb2_grpc.FollowUpServiceStub, self.campaigns_channel)

    @property
    def member_events(self) -> MemberEventsServiceAsyncStub:
        return self.stub(member_events_pb2_grpc.MemberEventsServiceStub, self.campaigns_channel)

    @property
    def pricing(self) -> PricingServiceAsyncStub:
        """The campaigns service's promotions (and basket pricing)."""
        return self.stub(pricing_pb2_grpc.PricingServiceStub, self.campaigns_channel)

    @property
    def segments(self) -> SegmentsServiceAsyncStub:
        return self.stub(segments_pb2_grpc.SegmentsServiceStub, self.campaigns_channel)

    def stub(self, stub_class: Callable[[grpc.aio.Channel], S], channel: grpc.aio.Channel) -> S:
        """The stub of ``stub_class`` on ``channel`` (the channel of the
        process serving it), made on first use."""
        return self._stubs.on(channel, stub_class)

    async def close(self, grace: float | None = None) -> None:
        for channel in self._owned:
            await channel.close(grace)
        self._owned.clear()
        self._stubs.clear()
        self._members_channel = None
        self._cards_channel = None
        self._loyalty_channel = None
        self._campaigns_channel = None


def peers_of(request: Request) -> Peers:
    peers: Peers = request.app.state.peers
    return peers


# -- request context --------------------------------------------------------------

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT",
    description="A Cornucopia token (`cornucopia token --role ... --scope ...`); "
    "the gateway forwards it to the services, which decide what it may do.",
)


async def caller_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> str:
    """The caller's bearer token, checked at the edge so that a forged or
    expired token goes no further."""
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token:
        raise ProblemError(
            401,
            "MISSING_CREDENTIALS",
            "send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="cornucopia"'},
        )
    principal = verify_token(request.app.state.settings.token_secret, token)
    structlog.contextvars.bind_contextvars(principal=principal.subject)
    return token


def required_key(key: str | None) -> str:
    """The Idempotency-Key sent, or a 400 when there is none."""
    if key is None or not key.strip():
        raise ProblemError(
            400,
            "IDEMPOTENCY_KEY_REQUIRED",
            "send an Idempotency-Key header so that the request can be retried safely",
            errors=[FieldError(field="Idempotency-Key", description="required")],
        )
    return key.strip()


async def idempotency_key(
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="A key of your choosing (a UUID is best), unique per operation. "
            "Retrying with the same key and body returns the first answer; the same key "
            "with another body is refused (422).",
        ),
    ] = None,
) -> str:
    return required_key(key)


# The parameters of a route that calls a service as its caller, and of a
# route that changes something (idempotently).
Token = Annotated[str, Depends(caller_token)]
Key = Annotated[str, Depends(idempotency_key)]
PageSize = Annotated[
    int, Query(ge=0, le=1000, description="At most 100 are returned; 0 for the default (20).")
]
PageToken = Annotated[
    str, Query(max_length=1024, description="The `next_page_token` of the previous page.")
]


# -- time windows -----------------------------------------------------------------


def timestamp(value: datetime | None, field: str) -> Timestamp | None:
    """A query's time as a call field; out of Timestamp's range is a 400
    naming ``field``."""
    if value is None:
        return None
    stamp = Timestamp()
    try:
        stamp.FromDatetime(value)
    except (OverflowError, ValueError):
        raise ProblemError(
            400,
            "INVALID_FIELDS",
            "the request has invalid fields",
            errors=[FieldError(field=field, description="out of range")],
        ) from None
    return stamp


# The optional [start_time, end_time) of a listing.
Window = tuple[datetime | None, datetime | None]


def window_fields(start_time: datetime | None, end_time: datetime | None) -> dict[str, Timestamp]:
    """The optional [start_time, end_time) of a listing, as call fields."""
    window = {"start_time": timestamp(start_time, "start_time")}
    window["end_time"] = timestamp(end_time, "end_time")
    return {name: stamp for name, stamp in window.items() if stamp is not None}


# -- problems ---------------------------------------------------------------------


_PROBLEM_DESCRIPTIONS = {
    400: "The request is malformed or has invalid fields (listed in `errors`).",
    401: "No token, or a token that is not valid.",
    403: "The token's role or scope does not allow this.",
    404: "No such resource.",
    409: "Conflicts with the current state (e.g. the mobile is already a member's).",
    412: "If-Match does not match: the resource changed since you read it.",
    422: "Well formed but refused: a business rule, or an Idempotency-Key reused "
    "for a different request.",
    428: "If-Match is required.",
    429: "Too many requests; see Retry-After.",
    500: "An unexpected error; quote the trace_id.",
    503: "A service behind the gateway is unavailable; see Retry-After.",
    504: "A service behind the gateway did not answer in time.",
}


def problem_responses(
    *statuses: int, overrides: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route answering with these problems;
    ``overrides`` says what a status means for that route."""
    described = {**_PROBLEM_DESCRIPTIONS, **(overrides or {})}
    return {s: {"model": Problem, "description": described[s]} for s in statuses}


# The problems of a route that reads through a service.
READ_PROBLEMS = problem_responses(400, 401, 403, 404, 429, 500, 503, 504)


def change_problems(refusals: str) -> dict[int | str, dict[str, Any]]:
    """The problems of a route that changes something through a service;
    ``refusals`` says what its 422 means there."""
    return problem_responses(400, 401, 403, 404, 422, 429, 500, 503, 504, overrides={422: refusals})
