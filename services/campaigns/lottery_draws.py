"""Writing lottery draws: the draw's saga across loyalty and campaigns, and
the worker's passes that finish what a draw left to do.

A draw:
1. is recorded CHARGING (bound to its request id), in a transaction of its
   own;
2. is charged at loyalty (ChargePoints, request id ``lottery:<draw_id>``):
   a refusal (POINTS_INSUFFICIENT, an unknown or archived member) deletes
   the CHARGING row and is passed on, so nothing happened; loyalty not
   answering leaves the row for a retry or the worker (the charge is
   idempotent, so charging again never charges twice);
3. in one campaigns transaction: draws the outcome from a fresh 256-bit
   seed, takes the prize's stock (``stock - 1 WHERE stock > 0``; raced out:
   another round on the stocks as they are then), issues a coupon prize
   through coupon_ledger (an issue job of one member, under a savepoint: a
   coupon the member cannot have is another round), records the draw
   DRAWN with its rounds and publishes campaigns.v1.lottery.drawn;
4. a points prize is awarded at loyalty (AwardPoints, request id
   ``lottery-prize:<draw_id>``), retried by the worker until done.

Should step 3 fail for any reason but the database being unavailable, the
draw turns REFUNDING and the points are given back (AwardPoints, request id
``lottery-refund:<draw_id>``, retried by the worker until done), then
REFUNDED."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from dataclasses import dataclass, replace
from typing import Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.config import Settings
from chassis.db import Database, is_unique_violation, utcnow
from chassis.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from chassis.grpcclient import Peer
from chassis.logs import get_logger
from cornucopia.campaigns.v1 import events_pb2
from cornucopia.common.v1 import org_pb2
from cornucopia.loyalty.v1 import points_pb2, points_pb2_grpc
from services.campaigns import coupon_ledger, events
from services.campaigns.domain import coupons as coupon_rules
from services.campaigns.domain import lotteries as rules
from services.campaigns.domain.coupons import JobState
from services.campaigns.domain.lotteries import DrawState, Entry, Fulfilment, Prize, PrizeKind
from services.campaigns.store import coupons as coupon_store
from services.campaigns.store import lotteries as store
from services.campaigns.store.lotteries import DrawRecord

log = get_logger(__name__)

SUBJECT = "campaigns"
CALL_TIMEOUT_SECONDS = 5.0
CHARGE_PREFIX = "lottery:"
PRIZE_PREFIX = "lottery-prize:"
REFUND_PREFIX = "lottery-refund:"
# A CHARGING draw older than this is one its caller left (a crash, loyalty
# not answering): the worker finishes it.
STALE_AFTER = dt.timedelta(seconds=30)
BATCH = 100


# --- loyalty, as campaigns asks it ------------------------------------------------------


class LoyaltyPoints(Protocol):
    async def charge(
        self, *, request_id: str, member_id: str, points: int, reason: str, reference: str
    ) -> str: ...

    async def award(
        self, *, request_id: str, member_id: str, points: int, reason: str, reference: str
    ) -> str: ...


class LoyaltyClient:
    """campaigns' channel to loyalty's PointsService, with a token of its
    own (role SERVICE). A refusal meant for the caller is passed on as it
    is; loyalty not answering is UNAVAILABLE (LOYALTY_UNAVAILABLE)."""

    def __init__(self, settings: Settings) -> None:
        self.peer = Peer(
            settings.peer("loyalty"),
            [points_pb2.DESCRIPTOR.services_by_name["PointsService"]],
            token_secret=settings.token_secret,
            subject=SUBJECT,
            timeout=CALL_TIMEOUT_SECONDS,
        )

    @property
    def _points(self) -> points_pb2_grpc.PointsServiceAsyncStub:
        return self.peer.stub(points_pb2_grpc.PointsServiceStub)  # type: ignore[return-value]

    async def charge(
        self, *, request_id: str, member_id: str, points: int, reason: str, reference: str
    ) -> str:
        """Returns the charge's movement id."""
        done = await self.peer.call(
            self._points.ChargePoints,
            points_pb2.ChargePointsRequest(
                request_id=request_id,
                member_id=member_id,
                points=points,
                reason=reason,
                reference=reference,
            ),
        )
        return str(done.movement.movement_id)

    async def award(
        self, *, request_id: str, member_id: str, points: int, reason: str, reference: str
    ) -> str:
        """Returns the lot's id."""
        done = await self.peer.call(
            self._points.AwardPoints,
            points_pb2.AwardPointsRequest(
                request_id=request_id,
                member_id=member_id,
                points=points,
                reason=reason,
                reference=reference,
            ),
        )
        return str(done.lot.lot_id)

    async def close(self) -> None:
        await self.peer.close()


# --- the draw ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stamp:
    principal: str
    store_id: str
    at: dt.datetime


def lottery_not_found(lottery_id: str) -> NotFound:
    return NotFound(
        "no lottery with this id", reason="LOTTERY_NOT_FOUND", metadata={"lottery_id": lottery_id}
    )


def _fingerprint(lottery_id: str, member_id: str) -> str:
    return hashlib.sha256(f"{lottery_id}\x1f{member_id}".encode()).hexdigest()


def _reused() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("request_id", "already used for a different request")],
        message="this request_id was already used with a different payload",
        reason="IDEMPOTENCY_KEY_REUSED",
    )


async def _read(db: Database, draw_id: str) -> DrawRecord:
    async with db.sessions() as session:
        found = await store.get_draw(session, draw_id=draw_id)
    assert found is not None
    return found


async def draw(
    db: Database,
    loyalty: LoyaltyPoints,
    *,
    request_id: str,
    lottery_id: str,
    member_id: str,
    stamp: Stamp,
) -> DrawRecord:
    """Draws once for the member; the same request again returns the same
    draw (finishing it first if it was left half-way)."""
    request_hash = _fingerprint(lottery_id, member_id)
    async with db.sessions() as session:
        existing = await store.get_draw(session, request_id=request_id)
        record = None if existing else await store.get_lottery(session, lottery_id)
    if existing is None:
        if record is None:
            raise lottery_not_found(lottery_id)
        lottery = record.lottery
        if not lottery.open_at(stamp.at):
            raise FailedPrecondition(
                "the lottery is not open now",
                reason="LOTTERY_NOT_OPEN",
                metadata={"lottery_id": lottery_id},
            )
        draw_id = rules.new_draw_id()
        try:
            async with db.transaction() as session:
                await store.insert_draw(
                    session,
                    draw_id=draw_id,
                    request_id=request_id,
                    request_hash=request_hash,
                    lottery_id=lottery_id,
                    member_id=member_id,
                    cost_points=lottery.cost_points,
                    state=DrawState.CHARGING.value,
                    table_version=lottery.table_version,
                    principal=stamp.principal,
                    store_id=stamp.store_id,
                    created_at=stamp.at,
                )
        except IntegrityError as exc:
            if not is_unique_violation(exc):
                raise
            async with db.sessions() as session:
                existing = await store.get_draw(session, request_id=request_id)
            if existing is None:
                raise
    if existing is not None:
        if existing.request_hash != request_hash:
            raise _reused()
        draw_id = existing.draw_id
    return await resume(db, loyalty, draw_id)


async def resume(db: Database, loyalty: LoyaltyPoints, draw_id: str) -> DrawRecord:
    """Takes a draw as far as it can go now: charged and drawn, its points
    prize awarded or its refund given."""
    current = await _read(db, draw_id)
    if current.state == DrawState.CHARGING:
        try:
            movement_id = await loyalty.charge(
                request_id=CHARGE_PREFIX + draw_id,
                member_id=current.member_id,
                points=current.cost_points,
                reason=f"lottery draw {draw_id}",
                reference=draw_id,
            )
        except Unavailable:
            raise
        except ServiceError:
            # Refused: nothing was charged, so nothing happened.
            async with db.transaction() as session:
                await store.delete_draw(session, draw_id, DrawState.CHARGING)
            raise
        try:
            async with db.transaction() as session:
                await complete(session, draw_id, movement_id)
        except Unavailable:
            raise
        except Exception as exc:
            log.exception("a charged lottery draw failed; refunding", draw_id=draw_id)
            async with db.transaction() as session:
                await store.update_draw(
                    session,
                    draw_id,
                    store.lottery_draws.c.state == DrawState.CHARGING.value,
                    state=DrawState.REFUNDING.value,
                    charge_movement_id=movement_id,
                    refund_reason=f"the draw could not be completed ({type(exc).__name__})"[:200],
                )
        current = await _read(db, draw_id)
    try:
        if current.state == DrawState.REFUNDING:
            await refund(db, loyalty, current)
        elif current.state == DrawState.DRAWN and current.fulfilment == Fulfilment.POINTS_PENDING:
            await award_prize(db, loyalty, current)
    except ServiceError as error:
        # Left for the worker; the draw as it stands is the answer.
        log.warning("lottery draw left for the worker", draw_id=draw_id, reason=error.reason)
    return await _read(db, draw_id)


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _issue_coupon(
    session: AsyncSession, prize: Prize, current: DrawRecord, at: dt.datetime
) -> str:
    """The prize's coupon, issued through coupon_ledger as an issue job of
    one member; _Refused with the coupon's reason when the member cannot
    have it."""
    template = await coupon_store.get_template(session, prize.template_id)
    if template is None:
        raise _Refused("COUPON_TEMPLATE_NOT_FOUND")
    job_id = coupon_rules.new_job_id()
    await coupon_store.insert_job(
        session,
        coupon_store.JobRecord(
            job_id=job_id,
            request_id=f"{CHARGE_PREFIX}{current.draw_id}",
            request_hash=_fingerprint(current.draw_id, prize.prize_id),
            template_id=prize.template_id,
            state=JobState.RUNNING,
            total=1,
            processed=0,
            issued=0,
            skipped=0,
            created_by=current.principal,
            created_store_id=current.store_id,
            created_at=at,
            finished_at=None,
        ),
        [current.member_id],
    )
    try:
        await coupon_ledger._issue_in(  # the one issuing path, inside this draw's unit of work
            session,
            template,
            job_id,
            current.member_id,
            coupon_ledger.Stamp(current.principal, current.store_id, at),
        )
    except coupon_ledger.Skip as skip:
        raise _Refused(skip.reason) from None
    await coupon_store.finish_job(session, job_id, at)
    issued = await coupon_store.coupons_where(session, coupon_store.coupons.c.job_id == job_id)
    assert len(issued) == 1
    return issued[0].coupon_id


async def _give(
    session: AsyncSession, lottery_id: str, prize: Prize, current: DrawRecord, at: dt.datetime
) -> str:
    """Takes one of the prize (and issues its coupon); returns the coupon
    id. _Refused (nothing changed) when it ran out or the coupon cannot be
    issued."""
    async with session.begin_nested():
        if not await store.take_stock(session, lottery_id, prize.prize_id):
            raise _Refused("OUT_OF_STOCK")
        if prize.kind == PrizeKind.COUPON:
            return await _issue_coupon(session, prize, current, at)
    return ""


async def complete(session: AsyncSession, draw_id: str, movement_id: str) -> None:
    """Step 3, in the caller's transaction: nothing when the draw is no
    longer CHARGING (another run finished it)."""
    current = await store.get_draw(session, draw_id=draw_id, for_update=True)
    if current is None or current.state != DrawState.CHARGING:
        return
    record = await store.get_lottery(session, current.lottery_id)
    assert record is not None
    lottery = record.lottery
    now = utcnow()
    seed = rules.new_seed()
    stocks = {p.prize_id: p.stock for p in lottery.prizes}
    refused: set[str] = set()
    rounds: list[rules.Round] = []
    won: Prize | None = None
    coupon_id = ""
    while True:
        table = tuple(
            Entry(p.prize_id, 0 if p.prize_id in refused else stocks.get(p.prize_id, 0), p.weight)
            for p in lottery.prizes
        )
        drawn = rules.draw_round(seed, draw_id, len(rounds), table, lottery.no_prize_weight)
        chosen = lottery.prize(drawn.prize_id) if drawn.prize_id else None
        if chosen is None:
            rounds.append(drawn)
            break
        try:
            coupon_id = await _give(session, lottery.lottery_id, chosen, current, now)
        except _Refused as refusal:
            rounds.append(replace(drawn, given=False, refusal=refusal.reason))
            if refusal.reason != "OUT_OF_STOCK":
                refused.add(chosen.prize_id)
            stocks = await store.stocks(session, lottery.lottery_id)
            # Every round takes a prize out of the table: at most one per
            # prize, then none is left but "no prize".
            assert len(rounds) <= len(lottery.prizes) + 1
            continue
        rounds.append(drawn)
        won = chosen
        break
    fulfilment = Fulfilment.NONE
    if won is not None:
        fulfilment = {
            PrizeKind.COUPON: Fulfilment.COUPON_ISSUED,
            PrizeKind.POINTS: Fulfilment.POINTS_PENDING,
            PrizeKind.GIFT: Fulfilment.GIFT_TO_COLLECT,
        }[won.kind]
    moved = await store.update_draw(
        session,
        draw_id,
        store.lottery_draws.c.state == DrawState.CHARGING.value,
        state=DrawState.DRAWN.value,
        charge_movement_id=movement_id,
        seed=seed.hex(),
        table_version=lottery.table_version,
        rounds=store.rounds_json(rounds),
        prize_id=won.prize_id if won else "",
        fulfilment=fulfilment.value,
        coupon_id=coupon_id,
        drawn_at=now,
    )
    assert moved  # locked CHARGING above
    await events.publish(
        session,
        events.LOTTERY_DRAWN,
        events_pb2.LotteryDrawn(
            draw_id=draw_id,
            lottery_id=lottery.lottery_id,
            member_id=current.member_id,
            cost_points=current.cost_points,
            prize_id=won.prize_id if won else "",
            prize_kind=won.kind.value if won else "",
            coupon_id=coupon_id,
            points=won.points if won and won.kind == PrizeKind.POINTS else 0,
            gift_id=won.gift_id if won and won.kind == PrizeKind.GIFT else "",
            stamp=_stamp_proto(current.principal, current.store_id, now),
        ),
    )


def _stamp_proto(principal: str, store_id: str, at: dt.datetime) -> org_pb2.AuditStamp:
    message = org_pb2.AuditStamp(principal=principal, store_id=store_id)
    message.time.FromDatetime(at)
    return message


async def award_prize(db: Database, loyalty: LoyaltyPoints, current: DrawRecord) -> None:
    """A points prize awarded at loyalty, once (request id
    ``lottery-prize:<draw_id>``), then recorded."""
    async with db.sessions() as session:
        record = await store.get_lottery(session, current.lottery_id)
    assert record is not None
    prize = record.lottery.prize(current.prize_id)
    assert prize is not None and prize.kind == PrizeKind.POINTS
    lot_id = await loyalty.award(
        request_id=PRIZE_PREFIX + current.draw_id,
        member_id=current.member_id,
        points=prize.points,
        reason=f"lottery prize {prize.prize_id} of draw {current.draw_id}",
        reference=current.draw_id,
    )
    async with db.transaction() as session:
        await store.update_draw(
            session,
            current.draw_id,
            store.lottery_draws.c.fulfilment == Fulfilment.POINTS_PENDING.value,
            fulfilment=Fulfilment.POINTS_AWARDED.value,
            points_lot_id=lot_id,
        )


async def refund(db: Database, loyalty: LoyaltyPoints, current: DrawRecord) -> None:
    """The draw's points given back at loyalty, once (request id
    ``lottery-refund:<draw_id>``), then REFUNDED."""
    lot_id = await loyalty.award(
        request_id=REFUND_PREFIX + current.draw_id,
        member_id=current.member_id,
        points=current.cost_points,
        reason=f"refund of lottery draw {current.draw_id}: it could not be completed",
        reference=current.draw_id,
    )
    async with db.transaction() as session:
        await store.update_draw(
            session,
            current.draw_id,
            store.lottery_draws.c.state == DrawState.REFUNDING.value,
            state=DrawState.REFUNDED.value,
            refund_lot_id=lot_id,
        )


# --- the worker's pass ---------------------------------------------------------------------


async def finish_due(db: Database, loyalty: LoyaltyPoints, now: dt.datetime | None = None) -> int:
    """Finishes what draws left: CHARGING draws older than STALE_AFTER,
    points prizes not yet awarded, refunds not yet given. A failure is
    logged and retried at the next pass."""
    at = now or utcnow()
    c = store.lottery_draws.c
    async with db.sessions() as session:
        stale = await store.draws_to_work(
            session,
            c.state == DrawState.CHARGING.value,
            c.created_at <= at - STALE_AFTER,
            limit=BATCH,
        )
        pending = await store.draws_to_work(
            session,
            c.state.in_([DrawState.DRAWN.value, DrawState.REFUNDING.value]),
            c.fulfilment.in_(["", Fulfilment.POINTS_PENDING.value]),
            limit=BATCH,
        )
    count = 0
    for draw_id in [*stale, *pending]:
        try:
            done = await resume(db, loyalty, draw_id)
        except asyncio.CancelledError:
            raise
        except ServiceError as error:
            log.warning("lottery draw not finished", draw_id=draw_id, reason=error.reason)
            continue
        except Exception:
            log.exception("lottery draw not finished", draw_id=draw_id)
            continue
        if done.state == DrawState.REFUNDED or done.fulfilment != Fulfilment.POINTS_PENDING:
            count += 1
    return count
