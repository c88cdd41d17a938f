"""Notify's tables and queries, one module per area (messages and their
delivery; templates, opt-outs, direct sends; the providers' send pace).
Every table registers on ``metadata``; the migrations' env imports the
modules through this one.

The message-level names are re-exported here because the dispatcher and
most tests use them."""

from __future__ import annotations

from services.notify.store import (
    intents,  # noqa: F401  (registers its table)
    optouts,  # noqa: F401  (registers its table)
    pace,  # noqa: F401  (registers its table)
    policy,  # noqa: F401  (registers its table)
    postal,  # noqa: F401  (registers its table)
    schedules,  # noqa: F401  (registers its table)
    sends,  # noqa: F401  (registers its tables)
    templates,  # noqa: F401  (registers its table)
)
from services.notify.store.base import metadata
from services.notify.store.messages import (
    MESSAGE_QUEUED,
    MESSAGES_QUEUED,
    MessageRecord,
    Receipt,
    claim_queued,
    get_message,
    list_failed,
    list_for_recipient,
    mark_attempt_failed,
    mark_failed,
    mark_sent,
    mark_sent_announced,
    messages,
    postpone,
    queue_message,
    record_receipt,
    release_claims,
    replay,
)

__all__ = [
    "MESSAGES_QUEUED",
    "MESSAGE_QUEUED",
    "MessageRecord",
    "Receipt",
    "claim_queued",
    "get_message",
    "list_failed",
    "list_for_recipient",
    "mark_attempt_failed",
    "mark_failed",
    "mark_sent",
    "mark_sent_announced",
    "messages",
    "metadata",
    "postpone",
    "queue_message",
    "record_receipt",
    "release_claims",
    "replay",
]
