"""The development channel: one JSON line a message, appended to one file
by every channel standing in on it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from services.notify.channels.devlog import DevLogChannel
from services.notify.domain import Category, Channel, MessageStatus
from services.notify.store import MessageRecord


def message(message_id: str, channel: Channel) -> MessageRecord:
    return MessageRecord(
        message_id=message_id,
        member_id="M-1",
        staff_id=None,
        template="stored_value.debited",
        channel=channel,
        locale="zh-CN",
        body=f"消费 {message_id}",
        status=MessageStatus.QUEUED,
        trigger_event_id=None,
        trace_headers={},
        created_at=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        sent_at=None,
        attempts=0,
        category=Category.TRANSACTIONAL,
        subject=None,
        time_zone="Asia/Shanghai",
        not_before=None,
        next_attempt_at=None,
        provider=None,
        provider_message_id=None,
        delivered_at=None,
        failed_at=None,
        status_reason=None,
        last_error=None,
    )


async def test_channels_sharing_the_file_append_whole_lines_in_order(tmp_path: Path) -> None:
    path = tmp_path / "notify" / "dev-channel.jsonl"
    dev_log = DevLogChannel(path)
    sms = DevLogChannel(path, standing_in_for="sms")
    for i in range(3):
        sent = await dev_log.send(message(f"m{i}", Channel.DEV_LOG))
        assert (sent.provider, sent.provider_message_id) == ("dev_log", f"m{i}")
        await sms.send(message(f"s{i}", Channel.SMS))
    # Each line is on disk as soon as its send returns.
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(line["message_id"], line["channel"]) for line in lines] == [
        (f"{kind}{i}", channel)
        for i in range(3)
        for kind, channel in (("m", "dev_log"), ("s", "sms"))
    ]
    assert lines[0]["body"] == "消费 m0"
    await dev_log.close()
    await sms.close()
    # A channel made again (a restart) adds to what is there.
    again = DevLogChannel(path)
    await again.send(message("m3", Channel.DEV_LOG))
    await again.close()
    assert len(path.read_text(encoding="utf-8").splitlines()) == 7
