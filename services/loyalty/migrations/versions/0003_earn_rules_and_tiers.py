"""Earn rule sets, the tier ladder, members' tiers, qualifying activity,
tier history and the review periods done.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import BigIntKey, UTCDateTime

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "earn_rule_sets",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("effective_at", UTCDateTime, nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("published_by", sa.String(100), nullable=False),
        sa.Column("published_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("published_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_earn_rule_sets_effective_at", "earn_rule_sets", ["effective_at"])
    op.create_table(
        "tier_ladder",
        sa.Column("ladder_id", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.Column("updated_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "member_tiers",
        sa.Column("member_id", sa.String(64), primary_key=True),
        sa.Column("tier_id", sa.String(32), nullable=False),
        sa.Column("since", UTCDateTime, nullable=True),
        sa.Column("grace_until", UTCDateTime, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_member_tiers_grace_until", "member_tiers", ["grace_until"])
    op.create_table(
        "tier_activity",
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("reference", sa.String(64), primary_key=True),
        sa.Column("sale_id", sa.String(64), nullable=False),
        sa.Column("member_id", sa.String(64), nullable=False),
        sa.Column("business_day", sa.Date, nullable=False),
        sa.Column("spend_minor_units", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_tier_activity_member_day", "tier_activity", ["member_id", "business_day"])
    op.create_index("ix_tier_activity_sale", "tier_activity", ["sale_id"])
    op.create_table(
        "tier_history",
        sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("member_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("from_tier_id", sa.String(32), nullable=False),
        sa.Column("to_tier_id", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False, server_default=""),
        sa.Column("sale_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("period", sa.String(16), nullable=False, server_default=""),
        sa.Column("grace_until", UTCDateTime, nullable=True),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_tier_history_member", "tier_history", ["member_id", "seq"])
    op.create_table(
        "tier_reviews",
        sa.Column("period", sa.String(16), primary_key=True),
        sa.Column("period_end", UTCDateTime, nullable=False),
        sa.Column("as_of", UTCDateTime, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("cursor", sa.String(64), nullable=False, server_default=""),
        sa.Column("claimed_by", sa.String(64), nullable=False),
        sa.Column("lease_until", UTCDateTime, nullable=False),
        sa.Column("members_reviewed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("entered_grace", sa.Integer, nullable=False, server_default="0"),
        sa.Column("left_grace", sa.Integer, nullable=False, server_default="0"),
        sa.Column("downgraded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("requested_by", sa.String(100), nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )


def downgrade() -> None:
    for table in (
        "tier_reviews",
        "tier_history",
        "tier_activity",
        "member_tiers",
        "tier_ladder",
        "earn_rule_sets",
    ):
        op.drop_table(table)
