"""The chain's stored-value policy (one row, a JSON document with an etag)
and its recharge bonus rules."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Memo, UTCDateTime
from chassis.documents import default_etag, document_table, read_document, write_document
from chassis.paging import newest_first
from services.cards.domain.stored_value import (
    BonusRule,
    Channel,
    ChannelRule,
    Policy,
    SpendOrder,
    default_policy,
)
from services.cards.store import metadata

# Until HQ sets its own, the policy of a chain in mainland China.
DEFAULT_CURRENCY = "CNY"
DEFAULT_TIME_ZONE = "Asia/Shanghai"
_POLICY_KEY = {"policy_id": 1}

sv_policy = document_table("sv_policy", metadata, "policy_id")

sv_bonus_rules = sa.Table(
    "sv_bonus_rules",
    metadata,
    sa.Column("rule_id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("threshold", sa.BigInteger, nullable=False),
    sa.Column("fixed_bonus", sa.BigInteger, nullable=True),
    sa.Column("bonus_bps", sa.Integer, nullable=True),
    sa.Column("max_bonus", sa.BigInteger, nullable=True),
    # Comma-separated: a handful of short codes, never queried inside.
    sa.Column("channels", sa.Text, nullable=False, server_default=""),
    sa.Column("program_ids", sa.Text, nullable=False, server_default=""),
    sa.Column("starts_at", UTCDateTime, nullable=False),
    sa.Column("ends_at", UTCDateTime, nullable=True),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
)


# --- the policy ------------------------------------------------------------------


def policy_document(policy: Policy) -> dict[str, Any]:
    return {
        "currency": policy.currency,
        "spend_order": policy.spend_order.value,
        "max_balance": policy.max_balance,
        "daily_spend_limit": policy.daily_spend_limit,
        "daily_recharge_limit": policy.daily_recharge_limit,
        "time_zone": policy.time_zone,
        "max_hold_ttl_seconds": int(policy.max_hold_ttl.total_seconds()),
        "channels": [
            {
                "channel": rule.channel.value,
                "enabled": rule.enabled,
                "store_ids": sorted(rule.store_ids),
                "operator_ids": sorted(rule.operator_ids),
                "min_amount": rule.min_amount,
                "max_amount": rule.max_amount,
            }
            for rule in policy.channels.values()
        ],
    }


def policy_from_document(doc: dict[str, Any]) -> Policy:
    return Policy(
        currency=doc["currency"],
        spend_order=SpendOrder(doc["spend_order"]),
        max_balance=doc.get("max_balance"),
        daily_spend_limit=doc.get("daily_spend_limit"),
        daily_recharge_limit=doc.get("daily_recharge_limit"),
        time_zone=doc["time_zone"],
        max_hold_ttl=dt.timedelta(seconds=doc["max_hold_ttl_seconds"]),
        channels={
            Channel(c["channel"]): ChannelRule(
                channel=Channel(c["channel"]),
                enabled=c["enabled"],
                store_ids=frozenset(c["store_ids"]),
                operator_ids=frozenset(c["operator_ids"]),
                min_amount=c.get("min_amount"),
                max_amount=c.get("max_amount"),
            )
            for c in doc["channels"]
        },
    )


@dataclass(frozen=True)
class PolicyRecord:
    policy: Policy
    etag: str
    updated_by: str
    updated_store_id: str
    updated_at: dt.datetime | None


# How long a cards process keeps the policy every payment reads before
# reading it again: a change made through this process is seen at once, one
# made through another replica within this.
POLICY_MEMO_SECONDS = 5.0
_POLICY_MEMO: Memo[PolicyRecord] = Memo(ttl=POLICY_MEMO_SECONDS)


async def current_policy(session: AsyncSession) -> PolicyRecord:
    """The policy, as kept for a few seconds (see ``chassis.db.Memo``)."""
    return await _POLICY_MEMO.get(session, lambda: get_policy(session))


async def get_policy(session: AsyncSession, *, for_update: bool = False) -> PolicyRecord:
    stored = await read_document(session, sv_policy, _POLICY_KEY, for_update=for_update)
    if stored is None:
        policy = default_policy(DEFAULT_CURRENCY, DEFAULT_TIME_ZONE)
        return PolicyRecord(policy, default_etag(policy_document(policy)), "", "", None)
    return PolicyRecord(
        policy_from_document(stored.document),
        stored.etag,
        stored.updated_by,
        stored.updated_store_id,
        stored.updated_at,
    )


async def save_policy(
    session: AsyncSession, policy: Policy, *, principal: str, store_id: str, now: dt.datetime
) -> None:
    _POLICY_MEMO.forget(session)
    await write_document(
        session,
        sv_policy,
        _POLICY_KEY,
        policy_document(policy),
        principal=principal,
        store_id=store_id,
        now=now,
    )


# --- bonus rules -------------------------------------------------------------------


@dataclass(frozen=True)
class BonusRuleRecord:
    rule: BonusRule
    currency: str
    created_by: str
    created_store_id: str
    created_at: dt.datetime


def _split(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _rule(row: Any) -> BonusRuleRecord:
    return BonusRuleRecord(
        rule=BonusRule(
            rule_id=row.rule_id,
            name=row.name,
            threshold=row.threshold,
            starts_at=row.starts_at,
            fixed_bonus=row.fixed_bonus,
            bonus_bps=row.bonus_bps,
            max_bonus=row.max_bonus,
            channels=frozenset(Channel(c) for c in _split(row.channels)),
            program_ids=frozenset(_split(row.program_ids)),
            ends_at=row.ends_at,
        ),
        currency=row.currency,
        created_by=row.created_by,
        created_store_id=row.created_store_id,
        created_at=row.created_at,
    )


async def insert_bonus_rule(
    session: AsyncSession,
    rule: BonusRule,
    currency: str,
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
) -> None:
    await session.execute(
        sa.insert(sv_bonus_rules).values(
            rule_id=rule.rule_id,
            name=rule.name,
            currency=currency,
            threshold=rule.threshold,
            fixed_bonus=rule.fixed_bonus,
            bonus_bps=rule.bonus_bps,
            max_bonus=rule.max_bonus,
            channels=",".join(sorted(c.value for c in rule.channels)),
            program_ids=",".join(sorted(rule.program_ids)),
            starts_at=rule.starts_at,
            ends_at=rule.ends_at,
            created_by=principal,
            created_store_id=store_id,
            created_at=now,
        )
    )


async def get_bonus_rule(
    session: AsyncSession, rule_id: str, *, for_update: bool = False
) -> BonusRuleRecord | None:
    query = sa.select(sv_bonus_rules).where(sv_bonus_rules.c.rule_id == rule_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return None if row is None else _rule(row)


async def end_bonus_rule(session: AsyncSession, rule_id: str, at: dt.datetime) -> None:
    await session.execute(
        sa.update(sv_bonus_rules).where(sv_bonus_rules.c.rule_id == rule_id).values(ends_at=at)
    )


async def bonus_rules_in_force(session: AsyncSession, at: dt.datetime) -> list[BonusRule]:
    c = sv_bonus_rules.c
    rows = await session.execute(
        sa.select(sv_bonus_rules).where(
            c.starts_at <= at, sa.or_(c.ends_at.is_(None), c.ends_at > at)
        )
    )
    return [_rule(row).rule for row in rows]


async def list_bonus_rules(
    session: AsyncSession,
    *,
    in_force_at: dt.datetime | None,
    after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[BonusRuleRecord]:
    """Newest first."""
    c = sv_bonus_rules.c
    query = sa.select(sv_bonus_rules)
    if in_force_at is not None:
        query = query.where(
            c.starts_at <= in_force_at, sa.or_(c.ends_at.is_(None), c.ends_at > in_force_at)
        )
    query = newest_first(query, c.created_at, c.rule_id, after, limit)
    return [_rule(row) for row in await session.execute(query)]
