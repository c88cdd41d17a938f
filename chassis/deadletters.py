"""Dead letters: list the events consumers gave up on, replay or discard them.

A consumer that cannot handle an event parks a copy on
``deadletter.<consumer>.<original subject>`` (stream DEADLETTER) with the
original payload and headers plus ``Cornucopia-*`` headers saying where it
came from and why it failed (see ``chassis.inbox``).

Replaying republishes the payload to the original subject with the original
headers (the ``Cornucopia-*`` ones removed). ``ce-id`` is kept, so every
consumer that already handled the event skips it in its inbox and only the
one that failed does the work; ``Nats-Msg-Id`` is made unique per replay so
JetStream's duplicate window does not drop it. Once JetStream has stored the
replayed event, the dead letter is deleted.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from chassis.bus import STREAMS

STREAM = STREAMS["deadletter"].name
SUBJECTS = STREAMS["deadletter"].subjects[0]

ORIGINAL_SUBJECT = "Cornucopia-Original-Subject"
CONSUMER = "Cornucopia-Consumer"
DELIVERIES = "Cornucopia-Deliveries"
ERROR = "Cornucopia-Error"
_OWN_PREFIX = "cornucopia-"
# Headers JetStream interprets on publish (expected stream, last sequence,
# message id, TTL...): none of the original ones may travel with a replay.
_NATS_PREFIX = "nats-"


class DeadLetterNotFound(LookupError):
    """No dead letter has this sequence (never did, or already replayed)."""

    def __init__(self, sequence: int) -> None:
        super().__init__(f"no dead letter with sequence {sequence} in stream {STREAM}")
        self.sequence = sequence


@dataclass(frozen=True)
class DeadLetter:
    sequence: int
    time: dt.datetime | None
    subject: str
    consumer: str
    original_subject: str
    event_id: str
    event_type: str
    deliveries: int
    error: str
    headers: Mapping[str, str] = field(repr=False)
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Replayed:
    sequence: int
    subject: str
    event_id: str
    msg_id: str
    stream: str
    stream_sequence: int
    duplicate: bool


def _header(headers: Mapping[str, str], name: str) -> str:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return ""


def _decode_headers(raw: RawStreamMsg) -> dict[str, str]:
    """The stored header block (``NATS/1.0`` then ``Key: value`` lines) as
    UTF-8; nats-py's own parsing mangles values that are not ASCII."""
    block: bytes | None = None
    if isinstance(raw.hdrs, str | bytes) and raw.hdrs:
        try:
            block = base64.b64decode(raw.hdrs)
        except (binascii.Error, ValueError):
            block = None
    if block is None:
        return {str(k): str(v) for k, v in (raw.headers or {}).items()}
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", errors="replace").split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip():
            headers[key.strip()] = value.strip()
    return headers


def _to_dead_letter(raw: RawStreamMsg) -> DeadLetter:
    headers = _decode_headers(raw)
    subject = raw.subject or ""
    deliveries = _header(headers, DELIVERIES)
    return DeadLetter(
        sequence=int(raw.seq or 0),
        time=raw.time,
        subject=subject,
        consumer=_header(headers, CONSUMER),
        original_subject=_header(headers, ORIGINAL_SUBJECT),
        event_id=_header(headers, "ce-id") or _header(headers, "Nats-Msg-Id"),
        event_type=_header(headers, "ce-type"),
        deliveries=int(deliveries) if deliveries.isdigit() else 0,
        error=_header(headers, ERROR),
        headers=headers,
        data=raw.data or b"",
    )


async def list_dead_letters(js: JetStreamContext, limit: int = 100) -> list[DeadLetter]:
    """The parked messages, oldest first, at most ``limit`` of them. No stream
    yet (no service has run) means no dead letters."""
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        return []
    found: list[DeadLetter] = []
    seq = max(info.state.first_seq, 1)
    while len(found) < limit and seq <= info.state.last_seq:
        try:
            # The next stored message at or after seq: skips deleted ones.
            raw = await js.get_msg(STREAM, seq=seq, subject=SUBJECTS, next=True)
        except NotFoundError:
            break
        found.append(_to_dead_letter(raw))
        seq = int(raw.seq or seq) + 1
    return found


async def get_dead_letter(js: JetStreamContext, sequence: int) -> DeadLetter:
    try:
        raw = await js.get_msg(STREAM, seq=sequence)
    except NotFoundError:
        raise DeadLetterNotFound(sequence) from None
    return _to_dead_letter(raw)


def replay_msg_id(event_id: str, sequence: int) -> str:
    return f"{event_id}:replay:{sequence}"


def replay_headers(letter: DeadLetter) -> dict[str, str]:
    """The original headers: no ``Cornucopia-*`` and no JetStream directives,
    ``ce-id`` unchanged, a ``Nats-Msg-Id`` of the replay's own."""
    headers = {
        key: value
        for key, value in letter.headers.items()
        if not key.lower().startswith((_OWN_PREFIX, _NATS_PREFIX))
    }
    headers["Nats-Msg-Id"] = replay_msg_id(letter.event_id, letter.sequence)
    return headers


async def replay(js: JetStreamContext, sequence: int, *, timeout: float = 5.0) -> Replayed:
    """Republish dead letter ``sequence`` to its original subject, wait for
    JetStream's ack, then delete the dead letter. If the delete fails the
    dead letter stays; replaying it again within the duplicate window is
    acknowledged as a duplicate and not stored twice."""
    letter = await get_dead_letter(js, sequence)
    if not letter.original_subject:
        raise ValueError(f"dead letter {sequence} has no {ORIGINAL_SUBJECT} header")
    if not letter.event_id:
        raise ValueError(f"dead letter {sequence} has no ce-id header")
    headers = replay_headers(letter)
    ack = await js.publish(letter.original_subject, letter.data, timeout=timeout, headers=headers)
    await _delete(js, sequence)
    return Replayed(
        sequence=sequence,
        subject=letter.original_subject,
        event_id=letter.event_id,
        msg_id=headers["Nats-Msg-Id"],
        stream=ack.stream,
        stream_sequence=ack.seq,
        duplicate=bool(ack.duplicate),
    )


async def discard(js: JetStreamContext, sequence: int) -> DeadLetter:
    """Delete a dead letter for good; returns what was deleted."""
    letter = await get_dead_letter(js, sequence)
    await _delete(js, sequence)
    return letter


async def _delete(js: JetStreamContext, sequence: int) -> None:
    try:
        await js.delete_msg(STREAM, sequence)
    except NotFoundError:
        raise DeadLetterNotFound(sequence) from None


def format_time(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_line(letter: DeadLetter) -> str:
    """One line for ``cornucopia deadletters list``: tab-separated."""
    fields: list[Any] = [
        letter.sequence,
        format_time(letter.time),
        letter.consumer or "-",
        letter.original_subject or "-",
        letter.event_id or "-",
        letter.deliveries,
        " ".join(letter.error.split()) or "-",
    ]
    return "\t".join(str(f) for f in fields)


LIST_HEADER = "\t".join(("SEQ", "TIME", "CONSUMER", "SUBJECT", "CE-ID", "DELIVERIES", "ERROR"))
