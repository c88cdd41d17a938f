"""Pricing and coupons: promotions, coupon templates with their counters,
issued coupons, redemptions, issue jobs and their members.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-20
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import BigIntKey, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "coupon_issue_job_members",
        sa.Column("job_id", sa.String(length=16), nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=40), server_default="", nullable=False),
        sa.Column("coupon_id", sa.String(length=16), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("job_id", "member_id"),
    )
    op.create_index(
        "ix_coupon_issue_job_members_pending",
        "coupon_issue_job_members",
        ["job_id", "outcome", "position"],
        unique=False,
    )
    op.create_table(
        "coupon_issue_jobs",
        sa.Column("job_id", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=220), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("template_id", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("processed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("issued", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("skipped", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_store_id", sa.String(length=32), server_default="", nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("job_id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("ix_coupon_issue_jobs_state", "coupon_issue_jobs", ["state"], unique=False)
    op.create_table(
        "coupon_member_counts",
        sa.Column("template_id", sa.String(length=16), nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("issued", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("template_id", "member_id"),
    )
    op.create_table(
        "coupon_redemptions",
        sa.Column("seq", BigIntKey, autoincrement=True, nullable=False),
        sa.Column("coupon_id", sa.String(length=16), nullable=False),
        sa.Column("template_id", sa.String(length=16), nullable=False),
        sa.Column("store_id", sa.String(length=32), server_default="", nullable=False),
        sa.Column("sale_id", sa.String(length=64), nullable=False),
        sa.Column("discount", sa.BigInteger(), nullable=False),
        sa.Column("sales", sa.BigInteger(), nullable=False),
        sa.Column("redeemed_at", UTCDateTime, nullable=False),
        sa.Column("reversed_by", sa.String(length=64), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("coupon_id", "sale_id", name="uq_coupon_redemptions_sale"),
    )
    op.create_index(
        "ix_coupon_redemptions_template",
        "coupon_redemptions",
        ["template_id", "redeemed_at"],
        unique=False,
    )
    op.create_table(
        "coupon_templates",
        sa.Column("template_id", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("per_member_limit", sa.Integer(), server_default="0", nullable=False),
        sa.Column("total_quantity", sa.BigInteger(), nullable=True),
        sa.Column("budget", sa.BigInteger(), nullable=True),
        sa.Column("cost", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("issued_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("budget_used", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_store_id", sa.String(length=32), server_default="", nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.CheckConstraint(
            "budget IS NULL OR budget_used <= budget", name="ck_coupon_templates_budget"
        ),
        sa.CheckConstraint(
            "total_quantity IS NULL OR issued_count <= total_quantity",
            name="ck_coupon_templates_quantity",
        ),
        sa.PrimaryKeyConstraint("template_id"),
    )
    op.create_index(
        "ix_coupon_templates_created",
        "coupon_templates",
        ["created_at", "template_id"],
        unique=False,
    )
    op.create_table(
        "coupons",
        sa.Column("coupon_id", sa.String(length=16), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("template_id", sa.String(length=16), nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("issued_at", UTCDateTime, nullable=False),
        sa.Column("issued_store_id", sa.String(length=32), server_default="", nullable=False),
        sa.Column("issued_by", sa.String(length=100), nullable=False),
        sa.Column("job_id", sa.String(length=16), server_default="", nullable=False),
        sa.Column("valid_from", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("reservation_id", sa.String(length=64), server_default="", nullable=False),
        sa.Column("reserved_until", UTCDateTime, nullable=True),
        sa.Column("reserved_store_id", sa.String(length=32), server_default="", nullable=False),
        sa.Column("reserved_discount", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reserved_basket_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("sale_id", sa.String(length=64), server_default="", nullable=False),
        sa.Column("redeemed_at", UTCDateTime, nullable=True),
        sa.Column("expired_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("coupon_id"),
        sa.UniqueConstraint("code"),
    )
    op.create_index("ix_coupons_due", "coupons", ["state", "expires_at"], unique=False)
    op.create_index(
        "ix_coupons_member", "coupons", ["member_id", "issued_at", "coupon_id"], unique=False
    )
    op.create_index("ix_coupons_reservation", "coupons", ["reservation_id"], unique=False)
    op.create_index("ix_coupons_reserved", "coupons", ["state", "reserved_until"], unique=False)
    op.create_index("ix_coupons_sale", "coupons", ["sale_id"], unique=False)
    op.create_index(
        "ix_coupons_template_issued", "coupons", ["template_id", "issued_at"], unique=False
    )
    op.create_table(
        "promotions",
        sa.Column("promotion_id", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("starts_at", UTCDateTime, nullable=False),
        sa.Column("ends_at", UTCDateTime, nullable=True),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_store_id", sa.String(length=32), server_default="", nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("promotion_id"),
    )
    op.create_index(
        "ix_promotions_created", "promotions", ["created_at", "promotion_id"], unique=False
    )
    op.create_index("ix_promotions_window", "promotions", ["starts_at", "ends_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_promotions_window", table_name="promotions")
    op.drop_index("ix_promotions_created", table_name="promotions")
    op.drop_table("promotions")
    op.drop_index("ix_coupons_template_issued", table_name="coupons")
    op.drop_index("ix_coupons_sale", table_name="coupons")
    op.drop_index("ix_coupons_reserved", table_name="coupons")
    op.drop_index("ix_coupons_reservation", table_name="coupons")
    op.drop_index("ix_coupons_member", table_name="coupons")
    op.drop_index("ix_coupons_due", table_name="coupons")
    op.drop_table("coupons")
    op.drop_index("ix_coupon_templates_created", table_name="coupon_templates")
    op.drop_table("coupon_templates")
    op.drop_index("ix_coupon_redemptions_template", table_name="coupon_redemptions")
    op.drop_table("coupon_redemptions")
    op.drop_table("coupon_member_counts")
    op.drop_index("ix_coupon_issue_jobs_state", table_name="coupon_issue_jobs")
    op.drop_table("coupon_issue_jobs")
    op.drop_index("ix_coupon_issue_job_members_pending", table_name="coupon_issue_job_members")
    op.drop_table("coupon_issue_job_members")
