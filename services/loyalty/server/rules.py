"""The earn rules' and tiers' gRPC edge: authorisation, proto <-> domain,
reading. The rules are in domain/earn_rules.py and domain/tiers.py; the
tier writes and reviews in tiers.py."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Sequence

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, current_principal
from chassis.db import Database, idempotency_table, is_unique_violation, utcnow
from chassis.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
)
from chassis.grpcserver import Context, GrpcService
from chassis.idempotency import check_request_id, request_fingerprint, run_idempotent
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.common.v1 import date_pb2, money_pb2, org_pb2
from cornucopia.loyalty.v1 import rules_pb2 as pb
from cornucopia.loyalty.v1 import rules_pb2_grpc
from services.loyalty import tiers as tier_writes
from services.loyalty.domain import earn_rules as earn
from services.loyalty.domain import tiers as ladder_rules
from services.loyalty.domain.earn_rules import EarnRule, Rounding, RuleKind
from services.loyalty.domain.tiers import (
    HistoryKind,
    Ladder,
    Qualification,
    ReviewPeriod,
    Tier,
    TierProgress,
    TierStamp,
)
from services.loyalty.store import earn_rules as rule_store
from services.loyalty.store import tiers as tier_store
from services.loyalty.store.earn_rules import RuleSetRecord
from services.loyalty.store.tiers import HistoryRecord, LadderRecord

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
# Clocks differ: an effective time this little in the past is taken as now.
CLOCK_SKEW = dt.timedelta(minutes=5)
PUBLISH_ATTEMPTS = 3

KINDS = {
    pb.EARN_RULE_KIND_BASE_RATE: RuleKind.BASE_RATE,
    pb.EARN_RULE_KIND_MULTIPLIER: RuleKind.MULTIPLIER,
    pb.EARN_RULE_KIND_PROMOTION: RuleKind.PROMOTION,
    pb.EARN_RULE_KIND_CAP_PER_SALE: RuleKind.CAP_PER_SALE,
    pb.EARN_RULE_KIND_CAP_PER_DAY: RuleKind.CAP_PER_DAY,
    pb.EARN_RULE_KIND_EXCLUSION: RuleKind.EXCLUSION,
    pb.EARN_RULE_KIND_ROUNDING: RuleKind.ROUNDING,
}
KINDS_PROTO = {v: k for k, v in KINDS.items()}
ROUNDINGS = {
    pb.EARN_ROUNDING_DOWN: Rounding.DOWN,
    pb.EARN_ROUNDING_HALF_UP: Rounding.HALF_UP,
    pb.EARN_ROUNDING_UP: Rounding.UP,
}
ROUNDINGS_PROTO = {v: k for k, v in ROUNDINGS.items()}
QUALIFICATIONS = {
    pb.TIER_QUALIFICATION_SPEND_OR_VISITS: Qualification.SPEND_OR_VISITS,
    pb.TIER_QUALIFICATION_SPEND_AND_VISITS: Qualification.SPEND_AND_VISITS,
    pb.TIER_QUALIFICATION_SPEND_ONLY: Qualification.SPEND_ONLY,
    pb.TIER_QUALIFICATION_VISITS_ONLY: Qualification.VISITS_ONLY,
}
QUALIFICATIONS_PROTO = {v: k for k, v in QUALIFICATIONS.items()}
PERIODS = {
    pb.TIER_REVIEW_PERIOD_MONTH: ReviewPeriod.MONTH,
    pb.TIER_REVIEW_PERIOD_QUARTER: ReviewPeriod.QUARTER,
    pb.TIER_REVIEW_PERIOD_YEAR: ReviewPeriod.YEAR,
}
PERIODS_PROTO = {v: k for k, v in PERIODS.items()}
HISTORY_KINDS_PROTO = {
    HistoryKind.UPGRADED: pb.TIER_HISTORY_KIND_UPGRADED,
    HistoryKind.DOWNGRADED: pb.TIER_HISTORY_KIND_DOWNGRADED,
    HistoryKind.GRACE_STARTED: pb.TIER_HISTORY_KIND_GRACE_STARTED,
    HistoryKind.GRACE_ENDED: pb.TIER_HISTORY_KIND_GRACE_ENDED,
}


# --- conversions ---------------------------------------------------------------------


def _timestamp(at: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


def _stamp_proto(principal: str, store_id: str, at: dt.datetime | None) -> org_pb2.AuditStamp:
    stamp = org_pb2.AuditStamp(principal=principal, store_id=store_id)
    if at is not None:
        stamp.time.CopyFrom(_timestamp(at))
    return stamp


def _money(currency: str, minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, minor_units=minor_units)


def _date(message: date_pb2.Date, field: str, v: Violations) -> dt.date | None:
    try:
        return dt.date(message.year, message.month, message.day)
    except ValueError:
        v.add(field, "a calendar date with its year")
        return None


def _date_proto(day: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=day.year, month=day.month, day=day.day)


def _values(items: Sequence[str]) -> frozenset[str]:
    return frozenset(item.strip() for item in items)


def rule_from_proto(message: pb.EarnRule, name: str, v: Violations) -> EarnRule | None:
    kind = KINDS.get(message.kind)
    if kind is None:
        v.add(f"{name}.kind", "one of the earn rule kinds")
        return None
    rounding = ROUNDINGS.get(message.rounding)
    if message.rounding and rounding is None:
        v.add(f"{name}.rounding", "down, half up or up")
    if kind == RuleKind.ROUNDING and rounding is None:
        rounding = Rounding.DOWN
    dates = [_date(day, f"{name}.dates[{i}]", v) for i, day in enumerate(message.dates)]
    return EarnRule(
        rule_id=message.rule_id.strip(),
        kind=kind,
        name=message.name.strip(),
        millipoints_per_unit=message.millipoints_per_unit,
        program_ids=_values(message.program_ids),
        tier_ids=_values(message.tier_ids),
        factor_bps=message.factor_bps,
        store_ids=_values(message.store_ids),
        terminal_ids=_values(message.terminal_ids),
        categories=_values(message.categories),
        skus=_values(message.skus),
        dates=frozenset(day for day in dates if day is not None),
        weekdays=frozenset(message.weekdays),
        birthday_month=message.birthday_month,
        cap_points=message.cap_points,
        rounding=rounding,
    )


def rules_from_proto(messages: Sequence[pb.EarnRule]) -> tuple[EarnRule, ...]:
    v = Violations()
    rules = [rule_from_proto(m, f"rules[{i}]", v) for i, m in enumerate(messages)]
    v.raise_if_any("the rule set has invalid fields")
    return earn.check_rule_set([rule for rule in rules if rule is not None])


def rule_to_proto(rule: EarnRule) -> pb.EarnRule:
    return pb.EarnRule(
        rule_id=rule.rule_id,
        kind=KINDS_PROTO[rule.kind],
        name=rule.name,
        millipoints_per_unit=rule.millipoints_per_unit,
        program_ids=sorted(rule.program_ids),
        tier_ids=sorted(rule.tier_ids),
        factor_bps=rule.factor_bps,
        store_ids=sorted(rule.store_ids),
        terminal_ids=sorted(rule.terminal_ids),
        categories=sorted(rule.categories),
        skus=sorted(rule.skus),
        dates=[_date_proto(day) for day in sorted(rule.dates)],
        weekdays=sorted(rule.weekdays),
        birthday_month=rule.birthday_month,
        cap_points=rule.cap_points,
        rounding=ROUNDINGS_PROTO[rule.rounding] if rule.rounding else pb.EARN_ROUNDING_UNSPECIFIED,
    )


def rule_set_to_proto(record: RuleSetRecord) -> pb.EarnRuleSet:
    rule_set = record.rule_set
    message = pb.EarnRuleSet(
        version=rule_set.version,
        effective_time=_timestamp(rule_set.effective_at),
        rules=[rule_to_proto(rule) for rule in rule_set.rules],
    )
    if record.published_at is not None:
        message.published_by.CopyFrom(
            _stamp_proto(record.published_by, record.published_store_id, record.published_at)
        )
    return message


def tier_to_proto(tier: Tier, currency: str) -> pb.Tier:
    return pb.Tier(
        tier_id=tier.tier_id,
        name=tier.name,
        rank=tier.rank,
        min_spend=_money(currency, tier.min_spend),
        min_visits=tier.min_visits,
        qualification=QUALIFICATIONS_PROTO[tier.qualification],
        benefits=pb.TierBenefits(
            discount_bps=tier.discount_bps, points_multiplier_bps=tier.points_multiplier_bps
        ),
    )


def ladder_to_proto(record: LadderRecord) -> pb.TierLadder:
    ladder = record.ladder
    message = pb.TierLadder(
        tiers=[tier_to_proto(tier, ladder.currency) for tier in ladder.tiers],
        window_days=ladder.window_days,
        review_period=PERIODS_PROTO[ladder.review_period],
        time_zone=ladder.time_zone,
        grace_days=ladder.grace_days,
        etag=record.etag,
        currency_code=ladder.currency,
    )
    if record.updated_at is not None:
        message.updated_by.CopyFrom(
            _stamp_proto(record.updated_by, record.updated_store_id, record.updated_at)
        )
    return message


def _tier_from_proto(message: pb.Tier, name: str, currency: str, v: Violations) -> Tier:
    spend = message.min_spend
    if spend.minor_units and spend.currency_code.strip().upper() != currency:
        v.add(f"{name}.min_spend.currency_code", "the ladder's currency_code")
    qualification = QUALIFICATIONS.get(message.qualification)
    if qualification is None and (spend.minor_units or message.min_visits):
        v.add(f"{name}.qualification", "how the thresholds combine")
    return Tier(
        tier_id=message.tier_id.strip(),
        name=message.name.strip(),
        rank=message.rank,
        min_spend=spend.minor_units,
        min_visits=message.min_visits,
        qualification=qualification or Qualification.SPEND_OR_VISITS,
        discount_bps=message.benefits.discount_bps,
        points_multiplier_bps=message.benefits.points_multiplier_bps or ladder_rules.ONE_BPS,
    )


def ladder_from_proto(message: pb.TierLadder) -> Ladder:
    v = Violations()
    currency = message.currency_code.strip().upper()
    tiers = tuple(
        _tier_from_proto(tier, f"ladder.tiers[{i}]", currency, v)
        for i, tier in enumerate(message.tiers)
    )
    period = PERIODS.get(message.review_period)
    if period is None:
        v.add("ladder.review_period", "month, quarter or year")
    if not ladder_rules.check_currency(currency):
        v.add("ladder.currency_code", "an ISO 4217 code such as CNY")
    v.raise_if_any("the tier ladder has invalid fields")
    return ladder_rules.check_ladder(
        Ladder(
            currency=currency,
            tiers=tiers,
            window_days=message.window_days,
            review_period=period or ReviewPeriod.QUARTER,
            time_zone=message.time_zone.strip(),
            grace_days=message.grace_days,
        )
    )


def progress_to_proto(progress: TierProgress, currency: str) -> pb.TierProgress:
    return pb.TierProgress(
        tier_id=progress.tier.tier_id,
        next_tier_id=progress.next_tier_id,
        next_tier_name=progress.next_tier_name,
        spend_to_next=_money(currency, progress.spend_to_next_minor_units),
        visits_to_next=progress.visits_to_next,
        window_spend=_money(currency, progress.window_spend_minor_units),
        window_visits=progress.window_visits,
        changed_from_tier_id=progress.changed_from,
    )


def history_to_proto(record: HistoryRecord) -> pb.TierHistoryEntry:
    message = pb.TierHistoryEntry(
        kind=HISTORY_KINDS_PROTO[record.kind],
        from_tier_id=record.from_tier_id,
        to_tier_id=record.to_tier_id,
        reason=record.reason,
        sale_id=record.sale_id,
        period=record.period,
        stamp=_stamp_proto(record.principal, record.store_id, record.at),
    )
    if record.grace_until is not None:
        message.grace_end_time.CopyFrom(_timestamp(record.grace_until))
    return message


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def _time(message: Timestamp | None) -> dt.datetime | None:
    return None if message is None else message.ToDatetime(dt.UTC)


def _reused() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("request_id", "already used for a different request")],
        message="this request_id was already used with a different payload",
        reason="IDEMPOTENCY_KEY_REUSED",
    )


async def _stored(db: Database, method: str, request: pb.RunTierReviewRequest) -> bytes | None:
    """The stored answer of a request done before (a key reused for another
    request is refused): for work that spans several transactions and so
    cannot run inside ``run_idempotent``'s."""
    key = idempotency_table.c
    async with db.sessions() as session:
        row = (
            await session.execute(
                sa.select(key.request_hash, key.response).where(
                    key.method == method, key.request_id == request.request_id
                )
            )
        ).first()
    if row is None:
        return None
    if row.request_hash != request_fingerprint(request):
        raise _reused()
    return bytes(row.response)


# --- earn rules ------------------------------------------------------------------------


class EarnRulesServicer(rules_pb2_grpc.EarnRulesServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db

    async def PublishEarnRuleSet(
        self, request: pb.PublishEarnRuleSetRequest, context: Context
    ) -> pb.EarnRuleSet:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        rules = rules_from_proto(request.rules)
        asked = _time(request.effective_time if request.HasField("effective_time") else None)

        async def publish(session: AsyncSession) -> pb.EarnRuleSet:
            now = utcnow()
            if asked is not None and asked < now - CLOCK_SKEW:
                raise InvalidArgument(
                    [FieldViolation("effective_time", "not in the past: rules never go back")]
                )
            record = await rule_store.insert_rule_set(
                session,
                rules,
                max(asked or now, now),
                principal=principal.subject,
                store_id=principal.store_id,
                now=now,
            )
            return rule_set_to_proto(record)

        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                return await run_idempotent(
                    self.db,
                    method="loyalty.PublishEarnRuleSet",
                    request_id=request.request_id,
                    request=request,
                    response_type=pb.EarnRuleSet,
                    work=publish,
                )
            except IntegrityError as exc:
                # Another set took the same version number at the same time.
                if not is_unique_violation(exc):
                    raise
                if attempt == PUBLISH_ATTEMPTS - 1:
                    break
        raise Aborted(
            "another rule set was being published at the same time; try again",
            reason="CONCURRENT_PUBLISH",
        )

    async def GetEarnRuleSet(
        self, request: pb.GetEarnRuleSetRequest, context: Context
    ) -> pb.EarnRuleSet:
        current_principal().require_role(*READING_ROLES)
        if request.version < 0:
            raise InvalidArgument([FieldViolation("version", "0 or a published version")])
        async with self.db.sessions() as session:
            if request.version == 0:
                at = (
                    _time(request.in_force_time if request.HasField("in_force_time") else None)
                    or utcnow()
                )
                return rule_set_to_proto(await rule_store.rule_set_record_in_force(session, at))
            record = await rule_store.get_rule_set(session, request.version)
        if record is None:
            raise NotFound(
                "no rule set of this version",
                reason="RULE_SET_NOT_FOUND",
                metadata={"version": str(request.version)},
            )
        return rule_set_to_proto(record)

    async def ListEarnRuleSets(
        self, request: pb.ListEarnRuleSetsRequest, context: Context
    ) -> pb.ListEarnRuleSetsResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        key = decode_token(request.page_token) or {}
        try:
            before = int(key["v"]) if "v" in key else None
        except (TypeError, ValueError):
            raise InvalidArgument(
                [FieldViolation("page_token", "not a token this service issued")]
            ) from None
        async with self.db.sessions() as session:
            found = await rule_store.list_rule_sets(session, before_version=before, limit=size + 1)
        response = pb.ListEarnRuleSetsResponse(
            rule_sets=[rule_set_to_proto(record) for record in found[:size]]
        )
        if len(found) > size:
            response.next_page_token = encode_token({"v": found[size - 1].rule_set.version})
        return response

    async def EvaluateEarn(
        self, request: pb.EvaluateEarnRequest, context: Context
    ) -> pb.EvaluateEarnResponse:
        current_principal().require_role(*READING_ROLES)
        if request.rule_set_version < 0:
            raise InvalidArgument([FieldViolation("rule_set_version", "0 or a version")])
        at = _time(request.evaluate_time if request.HasField("evaluate_time") else None)
        async with self.db.sessions() as session:
            if request.rule_set_version:
                record = await rule_store.get_rule_set(session, request.rule_set_version)
                if record is None:
                    raise NotFound(
                        "no rule set of this version",
                        reason="RULE_SET_NOT_FOUND",
                        metadata={"version": str(request.rule_set_version)},
                    )
            else:
                record = await rule_store.rule_set_record_in_force(session, at or utcnow())
            tier_id, bps = await self._tier(session, request)
        ctx = earn.check_context(_context(request, tier_id, bps))
        result = earn.evaluate(record.rule_set, ctx)
        return pb.EvaluateEarnResponse(
            points=result.points,
            steps=[
                pb.EarnStep(
                    rule_id=step.rule_id,
                    kind=step.kind,
                    explanation=step.explanation,
                    points_delta=step.points_delta,
                )
                for step in result.steps
            ],
            rule_set_version=record.rule_set.version,
            tier_id=tier_id,
            tier_multiplier_bps=bps,
        )

    @staticmethod
    async def _tier(session: AsyncSession, request: pb.EvaluateEarnRequest) -> tuple[str, int]:
        """The tier and multiplier to evaluate with: as given, else the
        member's, else none (x1)."""
        tier_id, bps = request.tier_id.strip(), request.tier_multiplier_bps
        if not tier_id and request.member_id.strip():
            member = await tier_writes.tier_of(session, request.member_id.strip())
            return member.tier_id, bps or member.points_multiplier_bps
        if tier_id and not bps:
            tier = (await tier_store.get_ladder(session)).ladder.tier(tier_id)
            if tier is None:
                raise InvalidArgument([FieldViolation("tier_id", "a tier of the ladder")])
            bps = tier.points_multiplier_bps
        return tier_id, bps or earn.ONE_BPS


def _context(request: pb.EvaluateEarnRequest, tier_id: str, bps: int) -> earn.EarnContext:
    v = Violations()
    codes = {line.net.currency_code.strip().upper() for line in request.lines}
    if request.paid_with_points.minor_units:
        codes.add(request.paid_with_points.currency_code.strip().upper())
    if len(codes) > 1:
        v.add("lines.net.currency_code", "every amount in one currency")
    day = None
    if not request.HasField("business_day"):
        v.add("business_day", "required")
    else:
        day = _date(request.business_day, "business_day", v)
    v.raise_if_any("the sale has invalid fields")
    assert day is not None
    return earn.EarnContext(
        program_id=request.program_id.strip(),
        tier_id=tier_id,
        tier_multiplier_bps=bps,
        store_id=request.store_id.strip(),
        terminal_id=request.terminal_id.strip(),
        business_day=day,
        birthday_month=request.birthday_month or None,
        currency_code=next(iter(codes), "CNY"),
        lines=tuple(
            earn.EarnLine(
                line.line_no, line.sku.strip(), line.category.strip(), line.net.minor_units
            )
            for line in request.lines
        ),
        paid_with_points_minor_units=request.paid_with_points.minor_units,
        earned_today=request.earned_today,
    )


# --- tiers ------------------------------------------------------------------------------


class TiersServicer(rules_pb2_grpc.TiersServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db

    async def GetTierLadder(
        self, request: pb.GetTierLadderRequest, context: Context
    ) -> pb.TierLadder:
        current_principal().require_role(*READING_ROLES)
        async with self.db.sessions() as session:
            return ladder_to_proto(await tier_store.get_ladder(session))

    async def UpdateTierLadder(
        self, request: pb.UpdateTierLadderRequest, context: Context
    ) -> pb.TierLadder:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        if not request.etag:
            raise InvalidArgument([FieldViolation("etag", "required: the etag last read")])
        ladder = ladder_from_proto(request.ladder)

        async def update(session: AsyncSession) -> pb.TierLadder:
            current = await tier_store.get_ladder(session, for_update=True)
            if current.etag != request.etag:
                raise Aborted(
                    "the ladder changed since you read it; read it again",
                    reason="ETAG_MISMATCH",
                    metadata={"etag": current.etag},
                )
            held = await tier_store.tier_held_outside(session, [t.tier_id for t in ladder.tiers])
            if held is not None:
                raise FailedPrecondition(
                    "members hold a tier the new ladder leaves out",
                    reason="TIER_IN_USE",
                    metadata={"tier_id": held},
                )
            if ladder.currency != current.ladder.currency and await tier_store.any_activity(
                session
            ):
                raise FailedPrecondition(
                    "spend was counted in the current currency; it cannot change",
                    reason="CURRENCY_FIXED",
                    metadata={"currency_code": current.ladder.currency},
                )
            await tier_store.save_ladder(
                session,
                ladder,
                principal=principal.subject,
                store_id=principal.store_id,
                now=utcnow(),
            )
            return ladder_to_proto(await tier_store.get_ladder(session))

        return await run_idempotent(
            self.db,
            method="loyalty.UpdateTierLadder",
            request_id=request.request_id,
            request=request,
            response_type=pb.TierLadder,
            work=update,
        )

    async def GetMemberTier(
        self, request: pb.GetMemberTierRequest, context: Context
    ) -> pb.MemberTier:
        current_principal().require_role(*READING_ROLES)
        member_id = _required(request.member_id, "member_id")
        async with self.db.sessions() as session:
            status = await tier_writes.status_of(session, member_id, utcnow())
        currency = status.ladder.currency
        message = pb.MemberTier(
            member_id=member_id,
            tier=tier_to_proto(status.tier, currency),
            progress=progress_to_proto(status.progress, currency),
        )
        if status.record is not None and status.record.since is not None:
            message.since.CopyFrom(_timestamp(status.record.since))
        if status.record is not None and status.record.grace_until is not None:
            message.grace_end_time.CopyFrom(_timestamp(status.record.grace_until))
        return message

    async def ListTierHistory(
        self, request: pb.ListTierHistoryRequest, context: Context
    ) -> pb.ListTierHistoryResponse:
        current_principal().require_role(*READING_ROLES)
        member_id = _required(request.member_id, "member_id")
        size = page_size(request.page_size)
        key = decode_token(request.page_token) or {}
        try:
            before = int(key["seq"]) if "seq" in key else None
        except (TypeError, ValueError):
            raise InvalidArgument(
                [FieldViolation("page_token", "not a token this service issued")]
            ) from None
        async with self.db.sessions() as session:
            found = await tier_store.list_history(
                session, member_id, before_seq=before, limit=size + 1
            )
        response = pb.ListTierHistoryResponse(
            entries=[history_to_proto(record) for record in found[:size]]
        )
        if len(found) > size:
            response.next_page_token = encode_token({"seq": found[size - 1].seq})
        return response

    async def RunTierReview(
        self, request: pb.RunTierReviewRequest, context: Context
    ) -> pb.TierReview:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        method = "loyalty.RunTierReview"
        stored = await _stored(self.db, method, request)
        if stored is not None:
            return pb.TierReview.FromString(stored)
        now = utcnow()
        as_of = _time(request.as_of if request.HasField("as_of") else None) or now
        if as_of > now + dt.timedelta(minutes=1):
            raise InvalidArgument(
                [FieldViolation("as_of", "not in the future: only periods that ended")]
            )
        response = await _review(self.db, principal, as_of)

        async def done(session: AsyncSession) -> pb.TierReview:
            return response

        return await run_idempotent(
            self.db,
            method=method,
            request_id=request.request_id,
            request=request,
            response_type=pb.TierReview,
            work=done,
        )


async def _review(db: Database, principal: Principal, as_of: dt.datetime) -> pb.TierReview:
    outcome = await tier_writes.run_review(
        db,
        as_of,
        TierStamp(principal.subject, principal.store_id, as_of),
        worker_id=f"rpc-{uuid.uuid4()}",
    )
    counts = outcome.counts
    return pb.TierReview(
        period=outcome.period.key,
        period_end_time=_timestamp(outcome.period.end),
        already_reviewed=outcome.already_reviewed,
        members_reviewed=counts.members_reviewed,
        entered_grace=counts.entered_grace,
        left_grace=counts.left_grace,
        downgraded=counts.downgraded,
        graces_ended=counts.graces_ended,
    )


# --- wiring --------------------------------------------------------------------------------


def services(ctx: ServiceContext) -> list[GrpcService]:
    return [
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["EarnRulesService"].full_name,
            servicer=EarnRulesServicer(ctx),
            add_to_server=rules_pb2_grpc.add_EarnRulesServiceServicer_to_server,
        ),
        GrpcService(
            full_name=pb.DESCRIPTOR.services_by_name["TiersService"].full_name,
            servicer=TiersServicer(ctx),
            add_to_server=rules_pb2_grpc.add_TiersServiceServicer_to_server,
        ),
    ]


def workers(ctx: ServiceContext) -> Sequence[Callable[[], Awaitable[None]]]:
    return [tier_writes.TierReviewWorker(ctx.db).run]
