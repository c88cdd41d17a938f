"""Member events with their guests (seats never past the capacity), and
referral campaigns with who referred whom and the referrals (one reward
per campaign and referred member).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-20
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "member_events",
        sa.Column("event_id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False),
        sa.Column("start_at", UTCDateTime, nullable=False),
        sa.Column("end_at", UTCDateTime, nullable=False),
        sa.Column("capacity", sa.Integer, nullable=False),
        sa.Column("rsvp_deadline", UTCDateTime, nullable=False),
        sa.Column("confirmed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.CheckConstraint(
            "confirmed >= 0 AND confirmed <= capacity", name="ck_member_events_confirmed"
        ),
    )
    op.create_index(
        "ix_member_events_store_start", "member_events", ["store_id", "start_at", "event_id"]
    )
    op.create_index("ix_member_events_start", "member_events", ["start_at", "event_id"])
    op.create_table(
        "member_event_guests",
        sa.Column("event_id", sa.String(16), primary_key=True),
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("invited", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("invited_at", UTCDateTime, nullable=True),
        sa.Column("answer", sa.String(3), nullable=False, server_default=""),
        sa.Column("answered_at", UTCDateTime, nullable=True),
        sa.Column("checked_in_at", UTCDateTime, nullable=True),
        sa.Column("checked_in_by", sa.String(100), nullable=False, server_default=""),
        sa.Column("walk_in", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "referral_campaigns",
        sa.Column("campaign_id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("reward", sa.String(8), nullable=False),
        sa.Column("template_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("points", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("start_at", UTCDateTime, nullable=False),
        sa.Column("end_at", UTCDateTime, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index(
        "ix_referral_campaigns_trigger", "referral_campaigns", ["trigger", "start_at"]
    )
    op.create_table(
        "referral_members",
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("referrer_member_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("first_sale_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("first_sale_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "referrals",
        sa.Column("campaign_id", sa.String(40), primary_key=True),
        sa.Column("referred_member_id", sa.String(16), primary_key=True),
        sa.Column("referrer_member_id", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("trigger_reference", sa.String(64), nullable=False, server_default=""),
        sa.Column("reward", sa.String(8), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("coupon_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("points", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("skip_reason", sa.String(40), nullable=False, server_default=""),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("rewarded_at", UTCDateTime, nullable=True),
    )
    op.create_index(
        "ix_referrals_referrer", "referrals", ["referrer_member_id", "created_at"]
    )
    op.create_index("ix_referrals_state", "referrals", ["state", "created_at"])


def downgrade() -> None:
    op.drop_table("referrals")
    op.drop_table("referral_members")
    op.drop_table("referral_campaigns")
    op.drop_table("member_event_guests")
    op.drop_table("member_events")
