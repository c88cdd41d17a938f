"""Stored-value domain values to protobuf and back."""

from __future__ import annotations

import datetime as dt

from google.protobuf.duration_pb2 import Duration

from chassis.errors import FieldViolation, InvalidArgument
from cornucopia.cards.v1 import stored_value_pb2 as pb
from cornucopia.common.v1 import money_pb2
from services.cards.convert import audit_stamp, timestamp
from services.cards.domain.stored_value import (
    Balances,
    BonusRule,
    Channel,
    ChannelRule,
    HoldState,
    MovementKind,
    Policy,
    SpendOrder,
)
from services.cards.store.cards import Stamp
from services.cards.store.stored_value import HoldRecord, MovementRecord
from services.cards.store.stored_value_rules import BonusRuleRecord, PolicyRecord

CHANNELS = {
    pb.RECHARGE_CHANNEL_STORE_TERMINAL: Channel.STORE_TERMINAL,
    pb.RECHARGE_CHANNEL_BANK_CARD: Channel.BANK_CARD,
    pb.RECHARGE_CHANNEL_PARTNER_CARD: Channel.PARTNER_CARD,
    pb.RECHARGE_CHANNEL_ONLINE_SELF_SERVICE: Channel.ONLINE_SELF_SERVICE,
    pb.RECHARGE_CHANNEL_ENTERPRISE_BATCH: Channel.ENTERPRISE_BATCH,
}
CHANNELS_PROTO = {v: k for k, v in CHANNELS.items()}


def channel_to_proto(channel: Channel | None) -> pb.RechargeChannel.ValueType:
    return CHANNELS_PROTO[channel] if channel else pb.RECHARGE_CHANNEL_UNSPECIFIED


SPEND_ORDERS = {
    pb.SPEND_ORDER_BONUS_FIRST: SpendOrder.BONUS_FIRST,
    pb.SPEND_ORDER_PAID_FIRST: SpendOrder.PAID_FIRST,
    pb.SPEND_ORDER_PROPORTIONAL: SpendOrder.PROPORTIONAL,
}
SPEND_ORDERS_PROTO = {v: k for k, v in SPEND_ORDERS.items()}
KINDS_PROTO = {
    MovementKind.RECHARGE: pb.MOVEMENT_KIND_RECHARGE,
    MovementKind.HOLD: pb.MOVEMENT_KIND_HOLD,
    MovementKind.CAPTURE: pb.MOVEMENT_KIND_CAPTURE,
    MovementKind.RELEASE: pb.MOVEMENT_KIND_RELEASE,
    MovementKind.DEBIT: pb.MOVEMENT_KIND_DEBIT,
    MovementKind.REFUND: pb.MOVEMENT_KIND_REFUND,
    MovementKind.PAYOUT: pb.MOVEMENT_KIND_PAYOUT,
    MovementKind.FORFEIT: pb.MOVEMENT_KIND_FORFEIT,
}
HOLD_STATES_PROTO = {
    HoldState.HELD: pb.HOLD_STATE_HELD,
    HoldState.CAPTURED: pb.HOLD_STATE_CAPTURED,
    HoldState.VOIDED: pb.HOLD_STATE_VOIDED,
    HoldState.EXPIRED: pb.HOLD_STATE_EXPIRED,
}


def money(currency: str, minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, minor_units=minor_units)


def channel_of(value: int, field: str = "channel") -> Channel:
    channel: Channel | None = CHANNELS.get(value)  # type: ignore[call-overload]
    if channel is None:
        raise InvalidArgument([FieldViolation(field, "one of the recharge channels")])
    return channel


def duration(value: dt.timedelta) -> Duration:
    message = Duration()
    message.FromTimedelta(value)
    return message


def balance_to_proto(
    account_id: str,
    currency: str,
    balances: Balances,
    *,
    closed: bool = False,
    today: int | None = None,
    this_month: int | None = None,
) -> pb.Balance:
    message = pb.Balance(
        account_id=account_id,
        available=money(currency, balances.available),
        paid=money(currency, balances.paid),
        bonus=money(currency, balances.bonus),
        held=money(currency, balances.held),
        closed=closed,
    )
    if today is not None:
        message.spendable_today.CopyFrom(money(currency, min(today, balances.available)))
    if this_month is not None:
        message.spendable_this_month.CopyFrom(money(currency, min(this_month, balances.available)))
    return message


def movement_to_proto(m: MovementRecord) -> pb.Movement:
    c = m.currency
    return pb.Movement(
        movement_id=m.movement_id,
        account_id=m.account_id,
        card_id=m.card_id,
        kind=KINDS_PROTO[m.kind],
        paid=money(c, m.change.paid),
        bonus=money(c, m.change.bonus),
        amount=money(c, m.amount),
        paid_after=money(c, m.after.paid),
        bonus_after=money(c, m.after.bonus),
        held_after=money(c, m.after.held),
        channel=channel_to_proto(m.channel),
        reference=m.reference,
        bonus_rule_id=m.bonus_rule_id,
        hold_id=m.hold_id,
        refunds_movement_id=m.refunds_movement_id,
        note=m.note,
        stamp=audit_stamp(Stamp(m.principal, m.store_id, m.at)),
    )


def movement_response(m: MovementRecord) -> pb.MovementResponse:
    """The movement and the balances right after it (the same on a replay)."""
    return pb.MovementResponse(
        movement=movement_to_proto(m), balance=balance_to_proto(m.account_id, m.currency, m.after)
    )


def hold_to_proto(h: HoldRecord) -> pb.Hold:
    c = h.currency
    message = pb.Hold(
        hold_id=h.hold_id,
        card_id=h.card_id,
        account_id=h.account_id,
        state=HOLD_STATES_PROTO[h.state],
        amount=money(c, h.funds.total),
        paid=money(c, h.funds.paid),
        bonus=money(c, h.funds.bonus),
        reference=h.reference,
        expire_time=timestamp(h.expires_at),
        held_by=audit_stamp(Stamp(h.principal, h.store_id, h.held_at)),
        capture_movement_id=h.capture_movement_id,
    )
    if h.state == HoldState.CAPTURED:
        message.captured.CopyFrom(money(c, h.captured.total))
    return message


def _optional_amount(
    message: pb.StoredValuePolicy | pb.ChannelRule | pb.BonusRule,
    name: str,
    currency: str,
    field: str,
) -> int | None:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None
    value: money_pb2.Money = getattr(message, name)
    if value.currency_code and value.currency_code != currency:
        raise InvalidArgument([FieldViolation(f"{field}.currency_code", f"must be {currency}")])
    return value.minor_units


def policy_from_proto(message: pb.StoredValuePolicy) -> Policy:
    currency = message.currency_code.strip().upper()
    channels: dict[Channel, ChannelRule] = {}
    for index, rule in enumerate(message.channels):
        field = f"policy.channels[{index}]"
        channel = channel_of(rule.channel, f"{field}.channel")
        if channel in channels:
            raise InvalidArgument([FieldViolation(f"{field}.channel", "given twice")])
        channels[channel] = ChannelRule(
            channel=channel,
            enabled=rule.enabled,
            store_ids=frozenset(s.strip() for s in rule.store_ids if s.strip()),
            operator_ids=frozenset(s.strip() for s in rule.operator_ids if s.strip()),
            min_amount=_optional_amount(rule, "min_amount", currency, f"{field}.min_amount"),
            max_amount=_optional_amount(rule, "max_amount", currency, f"{field}.max_amount"),
        )
    if message.spend_order and message.spend_order not in SPEND_ORDERS:
        raise InvalidArgument([FieldViolation("policy.spend_order", "one of the spend orders")])
    return Policy(
        currency=currency,
        spend_order=SPEND_ORDERS.get(message.spend_order, SpendOrder.BONUS_FIRST),
        channels=channels,
        max_balance=_optional_amount(message, "max_balance", currency, "policy.max_balance"),
        daily_spend_limit=_optional_amount(
            message, "daily_spend_limit", currency, "policy.daily_spend_limit"
        ),
        daily_recharge_limit=_optional_amount(
            message, "daily_recharge_limit", currency, "policy.daily_recharge_limit"
        ),
        time_zone=message.time_zone.strip() or "UTC",
        max_hold_ttl=(
            message.max_hold_ttl.ToTimedelta()
            if message.HasField("max_hold_ttl")
            else dt.timedelta(hours=24)
        ),
    )


def policy_to_proto(record: PolicyRecord) -> pb.StoredValuePolicy:
    p = record.policy
    c = p.currency
    message = pb.StoredValuePolicy(
        currency_code=c,
        spend_order=SPEND_ORDERS_PROTO[p.spend_order],
        time_zone=p.time_zone,
        max_hold_ttl=duration(p.max_hold_ttl),
        etag=record.etag,
    )
    for rule in sorted(p.channels.values(), key=lambda r: CHANNELS_PROTO[r.channel]):
        proto_rule = message.channels.add(
            channel=CHANNELS_PROTO[rule.channel],
            enabled=rule.enabled,
            store_ids=sorted(rule.store_ids),
            operator_ids=sorted(rule.operator_ids),
        )
        if rule.min_amount is not None:
            proto_rule.min_amount.CopyFrom(money(c, rule.min_amount))
        if rule.max_amount is not None:
            proto_rule.max_amount.CopyFrom(money(c, rule.max_amount))
    for name in ("max_balance", "daily_spend_limit", "daily_recharge_limit"):
        value = getattr(p, name)
        if value is not None:
            getattr(message, name).CopyFrom(money(c, value))
    if record.updated_at is not None:
        message.updated_by.CopyFrom(
            audit_stamp(Stamp(record.updated_by, record.updated_store_id, record.updated_at))
        )
    return message


def bonus_rule_from_proto(
    message: pb.BonusRule, rule_id: str, currency: str, now: dt.datetime
) -> BonusRule:
    prefix = "bonus_rule"
    channels = frozenset(
        channel_of(c, f"{prefix}.channels[{i}]") for i, c in enumerate(message.channels)
    )
    which = message.WhichOneof("bonus")
    threshold = _optional_amount(message, "threshold", currency, f"{prefix}.threshold")
    return BonusRule(
        rule_id=rule_id,
        name=message.name.strip(),
        threshold=threshold or 0,
        starts_at=(
            message.start_time.ToDatetime(dt.UTC) if message.HasField("start_time") else now
        ),
        fixed_bonus=(
            _optional_amount(message, "fixed_bonus", currency, f"{prefix}.fixed_bonus")
            if which == "fixed_bonus"
            else None
        ),
        bonus_bps=message.bonus_bps if which == "bonus_bps" else None,
        max_bonus=_optional_amount(message, "max_bonus", currency, f"{prefix}.max_bonus"),
        channels=channels,
        program_ids=frozenset(p.strip() for p in message.program_ids if p.strip()),
        ends_at=message.end_time.ToDatetime(dt.UTC) if message.HasField("end_time") else None,
    )


def bonus_rule_to_proto(record: BonusRuleRecord) -> pb.BonusRule:
    r = record.rule
    c = record.currency
    message = pb.BonusRule(
        bonus_rule_id=r.rule_id,
        name=r.name,
        threshold=money(c, r.threshold),
        channels=sorted(CHANNELS_PROTO[ch] for ch in r.channels),
        program_ids=sorted(r.program_ids),
        start_time=timestamp(r.starts_at),
        created_by=audit_stamp(
            Stamp(record.created_by, record.created_store_id, record.created_at)
        ),
    )
    if r.fixed_bonus is not None:
        message.fixed_bonus.CopyFrom(money(c, r.fixed_bonus))
    if r.bonus_bps is not None:
        message.bonus_bps = r.bonus_bps
    if r.max_bonus is not None:
        message.max_bonus.CopyFrom(money(c, r.max_bonus))
    if r.ends_at is not None:
        message.end_time.CopyFrom(timestamp(r.ends_at))
    return message
