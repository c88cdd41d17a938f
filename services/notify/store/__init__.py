"""Notify's tables and queries, one module per area (messages and their
delivery; templates, opt-outs, direct sends). Every table registers on
``metadata``; the migrations' env imports the modules through this one.

The message-level names are re-exported here because the dispatcher and
most tests use them."""

from __future__ import annotations

from services.notify.store import intents  # noqa: F401  (registers its table)
from services.notify.store.base import metadata
from services.notify.store.messages import (
    MESSAGES_QUEUED,
    MessageRecord,
    claim_queued,
    list_for_member,
    mark_attempt_failed,
    mark_sent,
    messages,
    queue_message,
    release_claims,
)

__all__ = [
    "MESSAGES_QUEUED",
    "MessageRecord",
    "claim_queued",
    "list_for_member",
    "mark_attempt_failed",
    "mark_sent",
    "messages",
    "metadata",
    "queue_message",
    "release_claims",
]
