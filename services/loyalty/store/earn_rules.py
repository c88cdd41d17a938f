"""Earn rule sets: each published version one row, its rules a JSON
document. A version is never changed once written."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Memo, UTCDateTime
from chassis.direct import Direct, Executor
from services.loyalty.domain.earn_rules import (
    EarnRule,
    EarnRuleSet,
    Rounding,
    RuleKind,
    default_rule_set,
)
from services.loyalty.store import SETTINGS_MEMO_SECONDS, metadata

earn_rule_sets = sa.Table(
    "earn_rule_sets",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("effective_at", UTCDateTime, nullable=False),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("published_by", sa.String(100), nullable=False),
    sa.Column("published_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("published_at", UTCDateTime, nullable=False),
    sa.Index("ix_earn_rule_sets_effective_at", "effective_at"),
)

_SETS = ("program_ids", "tier_ids", "store_ids", "terminal_ids", "categories", "skus")


def rule_document(rule: EarnRule) -> dict[str, Any]:
    """A rule as JSON: only what its kind uses, so old documents read back
    the same whatever fields rules gain later."""
    doc: dict[str, Any] = {"rule_id": rule.rule_id, "kind": rule.kind.value}
    if rule.name:
        doc["name"] = rule.name
    for name in ("millipoints_per_unit", "factor_bps", "cap_points"):
        if getattr(rule, name):
            doc[name] = getattr(rule, name)
    if rule.kind == RuleKind.BASE_RATE:
        doc["millipoints_per_unit"] = rule.millipoints_per_unit
    for name in _SETS:
        if getattr(rule, name):
            doc[name] = sorted(getattr(rule, name))
    if rule.dates:
        doc["dates"] = sorted(day.isoformat() for day in rule.dates)
    if rule.weekdays:
        doc["weekdays"] = sorted(rule.weekdays)
    if rule.birthday_month:
        doc["birthday_month"] = True
    if rule.rounding is not None:
        doc["rounding"] = rule.rounding.value
    return doc


def rule_from_document(doc: dict[str, Any]) -> EarnRule:
    return EarnRule(
        rule_id=doc["rule_id"],
        kind=RuleKind(doc["kind"]),
        name=doc.get("name", ""),
        millipoints_per_unit=doc.get("millipoints_per_unit", 0),
        factor_bps=doc.get("factor_bps", 0),
        cap_points=doc.get("cap_points", 0),
        dates=frozenset(dt.date.fromisoformat(day) for day in doc.get("dates", ())),
        weekdays=frozenset(doc.get("weekdays", ())),
        birthday_month=doc.get("birthday_month", False),
        rounding=Rounding(doc["rounding"]) if "rounding" in doc else None,
        **{name: frozenset(doc.get(name, ())) for name in _SETS},
    )


@dataclass(frozen=True)
class RuleSetRecord:
    rule_set: EarnRuleSet
    # Empty for the built-in set.
    published_by: str
    published_store_id: str
    published_at: dt.datetime | None


def _built_in() -> RuleSetRecord:
    return RuleSetRecord(default_rule_set(), "", "", None)


def _record(row: Any) -> RuleSetRecord:
    rules = tuple(rule_from_document(doc) for doc in json.loads(row.document))
    return RuleSetRecord(
        EarnRuleSet(version=row.version, effective_at=row.effective_at, rules=rules),
        row.published_by,
        row.published_store_id,
        row.published_at,
    )


async def get_rule_set(session: AsyncSession, version: int) -> RuleSetRecord | None:
    """A published version; version 0 is the built-in set."""
    if version == 0:
        return _built_in()
    row = (
        await session.execute(sa.select(earn_rule_sets).where(earn_rule_sets.c.version == version))
    ).first()
    return None if row is None else _record(row)


_c = earn_rule_sets.c
_IN_FORCE_AT = Direct(
    sa.select(earn_rule_sets)
    .where(_c.effective_at <= sa.bindparam("at", type_=UTCDateTime))
    .order_by(_c.version.desc())
    .limit(1)
)
# When the next version (after ``version``) takes over, if one is set for later.
_NEXT_EFFECTIVE = Direct(
    sa.select(sa.func.min(_c.effective_at)).where(
        _c.version > sa.bindparam("version"),
        _c.effective_at > sa.bindparam("at", type_=UTCDateTime),
    )
)


async def rule_set_record_in_force(session: Executor, at: dt.datetime) -> RuleSetRecord:
    row = (await _IN_FORCE_AT.execute(session, {"at": at})).first()
    return _built_in() if row is None else _record(row)


@dataclass(frozen=True)
class _InForce:
    """The set in force from ``since`` (inclusive) until ``until`` (the next
    version's effective time; None: no later version yet)."""

    rule_set: EarnRuleSet
    since: dt.datetime | None
    until: dt.datetime | None

    def covers(self, at: dt.datetime) -> bool:
        return (self.since is None or self.since <= at) and (self.until is None or at < self.until)


_IN_FORCE_MEMO: Memo[_InForce] = Memo(ttl=SETTINGS_MEMO_SECONDS)


async def _in_force(session: Executor, at: dt.datetime) -> _InForce:
    record = await rule_set_record_in_force(session, at)
    next_version = await _NEXT_EFFECTIVE.execute(
        session, {"version": record.rule_set.version, "at": at}
    )
    until = next_version.one()[0]
    since = record.rule_set.effective_at if record.rule_set.version else None
    return _InForce(record.rule_set, since, until)


async def rule_set_in_force(session: Executor, at: dt.datetime) -> EarnRuleSet:
    """The newest version whose effective time is at or before ``at``; the
    built-in set (one point per currency unit, rounded down) when none
    is. What was in force is kept for a few seconds, for as long as it
    stays in force."""
    kept = await _IN_FORCE_MEMO.get(session, lambda: _in_force(session, at))
    if not kept.covers(at):
        _IN_FORCE_MEMO.forget()
        kept = await _IN_FORCE_MEMO.get(session, lambda: _in_force(session, at))
    return kept.rule_set


async def list_rule_sets(
    session: AsyncSession, *, before_version: int | None, limit: int
) -> list[RuleSetRecord]:
    """Newest version first."""
    c = earn_rule_sets.c
    query = sa.select(earn_rule_sets)
    if before_version is not None:
        query = query.where(c.version < before_version)
    rows = await session.execute(query.order_by(c.version.desc()).limit(limit))
    return [_record(row) for row in rows]


async def insert_rule_set(
    session: AsyncSession,
    rules: tuple[EarnRule, ...],
    effective_at: dt.datetime,
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
) -> RuleSetRecord:
    """Writes the next version. Two publishers at once may pick the same
    number: the second fails on the primary key and may try again."""
    _IN_FORCE_MEMO.forget(session)
    latest = (await session.execute(sa.select(sa.func.max(earn_rule_sets.c.version)))).scalar()
    version = int(latest or 0) + 1
    await session.execute(
        sa.insert(earn_rule_sets).values(
            version=version,
            effective_at=effective_at,
            document=json.dumps([rule_document(rule) for rule in rules], ensure_ascii=False),
            published_by=principal,
            published_store_id=store_id,
            published_at=now,
        )
    )
    return RuleSetRecord(EarnRuleSet(version, effective_at, rules), principal, store_id, now)
