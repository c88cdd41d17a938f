"""The chain's notification policy: one JSON document with an etag (see
chassis.documents), read by the planner and the dispatcher on every pass
and kept for a few seconds between reads.

The document holds every field of ``domain.policy.NotifyPolicy`` by name,
written from the field's own default type, so that a field added to the
policy is stored without touching this module; a field the document lacks
(added since it was saved) takes its default."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Memo
from chassis.documents import default_etag, document_table, read_document, write_document
from services.notify.domain.messages import Channel
from services.notify.domain.policy import NotifyPolicy, QuietHours, parse_time_of_day
from services.notify.store.base import metadata

_KEY = {"policy_id": 1}

notify_policy = document_table("notify_policy", metadata, "policy_id", autoincrement=False)

# Another replica's change is seen within this many seconds.
_memo: Memo[NotifyPolicy] = Memo(ttl=5.0)


def _encode(value: Any) -> Any:
    if isinstance(value, QuietHours):
        return {
            "start": _encode(value.start),
            "end": _encode(value.end),
            "channels": sorted(c.value for c in value.channels),
        }
    if isinstance(value, dt.time):
        return f"{value.hour:02d}:{value.minute:02d}"
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(default: Any, value: Any) -> Any:
    if isinstance(default, QuietHours):
        return QuietHours(
            start=parse_time_of_day(value["start"]),
            end=parse_time_of_day(value["end"]),
            channels=frozenset(Channel(c) for c in value["channels"]),
        )
    # bool before int: a bool is an int to isinstance.
    for kind, read in (
        (dt.time, parse_time_of_day),
        (frozenset, frozenset),
        (dict, dict),
        (bool, bool),
        (int, int),
    ):
        if isinstance(default, kind):
            return read(value)
    return value


def policy_document(policy: NotifyPolicy) -> dict[str, Any]:
    return {f.name: _encode(getattr(policy, f.name)) for f in dataclasses.fields(policy)}


def policy_from_document(document: dict[str, Any]) -> NotifyPolicy:
    defaults = NotifyPolicy()
    values = {
        f.name: _decode(getattr(defaults, f.name), document[f.name])
        for f in dataclasses.fields(defaults)
        if f.name in document
    }
    return dataclasses.replace(defaults, **values)


@dataclass(frozen=True)
class PolicyRecord:
    policy: NotifyPolicy
    etag: str
    updated_by: str
    updated_at: dt.datetime | None


async def get_policy(session: AsyncSession, *, for_update: bool = False) -> PolicyRecord:
    stored = await read_document(session, notify_policy, _KEY, for_update=for_update)
    if stored is None:
        policy = NotifyPolicy()
        return PolicyRecord(policy, default_etag(policy_document(policy)), "", None)
    return PolicyRecord(
        policy_from_document(stored.document), stored.etag, stored.updated_by, stored.updated_at
    )


async def load_policy(session: AsyncSession) -> NotifyPolicy:
    """The policy in force (the default until HQ saves one)."""

    async def load() -> NotifyPolicy:
        return (await get_policy(session)).policy

    return await _memo.get(session, load)


async def save_policy(
    session: AsyncSession,
    policy: NotifyPolicy,
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
) -> str:
    """Replaces the policy; returns the new etag. The caller checks the etag
    it was given against ``get_policy(for_update=True)`` first."""
    etag = await write_document(
        session,
        notify_policy,
        _KEY,
        policy_document(policy),
        principal=principal,
        store_id=store_id,
        now=now,
        ensure_ascii=False,
    )
    _memo.forget(session)
    return etag
