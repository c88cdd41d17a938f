"""Notifications wanted and not yet planned into messages: what an event, a
schedule or a direct send calls for, before the planner looks the
recipient up and applies policy and template.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("notification_id", sa.String(40), primary_key=True),
        sa.Column("dedup_key", sa.String(120), nullable=False, unique=True),
        sa.Column("trigger", sa.String(64), nullable=False),
        sa.Column("member_id", sa.String(16), nullable=True),
        sa.Column("staff_id", sa.String(16), nullable=True),
        sa.Column("category", sa.String(16), nullable=False),
        sa.Column("variables", sa.Text, nullable=False),
        sa.Column("channel", sa.String(16), nullable=True),
        sa.Column("template", sa.String(64), nullable=True),
        sa.Column("send_id", sa.String(40), nullable=True),
        sa.Column("not_before", UTCDateTime, nullable=True),
        sa.Column("trigger_event_id", sa.String(64), nullable=True),
        sa.Column("trace_headers", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("planned_at", UTCDateTime, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UTCDateTime, nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.CheckConstraint(
            "(member_id IS NULL) <> (staff_id IS NULL)", name="ck_notifications_one_recipient"
        ),
    )
    op.create_index("ix_notifications_pending", "notifications", ["planned_at", "created_at"])
    op.create_index("ix_notifications_send", "notifications", ["send_id"])


def downgrade() -> None:
    op.drop_table("notifications")
