"""Saved templates, versioned: every save is a new version and the newest
is the one used; a trigger without a saved template speaks with its
built-in one (domain.templates.DEFAULTS).

A template is found by name and channel: the channel's own template wins
over the one for every channel (channel ""), which wins over the built-in
one."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Memo, UTCDateTime
from services.notify.domain.messages import Channel
from services.notify.domain.templates import DEFAULTS, MessageTemplate
from services.notify.store.base import metadata

templates = sa.Table(
    "notify_templates",
    metadata,
    sa.Column("template_id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    # "" for every channel of the trigger.
    sa.Column("channel", sa.String(16), nullable=False, server_default=""),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("trigger", sa.String(64), nullable=False),
    # JSON objects: locale -> text.
    sa.Column("bodies", sa.Text, nullable=False),
    sa.Column("subjects", sa.Text, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("name", "channel", "version", name="uq_notify_templates_version"),
    sa.Index("ix_notify_templates_trigger", "trigger"),
)


@dataclass(frozen=True)
class StoredTemplate:
    template: MessageTemplate
    created_by: str
    created_at: dt.datetime | None

    @property
    def built_in(self) -> bool:
        return self.template.version == 0


def _stored(row: Any) -> StoredTemplate:
    m = row._mapping
    return StoredTemplate(
        template=MessageTemplate(
            name=m["name"],
            trigger=m["trigger"],
            bodies=json.loads(m["bodies"]),
            subjects=json.loads(m["subjects"]),
            channel=Channel(m["channel"]) if m["channel"] else None,
            version=m["version"],
        ),
        created_by=m["created_by"],
        created_at=m["created_at"],
    )


def built_in(name: str) -> StoredTemplate | None:
    found = DEFAULTS.get(name)
    return None if found is None else StoredTemplate(found, "", None)


async def get_version(
    session: AsyncSession, name: str, channel: Channel | None, version: int = 0
) -> StoredTemplate | None:
    """That version of the saved template (0: the newest), or None."""
    c = templates.c
    query = sa.select(templates).where(
        c.name == name, c.channel == (channel.value if channel else "")
    )
    if version:
        query = query.where(c.version == version)
    row = (await session.execute(query.order_by(c.version.desc()).limit(1))).first()
    return None if row is None else _stored(row)


# The newest saved version of each template by name and channel, read once
# for every message planned within ``ttl``: a save through this process is
# seen at once, another replica's within the ttl.
_in_use: Memo[dict[tuple[str, str], StoredTemplate]] = Memo(ttl=5.0)


def _newest_saved() -> sa.Select[Any]:
    c = templates.c
    newest = (
        sa.select(c.name, c.channel, sa.func.max(c.version).label("version"))
        .group_by(c.name, c.channel)
        .subquery()
    )
    return sa.select(templates).join(
        newest,
        sa.and_(
            c.name == newest.c.name,
            c.channel == newest.c.channel,
            c.version == newest.c.version,
        ),
    )


async def in_use(
    session: AsyncSession, name: str, channel: Channel | None
) -> StoredTemplate | None:
    """The template a message of ``name`` on ``channel`` is written with:
    the channel's own, else the one for every channel, else built in."""

    async def load() -> dict[tuple[str, str], StoredTemplate]:
        rows = await session.execute(_newest_saved())
        return {(r._mapping["name"], r._mapping["channel"]): _stored(r) for r in rows}

    saved = await _in_use.get(session, load)
    if channel is not None:
        found = saved.get((name, channel.value))
        if found is not None:
            return found
    found = saved.get((name, ""))
    return found if found is not None else built_in(name)


async def save_version(
    session: AsyncSession,
    template: MessageTemplate,
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
    template_id: str,
) -> StoredTemplate:
    """Saves the next version (the unique constraint settles two saves at
    once: the second fails and is retried by its caller)."""
    current = await get_version(session, template.name, template.channel)
    version = (current.template.version if current else 0) + 1
    await session.execute(
        sa.insert(templates).values(
            template_id=template_id,
            name=template.name,
            channel=template.channel.value if template.channel else "",
            version=version,
            trigger=template.trigger,
            bodies=json.dumps(dict(template.bodies), ensure_ascii=False, sort_keys=True),
            subjects=json.dumps(dict(template.subjects), ensure_ascii=False, sort_keys=True),
            created_by=principal,
            created_store_id=store_id,
            created_at=now,
        )
    )
    _in_use.forget(session)
    saved = await get_version(session, template.name, template.channel, version)
    assert saved is not None
    return saved


async def list_in_use(session: AsyncSession, trigger: str | None = None) -> list[StoredTemplate]:
    """The newest version of every saved template, then the built-in ones
    no saved every-channel template replaces, by name and channel."""
    c = templates.c
    query = _newest_saved()
    if trigger:
        query = query.where(c.trigger == trigger)
    saved = [_stored(r) for r in await session.execute(query)]
    replaced = {s.template.name for s in saved if s.template.channel is None}
    defaults = [
        StoredTemplate(t, "", None)
        for name, t in DEFAULTS.items()
        if name not in replaced and (not trigger or t.trigger == trigger)
    ]
    found = saved + defaults
    found.sort(
        key=lambda s: (s.template.name, s.template.channel.value if s.template.channel else "")
    )
    return found
