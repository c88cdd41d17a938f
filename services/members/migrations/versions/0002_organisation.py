"""The organisation tree (HQ, regions, stores) and the staff directory.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _audit_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_from_store", sa.String(32), nullable=False, server_default=""),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.Column("updated_from_store", sa.String(32), nullable=False, server_default=""),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    ]


def upgrade() -> None:
    op.create_table(
        "regions",
        sa.Column("region_id", sa.String(32), primary_key=True),
        sa.Column("display_name", sa.String(100), nullable=False),
        sa.Column("closed", sa.Boolean, nullable=False, server_default=sa.false()),
        *_audit_columns(),
    )
    op.create_table(
        "stores",
        sa.Column("store_id", sa.String(32), primary_key=True),
        sa.Column("region_id", sa.String(32), sa.ForeignKey("regions.region_id"), nullable=False),
        sa.Column("display_name", sa.String(100), nullable=False),
        sa.Column("province", sa.String(200), nullable=False),
        sa.Column("city", sa.String(200), nullable=False),
        sa.Column("district", sa.String(200), nullable=False, server_default=""),
        sa.Column("street", sa.String(200), nullable=False),
        sa.Column("postcode", sa.String(12), nullable=False, server_default=""),
        sa.Column("time_zone", sa.String(64), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("closed", sa.Boolean, nullable=False, server_default=sa.false()),
        *_audit_columns(),
    )
    op.create_index("ix_stores_region_id", "stores", ["region_id"])
    op.create_table(
        "staff",
        sa.Column("staff_id", sa.String(16), primary_key=True),
        sa.Column("display_name", sa.String(100), nullable=False),
        sa.Column("assignment_level", sa.String(10), nullable=False),
        sa.Column("assignment_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("roles", sa.String(200), nullable=False),
        sa.Column("login_id", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(200), nullable=True),
        sa.Column("failed_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", UTCDateTime, nullable=True),
        sa.Column("state", sa.String(10), nullable=False, server_default="active"),
        sa.Column("left_at", UTCDateTime, nullable=True),
        *_audit_columns(),
    )
    op.create_index("ix_staff_assignment", "staff", ["assignment_level", "assignment_id"])


def downgrade() -> None:
    op.drop_index("ix_staff_assignment", table_name="staff")
    op.drop_table("staff")
    op.drop_index("ix_stores_region_id", table_name="stores")
    op.drop_table("stores")
    op.drop_table("regions")
