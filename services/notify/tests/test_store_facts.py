"""A store's name and time zone are asked of members once a minute at most:
planning needs them for nearly every message, and they seldom change."""

from __future__ import annotations

from typing import Any

from chassis.config import Settings
from cornucopia.members.v1 import organisation_pb2
from services.notify.peers import STORE_CACHE_SECONDS, MembersPeer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_store_facts_are_kept_for_a_minute_and_a_missing_store_is_not() -> None:
    clock = Clock()
    members = MembersPeer(Settings(service="notify", environment="test"), clock=clock)
    names = {"S001": "People's Square"}
    asked: list[str] = []

    async def call(_method: Any, request: Any, **_options: Any) -> Any:
        asked.append(request.store_id)
        name = names.get(request.store_id)
        if name is None:
            return None
        return organisation_pb2.Store(
            store_id=request.store_id, display_name=name, time_zone="Asia/Shanghai"
        )

    members.peer.call = call  # type: ignore[method-assign]
    try:
        first = await members.store("S001")
        assert first is not None and first.display_name == "People's Square"
        names["S001"] = "People's Square Flagship"
        clock.now += STORE_CACHE_SECONDS - 1
        kept = await members.store("S001")
        assert kept == first
        assert asked == ["S001"]

        clock.now += 2
        renamed = await members.store("S001")
        assert renamed is not None and renamed.display_name == "People's Square Flagship"
        assert asked == ["S001", "S001"]

        # A store members does not know yet is asked again next time.
        assert await members.store("S999") is None
        names["S999"] = "New Town"
        found = await members.store("S999")
        assert found is not None and found.display_name == "New Town"
        assert asked[-2:] == ["S999", "S999"]
    finally:
        await members.close()
