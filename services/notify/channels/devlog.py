"""The development channel: each message is written as a JSON line under
var/ and noted in the log, and nothing leaves the machine. Channels without
configuration fall back to it, so development needs no credentials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from chassis.logs import get_logger
from services.notify.channels import ChannelError, Needs, Sent
from services.notify.store import MessageRecord

log = get_logger(__name__)


class DevLogChannel:
    needs = Needs.NOTHING

    def __init__(self, path: Path, *, standing_in_for: str = "dev_log") -> None:
        self.path = path
        # The channel this one replaces, written with each line.
        self.standing_in_for = standing_in_for
        # Opened at the first message and kept: a line is one write to the
        # end of the file (appending, so channels sharing it never overlap),
        # as a log line is, not an open, a write and a close in a thread.
        self._file: TextIO | None = None

    async def send(self, message: MessageRecord, address: str = "") -> Sent:
        line = json.dumps(
            {
                "message_id": message.message_id,
                "channel": self.standing_in_for,
                "member_id": message.member_id,
                "staff_id": message.staff_id,
                "template": message.template,
                "locale": message.locale,
                "subject": message.subject,
                "body": message.body,
            },
            ensure_ascii=False,
        )
        try:
            self._append(line)
        except OSError as exc:
            raise ChannelError(str(exc)) from exc
        log.info(
            "message written to the development channel",
            channel=self.standing_in_for,
            message_id=message.message_id,
            member_id=message.member_id,
            template=message.template,
        )
        return Sent("dev_log", message.message_id)

    def _append(self, line: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(line + "\n")
        self._file.flush()

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
