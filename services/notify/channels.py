"""Channels hand a message to the outside world. Each is one class behind
the ``Channel`` protocol; the notify issue brings SMS, e-mail, push, call
tasks and post. Until then the development channel writes each message as a
JSON line under var/ and to the log, and nothing leaves the machine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Protocol

from chassis.logs import get_logger
from services.notify.store import MessageRecord

log = get_logger(__name__)


class ChannelError(Exception):
    """The channel could not take the message; it is retried."""


class Channel(Protocol):
    async def send(self, message: MessageRecord) -> None: ...


class DevLogChannel:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def send(self, message: MessageRecord) -> None:
        line = json.dumps(
            {
                "message_id": message.message_id,
                "member_id": message.member_id,
                "template": message.template,
                "locale": message.locale,
                "body": message.body,
            },
            ensure_ascii=False,
        )
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, line)
            except OSError as exc:
                raise ChannelError(str(exc)) from exc
        log.info(
            "message sent",
            channel="dev_log",
            message_id=message.message_id,
            member_id=message.member_id,
            template=message.template,
        )

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
