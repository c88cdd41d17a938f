"""Scheduled jobs' runs (birthdays, anniversaries, weekly digests) and
direct sends with their listed members.

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0007"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedule_runs",
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("period", sa.String(80), primary_key=True),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("cursor", sa.String(1024), nullable=False, server_default=""),
        sa.Column("claimed_by", sa.String(64), nullable=False),
        sa.Column("lease_until", UTCDateTime, nullable=False),
        sa.Column("members_read", sa.Integer, nullable=False, server_default="0"),
        sa.Column("written", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "sends",
        sa.Column("send_id", sa.String(40), primary_key=True),
        sa.Column("trigger", sa.String(64), nullable=False),
        sa.Column("template", sa.String(64), nullable=True),
        sa.Column("channel", sa.String(16), nullable=True),
        sa.Column("segment_id", sa.String(40), nullable=False, server_default=""),
        sa.Column("segment_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("criteria", sa.Text, nullable=True),
        sa.Column("schedule_at", UTCDateTime, nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("approval_required", sa.Boolean, nullable=False),
        sa.Column("audience_size", sa.Integer, nullable=False),
        sa.Column("processed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("written", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cursor", sa.String(1024), nullable=False, server_default=""),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("lease_until", UTCDateTime, nullable=True),
        sa.Column("trace_headers", sa.JSON, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("approved_by", sa.String(100), nullable=True),
        sa.Column("approved_at", UTCDateTime, nullable=True),
        sa.Column("rejected_by", sa.String(100), nullable=True),
        sa.Column("rejected_at", UTCDateTime, nullable=True),
        sa.Column("cancelled_by", sa.String(100), nullable=True),
        sa.Column("cancelled_at", UTCDateTime, nullable=True),
        sa.Column("reason", sa.String(500), nullable=False, server_default=""),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_sends_state", "sends", ["state", "created_at"])
    op.create_index("ix_sends_created", "sends", ["created_at", "send_id"])
    op.create_table(
        "send_members",
        sa.Column("send_id", sa.String(40), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("member_id", sa.String(64), nullable=False),
        sa.UniqueConstraint("send_id", "member_id", name="uq_send_members_member"),
    )


def downgrade() -> None:
    op.drop_table("send_members")
    op.drop_table("sends")
    op.drop_table("schedule_runs")
