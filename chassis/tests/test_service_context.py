"""What a service opens for itself is closed when it stops."""

from __future__ import annotations

from typing import Any, cast

import pytest

from chassis.service import ServiceContext

pytestmark = pytest.mark.asyncio


def _context() -> ServiceContext:
    # Closing touches neither the database nor the bus.
    return ServiceContext(settings=cast(Any, None), db=cast(Any, None), bus=cast(Any, None))


async def test_closers_run_last_opened_first_and_once() -> None:
    ctx = _context()
    closed: list[str] = []

    async def close_channel() -> None:
        closed.append("channel")

    async def close_cache() -> None:
        closed.append("cache")

    ctx.on_close(close_channel)
    ctx.on_close(close_cache)
    await ctx.close()
    await ctx.close()
    assert closed == ["cache", "channel"]


async def test_a_failing_closer_does_not_keep_the_others_open() -> None:
    ctx = _context()
    closed: list[str] = []

    async def broken() -> None:
        raise RuntimeError("already gone")

    async def close_channel() -> None:
        closed.append("channel")

    ctx.on_close(close_channel)
    ctx.on_close(broken)
    await ctx.close()
    assert closed == ["channel"]
