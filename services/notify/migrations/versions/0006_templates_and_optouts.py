"""Templates (versioned), the notification policy document, and members'
opt-outs.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notify_policy",
        sa.Column("policy_id", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.Column("updated_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "notify_templates",
        sa.Column("template_id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False, server_default=""),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("trigger", sa.String(64), nullable=False),
        sa.Column("bodies", sa.Text, nullable=False),
        sa.Column("subjects", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("name", "channel", "version", name="uq_notify_templates_version"),
    )
    op.create_index("ix_notify_templates_trigger", "notify_templates", ["trigger"])
    op.create_table(
        "notify_optouts",
        sa.Column("optout_id", sa.String(40), primary_key=True),
        sa.Column("member_id", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("recorded_by", sa.String(100), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("member_id", "channel", "scope", name="uq_notify_optouts_member"),
    )


def downgrade() -> None:
    op.drop_table("notify_optouts")
    op.drop_index("ix_notify_templates_trigger", table_name="notify_templates")
    op.drop_table("notify_templates")
    op.drop_table("notify_policy")
