"""Delivery: the postal mailing list a print shop works from, and an index
for listing the dead letters (failed messages, latest first).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "postal_mailings",
        sa.Column("message_id", sa.String(40), primary_key=True),
        sa.Column("member_id", sa.String(16), nullable=False),
        sa.Column("template", sa.String(64), nullable=False),
        sa.Column("locale", sa.String(10), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("export_id", sa.String(40), nullable=True),
        sa.Column("exported_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_postal_mailings_export", "postal_mailings", ["export_id", "created_at"])
    op.create_index("ix_messages_failed", "messages", ["status", "failed_at"])


def downgrade() -> None:
    op.drop_index("ix_messages_failed", table_name="messages")
    op.drop_table("postal_mailings")
