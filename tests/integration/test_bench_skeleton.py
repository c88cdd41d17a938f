"""The checkout benchmark's floor, the bare suite of the checkout's shape
(``bench.skeleton``), does the whole shape: every checkout answered, every
sale's and capture's events reach their consumers, and each of its five
processes, their databases and NATS are measured. A floor that skipped a
part would make the platform's code look dearer than it is."""

from __future__ import annotations

from bench import skeleton
from tests.integration.infra import Postgres


async def test_the_bare_suite_does_the_whole_shape(postgres: Postgres) -> None:
    found = await skeleton.floor(postgres.admin_url, members=8, concurrency=4, seconds=1.0)

    many, one = found.results
    assert many.calls > 0 and one.calls > 0
    assert many.errors == 0 and one.errors == 0
    # The books were waited for: a message for every capture, every sale
    # seen by both of pricing's consumers, nothing left in an outbox.
    books = found.books
    assert books.complete
    assert books.sales >= many.calls + one.calls
    assert 0 < books.captures < books.sales
    # Every process is measured (over both phases: a second of one caller
    # may fall within a clock tick of a quiet part).
    for part in skeleton.ROLES:
        for name in (f"skeleton {part}", f"postgres (skeleton {part})"):
            assert sum(phase.get(name, 0.0) for phase in found.cpu_ms) > 0, name
    assert sum(phase.get("nats (skeleton)", 0.0) for phase in found.cpu_ms) > 0


async def test_without_events_nothing_reaches_the_consumers(postgres: Postgres) -> None:
    found = await skeleton.floor(
        postgres.admin_url, members=8, concurrency=4, seconds=1.0, events=False
    )

    books = found.books
    assert books.complete
    assert books.sales > 0 and books.captures > 0
    assert books.messages == books.followups == books.referrals == 0


def test_books_with_events_are_complete_only_when_every_event_arrived() -> None:
    def books(**counts: int) -> skeleton.Books:
        whole = {"sales": 10, "captures": 7, "messages": 7, "followups": 10, "referrals": 10}
        return skeleton.Books(events=True, **{**whole, "unsent": 0, **counts})

    assert books().complete
    assert not books(messages=6).complete
    assert not books(referrals=9).complete
    assert not books(unsent=1).complete
