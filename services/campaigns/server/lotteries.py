"""Points lotteries' gRPC edge (LotteriesService) and the worker that
finishes draws (points prizes to award, refunds to give, draws left
half-way). The rules are in domain/lotteries.py, the writes in
lottery_draws.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Role, current_principal
from chassis.db import utcnow
from chassis.errors import FieldViolation, InvalidArgument, NotFound
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, run_idempotent
from chassis.inbox import Subscription
from chassis.logs import get_logger
from chassis.paging import newest_first_after, newest_first_token, page_size
from chassis.service import ServiceContext
from cornucopia.campaigns.v1 import lotteries_pb2 as pb
from cornucopia.campaigns.v1 import lotteries_pb2_grpc
from cornucopia.common.v1 import org_pb2
from services.campaigns import lottery_draws
from services.campaigns.domain import lotteries as rules
from services.campaigns.domain.lotteries import DrawState, Fulfilment, Lottery, Prize, PrizeKind
from services.campaigns.lottery_draws import LoyaltyClient, LoyaltyPoints, Stamp
from services.campaigns.store import coupons as coupon_store
from services.campaigns.store import lotteries as store
from services.campaigns.store.lotteries import DrawRecord, LotteryRecord

log = get_logger(__name__)

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
DRAWING_ROLES = (*STAFF_ROLES, Role.SERVICE)
KINDS = {
    pb.PRIZE_KIND_COUPON: PrizeKind.COUPON,
    pb.PRIZE_KIND_POINTS: PrizeKind.POINTS,
    pb.PRIZE_KIND_GIFT: PrizeKind.GIFT,
}
KINDS_PROTO = {v: k for k, v in KINDS.items()}
STATES_PROTO = {
    DrawState.CHARGING: pb.DRAW_STATE_CHARGING,
    DrawState.DRAWN: pb.DRAW_STATE_DRAWN,
    DrawState.REFUNDING: pb.DRAW_STATE_REFUNDING,
    DrawState.REFUNDED: pb.DRAW_STATE_REFUNDED,
}
FULFILMENTS_PROTO = {
    Fulfilment.NONE: pb.PRIZE_FULFILMENT_NONE,
    Fulfilment.COUPON_ISSUED: pb.PRIZE_FULFILMENT_COUPON_ISSUED,
    Fulfilment.POINTS_PENDING: pb.PRIZE_FULFILMENT_POINTS_PENDING,
    Fulfilment.POINTS_AWARDED: pb.PRIZE_FULFILMENT_POINTS_AWARDED,
    Fulfilment.GIFT_TO_COLLECT: pb.PRIZE_FULFILMENT_GIFT_TO_COLLECT,
}
DEFAULT_INTERVAL_SECONDS = 5.0


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _stamp(principal: str, store_id: str, at: dt.datetime) -> org_pb2.AuditStamp:
    return org_pb2.AuditStamp(principal=principal, store_id=store_id, time=timestamp(at))


def required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def draw_not_found(draw_id: str) -> NotFound:
    return NotFound("no draw with this id", reason="DRAW_NOT_FOUND", metadata={"draw_id": draw_id})


# --- proto <-> domain ---------------------------------------------------------------------


def prize_to_proto(p: Prize, initial_stock: int | None = None) -> pb.LotteryPrize:
    return pb.LotteryPrize(
        prize_id=p.prize_id,
        kind=KINDS_PROTO[p.kind],
        display_name=p.display_name,
        coupon_template_id=p.template_id,
        points=p.points,
        gift_id=p.gift_id,
        stock=p.stock,
        weight=p.weight,
        initial_stock=p.stock if initial_stock is None else initial_stock,
    )


def lottery_to_proto(record: LotteryRecord) -> pb.Lottery:
    t = record.lottery
    return pb.Lottery(
        lottery_id=t.lottery_id,
        display_name=t.display_name,
        start_time=timestamp(t.start_at),
        end_time=timestamp(t.end_at),
        cost_points=t.cost_points,
        prizes=[prize_to_proto(p, record.initial_stock.get(p.prize_id)) for p in t.prizes],
        no_prize_weight=t.no_prize_weight,
        table_version=t.table_version,
        created=_stamp(record.created_by, record.created_store_id, record.created_at),
    )


def lottery_from_proto(message: pb.Lottery) -> Lottery:
    prizes = []
    bad: list[FieldViolation] = []
    for i, p in enumerate(message.prizes):
        kind = KINDS.get(p.kind)
        if kind is None:
            bad.append(FieldViolation(f"lottery.prizes[{i}].kind", "coupon, points or gift"))
            continue
        prizes.append(
            Prize(
                prize_id=p.prize_id.strip(),
                kind=kind,
                display_name=p.display_name.strip(),
                template_id=p.coupon_template_id.strip() if kind == PrizeKind.COUPON else "",
                points=p.points if kind == PrizeKind.POINTS else 0,
                gift_id=p.gift_id.strip() if kind == PrizeKind.GIFT else "",
                stock=p.stock,
                weight=p.weight,
            )
        )
    for name in ("start_time", "end_time"):
        if not message.HasField(name):
            bad.append(FieldViolation(f"lottery.{name}", "required"))
    if bad:
        raise InvalidArgument(bad)
    return rules.validate(
        Lottery(
            lottery_id=rules.new_lottery_id(),
            display_name=message.display_name.strip(),
            start_at=message.start_time.ToDatetime(dt.UTC),
            end_at=message.end_time.ToDatetime(dt.UTC),
            cost_points=message.cost_points,
            prizes=tuple(prizes),
            no_prize_weight=message.no_prize_weight,
        )
    )


def round_to_proto(r: rules.Round) -> pb.DrawRound:
    return pb.DrawRound(
        round=r.round,
        table=[
            pb.DrawTableEntry(prize_id=e.prize_id, stock=e.stock, weight=e.weight) for e in r.table
        ],
        no_prize_weight=r.no_prize_weight,
        roll_hex=f"{r.roll:064x}",
        total_weight=r.total,
        point=r.point,
        prize_id=r.prize_id,
        given=r.given,
        refusal=r.refusal,
    )


def draw_to_proto(d: DrawRecord, lottery: Lottery | None) -> pb.LotteryDraw:
    message = pb.LotteryDraw(
        draw_id=d.draw_id,
        lottery_id=d.lottery_id,
        member_id=d.member_id,
        state=STATES_PROTO[d.state],
        cost_points=d.cost_points,
        charge_movement_id=d.charge_movement_id,
        won=bool(d.prize_id),
        fulfilment=(
            FULFILMENTS_PROTO[d.fulfilment] if d.fulfilment else pb.PRIZE_FULFILMENT_UNSPECIFIED
        ),
        coupon_id=d.coupon_id,
        points_lot_id=d.points_lot_id,
        refund_lot_id=d.refund_lot_id,
        refund_reason=d.refund_reason,
        stamp=_stamp(d.principal, d.store_id, d.created_at),
    )
    if d.seed:
        message.randomness.CopyFrom(
            pb.DrawRandomness(
                algorithm=rules.ALGORITHM,
                seed_hex=d.seed,
                table_version=d.table_version,
                rounds=[round_to_proto(r) for r in d.rounds],
            )
        )
    prize = lottery.prize(d.prize_id) if lottery and d.prize_id else None
    if prize is not None:
        # The prize as defined; its stock is not the draw's business.
        message.prize.CopyFrom(prize_to_proto(replace(prize, stock=0), 0))
    if d.drawn_at is not None:
        message.draw_time.CopyFrom(timestamp(d.drawn_at))
    return message


# --- the servicer ---------------------------------------------------------------------------


class LotteriesServicer(lotteries_pb2_grpc.LotteriesServiceServicer):
    def __init__(self, ctx: ServiceContext, loyalty: LoyaltyPoints) -> None:
        self.db = ctx.db
        self.loyalty = loyalty

    async def _lottery(self, lottery_id: str) -> LotteryRecord:
        async with self.db.sessions() as session:
            record = await store.get_lottery(session, lottery_id)
        if record is None:
            raise lottery_draws.lottery_not_found(lottery_id)
        return record

    async def CreateLottery(self, request: pb.CreateLotteryRequest, context: Context) -> pb.Lottery:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        lottery = lottery_from_proto(request.lottery)
        now = utcnow()

        async def create(session: AsyncSession) -> pb.Lottery:
            for i, p in enumerate(lottery.prizes):
                if p.kind == PrizeKind.COUPON and (
                    await coupon_store.get_template(session, p.template_id) is None
                ):
                    raise NotFound(
                        "no coupon template with this id",
                        reason="COUPON_TEMPLATE_NOT_FOUND",
                        metadata={"template_id": p.template_id, "prize": str(i)},
                    )
            await store.insert_lottery(
                session, lottery, principal=principal.subject, store_id=principal.store_id, now=now
            )
            return pb.Lottery(lottery_id=lottery.lottery_id)

        created = await run_idempotent(
            self.db,
            method="campaigns.CreateLottery",
            request_id=request.request_id,
            request=request,
            response_type=pb.Lottery,
            work=create,
        )
        return lottery_to_proto(await self._lottery(created.lottery_id))

    async def GetLottery(self, request: pb.GetLotteryRequest, context: Context) -> pb.Lottery:
        current_principal().require_role(*READING_ROLES)
        return lottery_to_proto(await self._lottery(required(request.lottery_id, "lottery_id")))

    async def ListLotteries(
        self, request: pb.ListLotteriesRequest, context: Context
    ) -> pb.ListLotteriesResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            found = await store.list_lotteries(session, after=after, limit=size + 1)
        response = pb.ListLotteriesResponse(lotteries=[lottery_to_proto(r) for r in found[:size]])
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = newest_first_token(last.created_at, last.lottery.lottery_id)
        return response

    async def _draw_proto(self, d: DrawRecord) -> pb.LotteryDraw:
        async with self.db.sessions() as session:
            record = await store.get_lottery(session, d.lottery_id)
        return draw_to_proto(d, record.lottery if record else None)

    async def Draw(self, request: pb.DrawRequest, context: Context) -> pb.LotteryDraw:
        principal = current_principal()
        principal.require_role(*DRAWING_ROLES)
        check_request_id(request.request_id)
        lottery_id = required(request.lottery_id, "lottery_id")
        member_id = required(request.member_id, "member_id")
        done = await lottery_draws.draw(
            self.db,
            self.loyalty,
            request_id=request.request_id,
            lottery_id=lottery_id,
            member_id=member_id,
            stamp=Stamp(principal.subject, principal.store_id, utcnow()),
        )
        return await self._draw_proto(done)

    async def _get(self, draw_id: str) -> DrawRecord:
        async with self.db.sessions() as session:
            found = await store.get_draw(session, draw_id=draw_id)
        if found is None:
            raise draw_not_found(draw_id)
        return found

    async def GetDraw(self, request: pb.GetDrawRequest, context: Context) -> pb.LotteryDraw:
        current_principal().require_role(*READING_ROLES)
        return await self._draw_proto(await self._get(required(request.draw_id, "draw_id")))

    async def ListDraws(
        self, request: pb.ListDrawsRequest, context: Context
    ) -> pb.ListDrawsResponse:
        current_principal().require_role(*READING_ROLES)
        member_id, lottery_id = request.member_id.strip(), request.lottery_id.strip()
        if not member_id and not lottery_id:
            raise InvalidArgument([FieldViolation("member_id", "member_id or lottery_id")])
        size = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            found = await store.list_draws(
                session, member_id=member_id, lottery_id=lottery_id, after=after, limit=size + 1
            )
            lotteries = {
                d.lottery_id: await store.get_lottery(session, d.lottery_id) for d in found[:size]
            }
        response = pb.ListDrawsResponse()
        for d in found[:size]:
            known = lotteries.get(d.lottery_id)
            response.draws.append(draw_to_proto(d, known.lottery if known else None))
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = newest_first_token(last.created_at, last.draw_id)
        return response

    async def AuditDraw(self, request: pb.AuditDrawRequest, context: Context) -> pb.DrawAudit:
        current_principal().require_role(*READING_ROLES)
        d = await self._get(required(request.draw_id, "draw_id"))
        record = await self._lottery(d.lottery_id)
        if not d.seed:
            return pb.DrawAudit(
                draw_id=d.draw_id, matches=False, mismatches=["the draw was never drawn"]
            )
        result = rules.audit(bytes.fromhex(d.seed), d.draw_id, d.rounds, d.prize_id)
        weights = {p.prize_id: p.weight for p in record.lottery.prizes}
        table_matches = d.table_version == record.lottery.table_version and all(
            {e.prize_id: e.weight for e in r.table} == weights
            and r.no_prize_weight == record.lottery.no_prize_weight
            for r in d.rounds
        )
        mismatches = list(result.mismatches)
        if not table_matches:
            mismatches.append("the recorded tables are not the lottery's prize table")
        return pb.DrawAudit(
            draw_id=d.draw_id,
            matches=result.matches and table_matches,
            recomputed=[round_to_proto(r) for r in result.recomputed],
            mismatches=mismatches,
            table_matches=table_matches,
        )


# --- wiring -----------------------------------------------------------------------------------


def loyalty_client(ctx: ServiceContext) -> LoyaltyClient:
    def make() -> LoyaltyClient:
        client = LoyaltyClient(ctx.settings)
        ctx.on_close(client.close)
        return client

    return ctx.shared("campaigns.lotteries.loyalty", make)


def _interval() -> float:
    try:
        value = float(
            os.environ.get("CAMPAIGNS_LOTTERY_WORKER_INTERVAL_SECONDS", DEFAULT_INTERVAL_SECONDS)
        )
    except ValueError:
        return DEFAULT_INTERVAL_SECONDS
    return value if value > 0 else DEFAULT_INTERVAL_SECONDS


def draw_worker(ctx: ServiceContext) -> Callable[[], Awaitable[None]]:
    db, loyalty, interval = ctx.db, loyalty_client(ctx), _interval()

    async def run() -> None:
        while True:
            try:
                count = await lottery_draws.finish_due(db, loyalty)
                if count:
                    log.info("lottery draws finished", count=count)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lottery draws pass failed; will retry")
            await asyncio.sleep(interval)

    return run


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["LotteriesService"].full_name,
            servicer=LotteriesServicer(ctx, loyalty_client(ctx)),
            add_to_server=lotteries_pb2_grpc.add_LotteriesServiceServicer_to_server,
        )
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [draw_worker(ctx)]


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription]:
    return []
