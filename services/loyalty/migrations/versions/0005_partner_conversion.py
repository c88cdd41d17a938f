"""Conversions with partners: each partner's terms and the conversions
made under them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10
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
        "conversion_terms",
        sa.Column("partner_id", sa.String(64), primary_key=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("last_sequence", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.Column("updated_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "conversions",
        sa.Column("conversion_id", sa.String(16), primary_key=True),
        sa.Column("partner_id", sa.String(64), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String(200), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(10), nullable=False),
        sa.Column("member_id", sa.String(32), nullable=False),
        sa.Column("requested", sa.BigInteger, nullable=False),
        sa.Column("partner_points", sa.BigInteger, nullable=False),
        sa.Column("chain_points", sa.BigInteger, nullable=False),
        sa.Column("rate_partner_points", sa.BigInteger, nullable=False),
        sa.Column("rate_chain_points", sa.BigInteger, nullable=False),
        sa.Column("partner_reference", sa.String(100), nullable=False, server_default=""),
        sa.Column("movement_id", sa.String(16), nullable=False),
        sa.Column("balance_after", sa.BigInteger, nullable=False),
        sa.Column("business_day", sa.Date, nullable=False),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("partner_id", "request_id", name="uq_conversions_request"),
        sa.UniqueConstraint("partner_id", "sequence", name="uq_conversions_sequence"),
        sa.CheckConstraint("partner_points > 0", name="ck_conversions_partner_points"),
        sa.CheckConstraint("chain_points > 0", name="ck_conversions_chain_points"),
    )
    op.create_index(
        "ix_conversions_member_day",
        "conversions",
        ["partner_id", "member_id", "direction", "business_day"],
    )


def downgrade() -> None:
    op.drop_index("ix_conversions_member_day", table_name="conversions")
    op.drop_table("conversions")
    op.drop_table("conversion_terms")
