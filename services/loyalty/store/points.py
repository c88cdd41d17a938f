"""Points accounts, lots, movements (the members' history), holds and the
chain's points policy (one row, a JSON document with an etag).

Every function runs inside the caller's unit of work. Writes to a member's
account, lots, movements and holds are made under the account's row lock
(``get_account(..., for_update=True)``), which points_ledger.py takes
first; the account's CHECK constraints are the last line of defence against
a negative balance, a negative hold or a hold above the balance.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import BigIntKey, Memo, RowByKey, UTCDateTime
from chassis.direct import DialectInsert, Direct, Executor, Insert
from chassis.documents import default_etag, document_table, read_document, write_document
from services.loyalty.domain.points import (
    DEFAULT_POLICY,
    ExpiryRule,
    HoldState,
    Lot,
    LotSource,
    MovementKind,
    OpenLot,
    PointsPolicy,
)
from services.loyalty.store import SETTINGS_MEMO_SECONDS, metadata

_POLICY_KEY = {"policy_id": 1}

points_policy = document_table("points_policy", metadata, "policy_id")

points_accounts = sa.Table(
    "points_accounts",
    metadata,
    sa.Column("member_id", sa.String(32), primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("held", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lifetime_earned", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("opened_at", UTCDateTime, nullable=False),
    sa.Column("closed_at", UTCDateTime, nullable=True),
    # "merged" or "erased".
    sa.Column("closed_reason", sa.String(10), nullable=False, server_default=""),
    sa.Column("merged_into", sa.String(32), nullable=False, server_default=""),
    sa.CheckConstraint("balance >= 0", name="ck_points_accounts_balance"),
    sa.CheckConstraint("held >= 0", name="ck_points_accounts_held"),
    sa.CheckConstraint("held <= balance", name="ck_points_accounts_held_balance"),
    sa.CheckConstraint("lifetime_earned >= 0", name="ck_points_accounts_lifetime"),
)

points_lots = sa.Table(
    "points_lots",
    metadata,
    sa.Column("lot_id", sa.String(16), primary_key=True),
    sa.Column("member_id", sa.String(32), nullable=False),
    sa.Column("source", sa.String(24), nullable=False),
    sa.Column("reference", sa.String(100), nullable=False, server_default=""),
    sa.Column("points", sa.BigInteger, nullable=False),
    sa.Column("remaining", sa.BigInteger, nullable=False),
    sa.Column("earned_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("warned_at", UTCDateTime, nullable=True),
    sa.Column("expired_at", UTCDateTime, nullable=True),
    # A transfer's lot: the sender's lot it was taken from.
    sa.Column("origin_lot_id", sa.String(16), nullable=False, server_default=""),
    sa.CheckConstraint("points > 0", name="ck_points_lots_points"),
    sa.CheckConstraint("remaining >= 0", name="ck_points_lots_remaining"),
    sa.CheckConstraint("remaining <= points", name="ck_points_lots_remaining_points"),
    sa.Index("ix_points_lots_member", "member_id", "expires_at"),
    sa.Index("ix_points_lots_expiry", "expires_at"),
    sa.Index("ix_points_lots_reference", "member_id", "reference"),
)

points_movements = sa.Table(
    "points_movements",
    metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("movement_id", sa.String(16), nullable=False, unique=True),
    sa.Column("member_id", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(12), nullable=False),
    # Signed: what the balance changed by.
    sa.Column("points", sa.BigInteger, nullable=False),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    # A reversal: the points asked to be taken back.
    sa.Column("requested", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("source", sa.String(24), nullable=False, server_default=""),
    sa.Column("reference", sa.String(100), nullable=False, server_default=""),
    sa.Column("reason", sa.String(200), nullable=False, server_default=""),
    sa.Column("related_member_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("lot_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("request_id", sa.String(220), nullable=False),
    sa.Column("request_hash", sa.String(64), nullable=False, server_default=""),
    # A request id is bound to its movement for good, not just while the
    # idempotency key is kept.
    sa.UniqueConstraint("kind", "request_id", name="uq_points_movements_request"),
    sa.Index("ix_points_movements_member", "member_id", "seq"),
)

points_holds = sa.Table(
    "points_holds",
    metadata,
    sa.Column("hold_id", sa.String(100), primary_key=True),
    sa.Column("member_id", sa.String(32), nullable=False),
    sa.Column("points", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("reference", sa.String(100), nullable=False, server_default=""),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("spend_reference", sa.String(100), nullable=False, server_default=""),
    sa.Column("movement_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("held_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.CheckConstraint("points > 0", name="ck_points_holds_points"),
    sa.Index("ix_points_holds_due", "state", "expires_at"),
    sa.Index("ix_points_holds_member", "member_id", "state"),
)


# --- the policy ------------------------------------------------------------------


def policy_document(policy: PointsPolicy) -> dict[str, Any]:
    return {
        "expiry_rule": policy.expiry_rule.value,
        "expiry_months": policy.expiry_months,
        "time_zone": policy.time_zone,
        "warning_days": policy.warning_days,
        "cash_rate_points": policy.cash_rate_points,
        "cash_rate_minor_units": policy.cash_rate_minor_units,
        "currency_code": policy.currency_code,
        "max_cash_share_bps": policy.max_cash_share_bps,
    }


def policy_from_document(doc: dict[str, Any]) -> PointsPolicy:
    return PointsPolicy(
        expiry_rule=ExpiryRule(doc["expiry_rule"]),
        expiry_months=int(doc["expiry_months"]),
        time_zone=str(doc["time_zone"]),
        warning_days=int(doc["warning_days"]),
        cash_rate_points=int(doc["cash_rate_points"]),
        cash_rate_minor_units=int(doc["cash_rate_minor_units"]),
        currency_code=str(doc["currency_code"]),
        max_cash_share_bps=int(doc["max_cash_share_bps"]),
    )


@dataclass(frozen=True)
class PolicyRecord:
    policy: PointsPolicy
    etag: str
    updated_by: str
    updated_store_id: str
    updated_at: dt.datetime | None


# The policy as every checkout and accrual reads it (``current_policy``).
_POLICY_MEMO: Memo[PolicyRecord] = Memo(ttl=SETTINGS_MEMO_SECONDS)


async def current_policy(session: Executor) -> PolicyRecord:
    """The policy, as kept for a few seconds (see ``chassis.db.Memo``)."""
    return await _POLICY_MEMO.get(session, lambda: get_policy(session))


async def get_policy(session: Executor, *, for_update: bool = False) -> PolicyRecord:
    stored = await read_document(session, points_policy, _POLICY_KEY, for_update=for_update)
    if stored is None:
        return PolicyRecord(
            DEFAULT_POLICY, default_etag(policy_document(DEFAULT_POLICY)), "", "", None
        )
    return PolicyRecord(
        policy_from_document(stored.document),
        stored.etag,
        stored.updated_by,
        stored.updated_store_id,
        stored.updated_at,
    )


async def save_policy(
    session: AsyncSession, policy: PointsPolicy, *, principal: str, store_id: str, now: dt.datetime
) -> None:
    _POLICY_MEMO.forget(session)
    await write_document(
        session,
        points_policy,
        _POLICY_KEY,
        policy_document(policy),
        principal=principal,
        store_id=store_id,
        now=now,
    )


# --- accounts --------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRecord:
    member_id: str
    balance: int
    held: int
    lifetime_earned: int
    opened_at: dt.datetime
    closed_at: dt.datetime | None
    closed_reason: str
    merged_into: str

    @property
    def spendable(self) -> int:
        """balance - held (before any due expiry)."""
        return self.balance - self.held


def _account(row: Any) -> AccountRecord:
    return AccountRecord(
        member_id=row.member_id,
        balance=int(row.balance),
        held=int(row.held),
        lifetime_earned=int(row.lifetime_earned),
        opened_at=row.opened_at,
        closed_at=row.closed_at,
        closed_reason=row.closed_reason,
        merged_into=row.merged_into,
    )


_OPEN_ACCOUNT = DialectInsert(
    lambda insert: insert(points_accounts).on_conflict_do_nothing(index_elements=["member_id"])
)


async def open_account(session: Executor, member_id: str, now: dt.datetime) -> None:
    """Creates the account unless it exists (a concurrent creation wins)."""
    await _OPEN_ACCOUNT.execute(session, {"member_id": member_id, "opened_at": now})


_ACCOUNT = RowByKey(points_accounts, "member_id")
_ACCOUNT_UNLESS_LOCKED = Direct(
    sa.select(points_accounts)
    .where(points_accounts.c.member_id == sa.bindparam("key_member_id"))
    .with_for_update(skip_locked=True)
)


async def get_account(
    session: Executor, member_id: str, *, for_update: bool = False, skip_locked: bool = False
) -> AccountRecord | None:
    if skip_locked:
        locked = await _ACCOUNT_UNLESS_LOCKED.execute(session, {"key_member_id": member_id})
        row = locked.first()
    else:
        row = await _ACCOUNT.first(session, member_id, for_update=for_update)
    return None if row is None else _account(row)


def _change_account_statement() -> Any:
    c = points_accounts.c
    new_balance = c.balance + sa.bindparam("d_balance", type_=c.balance.type)
    new_held = c.held + sa.bindparam("d_held", type_=c.held.type)
    new_lifetime = c.lifetime_earned + sa.bindparam("d_lifetime", type_=c.lifetime_earned.type)
    return (
        sa.update(points_accounts)
        .where(
            c.member_id == sa.bindparam("key_member_id"),
            new_balance >= 0,
            new_held >= 0,
            new_held <= new_balance,
        )
        .values(
            balance=new_balance,
            held=new_held,
            lifetime_earned=sa.case((new_lifetime < 0, 0), else_=new_lifetime),
        )
        .returning(*points_accounts.c)
    )


# Built once, the deltas as parameters (each used more than once).
_CHANGE_ACCOUNT = Direct(_change_account_statement())


async def change_account(
    session: Executor,
    member_id: str,
    *,
    balance: int = 0,
    held: int = 0,
    lifetime: int = 0,
) -> AccountRecord:
    """Moves the account's balance and held points by the deltas given, on
    the condition that none goes below zero and held stays within the
    balance; lifetime_earned moves too, never below zero. The caller holds
    the account's lock and checked the amounts: a refusal here is a bug."""
    row = (
        await _CHANGE_ACCOUNT.execute(
            session,
            {
                "key_member_id": member_id,
                "d_balance": balance,
                "d_held": held,
                "d_lifetime": lifetime,
            },
        )
    ).first()
    if row is None:
        raise LookupError(f"points account {member_id} would go below zero or does not exist")
    return _account(row)


async def close_account(
    session: AsyncSession, member_id: str, reason: str, now: dt.datetime, *, merged_into: str = ""
) -> None:
    await session.execute(
        sa.update(points_accounts)
        .where(points_accounts.c.member_id == member_id)
        .values(closed_at=now, closed_reason=reason, merged_into=merged_into)
    )


# --- lots ------------------------------------------------------------------------


def _lot(row: Any) -> Lot:
    return Lot(
        lot_id=row.lot_id,
        member_id=row.member_id,
        source=LotSource(row.source),
        reference=row.reference,
        points=int(row.points),
        remaining=int(row.remaining),
        earned_at=row.earned_at,
        expires_at=row.expires_at,
        warned_at=row.warned_at,
        expired_at=row.expired_at,
    )


def open_lot(lot: Lot) -> OpenLot:
    return OpenLot(lot.lot_id, lot.remaining, lot.expires_at, lot.earned_at)


_INSERT_LOT = Insert(points_lots)


async def insert_lot(session: Executor, lot: Lot, *, origin_lot_id: str = "") -> None:
    await _INSERT_LOT.add(
        session,
        [
            dict(
                lot_id=lot.lot_id,
                member_id=lot.member_id,
                source=lot.source.value,
                reference=lot.reference,
                points=lot.points,
                remaining=lot.remaining,
                earned_at=lot.earned_at,
                expires_at=lot.expires_at,
                warned_at=lot.warned_at,
                expired_at=lot.expired_at,
                origin_lot_id=origin_lot_id,
            )
        ],
    )


_LOT = RowByKey(points_lots, "lot_id")


async def get_lot(session: Executor, lot_id: str) -> Lot | None:
    row = await _LOT.first(session, lot_id)
    return None if row is None else _lot(row)


def _spend_order(query: sa.Select[Any]) -> sa.Select[Any]:
    c = points_lots.c
    return query.order_by(c.expires_at, c.earned_at, c.lot_id)


# Built once (see chassis.db.RowByKey): read on every checkout.
_OPEN_LOTS_QUERY = _spend_order(
    sa.select(points_lots).where(
        points_lots.c.member_id == sa.bindparam("member_id"), points_lots.c.remaining > 0
    )
)
_DUE_LOTS = Direct(
    _OPEN_LOTS_QUERY.where(points_lots.c.expires_at <= sa.bindparam("due_by", type_=UTCDateTime))
)
_OPEN_LOTS = Direct(_OPEN_LOTS_QUERY)


async def open_lots(
    session: Executor, member_id: str, *, due_by: dt.datetime | None = None
) -> list[Lot]:
    """A member's lots with points left, in spend order; with ``due_by``
    only those expiring by then."""
    if due_by is None:
        rows = await _OPEN_LOTS.execute(session, {"member_id": member_id})
    else:
        rows = await _DUE_LOTS.execute(session, {"member_id": member_id, "due_by": due_by})
    return [_lot(row) for row in rows]


async def lots_of_reference(
    session: AsyncSession,
    member_id: str,
    reference: str,
    sources: Sequence[LotSource],
    *,
    only_open: bool = True,
) -> list[Lot]:
    """A member's lots (with points left) from one sale, transfer or other
    reference, in spend order."""
    c = points_lots.c
    query = sa.select(points_lots).where(
        c.member_id == member_id,
        c.reference == reference,
        c.source.in_([s.value for s in sources]),
    )
    if only_open:
        query = query.where(c.remaining > 0)
    return [_lot(row) for row in await session.execute(_spend_order(query))]


def _take_from_lot_statement(*, expire: bool) -> Any:
    c = points_lots.c
    take = sa.bindparam("take", type_=c.remaining.type)
    values: dict[str, Any] = {"remaining": c.remaining - take}
    if expire:
        expired = sa.bindparam("expired", type_=UTCDateTime)
        values["expired_at"] = sa.case((c.remaining == take, expired), else_=c.expired_at)
    return (
        sa.update(points_lots)
        .where(c.lot_id == sa.bindparam("key_lot_id"), c.remaining >= take)
        .values(**values)
    )


# Built once: spending and expiring take from lots on many checkouts.
_TAKE_FROM_LOT = Direct(_take_from_lot_statement(expire=False))
_EXPIRE_FROM_LOT = Direct(_take_from_lot_statement(expire=True))


async def take_from_lot(
    session: Executor, lot_id: str, points: int, *, expired_at: dt.datetime | None = None
) -> None:
    """Takes ``points`` of what is left of a lot; with ``expired_at`` the
    lot is marked expired when nothing is left of it."""
    if expired_at is None:
        result = await _TAKE_FROM_LOT.execute(session, {"key_lot_id": lot_id, "take": points})
    else:
        result = await _EXPIRE_FROM_LOT.execute(
            session, {"key_lot_id": lot_id, "take": points, "expired": expired_at}
        )
    if getattr(result, "rowcount", 0) != 1:
        raise LookupError(f"lot {lot_id} holds fewer than {points} points")


async def move_open_lots(session: AsyncSession, from_member: str, to_member: str) -> int:
    """Gives a member's open lots, as they are, to another (a merge)."""
    c = points_lots.c
    result = await session.execute(
        sa.update(points_lots)
        .where(c.member_id == from_member, c.remaining > 0)
        .values(member_id=to_member)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def list_lots(
    session: AsyncSession,
    member_id: str,
    *,
    only_open: bool,
    after: tuple[dt.datetime, dt.datetime, str] | None,
    limit: int,
) -> list[Lot]:
    """In spend order (expiry, then earning, then lot id), resuming after
    the (expires_at, earned_at, lot_id) of a page's last lot."""
    c = points_lots.c
    query = sa.select(points_lots).where(c.member_id == member_id)
    if only_open:
        query = query.where(c.remaining > 0)
    if after is not None:
        expires, earned, lot_id = after
        query = query.where(
            sa.or_(
                c.expires_at > expires,
                sa.and_(
                    c.expires_at == expires,
                    sa.or_(c.earned_at > earned, sa.and_(c.earned_at == earned, c.lot_id > lot_id)),
                ),
            )
        )
    return [_lot(row) for row in await session.execute(_spend_order(query).limit(limit))]


async def members_with_lots_due(
    session: AsyncSession, now: dt.datetime, after_member: str, limit: int
) -> list[str]:
    """Members with open lots expiring by ``now``, in member id order after
    ``after_member`` (so that one pass visits each member once)."""
    c = points_lots.c
    rows = await session.execute(
        sa.select(c.member_id)
        .where(c.remaining > 0, c.expires_at <= now, c.member_id > after_member)
        .group_by(c.member_id)
        .order_by(c.member_id)
        .limit(limit)
    )
    return [r.member_id for r in rows]


async def members_to_warn(
    session: AsyncSession, now: dt.datetime, horizon: dt.datetime, after_member: str, limit: int
) -> list[str]:
    c = points_lots.c
    rows = await session.execute(
        sa.select(c.member_id)
        .where(
            c.remaining > 0,
            c.warned_at.is_(None),
            c.expires_at > now,
            c.expires_at <= horizon,
            c.member_id > after_member,
        )
        .group_by(c.member_id)
        .order_by(c.member_id)
        .limit(limit)
    )
    return [r.member_id for r in rows]


async def lots_to_warn(
    session: AsyncSession, member_id: str, now: dt.datetime, horizon: dt.datetime
) -> list[Lot]:
    c = points_lots.c
    query = sa.select(points_lots).where(
        c.member_id == member_id,
        c.remaining > 0,
        c.warned_at.is_(None),
        c.expires_at > now,
        c.expires_at <= horizon,
    )
    return [_lot(row) for row in await session.execute(_spend_order(query))]


async def mark_warned(session: AsyncSession, lot_ids: Sequence[str], now: dt.datetime) -> None:
    if lot_ids:
        await session.execute(
            sa.update(points_lots).where(points_lots.c.lot_id.in_(lot_ids)).values(warned_at=now)
        )


async def expiring_between(
    session: AsyncSession, member_id: str, start: dt.datetime, end: dt.datetime
) -> int:
    """Points left on a member's lots expiring in (start, end]."""
    c = points_lots.c
    result = await session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(c.remaining), 0)).where(
            c.member_id == member_id, c.remaining > 0, c.expires_at > start, c.expires_at <= end
        )
    )
    return int(result.scalar_one())


async def next_expiry(
    session: AsyncSession, member_id: str, now: dt.datetime
) -> tuple[dt.datetime, int] | None:
    """The next moment some of a member's points expire after ``now``, and
    how many then."""
    c = points_lots.c
    first = (
        await session.execute(
            sa.select(c.expires_at)
            .where(c.member_id == member_id, c.remaining > 0, c.expires_at > now)
            .order_by(c.expires_at)
            .limit(1)
        )
    ).first()
    if first is None:
        return None
    at: dt.datetime = first.expires_at
    total = await session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(c.remaining), 0)).where(
            c.member_id == member_id, c.remaining > 0, c.expires_at == at
        )
    )
    return at, int(total.scalar_one())


# --- movements -------------------------------------------------------------------


@dataclass(frozen=True)
class MovementRecord:
    seq: int
    movement_id: str
    member_id: str
    kind: MovementKind
    points: int
    balance_after: int
    requested: int
    source: str
    reference: str
    reason: str
    related_member_id: str
    lot_id: str
    principal: str
    store_id: str
    at: dt.datetime
    request_id: str
    request_hash: str


def _movement(row: Any) -> MovementRecord:
    return MovementRecord(
        seq=int(row.seq),
        movement_id=row.movement_id,
        member_id=row.member_id,
        kind=MovementKind(row.kind),
        points=int(row.points),
        balance_after=int(row.balance_after),
        requested=int(row.requested),
        source=row.source,
        reference=row.reference,
        reason=row.reason,
        related_member_id=row.related_member_id,
        lot_id=row.lot_id,
        principal=row.principal,
        store_id=row.store_id,
        at=row.at,
        request_id=row.request_id,
        request_hash=row.request_hash,
    )


@dataclass(frozen=True)
class NewMovement:
    movement_id: str
    member_id: str
    kind: MovementKind
    points: int
    balance_after: int
    request_id: str
    request_hash: str = ""
    requested: int = 0
    source: str = ""
    reference: str = ""
    reason: str = ""
    related_member_id: str = ""
    lot_id: str = ""


_INSERT_MOVEMENT = Direct(sa.insert(points_movements).returning(*points_movements.c))
# The same row when nothing reads it back: inside ``written_together``, it
# goes with the transaction's other rows.
_ADD_MOVEMENT = Insert(points_movements)


def _movement_values(
    movement: NewMovement, *, principal: str, store_id: str, at: dt.datetime
) -> dict[str, Any]:
    return dict(
        movement_id=movement.movement_id,
        member_id=movement.member_id,
        kind=movement.kind.value,
        points=movement.points,
        balance_after=movement.balance_after,
        requested=movement.requested,
        source=movement.source,
        reference=movement.reference,
        reason=movement.reason,
        related_member_id=movement.related_member_id,
        lot_id=movement.lot_id,
        principal=principal,
        store_id=store_id,
        at=at,
        request_id=movement.request_id,
        request_hash=movement.request_hash,
    )


async def record_movement(
    session: Executor, movement: NewMovement, *, principal: str, store_id: str, at: dt.datetime
) -> MovementRecord:
    values = _movement_values(movement, principal=principal, store_id=store_id, at=at)
    row = (await _INSERT_MOVEMENT.execute(session, values)).first()
    assert row is not None
    return _movement(row)


async def add_movement(
    session: Executor, movement: NewMovement, *, principal: str, store_id: str, at: dt.datetime
) -> None:
    """``record_movement`` for a caller that does not need the row back."""
    values = _movement_values(movement, principal=principal, store_id=store_id, at=at)
    await _ADD_MOVEMENT.add(session, [values])


_MOVEMENT_BY_REQUEST = RowByKey(points_movements, "kind", "request_id")


async def movement_by_request(
    session: Executor, kind: MovementKind, request_id: str
) -> MovementRecord | None:
    row = await _MOVEMENT_BY_REQUEST.first(session, kind.value, request_id)
    return None if row is None else _movement(row)


async def movements(
    session: AsyncSession, member_id: str, *, before_seq: int | None, limit: int
) -> list[MovementRecord]:
    """A member's history, newest first."""
    c = points_movements.c
    query = sa.select(points_movements).where(c.member_id == member_id)
    if before_seq is not None:
        query = query.where(c.seq < before_seq)
    query = query.order_by(c.seq.desc()).limit(limit)
    return [_movement(row) for row in await session.execute(query)]


# --- holds -----------------------------------------------------------------------


@dataclass(frozen=True)
class HoldRecord:
    hold_id: str
    member_id: str
    points: int
    state: HoldState
    reference: str
    expires_at: dt.datetime
    spend_reference: str
    movement_id: str
    principal: str
    store_id: str
    held_at: dt.datetime
    finished_at: dt.datetime | None


def _hold(row: Any) -> HoldRecord:
    return HoldRecord(
        hold_id=row.hold_id,
        member_id=row.member_id,
        points=int(row.points),
        state=HoldState(row.state),
        reference=row.reference,
        expires_at=row.expires_at,
        spend_reference=row.spend_reference,
        movement_id=row.movement_id,
        principal=row.principal,
        store_id=row.store_id,
        held_at=row.held_at,
        finished_at=row.finished_at,
    )


# Built once (see chassis.db.RowByKey): written on checkouts paid with points.
_INSERT_HOLD = Direct(sa.insert(points_holds))
_FINISH_HOLD = Direct(
    sa.update(points_holds).where(points_holds.c.hold_id == sa.bindparam("key_hold_id"))
)


async def insert_hold(
    session: AsyncSession,
    *,
    hold_id: str,
    member_id: str,
    points: int,
    reference: str,
    expires_at: dt.datetime,
    principal: str,
    store_id: str,
    at: dt.datetime,
) -> None:
    await _INSERT_HOLD.execute(
        session,
        dict(
            hold_id=hold_id,
            member_id=member_id,
            points=points,
            state=HoldState.HELD.value,
            reference=reference,
            expires_at=expires_at,
            principal=principal,
            store_id=store_id,
            held_at=at,
        ),
    )


_HOLD = RowByKey(points_holds, "hold_id")


async def get_hold(
    session: Executor, hold_id: str, *, for_update: bool = False
) -> HoldRecord | None:
    row = await _HOLD.first(session, hold_id, for_update=for_update)
    return None if row is None else _hold(row)


async def finish_hold(
    session: Executor,
    hold_id: str,
    state: HoldState,
    now: dt.datetime,
    *,
    spend_reference: str = "",
    movement_id: str = "",
) -> None:
    await _FINISH_HOLD.execute(
        session,
        dict(
            key_hold_id=hold_id,
            state=state.value,
            finished_at=now,
            spend_reference=spend_reference,
            movement_id=movement_id,
        ),
    )


async def holds_due(session: AsyncSession, now: dt.datetime, limit: int) -> list[str]:
    """Ids of holds still held past their time."""
    c = points_holds.c
    rows = await session.execute(
        sa.select(c.hold_id)
        .where(c.state == HoldState.HELD.value, c.expires_at <= now)
        .order_by(c.expires_at, c.hold_id)
        .limit(limit)
    )
    return [r.hold_id for r in rows]


async def open_holds(session: AsyncSession, member_id: str) -> list[str]:
    c = points_holds.c
    rows = await session.execute(
        sa.select(c.hold_id).where(c.member_id == member_id, c.state == HoldState.HELD.value)
    )
    return [r.hold_id for r in rows]


# --- verification ----------------------------------------------------------------


@dataclass(frozen=True)
class LedgerProblem:
    what: str
    subject: str
    detail: str


async def _sums(session: AsyncSession, query: sa.Select[Any]) -> dict[str, int]:
    return {row[0]: int(row[1]) for row in await session.execute(query)}


async def verify(session: AsyncSession) -> list[LedgerProblem]:
    """The ledger's invariants: every account's balance equals the points
    left on its lots and the sum of its movements, and its held points the
    points of its open holds; no lot or movement without an account."""
    lots = points_lots.c
    moves = points_movements.c
    holds = points_holds.c
    on_lots = await _sums(
        session,
        sa.select(lots.member_id, sa.func.sum(lots.remaining)).group_by(lots.member_id),
    )
    moved = await _sums(
        session,
        sa.select(moves.member_id, sa.func.sum(moves.points)).group_by(moves.member_id),
    )
    held = await _sums(
        session,
        sa.select(holds.member_id, sa.func.sum(holds.points))
        .where(holds.state == HoldState.HELD.value)
        .group_by(holds.member_id),
    )
    problems: list[LedgerProblem] = []
    accounts = [_account(row) for row in await session.execute(sa.select(points_accounts))]
    known = {a.member_id for a in accounts}
    for account in accounts:
        member = account.member_id
        if (total := on_lots.get(member, 0)) != account.balance:
            problems.append(
                LedgerProblem(
                    "balance differs from lots",
                    member,
                    f"balance {account.balance}, lots {total}",
                )
            )
        if (total := moved.get(member, 0)) != account.balance:
            problems.append(
                LedgerProblem(
                    "balance differs from history",
                    member,
                    f"balance {account.balance}, movements {total}",
                )
            )
        if (total := held.get(member, 0)) != account.held:
            problems.append(
                LedgerProblem(
                    "held differs from holds", member, f"held {account.held}, holds {total}"
                )
            )
    for member in sorted((set(on_lots) | set(moved) | set(held)) - known):
        problems.append(LedgerProblem("points without an account", member, ""))
    bad_lots = await session.execute(
        sa.select(sa.func.count()).where(sa.or_(lots.remaining < 0, lots.remaining > lots.points))
    )
    if count := int(bad_lots.scalar_one()):
        problems.append(LedgerProblem("lots out of bounds", "", f"{count} lots"))
    return problems


async def totals(session: AsyncSession) -> tuple[int, int]:
    """(the sum of all balances, the sum of all lots' remaining points)."""
    balance = await session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(points_accounts.c.balance), 0))
    )
    on_lots = await session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(points_lots.c.remaining), 0))
    )
    return int(balance.scalar_one()), int(on_lots.scalar_one())
