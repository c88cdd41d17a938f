"""Writing points: what the domain decided, in the caller's unit of work,
with the lots, the account's balances, the member's history and the outbox
rows together.

The checkout calls this module inside its own transaction (``available``,
``hold``, ``release_hold``, ``spend_hold``, ``accrue``, ``reverse_earned``,
``return_spent``, ``policy``); the gRPC edge (adjustments, transfers, gift
redemptions, partner conversions), the members consumer (merges, erasures) and the workers
(expiry, warnings, holds not spent in time) call it too.

Every change of a member's points first locks the member's account row
(``SELECT … FOR UPDATE``; two members in member id order; SQLite
serialises writers anyway), then expires whatever of the member's lots is
past its expiry (so that nothing spends, moves or counts an expired point,
whether or not the daily job has passed), then writes. A movement is bound
to its (kind, request id) for good: the same request again returns the
first result; another request under the same id is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, utcnow
from chassis.direct import Executor
from chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from chassis.logs import get_logger
from cornucopia.common.v1 import org_pb2
from cornucopia.loyalty.v1 import events_pb2
from services.loyalty import events
from services.loyalty.domain import gifts as gift_rules
from services.loyalty.domain import points as rules
from services.loyalty.domain.points import (
    ACCRUE_SOURCES,
    EARNED_SOURCES,
    HoldState,
    Lot,
    LotSource,
    MovementKind,
    PointsPolicy,
    SpendPurpose,
    Stamp,
    Take,
    cash_value,
    points_for_cash,
)
from services.loyalty.store import gifts as gift_store
from services.loyalty.store import members
from services.loyalty.store import points as store
from services.loyalty.store.buyers import BuyerRecord
from services.loyalty.store.gifts import RedemptionRecord
from services.loyalty.store.members import KnownMember, MemberStatus
from services.loyalty.store.points import AccountRecord, HoldRecord, MovementRecord, NewMovement

__all__ = [
    "Lot",
    "LotSource",
    "PointsPolicy",
    "Settled",
    "Stamp",
    "accrue",
    "accrue_with_available",
    "available",
    "award",
    "cash_value",
    "charge",
    "convert_out",
    "hold",
    "points_for_cash",
    "policy",
    "release_hold",
    "return_spent",
    "reverse_earned",
    "spend_hold",
    "spend_hold_settled",
]

log = get_logger(__name__)

# Who the history names for what the service does on its own (expiry,
# merges, erasures, holds not spent in time).
SYSTEM_PRINCIPAL = "loyalty"
BATCH = 200

SOURCES_PROTO = {
    LotSource.PURCHASE.value: events_pb2.POINTS_SOURCE_PURCHASE,
    LotSource.BONUS.value: events_pb2.POINTS_SOURCE_BONUS,
    LotSource.ADJUSTMENT.value: events_pb2.POINTS_SOURCE_ADJUSTMENT,
    LotSource.PARTNER_CONVERSION.value: events_pb2.POINTS_SOURCE_PARTNER_CONVERSION,
    LotSource.REFUND_REVERSAL.value: events_pb2.POINTS_SOURCE_REFUND_REVERSAL,
    LotSource.TRANSFER.value: events_pb2.POINTS_SOURCE_TRANSFER,
    SpendPurpose.GIFT.value: events_pb2.POINTS_SOURCE_GIFT,
    SpendPurpose.SALE.value: events_pb2.POINTS_SOURCE_SALE,
    SpendPurpose.CAMPAIGN.value: events_pb2.POINTS_SOURCE_CAMPAIGN,
}


def source_to_proto(source: str) -> events_pb2.PointsSource.ValueType:
    return SOURCES_PROTO.get(source, events_pb2.POINTS_SOURCE_UNSPECIFIED)


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def audit_stamp(stamp: Stamp) -> org_pb2.AuditStamp:
    return org_pb2.AuditStamp(
        principal=stamp.principal, store_id=stamp.store_id, time=timestamp(stamp.at)
    )


def fingerprint(*parts: object) -> str:
    """The identity of a call's arguments, to tell a retry from another
    request under the same id."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def _reused(field: str = "request_id") -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation(field, "already used for a different request")],
        message=f"this {field} was already used with a different payload",
        reason="IDEMPOTENCY_KEY_REUSED",
    )


async def _replayed(
    session: Executor, kind: MovementKind, request_id: str, request_hash: str
) -> MovementRecord | None:
    done = await store.movement_by_request(session, kind, request_id)
    if done is not None and done.request_hash != request_hash:
        raise _reused()
    return done


def hold_not_found(hold_id: str) -> NotFound:
    return NotFound(
        "no points hold with this id",
        reason="POINTS_HOLD_NOT_FOUND",
        metadata={"hold_id": hold_id},
    )


def member_not_found(member_id: str) -> NotFound:
    return NotFound(
        "no member with this id", reason="MEMBER_NOT_FOUND", metadata={"member_id": member_id}
    )


def _system(at: dt.datetime) -> Stamp:
    return Stamp(SYSTEM_PRINCIPAL, "", at)


def _check_text(value: str, field: str, max_length: int) -> str:
    if len(value) > max_length:
        raise InvalidArgument([FieldViolation(field, f"at most {max_length} characters")])
    return value


def _check_positive(points: int, field: str = "points") -> None:
    if points < 0 or points > rules.MAX_POINTS:
        raise InvalidArgument([FieldViolation(field, f"0 to {rules.MAX_POINTS}")])


# --- members -----------------------------------------------------------------------


async def require_member(session: AsyncSession, member_id: str, *, active: bool) -> KnownMember:
    """The member as the members service last said: known, neither merged
    nor erased, and (``active``) not archived."""
    known = await members.get_member(session, member_id)
    if known is None:
        raise member_not_found(member_id)
    if known.status == MemberStatus.MERGED:
        raise FailedPrecondition(
            "this member was merged into another",
            reason="MEMBER_MERGED",
            metadata={"member_id": member_id, "survivor_member_id": known.merged_into},
        )
    if known.status == MemberStatus.ERASED:
        raise FailedPrecondition(
            "this member was erased", reason="MEMBER_ERASED", metadata={"member_id": member_id}
        )
    if active and known.status == MemberStatus.ARCHIVED:
        raise FailedPrecondition(
            "this member is archived", reason="MEMBER_ARCHIVED", metadata={"member_id": member_id}
        )
    return known


def _closed(member_id: str, account: AccountRecord | None) -> FailedPrecondition:
    """The refusal for a member whose account was closed (or, with none,
    who was erased before having one)."""
    merged = account is not None and account.closed_reason == "merged"
    reason = "MEMBER_MERGED" if merged else "MEMBER_ERASED"
    return FailedPrecondition(
        "this member's points account was closed",
        reason=reason,
        metadata={
            "member_id": member_id,
            "survivor_member_id": account.merged_into if account else "",
        },
    )


async def _target(session: Executor, member_id: str) -> tuple[str, bool]:
    """The member a checkout's call is for (a merged id stands for its
    survivor) and whether that member was erased."""
    # members.survivor_of, keeping the last member read (the survivor).
    target = member_id
    known = await members.get_member(session, target)
    for _ in range(5):
        if known is None or known.status != MemberStatus.MERGED or not known.merged_into:
            break
        target = known.merged_into
        known = await members.get_member(session, target)
    return target, bool(known and known.status == MemberStatus.ERASED)


async def _locked(
    session: Executor, member_id: str, now: dt.datetime, *, create: bool
) -> AccountRecord | None:
    account = await store.get_account(session, member_id, for_update=True)
    if account is None and create:
        await store.open_account(session, member_id, now)
        account = await store.get_account(session, member_id, for_update=True)
    return account


async def _locked_if_open(session: Executor, member_id: str) -> AccountRecord | None:
    """The member's account, locked, when it is open: a merge or an
    erasure closes it in the transaction that records it, so an open
    account is its member's own (``_target`` need not be read). None
    otherwise (not opened yet, or closed)."""
    account = await store.get_account(session, member_id, for_update=True)
    return account if account is not None and account.closed_at is None else None


async def _locked_pair(
    session: AsyncSession, first: str, second: str, now: dt.datetime
) -> dict[str, AccountRecord]:
    """Both accounts, created if missing, locked in member id order."""
    ordered = sorted({first, second})
    for member_id in ordered:
        await store.open_account(session, member_id, now)
    locked: dict[str, AccountRecord] = {}
    for member_id in ordered:
        account = await store.get_account(session, member_id, for_update=True)
        assert account is not None  # created just now if it was missing
        locked[member_id] = account
    return locked


# --- expiry ----------------------------------------------------------------------------


def _spendable(account: AccountRecord) -> int:
    return account.balance - account.held


async def _expire_lot(
    session: Executor,
    lot: Lot,
    points: int,
    stamp: Stamp,
    *,
    kind: MovementKind = MovementKind.EXPIRE,
    reason: str = "",
) -> AccountRecord:
    await store.take_from_lot(session, lot.lot_id, points, expired_at=stamp.at)
    after = await store.change_account(session, lot.member_id, balance=-points)
    movement_id = rules.new_movement_id()
    await store.add_movement(
        session,
        NewMovement(
            movement_id=movement_id,
            member_id=lot.member_id,
            kind=kind,
            points=-points,
            balance_after=after.balance,
            request_id=movement_id,
            source=lot.source.value,
            reference=lot.reference,
            reason=reason,
            lot_id=lot.lot_id,
        ),
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
    )
    await events.publish(
        session,
        events.POINTS_EXPIRED,
        events_pb2.PointsExpired(
            member_id=lot.member_id,
            lot_id=lot.lot_id,
            points=points,
            expire_time=timestamp(lot.expires_at),
            balance_after=_spendable(after),
        ),
    )
    return after


async def _expire_due(
    session: Executor,
    account: AccountRecord,
    now: dt.datetime,
    *,
    due: list[Lot] | None = None,
) -> AccountRecord:
    """Expires what of a locked account's lots is past its expiry at
    ``now``, but not the points holds keep (see domain ``expirable``).
    ``due``: those lots, when the caller read them under the lock already.
    Returns ``account`` itself when nothing expired."""
    if due is None:
        due = await store.open_lots(session, account.member_id, due_by=now)
    if not due:
        return account
    by_id = {lot.lot_id: lot for lot in due}
    stamp = _system(now)
    for part in rules.expirable([store.open_lot(lot) for lot in due], account.held):
        account = await _expire_lot(session, by_id[part.lot_id], part.points, stamp)
    return account


async def _take(
    session: Executor, member_id: str, points: int, *, lots: list[Lot] | None = None
) -> list[Take]:
    """Takes ``points`` from a locked member's lots that expire first
    (``lots``: the member's open lots, when read under the lock already)."""
    if lots is None:
        lots = await store.open_lots(session, member_id)
    takes = rules.take([store.open_lot(lot) for lot in lots], points)
    for part in takes:
        await store.take_from_lot(session, part.lot_id, part.points)
    return takes


async def _spend_from_lots(
    session: Executor,
    member_id: str,
    points: int,
    *,
    kind: MovementKind,
    purpose: SpendPurpose,
    reference: str,
    stamp: Stamp,
    request_id: str,
    request_hash: str = "",
    reason: str = "",
    held: int = 0,
    lots: list[Lot] | None = None,
) -> tuple[AccountRecord, MovementRecord]:
    """Takes ``points`` from the member's lots that expire first, off the
    balance (and ``held`` off the points held), and records the movement
    of ``kind`` and source ``purpose``. Returns the account after and the
    movement. ``lots``: the open lots, when read under the lock already."""
    await _take(session, member_id, points, lots=lots)
    after = await store.change_account(session, member_id, balance=-points, held=held)
    movement = await store.record_movement(
        session,
        NewMovement(
            movement_id=rules.new_movement_id(),
            member_id=member_id,
            kind=kind,
            points=-points,
            balance_after=after.balance,
            request_id=request_id,
            request_hash=request_hash,
            source=purpose.value,
            reference=reference,
            reason=reason,
        ),
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
    )
    return after, movement


async def _new_lot(
    session: Executor,
    member_id: str,
    points: int,
    *,
    source: LotSource,
    reference: str,
    earned_at: dt.datetime,
    expires_at: dt.datetime,
    origin_lot_id: str = "",
) -> Lot:
    lot = Lot(
        lot_id=rules.new_lot_id(),
        member_id=member_id,
        source=source,
        reference=reference,
        points=points,
        remaining=points,
        earned_at=earned_at,
        expires_at=expires_at,
    )
    await store.insert_lot(session, lot, origin_lot_id=origin_lot_id)
    return lot


async def _accrued_event(session: Executor, lot: Lot, after: AccountRecord, stamp: Stamp) -> None:
    await events.publish(
        session,
        events.POINTS_ACCRUED,
        events_pb2.PointsAccrued(
            member_id=lot.member_id,
            lot_id=lot.lot_id,
            points=lot.points,
            source=source_to_proto(lot.source.value),
            reference=lot.reference,
            expire_time=timestamp(lot.expires_at),
            balance_after=_spendable(after),
            stamp=audit_stamp(stamp),
        ),
    )


async def _spent_event(
    session: Executor,
    *,
    member_id: str,
    points: int,
    purpose: SpendPurpose,
    reference: str,
    after: AccountRecord,
    stamp: Stamp,
) -> None:
    await events.publish(
        session,
        events.POINTS_SPENT,
        events_pb2.PointsSpent(
            member_id=member_id,
            points=points,
            source=source_to_proto(purpose.value),
            reference=reference,
            balance_after=_spendable(after),
            stamp=audit_stamp(stamp),
        ),
    )


# --- what the checkout calls -------------------------------------------------------------


async def policy(session: Executor) -> PointsPolicy:
    """The chain's points policy (the defaults until HQ sets one)."""
    return (await store.current_policy(session)).policy


async def available(session: Executor, member_id: str, *, at: dt.datetime | None = None) -> int:
    """What the member can spend now: balance - held, less points past their
    expiry at ``at`` (default: now) that the daily job has not expired yet;
    0 for an unknown member or a closed account. A merged member's id reads
    its survivor's points."""
    target = await members.survivor_of(session, member_id)
    account = await store.get_account(session, target)
    return await _available(session, account, at or utcnow())


async def available_to_buyer(
    session: Executor, member_id: str, buyer: BuyerRecord, *, at: dt.datetime
) -> int:
    """``available`` at ``at`` from what the checkout read of the member
    (``store.buyers.buyer``, due lots counted at ``at``), reading more only
    when that is not enough: a merged member's survivor, or lots past their
    expiry that the daily job has not expired yet."""
    known = buyer.known
    if known is not None and known.status == MemberStatus.MERGED and known.merged_into:
        return await available(session, member_id, at=at)
    if buyer.lots_due:
        return await _available(session, buyer.account, at)
    if buyer.account is None or buyer.account.closed_at is not None:
        return 0
    return max(0, _spendable(buyer.account))


async def _available(session: Executor, account: AccountRecord | None, now: dt.datetime) -> int:
    if account is None or account.closed_at is not None:
        return 0
    due = await store.open_lots(session, account.member_id, due_by=now)
    expiring = sum(
        t.points for t in rules.expirable([store.open_lot(x) for x in due], account.held)
    )
    return max(0, _spendable(account) - expiring)


async def hold(
    session: AsyncSession,
    member_id: str,
    points: int,
    *,
    hold_id: str,
    reference: str,
    expires_at: dt.datetime,
    stamp: Stamp,
    unseen_hold: bool = False,
) -> None:
    """Sets ``points`` aside for a sale until ``spend_hold`` or
    ``release_hold`` (or the hold expiry worker, after ``expires_at``).
    FAILED_PRECONDITION POINTS_INSUFFICIENT (metadata available, asked)
    when the member has too few. The same hold_id again changes nothing;
    with another member or amount it is refused (IDEMPOTENCY_KEY_REUSED).

    ``unseen_hold``: the caller's transaction fails anyway if a hold under
    ``hold_id`` was made before (the checkout's first write, which inserts
    its log, or moves it to the attempt the id names, in the same
    transaction), so that is not read; the hold's primary key makes a
    second one fail as the log's write would."""
    if points <= 0 or points > rules.MAX_POINTS:
        raise InvalidArgument([FieldViolation("points", f"1 to {rules.MAX_POINTS}")])
    if not hold_id or len(hold_id) > 100:
        raise InvalidArgument([FieldViolation("hold_id", "required, at most 100 characters")])
    _check_text(reference, "reference", rules.MAX_REFERENCE_LENGTH)
    target, _ = await _target(session, member_id)
    account = await _locked(session, target, stamp.at, create=False)
    existing = None if unseen_hold else await store.get_hold(session, hold_id)
    if existing is not None:
        if existing.member_id not in (member_id, target) or existing.points != points:
            raise _reused("hold_id")
        return
    if account is None or account.closed_at is not None:
        raise rules.insufficient(0, points)
    account = await _expire_due(session, account, stamp.at)
    if _spendable(account) < points:
        raise rules.insufficient(_spendable(account), points)
    await store.change_account(session, target, held=points)
    await store.insert_hold(
        session,
        hold_id=hold_id,
        member_id=target,
        points=points,
        reference=reference,
        expires_at=expires_at,
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
    )


async def _locked_hold(session: Executor, hold_id: str) -> tuple[AccountRecord, HoldRecord] | None:
    """Locks the hold's account, then reads the hold: the order every
    change locks in."""
    found = await store.get_hold(session, hold_id)
    if found is None:
        return None
    account = await store.get_account(session, found.member_id, for_update=True)
    current = await store.get_hold(session, hold_id, for_update=True)
    assert account is not None and current is not None  # never deleted
    return account, current


async def _release(session: AsyncSession, held: HoldRecord, now: dt.datetime) -> None:
    await store.change_account(session, held.member_id, held=-held.points)
    await store.finish_hold(session, held.hold_id, HoldState.RELEASED, now)


async def release_hold(session: AsyncSession, hold_id: str, *, stamp: Stamp) -> None:
    """Gives held points back; nothing when the hold is unknown, spent or
    released already."""
    locked = await _locked_hold(session, hold_id)
    if locked is None:
        return
    _, held = locked
    if held.state == HoldState.HELD:
        await _release(session, held, stamp.at)


@dataclass(frozen=True)
class Settled:
    """A member's account as a change in this transaction left it: locked,
    and nothing of its lots due by ``at`` left to expire (only what holds
    keep). A later change at the same ``at`` in the same transaction need
    not lock it or read its due lots again."""

    account: AccountRecord
    at: dt.datetime


async def spend_hold(session: AsyncSession, hold_id: str, *, reference: str, stamp: Stamp) -> int:
    """Spends a hold's points on the sale ``reference``: taken from the lots
    that expire first, a movement SPEND (source SALE) in the member's
    history, loyalty.v1.points.spent. Returns the points. A spent hold
    returns its points again without spending twice; a released one is
    refused (FAILED_PRECONDITION POINTS_HOLD_RELEASED), an unknown one
    NOT_FOUND (POINTS_HOLD_NOT_FOUND)."""
    points, _ = await spend_hold_settled(session, hold_id, reference=reference, stamp=stamp)
    return points


async def spend_hold_settled(
    session: Executor, hold_id: str, *, reference: str, stamp: Stamp
) -> tuple[int, Settled | None]:
    """``spend_hold``, and the hold's account as the spend left it (for
    ``accrue_with_available`` in the same transaction); None for a hold
    spent before."""
    _check_text(reference, "reference", rules.MAX_REFERENCE_LENGTH)
    locked = await _locked_hold(session, hold_id)
    if locked is None:
        raise hold_not_found(hold_id)
    account, held = locked
    if held.state == HoldState.SPENT:
        return held.points, None
    if held.state == HoldState.RELEASED:
        raise FailedPrecondition(
            "this points hold was released",
            reason="POINTS_HOLD_RELEASED",
            metadata={"hold_id": hold_id},
        )
    # One read of the open lots (under the account's lock) serves the
    # expiry, as those due by now are the rows _DUE_LOTS reads in the same
    # order, and the spend, unless the expiry took from them.
    open_ = await store.open_lots(session, account.member_id)
    due = [lot for lot in open_ if lot.expires_at <= stamp.at]
    expired = await _expire_due(session, account, stamp.at, due=due) is not account
    lots = None if expired else open_  # read again after an expiry
    member_id, points = held.member_id, held.points
    spent_on = reference or held.reference
    after, movement = await _spend_from_lots(
        session,
        member_id,
        points,
        kind=MovementKind.SPEND,
        purpose=SpendPurpose.SALE,
        reference=spent_on,
        stamp=stamp,
        request_id=hold_id,
        held=-points,
        lots=lots,
    )
    await store.finish_hold(
        session,
        hold_id,
        HoldState.SPENT,
        stamp.at,
        spend_reference=spent_on,
        movement_id=movement.movement_id,
    )
    await _spent_event(
        session,
        member_id=member_id,
        points=points,
        purpose=SpendPurpose.SALE,
        reference=spent_on,
        after=after,
        stamp=stamp,
    )
    # Nothing due is left to expire after the spend: before it, what was
    # due and kept was at most the points held (``expirable``); the spend
    # took its points from the lots that expire first (the due ones) and
    # as many off the held points, so what is due is still within them.
    return points, Settled(after, stamp.at)


async def accrue(
    session: AsyncSession,
    member_id: str,
    points: int,
    *,
    source: LotSource,
    reference: str,
    stamp: Stamp,
    request_id: str,
    reason: str = "",
) -> Lot | None:
    """A new lot of ``points`` (a purchase, a bonus, a partner's
    conversion) expiring by the policy, and loyalty.v1.points.accrued. None
    for 0 points. The account is created for a member not seen yet (the
    checkout resolved them through cards); a merged member's points go to
    the survivor; an erased member's are refused (FAILED_PRECONDITION
    MEMBER_ERASED). Idempotent by (ACCRUE, request_id): a retry returns the
    lot (as it is now)."""
    lot, _ = await accrue_with_available(
        session,
        member_id,
        points,
        source=source,
        reference=reference,
        stamp=stamp,
        request_id=request_id,
        reason=reason,
    )
    return lot


async def accrue_with_available(
    session: Executor,
    member_id: str,
    points: int,
    *,
    source: LotSource,
    reference: str,
    stamp: Stamp,
    request_id: str,
    reason: str = "",
    unseen_request: bool = False,
    settled: Settled | None = None,
) -> tuple[Lot | None, int | None]:
    """``accrue``, and what the member can spend at ``stamp.at`` once the
    lot is added (``available`` then, without reading the account and its
    due lots again); None for that when nothing was added (0 points, or a
    retry of an accrual made before).

    ``unseen_request``: the caller knows no accrual under ``request_id``
    was committed (the checkout's commit, which holds its log's row and
    writes the accrual and COMMITTED in one transaction), so the replay
    check is not read; the unique (kind, request_id) stays the backstop.
    ``settled``: the member's account as a spend in this transaction left
    it (``spend_hold_settled``), used when it is the account credited."""
    if source not in ACCRUE_SOURCES:
        raise InvalidArgument([FieldViolation("source", "purchase, bonus or partner conversion")])
    _check_positive(points)
    _check_text(reference, "reference", rules.MAX_REFERENCE_LENGTH)
    if points == 0:
        return None, None
    # A reason (an award's) is part of the request; without one the
    # fingerprint is what it always was.
    request_hash = fingerprint(
        "accrue", member_id, points, source.value, reference, *([reason] if reason else [])
    )
    return await _credit_new_lot(
        session,
        member_id,
        points,
        kind=MovementKind.ACCRUE,
        source=source,
        reference=reference,
        reason=reason,
        lifetime=points,
        request_hash=request_hash,
        stamp=stamp,
        request_id=request_id,
        unseen_request=unseen_request,
        settled=settled,
    )


async def _credit_new_lot(
    session: Executor,
    member_id: str,
    points: int,
    *,
    kind: MovementKind,
    source: LotSource,
    reference: str,
    reason: str,
    lifetime: int,
    request_hash: str,
    stamp: Stamp,
    request_id: str,
    unseen_request: bool = False,
    settled: Settled | None = None,
) -> tuple[Lot | None, int | None]:
    """What ``accrue`` and ``return_spent`` share: a new lot of ``points``
    expiring by the policy from now, for the member (or the survivor of a
    merge; an erased member's are refused), with its movement of ``kind``
    and loyalty.v1.points.accrued. Idempotent by (``kind``, request_id): a
    retry returns the lot (as it is now). Also returns what the member can
    spend at ``stamp.at`` afterwards (None for a retry)."""
    account: AccountRecord | None
    reuse = False
    if settled is not None and settled.account.member_id == member_id and settled.at == stamp.at:
        # Locked by this transaction, and nothing due left to expire.
        target, account, reuse = member_id, settled.account, True
    elif (open_ := await _locked_if_open(session, member_id)) is not None:
        target, account = member_id, open_
    else:
        target, erased = await _target(session, member_id)
        account = await _locked(session, target, stamp.at, create=not erased)
    if (
        not unseen_request
        and (done := await _replayed(session, kind, request_id, request_hash)) is not None
    ):
        return await store.get_lot(session, done.lot_id), None
    if account is None or account.closed_at is not None:
        raise _closed(target, account)
    # Past this, no lot due at stamp.at is left that could still expire
    # (only what holds keep), so what the member can spend afterwards is
    # the balance less the held points: ``_available`` without its reads.
    if not reuse:
        await _expire_due(session, account, stamp.at)
    current = await policy(session)
    lot = await _new_lot(
        session,
        target,
        points,
        source=source,
        reference=reference,
        earned_at=stamp.at,
        expires_at=rules.expiry_of(current, stamp.at),
    )
    after = await store.change_account(session, target, balance=points, lifetime=lifetime)
    await store.add_movement(
        session,
        NewMovement(
            movement_id=rules.new_movement_id(),
            member_id=target,
            kind=kind,
            points=points,
            balance_after=after.balance,
            request_id=request_id,
            request_hash=request_hash,
            source=source.value,
            reference=reference,
            reason=reason,
            lot_id=lot.lot_id,
        ),
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
    )
    await _accrued_event(session, lot, after, stamp)
    return lot, max(0, _spendable(after))


async def reverse_earned(
    session: AsyncSession,
    member_id: str,
    points: int,
    *,
    sale_id: str,
    stamp: Stamp,
    request_id: str,
) -> tuple[int, int]:
    """A refund takes back up to ``points`` earned on ``sale_id``: from
    what is left of that sale's lots first, then from the other lots that
    expire first, never below zero and never the points held for a sale in
    progress. Returns (reversed, not_reversed) and publishes
    loyalty.v1.points.reversed; lifetime_earned goes down by ``points``.
    Idempotent by (REVERSE, request_id)."""
    _check_positive(points)
    _check_text(sale_id, "sale_id", rules.MAX_REFERENCE_LENGTH)
    if points == 0:
        return 0, 0
    request_hash = fingerprint("reverse", member_id, points, sale_id)
    target, _ = await _target(session, member_id)
    account = await _locked(session, target, stamp.at, create=False)
    if account is None:
        return 0, points
    if (
        done := await _replayed(session, MovementKind.REVERSE, request_id, request_hash)
    ) is not None:
        return -done.points, done.requested + done.points
    if account.closed_at is not None:
        return 0, points
    account = await _expire_due(session, account, stamp.at)
    sale_lots = await store.lots_of_reference(session, target, sale_id, sorted(EARNED_SOURCES))
    all_lots = await store.open_lots(session, target)
    takes = rules.reversal_takes(
        [store.open_lot(lot) for lot in sale_lots],
        [store.open_lot(lot) for lot in all_lots],
        points,
        _spendable(account),
    )
    reversed_points = sum(part.points for part in takes)
    for part in takes:
        await store.take_from_lot(session, part.lot_id, part.points)
    after = await store.change_account(session, target, balance=-reversed_points, lifetime=-points)
    await store.add_movement(
        session,
        NewMovement(
            movement_id=rules.new_movement_id(),
            member_id=target,
            kind=MovementKind.REVERSE,
            points=-reversed_points,
            balance_after=after.balance,
            request_id=request_id,
            request_hash=request_hash,
            requested=points,
            reference=sale_id,
        ),
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
    )
    await events.publish(
        session,
        events.POINTS_REVERSED,
        events_pb2.PointsReversed(
            member_id=target,
            sale_id=sale_id,
            points=reversed_points,
            points_not_reversed=points - reversed_points,
            balance_after=_spendable(after),
            stamp=audit_stamp(stamp),
        ),
    )
    return reversed_points, points - reversed_points


async def return_spent(
    session: AsyncSession,
    member_id: str,
    points: int,
    *,
    sale_id: str,
    stamp: Stamp,
    request_id: str,
) -> Lot | None:
    """A refund gives back points spent on ``sale_id`` as a new lot of
    source REFUND_REVERSAL, expiring by the policy from now, with
    loyalty.v1.points.accrued. None for 0 points. Idempotent by (RETURN,
    request_id)."""
    _check_positive(points)
    _check_text(sale_id, "sale_id", rules.MAX_REFERENCE_LENGTH)
    if points == 0:
        return None
    request_hash = fingerprint("return", member_id, points, sale_id)
    lot, _ = await _credit_new_lot(
        session,
        member_id,
        points,
        kind=MovementKind.RETURN,
        source=LotSource.REFUND_REVERSAL,
        reference=sale_id,
        reason="",
        lifetime=0,
        request_hash=request_hash,
        stamp=stamp,
        request_id=request_id,
    )
    return lot


async def get_hold(session: Executor, hold_id: str) -> HoldRecord | None:
    return await store.get_hold(session, hold_id)


# --- what the gRPC edge calls ----------------------------------------------------------


async def adjust(
    session: AsyncSession,
    member_id: str,
    points: int,
    *,
    reason: str,
    stamp: Stamp,
    request_id: str,
    request_hash: str,
) -> MovementRecord:
    """A manual adjustment: positive, a lot of source ADJUSTMENT; negative,
    taken from the lots that expire first, never below what is available.
    Audited in the history (principal, store, time, reason);
    loyalty.v1.points.adjusted."""
    if (
        done := await _replayed(session, MovementKind.ADJUST, request_id, request_hash)
    ) is not None:
        return done
    await require_member(session, member_id, active=False)
    account = await _locked(session, member_id, stamp.at, create=True)
    assert account is not None
    if (
        done := await _replayed(session, MovementKind.ADJUST, request_id, request_hash)
    ) is not None:
        return done
    if account.closed_at is not None:
        raise _closed(member_id, account)
    account = await _expire_due(session, account, stamp.at)
    lot_id = ""
    if points > 0:
        lot = await _new_lot(
            session,
            member_id,
            points,
            source=LotSource.ADJUSTMENT,
            reference=request_id[: rules.MAX_REFERENCE_LENGTH],
            earned_at=stamp.at,
            expires_at=rules.expiry_of(await policy(session), stamp.at),
        )
        lot_id = lot.lot_id
    else:
        if _spendable(account) < -points:
            raise rules.insufficient(_spendable(account), -points)
        await _take(session, member_id, -points)
    after = await store.change_account(session, member_id, balance=points)
    movement = await store.record_movement(
        session,
        NewMovement(
            movement_id=rules.new_movement_id(),
            member_id=member_id,
            kind=MovementKind.ADJUST,
            points=points,
            balance_after=after.balance,
            request_id=request_id,
            request_hash=request_hash,
            source=LotSource.ADJUSTMENT.value,
            reason=reason,
            lot_id=lot_id,
        ),
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
    )
    await events.publish(
        session,
        events.POINTS_ADJUSTED,
        events_pb2.PointsAdjusted(
            member_id=member_id,
            points=points,
            reason=reason,
            balance_after=_spendable(after),
            stamp=audit_stamp(stamp),
        ),
    )
    return movement


async def convert_out(
    session: AsyncSession,
    member_id: str,
    points: int,
    *,
    reference: str,
    stamp: Stamp,
    request_id: str,
) -> MovementRecord:
    """Points an active member converts into a partner's points: taken from
    the lots that expire first, never more than available
    (FAILED_PRECONDITION POINTS_INSUFFICIENT); movement CONVERT_OUT and
    loyalty.v1.points.spent, both of source PARTNER_CONVERSION with the
    conversion as ``reference``. Idempotent by (CONVERT_OUT, request_id):
    a retry returns the first movement."""
    rules.check_points(points, "points")
    _check_text(reference, "reference", rules.MAX_REFERENCE_LENGTH)
    request_hash = fingerprint("convert_out", member_id, points, reference)
    return await _debit_active(
        session,
        member_id,
        points,
        kind=MovementKind.CONVERT_OUT,
        purpose=SpendPurpose.PARTNER_CONVERSION,
        reference=reference,
        reason="",
        request_hash=request_hash,
        stamp=stamp,
        request_id=request_id,
    )


async def charge(
    session: AsyncSession,
    member_id: str,
    points: int,
    *,
    reason: str,
    reference: str,
    stamp: Stamp,
    request_id: str,
) -> MovementRecord:
    """Points another service charges an active member for something of
    its own (a campaign's lottery draw): taken from the lots that expire
    first, never more than available (FAILED_PRECONDITION
    POINTS_INSUFFICIENT); movement CHARGE and loyalty.v1.points.spent, both
    of source CAMPAIGN with the caller's ``reference``. Idempotent by
    (CHARGE, request_id), for good: a retry returns the first movement."""
    rules.check_points(points, "points")
    _check_text(reason, "reason", rules.MAX_REASON_LENGTH)
    _check_text(reference, "reference", rules.MAX_REFERENCE_LENGTH)
    request_hash = fingerprint("charge", member_id, points, reason, reference)
    return await _debit_active(
        session,
        member_id,
        points,
        kind=MovementKind.CHARGE,
        purpose=SpendPurpose.CAMPAIGN,
        reference=reference,
        reason=reason,
        request_hash=request_hash,
        stamp=stamp,
        request_id=request_id,
    )


async def _debit_active(
    session: AsyncSession,
    member_id: str,
    points: int,
    *,
    kind: MovementKind,
    purpose: SpendPurpose,
    reference: str,
    reason: str,
    request_hash: str,
    stamp: Stamp,
    request_id: str,
) -> MovementRecord:
    """What ``convert_out`` and ``charge`` share: ``points`` taken from an
    active member's lots that expire first, never more than available
    (FAILED_PRECONDITION POINTS_INSUFFICIENT); a movement of ``kind`` and
    loyalty.v1.points.spent, both of source ``purpose``. Idempotent by
    (``kind``, request_id): a retry returns the first movement."""
    if (done := await _replayed(session, kind, request_id, request_hash)) is not None:
        return done
    await require_member(session, member_id, active=True)
    account = await _locked(session, member_id, stamp.at, create=False)
    if (done := await _replayed(session, kind, request_id, request_hash)) is not None:
        return done
    if account is None:
        raise rules.insufficient(0, points)
    if account.closed_at is not None:
        raise _closed(member_id, account)
    account = await _expire_due(session, account, stamp.at)
    if _spendable(account) < points:
        raise rules.insufficient(_spendable(account), points)
    after, movement = await _spend_from_lots(
        session,
        member_id,
        points,
        kind=kind,
        purpose=purpose,
        reference=reference,
        stamp=stamp,
        request_id=request_id,
        request_hash=request_hash,
        reason=reason,
    )
    await _spent_event(
        session,
        member_id=member_id,
        points=points,
        purpose=purpose,
        reference=reference,
        after=after,
        stamp=stamp,
    )
    return movement


# The ACCRUE request ids of awards, apart from those the checkout chooses.
AWARD_REQUEST_PREFIX = "award:"


async def award(
    session: AsyncSession,
    member_id: str,
    points: int,
    *,
    reason: str,
    reference: str,
    stamp: Stamp,
    request_id: str,
) -> Lot:
    """Points another service gives a member (a lottery prize, a refund of
    a draw, a referral reward): a lot of source BONUS through ``accrue``,
    with the reason in the history. The member must be known to the
    service or have points (NOT_FOUND MEMBER_NOT_FOUND otherwise: the
    caller retries once members' enrollment has arrived); a merged
    member's points go to the survivor, an erased member's are refused.
    Idempotent by (ACCRUE, "award:" + request_id): a retry returns the lot
    (as it is now)."""
    rules.check_points(points, "points")
    _check_text(reason, "reason", rules.MAX_REASON_LENGTH)
    if await members.get_member(session, member_id) is None and (
        await store.get_account(session, member_id) is None
    ):
        raise member_not_found(member_id)
    lot = await accrue(
        session,
        member_id,
        points,
        source=LotSource.BONUS,
        reference=reference,
        stamp=stamp,
        request_id=AWARD_REQUEST_PREFIX + request_id,
        reason=reason,
    )
    assert lot is not None  # points > 0
    return lot


@dataclass(frozen=True)
class Transfer:
    sent: MovementRecord
    received: MovementRecord
    lots: list[Lot]

    @property
    def transfer_id(self) -> str:
        return self.sent.movement_id


async def _transfer_done(
    session: AsyncSession, request_id: str, request_hash: str
) -> Transfer | None:
    sent = await _replayed(session, MovementKind.TRANSFER_OUT, request_id, request_hash)
    if sent is None:
        return None
    received = await store.movement_by_request(session, MovementKind.TRANSFER_IN, request_id)
    assert received is not None  # written with the sender's movement
    lots = await store.lots_of_reference(
        session, received.member_id, sent.movement_id, [LotSource.TRANSFER], only_open=False
    )
    return Transfer(sent, received, lots)


async def transfer(
    session: AsyncSession,
    from_member_id: str,
    to_member_id: str,
    points: int,
    *,
    note: str,
    stamp: Stamp,
    request_id: str,
    request_hash: str,
) -> Transfer:
    """Moves points between two active members: taken from the sender's
    lots that expire first; the receiver gets one lot per expiry date
    taken, with that date. The total of points never changes."""
    if from_member_id == to_member_id:
        raise InvalidArgument([FieldViolation("to_member_id", "another member than the sender")])
    if (done := await _transfer_done(session, request_id, request_hash)) is not None:
        return done
    await require_member(session, from_member_id, active=True)
    await require_member(session, to_member_id, active=True)
    accounts = await _locked_pair(session, from_member_id, to_member_id, stamp.at)
    if (done := await _transfer_done(session, request_id, request_hash)) is not None:
        return done
    for member_id, account in accounts.items():
        if account.closed_at is not None:
            raise _closed(member_id, account)
        accounts[member_id] = await _expire_due(session, account, stamp.at)
    sender = accounts[from_member_id]
    if _spendable(sender) < points:
        raise rules.insufficient(_spendable(sender), points)
    takes = await _take(session, from_member_id, points)
    sent_after = await store.change_account(session, from_member_id, balance=-points)
    transfer_id = rules.new_movement_id()
    lots: list[Lot] = []
    for expires_at, portion in rules.received_lots(takes):
        origin = next(t.lot_id for t in takes if t.expires_at == expires_at)
        lots.append(
            await _new_lot(
                session,
                to_member_id,
                portion,
                source=LotSource.TRANSFER,
                reference=transfer_id,
                earned_at=stamp.at,
                expires_at=expires_at,
                origin_lot_id=origin,
            )
        )
    received_after = await store.change_account(session, to_member_id, balance=points)
    sent = await store.record_movement(
        session,
        NewMovement(
            movement_id=transfer_id,
            member_id=from_member_id,
            kind=MovementKind.TRANSFER_OUT,
            points=-points,
            balance_after=sent_after.balance,
            request_id=request_id,
            request_hash=request_hash,
            source=LotSource.TRANSFER.value,
            reference=transfer_id,
            reason=note,
            related_member_id=to_member_id,
        ),
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
    )
    received = await store.record_movement(
        session,
        NewMovement(
            movement_id=rules.new_movement_id(),
            member_id=to_member_id,
            kind=MovementKind.TRANSFER_IN,
            points=points,
            balance_after=received_after.balance,
            request_id=request_id,
            request_hash=request_hash,
            source=LotSource.TRANSFER.value,
            reference=transfer_id,
            reason=note,
            related_member_id=from_member_id,
            lot_id=lots[0].lot_id if len(lots) == 1 else "",
        ),
        principal=stamp.principal,
        store_id=stamp.store_id,
        at=stamp.at,
    )
    await _spent_event(
        session,
        member_id=from_member_id,
        points=points,
        purpose=SpendPurpose.TRANSFER,
        reference=transfer_id,
        after=sent_after,
        stamp=stamp,
    )
    for lot in lots:
        await _accrued_event(session, lot, received_after, stamp)
    return Transfer(sent, received, lots)


def _gift_not_found(gift_id: str) -> NotFound:
    return NotFound("no gift with this id", reason="GIFT_NOT_FOUND", metadata={"gift_id": gift_id})


async def _redemption_done(
    session: AsyncSession, request_id: str, request_hash: str
) -> RedemptionRecord | None:
    done = await gift_store.redemption_by_request(session, request_id)
    if done is not None and done.request_hash != request_hash:
        raise _reused()
    return done


async def redeem_gift(
    session: AsyncSession,
    member_id: str,
    gift_id: str,
    quantity: int,
    *,
    store_id: str,
    stamp: Stamp,
    request_id: str,
    request_hash: str,
) -> RedemptionRecord:
    """A member takes ``quantity`` of a gift: the store's own stock when it
    has enough, otherwise the chain-wide stock, each by a conditional
    update; the points from the lots that expire first (movement REDEEM,
    source GIFT); loyalty.v1.points.spent and loyalty.v1.gift.redeemed."""
    if (done := await _redemption_done(session, request_id, request_hash)) is not None:
        return done
    await require_member(session, member_id, active=True)
    account = await _locked(session, member_id, stamp.at, create=True)
    assert account is not None
    if (done := await _redemption_done(session, request_id, request_hash)) is not None:
        return done
    if account.closed_at is not None:
        raise _closed(member_id, account)
    gift = await gift_store.get_gift(session, gift_id)
    if gift is None:
        raise _gift_not_found(gift_id)
    if not gift.gift.active:
        raise FailedPrecondition(
            "this gift cannot be redeemed now",
            reason="GIFT_INACTIVE",
            metadata={"gift_id": gift_id},
        )
    price = gift.gift.points_price * quantity
    account = await _expire_due(session, account, stamp.at)
    if _spendable(account) < price:
        raise rules.insufficient(_spendable(account), price)
    redemption_id = rules.new_redemption_id()
    taken_from: str | None = None
    for source in gift_rules.stock_sources(store_id):
        after_stock = await gift_store.change_stock(
            session, gift_id, source, -quantity, reference=redemption_id, stamp=stamp
        )
        if after_stock is not None:
            taken_from = source
            break
    if taken_from is None:
        raise FailedPrecondition(
            "this gift is out of stock",
            reason="GIFT_OUT_OF_STOCK",
            metadata={"gift_id": gift_id, "store_id": store_id, "quantity": str(quantity)},
        )
    after, movement = await _spend_from_lots(
        session,
        member_id,
        price,
        kind=MovementKind.REDEEM,
        purpose=SpendPurpose.GIFT,
        reference=redemption_id,
        stamp=stamp,
        request_id=request_id,
        request_hash=request_hash,
    )
    record = RedemptionRecord(
        seq=0,
        redemption_id=redemption_id,
        request_id=request_id,
        request_hash=request_hash,
        member_id=member_id,
        gift_id=gift_id,
        store_id=store_id,
        quantity=quantity,
        points=price,
        stock_store_id=taken_from,
        balance_after=after.balance,
        movement_id=movement.movement_id,
        stamp=stamp,
    )
    await gift_store.insert_redemption(session, record)
    await _spent_event(
        session,
        member_id=member_id,
        points=price,
        purpose=SpendPurpose.GIFT,
        reference=redemption_id,
        after=after,
        stamp=stamp,
    )
    await events.publish(
        session,
        events.GIFT_REDEEMED,
        events_pb2.GiftRedeemed(
            redemption_id=redemption_id,
            member_id=member_id,
            gift_id=gift_id,
            store_id=store_id,
            quantity=quantity,
            points=price,
            stamp=audit_stamp(stamp),
        ),
    )
    done = await gift_store.redemption_by_request(session, request_id)
    assert done is not None
    return done


# --- what the members consumer calls ----------------------------------------------------


async def _release_all(session: AsyncSession, member_id: str, now: dt.datetime) -> None:
    for hold_id in await store.open_holds(session, member_id):
        current = await store.get_hold(session, hold_id, for_update=True)
        if current is not None and current.state == HoldState.HELD:
            await _release(session, current, now)


async def merge(session: AsyncSession, duplicate: str, survivor: str, stamp: Stamp) -> int:
    """The duplicate's open lots, as they are (expiry, warnings), and its
    balance and lifetime_earned go to the survivor; its holds are released
    and its account closed. Returns the points moved."""
    if duplicate == survivor or await store.get_account(session, duplicate) is None:
        return 0
    accounts = await _locked_pair(session, duplicate, survivor, stamp.at)
    dup = accounts[duplicate]
    if dup.closed_at is not None:
        return 0
    await _release_all(session, duplicate, stamp.at)
    await store.move_open_lots(session, duplicate, survivor)
    moved = dup.balance
    dup_after = await store.change_account(
        session, duplicate, balance=-moved, lifetime=-dup.lifetime_earned
    )
    survivor_after = await store.change_account(
        session, survivor, balance=moved, lifetime=dup.lifetime_earned
    )
    if moved:
        for member_id, kind, points, after, other in (
            (duplicate, MovementKind.MERGE_OUT, -moved, dup_after, survivor),
            (survivor, MovementKind.MERGE_IN, moved, survivor_after, duplicate),
        ):
            await store.add_movement(
                session,
                NewMovement(
                    movement_id=rules.new_movement_id(),
                    member_id=member_id,
                    kind=kind,
                    points=points,
                    balance_after=after.balance,
                    request_id=f"merge:{duplicate}",
                    reason=f"member {duplicate} merged into {survivor}",
                    related_member_id=other,
                ),
                principal=stamp.principal,
                store_id=stamp.store_id,
                at=stamp.at,
            )
    await store.close_account(session, duplicate, "merged", stamp.at, merged_into=survivor)
    return moved


async def forfeit(session: AsyncSession, member_id: str, stamp: Stamp, reason: str) -> int:
    """An erased member's points: holds released, every open lot expired
    with ``reason`` (movements FORFEIT, loyalty.v1.points.expired each),
    the account closed. Returns the points forfeited."""
    account = await store.get_account(session, member_id, for_update=True)
    if account is None or account.closed_at is not None:
        return 0
    await _release_all(session, member_id, stamp.at)
    forfeited = 0
    for lot in await store.open_lots(session, member_id):
        await _expire_lot(
            session, lot, lot.remaining, stamp, kind=MovementKind.FORFEIT, reason=reason
        )
        forfeited += lot.remaining
    await store.close_account(session, member_id, "erased", stamp.at)
    return forfeited


# --- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountView:
    member_id: str
    balance: int
    held: int
    available: int
    lifetime_earned: int
    next_expiry: tuple[dt.datetime, int] | None
    expiring_soon: int
    expiring_soon_until: dt.datetime
    closed: bool
    merged_into: str


async def account_view(
    session: AsyncSession, member_id: str, current: PointsPolicy, now: dt.datetime
) -> AccountView:
    account = await store.get_account(session, member_id)
    horizon = current.warning_horizon(now)
    if account is None:
        return AccountView(member_id, 0, 0, 0, 0, None, 0, horizon, False, "")
    return AccountView(
        member_id=member_id,
        balance=account.balance,
        held=account.held,
        available=await _available(session, account, now),
        lifetime_earned=account.lifetime_earned,
        next_expiry=await store.next_expiry(session, member_id, now),
        expiring_soon=await store.expiring_between(session, member_id, now, horizon),
        expiring_soon_until=horizon,
        closed=account.closed_at is not None,
        merged_into=account.merged_into,
    )


# --- the workers' passes ----------------------------------------------------------------


async def expire_due_points(db: Database, now: dt.datetime | None = None) -> int:
    """Expires every lot past its expiry at ``now`` (default: the time of
    each batch), one member per transaction; returns the points expired.
    On PostgreSQL an account locked by another transaction (a checkout, a
    replica's pass) is skipped (``FOR UPDATE SKIP LOCKED``): whatever is
    due there expires on the account's next change or the next pass."""
    expired = 0
    after = ""
    while True:
        at = now or utcnow()
        async with db.sessions() as session:
            due = await store.members_with_lots_due(session, at, after, BATCH)
        for member_id in due:
            async with db.transaction() as session:
                account = await store.get_account(
                    session, member_id, for_update=True, skip_locked=True
                )
                if account is None:
                    continue
                done = await _expire_due(session, account, at)
                expired += account.balance - done.balance
        if len(due) < BATCH:
            return expired
        after = due[-1]


async def warn_expiring(db: Database, now: dt.datetime | None = None) -> int:
    """Publishes loyalty.v1.points.expiring once for each lot that expires
    within the policy's warning_days of ``now``, marking it warned in the
    same transaction; returns how many warnings."""
    warned = 0
    after = ""
    at = now or utcnow()
    async with db.sessions() as session:
        current = await policy(session)
    if current.warning_days <= 0:
        return 0
    horizon = current.warning_horizon(at)
    while True:
        async with db.sessions() as session:
            members_due = await store.members_to_warn(session, at, horizon, after, BATCH)
        for member_id in members_due:
            async with db.transaction() as session:
                account = await store.get_account(
                    session, member_id, for_update=True, skip_locked=True
                )
                if account is None:
                    continue
                warned += await _warn(session, member_id, at, horizon)
        if len(members_due) < BATCH:
            return warned
        after = members_due[-1]


async def _warn(
    session: AsyncSession, member_id: str, now: dt.datetime, horizon: dt.datetime
) -> int:
    lots = await store.lots_to_warn(session, member_id, now, horizon)
    if not lots:
        return 0
    upcoming = [
        lot
        for lot in await store.open_lots(session, member_id, due_by=horizon)
        if lot.expires_at > now
    ]
    for lot in lots:
        await events.publish(
            session,
            events.POINTS_EXPIRING,
            events_pb2.PointsExpiring(
                member_id=member_id,
                lot_id=lot.lot_id,
                points=lot.remaining,
                expire_time=timestamp(lot.expires_at),
                expiring_total=sum(x.remaining for x in upcoming if x.expires_at <= lot.expires_at),
            ),
        )
    await store.mark_warned(session, [lot.lot_id for lot in lots], now)
    return len(lots)


async def expire_due_holds(db: Database, now: dt.datetime | None = None) -> int:
    """Releases every hold still held past its time at ``now``: a crashed
    checkout never keeps points aside for good. Returns how many."""
    released = 0
    while True:
        at = now or utcnow()
        async with db.sessions() as session:
            due = await store.holds_due(session, at, BATCH)
        for hold_id in due:
            async with db.transaction() as session:
                locked = await _locked_hold(session, hold_id)
                if locked is not None and locked[1].state == HoldState.HELD:
                    await _release(session, locked[1], at)
                    released += 1
        if len(due) < BATCH:
            return released
