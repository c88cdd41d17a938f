"""The dispatcher's claims: replicas on one database share the queue and
never send a message twice, a dead replica's messages are taken over once
its lease expires, a pass gives back what it cannot send in time, and the
replicas keep one rate limit between them. On real databases, SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from chassis.db import Database, outbox_table, utcnow
from services.notify import dispatch, events, store
from services.notify.channels import ChannelError, Needs, PermanentChannelError, Sent
from services.notify.domain import Category, Channel, MessageStatus
from services.notify.domain.delivery import RetryPolicy
from services.notify.store import MessageRecord, messages

pytestmark = pytest.mark.integration


class Recorder:
    """A channel that takes a little time per message and remembers who sent what."""

    needs = Needs.NOTHING

    def __init__(self, name: str, sent: list[tuple[str, str]], delay: float = 0.005) -> None:
        self.name = name
        self.sent = sent
        self.delay = delay

    async def send(self, message: MessageRecord, address: str) -> Sent:
        await asyncio.sleep(self.delay)
        self.sent.append((self.name, message.message_id))
        return Sent("recorder", message.message_id)


async def queue(db: Database, count: int) -> list[str]:
    start = utcnow() - dt.timedelta(minutes=1)
    ids = [f"MSG{i:05d}" for i in range(count)]
    async with db.transaction() as session:
        for i, message_id in enumerate(ids):
            await store.queue_message(
                session,
                message_id=message_id,
                member_id="M0000000001",
                template="welcome",
                channel=Channel.DEV_LOG,
                locale="en",
                body=f"hello {i}",
                trigger_event_id=f"event-{i}",
                trace_headers={},
                created_at=start + dt.timedelta(milliseconds=i),
            )
    return ids


async def statuses(db: Database) -> dict[str, str]:
    async with db.sessions() as session:
        rows = await session.execute(sa.select(messages.c.message_id, messages.c.status))
        return {row.message_id: row.status for row in rows}


async def sent_events(db: Database) -> int:
    async with db.sessions() as session:
        result = await session.execute(
            sa.select(sa.func.count())
            .select_from(outbox_table)
            .where(outbox_table.c.subject == events.MESSAGE_SENT)
        )
        return int(result.scalar_one())


async def drain(dispatcher: dispatch.Dispatcher, db: Database) -> None:
    """Dispatch until nothing is queued any more (the other replica may
    hold the last messages for a moment)."""
    while True:
        if await dispatcher.dispatch_queued():
            continue
        if MessageStatus.QUEUED.value not in (await statuses(db)).values():
            return
        await asyncio.sleep(0.01)


async def test_two_dispatchers_on_one_database_never_send_a_message_twice(
    replicas: Callable[[], Database],
) -> None:
    first, second = replicas(), replicas()
    ids = await queue(first, 120)
    sent: list[tuple[str, str]] = []
    one = dispatch.Dispatcher(
        first, {Channel.DEV_LOG: Recorder("one", sent)}, batch_size=7, poll_interval=0.05
    )
    two = dispatch.Dispatcher(
        second, {Channel.DEV_LOG: Recorder("two", sent)}, batch_size=7, poll_interval=0.05
    )
    await asyncio.wait_for(asyncio.gather(drain(one, first), drain(two, second)), timeout=60)

    times = collections.Counter(message_id for _, message_id in sent)
    assert [m for m, n in times.items() if n > 1] == []
    assert set(times) == set(ids)
    # Both replicas did part of the work...
    assert {who for who, _ in sent} == {"one", "two"}
    # ...and every message is sent once in the history and the events.
    assert set((await statuses(first)).values()) == {MessageStatus.SENT.value}
    assert await sent_events(first) == len(ids)
    async with first.sessions() as session:
        held = await session.execute(
            sa.select(sa.func.count()).where(messages.c.claim_token.is_not(None))
        )
        assert held.scalar_one() == 0


async def test_the_loops_of_two_replicas_share_the_queue(
    replicas: Callable[[], Database],
) -> None:
    """As in production: both run() loops, woken by polls, messages arriving."""
    first, second = replicas(), replicas()
    sent: list[tuple[str, str]] = []
    loops = [
        asyncio.create_task(
            dispatch.Dispatcher(
                db, {Channel.DEV_LOG: Recorder(name, sent)}, batch_size=5, poll_interval=0.02
            ).run()
        )
        for name, db in (("one", first), ("two", second))
    ]
    try:
        ids = await queue(first, 40)
        for _ in range(600):
            if set((await statuses(first)).values()) == {MessageStatus.SENT.value}:
                break
            await asyncio.sleep(0.05)
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    times = collections.Counter(message_id for _, message_id in sent)
    assert set(times) == set(ids)
    assert max(times.values()) == 1
    assert await sent_events(first) == len(ids)


async def test_a_dead_replicas_messages_are_taken_over_after_its_lease(
    replicas: Callable[[], Database],
) -> None:
    db = replicas()
    ids = await queue(db, 3)
    now = utcnow()
    # A replica claimed everything, then died: its lease is still running.
    async with db.transaction() as session:
        held = await store.claim_queued(
            session,
            limit=10,
            token="dead-replica",
            now=now,
            lease=dt.timedelta(minutes=5),
            skip_locked=db.dialect == "postgresql",
        )
    assert [m.message_id for m in held] == ids
    sent: list[tuple[str, str]] = []
    survivor = dispatch.Dispatcher(db, {Channel.DEV_LOG: Recorder("survivor", sent)})
    assert await survivor.dispatch_queued() == 0
    assert sent == []
    # Once the lease has run out, the survivor takes them.
    async with db.transaction() as session:
        await session.execute(
            sa.update(messages).values(claim_expires_at=now - dt.timedelta(seconds=1))
        )
    assert await survivor.dispatch_queued() == 3
    assert sorted(m for _, m in sent) == ids
    # Had the first replica come back, its mark no longer counts.
    async with db.transaction() as session:
        assert not await store.mark_sent(session, ids[0], utcnow(), "dead-replica")
    assert await sent_events(db) == 3


async def test_concurrent_claims_take_at_most_their_batch_and_never_the_same_message(
    replicas: Callable[[], Database],
) -> None:
    dbs = [replicas() for _ in range(4)]
    ids = await queue(dbs[0], 30)
    now = utcnow()

    async def claim(db: Database, n: int) -> list[str]:
        async with db.transaction() as session:
            held = await store.claim_queued(
                session,
                limit=3,
                token=f"pass-{n}",
                now=now,
                lease=dt.timedelta(minutes=5),
                skip_locked=db.dialect == "postgresql",
            )
        return [m.message_id for m in held]

    claims = await asyncio.gather(*(claim(dbs[n % 4], n) for n in range(12)))
    assert all(len(held) <= 3 for held in claims)
    # Each in the order it was queued, none held twice, all held once.
    assert all(held == sorted(held, key=ids.index) for held in claims)
    taken = [message_id for held in claims for message_id in held]
    assert sorted(taken) == sorted(ids)


async def test_a_pass_gives_back_what_it_could_not_start_in_its_lease(
    replicas: Callable[[], Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = replicas()
    ids = await queue(db, 5)
    clock = [1000.0]
    monkeypatch.setattr(dispatch.time, "monotonic", lambda: clock[0])

    class Slow:
        needs = Needs.NOTHING

        async def send(self, message: MessageRecord, address: str) -> Sent:
            clock[0] += 20.0  # each send takes 20 s of the lease
            return Sent("slow", message.message_id)

    # Lease 100 s, sends up to 10 s, 30 s margin: starts allowed until +60 s.
    slow = dispatch.Dispatcher(
        db, {Channel.DEV_LOG: Slow()}, batch_size=10, lease_seconds=100.0, send_timeout=10.0
    )
    assert await slow.dispatch_queued() == 5
    state = await statuses(db)
    assert [state[m] for m in ids] == ["sent"] * 4 + ["queued"]
    async with db.sessions() as session:
        row = (
            await session.execute(
                sa.select(messages.c.claim_token, messages.c.claim_expires_at).where(
                    messages.c.message_id == ids[-1]
                )
            )
        ).one()
    assert tuple(row) == (None, None)


async def test_a_failed_send_is_given_back_for_a_retry(
    replicas: Callable[[], Database],
) -> None:
    db = replicas()
    [message_id] = await queue(db, 1)

    class Broken:
        needs = Needs.NOTHING

        async def send(self, message: MessageRecord, address: str) -> Sent:
            raise OSError("provider down")

    # Retries a millisecond apart at most, so that the test need not wait.
    quick = RetryPolicy(max_attempts=5, base_seconds=0.001, cap_seconds=0.001)
    assert (
        await dispatch.Dispatcher(db, {Channel.DEV_LOG: Broken()}, retry=quick).dispatch_queued()
        == 1
    )
    await asyncio.sleep(0.01)
    sent: list[tuple[str, str]] = []
    assert await dispatch.Dispatcher(db, {Channel.DEV_LOG: Recorder("r", sent)}).dispatch_queued()
    assert sent == [("r", message_id)]
    async with db.sessions() as session:
        attempts = await session.execute(
            sa.select(messages.c.attempts, messages.c.last_error).where(
                messages.c.message_id == message_id
            )
        )
        assert tuple(attempts.one()) == (2, "OSError: provider down")


async def test_quiet_hours_are_checked_again_at_send_time(
    replicas: Callable[[], Database],
) -> None:
    """A marketing SMS that waited into the night goes back to the queue,
    unsent and without an attempt counted, until 09:00 local."""
    db = replicas()
    async with db.transaction() as session:
        await store.queue_message(
            session,
            message_id="MARKETING1",
            member_id="M0000000001",
            template="promotion",
            channel=Channel.SMS,
            locale="zh-CN",
            body="周末会员日，全场 8 折。",
            category=Category.MARKETING,
            time_zone="Asia/Shanghai",
            trace_headers={},
            created_at=utcnow() - dt.timedelta(hours=2),
        )
    sent: list[tuple[str, str]] = []
    # 22:30 in Shanghai.
    night = dt.datetime(2026, 12, 1, 14, 30, tzinfo=dt.UTC)
    quiet = dispatch.Dispatcher(db, {Channel.SMS: Recorder("sms", sent)}, clock=lambda: night)
    assert await quiet.dispatch_queued() == 1
    assert sent == []
    async with db.sessions() as session:
        held = await store.get_message(session, "MARKETING1")
    assert held is not None
    assert (held.status, held.attempts) == (MessageStatus.QUEUED, 0)
    assert held.not_before == dt.datetime(2026, 12, 2, 1, 0, tzinfo=dt.UTC)  # 09:00 local
    # Not before then; then it goes.
    assert await quiet.dispatch_queued() == 0
    morning = dispatch.Dispatcher(
        db, {Channel.SMS: Recorder("sms", sent)}, clock=lambda: night + dt.timedelta(hours=11)
    )
    assert await morning.dispatch_queued() == 1
    assert sent == [("sms", "MARKETING1")]


async def test_a_refusal_fails_at_once_and_retries_give_up_at_the_last_attempt(
    replicas: Callable[[], Database],
) -> None:
    db = replicas()
    refused_id, flaky_id = await queue(db, 2)

    class Provider:
        needs = Needs.NOTHING

        async def send(self, message: MessageRecord, address: str) -> Sent:
            if message.message_id == refused_id:
                raise PermanentChannelError("invalid destination number")
            raise ChannelError("provider down", retry_after=0.0)

    policy = RetryPolicy(max_attempts=3, base_seconds=0.001, cap_seconds=0.001)
    provider = dispatch.Dispatcher(db, {Channel.DEV_LOG: Provider()}, retry=policy)
    for _ in range(3):
        await provider.dispatch_queued()
        await asyncio.sleep(0.01)
    async with db.sessions() as session:
        refused = await store.get_message(session, refused_id)
        flaky = await store.get_message(session, flaky_id)
    assert refused is not None and flaky is not None
    assert (refused.status, refused.attempts, refused.status_reason) == (
        MessageStatus.FAILED,
        1,
        "invalid destination number",
    )
    assert (flaky.status, flaky.attempts) == (MessageStatus.FAILED, 3)
    assert flaky.status_reason == "gave up after 3 attempts: ChannelError: provider down"
    async with db.sessions() as session:
        failed_events = await session.execute(
            sa.select(sa.func.count())
            .select_from(outbox_table)
            .where(outbox_table.c.subject == events.MESSAGE_FAILED)
        )
        assert failed_events.scalar_one() == 2
        dead = await store.list_failed(session, channel=None, template="", limit=10, after=None)
    assert {m.message_id for m in dead} == {refused_id, flaky_id}
    # Replayed, the message is queued afresh.
    async with db.transaction() as session:
        assert await store.replay(session, flaky_id, utcnow())
        assert not await store.replay(session, flaky_id, utcnow())
    async with db.sessions() as session:
        again = await store.get_message(session, flaky_id)
    assert again is not None
    assert (again.status, again.attempts, again.last_error) == (MessageStatus.QUEUED, 0, None)


async def test_two_dispatchers_keep_one_rate_limit_between_them(
    replicas: Callable[[], Database],
) -> None:
    """The rate limit is in the database: two replicas, each with the
    provider's whole rate, send at that rate between them, not twice it."""
    first, second = replicas(), replicas()
    ids = await queue(first, 16)
    rate = 40.0
    sent_at: list[float] = []

    class Timed(Recorder):
        async def send(self, message: MessageRecord, address: str) -> Sent:
            sent_at.append(time.time())
            return await super().send(message, address)

    sent: list[tuple[str, str]] = []
    dispatchers = [
        dispatch.Dispatcher(
            db,
            {Channel.DEV_LOG: Timed(name, sent, delay=0)},
            limits={Channel.DEV_LOG: dispatch.RateLimiter(db, Channel.DEV_LOG, rate)},
            concurrency=4,
            batch_size=4,
        )
        for name, db in (("one", first), ("two", second))
    ]
    await asyncio.wait_for(
        asyncio.gather(*(drain(d, db) for d, db in zip(dispatchers, (first, second), strict=True))),
        timeout=60,
    )
    assert sorted(m for _, m in sent) == ids
    assert {who for who, _ in sent} == {"one", "two"}
    # 16 sends, bursts of one: 15 intervals from the first slot to the last;
    # each replica at the whole rate alone would have taken about half of
    # that (7.5). A send never starts before its slot but may start after it
    # on a busy machine, the first one included (once by 27 ms, over one
    # interval), so four intervals of the span are allowed for that: still
    # far above what two rates would give.
    assert max(sent_at) - min(sent_at) >= 11 / rate


async def test_a_rate_limit_the_database_cannot_reserve_sends_nothing(
    replicas: Callable[[], Database],
) -> None:
    """Without its slot a message is not sent: it goes back to the queue
    with no attempt counted, and the pass fails like one whose database
    failed; once the limit can be reserved again, it is sent once."""
    db = replicas()
    ids = await queue(db, 3)

    class Unreachable(dispatch.RateLimiter):
        calls = 0

        async def acquire(self) -> float:
            Unreachable.calls += 1
            if Unreachable.calls == 2:
                raise OSError("connection refused")
            return await super().acquire()

    sent: list[tuple[str, str]] = []
    limiter = Unreachable(db, Channel.DEV_LOG, 1000.0, 10)
    one = dispatch.Dispatcher(
        db, {Channel.DEV_LOG: Recorder("one", sent)}, limits={Channel.DEV_LOG: limiter}
    )
    with pytest.raises(OSError, match="connection refused"):
        await one.dispatch_queued()
    assert sent == [("one", ids[0])]
    async with db.sessions() as session:
        rest = [await store.get_message(session, m) for m in ids[1:]]
        unclaimed = await session.execute(
            sa.select(sa.func.count()).where(messages.c.claim_token.is_not(None))
        )
        assert unclaimed.scalar_one() == 0
    assert [(m.status, m.attempts) for m in rest if m is not None] == [
        (MessageStatus.QUEUED, 0),
        (MessageStatus.QUEUED, 0),
    ]
    assert await one.dispatch_queued() == 2
    assert sorted(m for _, m in sent) == ids
    assert await sent_events(db) == 3
