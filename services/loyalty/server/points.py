"""The points gRPC edge: authorisation, proto <-> domain, the policy; the
members consumer and the points workers (expiry and warnings, holds not
spent in time). The rules are in domain/points.py, the writes in
points_ledger.py; the gift catalogue's edge is server/gifts.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, current_principal
from chassis.db import Database, utcnow
from chassis.errors import Aborted, FieldViolation, InvalidArgument
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, request_fingerprint, run_idempotent
from chassis.inbox import Subscription
from chassis.logs import get_logger
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.common.v1 import date_pb2, money_pb2
from cornucopia.loyalty.v1 import points_pb2 as pb
from cornucopia.loyalty.v1 import points_pb2_grpc
from services.loyalty import consumers
from services.loyalty import points_ledger as ledger
from services.loyalty.domain import points as rules
from services.loyalty.domain.points import ExpiryRule, Lot, MovementKind, PointsPolicy, Stamp
from services.loyalty.points_ledger import AccountView, audit_stamp, source_to_proto, timestamp
from services.loyalty.server import gifts
from services.loyalty.store import members
from services.loyalty.store import points as store
from services.loyalty.store.points import MovementRecord, PolicyRecord

log = get_logger(__name__)

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
ADJUSTING_ROLES = (Role.HQ_ADMIN, Role.STORE_MANAGER)
TRANSFERRING_ROLES = (*STAFF_ROLES, Role.SERVICE)

KINDS_PROTO = {
    MovementKind.ACCRUE: pb.POINTS_MOVEMENT_KIND_ACCRUE,
    MovementKind.SPEND: pb.POINTS_MOVEMENT_KIND_SPEND,
    MovementKind.REDEEM: pb.POINTS_MOVEMENT_KIND_REDEEM,
    MovementKind.EXPIRE: pb.POINTS_MOVEMENT_KIND_EXPIRE,
    MovementKind.ADJUST: pb.POINTS_MOVEMENT_KIND_ADJUST,
    MovementKind.REVERSE: pb.POINTS_MOVEMENT_KIND_REVERSE,
    MovementKind.RETURN: pb.POINTS_MOVEMENT_KIND_RETURN,
    MovementKind.TRANSFER_OUT: pb.POINTS_MOVEMENT_KIND_TRANSFER_OUT,
    MovementKind.TRANSFER_IN: pb.POINTS_MOVEMENT_KIND_TRANSFER_IN,
    MovementKind.MERGE_OUT: pb.POINTS_MOVEMENT_KIND_MERGE_OUT,
    MovementKind.MERGE_IN: pb.POINTS_MOVEMENT_KIND_MERGE_IN,
    MovementKind.FORFEIT: pb.POINTS_MOVEMENT_KIND_FORFEIT,
    MovementKind.CONVERT_OUT: pb.POINTS_MOVEMENT_KIND_CONVERT_OUT,
    MovementKind.CHARGE: pb.POINTS_MOVEMENT_KIND_CHARGE,
}
EXPIRY_RULES = {
    pb.EXPIRY_RULE_UNSPECIFIED: ExpiryRule.END_OF_NEXT_YEAR,
    pb.EXPIRY_RULE_END_OF_NEXT_YEAR: ExpiryRule.END_OF_NEXT_YEAR,
    pb.EXPIRY_RULE_MONTHS_AFTER: ExpiryRule.MONTHS_AFTER,
}
EXPIRY_RULES_PROTO = {
    ExpiryRule.END_OF_NEXT_YEAR: pb.EXPIRY_RULE_END_OF_NEXT_YEAR,
    ExpiryRule.MONTHS_AFTER: pb.EXPIRY_RULE_MONTHS_AFTER,
}


def required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def stamp_of(principal: Principal, now: dt.datetime) -> Stamp:
    return Stamp(principal.subject, principal.store_id, now)


def _bad_token() -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", "not a token this service issued")])


# --- proto <-> domain --------------------------------------------------------------------


def money(policy: PointsPolicy, minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=policy.currency_code, minor_units=minor_units)


def account_to_proto(view: AccountView, policy: PointsPolicy) -> pb.PointsAccount:
    message = pb.PointsAccount(
        member_id=view.member_id,
        balance=view.balance,
        held=view.held,
        available=view.available,
        lifetime_earned=view.lifetime_earned,
        available_cash_value=money(policy, rules.cash_value(policy, view.available)),
        expiring_soon_points=view.expiring_soon,
        expiring_soon_until_time=timestamp(view.expiring_soon_until),
        closed=view.closed,
        merged_into_member_id=view.merged_into,
    )
    if view.next_expiry is not None:
        at, points = view.next_expiry
        day = rules.last_valid_day(policy, at)
        message.next_expire_time.CopyFrom(timestamp(at))
        message.next_expiry_date.CopyFrom(
            date_pb2.Date(year=day.year, month=day.month, day=day.day)
        )
        message.next_expiry_points = points
    return message


def lot_to_proto(lot: Lot) -> pb.PointsLot:
    message = pb.PointsLot(
        lot_id=lot.lot_id,
        member_id=lot.member_id,
        source=source_to_proto(lot.source.value),
        reference=lot.reference,
        points=lot.points,
        remaining=lot.remaining,
        earn_time=timestamp(lot.earned_at),
        expire_time=timestamp(lot.expires_at),
    )
    if lot.warned_at is not None:
        message.warn_time.CopyFrom(timestamp(lot.warned_at))
    if lot.expired_at is not None:
        message.expired_time.CopyFrom(timestamp(lot.expired_at))
    return message


def movement_to_proto(m: MovementRecord) -> pb.PointsMovement:
    return pb.PointsMovement(
        movement_id=m.movement_id,
        member_id=m.member_id,
        kind=KINDS_PROTO[m.kind],
        points=m.points,
        balance_after=m.balance_after,
        source=source_to_proto(m.source),
        reference=m.reference,
        reason=m.reason,
        related_member_id=m.related_member_id,
        lot_id=m.lot_id,
        requested_points=m.requested,
        stamp=audit_stamp(Stamp(m.principal, m.store_id, m.at)),
    )


def policy_to_proto(record: PolicyRecord) -> pb.PointsPolicy:
    p = record.policy
    message = pb.PointsPolicy(
        expiry_rule=EXPIRY_RULES_PROTO[p.expiry_rule],
        expiry_months=p.expiry_months,
        time_zone=p.time_zone,
        warning_days=p.warning_days,
        cash_rate_points=p.cash_rate_points,
        cash_rate_minor_units=p.cash_rate_minor_units,
        currency_code=p.currency_code,
        max_cash_share_bps=p.max_cash_share_bps,
        etag=record.etag,
    )
    if record.updated_at is not None:
        message.updated_by.CopyFrom(
            audit_stamp(Stamp(record.updated_by, record.updated_store_id, record.updated_at))
        )
    return message


def policy_from_proto(message: pb.PointsPolicy) -> PointsPolicy:
    rule = EXPIRY_RULES.get(message.expiry_rule)
    if rule is None:
        raise InvalidArgument([FieldViolation("policy.expiry_rule", "not a known expiry rule")])
    return rules.check_policy(
        PointsPolicy(
            expiry_rule=rule,
            expiry_months=message.expiry_months,
            time_zone=message.time_zone.strip(),
            warning_days=message.warning_days,
            cash_rate_points=message.cash_rate_points,
            cash_rate_minor_units=message.cash_rate_minor_units,
            currency_code=message.currency_code.strip().upper(),
            max_cash_share_bps=message.max_cash_share_bps,
        )
    )


# --- the servicer -----------------------------------------------------------------------


class PointsServicer(points_pb2_grpc.PointsServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db

    @staticmethod
    async def _require_visible(session: AsyncSession, member_id: str) -> None:
        """A member the service knows, or who has points (an account the
        checkout opened before the member's enrollment arrived)."""
        if await members.get_member(session, member_id) is None and (
            await store.get_account(session, member_id) is None
        ):
            raise ledger.member_not_found(member_id)

    @staticmethod
    async def _account(session: AsyncSession, member_id: str) -> pb.PointsAccount:
        policy = await ledger.policy(session)
        view = await ledger.account_view(session, member_id, policy, utcnow())
        return account_to_proto(view, policy)

    async def GetPointsAccount(
        self, request: pb.GetPointsAccountRequest, context: Context
    ) -> pb.PointsAccount:
        current_principal().require_role(*READING_ROLES)
        member_id = required(request.member_id, "member_id")
        async with self.db.sessions() as session:
            await self._require_visible(session, member_id)
            return await self._account(session, member_id)

    async def ListPointsLots(
        self, request: pb.ListPointsLotsRequest, context: Context
    ) -> pb.ListPointsLotsResponse:
        current_principal().require_role(*READING_ROLES)
        member_id = required(request.member_id, "member_id")
        size = page_size(request.page_size)
        key = decode_token(request.page_token)
        after = None
        if key is not None:
            try:
                after = (
                    dt.datetime.fromisoformat(str(key["e"])),
                    dt.datetime.fromisoformat(str(key["a"])),
                    str(key["id"]),
                )
            except (KeyError, ValueError):
                raise _bad_token() from None
            if after[0].tzinfo is None or after[1].tzinfo is None:
                raise _bad_token()
        async with self.db.sessions() as session:
            await self._require_visible(session, member_id)
            found = await store.list_lots(
                session, member_id, only_open=request.only_open, after=after, limit=size + 1
            )
        response = pb.ListPointsLotsResponse(lots=[lot_to_proto(lot) for lot in found[:size]])
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = encode_token(
                {
                    "e": last.expires_at.isoformat(),
                    "a": last.earned_at.isoformat(),
                    "id": last.lot_id,
                }
            )
        return response

    async def ListPointsHistory(
        self, request: pb.ListPointsHistoryRequest, context: Context
    ) -> pb.ListPointsHistoryResponse:
        current_principal().require_role(*READING_ROLES)
        member_id = required(request.member_id, "member_id")
        size = page_size(request.page_size)
        key = decode_token(request.page_token) or {}
        try:
            before = int(key["seq"]) if "seq" in key else None
        except (TypeError, ValueError):
            raise _bad_token() from None
        async with self.db.sessions() as session:
            await self._require_visible(session, member_id)
            found = await store.movements(session, member_id, before_seq=before, limit=size + 1)
        response = pb.ListPointsHistoryResponse(
            movements=[movement_to_proto(m) for m in found[:size]]
        )
        if len(found) > size:
            response.next_page_token = encode_token({"seq": found[size - 1].seq})
        return response

    async def AdjustPoints(
        self, request: pb.AdjustPointsRequest, context: Context
    ) -> pb.AdjustPointsResponse:
        principal = current_principal()
        principal.require_role(*ADJUSTING_ROLES)
        check_request_id(request.request_id)
        member_id = required(request.member_id, "member_id")
        points = rules.check_points(request.points, "points", signed=True)
        reason = rules.check_text(request.reason, "reason", rules.MAX_REASON_LENGTH, required=True)
        stamp = stamp_of(principal, utcnow())

        async def adjust(session: AsyncSession) -> pb.AdjustPointsResponse:
            movement = await ledger.adjust(
                session,
                member_id,
                points,
                reason=reason,
                stamp=stamp,
                request_id=request.request_id,
                request_hash=request_fingerprint(request),
            )
            return pb.AdjustPointsResponse(
                movement=movement_to_proto(movement),
                account=await self._account(session, member_id),
            )

        return await run_idempotent(
            self.db,
            method="loyalty.AdjustPoints",
            request_id=request.request_id,
            request=request,
            response_type=pb.AdjustPointsResponse,
            work=adjust,
        )

    async def TransferPoints(
        self, request: pb.TransferPointsRequest, context: Context
    ) -> pb.TransferPointsResponse:
        principal = current_principal()
        principal.require_role(*TRANSFERRING_ROLES)
        check_request_id(request.request_id)
        from_member_id = required(request.from_member_id, "from_member_id")
        to_member_id = required(request.to_member_id, "to_member_id")
        if from_member_id == to_member_id:
            raise InvalidArgument(
                [FieldViolation("to_member_id", "another member than the sender")]
            )
        points = rules.check_points(request.points, "points")
        note = rules.check_text(request.note, "note", rules.MAX_REASON_LENGTH)
        stamp = stamp_of(principal, utcnow())

        async def move(session: AsyncSession) -> pb.TransferPointsResponse:
            done = await ledger.transfer(
                session,
                from_member_id,
                to_member_id,
                points,
                note=note,
                stamp=stamp,
                request_id=request.request_id,
                request_hash=request_fingerprint(request),
            )
            return pb.TransferPointsResponse(
                transfer_id=done.transfer_id,
                sent=movement_to_proto(done.sent),
                received=movement_to_proto(done.received),
                lots=[lot_to_proto(lot) for lot in done.lots],
            )

        return await run_idempotent(
            self.db,
            method="loyalty.TransferPoints",
            request_id=request.request_id,
            request=request,
            response_type=pb.TransferPointsResponse,
            work=move,
        )

    async def ChargePoints(
        self, request: pb.ChargePointsRequest, context: Context
    ) -> pb.ChargePointsResponse:
        principal = current_principal()
        principal.require_role(Role.SERVICE)
        check_request_id(request.request_id)
        member_id = required(request.member_id, "member_id")
        points = rules.check_points(request.points, "points")
        reason = rules.check_text(request.reason, "reason", rules.MAX_REASON_LENGTH, required=True)
        reference = rules.check_text(request.reference, "reference", rules.MAX_REFERENCE_LENGTH)
        stamp = stamp_of(principal, utcnow())

        async def charge(session: AsyncSession) -> pb.ChargePointsResponse:
            movement = await ledger.charge(
                session,
                member_id,
                points,
                reason=reason,
                reference=reference,
                stamp=stamp,
                request_id=request.request_id,
            )
            return pb.ChargePointsResponse(
                movement=movement_to_proto(movement),
                account=await self._account(session, movement.member_id),
            )

        return await run_idempotent(
            self.db,
            method="loyalty.ChargePoints",
            request_id=request.request_id,
            request=request,
            response_type=pb.ChargePointsResponse,
            work=charge,
        )

    async def AwardPoints(
        self, request: pb.AwardPointsRequest, context: Context
    ) -> pb.AwardPointsResponse:
        principal = current_principal()
        principal.require_role(Role.SERVICE)
        check_request_id(request.request_id)
        member_id = required(request.member_id, "member_id")
        points = rules.check_points(request.points, "points")
        reason = rules.check_text(request.reason, "reason", rules.MAX_REASON_LENGTH, required=True)
        reference = rules.check_text(request.reference, "reference", rules.MAX_REFERENCE_LENGTH)
        stamp = stamp_of(principal, utcnow())

        async def award(session: AsyncSession) -> pb.AwardPointsResponse:
            lot = await ledger.award(
                session,
                member_id,
                points,
                reason=reason,
                reference=reference,
                stamp=stamp,
                request_id=request.request_id,
            )
            return pb.AwardPointsResponse(
                lot=lot_to_proto(lot), account=await self._account(session, lot.member_id)
            )

        return await run_idempotent(
            self.db,
            method="loyalty.AwardPoints",
            request_id=request.request_id,
            request=request,
            response_type=pb.AwardPointsResponse,
            work=award,
        )

    async def GetPointsPolicy(
        self, request: pb.GetPointsPolicyRequest, context: Context
    ) -> pb.PointsPolicy:
        current_principal().require_role(*READING_ROLES)
        async with self.db.sessions() as session:
            return policy_to_proto(await store.get_policy(session))

    async def UpdatePointsPolicy(
        self, request: pb.UpdatePointsPolicyRequest, context: Context
    ) -> pb.PointsPolicy:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        if not request.etag:
            raise InvalidArgument([FieldViolation("etag", "required: the etag last read")])
        policy = policy_from_proto(request.policy)
        stamp = stamp_of(principal, utcnow())

        async def update(session: AsyncSession) -> pb.PointsPolicy:
            current = await store.get_policy(session, for_update=True)
            if current.etag != request.etag:
                raise Aborted(
                    "the policy changed since you read it; read it again",
                    reason="ETAG_MISMATCH",
                    metadata={"etag": current.etag},
                )
            await store.save_policy(
                session, policy, principal=stamp.principal, store_id=stamp.store_id, now=stamp.at
            )
            return policy_to_proto(await store.get_policy(session))

        return await run_idempotent(
            self.db,
            method="loyalty.UpdatePointsPolicy",
            request_id=request.request_id,
            request=request,
            response_type=pb.PointsPolicy,
            work=update,
        )


# --- workers -----------------------------------------------------------------------------

DEFAULT_EXPIRY_INTERVAL_SECONDS = 3600.0
DEFAULT_HOLD_EXPIRY_INTERVAL_SECONDS = 30.0


def _interval(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        log.warning("not a number of seconds; using the default", variable=name, default=default)
        return default
    return value if value > 0 else default


class PointsWorker:
    """Runs its passes every ``interval`` seconds, logging what they did
    and surviving their failures (the next pass retries)."""

    def __init__(
        self,
        db: Database,
        name: str,
        passes: Sequence[Callable[[Database], Awaitable[int]]],
        interval: float,
    ) -> None:
        self.db = db
        self.name = name
        self.passes = passes
        self.interval = interval

    async def run(self) -> None:
        while True:
            for work in self.passes:
                try:
                    count = await work(self.db)
                    if count:
                        log.info("points pass", worker=self.name, job=work.__name__, count=count)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("points pass failed; will retry", worker=self.name)
            await asyncio.sleep(self.interval)


def expiry_worker(db: Database) -> PointsWorker:
    """Expires due lots, then warns of lots expiring soon: hourly by
    default (LOYALTY_POINTS_EXPIRY_INTERVAL_SECONDS); each pass does only
    what is due, so running it more often than daily changes nothing."""
    return PointsWorker(
        db,
        "points-expiry",
        [ledger.expire_due_points, ledger.warn_expiring],
        _interval("LOYALTY_POINTS_EXPIRY_INTERVAL_SECONDS", DEFAULT_EXPIRY_INTERVAL_SECONDS),
    )


def hold_expiry_worker(db: Database) -> PointsWorker:
    """Releases holds no checkout spent or released in time
    (LOYALTY_POINTS_HOLD_EXPIRY_INTERVAL_SECONDS, 30 s by default)."""
    return PointsWorker(
        db,
        "points-hold-expiry",
        [ledger.expire_due_holds],
        _interval(
            "LOYALTY_POINTS_HOLD_EXPIRY_INTERVAL_SECONDS", DEFAULT_HOLD_EXPIRY_INTERVAL_SECONDS
        ),
    )


# --- what the loyalty definition asks for ----------------------------------------------


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["PointsService"].full_name,
            servicer=PointsServicer(ctx),
            add_to_server=points_pb2_grpc.add_PointsServiceServicer_to_server,
        ),
        *gifts.services(ctx),
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [expiry_worker(ctx.db).run, hold_expiry_worker(ctx.db).run]


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription]:
    return consumers.subscriptions()
