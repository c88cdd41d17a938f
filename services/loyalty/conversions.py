"""Converting points with a partner: one conversion in one unit of work,
with the member's points (``points_ledger``), the conversion's record and
the partner's conversion number together.

A conversion first locks the partner's terms row (so a partner's
conversions are numbered with no gaps in commit order, and its members'
daily caps are counted without a race), then the member's account through
the ledger. The partner's request id is bound to the conversion for good
(``UNIQUE (partner_id, request_id)``); the ledger's movement is bound to
the conversion's own id.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database
from chassis.errors import FieldViolation, InvalidArgument, PermissionDenied
from services.loyalty import points_ledger as ledger
from services.loyalty.domain import conversions as rules
from services.loyalty.domain.conversions import Direction, Terms
from services.loyalty.domain.points import LotSource, MovementKind, Stamp
from services.loyalty.store import conversions as store
from services.loyalty.store import points as points_store
from services.loyalty.store.conversions import ConversionRecord, TermsRecord


@dataclass(frozen=True)
class ConversionRequest:
    """What a partner asked: ``points`` are partner points to the chain, or
    chain points to the partner; ``request_hash`` tells a retry from
    another request under the same ``request_id``."""

    partner_id: str
    direction: Direction
    member_id: str
    points: int
    partner_reference: str
    request_id: str
    request_hash: str


def not_enabled(partner_id: str, direction: Direction) -> PermissionDenied:
    return PermissionDenied(
        "conversions with this partner are not enabled",
        reason="CONVERSION_NOT_ENABLED",
        metadata={"partner_id": partner_id, "direction": direction.value},
    )


def enabled_terms(record: TermsRecord | None, partner_id: str, direction: Direction) -> Terms:
    """The terms of one way, or PERMISSION_DENIED CONVERSION_NOT_ENABLED
    for a partner without terms, disabled, or not offering that way."""
    terms = record.terms.terms(direction) if record is not None else None
    if terms is None:
        raise not_enabled(partner_id, direction)
    return terms


def _reused() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("request_id", "already used for a different request")],
        message="this request_id was already used with a different payload",
        reason="IDEMPOTENCY_KEY_REUSED",
    )


async def done_before(session: AsyncSession, request: ConversionRequest) -> ConversionRecord | None:
    """The conversion the partner's request id is bound to, if any; another
    request under it is INVALID_ARGUMENT IDEMPOTENCY_KEY_REUSED."""
    done = await store.conversion_by_request(session, request.partner_id, request.request_id)
    if done is not None and done.request_hash != request.request_hash:
        raise _reused()
    return done


async def convert(db: Database, request: ConversionRequest, stamp: Stamp) -> ConversionRecord:
    """Makes the conversion (or returns the one the request id is bound
    to): checks the partner's terms and the amounts, the member's daily cap,
    moves the member's points, records the conversion under the partner's
    next number."""
    async with db.transaction() as session:
        if (done := await done_before(session, request)) is not None:
            return done
        record = await store.get_terms(session, request.partner_id, for_update=True)
        # A twin of this request may have committed while we waited.
        if (done := await done_before(session, request)) is not None:
            return done
        terms = enabled_terms(record, request.partner_id, request.direction)
        amounts = rules.check_amount(terms, request.direction, request.points)
        partner_points, chain_points = amounts.partner_and_chain(request.direction)
        await ledger.require_member(session, request.member_id, active=True)
        day = (await ledger.policy(session)).local_day(stamp.at)
        used = await store.chain_points_on(
            session, request.partner_id, request.member_id, request.direction, day
        )
        rules.check_daily_cap(terms, used, chain_points)
        conversion_id = rules.new_conversion_id()
        movement_id = await _move_points(
            session, request, conversion_id, chain_points=chain_points, stamp=stamp
        )
        converted = ConversionRecord(
            conversion_id=conversion_id,
            partner_id=request.partner_id,
            sequence=await store.next_sequence(session, request.partner_id),
            request_id=request.request_id,
            request_hash=request.request_hash,
            direction=request.direction,
            member_id=request.member_id,
            requested=request.points,
            partner_points=partner_points,
            chain_points=chain_points,
            rate=terms.rate,
            partner_reference=request.partner_reference,
            movement_id=movement_id,
            balance_after=await ledger.available(session, request.member_id, at=stamp.at),
            business_day=day,
            principal=stamp.principal,
            at=stamp.at,
        )
        await store.insert_conversion(session, converted)
        return converted


async def _move_points(
    session: AsyncSession,
    request: ConversionRequest,
    conversion_id: str,
    *,
    chain_points: int,
    stamp: Stamp,
) -> str:
    """The member's side: a lot of source PARTNER_CONVERSION, or chain
    points spent; returns the movement's id."""
    movement_request = f"conversion:{conversion_id}"
    if request.direction == Direction.TO_CHAIN:
        await ledger.accrue(
            session,
            request.member_id,
            chain_points,
            source=LotSource.PARTNER_CONVERSION,
            reference=conversion_id,
            stamp=stamp,
            request_id=movement_request,
        )
        movement = await points_store.movement_by_request(
            session, MovementKind.ACCRUE, movement_request
        )
        assert movement is not None  # written just now
        return movement.movement_id
    spent = await ledger.convert_out(
        session,
        request.member_id,
        chain_points,
        reference=conversion_id,
        stamp=stamp,
        request_id=movement_request,
    )
    return spent.movement_id
