"""Points lotteries: lotteries, their prizes with stock (never below zero)
and the draws with their recorded randomness.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-18
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
        "lotteries",
        sa.Column("lottery_id", sa.String(16), primary_key=True),
        sa.Column("display_name", sa.String(100), nullable=False),
        sa.Column("start_at", UTCDateTime, nullable=False),
        sa.Column("end_at", UTCDateTime, nullable=False),
        sa.Column("cost_points", sa.BigInteger, nullable=False),
        sa.Column("no_prize_weight", sa.BigInteger, nullable=False),
        sa.Column("table_version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_lotteries_created", "lotteries", ["created_at", "lottery_id"])
    op.create_table(
        "lottery_prizes",
        sa.Column("lottery_id", sa.String(16), primary_key=True),
        sa.Column("prize_id", sa.String(40), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("display_name", sa.String(100), nullable=False, server_default=""),
        sa.Column("template_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("points", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("gift_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("initial_stock", sa.BigInteger, nullable=False),
        sa.Column("stock", sa.BigInteger, nullable=False),
        sa.Column("weight", sa.BigInteger, nullable=False),
        sa.CheckConstraint("stock >= 0", name="ck_lottery_prizes_stock"),
        sa.CheckConstraint("stock <= initial_stock", name="ck_lottery_prizes_initial"),
    )
    op.create_table(
        "lottery_draws",
        sa.Column("draw_id", sa.String(16), primary_key=True),
        sa.Column("request_id", sa.String(220), nullable=False, unique=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("lottery_id", sa.String(16), nullable=False),
        sa.Column("member_id", sa.String(64), nullable=False),
        sa.Column("cost_points", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("charge_movement_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("seed", sa.String(64), nullable=False, server_default=""),
        sa.Column("table_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rounds", sa.Text, nullable=False, server_default="[]"),
        sa.Column("prize_id", sa.String(40), nullable=False, server_default=""),
        sa.Column("fulfilment", sa.String(16), nullable=False, server_default=""),
        sa.Column("coupon_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("points_lot_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("refund_lot_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("refund_reason", sa.String(200), nullable=False, server_default=""),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("drawn_at", UTCDateTime, nullable=True),
    )
    op.create_index(
        "ix_lottery_draws_member", "lottery_draws", ["member_id", "created_at", "draw_id"]
    )
    op.create_index(
        "ix_lottery_draws_lottery", "lottery_draws", ["lottery_id", "created_at", "draw_id"]
    )
    op.create_index("ix_lottery_draws_work", "lottery_draws", ["state", "fulfilment"])


def downgrade() -> None:
    op.drop_table("lottery_draws")
    op.drop_table("lottery_prizes")
    op.drop_table("lotteries")
