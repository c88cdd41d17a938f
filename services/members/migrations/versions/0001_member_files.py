"""Member files, and the chassis tables (outbox, inbox, idempotency keys).

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
        "members",
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("home_store_id", sa.String(32), nullable=False, index=True),
        sa.Column("given_name", sa.String(100), nullable=False),
        sa.Column("family_name", sa.String(100), nullable=False, server_default=""),
        sa.Column("mobile", sa.String(20), nullable=False, unique=True),
        sa.Column("email", sa.String(254), nullable=False, server_default=""),
        sa.Column("gender", sa.String(10), nullable=False, server_default=""),
        sa.Column("birth_year", sa.SmallInteger, nullable=True),
        sa.Column("birth_month", sa.SmallInteger, nullable=True),
        sa.Column("birth_day", sa.SmallInteger, nullable=True),
        sa.Column("enrollment_channel", sa.String(20), nullable=False),
        sa.Column("preferred_language", sa.String(10), nullable=False),
        sa.Column("enrolled_by", sa.String(100), nullable=False),
        sa.Column("enrolled_from_store", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )


def downgrade() -> None:
    op.drop_table("members")
    drop_chassis_tables()
