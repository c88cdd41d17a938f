"""Points lotteries, their prizes with stock, and the draws with their
recorded randomness. Each function runs in the caller's unit of work.

A prize's stock changes only by the conditional ``stock = stock - 1 WHERE
stock > 0`` (CHECK stock >= 0 behind it): concurrent draws can never give
a prize beyond its stock."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime
from chassis.paging import newest_first
from services.campaigns.domain.lotteries import (
    DrawState,
    Entry,
    Fulfilment,
    Lottery,
    Prize,
    PrizeKind,
    Round,
)
from services.campaigns.store import metadata

lotteries = sa.Table(
    "lotteries",
    metadata,
    sa.Column("lottery_id", sa.String(16), primary_key=True),
    sa.Column("display_name", sa.String(100), nullable=False),
    sa.Column("start_at", UTCDateTime, nullable=False),
    sa.Column("end_at", UTCDateTime, nullable=False),
    sa.Column("cost_points", sa.BigInteger, nullable=False),
    sa.Column("no_prize_weight", sa.BigInteger, nullable=False),
    sa.Column("table_version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_lotteries_created", "created_at", "lottery_id"),
)

lottery_prizes = sa.Table(
    "lottery_prizes",
    metadata,
    sa.Column("lottery_id", sa.String(16), primary_key=True),
    sa.Column("prize_id", sa.String(40), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(10), nullable=False),
    sa.Column("display_name", sa.String(100), nullable=False, server_default=""),
    sa.Column("template_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("points", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("gift_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("initial_stock", sa.BigInteger, nullable=False),
    sa.Column("stock", sa.BigInteger, nullable=False),
    sa.Column("weight", sa.BigInteger, nullable=False),
    sa.CheckConstraint("stock >= 0", name="ck_lottery_prizes_stock"),
    sa.CheckConstraint("stock <= initial_stock", name="ck_lottery_prizes_initial"),
)

lottery_draws = sa.Table(
    "lottery_draws",
    metadata,
    sa.Column("draw_id", sa.String(16), primary_key=True),
    sa.Column("request_id", sa.String(220), nullable=False, unique=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("lottery_id", sa.String(16), nullable=False),
    sa.Column("member_id", sa.String(64), nullable=False),
    sa.Column("cost_points", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("charge_movement_id", sa.String(32), nullable=False, server_default=""),
    # The randomness: the seed (hex) and the rounds drawn (JSON), with the
    # prize table version they name.
    sa.Column("seed", sa.String(64), nullable=False, server_default=""),
    sa.Column("table_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rounds", sa.Text, nullable=False, server_default="[]"),
    sa.Column("prize_id", sa.String(40), nullable=False, server_default=""),
    sa.Column("fulfilment", sa.String(16), nullable=False, server_default=""),
    sa.Column("coupon_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("points_lot_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("refund_lot_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("refund_reason", sa.String(200), nullable=False, server_default=""),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("drawn_at", UTCDateTime, nullable=True),
    sa.Index("ix_lottery_draws_member", "member_id", "created_at", "draw_id"),
    sa.Index("ix_lottery_draws_lottery", "lottery_id", "created_at", "draw_id"),
    sa.Index("ix_lottery_draws_work", "state", "fulfilment"),
)


# --- lotteries ----------------------------------------------------------------------


@dataclass(frozen=True)
class LotteryRecord:
    lottery: Lottery
    # prize_id -> the stock it started with.
    initial_stock: dict[str, int]
    created_by: str
    created_store_id: str
    created_at: dt.datetime


async def insert_lottery(
    session: AsyncSession, lottery: Lottery, *, principal: str, store_id: str, now: dt.datetime
) -> None:
    await session.execute(
        sa.insert(lotteries).values(
            lottery_id=lottery.lottery_id,
            display_name=lottery.display_name,
            start_at=lottery.start_at,
            end_at=lottery.end_at,
            cost_points=lottery.cost_points,
            no_prize_weight=lottery.no_prize_weight,
            table_version=lottery.table_version,
            created_by=principal,
            created_store_id=store_id,
            created_at=now,
        )
    )
    await session.execute(
        sa.insert(lottery_prizes),
        [
            {
                "lottery_id": lottery.lottery_id,
                "prize_id": p.prize_id,
                "position": i,
                "kind": p.kind.value,
                "display_name": p.display_name,
                "template_id": p.template_id,
                "points": p.points,
                "gift_id": p.gift_id,
                "initial_stock": p.stock,
                "stock": p.stock,
                "weight": p.weight,
            }
            for i, p in enumerate(lottery.prizes)
        ],
    )


def _prize(row: Any) -> Prize:
    return Prize(
        prize_id=row.prize_id,
        kind=PrizeKind(row.kind),
        display_name=row.display_name,
        template_id=row.template_id,
        points=row.points,
        gift_id=row.gift_id,
        stock=row.stock,
        weight=row.weight,
    )


async def _records(session: AsyncSession, rows: list[Any]) -> list[LotteryRecord]:
    if not rows:
        return []
    p = lottery_prizes.c
    prizes = await session.execute(
        sa.select(lottery_prizes)
        .where(p.lottery_id.in_([r.lottery_id for r in rows]))
        .order_by(p.lottery_id, p.position)
    )
    by_lottery: dict[str, list[Any]] = {}
    for prize in prizes:
        by_lottery.setdefault(prize.lottery_id, []).append(prize)
    out = []
    for row in rows:
        mine = by_lottery.get(row.lottery_id, [])
        out.append(
            LotteryRecord(
                Lottery(
                    lottery_id=row.lottery_id,
                    display_name=row.display_name,
                    start_at=row.start_at,
                    end_at=row.end_at,
                    cost_points=row.cost_points,
                    prizes=tuple(_prize(x) for x in mine),
                    no_prize_weight=row.no_prize_weight,
                    table_version=row.table_version,
                ),
                {x.prize_id: x.initial_stock for x in mine},
                row.created_by,
                row.created_store_id,
                row.created_at,
            )
        )
    return out


async def get_lottery(session: AsyncSession, lottery_id: str) -> LotteryRecord | None:
    rows = list(
        await session.execute(sa.select(lotteries).where(lotteries.c.lottery_id == lottery_id))
    )
    found = await _records(session, rows)
    return found[0] if found else None


async def list_lotteries(
    session: AsyncSession, *, after: tuple[dt.datetime, str] | None, limit: int
) -> list[LotteryRecord]:
    c = lotteries.c
    query = newest_first(sa.select(lotteries), c.created_at, c.lottery_id, after, limit)
    return await _records(session, list(await session.execute(query)))


async def stocks(session: AsyncSession, lottery_id: str) -> dict[str, int]:
    """The prizes' stock as committed now (read again inside a draw's
    transaction after a take failed)."""
    p = lottery_prizes.c
    rows = await session.execute(
        sa.select(p.prize_id, p.stock).where(p.lottery_id == lottery_id).order_by(p.position)
    )
    return {row.prize_id: row.stock for row in rows}


async def take_stock(session: AsyncSession, lottery_id: str, prize_id: str) -> bool:
    """One of the prize given: False when none is left (nothing changed)."""
    p = lottery_prizes.c
    result = await session.execute(
        sa.update(lottery_prizes)
        .where(p.lottery_id == lottery_id, p.prize_id == prize_id, p.stock > 0)
        .values(stock=p.stock - 1)
        .returning(p.stock)
    )
    return result.first() is not None


# --- draws ----------------------------------------------------------------------------


def rounds_json(rounds: list[Round]) -> str:
    return json.dumps(
        [
            {
                "round": r.round,
                "table": [[e.prize_id, e.stock, e.weight] for e in r.table],
                "no_prize_weight": r.no_prize_weight,
                "roll": f"{r.roll:064x}",
                "total": r.total,
                "point": r.point,
                "prize_id": r.prize_id,
                "given": r.given,
                "refusal": r.refusal,
            }
            for r in rounds
        ],
        separators=(",", ":"),
    )


def rounds_of(text: str) -> list[Round]:
    return [
        Round(
            round=d["round"],
            table=tuple(Entry(e[0], e[1], e[2]) for e in d["table"]),
            no_prize_weight=d["no_prize_weight"],
            roll=int(d["roll"], 16),
            total=d["total"],
            point=d["point"],
            prize_id=d["prize_id"],
            given=d["given"],
            refusal=d["refusal"],
        )
        for d in json.loads(text)
    ]


@dataclass(frozen=True)
class DrawRecord:
    draw_id: str
    request_id: str
    request_hash: str
    lottery_id: str
    member_id: str
    cost_points: int
    state: DrawState
    charge_movement_id: str
    seed: str
    table_version: int
    rounds: list[Round]
    prize_id: str
    fulfilment: Fulfilment | None
    coupon_id: str
    points_lot_id: str
    refund_lot_id: str
    refund_reason: str
    principal: str
    store_id: str
    created_at: dt.datetime
    drawn_at: dt.datetime | None


def _draw(row: Any) -> DrawRecord:
    return DrawRecord(
        draw_id=row.draw_id,
        request_id=row.request_id,
        request_hash=row.request_hash,
        lottery_id=row.lottery_id,
        member_id=row.member_id,
        cost_points=row.cost_points,
        state=DrawState(row.state),
        charge_movement_id=row.charge_movement_id,
        seed=row.seed,
        table_version=row.table_version,
        rounds=rounds_of(row.rounds),
        prize_id=row.prize_id,
        fulfilment=Fulfilment(row.fulfilment) if row.fulfilment else None,
        coupon_id=row.coupon_id,
        points_lot_id=row.points_lot_id,
        refund_lot_id=row.refund_lot_id,
        refund_reason=row.refund_reason,
        principal=row.principal,
        store_id=row.store_id,
        created_at=row.created_at,
        drawn_at=row.drawn_at,
    )


async def insert_draw(session: AsyncSession, **values: Any) -> None:
    await session.execute(sa.insert(lottery_draws).values(**values))


async def get_draw(
    session: AsyncSession, *, draw_id: str = "", request_id: str = "", for_update: bool = False
) -> DrawRecord | None:
    c = lottery_draws.c
    query = sa.select(lottery_draws).where(
        c.draw_id == draw_id if draw_id else c.request_id == request_id
    )
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _draw(row)


async def update_draw(session: AsyncSession, draw_id: str, *conditions: Any, **values: Any) -> bool:
    """A conditional move: False when the draw was not in the expected state."""
    result = await session.execute(
        sa.update(lottery_draws)
        .where(lottery_draws.c.draw_id == draw_id, *conditions)
        .values(**values)
        .returning(lottery_draws.c.draw_id)
    )
    return result.first() is not None


async def delete_draw(session: AsyncSession, draw_id: str, state: DrawState) -> None:
    c = lottery_draws.c
    await session.execute(
        sa.delete(lottery_draws).where(c.draw_id == draw_id, c.state == state.value)
    )


async def list_draws(
    session: AsyncSession,
    *,
    member_id: str,
    lottery_id: str,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[DrawRecord]:
    c = lottery_draws.c
    query = sa.select(lottery_draws)
    if member_id:
        query = query.where(c.member_id == member_id)
    if lottery_id:
        query = query.where(c.lottery_id == lottery_id)
    query = newest_first(query, c.created_at, c.draw_id, after, limit)
    return [_draw(row) for row in await session.execute(query)]


async def draws_to_work(session: AsyncSession, *conditions: Any, limit: int) -> list[str]:
    c = lottery_draws.c
    rows = await session.execute(
        sa.select(c.draw_id).where(*conditions).order_by(c.created_at, c.draw_id).limit(limit)
    )
    return [row.draw_id for row in rows]
