"""The stored-value gRPC edge: authorisation, proto <-> domain, reading
the policy. The rules are in domain/stored_value.py; the writes in
ledger.py."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Principal, Role, current_principal
from chassis.db import is_unique_violation, utcnow
from chassis.direct import Executor
from chassis.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from chassis.grpcserver import Context
from chassis.idempotency import check_request_id, request_fingerprint, run_idempotent
from chassis.paging import (
    decode_token,
    encode_token,
    newest_first_after,
    newest_first_token,
    page_size,
)
from chassis.service import ServiceContext
from chassis.spreadsheets import XLSX_CONTENT_TYPE, chunks
from cornucopia.cards.v1 import stored_value_pb2 as pb
from cornucopia.cards.v1 import stored_value_pb2_grpc
from cornucopia.common.v1 import money_pb2
from services.cards import ledger
from services.cards.batches import BatchRecharges
from services.cards.convert_stored_value import (
    balance_to_proto,
    bonus_rule_from_proto,
    bonus_rule_to_proto,
    channel_of,
    hold_to_proto,
    money,
    movement_response,
    movement_to_proto,
    policy_from_proto,
    policy_to_proto,
)
from services.cards.domain import stored_value as rules
from services.cards.domain.cards import CardState
from services.cards.domain.cards import Role as CardRole
from services.cards.domain.stored_value import Channel, MovementKind, Policy
from services.cards.payment_pin import check_payment_pin_in
from services.cards.server.programs import program_not_found
from services.cards.statements import statement_workbook
from services.cards.store import cards as card_store
from services.cards.store import programs as program_store
from services.cards.store import stored_value as store
from services.cards.store import stored_value_rules as rule_store
from services.cards.store.cards import CardRecord, Stamp
from services.cards.store.programs import ProgramRecord

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
# The checkout (a service) and the staff at a till take payments.
PAYING_ROLES = (*STAFF_ROLES, Role.SERVICE)
# Channels a Recharge call may name; partners and batches have their own.
_CALLER_CHANNELS = {
    Channel.STORE_TERMINAL: tuple(STAFF_ROLES),
    Channel.BANK_CARD: tuple(STAFF_ROLES),
    Channel.ONLINE_SELF_SERVICE: (Role.SERVICE,),
}


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def _stamp(principal: Principal, now: dt.datetime) -> Stamp:
    return Stamp(principal.subject, principal.store_id, now)


def _amount(message: money_pb2.Money, policy: Policy, field: str = "amount") -> int:
    return rules.check_amount(
        message.minor_units, message.currency_code.strip().upper(), policy, field
    )


def _fingerprint(request: pb.HoldStoredValueRequest | pb.DebitRequest) -> str:
    """The request's identity without its PIN (a stored hash of a six-digit
    PIN would be a cheap way back to it) and, for a hold, without whether it
    is captured at once: the hold a request id made is found by asking for
    it again either way."""
    copy = type(request).FromString(request.SerializeToString())
    copy.pin = ""
    if isinstance(copy, pb.HoldStoredValueRequest):
        copy.capture = False
    return request_fingerprint(copy)


def _time(
    message: pb.ListMovementsRequest | pb.ExportStatementRequest,
) -> tuple[dt.datetime | None, dt.datetime | None]:
    start = message.start_time.ToDatetime(dt.UTC) if message.HasField("start_time") else None
    end = message.end_time.ToDatetime(dt.UTC) if message.HasField("end_time") else None
    if start and end and end <= start:
        raise InvalidArgument([FieldViolation("end_time", "after start_time")])
    return start, end


async def available_money(session: AsyncSession, account_id: str) -> money_pb2.Money | None:
    """The account's available stored value as a reply carries it (what a
    till prints on the receipt without asking GetBalance); None without an
    account."""
    account = await store.get_account(session, account_id) if account_id else None
    if account is None:
        return None
    return money(account.currency, account.balances.available)


class StoredValueServicer(stored_value_pb2_grpc.StoredValueServiceServicer):
    def __init__(self, ctx: ServiceContext, batches: BatchRecharges) -> None:
        self.db = ctx.db
        self.batches = batches

    # --- helpers ---------------------------------------------------------

    @staticmethod
    async def _card(session: Executor, card_id: str) -> CardRecord:
        card = await card_store.get_card(session, card_id)
        if card is None:
            raise NotFound(
                "no card with this id", reason="CARD_NOT_FOUND", metadata={"card_id": card_id}
            )
        return card

    @staticmethod
    async def _program(session: Executor, program_id: str) -> ProgramRecord:
        """The program's settings, as kept for a while: they never change."""
        program = await program_store.program_settings(session, program_id)
        if program is None:
            raise program_not_found(program_id)
        return program

    async def _policy(self) -> Policy:
        async with self.db.sessions() as session:
            return (await rule_store.current_policy(session)).policy

    async def _balance(
        self, session: AsyncSession, account_id: str, card: CardRecord | None, policy: Policy
    ) -> pb.Balance:
        account = await store.get_account(session, account_id)
        balances = account.balances if account else rules.Balances()
        room = await ledger.card_room(session, card, policy, utcnow()) if card else None
        return balance_to_proto(
            account_id,
            account.currency if account else policy.currency,
            balances,
            closed=bool(account and account.closed_at),
            today=room.today if room else None,
            this_month=room.this_month if room else None,
        )

    # --- balances ----------------------------------------------------------

    async def GetBalance(self, request: pb.GetBalanceRequest, context: Context) -> pb.Balance:
        current_principal().require_role(*READING_ROLES)
        if bool(request.card_id.strip()) == bool(request.account_id.strip()):
            raise InvalidArgument([FieldViolation("card_id", "give a card_id or an account_id")])
        async with self.db.sessions() as session:
            policy = (await rule_store.current_policy(session)).policy
            card = None
            account_id = request.account_id.strip()
            if request.card_id.strip():
                card = await self._card(session, request.card_id.strip())
                account_id = card.account_id
            elif not await card_store.cards_of(session, account_id=account_id, limit=1):
                raise NotFound(
                    "no account with this id",
                    reason="ACCOUNT_NOT_FOUND",
                    metadata={"account_id": account_id},
                )
            return await self._balance(session, account_id, card, policy)

    # --- recharge ------------------------------------------------------------

    async def Recharge(self, request: pb.RechargeRequest, context: Context) -> pb.RechargeResponse:
        principal = current_principal()
        principal.require_role(*PAYING_ROLES)
        check_request_id(request.request_id)
        card_id = _required(request.card_id, "card_id")
        channel = channel_of(request.channel)
        allowed = _CALLER_CHANNELS.get(channel)
        if allowed is None:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "channel",
                        "partner recharges come through PartnerCardsService and enterprise "
                        "ones through StartBatchRecharge",
                    )
                ]
            )
        principal.require_role(*allowed)
        reference = rules.check_text(
            request.payment_reference,
            "payment_reference",
            rules.MAX_REFERENCE_LENGTH,
            required=channel in rules.REFERENCED_CHANNELS,
        )
        note = rules.check_text(request.note, "note", rules.MAX_NOTE_LENGTH)
        policy = await self._policy()
        amount = _amount(request.amount, policy)
        command = ledger.Request(
            request.request_id, request_fingerprint(request), _stamp(principal, utcnow())
        )
        async with self.db.transaction() as session:
            card = await self._card(session, card_id)
            movement = await ledger.recharge(
                session,
                card,
                await self._program(session, card.program_id),
                policy,
                command,
                amount=amount,
                channel=channel,
                operator_id=principal.subject,
                reference=reference,
                note=note,
            )
        done = movement_response(movement)
        return pb.RechargeResponse(movement=done.movement, balance=done.balance)

    async def QuoteRecharge(
        self, request: pb.QuoteRechargeRequest, context: Context
    ) -> pb.QuoteRechargeResponse:
        current_principal().require_role(*READING_ROLES)
        card_id = _required(request.card_id, "card_id")
        channel = channel_of(request.channel)
        policy = await self._policy()
        amount = _amount(request.amount, policy)
        async with self.db.sessions() as session:
            card = await self._card(session, card_id)
            rule, bonus = await ledger.quote(session, card.program_id, amount, channel, utcnow())
        return pb.QuoteRechargeResponse(
            bonus=money(policy.currency, bonus),
            bonus_rule_id=rule.rule_id if rule else "",
            bonus_rule_name=rule.name if rule else "",
        )

    # --- paying ------------------------------------------------------------------

    async def HoldStoredValue(
        self, request: pb.HoldStoredValueRequest, context: Context
    ) -> pb.Hold:
        principal = current_principal()
        principal.require_role(*PAYING_ROLES)
        check_request_id(request.request_id)
        card_id = _required(request.card_id, "card_id")
        reference = rules.check_text(request.reference, "reference", rules.MAX_REFERENCE_LENGTH)
        policy = await self._policy()
        amount = _amount(request.amount, policy)
        ttl = rules.hold_ttl(policy, request.ttl.ToTimedelta() if request.HasField("ttl") else None)
        now = utcnow()
        command = ledger.Request(request.request_id, _fingerprint(request), _stamp(principal, now))

        async def hold(unseen_request: bool) -> ledger.HoldStanding:
            # One unit of work: the replay check, the PIN and the hold (and
            # its capture). A wrong PIN's try is committed without the
            # hold, then refused.
            async with self.db.direct_transaction() as session:
                card = await self._card(session, card_id)
                refused = await self._check_pin(
                    session, MovementKind.HOLD, command, card, request.pin
                )
                if refused is None:
                    return await ledger.hold(
                        session,
                        card,
                        await self._program(session, card.program_id),
                        policy,
                        command,
                        amount=amount,
                        ttl=ttl,
                        reference=reference,
                        capture=request.capture,
                        unseen_request=unseen_request,
                    )
            raise refused

        try:
            # A request is new far more often than it is sent again: its
            # movement's unique request id stands in for the replay check.
            done = await hold(unseen_request=True)
        except IntegrityError as exc:
            if not is_unique_violation(exc):
                raise
            done = await hold(unseen_request=False)
        reply = hold_to_proto(done.hold)
        if request.capture:
            reply.available_after.CopyFrom(money(done.currency, done.available))
        return reply

    @staticmethod
    async def _check_pin(
        session: Executor,
        kind: MovementKind,
        command: ledger.Request,
        card: CardRecord,
        pin: str,
    ) -> FailedPrecondition | None:
        """The payment PIN, in the payment's unit of work, unless this
        request was already carried out: a retry must not be asked for the
        PIN again (nor count as a try). Returns a wrong PIN's refusal."""
        if card.pin_hash is None and card.state == CardState.ACTIVE:
            return None  # nothing to check, replay or not
        done = await store.movement_by_request(session, kind, command.request_id)
        if done is not None and done.request_hash == command.request_hash:
            return None
        return await check_payment_pin_in(session, card, pin, command.stamp.at)

    async def CaptureHold(self, request: pb.CaptureHoldRequest, context: Context) -> pb.Hold:
        principal = current_principal()
        principal.require_role(*PAYING_ROLES)
        check_request_id(request.request_id)
        hold_id = _required(request.hold_id, "hold_id")
        amount = None
        if request.HasField("amount"):
            amount = _amount(request.amount, await self._policy())
        command = ledger.Request(
            request.request_id, request_fingerprint(request), _stamp(principal, utcnow())
        )
        async with self.db.transaction() as session:
            done = await ledger.capture(session, hold_id, command, amount=amount)
        reply = hold_to_proto(done.hold)
        reply.available_after.CopyFrom(money(done.currency, done.available))
        return reply

    async def VoidHold(self, request: pb.VoidHoldRequest, context: Context) -> pb.Hold:
        principal = current_principal()
        principal.require_role(*PAYING_ROLES)
        check_request_id(request.request_id)
        hold_id = _required(request.hold_id, "hold_id")
        reason = rules.check_text(request.reason, "reason", rules.MAX_NOTE_LENGTH)
        command = ledger.Request(
            request.request_id, request_fingerprint(request), _stamp(principal, utcnow())
        )
        async with self.db.transaction() as session:
            held = await ledger.void(session, hold_id, command, reason=reason)
        return hold_to_proto(held)

    async def GetHold(self, request: pb.GetHoldRequest, context: Context) -> pb.Hold:
        current_principal().require_role(*READING_ROLES)
        hold_id = _required(request.hold_id, "hold_id")
        async with self.db.sessions() as session:
            held = await store.get_hold(session, hold_id)
        if held is None:
            raise ledger.hold_not_found(hold_id)
        return hold_to_proto(held)

    async def Debit(self, request: pb.DebitRequest, context: Context) -> pb.MovementResponse:
        principal = current_principal()
        principal.require_role(*PAYING_ROLES)
        check_request_id(request.request_id)
        card_id = _required(request.card_id, "card_id")
        reference = rules.check_text(request.reference, "reference", rules.MAX_REFERENCE_LENGTH)
        policy = await self._policy()
        amount = _amount(request.amount, policy)
        now = utcnow()
        command = ledger.Request(request.request_id, _fingerprint(request), _stamp(principal, now))
        async with self.db.transaction() as session:
            card = await self._card(session, card_id)
            refused = await self._check_pin(session, MovementKind.DEBIT, command, card, request.pin)
            if refused is None:
                movement = await ledger.debit(
                    session,
                    card,
                    await self._program(session, card.program_id),
                    policy,
                    command,
                    amount=amount,
                    reference=reference,
                )
        if refused is not None:
            raise refused
        return movement_response(movement)

    async def Refund(self, request: pb.RefundRequest, context: Context) -> pb.MovementResponse:
        principal = current_principal()
        principal.require_role(*PAYING_ROLES)
        check_request_id(request.request_id)
        movement_id = _required(request.movement_id, "movement_id")
        reason = rules.check_text(request.reason, "reason", rules.MAX_NOTE_LENGTH)
        amount = None
        if request.HasField("amount"):
            amount = _amount(request.amount, await self._policy())
        command = ledger.Request(
            request.request_id, request_fingerprint(request), _stamp(principal, utcnow())
        )
        async with self.db.transaction() as session:
            movement = await ledger.refund(
                session, movement_id, command, amount=amount, reason=reason
            )
        return movement_response(movement)

    # --- statements ----------------------------------------------------------------

    async def _statement_scope(
        self, session: AsyncSession, card_id: str, account_id: str
    ) -> tuple[str, str, tuple[MovementKind, ...]]:
        """(account_id, card_id, account-wide kinds) of a statement."""
        if bool(card_id) == bool(account_id):
            raise InvalidArgument([FieldViolation("card_id", "give a card_id or an account_id")])
        if not card_id:
            return account_id, "", ()
        card = await self._card(session, card_id)
        wide = ledger.ACCOUNT_WIDE_KINDS if card.role != CardRole.SUPPLEMENTARY else ()
        return card.account_id, card.card_id, wide

    async def ListMovements(
        self, request: pb.ListMovementsRequest, context: Context
    ) -> pb.ListMovementsResponse:
        current_principal().require_role(*READING_ROLES)
        start, end = _time(request)
        size = page_size(request.page_size)
        key = decode_token(request.page_token) or {}
        try:
            before = int(key["seq"]) if "seq" in key else None
        except (TypeError, ValueError):
            raise InvalidArgument(
                [FieldViolation("page_token", "not a token this service issued")]
            ) from None
        async with self.db.sessions() as session:
            account_id, card_id, wide = await self._statement_scope(
                session, request.card_id.strip(), request.account_id.strip()
            )
            found = await store.movements(
                session,
                account_id=account_id,
                card_id=card_id,
                include_account_kinds=wide,
                start=start,
                end=end,
                before_seq=before,
                limit=size + 1,
            )
        response = pb.ListMovementsResponse(movements=[movement_to_proto(m) for m in found[:size]])
        if len(found) > size:
            response.next_page_token = encode_token({"seq": found[size - 1].seq})
        return response

    async def ExportStatement(
        self, request: pb.ExportStatementRequest, context: Context
    ) -> AsyncIterator[pb.ExportStatementChunk]:
        current_principal().require_role(*READING_ROLES)
        start, end = _time(request)
        async with self.db.sessions() as session:
            account_id, card_id, wide = await self._statement_scope(
                session, request.card_id.strip(), request.account_id.strip()
            )
        name, data = await statement_workbook(
            self.db,
            account_id=account_id,
            card_id=card_id,
            include_account_kinds=wide,
            start=start,
            end=end,
        )
        for index, piece in enumerate(chunks(data)):
            chunk = pb.ExportStatementChunk(data=piece)
            if index == 0:
                chunk.file_name = name
                chunk.content_type = XLSX_CONTENT_TYPE
            yield chunk

    # --- policy and bonus rules ------------------------------------------------------

    async def GetStoredValuePolicy(
        self, request: pb.GetStoredValuePolicyRequest, context: Context
    ) -> pb.StoredValuePolicy:
        current_principal().require_role(*READING_ROLES)
        async with self.db.sessions() as session:
            return policy_to_proto(await rule_store.get_policy(session))

    async def UpdateStoredValuePolicy(
        self, request: pb.UpdateStoredValuePolicyRequest, context: Context
    ) -> pb.StoredValuePolicy:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        if not request.etag:
            raise InvalidArgument([FieldViolation("etag", "required: the etag last read")])
        policy = rules.check_policy(policy_from_proto(request.policy))
        stamp = _stamp(principal, utcnow())

        async def update(session: AsyncSession) -> pb.StoredValuePolicy:
            current = await rule_store.get_policy(session, for_update=True)
            if current.etag != request.etag:
                raise Aborted(
                    "the policy changed since you read it; read it again",
                    reason="ETAG_MISMATCH",
                    metadata={"etag": current.etag},
                )
            if policy.currency != current.policy.currency and await store.any_account(session):
                raise FailedPrecondition(
                    "accounts are kept in the current currency; it cannot change",
                    reason="CURRENCY_FIXED",
                    metadata={"currency_code": current.policy.currency},
                )
            await rule_store.save_policy(
                session, policy, principal=stamp.principal, store_id=stamp.store_id, now=stamp.at
            )
            return policy_to_proto(await rule_store.get_policy(session))

        return await run_idempotent(
            self.db,
            method="cards.UpdateStoredValuePolicy",
            request_id=request.request_id,
            request=request,
            response_type=pb.StoredValuePolicy,
            work=update,
        )

    async def CreateBonusRule(
        self, request: pb.CreateBonusRuleRequest, context: Context
    ) -> pb.BonusRule:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        policy = await self._policy()
        now = utcnow()
        rule = rules.check_bonus_rule(
            bonus_rule_from_proto(
                request.bonus_rule, rules.new_bonus_rule_id(), policy.currency, now
            )
        )

        async def create(session: AsyncSession) -> pb.BonusRule:
            await rule_store.insert_bonus_rule(
                session,
                rule,
                policy.currency,
                principal=principal.subject,
                store_id=principal.store_id,
                now=now,
            )
            record = await rule_store.get_bonus_rule(session, rule.rule_id)
            assert record is not None
            return bonus_rule_to_proto(record)

        return await run_idempotent(
            self.db,
            method="cards.CreateBonusRule",
            request_id=request.request_id,
            request=request,
            response_type=pb.BonusRule,
            work=create,
        )

    async def ListBonusRules(
        self, request: pb.ListBonusRulesRequest, context: Context
    ) -> pb.ListBonusRulesResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            found = await rule_store.list_bonus_rules(
                session,
                in_force_at=utcnow() if request.in_force_only else None,
                after=after,
                limit=size + 1,
            )
        response = pb.ListBonusRulesResponse(
            bonus_rules=[bonus_rule_to_proto(r) for r in found[:size]]
        )
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = newest_first_token(last.created_at, last.rule.rule_id)
        return response

    async def EndBonusRule(self, request: pb.EndBonusRuleRequest, context: Context) -> pb.BonusRule:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        rule_id = _required(request.bonus_rule_id, "bonus_rule_id")
        now = utcnow()

        async def end(session: AsyncSession) -> pb.BonusRule:
            record = await rule_store.get_bonus_rule(session, rule_id, for_update=True)
            if record is None:
                raise NotFound(
                    "no bonus rule with this id",
                    reason="BONUS_RULE_NOT_FOUND",
                    metadata={"bonus_rule_id": rule_id},
                )
            if record.rule.ends_at is None or record.rule.ends_at > now:
                await rule_store.end_bonus_rule(session, rule_id, max(now, record.rule.starts_at))
            ended = await rule_store.get_bonus_rule(session, rule_id)
            assert ended is not None
            return bonus_rule_to_proto(ended)

        return await run_idempotent(
            self.db,
            method="cards.EndBonusRule",
            request_id=request.request_id,
            request=request,
            response_type=pb.BonusRule,
            work=end,
        )

    # --- enterprise batches --------------------------------------------------------------

    async def StartBatchRecharge(
        self, request: pb.StartBatchRechargeRequest, context: Context
    ) -> pb.BatchRecharge:
        return await self.batches.start(request)

    async def GetBatchRecharge(
        self, request: pb.GetBatchRechargeRequest, context: Context
    ) -> pb.BatchRecharge:
        return await self.batches.get(request)

    async def ListBatchRechargeRows(
        self, request: pb.ListBatchRechargeRowsRequest, context: Context
    ) -> pb.ListBatchRechargeRowsResponse:
        return await self.batches.list_rows(request)
