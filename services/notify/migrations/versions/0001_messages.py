"""Messages, and the chassis tables (outbox, inbox, idempotency keys).

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime
from chassis.migrations import create_chassis_tables, drop_chassis_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_chassis_tables()
    op.create_table(
        "messages",
        sa.Column("message_id", sa.String(40), primary_key=True),
        sa.Column("member_id", sa.String(16), nullable=False),
        sa.Column("template", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("locale", sa.String(10), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger_event_id", sa.String(64), nullable=True),
        sa.Column("trace_headers", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("sent_at", UTCDateTime, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.UniqueConstraint("trigger_event_id", "template", "channel", name="uq_messages_trigger"),
    )
    op.create_index("ix_messages_member", "messages", ["member_id", "created_at"])
    op.create_index("ix_messages_status", "messages", ["status", "created_at"])


def downgrade() -> None:
    op.drop_table("messages")
    drop_chassis_tables()
