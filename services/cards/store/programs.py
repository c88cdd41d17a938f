"""Card programs and the serial each hands numbers out from."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Memo, RowByKey, UTCDateTime
from chassis.direct import Executor
from services.cards.domain.programs import (
    CancelSettlement,
    Form,
    Holding,
    NumberFormat,
    Program,
    Spread,
)
from services.cards.store import metadata

card_programs = sa.Table(
    "card_programs",
    metadata,
    sa.Column("program_id", sa.String(32), primary_key=True),
    sa.Column("display_name", sa.String(100), nullable=False),
    sa.Column("form", sa.String(10), nullable=False),
    sa.Column("number_prefix", sa.String(12), nullable=False),
    sa.Column("number_length", sa.SmallInteger, nullable=False),
    sa.Column("luhn", sa.Boolean, nullable=False),
    sa.Column("validity_months", sa.Integer, nullable=False),
    sa.Column("stored_value", sa.Boolean, nullable=False),
    sa.Column("member_discount_bps", sa.Integer, nullable=False),
    sa.Column("holding", sa.String(10), nullable=False),
    sa.Column("max_group_holders", sa.Integer, nullable=False),
    sa.Column("allows_supplementary", sa.Boolean, nullable=False),
    sa.Column("max_supplementary_cards", sa.Integer, nullable=False),
    sa.Column("allows_linking", sa.Boolean, nullable=False),
    sa.Column("partner_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("cancel_settlement", sa.String(10), nullable=False, server_default="pay_out"),
    sa.Column("spread_multiplier", sa.BigInteger, nullable=False),
    sa.Column("spread_offset", sa.BigInteger, nullable=False),
    # The serial of the next number: only ever grows, so a number once
    # given is never drawn again.
    sa.Column("next_serial", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_card_programs_partner", "partner_id", "program_id"),
)


@dataclass(frozen=True)
class ProgramRecord:
    program: Program
    spread: Spread
    numbers_issued: int
    created_by: str
    created_store_id: str
    created_at: dt.datetime


def _record(row: Any) -> ProgramRecord:
    return ProgramRecord(
        program=Program(
            program_id=row.program_id,
            display_name=row.display_name,
            form=Form(row.form),
            number_format=NumberFormat(row.number_prefix, row.number_length, row.luhn),
            validity_months=row.validity_months,
            stored_value=row.stored_value,
            member_discount_bps=row.member_discount_bps,
            holding=Holding(row.holding),
            max_group_holders=row.max_group_holders,
            allows_supplementary=row.allows_supplementary,
            max_supplementary_cards=row.max_supplementary_cards,
            allows_linking=row.allows_linking,
            partner_id=row.partner_id,
            cancel_settlement=CancelSettlement(row.cancel_settlement),
        ),
        spread=Spread(row.spread_multiplier, row.spread_offset),
        numbers_issued=row.next_serial,
        created_by=row.created_by,
        created_store_id=row.created_store_id,
        created_at=row.created_at,
    )


async def insert_program(
    session: AsyncSession,
    program: Program,
    spread: Spread,
    *,
    principal: str,
    store_id: str,
    now: dt.datetime,
) -> None:
    fmt = program.number_format
    await session.execute(
        sa.insert(card_programs).values(
            program_id=program.program_id,
            display_name=program.display_name,
            form=program.form.value,
            number_prefix=fmt.prefix,
            number_length=fmt.length,
            luhn=fmt.luhn,
            validity_months=program.validity_months,
            stored_value=program.stored_value,
            member_discount_bps=program.member_discount_bps,
            holding=program.holding.value,
            max_group_holders=program.max_group_holders,
            allows_supplementary=program.allows_supplementary,
            max_supplementary_cards=program.max_supplementary_cards,
            allows_linking=program.allows_linking,
            partner_id=program.partner_id,
            cancel_settlement=program.cancel_settlement.value,
            spread_multiplier=spread.multiplier,
            spread_offset=spread.offset,
            created_by=principal,
            created_store_id=store_id,
            created_at=now,
        )
    )


_PROGRAM = RowByKey(card_programs, "program_id")


async def get_program(
    session: Executor, program_id: str, *, for_update: bool = False
) -> ProgramRecord | None:
    """``for_update`` serialises the issues of one program on PostgreSQL, so
    that "one live card of a program per member" holds under concurrency."""
    row = await _PROGRAM.first(session, program_id, for_update=for_update)
    return None if row is None else _record(row)


# A program's settings never change once it is created (only its serial
# moves on), yet every payment and every ResolveCard reads them: kept per
# process for this long, as read, in a table of programs filled as they
# are asked for. A program not yet created is not kept, so one created
# meanwhile is found at once.
PROGRAM_MEMO_SECONDS = 60.0
_PROGRAMS: Memo[dict[str, ProgramRecord]] = Memo(ttl=PROGRAM_MEMO_SECONDS)


async def _no_programs() -> dict[str, ProgramRecord]:
    return {}


async def program_settings(session: Executor, program_id: str) -> ProgramRecord | None:
    """The program as kept for a while (see ``chassis.db.Memo``): for its
    settings only, since its ``numbers_issued`` is as of when it was read.
    ``get_program`` reads it as it is now."""
    kept = await _PROGRAMS.get(session, _no_programs)
    record = kept.get(program_id)
    if record is None:
        record = await get_program(session, program_id)
        if record is not None:
            kept[program_id] = record
    return record


async def list_programs(
    session: AsyncSession, *, after: str, limit: int, partner_id: str = ""
) -> list[ProgramRecord]:
    query = sa.select(card_programs).order_by(card_programs.c.program_id).limit(limit)
    if after:
        query = query.where(card_programs.c.program_id > after)
    if partner_id:
        query = query.where(card_programs.c.partner_id == partner_id)
    return [_record(row) for row in await session.execute(query)]


async def number_formats(session: AsyncSession) -> Sequence[tuple[str, NumberFormat]]:
    rows = await session.execute(
        sa.select(
            card_programs.c.program_id,
            card_programs.c.number_prefix,
            card_programs.c.number_length,
            card_programs.c.luhn,
        )
    )
    return [(r.program_id, NumberFormat(r.number_prefix, r.number_length, r.luhn)) for r in rows]


async def take_serial(session: AsyncSession, program_id: str, capacity: int) -> int | None:
    """The next serial of a program, or None when the range is used up. The
    conditional update is the allocation: on PostgreSQL it locks the
    program's row until the transaction ends, so concurrent issues of one
    program take serials one after the other and never the same one."""
    result = await session.execute(
        sa.update(card_programs)
        .where(card_programs.c.program_id == program_id, card_programs.c.next_serial < capacity)
        .values(next_serial=card_programs.c.next_serial + 1)
        .returning(card_programs.c.next_serial)
    )
    taken = result.scalar_one_or_none()
    return None if taken is None else int(taken) - 1
