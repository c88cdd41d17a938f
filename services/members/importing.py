"""The pure work of an import batch: the rows read and checked as
CreateMember checks an enrollment, and the new members sealed under data
keys of their own with their ``member.enrolled`` outbox rows.

It is most of an import's cost and touches no database, so the import
runner (``services.members.server.transfers``) does it in a worker thread,
beside its transactions: while one batch is written, the next one is
checked and sealed, and the service's event loop stays free for calls.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chassis.errors import InvalidArgument
from services.members import events
from services.members.domain import members as domain
from services.members.domain import transfers as rules
from services.members.store import members as member_store

# One record of a file: its row number and its cells.
Cells = tuple[int, Sequence[object]]


@dataclass(frozen=True)
class RowRules:
    """How a job reads its rows into enrollments."""

    columns: rules.ColumnMap
    default_home_store_id: str
    channel: domain.EnrollmentChannel
    default_region: str
    # The chain's own attributes, checked as CreateMember checks them.
    definitions: Mapping[str, domain.AttributeDefinition] = field(default_factory=dict)


@dataclass(frozen=True)
class Author:
    """Who enrolls the members of a job, and the numbers their enrollment
    channels have in events."""

    principal: str
    from_store: str
    channel_numbers: Mapping[domain.EnrollmentChannel, int]


@dataclass(frozen=True)
class Row:
    """A non-blank record after the pure checks: the member it asks for and
    the blind index of their mobile, or why it is refused."""

    row: int
    member: domain.NewMember | None = None
    mobile_index: str = ""
    problems: tuple[rules.RowProblem, ...] = ()


@dataclass(frozen=True)
class Prepared:
    """A new member's rows and the outbox row of their ``member.enrolled``
    event, ready to insert."""

    member: member_store.PreparedMember
    event: Mapping[str, Any]


def check_rows(
    keys: member_store.Keys, how: RowRules, today: dt.date, records: Sequence[Cells]
) -> list[Row]:
    """Each non-blank record read and validated as CreateMember validates
    an enrollment, with its mobile's blind index."""
    rows: list[Row] = []
    for number, cells in records:
        if rules.is_blank(cells):
            continue
        asked = rules.row_to_enrollment(
            number,
            cells,
            how.columns,
            default_home_store_id=how.default_home_store_id,
            channel=how.channel,
        )
        if isinstance(asked, list):
            rows.append(Row(number, problems=tuple(asked)))
            continue
        try:
            member = domain.validate_enrollment(
                asked,
                today=today,
                default_region=how.default_region,
                default_channel=how.channel,
                definitions=how.definitions,
            )
        except InvalidArgument as exc:
            problems = rules.violations_to_problems(number, exc.violations)
            rows.append(Row(number, problems=tuple(problems)))
            continue
        rows.append(Row(number, member, keys.mobile_index(member.mobile)))
    return rows


def prepare(
    keys: member_store.Keys,
    author: Author,
    now: dt.datetime,
    members: Sequence[domain.NewMember],
) -> list[Prepared]:
    """New members' rows, each sealed under a data key of its own, exactly
    as CreateMember's insert writes them, and their events' outbox rows
    with the payload CreateMember's event has."""
    prepared = [
        member_store.prepare_member(
            keys,
            domain.new_member_id(),
            member,
            principal=author.principal,
            from_store=author.from_store,
            now=now,
        )
        for member in members
    ]
    rows = events.member_enrolled_rows(
        [
            events.member_enrolled_message(
                member_id=p.member_id,
                home_store_id=p.member.home_store_id,
                channel=author.channel_numbers[p.member.enrollment_channel],
                language=p.member.preferred_language,
                enrolled_at=now,
            )
            for p in prepared
        ]
    )
    return [Prepared(p, row) for p, row in zip(prepared, rows, strict=True)]
