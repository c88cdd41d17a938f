"""The checkout and refund sagas: each step is written to the saga's log
before the next begins, so a crash anywhere is finished or undone by the
recovery pass when the service starts again.

A checkout: STARTED (the plan: priced lines, tenders, points to earn) ->
POINTS_HELD -> SV_HOLDING (a hold was asked of cards) -> SV_HELD ->
SV_CAPTURED (the point of no return: the member's money is taken) ->
COMMITTED (in one transaction: the held points spent, the points earned
accrued, the tier brought up to date, the sale and its receipt recorded).
Before SV_CAPTURED a failure undoes what was done (the stored-value hold
voided, the points hold released) and the checkout is ABORTED: the same
checkout may be sent again. From SV_CAPTURED on it can only be completed.

Steps that touch nothing outside this database share a transaction: the
plan, the points hold and SV_HOLDING are written together (or, when no
stored value pays, the plan, the points hold and SV_CAPTURED); the capture
is recorded with the sale, in the commit's transaction (unless coupons are
redeemed, which needs the sale's id written down first). So the log says
SV_HELD from the hold until the sale is recorded, and before undoing a
checkout at SV_HELD its driver or the recovery asks cards whether the hold
was captured: if it was, the checkout is completed (the capture asked
again returns the one made). Every call to cards is preceded by the log
entry that lets recovery undo or complete it.

Every call to cards carries the checkout id, its attempt and the step as
its request id, so a repeated call returns the first answer. The PIN is
never written down: a recovery that must find out whether a hold was made
asks cards for the same hold again, which cards answers without a PIN when
it was made, and refuses (PIN_REQUIRED) or makes it anew (then voided at
once) when it was not.

A refund goes forward only: STARTED (the plan, and the refunded quantities
taken from the sale in the same transaction, so two refunds cannot give
back the same units) -> SV_REFUNDED -> COMMITTED (points, tier, the sale's
totals, the receipt).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from opentelemetry import trace
from sqlalchemy.exc import IntegrityError

from chassis import outbox
from chassis.db import Database, is_unique_violation, utcnow
from chassis.direct import Executor, as_session
from chassis.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from chassis.logs import get_logger
from cornucopia.loyalty.v1 import checkout_pb2 as pb
from cornucopia.loyalty.v1 import events_pb2
from services.loyalty import events, points_ledger, tiers
from services.loyalty.convert_checkout import (
    business_day_proto,
    money,
    receipt_to_proto,
    refund_receipt_to_proto,
    stamp_proto,
)
from services.loyalty.domain import checkout as rules
from services.loyalty.domain.checkout import SagaStep, TenderKind
from services.loyalty.domain.earn_rules import EarnContext, EarnLine, evaluate
from services.loyalty.peers import (
    CampaignsClient,
    CardsClient,
    HeldValue,
    MembersClient,
    ResolvedCard,
    StoreFacts,
)
from services.loyalty.points_ledger import Stamp
from services.loyalty.pricing import Priced, price_request, priced_from_proto
from services.loyalty.store import buyers
from services.loyalty.store import earn_rules as rule_store
from services.loyalty.store import sales as store
from services.loyalty.store.sales import CheckoutLog, RefundLog, SaleRecord, SaleState

log = get_logger(__name__)
_tracer = trace.get_tracer(__name__)
T = TypeVar("T")
Step = TypeVar("Step", bound=Callable[..., Awaitable[Any]])

# How long the driver of a saga holds it before recovery may take over: a
# checkout's calls finish well within it.
LEASE = dt.timedelta(seconds=30)
# Long enough for recovery after a restart to capture what was held.
HOLD_TTL = dt.timedelta(minutes=15)
# What checkout keeps of stores and members is refreshed this often.
FACTS_TTL = dt.timedelta(hours=6)
# And what a checkout reads of them is kept in the process this long (at
# most this many of each), instead of read from the database every time.
FACTS_MEMO_SECONDS = 60.0
FACTS_MEMO_SIZE = 10_000
RECOVERY_BATCH = 50


def _step(name: str) -> Callable[[Step], Step]:
    """A span around a step of the checkout, so that its trace shows where
    the time goes between the calls to other services (reads, the log's
    writes, the commit)."""

    def wrap(step: Step) -> Step:
        @functools.wraps(step)
        async def run(*args: Any, **kwargs: Any) -> Any:
            with _tracer.start_as_current_span(name):
                return await step(*args, **kwargs)

        return cast(Step, run)

    return wrap


def _dismissed(task: asyncio.Future[Any]) -> None:
    """Done callback of a task whose outcome nobody awaits: its exception
    is looked at, so that asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


class _TakeRefused(Exception):
    """The first steps of a checkout were refused (the points hold): carries
    the refusal out of the transaction, which writes nothing."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


class SimulatedCrash(BaseException):
    """Raised by a test's crash hook: like a killed process, it skips every
    ``except Exception`` and leaves the log as it was."""


@dataclasses.dataclass(frozen=True)
class Caller:
    principal: str
    store_id: str


def _error_record(error: ServiceError) -> dict[str, Any]:
    return {
        "code": error.code.value,
        "reason": error.reason,
        "message": error.message,
        "metadata": error.metadata,
    }


def _cards_request(log_: CheckoutLog, step: str) -> str:
    return f"checkout:{log_.checkout_id}:{log_.attempt}:{step}"


class Sagas:
    """Runs checkouts and refunds; ``recover`` finishes what a crash left."""

    def __init__(
        self,
        db: Database,
        cards: CardsClient,
        members: MembersClient,
        campaigns: CampaignsClient,
    ) -> None:
        self.db = db
        self.cards = cards
        self.members = members
        self.campaigns = campaigns
        # Tests set this to stop the saga right after a step, as a crash would.
        self.crash_after: Callable[[SagaStep], None] | None = None
        self._store_memo: dict[str, tuple[float, StoreFacts]] = {}
        self._birthday_memo: dict[str, tuple[float, int | None]] = {}

    def _crash_point(self, step: SagaStep) -> None:
        if self.crash_after is not None:
            self.crash_after(step)

    # --- what the checkout needs to know -------------------------------------

    async def store_facts(self, store_id: str, *, memo: bool = False) -> StoreFacts:
        """The store's region, time zone and currency, as members said them
        within FACTS_TTL. With ``memo`` (the checkout) as this process read
        them within FACTS_MEMO_SECONDS."""
        if memo and (kept := _recall(self._store_memo, store_id)) is not None:
            return kept
        facts = await self._store_facts(store_id)
        _remember(self._store_memo, store_id, facts)
        return facts

    async def _store_facts(self, store_id: str) -> StoreFacts:
        now = utcnow()
        async with self.db.sessions() as session:
            row = await store.get_store_facts(session, store_id)
        if row is not None and now - row.fetched_at < FACTS_TTL:
            return StoreFacts(store_id, row.region_id, row.time_zone, row.currency)
        try:
            facts = await self.members.store(store_id)
        except Unavailable:
            if row is not None:  # an old answer beats no sale
                return StoreFacts(store_id, row.region_id, row.time_zone, row.currency)
            raise
        except NotFound:
            raise InvalidArgument([FieldViolation("store_id", "no such store")]) from None
        async with self.db.transaction() as session:
            await store.put_store_facts(
                session,
                store_id,
                region_id=facts.region_id,
                time_zone=facts.time_zone,
                currency=facts.currency,
                now=now,
            )
        return facts

    async def birthday_month(self, member_id: str) -> int | None:
        """The member's birthday month as members said it within
        FACTS_TTL, as this process read it within FACTS_MEMO_SECONDS."""
        kept = self._birthday_memo.get(member_id)
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        month = await self._birthday_month(member_id)
        _remember(self._birthday_memo, member_id, month)
        return month

    async def _birthday_month(self, member_id: str) -> int | None:
        now = utcnow()
        async with self.db.sessions() as session:
            row = await store.get_member_facts(session, member_id)
        if row is not None and now - row.fetched_at < FACTS_TTL:
            return int(row.birthday_month) if row.birthday_month else None
        try:
            month = await self.members.birthday_month(member_id)
        except (Unavailable, NotFound):
            # Birthday promotions are a nicety; a sale does not wait for them.
            return int(row.birthday_month) if row is not None and row.birthday_month else None
        async with self.db.transaction() as session:
            await store.put_member_facts(session, member_id, birthday_month=month, now=now)
        return month

    async def resolve(
        self, request: pb.CheckoutRequest | pb.PreviewCheckoutRequest
    ) -> ResolvedCard | None:
        given = [
            name
            for name in ("card_number", "mobile", "member_id")
            if getattr(request, name).strip()
        ]
        if len(given) > 1:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "card_number", "give at most one of card_number, mobile, member_id"
                    )
                ]
            )
        if not given:
            return None
        return await self.cards.resolve(
            card_number=request.card_number.strip(),
            mobile=request.mobile.strip(),
            member_id=request.member_id.strip(),
        )

    @_step("checkout plan")
    async def plan(
        self,
        request: pb.CheckoutRequest | pb.PreviewCheckoutRequest,
        facts: StoreFacts,
        card: ResolvedCard | None,
        now: dt.datetime,
        tenders: list[rules.Tender] | None,
        *,
        reservation_id: str = "",
    ) -> dict[str, Any]:
        """Prices the basket and checks the tenders: everything decided
        before anything is taken, as the saga's plan. With a
        ``reservation_id`` (the checkout's id) the coupons used are reserved
        for it; a refusal after that releases them."""
        lines = [
            rules.Line(
                line_no=i + 1,
                sku=line.sku.strip(),
                category=line.category.strip(),
                description=line.description.strip(),
                quantity=line.quantity,
                unit_price=line.unit_price.minor_units,
            )
            for i, line in enumerate(request.lines)
        ]
        rules.check_basket(
            lines,
            [line.unit_price.currency_code.strip().upper() for line in request.lines],
            facts.currency,
        )
        member_id = card.member_id if card else ""
        day = rules.business_day(now, facts.time_zone)
        tier = None
        points_available = earned_today = 0
        async with self.db.direct_reads() as session:
            if member_id:
                member = await buyers.buyer(session, member_id, at=now, business_day=day)
                tier = await tiers.tier_of_record(session, member.tier)
                points_available = await points_ledger.available_to_buyer(
                    session, member_id, member, at=now
                )
                earned_today = member.earned_on_day
            policy = await points_ledger.policy(session)
            rule_set = await rule_store.rule_set_in_force(session, now)
        buyer = rules.Buyer(
            member_id=member_id,
            program_id=card.program_id if card else "",
            program_discount_bps=card.discount_bps if card else 0,
            tier_id=tier.tier_id if tier else "",
            tier_name=tier.name if tier else "",
            tier_discount_bps=tier.discount_bps if tier else 0,
        )
        birthday_month = await self.birthday_month(member_id) if member_id else None
        priced = await self._price(
            request,
            facts=facts,
            buyer=buyer,
            lines=lines,
            now=now,
            birthday_month=birthday_month,
            reservation_id=reservation_id,
        )
        try:
            return await self._plan_priced(
                request,
                facts=facts,
                card=card,
                buyer=buyer,
                priced=priced,
                tenders=tenders,
                points_available=points_available,
                policy=policy,
                rule_set=rule_set,
                day=day,
                earned_today=earned_today,
                tier_multiplier_bps=tier.points_multiplier_bps if tier else 10_000,
                birthday_month=birthday_month,
                reservation_id=reservation_id,
            )
        except ServiceError:
            if reservation_id and priced.coupon_ids:
                await self.campaigns.release(
                    reservation_id=reservation_id, reason="checkout refused"
                )
            raise

    async def _plan_priced(
        self,
        request: pb.CheckoutRequest | pb.PreviewCheckoutRequest,
        *,
        facts: StoreFacts,
        card: ResolvedCard | None,
        buyer: rules.Buyer,
        priced: Priced,
        tenders: list[rules.Tender] | None,
        points_available: int,
        policy: Any,
        rule_set: Any,
        day: dt.date,
        earned_today: int,
        tier_multiplier_bps: int,
        birthday_month: int | None,
        reservation_id: str,
    ) -> dict[str, Any]:
        member_id = buyer.member_id
        basket = priced.basket
        rate = rules.PointsRate(
            points=policy.cash_rate_points,
            minor_units=policy.cash_rate_minor_units,
            max_share_bps=policy.max_cash_share_bps,
        )
        plan_ = None
        if tenders is not None:
            plan_ = rules.plan_tenders(
                basket.total,
                tenders,
                rate,
                member=bool(member_id),
                card_pays=bool(card and card.card_id and card.stored_value),
                available_points=points_available,
            )
            if plan_.stored_value and card is not None and not card.can_pay:
                raise FailedPrecondition(
                    "this card cannot pay now",
                    reason=card.refusal_reason or "CARD_CANNOT_PAY",
                    metadata={"card_id": card.card_id},
                )
        earn = None
        if member_id:
            earn = evaluate(
                rule_set,
                EarnContext(
                    program_id=buyer.program_id,
                    tier_id=buyer.tier_id,
                    tier_multiplier_bps=tier_multiplier_bps,
                    store_id=facts.store_id,
                    terminal_id=request.terminal_id.strip(),
                    business_day=day,
                    birthday_month=birthday_month,
                    currency_code=facts.currency,
                    lines=tuple(
                        EarnLine(p.line.line_no, p.line.sku, p.line.category, p.net)
                        for p in basket.lines
                    ),
                    paid_with_points_minor_units=plan_.points_value if plan_ else 0,
                    earned_today=earned_today,
                    campaign_multiplier_bps=priced.points_multiplier_bps,
                    campaign_promotion_id=priced.points_promotion_id,
                ),
            )
        return {
            "currency": facts.currency,
            "time_zone": facts.time_zone,
            "business_day": day.isoformat(),
            "store_id": facts.store_id,
            "terminal_id": request.terminal_id.strip(),
            "member_id": member_id,
            "card_id": card.card_id if card else "",
            "program_id": buyer.program_id,
            "lines": [
                {
                    "line_no": p.line.line_no,
                    "sku": p.line.sku,
                    "category": p.line.category,
                    "description": p.line.description,
                    "quantity": p.line.quantity,
                    "unit_price": p.line.unit_price,
                    "discounts": [dataclasses.asdict(d) for d in p.discounts],
                    "net": p.net,
                }
                for p in basket.lines
            ],
            "gross": basket.gross,
            "discount": basket.discount,
            "total": basket.total,
            "tenders": dataclasses.asdict(plan_) if plan_ else {},
            "earn": {
                "points": earn.points if earn else 0,
                "explanations": [step.explanation for step in earn.steps] if earn else [],
            },
            "max_points": rate.most_points(basket.total, points_available),
            "max_points_value": rate.value(rate.most_points(basket.total, points_available)),
            "points_available": points_available,
            "reservation_id": reservation_id if priced.coupon_ids else "",
            "coupon_ids": list(priced.coupon_ids),
            "card_can_pay": bool(card and card.can_pay),
            "card_refusal": card.refusal_reason if card else "",
        }

    async def _price(
        self,
        request: pb.CheckoutRequest | pb.PreviewCheckoutRequest,
        *,
        facts: StoreFacts,
        buyer: rules.Buyer,
        lines: list[rules.Line],
        now: dt.datetime,
        birthday_month: int | None,
        reservation_id: str,
    ) -> Priced:
        """The pricing step: the campaigns service's promotions and coupons
        on top of the member or tier discount. Without coupons a sale does
        not wait for campaigns: when it does not answer, the member or tier
        discount alone prices the basket."""
        codes = [code.strip() for code in request.coupon_codes if code.strip()]
        try:
            answer = await self.campaigns.price(
                price_request(
                    store_id=facts.store_id,
                    region_id=facts.region_id,
                    currency=facts.currency,
                    buyer=buyer,
                    lines=lines,
                    codes=codes,
                    now=now,
                    birthday_month=birthday_month,
                    # Only coupons are reserved: without codes there is
                    # nothing to reserve, nor (the same checkout always
                    # carries the same codes) anything reserved before.
                    reservation_id=reservation_id if codes else "",
                )
            )
        except Unavailable:
            if codes:
                raise
            log.warning("campaigns did not answer; member pricing only", store_id=facts.store_id)
            return Priced(rules.member_pricing(lines, buyer))
        priced = priced_from_proto(lines, answer)
        if priced.refusals:
            # A coupon the member counted on and did not get: the cashier
            # says so rather than ring up a dearer sale.
            if reservation_id and priced.coupon_ids:
                await self.campaigns.release(reservation_id=reservation_id, reason="coupon refused")
            code, reason = priced.refusals[0]
            raise FailedPrecondition(
                f"coupon {code} cannot be used ({reason})",
                reason=reason or "COUPON_NOT_APPLICABLE",
                metadata={"coupon_code": code},
            )
        return priced

    # --- the checkout ----------------------------------------------------------

    async def checkout(
        self, request: pb.CheckoutRequest, request_hash: str, caller: Caller
    ) -> pb.Receipt:
        checkout_id = rules.check_checkout_id(request.checkout_id)
        # The card is resolved while the log is read: resolving takes
        # nothing, and a new checkout, by far the most common, needs both.
        resolving = asyncio.create_task(self.resolve(request))
        try:
            async with self.db.direct_reads() as reads:
                found = await store.get_checkout(reads, checkout_id)
            if found is not None:
                if found.request_hash != request_hash:
                    raise InvalidArgument(
                        [FieldViolation("checkout_id", "already used for a different checkout")],
                        message="this checkout_id was already used with a different basket",
                        reason="IDEMPOTENCY_KEY_REUSED",
                    )
                if found.step == SagaStep.COMMITTED and found.receipt is not None:
                    return pb.Receipt.FromString(found.receipt)
                if found.step != SagaStep.ABORTED:
                    return await self._join(found)
            card = await resolving
        finally:
            # A replay, or a read that failed, has no use for the card (nor
            # for why it could not be resolved).
            resolving.cancel()
            resolving.add_done_callback(_dismissed)
        now = utcnow()
        facts = await self.store_facts(request.store_id.strip(), memo=True)
        tenders = [
            rules.Tender(
                kind=_TENDER_KINDS.get(t.kind, TenderKind.CASH),
                amount=t.amount.minor_units,
                points=t.points,
                reference=t.reference.strip()[:100],
            )
            for t in request.tenders
        ]
        bad = [i for i, t in enumerate(request.tenders) if t.kind not in _TENDER_KINDS]
        if bad:
            raise InvalidArgument(
                [FieldViolation(f"tenders[{i}].kind", "one of the tender kinds") for i in bad]
            )
        plan = await self.plan(request, facts, card, now, tenders, reservation_id=checkout_id)
        pin = next((t.pin for t in request.tenders if t.kind == pb.TENDER_KIND_STORED_VALUE), "")
        started = CheckoutLog(
            checkout_id=checkout_id,
            request_hash=request_hash,
            step=SagaStep.STARTED,
            attempt=found.attempt + 1 if found is not None else 1,
            store_id=facts.store_id,
            member_id=plan["member_id"],
            card_id=plan["card_id"],
            # As the log keeps it, read back.
            plan=json.loads(store.plan_text(plan)),
            points_hold_id="",
            sv_hold_id="",
            sv_movement_id="",
            sale_id="",
            error={},
            receipt=None,
            principal=caller.principal,
            lease_until=now + LEASE,
            created_at=found.created_at if found is not None else now,
        )
        try:
            log_ = await self._start(started, now=now, restart=found is not None)
        except IntegrityError as exc:
            # The same checkout, sent again at the same moment, began first.
            if is_unique_violation(exc):
                raise _in_progress(checkout_id) from None
            raise
        except _TakeRefused as refused:
            # The points could not be held: the checkout is written as it
            # began and undone as any refusal is (coupons released, ABORTED).
            try:
                await self._start(started, now=now, restart=found is not None, take=False)
            except IntegrityError as exc:
                if is_unique_violation(exc):
                    raise _in_progress(checkout_id) from None
                raise
            await self._undo(started, refused.error)
            raise refused.error from None
        known = card.stored_value_available if card is not None else None
        return await self._drive(log_, pin=pin, stored_value_left=known)

    @_step("checkout start")
    async def _start(
        self, log_: CheckoutLog, *, now: dt.datetime, restart: bool, take: bool = True
    ) -> CheckoutLog:
        """Writes the plan (a new checkout, or a new attempt at an aborted
        one) and, in the same transaction, the steps that need no other
        service (``take``): the points held when points pay, then either
        SV_HOLDING (the record that a hold is about to be asked of cards)
        or, when no stored value pays, SV_CAPTURED: nothing outside this
        database is taken, so the sale can only be completed from here.
        A refusal of the points hold leaves nothing written
        (``_TakeRefused``)."""
        values: dict[str, Any] = {}
        step = SagaStep.STARTED
        # Without points to hold, the log's insert (or update) is the whole
        # of this unit of work.
        holds_points = take and bool(log_.plan["tenders"].get("points"))
        unit = self.db.transaction() if holds_points else self.db.single_statement()
        async with unit as session:
            if take:
                try:
                    # The log's insert (unique checkout id) or its move to
                    # this attempt (only from the attempt before) in this
                    # transaction fails if these steps were written before.
                    step, values = await self._first_steps(session, log_, new_log=True)
                except ServiceError as error:
                    raise _TakeRefused(error) from None
            if restart:
                restarted = await store.restart_checkout(
                    session,
                    log_.checkout_id,
                    plan=log_.plan,
                    member_id=log_.member_id,
                    card_id=log_.card_id,
                    lease_until=log_.lease_until,
                    now=now,
                    attempt=log_.attempt - 1,
                    step=step,
                    **values,
                )
                if not restarted:
                    raise _in_progress(log_.checkout_id)
            else:
                await store.insert_checkout(
                    session,
                    checkout_id=log_.checkout_id,
                    request_hash=log_.request_hash,
                    store_id=log_.store_id,
                    member_id=log_.member_id,
                    card_id=log_.card_id,
                    plan=log_.plan,
                    principal=log_.principal,
                    lease_until=log_.lease_until,
                    now=now,
                    step=step,
                    **values,
                )
        if take:
            self._crash_point(SagaStep.POINTS_HELD)
            self._crash_point(step)
        return dataclasses.replace(log_, step=step, **values)

    async def _first_steps(
        self, session: Executor, log_: CheckoutLog, *, new_log: bool = False
    ) -> tuple[SagaStep, dict[str, Any]]:
        """The steps from STARTED that need no other service, in the
        caller's transaction: the points hold, when points pay. Returns the
        step the checkout stands at after them and the log's new values.
        ``new_log``: the transaction also writes this attempt's log, and
        fails if it was written before (the hold's replay check is not
        read then)."""
        tenders = log_.plan["tenders"]
        values: dict[str, Any] = {}
        if tenders.get("points"):
            stamp = Stamp(log_.principal, log_.store_id, utcnow())
            hold_id = f"checkout:{log_.checkout_id}:{log_.attempt}"
            await points_ledger.hold(
                as_session(session),
                log_.member_id,
                int(tenders["points"]),
                hold_id=hold_id,
                reference=log_.checkout_id,
                expires_at=stamp.at + HOLD_TTL,
                stamp=stamp,
                unseen_hold=new_log,
            )
            values["points_hold_id"] = hold_id
        if tenders.get("stored_value"):
            return SagaStep.SV_HOLDING, values
        # The sale's id is fixed with the point of no return.
        values["sale_id"] = rules.new_sale_id()
        return SagaStep.SV_CAPTURED, values

    async def _join(self, found: CheckoutLog) -> pb.Receipt:
        """The same checkout while it is under way: take it over if its
        driver is gone, else ask the caller to come back."""
        now = utcnow()
        async with self.db.single_statement() as session:
            claimed = await store.claim_checkout(
                session, found.checkout_id, now=now, until=now + LEASE
            )
        if not claimed:
            raise _in_progress(found.checkout_id)
        return await self._drive(found, pin=None)

    async def _drive(
        self, log_: CheckoutLog, *, pin: str | None, stored_value_left: int | None = None
    ) -> pb.Receipt:
        """Takes the checkout from where its log stands to COMMITTED, or
        undoes it. ``pin`` is None when recovering (no PIN is kept).
        ``stored_value_left``: the card's stored value, for the receipt, as
        cards last said it (asked again at the commit when unknown)."""
        try:
            if pin is None:
                # Taken over from a driver that went away: the hold it asked
                # for may exist, captured or not (cards says).
                log_ = await self._hold_of(log_)
            if log_.step not in rules.PAST_NO_RETURN:
                log_, stored_value_left = await self._take(log_, pin, stored_value_left)
            return await self._commit(log_, stored_value_left=stored_value_left)
        except SimulatedCrash:
            raise
        except ServiceError as error:
            current = await self._hold_of(await self._reload(log_.checkout_id), log_.sv_hold_id)
            if current.step in rules.PAST_NO_RETURN or await self._captured(current):
                log.warning(
                    "checkout past its point of no return could not finish yet",
                    checkout_id=log_.checkout_id,
                    reason=error.reason,
                )
                raise Unavailable(
                    "the sale is being completed; send the same checkout again for the receipt",
                    reason="CHECKOUT_COMPLETING",
                    retry_after_seconds=2.0,
                ) from None
            await self._undo(current, error)
            raise

    async def _captured(self, log_: CheckoutLog) -> bool:
        """Whether a checkout holding stored value is in fact past its point
        of no return: its capture is recorded with the sale, so a crash (or
        a failed commit) between the two leaves the log before SV_CAPTURED
        with the hold captured. Cards says which."""
        if log_.step != SagaStep.SV_HELD or not log_.sv_hold_id:
            return False
        if log_.sv_movement_id:
            return True  # cards said so with the hold
        return await self.cards.hold_captured(log_.sv_hold_id)

    async def _hold_of(self, log_: CheckoutLog, known_hold_id: str = "") -> CheckoutLog:
        """A log at SV_HOLDING as it stands at cards: the hold and the
        capture are not written down (each is recorded by cards under the
        checkout's request ids, and the capture again with the sale), so a
        checkout whose log says SV_HOLDING may hold stored value, captured
        or not. With the hold found (or known to the driver), the log at
        SV_HELD; as it was otherwise."""
        if log_.step != SagaStep.SV_HOLDING:
            return log_
        if known_hold_id:
            return dataclasses.replace(log_, step=SagaStep.SV_HELD, sv_hold_id=known_hold_id)
        held = await self._find_hold(log_)
        if held is None:
            return log_
        # A hold captured as it was made comes back with its capture.
        return dataclasses.replace(
            log_,
            step=SagaStep.SV_HELD,
            sv_hold_id=held.hold_id,
            sv_movement_id=held.capture_movement_id,
        )

    async def _reload(self, checkout_id: str) -> CheckoutLog:
        async with self.db.sessions() as session:
            current = await store.get_checkout(session, checkout_id)
        assert current is not None
        return current

    async def _advance(self, log_: CheckoutLog, step: SagaStep, **values: Any) -> CheckoutLog:
        """Writes the step (the driver holds the lease, so nobody else
        writes this log meanwhile) and returns the log as it now stands."""
        now = utcnow()
        lease = now + LEASE
        async with self.db.single_statement() as session:
            await store.advance_checkout(
                session, log_.checkout_id, step, now, lease_until=lease, **values
            )
        self._crash_point(step)
        return dataclasses.replace(log_, step=step, lease_until=lease, **values)

    @_step("checkout take")
    async def _take(
        self, log_: CheckoutLog, pin: str | None, stored_value_left: int | None
    ) -> tuple[CheckoutLog, int | None]:
        """From where the log stands to SV_CAPTURED; returns the log and
        the stored value left as cards' capture said it."""
        plan = log_.plan
        tenders = plan["tenders"]
        if log_.step in (SagaStep.STARTED, SagaStep.POINTS_HELD):
            # Only a log written without its first steps stands here (one
            # whose points hold was refused, or an older one).
            if log_.step == SagaStep.STARTED:
                now = utcnow()
                async with self.db.transaction() as session:
                    step, values = await self._first_steps(session, log_)
                    await store.advance_checkout(
                        session, log_.checkout_id, step, now, lease_until=now + LEASE, **values
                    )
                self._crash_point(SagaStep.POINTS_HELD)
                self._crash_point(step)
                log_ = dataclasses.replace(log_, step=step, **values)
            elif tenders.get("stored_value"):
                log_ = await self._advance(log_, SagaStep.SV_HOLDING)
            else:
                log_ = await self._advance(log_, SagaStep.SV_CAPTURED, sale_id=rules.new_sale_id())
        if log_.step == SagaStep.SV_HOLDING:
            if pin is None:
                # Recovering: whether the hold was made is for undo to find out.
                raise Unavailable("the checkout's driver went away", reason="CHECKOUT_INTERRUPTED")
            # Held and captured in one call: nothing is done between the two.
            held = await self.cards.hold(
                request_id=_cards_request(log_, "hold"),
                card_id=log_.card_id,
                amount=money(plan["currency"], int(tenders["stored_value"])),
                pin=pin,
                reference=log_.checkout_id,
                ttl=HOLD_TTL,
                capture=True,
            )
            # Not written down: the hold and its capture are cards' records
            # under this checkout's request id, which whoever finds the log
            # at SV_HOLDING asks for (``_hold_of``).
            log_ = dataclasses.replace(log_, step=SagaStep.SV_HELD, sv_hold_id=held.hold_id)
            if held.captured:
                return await self._past_capture(
                    log_, held.capture_movement_id, held.available_after
                )
            # A hold this request id made without its capture (asked for by a
            # recovery that raced this driver): captured below.
            self._crash_point(SagaStep.SV_HELD)
        if log_.step == SagaStep.SV_HELD:
            if log_.sv_movement_id:
                # Found captured by a driver that took the checkout over.
                return await self._past_capture(log_, log_.sv_movement_id, stored_value_left)
            # A hold made before and not captured. Asked again after a
            # crash, cards returns the capture it made.
            captured = await self.cards.capture(
                request_id=_cards_request(log_, "capture"), hold_id=log_.sv_hold_id
            )
            return await self._past_capture(log_, captured.movement_id, captured.available_after)
        return log_, stored_value_left

    async def _past_capture(
        self, log_: CheckoutLog, movement_id: str, stored_value_left: int | None
    ) -> tuple[CheckoutLog, int | None]:
        """The log past its point of no return once cards captured its hold
        (``movement_id``), and the stored value left as cards said it."""
        values: dict[str, Any] = {
            "sv_hold_id": log_.sv_hold_id,
            "sv_movement_id": movement_id,
            "sale_id": rules.new_sale_id(),
        }
        if log_.plan.get("coupon_ids"):
            # The coupons are redeemed under the sale's id before the sale is
            # recorded: the id is written down first, as SV_CAPTURED.
            log_ = await self._advance(log_, SagaStep.SV_CAPTURED, **values)
        else:
            # The capture is recorded with the sale, in the commit's one
            # transaction. Until then the log says SV_HOLDING, and whoever
            # finds it so asks cards for the hold and whether it was captured
            # (``_hold_of``, ``_captured``) before undoing anything.
            log_ = dataclasses.replace(log_, step=SagaStep.SV_CAPTURED, **values)
            self._crash_point(SagaStep.SV_CAPTURED)
        return log_, stored_value_left

    async def _undo(self, log_: CheckoutLog, error: ServiceError) -> None:
        """Gives back what a checkout before its point of no return took, and
        marks it ABORTED with the refusal. A step of this that fails leaves
        the checkout for the recovery pass (cards' hold expiry is the last
        resort)."""
        stamp = Stamp(log_.principal, log_.store_id, utcnow())
        hold_id = log_.sv_hold_id
        if log_.step == SagaStep.SV_HOLDING and not hold_id:
            found = await self._find_hold(log_)
            hold_id = found.hold_id if found is not None else ""
        if hold_id:
            await self.cards.void(
                request_id=_cards_request(log_, "void"), hold_id=hold_id, reason="checkout undone"
            )
        if log_.plan.get("coupon_ids"):
            await self.campaigns.release(
                reservation_id=log_.plan["reservation_id"], reason="checkout undone"
            )
        async with self.db.transaction() as session:
            if log_.points_hold_id:
                await points_ledger.release_hold(session, log_.points_hold_id, stamp=stamp)
            await store.advance_checkout(
                session,
                log_.checkout_id,
                SagaStep.ABORTED,
                stamp.at,
                error=_error_record(error),
                lease_until=stamp.at,
            )
        log.info("checkout undone", checkout_id=log_.checkout_id, reason=error.reason)

    async def _find_hold(self, log_: CheckoutLog) -> HeldValue | None:
        """Whether cards made the hold this checkout asked for: asked again
        with the same request id and no PIN, cards returns the hold it made,
        as it stands (captured, when it was captured as it was made); a card
        with a PIN refuses when there is none; a card without one makes it
        now, not captured (undo voids it at once)."""
        try:
            held = await self.cards.hold(
                request_id=_cards_request(log_, "hold"),
                card_id=log_.card_id,
                amount=money(log_.plan["currency"], int(log_.plan["tenders"]["stored_value"])),
                pin="",
                reference=log_.checkout_id,
                ttl=HOLD_TTL,
            )
        except (FailedPrecondition, InvalidArgument, NotFound):
            return None
        return held

    @_step("checkout commit")
    async def _commit(
        self, log_: CheckoutLog, *, stored_value_left: int | None = None
    ) -> pb.Receipt:
        """From SV_CAPTURED: the one transaction that records the sale.
        ``stored_value_left``: the card's stored value for the receipt, as
        cards said it at the capture (or, without stored value paying, when
        it resolved the card); asked of cards when unknown."""
        plan = log_.plan
        tenders = plan["tenders"]
        currency = plan["currency"]
        if log_.card_id and stored_value_left is None:
            try:
                stored_value_left = await self.cards.available(log_.card_id)
            except Unavailable:
                stored_value_left = None  # the receipt goes without it
        sale_id = log_.sale_id or rules.new_sale_id()
        if plan.get("coupon_ids"):
            # The coupons go with the sale; idempotent, so a retry after a
            # crash is harmless.
            await self.campaigns.commit(
                reservation_id=plan["reservation_id"],
                sale_id=sale_id,
                total=money(currency, int(plan["total"])),
            )
        now = utcnow()
        stamp = Stamp(log_.principal, log_.store_id, now)
        member_id = log_.member_id
        # The sale's events (points spent and accrued, tier changed, sale
        # recorded) are written together, in one round trip.
        async with self.db.direct_transaction() as session, outbox.together(session):
            # First, COMMITTED: the log's row is held to the end of the
            # transaction, which records the sale or leaves the log as it was.
            current = await store.commit_checkout(
                session,
                log_.checkout_id,
                sale_id=sale_id,
                sv_hold_id=log_.sv_hold_id,
                sv_movement_id=log_.sv_movement_id,
                now=now,
            )
            if current is None:
                # Committed before (by a driver that took it over, say).
                committed = await store.get_checkout(session, log_.checkout_id)
                assert committed is not None and committed.receipt is not None
                return pb.Receipt.FromString(committed.receipt)
            # The accrual and the tier's activity keyed by this sale are
            # written only here, with COMMITTED, and the log's row is held:
            # a log not yet committed means neither exists, so their replay
            # checks need not be read (their unique keys stay the backstop).
            unseen = True
            spent = 0
            settled = None
            if current.points_hold_id:
                spent, settled = await points_ledger.spend_hold_settled(
                    session, current.points_hold_id, reference=sale_id, stamp=stamp
                )
            earned = int(plan["earn"]["points"])
            progress = None
            balance = 0
            if member_id:
                after_accrual: int | None = None
                if earned:
                    # What the member can spend afterwards comes with the
                    # accrual: the account is not read again for the receipt.
                    _, after_accrual = await points_ledger.accrue_with_available(
                        session,
                        member_id,
                        earned,
                        source=points_ledger.LotSource.PURCHASE,
                        reference=sale_id,
                        stamp=stamp,
                        request_id=f"sale:{sale_id}",
                        unseen_request=unseen,
                        settled=settled,
                    )
                progress = await tiers.after_sale(
                    session,
                    member_id,
                    sale_id=sale_id,
                    spend_minor_units=int(plan["total"]) - int(tenders.get("points_value", 0)),
                    business_day=dt.date.fromisoformat(plan["business_day"]),
                    stamp=stamp,
                    unseen_sale=unseen,
                )
                if after_accrual is not None:
                    balance = after_accrual
                else:
                    balance = await points_ledger.available(session, member_id, at=stamp.at)
            receipt = receipt_to_proto(
                plan,
                sale_id=sale_id,
                checkout_id=log_.checkout_id,
                sv_movement_id=current.sv_movement_id,
                points_spent=spent,
                points_balance=balance,
                stored_value_left=stored_value_left,
                progress=progress,
                stamp=stamp,
            )
            await self._record_sale(session, plan, receipt, stamp, spent)
            await events.publish(
                session,
                events.SALE_RECORDED,
                events_pb2.SaleRecorded(
                    sale_id=sale_id,
                    member_id=member_id,
                    card_id=log_.card_id,
                    store_id=plan["store_id"],
                    terminal_id=plan["terminal_id"],
                    gross=money(currency, int(plan["gross"])),
                    discount=money(currency, int(plan["discount"])),
                    total=money(currency, int(plan["total"])),
                    points_earned=earned,
                    points_spent=spent,
                    categories=sorted(
                        {line["category"] for line in plan["lines"] if line["category"]}
                    ),
                    line_count=len(plan["lines"]),
                    business_day=business_day_proto(plan["business_day"]),
                    stamp=stamp_proto(stamp),
                ),
            )
        self._crash_point(SagaStep.COMMITTED)
        return receipt

    @staticmethod
    async def _record_sale(
        session: Executor, plan: dict[str, Any], receipt: pb.Receipt, stamp: Stamp, spent: int
    ) -> None:
        tenders = plan["tenders"]
        await store.insert_sale(
            session,
            SaleRecord(
                sale_id=receipt.sale_id,
                checkout_id=receipt.checkout_id,
                store_id=plan["store_id"],
                terminal_id=plan["terminal_id"],
                member_id=plan["member_id"],
                card_id=plan["card_id"],
                currency=plan["currency"],
                gross=int(plan["gross"]),
                discount=int(plan["discount"]),
                total=int(plan["total"]),
                points_earned=int(plan["earn"]["points"]),
                points_spent=spent,
                points_reversed=0,
                refunded=0,
                state=SaleState.COMPLETED,
                business_day=dt.date.fromisoformat(plan["business_day"]),
                sold_at=stamp.at,
                principal=stamp.principal,
                receipt=receipt.SerializeToString(),
            ),
        )
        await store.insert_lines(
            session,
            receipt.sale_id,
            [
                store.LineRecord(
                    line_no=line["line_no"],
                    sku=line["sku"],
                    category=line["category"],
                    quantity=line["quantity"],
                    unit_price=line["unit_price"],
                    net=line["net"],
                    quantity_refunded=0,
                )
                for line in plan["lines"]
            ],
        )
        paid = {
            TenderKind.STORED_VALUE: int(tenders.get("stored_value", 0)),
            TenderKind.POINTS: int(tenders.get("points_value", 0)),
            TenderKind.CASH: int(tenders.get("cash", 0)),
            TenderKind.BANK_CARD: int(tenders.get("bank_card", 0)),
        }
        movement = next(
            (t.movement_id for t in receipt.tenders if t.kind == pb.TENDER_KIND_STORED_VALUE), ""
        )
        await store.insert_tenders(
            session,
            receipt.sale_id,
            [
                store.TenderRecord(
                    kind=kind,
                    amount=amount,
                    points=int(tenders.get("points", 0)) if kind == TenderKind.POINTS else 0,
                    movement_id=movement if kind == TenderKind.STORED_VALUE else "",
                    refunded_amount=0,
                    refunded_points=0,
                )
                for kind, amount in paid.items()
                if amount or (kind == TenderKind.POINTS and spent)
            ],
        )

    # --- recovery ----------------------------------------------------------------

    async def recover(self) -> int:
        """Finishes or undoes every checkout and refund whose driver went
        away (a crash, a restart); returns how many were handled."""
        handled = 0
        now = utcnow()
        async with self.db.sessions() as session:
            lapsed = await store.lapsed_checkouts(session, now, RECOVERY_BATCH)
            lapsed_refunds = await store.lapsed_refunds(session, now, RECOVERY_BATCH)
        for checkout_id in lapsed:
            async with self.db.single_statement() as session:
                claimed = await store.claim_checkout(
                    session, checkout_id, now=utcnow(), until=utcnow() + LEASE
                )
            if not claimed:
                continue
            try:
                found = await self._hold_of(await self._reload(checkout_id))
                if found.step in rules.PAST_NO_RETURN:
                    await self._commit(found)
                elif await self._captured(found):
                    # Captured, the capture not yet recorded: complete it.
                    await self._drive(found, pin=None)
                else:
                    await self._undo(
                        found,
                        Unavailable("the checkout was interrupted", reason="CHECKOUT_INTERRUPTED"),
                    )
                handled += 1
            except ServiceError as error:
                log.warning(
                    "checkout recovery will retry", checkout_id=checkout_id, reason=error.reason
                )
        for refund_id in lapsed_refunds:
            async with self.db.transaction() as session:
                claimed = await store.claim_refund(
                    session, refund_id, now=utcnow(), until=utcnow() + LEASE
                )
            if not claimed:
                continue
            try:
                await self._finish_refund(refund_id)
                handled += 1
            except ServiceError as error:
                log.warning("refund recovery will retry", refund_id=refund_id, reason=error.reason)
        return handled

    # --- refunds and voids --------------------------------------------------------

    async def refund(
        self,
        *,
        sale_id: str,
        request_id: str,
        request_hash: str,
        lines: list[tuple[int, int]],
        reason: str,
        void: bool,
        caller: Caller,
        may_refund: Callable[[SaleRecord], None],
    ) -> pb.RefundReceipt:
        async with self.db.sessions() as session:
            found = await store.refund_by_request(session, request_id)
        if found is not None:
            if found.request_hash != request_hash:
                raise InvalidArgument(
                    [FieldViolation("request_id", "already used for a different request")],
                    message="this request_id was already used with a different payload",
                    reason="IDEMPOTENCY_KEY_REUSED",
                )
            return await self._refund_answer(found)
        now = utcnow()
        refund_id = rules.new_refund_id()
        # The store's time zone is learnt before the transaction: learning it
        # may write, and a transaction inside a transaction would wait for
        # itself on SQLite.
        async with self.db.sessions() as session:
            known = await store.get_sale(session, sale_id)
        if known is None:
            raise sale_not_found(sale_id)
        time_zone = (await self.store_facts(known.store_id)).time_zone
        async with self.db.transaction() as session:
            sale = await store.get_sale(session, sale_id, for_update=True)
            if sale is None:
                raise sale_not_found(sale_id)
            may_refund(sale)
            if sale.state == SaleState.VOIDED:
                raise FailedPrecondition("this sale was voided", reason="SALE_VOIDED")
            if void:
                if sale.refunded:
                    raise FailedPrecondition(
                        "a sale with a refund cannot be voided", reason="SALE_ALREADY_REFUNDED"
                    )
                if rules.business_day(now, time_zone) != sale.business_day:
                    raise FailedPrecondition(
                        "a sale can be voided only on its own business day; refund it instead",
                        reason="VOID_TOO_LATE",
                    )
            sold = await store.lines_of(session, sale_id, for_update=True)
            tenders = await store.tenders_of(session, sale_id)
            plan = rules.plan_refund(
                [rules.SoldLine(s.line_no, s.quantity, s.net, s.quantity_refunded) for s in sold],
                lines,
                rules.SoldTenders(
                    paid={t.kind: t.amount for t in tenders},
                    refunded={t.kind: t.refunded_amount for t in tenders},
                    points=next((t.points for t in tenders if t.kind == TenderKind.POINTS), 0),
                    points_refunded=next(
                        (t.refunded_points for t in tenders if t.kind == TenderKind.POINTS), 0
                    ),
                ),
                total=sale.total,
                refunded_before=sale.refunded,
                points_earned=sale.points_earned,
                points_reversed_before=sale.points_reversed,
            )
            for line_no, quantity in plan.lines:
                if not await store.take_refunded_quantity(session, sale_id, line_no, quantity):
                    raise Aborted(
                        "another refund of this sale came first; try again",
                        reason="CONCURRENT_REFUND",
                    )
            await store.insert_refund(
                session,
                RefundLog(
                    refund_id=refund_id,
                    request_id=request_id,
                    request_hash=request_hash,
                    sale_id=sale_id,
                    step=SagaStep.STARTED,
                    is_void=void,
                    plan={
                        "lines": [list(pair) for pair in plan.lines],
                        "amount": plan.amount,
                        "by_tender": {k.value: a for k, a in plan.by_tender.items()},
                        "points": plan.points,
                        "points_to_reverse": plan.points_to_reverse,
                        "whole_sale": plan.whole_sale,
                        "member_id": sale.member_id,
                        "currency": sale.currency,
                        "business_day": sale.business_day.isoformat(),
                        "time_zone": time_zone,
                        "sv_movement_id": next(
                            (t.movement_id for t in tenders if t.kind == TenderKind.STORED_VALUE),
                            "",
                        ),
                        "coupons": _used_coupons(sale),
                    },
                    sv_movement_id="",
                    reason=reason,
                    receipt=None,
                    principal=caller.principal,
                    store_id=caller.store_id,
                    created_at=now,
                ),
                lease_until=now + LEASE,
            )
        return await self._finish_refund(refund_id)

    async def _refund_answer(self, found: RefundLog) -> pb.RefundReceipt:
        if found.step == SagaStep.COMMITTED and found.receipt is not None:
            return pb.RefundReceipt.FromString(found.receipt)
        now = utcnow()
        async with self.db.transaction() as session:
            claimed = await store.claim_refund(session, found.refund_id, now=now, until=now + LEASE)
        if not claimed:
            raise Aborted(
                "this refund is being processed; send it again in a moment",
                reason="REFUND_IN_PROGRESS",
                retry_after_seconds=1.0,
            )
        return await self._finish_refund(found.refund_id)

    async def _finish_refund(self, refund_id: str) -> pb.RefundReceipt:
        async with self.db.sessions() as session:
            found = await store.get_refund(session, refund_id)
        assert found is not None
        plan = found.plan
        currency = plan["currency"]
        sv_back = int(plan["by_tender"].get(TenderKind.STORED_VALUE.value, 0))
        if found.step == SagaStep.STARTED:
            movement_id = ""
            if sv_back:
                try:
                    movement_id = await self.cards.refund(
                        request_id=f"refund:{refund_id}:sv",
                        movement_id=plan["sv_movement_id"],
                        amount=money(currency, sv_back),
                        reason=found.reason,
                    )
                except Unavailable:
                    raise Unavailable(
                        "the refund is being completed; send it again for the receipt",
                        reason="REFUND_COMPLETING",
                        retry_after_seconds=2.0,
                    ) from None
            if plan.get("coupons"):
                # Coupons go back to the wallet by their template's policy.
                await self.campaigns.restore(
                    sale_id=found.sale_id,
                    refund_id=refund_id,
                    whole_sale=bool(plan["whole_sale"]),
                )
            now = utcnow()
            async with self.db.transaction() as session:
                await store.advance_refund(
                    session,
                    refund_id,
                    SagaStep.SV_REFUNDED,
                    now,
                    sv_movement_id=movement_id,
                    lease_until=now + LEASE,
                )
            self._crash_point(SagaStep.SV_REFUNDED)
            async with self.db.sessions() as session:
                found = await store.get_refund(session, refund_id)
            assert found is not None
        return await self._commit_refund(found)

    async def _commit_refund(self, found: RefundLog) -> pb.RefundReceipt:
        plan = found.plan
        now = utcnow()
        stamp = Stamp(found.principal, found.store_id, now)
        member_id = plan["member_id"]
        async with self.db.transaction() as session:
            current = await store.get_refund(session, found.refund_id)
            assert current is not None
            if current.step == SagaStep.COMMITTED and current.receipt is not None:
                return pb.RefundReceipt.FromString(current.receipt)
            sale = await store.get_sale(session, found.sale_id, for_update=True)
            assert sale is not None
            returned, reversed_, not_reversed = 0, 0, 0
            if member_id:
                if plan["points"]:
                    await points_ledger.return_spent(
                        session,
                        member_id,
                        int(plan["points"]),
                        sale_id=sale.sale_id,
                        stamp=stamp,
                        request_id=f"refund:{found.refund_id}:return",
                    )
                    returned = int(plan["points"])
                if plan["points_to_reverse"]:
                    reversed_, not_reversed = await points_ledger.reverse_earned(
                        session,
                        member_id,
                        int(plan["points_to_reverse"]),
                        sale_id=sale.sale_id,
                        stamp=stamp,
                        request_id=f"refund:{found.refund_id}:reverse",
                    )
                await tiers.after_refund(
                    session,
                    member_id,
                    sale_id=sale.sale_id,
                    refund_id=found.refund_id,
                    spend_minor_units=-(
                        int(plan["amount"]) - int(plan["by_tender"].get(TenderKind.POINTS.value, 0))
                    ),
                    business_day=rules.business_day(now, plan["time_zone"]),
                    stamp=stamp,
                )
            for kind, amount in plan["by_tender"].items():
                await store.add_tender_refund(
                    session,
                    sale.sale_id,
                    TenderKind(kind),
                    amount=int(amount),
                    points=returned if kind == TenderKind.POINTS.value else 0,
                )
            refunded = sale.refunded + int(plan["amount"])
            state = (
                SaleState.VOIDED
                if found.is_void
                else SaleState.REFUNDED
                if plan["whole_sale"]
                else SaleState.PARTLY_REFUNDED
            )
            await store.update_sale(
                session,
                sale.sale_id,
                refunded=refunded,
                points_reversed=sale.points_reversed + int(plan["points_to_reverse"]),
                state=state,
            )
            receipt = refund_receipt_to_proto(
                found,
                sv_movement_id=current.sv_movement_id,
                points_returned=returned,
                points_reversed=reversed_,
                points_not_reversed=not_reversed,
                stamp=stamp,
            )
            if found.is_void:
                await events.publish(
                    session,
                    events.SALE_VOIDED,
                    events_pb2.SaleVoided(
                        sale_id=sale.sale_id,
                        member_id=member_id,
                        store_id=sale.store_id,
                        amount=money(sale.currency, int(plan["amount"])),
                        stamp=stamp_proto(stamp),
                    ),
                )
            else:
                await events.publish(
                    session,
                    events.SALE_REFUNDED,
                    events_pb2.SaleRefunded(
                        sale_id=sale.sale_id,
                        refund_id=found.refund_id,
                        member_id=member_id,
                        store_id=sale.store_id,
                        amount=money(sale.currency, int(plan["amount"])),
                        points_reversed=reversed_,
                        points_returned=returned,
                        whole_sale=bool(plan["whole_sale"]),
                        stamp=stamp_proto(stamp),
                    ),
                )
            await store.advance_refund(
                session,
                found.refund_id,
                SagaStep.COMMITTED,
                now,
                receipt=receipt.SerializeToString(),
                lease_until=now,
            )
        return receipt


_TENDER_KINDS = {
    pb.TENDER_KIND_STORED_VALUE: TenderKind.STORED_VALUE,
    pb.TENDER_KIND_POINTS: TenderKind.POINTS,
    pb.TENDER_KIND_CASH: TenderKind.CASH,
    pb.TENDER_KIND_BANK_CARD: TenderKind.BANK_CARD,
}


def _used_coupons(sale: SaleRecord) -> bool:
    receipt = pb.Receipt.FromString(sale.receipt)
    return any(d.source == "COUPON" for line in receipt.lines for d in line.discounts)


def _recall(memo: dict[str, tuple[float, T]], key: str) -> T | None:
    kept = memo.get(key)
    return kept[1] if kept is not None and kept[0] > time.monotonic() else None


def _remember(memo: dict[str, tuple[float, T]], key: str, value: T) -> None:
    if len(memo) >= FACTS_MEMO_SIZE:
        memo.clear()
    memo[key] = (time.monotonic() + FACTS_MEMO_SECONDS, value)


def sale_not_found(sale_id: str) -> NotFound:
    return NotFound("no sale with this id", reason="SALE_NOT_FOUND", metadata={"sale_id": sale_id})


def _in_progress(checkout_id: str) -> Aborted:
    return Aborted(
        "this checkout is being processed; send it again in a moment",
        reason="CHECKOUT_IN_PROGRESS",
        metadata={"checkout_id": checkout_id},
        retry_after_seconds=1.0,
    )
