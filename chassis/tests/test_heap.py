"""What a process does with its heap once it has started."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from chassis.heap import GC_THRESHOLDS, settle_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def collector() -> Iterator[None]:
    """The test process's collector as it was, afterwards."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector")
def test_what_starting_made_is_kept_out_of_the_collectors_sight_and_its_garbage_freed() -> None:
    kept = [_Node() for _ in range(1_000)]
    # Garbage of starting that only the collector can free: a cycle.
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second
    frozen_before = gc.get_freeze_count()

    settle_heap()

    # The cycle was freed before the freeze: frozen, it would never be.
    assert gone() is None
    assert gc.get_freeze_count() >= frozen_before + len(kept)
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700
