"""Points (policy, accounts, lots, movements, holds), the gift catalogue
(gifts, stock, stock changes, redemptions) and the members projection.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import BigIntKey, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _points(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger, nullable=False, server_default="0")


def _text(name: str, length: int) -> sa.Column[str]:
    return sa.Column(name, sa.String(length), nullable=False, server_default="")


def upgrade() -> None:
    op.create_table(
        "known_members",
        sa.Column("member_id", sa.String(32), primary_key=True),
        sa.Column("state", sa.String(10), nullable=False),
        _text("merged_into", 32),
        sa.Column("as_of", UTCDateTime, nullable=False),
    )
    op.create_table(
        "points_policy",
        sa.Column("policy_id", sa.SmallInteger, primary_key=True),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        _text("updated_store_id", 32),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "points_accounts",
        sa.Column("member_id", sa.String(32), primary_key=True),
        _points("balance"),
        _points("held"),
        _points("lifetime_earned"),
        sa.Column("opened_at", UTCDateTime, nullable=False),
        sa.Column("closed_at", UTCDateTime, nullable=True),
        _text("closed_reason", 10),
        _text("merged_into", 32),
        # The last line of defence: no code path can leave points below 0
        # or hold more than there is.
        sa.CheckConstraint("balance >= 0", name="ck_points_accounts_balance"),
        sa.CheckConstraint("held >= 0", name="ck_points_accounts_held"),
        sa.CheckConstraint("held <= balance", name="ck_points_accounts_held_balance"),
        sa.CheckConstraint("lifetime_earned >= 0", name="ck_points_accounts_lifetime"),
    )
    op.create_table(
        "points_lots",
        sa.Column("lot_id", sa.String(16), primary_key=True),
        sa.Column("member_id", sa.String(32), nullable=False),
        sa.Column("source", sa.String(24), nullable=False),
        _text("reference", 100),
        sa.Column("points", sa.BigInteger, nullable=False),
        sa.Column("remaining", sa.BigInteger, nullable=False),
        sa.Column("earned_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("warned_at", UTCDateTime, nullable=True),
        sa.Column("expired_at", UTCDateTime, nullable=True),
        _text("origin_lot_id", 16),
        sa.CheckConstraint("points > 0", name="ck_points_lots_points"),
        sa.CheckConstraint("remaining >= 0", name="ck_points_lots_remaining"),
        sa.CheckConstraint("remaining <= points", name="ck_points_lots_remaining_points"),
    )
    op.create_index("ix_points_lots_member", "points_lots", ["member_id", "expires_at"])
    op.create_index("ix_points_lots_expiry", "points_lots", ["expires_at"])
    op.create_index("ix_points_lots_reference", "points_lots", ["member_id", "reference"])
    op.create_table(
        "points_movements",
        sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("movement_id", sa.String(16), nullable=False, unique=True),
        sa.Column("member_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(12), nullable=False),
        sa.Column("points", sa.BigInteger, nullable=False),
        sa.Column("balance_after", sa.BigInteger, nullable=False),
        _points("requested"),
        _text("source", 24),
        _text("reference", 100),
        _text("reason", 200),
        _text("related_member_id", 32),
        _text("lot_id", 16),
        sa.Column("principal", sa.String(100), nullable=False),
        _text("store_id", 32),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("request_id", sa.String(220), nullable=False),
        _text("request_hash", 64),
        # A request id is bound to its movement for good, not just while the
        # idempotency key is kept.
        sa.UniqueConstraint("kind", "request_id", name="uq_points_movements_request"),
    )
    op.create_index("ix_points_movements_member", "points_movements", ["member_id", "seq"])
    op.create_table(
        "points_holds",
        sa.Column("hold_id", sa.String(100), primary_key=True),
        sa.Column("member_id", sa.String(32), nullable=False),
        sa.Column("points", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        _text("reference", 100),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        _text("spend_reference", 100),
        _text("movement_id", 16),
        sa.Column("principal", sa.String(100), nullable=False),
        _text("store_id", 32),
        sa.Column("held_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.CheckConstraint("points > 0", name="ck_points_holds_points"),
    )
    op.create_index("ix_points_holds_due", "points_holds", ["state", "expires_at"])
    op.create_index("ix_points_holds_member", "points_holds", ["member_id", "state"])
    op.create_table(
        "gifts",
        sa.Column("gift_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("points_price", sa.BigInteger, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_by", sa.String(100), nullable=False),
        _text("created_store_id", 32),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        _text("updated_store_id", 32),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("points_price > 0", name="ck_gifts_points_price"),
    )
    op.create_table(
        "gift_stock",
        sa.Column("gift_id", sa.String(32), primary_key=True),
        sa.Column("store_id", sa.String(32), primary_key=True),
        sa.Column("quantity", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("quantity >= 0", name="ck_gift_stock_quantity"),
    )
    op.create_table(
        "gift_stock_changes",
        sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("gift_id", sa.String(32), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False),
        sa.Column("delta", sa.BigInteger, nullable=False),
        sa.Column("quantity_after", sa.BigInteger, nullable=False),
        sa.Column("reference", sa.String(220), nullable=False),
        sa.Column("principal", sa.String(100), nullable=False),
        _text("principal_store_id", 32),
        sa.Column("at", UTCDateTime, nullable=False),
    )
    op.create_index(
        "ix_gift_stock_changes_gift", "gift_stock_changes", ["gift_id", "store_id", "seq"]
    )
    op.create_table(
        "gift_redemptions",
        sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("redemption_id", sa.String(16), nullable=False, unique=True),
        sa.Column("request_id", sa.String(220), nullable=False, unique=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("member_id", sa.String(32), nullable=False),
        sa.Column("gift_id", sa.String(32), nullable=False),
        _text("store_id", 32),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("points", sa.BigInteger, nullable=False),
        _text("stock_store_id", 32),
        sa.Column("balance_after", sa.BigInteger, nullable=False),
        sa.Column("movement_id", sa.String(16), nullable=False),
        sa.Column("principal", sa.String(100), nullable=False),
        _text("principal_store_id", 32),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.CheckConstraint("quantity > 0", name="ck_gift_redemptions_quantity"),
    )
    op.create_index("ix_gift_redemptions_member", "gift_redemptions", ["member_id", "seq"])


def downgrade() -> None:
    for table in (
        "gift_redemptions",
        "gift_stock_changes",
        "gift_stock",
        "gifts",
        "points_holds",
        "points_movements",
        "points_lots",
        "points_accounts",
        "points_policy",
        "known_members",
    ):
        op.drop_table(table)
