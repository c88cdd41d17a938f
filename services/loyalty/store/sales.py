"""Sales and the logs of the sagas that make and refund them, and what the
checkout keeps of other services' data (stores' time zones and currencies,
members' birthday months). Each function runs in the caller's unit of
work."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import UTCDateTime, upsert
from chassis.direct import Direct, Executor, Insert
from chassis.paging import newest_first
from services.loyalty.domain.checkout import SagaStep, TenderKind
from services.loyalty.store import metadata

checkouts = sa.Table(
    "checkouts",
    metadata,
    sa.Column("checkout_id", sa.String(64), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("step", sa.String(12), nullable=False),
    # Each new try after an abort gets its own request ids at cards.
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.Column("store_id", sa.String(32), nullable=False),
    sa.Column("member_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("card_id", sa.String(16), nullable=False, server_default=""),
    # What was decided before anything was taken: the priced lines, the
    # tenders, the points to earn (JSON).
    sa.Column("plan", sa.Text, nullable=False),
    sa.Column("points_hold_id", sa.String(100), nullable=False, server_default=""),
    sa.Column("sv_hold_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("sv_movement_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("sale_id", sa.String(16), nullable=False, server_default=""),
    # The last refusal, for an aborted checkout (JSON).
    sa.Column("error", sa.Text, nullable=False, server_default=""),
    # Written by earlier versions; a committed checkout's receipt is its
    # sale's (``get_checkout`` reads either).
    sa.Column("receipt", sa.LargeBinary, nullable=True),
    sa.Column("principal", sa.String(100), nullable=False),
    # Who is driving it: the request, or the recovery after it lapsed.
    sa.Column("lease_until", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_checkouts_open", "step", "lease_until"),
)

sales = sa.Table(
    "sales",
    metadata,
    sa.Column("sale_id", sa.String(16), primary_key=True),
    sa.Column("checkout_id", sa.String(64), nullable=False, unique=True),
    sa.Column("store_id", sa.String(32), nullable=False),
    sa.Column("terminal_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("member_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("card_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("gross", sa.BigInteger, nullable=False),
    sa.Column("discount", sa.BigInteger, nullable=False),
    sa.Column("total", sa.BigInteger, nullable=False),
    sa.Column("points_earned", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("points_spent", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("points_reversed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("refunded", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("business_day", sa.Date, nullable=False),
    sa.Column("sold_at", UTCDateTime, nullable=False),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("receipt", sa.LargeBinary, nullable=False),
    sa.CheckConstraint("refunded <= total", name="ck_sales_refunded"),
    sa.Index("ix_sales_member", "member_id", "sold_at"),
    sa.Index("ix_sales_store", "store_id", "sold_at"),
)

sale_lines = sa.Table(
    "sale_lines",
    metadata,
    sa.Column("sale_id", sa.String(16), primary_key=True),
    sa.Column("line_no", sa.Integer, primary_key=True),
    sa.Column("sku", sa.String(64), nullable=False),
    sa.Column("category", sa.String(64), nullable=False, server_default=""),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("unit_price", sa.BigInteger, nullable=False),
    sa.Column("net", sa.BigInteger, nullable=False),
    sa.Column("quantity_refunded", sa.Integer, nullable=False, server_default="0"),
    sa.CheckConstraint("quantity_refunded <= quantity", name="ck_sale_lines_refunded"),
)

sale_tenders = sa.Table(
    "sale_tenders",
    metadata,
    sa.Column("sale_id", sa.String(16), primary_key=True),
    sa.Column("kind", sa.String(12), primary_key=True),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("points", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("movement_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("refunded_amount", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("refunded_points", sa.BigInteger, nullable=False, server_default="0"),
    sa.CheckConstraint("refunded_amount <= amount", name="ck_sale_tenders_refunded"),
)

refunds = sa.Table(
    "refunds",
    metadata,
    sa.Column("refund_id", sa.String(16), primary_key=True),
    sa.Column("request_id", sa.String(200), nullable=False, unique=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("sale_id", sa.String(16), nullable=False),
    sa.Column("step", sa.String(12), nullable=False),
    sa.Column("is_void", sa.Boolean, nullable=False),
    sa.Column("plan", sa.Text, nullable=False),
    sa.Column("sv_movement_id", sa.String(16), nullable=False, server_default=""),
    sa.Column("reason", sa.String(200), nullable=False),
    sa.Column("receipt", sa.LargeBinary, nullable=True),
    sa.Column("principal", sa.String(100), nullable=False),
    sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("lease_until", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_refunds_sale", "sale_id", "created_at"),
    sa.Index("ix_refunds_open", "step", "lease_until"),
)

store_facts = sa.Table(
    "store_facts",
    metadata,
    sa.Column("store_id", sa.String(32), primary_key=True),
    sa.Column("region_id", sa.String(32), nullable=False),
    sa.Column("time_zone", sa.String(64), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("fetched_at", UTCDateTime, nullable=False),
)

member_facts = sa.Table(
    "member_facts",
    metadata,
    sa.Column("member_id", sa.String(16), primary_key=True),
    sa.Column("birthday_month", sa.SmallInteger, nullable=True),
    sa.Column("fetched_at", UTCDateTime, nullable=False),
)


# --- the checkout saga's log ---------------------------------------------------


@dataclass(frozen=True)
class CheckoutLog:
    checkout_id: str
    request_hash: str
    step: SagaStep
    attempt: int
    store_id: str
    member_id: str
    card_id: str
    plan: dict[str, Any]
    points_hold_id: str
    sv_hold_id: str
    sv_movement_id: str
    sale_id: str
    error: dict[str, Any]
    receipt: bytes | None
    principal: str
    lease_until: dt.datetime
    created_at: dt.datetime


def _log(row: Any) -> CheckoutLog:
    return CheckoutLog(
        checkout_id=row.checkout_id,
        request_hash=row.request_hash,
        step=SagaStep(row.step),
        attempt=row.attempt,
        store_id=row.store_id,
        member_id=row.member_id,
        card_id=row.card_id,
        plan=json.loads(row.plan),
        points_hold_id=row.points_hold_id,
        sv_hold_id=row.sv_hold_id,
        sv_movement_id=row.sv_movement_id,
        sale_id=row.sale_id,
        error=json.loads(row.error) if row.error else {},
        receipt=row.receipt,
        principal=row.principal,
        lease_until=row.lease_until,
        created_at=row.created_at,
    )


# The log with its receipt: a committed checkout's is the sale's (logs
# committed by earlier versions kept a copy of their own).
_CHECKOUT = Direct(
    sa.select(
        *(column for column in checkouts.c if column.name != "receipt"),
        sa.func.coalesce(checkouts.c.receipt, sales.c.receipt).label("receipt"),
    )
    .select_from(checkouts.outerjoin(sales, sales.c.sale_id == checkouts.c.sale_id))
    .where(checkouts.c.checkout_id == sa.bindparam("key_checkout_id"))
)


async def get_checkout(session: Executor, checkout_id: str) -> CheckoutLog | None:
    row = (await _CHECKOUT.execute(session, {"key_checkout_id": checkout_id})).first()
    return None if row is None else _log(row)


@dataclass(frozen=True)
class Committing:
    """A log as the commit's first statement moved it to COMMITTED."""

    points_hold_id: str
    sv_hold_id: str
    sv_movement_id: str


def _known_or_kept(name: str) -> Any:
    """The value the driver knows, or the log's when it knows none."""
    given = sa.bindparam(name, type_=checkouts.c[name].type)
    return sa.case((given != "", given), else_=checkouts.c[name])


_COMMIT_CHECKOUT = Direct(
    sa.update(checkouts)
    .where(
        checkouts.c.checkout_id == sa.bindparam("key_checkout_id"),
        checkouts.c.step != SagaStep.COMMITTED.value,
    )
    .values(
        step=SagaStep.COMMITTED.value,
        sale_id=sa.bindparam("sale_id"),
        sv_hold_id=_known_or_kept("sv_hold_id"),
        sv_movement_id=_known_or_kept("sv_movement_id"),
        lease_until=sa.bindparam("now", type_=UTCDateTime),
        updated_at=sa.bindparam("now", type_=UTCDateTime),
    )
    .returning(checkouts.c.points_hold_id, checkouts.c.sv_hold_id, checkouts.c.sv_movement_id)
)


async def commit_checkout(
    session: Executor,
    checkout_id: str,
    *,
    sale_id: str,
    sv_hold_id: str,
    sv_movement_id: str,
    now: dt.datetime,
) -> Committing | None:
    """Moves the log to COMMITTED with its sale's id (and the hold and the
    capture, when the driver knows them), as the first statement of the
    commit's transaction, which so holds the log's row to its end; None
    when it was committed already. The receipt is kept with the sale."""
    row = (
        await _COMMIT_CHECKOUT.execute(
            session,
            {
                "key_checkout_id": checkout_id,
                "sale_id": sale_id,
                "sv_hold_id": sv_hold_id,
                "sv_movement_id": sv_movement_id,
                "now": now,
            },
        )
    ).first()
    return None if row is None else Committing(*row)


# Built once (see chassis.db.RowByKey); the values go as parameters.
_INSERT_CHECKOUT = Direct(sa.insert(checkouts))
_UPDATE_CHECKOUT = Direct(
    sa.update(checkouts).where(checkouts.c.checkout_id == sa.bindparam("key_checkout_id"))
)


def plan_text(plan: dict[str, Any]) -> str:
    """The plan as the log keeps it (JSON)."""
    return json.dumps(plan, sort_keys=True)


async def insert_checkout(
    session: Executor,
    *,
    checkout_id: str,
    request_hash: str,
    store_id: str,
    member_id: str,
    card_id: str,
    plan: dict[str, Any] | str,
    principal: str,
    lease_until: dt.datetime,
    now: dt.datetime,
    step: SagaStep = SagaStep.STARTED,
    **values: Any,
) -> None:
    """A new checkout's log, at ``step`` (the first write may cover several
    steps) with the ``values`` of those steps (points_hold_id, sale_id)."""
    await _INSERT_CHECKOUT.execute(
        session,
        dict(
            checkout_id=checkout_id,
            request_hash=request_hash,
            step=step.value,
            store_id=store_id,
            member_id=member_id,
            card_id=card_id,
            plan=plan if isinstance(plan, str) else plan_text(plan),
            principal=principal,
            lease_until=lease_until,
            created_at=now,
            updated_at=now,
            **values,
        ),
    )


# A new attempt's log: the attempt counted up, the values of the steps
# its first write covers given as parameters (``_UPDATE_CHECKOUT`` sets
# the columns it is given), either over any attempt or only over the
# aborted attempt the caller saw.
_RESTART_CHECKOUT = sa.update(checkouts).where(
    checkouts.c.checkout_id == sa.bindparam("key_checkout_id")
)
_RESTART_ANY = Direct(_RESTART_CHECKOUT.values(attempt=checkouts.c.attempt + 1))
_RESTART_ABORTED = Direct(
    _RESTART_CHECKOUT.where(
        checkouts.c.attempt == sa.bindparam("key_attempt"),
        checkouts.c.step == SagaStep.ABORTED.value,
    ).values(attempt=checkouts.c.attempt + 1)
)


async def restart_checkout(
    session: Executor,
    checkout_id: str,
    *,
    plan: dict[str, Any] | str,
    member_id: str,
    card_id: str,
    lease_until: dt.datetime,
    now: dt.datetime,
    attempt: int | None = None,
    step: SagaStep = SagaStep.STARTED,
    **values: Any,
) -> bool:
    """A new attempt at an aborted checkout, with the plan made anew. With
    ``attempt`` (the aborted one's), only if it is still that attempt and
    aborted; False when it is not (another attempt began first)."""
    fresh: dict[str, Any] = {
        "step": step.value,
        "plan": plan if isinstance(plan, str) else plan_text(plan),
        "member_id": member_id,
        "card_id": card_id,
        "points_hold_id": "",
        "sv_hold_id": "",
        "sv_movement_id": "",
        "sale_id": "",
        "error": "",
        "lease_until": lease_until,
        "updated_at": now,
    }
    params = fresh | values | {"key_checkout_id": checkout_id}
    if attempt is None:
        result = await _RESTART_ANY.execute(session, params)
    else:
        result = await _RESTART_ABORTED.execute(session, params | {"key_attempt": attempt})
    return result.rowcount == 1


async def advance_checkout(
    session: Executor, checkout_id: str, step: SagaStep, now: dt.datetime, **values: Any
) -> None:
    if "error" in values:
        values["error"] = json.dumps(values["error"], sort_keys=True)
    await _UPDATE_CHECKOUT.execute(
        session,
        {"key_checkout_id": checkout_id, "step": step.value, "updated_at": now, **values},
    )


_CLAIM_CHECKOUT = Direct(
    sa.update(checkouts)
    .where(
        checkouts.c.checkout_id == sa.bindparam("key_checkout_id"),
        checkouts.c.lease_until < sa.bindparam("now"),
        checkouts.c.step != SagaStep.COMMITTED.value,
        checkouts.c.step != SagaStep.ABORTED.value,
    )
    .values(lease_until=sa.bindparam("until"))
)


async def claim_checkout(
    session: Executor, checkout_id: str, *, now: dt.datetime, until: dt.datetime
) -> bool:
    """Takes over a checkout whose driver's lease lapsed; False when someone
    holds it (or it is done)."""
    claimed = await _CLAIM_CHECKOUT.execute(
        session, {"key_checkout_id": checkout_id, "now": now, "until": until}
    )
    return claimed.rowcount == 1


async def lapsed_checkouts(session: AsyncSession, now: dt.datetime, limit: int) -> list[str]:
    final = [SagaStep.COMMITTED.value, SagaStep.ABORTED.value]
    rows = await session.execute(
        sa.select(checkouts.c.checkout_id)
        .where(checkouts.c.step.not_in(final), checkouts.c.lease_until < now)
        .order_by(checkouts.c.lease_until)
        .limit(limit)
    )
    return [r.checkout_id for r in rows]


# --- sales -----------------------------------------------------------------------


class SaleState:
    COMPLETED = "completed"
    PARTLY_REFUNDED = "partly_refunded"
    REFUNDED = "refunded"
    VOIDED = "voided"


@dataclass(frozen=True)
class SaleRecord:
    sale_id: str
    checkout_id: str
    store_id: str
    terminal_id: str
    member_id: str
    card_id: str
    currency: str
    gross: int
    discount: int
    total: int
    points_earned: int
    points_spent: int
    points_reversed: int
    refunded: int
    state: str
    business_day: dt.date
    sold_at: dt.datetime
    principal: str
    receipt: bytes


def _sale(row: Any) -> SaleRecord:
    return SaleRecord(**{name: getattr(row, name) for name in SaleRecord.__dataclass_fields__})


# Written with every sale; inside ``written_together`` (the checkout's
# commit), with the sale's other rows in one statement.
_INSERT_SALE = Insert(sales)


async def insert_sale(session: Executor, sale: SaleRecord) -> None:
    await _INSERT_SALE.add(session, [dict(sale.__dict__)])


async def get_sale(
    session: AsyncSession, sale_id: str, *, for_update: bool = False
) -> SaleRecord | None:
    query = sa.select(sales).where(sales.c.sale_id == sale_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _sale(row)


async def update_sale(session: AsyncSession, sale_id: str, **values: Any) -> None:
    await session.execute(sa.update(sales).where(sales.c.sale_id == sale_id).values(**values))


async def list_sales(
    session: AsyncSession,
    *,
    member_id: str = "",
    store_id: str = "",
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    after: tuple[dt.datetime, str] | None = None,
    limit: int = 100,
) -> list[SaleRecord]:
    """Newest first."""
    c = sales.c
    query = sa.select(sales)
    if member_id:
        query = query.where(c.member_id == member_id)
    if store_id:
        query = query.where(c.store_id == store_id)
    if start is not None:
        query = query.where(c.sold_at >= start)
    if end is not None:
        query = query.where(c.sold_at < end)
    query = newest_first(query, c.sold_at, c.sale_id, after, limit)
    return [_sale(row) for row in await session.execute(query)]


@dataclass(frozen=True)
class LineRecord:
    line_no: int
    sku: str
    category: str
    quantity: int
    unit_price: int
    net: int
    quantity_refunded: int


_INSERT_LINES = Insert(sale_lines)
_INSERT_TENDERS = Insert(sale_tenders)


async def insert_lines(session: Executor, sale_id: str, lines: list[LineRecord]) -> None:
    await _INSERT_LINES.add(session, [{"sale_id": sale_id, **line.__dict__} for line in lines])


async def lines_of(
    session: AsyncSession, sale_id: str, *, for_update: bool = False
) -> list[LineRecord]:
    query = (
        sa.select(sale_lines).where(sale_lines.c.sale_id == sale_id).order_by(sale_lines.c.line_no)
    )
    if for_update:
        query = query.with_for_update()
    return [
        LineRecord(
            r.line_no, r.sku, r.category, r.quantity, r.unit_price, r.net, r.quantity_refunded
        )
        for r in await session.execute(query)
    ]


async def take_refunded_quantity(
    session: AsyncSession, sale_id: str, line_no: int, quantity: int
) -> bool:
    """Marks ``quantity`` more of a line refunded, unless that would pass
    what was sold (False then)."""
    c = sale_lines.c
    result = await session.execute(
        sa.update(sale_lines)
        .where(
            c.sale_id == sale_id,
            c.line_no == line_no,
            c.quantity_refunded + quantity <= c.quantity,
        )
        .values(quantity_refunded=c.quantity_refunded + quantity)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


@dataclass(frozen=True)
class TenderRecord:
    kind: TenderKind
    amount: int
    points: int
    movement_id: str
    refunded_amount: int
    refunded_points: int


async def insert_tenders(session: Executor, sale_id: str, tenders: list[TenderRecord]) -> None:
    if tenders:
        await _INSERT_TENDERS.add(
            session,
            [
                {
                    "sale_id": sale_id,
                    "kind": t.kind.value,
                    "amount": t.amount,
                    "points": t.points,
                    "movement_id": t.movement_id,
                }
                for t in tenders
            ],
        )


async def tenders_of(session: AsyncSession, sale_id: str) -> list[TenderRecord]:
    rows = await session.execute(sa.select(sale_tenders).where(sale_tenders.c.sale_id == sale_id))
    return [
        TenderRecord(
            TenderKind(r.kind),
            r.amount,
            r.points,
            r.movement_id,
            r.refunded_amount,
            r.refunded_points,
        )
        for r in rows
    ]


async def add_tender_refund(
    session: AsyncSession, sale_id: str, kind: TenderKind, *, amount: int, points: int = 0
) -> None:
    c = sale_tenders.c
    await session.execute(
        sa.update(sale_tenders)
        .where(c.sale_id == sale_id, c.kind == kind.value)
        .values(
            refunded_amount=c.refunded_amount + amount, refunded_points=c.refunded_points + points
        )
    )


# --- refunds -------------------------------------------------------------------------


@dataclass(frozen=True)
class RefundLog:
    refund_id: str
    request_id: str
    request_hash: str
    sale_id: str
    step: SagaStep
    is_void: bool
    plan: dict[str, Any]
    sv_movement_id: str
    reason: str
    receipt: bytes | None
    principal: str
    store_id: str
    created_at: dt.datetime


def _refund(row: Any) -> RefundLog:
    return RefundLog(
        refund_id=row.refund_id,
        request_id=row.request_id,
        request_hash=row.request_hash,
        sale_id=row.sale_id,
        step=SagaStep(row.step),
        is_void=row.is_void,
        plan=json.loads(row.plan),
        sv_movement_id=row.sv_movement_id,
        reason=row.reason,
        receipt=row.receipt,
        principal=row.principal,
        store_id=row.store_id,
        created_at=row.created_at,
    )


async def insert_refund(session: AsyncSession, log: RefundLog, lease_until: dt.datetime) -> None:
    await session.execute(
        sa.insert(refunds).values(
            refund_id=log.refund_id,
            request_id=log.request_id,
            request_hash=log.request_hash,
            sale_id=log.sale_id,
            step=log.step.value,
            is_void=log.is_void,
            plan=json.dumps(log.plan, sort_keys=True),
            reason=log.reason,
            principal=log.principal,
            store_id=log.store_id,
            lease_until=lease_until,
            created_at=log.created_at,
            updated_at=log.created_at,
        )
    )


async def refund_by_request(session: AsyncSession, request_id: str) -> RefundLog | None:
    row = (
        await session.execute(sa.select(refunds).where(refunds.c.request_id == request_id))
    ).first()
    return None if row is None else _refund(row)


async def get_refund(session: AsyncSession, refund_id: str) -> RefundLog | None:
    row = (
        await session.execute(sa.select(refunds).where(refunds.c.refund_id == refund_id))
    ).first()
    return None if row is None else _refund(row)


async def refunds_of(session: AsyncSession, sale_id: str) -> list[RefundLog]:
    rows = await session.execute(
        sa.select(refunds).where(refunds.c.sale_id == sale_id).order_by(refunds.c.created_at)
    )
    return [_refund(r) for r in rows]


async def advance_refund(
    session: AsyncSession, refund_id: str, step: SagaStep, now: dt.datetime, **values: Any
) -> None:
    await session.execute(
        sa.update(refunds)
        .where(refunds.c.refund_id == refund_id)
        .values(step=step.value, updated_at=now, **values)
    )


async def claim_refund(
    session: AsyncSession, refund_id: str, *, now: dt.datetime, until: dt.datetime
) -> bool:
    result = await session.execute(
        sa.update(refunds)
        .where(
            refunds.c.refund_id == refund_id,
            refunds.c.lease_until < now,
            refunds.c.step != SagaStep.COMMITTED.value,
        )
        .values(lease_until=until)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def lapsed_refunds(session: AsyncSession, now: dt.datetime, limit: int) -> list[str]:
    rows = await session.execute(
        sa.select(refunds.c.refund_id)
        .where(refunds.c.step != SagaStep.COMMITTED.value, refunds.c.lease_until < now)
        .order_by(refunds.c.lease_until)
        .limit(limit)
    )
    return [r.refund_id for r in rows]


# --- what the checkout keeps of other services -----------------------------------------


async def get_store_facts(session: AsyncSession, store_id: str) -> Any:
    return (
        await session.execute(sa.select(store_facts).where(store_facts.c.store_id == store_id))
    ).first()


async def put_store_facts(
    session: AsyncSession,
    store_id: str,
    *,
    region_id: str,
    time_zone: str,
    currency: str,
    now: dt.datetime,
) -> None:
    await upsert(
        session,
        store_facts,
        {"store_id": store_id},
        {"region_id": region_id, "time_zone": time_zone, "currency": currency, "fetched_at": now},
    )


async def get_member_facts(session: AsyncSession, member_id: str) -> Any:
    return (
        await session.execute(sa.select(member_facts).where(member_facts.c.member_id == member_id))
    ).first()


async def put_member_facts(
    session: AsyncSession, member_id: str, *, birthday_month: int | None, now: dt.datetime
) -> None:
    await upsert(
        session,
        member_facts,
        {"member_id": member_id},
        {"birthday_month": birthday_month, "fetched_at": now},
    )
