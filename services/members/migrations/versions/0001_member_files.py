"""Member files (personal fields encrypted, member data keys), and the chassis tables (outbox, inbox, idempotency keys).

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
        "member_keys",
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("master_key_id", sa.String(64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "members",
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("home_store_id", sa.String(32), nullable=False, index=True),
        sa.Column("given_name_enc", sa.LargeBinary, nullable=False),
        sa.Column("family_name_enc", sa.LargeBinary, nullable=True),
        sa.Column("mobile_enc", sa.LargeBinary, nullable=False),
        sa.Column("mobile_index", sa.String(64), nullable=False, unique=True),
        sa.Column("email_enc", sa.LargeBinary, nullable=True),
        sa.Column("email_index", sa.String(64), nullable=True, index=True),
        sa.Column("birthday_enc", sa.LargeBinary, nullable=True),
        sa.Column("birth_month", sa.SmallInteger, nullable=True),
        sa.Column("gender", sa.String(10), nullable=False, server_default=""),
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
    op.drop_table("member_keys")
    drop_chassis_tables()
