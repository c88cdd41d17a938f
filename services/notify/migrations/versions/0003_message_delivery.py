"""Messages learn what notify needs to respect members and to deliver:
staff recipients, category, subject, the recipient's time zone, the
earliest send time, retry timing, the provider's id, delivery and failure
times, and why a message failed or was suppressed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("member_id", existing_type=sa.String(16), nullable=True)
        batch.add_column(sa.Column("staff_id", sa.String(16), nullable=True))
        batch.add_column(
            sa.Column("category", sa.String(16), nullable=False, server_default="transactional")
        )
        batch.add_column(sa.Column("subject", sa.String(200), nullable=True))
        batch.add_column(sa.Column("time_zone", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("not_before", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("next_attempt_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("provider", sa.String(32), nullable=True))
        batch.add_column(sa.Column("provider_message_id", sa.String(100), nullable=True))
        batch.add_column(sa.Column("delivered_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("failed_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("status_reason", sa.String(500), nullable=True))
        batch.create_check_constraint(
            "ck_messages_one_recipient", "(member_id IS NULL) <> (staff_id IS NULL)"
        )
        batch.create_index("ix_messages_staff", ["staff_id", "created_at"])
        batch.create_index("ix_messages_provider_id", ["provider", "provider_message_id"])


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_provider_id")
        batch.drop_index("ix_messages_staff")
        batch.drop_constraint("ck_messages_one_recipient", type_="check")
        for column in (
            "status_reason",
            "failed_at",
            "delivered_at",
            "provider_message_id",
            "provider",
            "next_attempt_at",
            "not_before",
            "time_zone",
            "subject",
            "category",
            "staff_id",
        ):
            batch.drop_column(column)
        batch.alter_column("member_id", existing_type=sa.String(16), nullable=False)
