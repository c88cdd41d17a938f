"""The gift catalogue, its stock (per store and chain-wide, store_id "")
and the redemptions. Stock changes only by conditional updates (``UPDATE …
SET quantity = quantity + :delta WHERE quantity + :delta >= 0``) backed by
a CHECK constraint, so concurrent redemptions can never take it below zero;
each change leaves a line in ``gift_stock_changes``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import BigIntKey, UTCDateTime
from services.loyalty.domain.gifts import CHAIN_WIDE, Gift
from services.loyalty.domain.points import Stamp
from services.loyalty.store import metadata

gifts = sa.Table(
    "gifts",
    metadata,
    sa.Column("gift_id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("points_price", sa.BigInteger, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    # Counts updates: the etag.
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(100), nullable=False),
    sa.Column("updated_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint("points_price > 0", name="ck_gifts_points_price"),
)

gift_stock = sa.Table(
    "gift_stock",
    metadata,
    sa.Column("gift_id", sa.String(32), primary_key=True),
    # "" for the chain-wide stock.
    sa.Column("store_id", sa.String(32), primary_key=True),
    sa.Column("quantity", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint("quantity >= 0", name="ck_gift_stock_quantity"),
)

gift_stock_changes = sa.Table(
    "gift_stock_changes",
    metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("gift_id", sa.String(32), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False),
    sa.Column("delta", sa.BigInteger, nullable=False),
    sa.Column("quantity_after", sa.BigInteger, nullable=False),
    # The AddGiftStock request id, or the redemption id.
    sa.Column("reference", sa.String(220), nullable=False),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("principal_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Index("ix_gift_stock_changes_gift", "gift_id", "store_id", "seq"),
)

gift_redemptions = sa.Table(
    "gift_redemptions",
    metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("redemption_id", sa.String(16), nullable=False, unique=True),
    sa.Column("request_id", sa.String(220), nullable=False, unique=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("member_id", sa.String(32), nullable=False),
    sa.Column("gift_id", sa.String(32), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("points", sa.BigInteger, nullable=False),
    sa.Column("stock_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    sa.Column("movement_id", sa.String(16), nullable=False),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("principal_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.CheckConstraint("quantity > 0", name="ck_gift_redemptions_quantity"),
    sa.Index("ix_gift_redemptions_member", "member_id", "seq"),
)


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


# --- the catalogue ---------------------------------------------------------------


@dataclass(frozen=True)
class GiftRecord:
    gift: Gift
    version: int
    created: Stamp
    updated: Stamp

    @property
    def etag(self) -> str:
        return f"v{self.version}"


def _gift(row: Any) -> GiftRecord:
    return GiftRecord(
        gift=Gift(row.gift_id, row.name, int(row.points_price), bool(row.active)),
        version=int(row.version),
        created=Stamp(row.created_by, row.created_store_id, row.created_at),
        updated=Stamp(row.updated_by, row.updated_store_id, row.updated_at),
    )


async def insert_gift(session: AsyncSession, gift: Gift, stamp: Stamp) -> bool:
    """Adds a gift; False when its id is taken."""
    result = await session.execute(
        _insert(session)(gifts)
        .values(
            gift_id=gift.gift_id,
            name=gift.name,
            points_price=gift.points_price,
            active=gift.active,
            version=1,
            created_by=stamp.principal,
            created_store_id=stamp.store_id,
            created_at=stamp.at,
            updated_by=stamp.principal,
            updated_store_id=stamp.store_id,
            updated_at=stamp.at,
        )
        .on_conflict_do_nothing(index_elements=["gift_id"])
    )
    return getattr(result, "rowcount", 0) == 1


async def get_gift(
    session: AsyncSession, gift_id: str, *, for_update: bool = False
) -> GiftRecord | None:
    query = sa.select(gifts).where(gifts.c.gift_id == gift_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _gift(row)


async def update_gift(session: AsyncSession, gift: Gift, stamp: Stamp) -> None:
    c = gifts.c
    await session.execute(
        sa.update(gifts)
        .where(c.gift_id == gift.gift_id)
        .values(
            name=gift.name,
            points_price=gift.points_price,
            active=gift.active,
            version=c.version + 1,
            updated_by=stamp.principal,
            updated_store_id=stamp.store_id,
            updated_at=stamp.at,
        )
    )


async def list_gifts(
    session: AsyncSession, *, active_only: bool, after: str | None, limit: int
) -> list[GiftRecord]:
    c = gifts.c
    query = sa.select(gifts)
    if active_only:
        query = query.where(c.active.is_(True))
    if after is not None:
        query = query.where(c.gift_id > after)
    query = query.order_by(c.gift_id).limit(limit)
    return [_gift(row) for row in await session.execute(query)]


# --- stock -----------------------------------------------------------------------


async def stock(session: AsyncSession, gift_ids: Sequence[str], store_id: str) -> dict[Any, int]:
    """{(gift_id, store): quantity} of the gifts' chain-wide stock and,
    when ``store_id`` is set, the store's own."""
    if not gift_ids:
        return {}
    c = gift_stock.c
    stores = [CHAIN_WIDE, store_id] if store_id else [CHAIN_WIDE]
    rows = await session.execute(
        sa.select(c.gift_id, c.store_id, c.quantity).where(
            c.gift_id.in_(list(gift_ids)), c.store_id.in_(stores)
        )
    )
    return {(r.gift_id, r.store_id): int(r.quantity) for r in rows}


async def change_stock(
    session: AsyncSession,
    gift_id: str,
    store_id: str,
    delta: int,
    *,
    reference: str,
    stamp: Stamp,
) -> int | None:
    """Moves a stock by ``delta`` unless it would go below zero; returns the
    quantity after, or None when refused. A stock not yet counted starts at
    zero."""
    if delta > 0:
        await session.execute(
            _insert(session)(gift_stock)
            .values(gift_id=gift_id, store_id=store_id, quantity=0, updated_at=stamp.at)
            .on_conflict_do_nothing(index_elements=["gift_id", "store_id"])
        )
    c = gift_stock.c
    row = (
        await session.execute(
            sa.update(gift_stock)
            .where(c.gift_id == gift_id, c.store_id == store_id, c.quantity + delta >= 0)
            .values(quantity=c.quantity + delta, updated_at=stamp.at)
            .returning(c.quantity)
        )
    ).first()
    if row is None:
        return None
    after = int(row.quantity)
    await session.execute(
        sa.insert(gift_stock_changes).values(
            gift_id=gift_id,
            store_id=store_id,
            delta=delta,
            quantity_after=after,
            reference=reference,
            principal=stamp.principal,
            principal_store_id=stamp.store_id,
            at=stamp.at,
        )
    )
    return after


# --- redemptions -----------------------------------------------------------------


@dataclass(frozen=True)
class RedemptionRecord:
    seq: int
    redemption_id: str
    request_id: str
    request_hash: str
    member_id: str
    gift_id: str
    store_id: str
    quantity: int
    points: int
    stock_store_id: str
    balance_after: int
    movement_id: str
    stamp: Stamp


def _redemption(row: Any) -> RedemptionRecord:
    return RedemptionRecord(
        seq=int(row.seq),
        redemption_id=row.redemption_id,
        request_id=row.request_id,
        request_hash=row.request_hash,
        member_id=row.member_id,
        gift_id=row.gift_id,
        store_id=row.store_id,
        quantity=int(row.quantity),
        points=int(row.points),
        stock_store_id=row.stock_store_id,
        balance_after=int(row.balance_after),
        movement_id=row.movement_id,
        stamp=Stamp(row.principal, row.principal_store_id, row.at),
    )


async def insert_redemption(session: AsyncSession, record: RedemptionRecord) -> None:
    await session.execute(
        sa.insert(gift_redemptions).values(
            redemption_id=record.redemption_id,
            request_id=record.request_id,
            request_hash=record.request_hash,
            member_id=record.member_id,
            gift_id=record.gift_id,
            store_id=record.store_id,
            quantity=record.quantity,
            points=record.points,
            stock_store_id=record.stock_store_id,
            balance_after=record.balance_after,
            movement_id=record.movement_id,
            principal=record.stamp.principal,
            principal_store_id=record.stamp.store_id,
            at=record.stamp.at,
        )
    )


async def redemption_by_request(session: AsyncSession, request_id: str) -> RedemptionRecord | None:
    row = (
        await session.execute(
            sa.select(gift_redemptions).where(gift_redemptions.c.request_id == request_id)
        )
    ).first()
    return None if row is None else _redemption(row)


async def redemptions(
    session: AsyncSession, member_id: str, *, before_seq: int | None, limit: int
) -> list[RedemptionRecord]:
    """A member's redemptions, newest first."""
    c = gift_redemptions.c
    query = sa.select(gift_redemptions).where(c.member_id == member_id)
    if before_seq is not None:
        query = query.where(c.seq < before_seq)
    query = query.order_by(c.seq.desc()).limit(limit)
    return [_redemption(row) for row in await session.execute(query)]


async def redeemed_quantity(session: AsyncSession, gift_id: str) -> int:
    result = await session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(gift_redemptions.c.quantity), 0)).where(
            gift_redemptions.c.gift_id == gift_id
        )
    )
    return int(result.scalar_one())
