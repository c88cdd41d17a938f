"""run_idempotent against real databases, SQLite and PostgreSQL: the work
runs once per key, its response is replayed, and a key is never reused for
another request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from google.protobuf import empty_pb2, wrappers_pb2
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, idempotency_table, outbox_table
from chassis.errors import Code, FailedPrecondition, InvalidArgument
from chassis.idempotency import MAX_REQUEST_ID_LENGTH, run_idempotent
from chassis.outbox import enqueue
from tests.integration.infra import DatabaseFactory, migrated

pytestmark = pytest.mark.integration

# The cards service has nothing but the chassis tables.
CARDS_MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "cards" / "migrations"
METHOD = "/cornucopia.cards.v1.CardService/IssueCard"
StringValue = wrappers_pb2.StringValue


@pytest.fixture
async def db(database_url: DatabaseFactory) -> AsyncIterator[Database]:
    """A fresh database with the chassis tables, dropped afterwards."""
    database = Database(await migrated(database_url, CARDS_MIGRATIONS, "cards"))
    try:
        yield database
    finally:
        await database.dispose()


class Work:
    """Issues a card: writes an outbox row and answers with the card number."""

    def __init__(self, *, fail_first: int = 0, delay: float = 0.0) -> None:
        self.runs = 0
        self.fail_first = fail_first
        self.delay = delay

    async def __call__(self, session: AsyncSession) -> wrappers_pb2.StringValue:
        self.runs += 1
        card = f"C{self.runs:010d}"
        await enqueue(
            session,
            source="cornucopia/cards",
            subject="cards.v1.card_issued",
            message=StringValue(value=card),
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.runs <= self.fail_first:
            raise FailedPrecondition("the card stock is empty", reason="NO_STOCK")
        return StringValue(value=card)


def call(
    db: Database, work: Callable[[AsyncSession], Awaitable[StringValue]], **kwargs: object
) -> Awaitable[StringValue]:
    arguments: dict[str, object] = {
        "method": METHOD,
        "request_id": "req-1",
        "request": StringValue(value="member M7Q2K9X4TD"),
        "response_type": StringValue,
        "work": work,
    }
    arguments.update(kwargs)
    return run_idempotent(db, **arguments)  # type: ignore[arg-type]


async def count(db: Database, table: sa.Table) -> int:
    async with db.sessions() as session:
        return int(
            (await session.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()
        )


async def test_a_repeated_request_replays_the_stored_response(db: Database) -> None:
    work = Work()
    first = await call(db, work)
    second = await call(db, work)
    assert first == StringValue(value="C0000000001")
    assert second == first
    assert work.runs == 1
    assert await count(db, outbox_table) == 1
    assert await count(db, idempotency_table) == 1


async def test_keys_are_per_method_and_per_request_id(db: Database) -> None:
    work = Work()
    a = await call(db, work, request_id="req-1")
    b = await call(db, work, request_id="req-2")
    c = await call(db, work, request_id="req-1", method="/cornucopia.cards.v1.CardService/Block")
    assert len({a.value, b.value, c.value}) == 3
    assert work.runs == 3
    assert await count(db, outbox_table) == 3


async def test_the_same_key_with_another_payload_is_refused(db: Database) -> None:
    work = Work()
    await call(db, work)
    with pytest.raises(InvalidArgument) as caught:
        await call(db, work, request=StringValue(value="member M0000000000"))
    err = caught.value
    assert err.code is Code.INVALID_ARGUMENT
    assert err.reason == "IDEMPOTENCY_KEY_REUSED"
    assert [v.field for v in err.violations] == ["request_id"]
    assert work.runs == 1
    assert await count(db, outbox_table) == 1


async def test_work_that_fails_stores_nothing_and_a_retry_runs_it_again(db: Database) -> None:
    work = Work(fail_first=1)
    with pytest.raises(FailedPrecondition):
        await call(db, work)
    # Neither the key nor the outbox row of the failed attempt survived.
    assert await count(db, idempotency_table) == 0
    assert await count(db, outbox_table) == 0
    retried = await call(db, work)
    assert retried == StringValue(value="C0000000002")
    assert work.runs == 2
    assert await call(db, work) == retried
    assert work.runs == 2
    assert await count(db, outbox_table) == 1


async def test_concurrent_duplicates_run_the_work_exactly_once(db: Database) -> None:
    work = Work(delay=0.05)
    responses = await asyncio.gather(*(call(db, work) for _ in range(10)))
    assert work.runs == 1
    assert {r.value for r in responses} == {"C0000000001"}
    assert await count(db, outbox_table) == 1
    assert await count(db, idempotency_table) == 1


async def test_a_unique_violation_from_the_work_itself_is_not_taken_for_a_replay(
    db: Database,
) -> None:
    async def issue_twice(session: AsyncSession) -> StringValue:
        for _ in range(2):
            await enqueue(
                session,
                source="cornucopia/cards",
                subject="cards.v1.card_issued",
                message=StringValue(value="C1"),
                event_id="fixed-event-id",
            )
        return StringValue(value="C1")

    with pytest.raises(IntegrityError):
        await call(db, issue_twice)
    assert await count(db, idempotency_table) == 0


async def test_an_empty_response_is_replayed_too(db: Database) -> None:
    # Many mutations answer google.protobuf.Empty (AIP-135 deletes), and a
    # response whose fields all hold defaults serialises to zero bytes too.
    runs = 0

    async def delete_card(session: AsyncSession) -> empty_pb2.Empty:
        nonlocal runs
        runs += 1
        return empty_pb2.Empty()

    arguments: dict[str, object] = {
        "method": "/cornucopia.cards.v1.CardService/DeleteCard",
        "request_id": "req-delete-1",
        "request": StringValue(value="C0000000001"),
        "response_type": empty_pb2.Empty,
        "work": delete_card,
    }
    assert await run_idempotent(db, **arguments) == empty_pb2.Empty()  # type: ignore[arg-type]
    # The retry of a request that completed must get its answer, not
    # "still in flight" for as long as the key is kept.
    assert await run_idempotent(db, **arguments) == empty_pb2.Empty()  # type: ignore[arg-type]
    assert runs == 1


@pytest.mark.parametrize(
    ("request_id", "description"),
    [
        ("", "required"),
        ("   ", "required"),
        ("x" * (MAX_REQUEST_ID_LENGTH + 1), f"at most {MAX_REQUEST_ID_LENGTH}"),
    ],
)
async def test_a_missing_or_too_long_request_id_is_invalid(
    db: Database, request_id: str, description: str
) -> None:
    work = Work()
    with pytest.raises(InvalidArgument) as caught:
        await call(db, work, request_id=request_id)
    assert [v.field for v in caught.value.violations] == ["request_id"]
    assert caught.value.violations[0].description.startswith(description)
    assert work.runs == 0
    assert await count(db, idempotency_table) == 0


async def test_the_longest_request_id_is_accepted(db: Database) -> None:
    work = Work()
    request_id = "k" * MAX_REQUEST_ID_LENGTH
    first = await call(db, work, request_id=request_id)
    assert await call(db, work, request_id=request_id) == first
    assert work.runs == 1
