"""Sales, their lines and tenders, the checkout and refund sagas' logs, and
what the checkout keeps of stores and members. Merges the points (0002) and
the rules and tiers (0003) branches.

Revision ID: 0004
Revises: 0002, 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0004"
down_revision = ("0002", "0003")
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkouts",
        sa.Column("checkout_id", sa.String(64), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("step", sa.String(12), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
        sa.Column("store_id", sa.String(32), nullable=False),
        sa.Column("member_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("card_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("points_hold_id", sa.String(100), nullable=False, server_default=""),
        sa.Column("sv_hold_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("sv_movement_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("sale_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("error", sa.Text, nullable=False, server_default=""),
        sa.Column("receipt", sa.LargeBinary, nullable=True),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("lease_until", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_checkouts_open", "checkouts", ["step", "lease_until"])
    op.create_table(
        "sales",
        sa.Column("sale_id", sa.String(16), primary_key=True),
        sa.Column("checkout_id", sa.String(64), nullable=False, unique=True),
        sa.Column("store_id", sa.String(32), nullable=False),
        sa.Column("terminal_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("member_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("card_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("gross", sa.BigInteger, nullable=False),
        sa.Column("discount", sa.BigInteger, nullable=False),
        sa.Column("total", sa.BigInteger, nullable=False),
        sa.Column("points_earned", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("points_spent", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("points_reversed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("refunded", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("business_day", sa.Date, nullable=False),
        sa.Column("sold_at", UTCDateTime, nullable=False),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("receipt", sa.LargeBinary, nullable=False),
        sa.CheckConstraint("refunded <= total", name="ck_sales_refunded"),
    )
    op.create_index("ix_sales_member", "sales", ["member_id", "sold_at"])
    op.create_index("ix_sales_store", "sales", ["store_id", "sold_at"])
    op.create_table(
        "sale_lines",
        sa.Column("sale_id", sa.String(16), primary_key=True),
        sa.Column("line_no", sa.Integer, primary_key=True),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("category", sa.String(64), nullable=False, server_default=""),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("unit_price", sa.BigInteger, nullable=False),
        sa.Column("net", sa.BigInteger, nullable=False),
        sa.Column("quantity_refunded", sa.Integer, nullable=False, server_default="0"),
        sa.CheckConstraint("quantity_refunded <= quantity", name="ck_sale_lines_refunded"),
    )
    op.create_table(
        "sale_tenders",
        sa.Column("sale_id", sa.String(16), primary_key=True),
        sa.Column("kind", sa.String(12), primary_key=True),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("points", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("movement_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("refunded_amount", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("refunded_points", sa.BigInteger, nullable=False, server_default="0"),
        sa.CheckConstraint("refunded_amount <= amount", name="ck_sale_tenders_refunded"),
    )
    op.create_table(
        "refunds",
        sa.Column("refund_id", sa.String(16), primary_key=True),
        sa.Column("request_id", sa.String(200), nullable=False, unique=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("sale_id", sa.String(16), nullable=False),
        sa.Column("step", sa.String(12), nullable=False),
        sa.Column("is_void", sa.Boolean, nullable=False),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("sv_movement_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("receipt", sa.LargeBinary, nullable=True),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("lease_until", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_refunds_sale", "refunds", ["sale_id", "created_at"])
    op.create_index("ix_refunds_open", "refunds", ["step", "lease_until"])
    op.create_table(
        "store_facts",
        sa.Column("store_id", sa.String(32), primary_key=True),
        sa.Column("region_id", sa.String(32), nullable=False),
        sa.Column("time_zone", sa.String(64), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("fetched_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "member_facts",
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("birthday_month", sa.SmallInteger, nullable=True),
        sa.Column("fetched_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "member_facts",
        "store_facts",
        "refunds",
        "sale_tenders",
        "sale_lines",
        "sales",
        "checkouts",
    ):
        op.drop_table(table)
