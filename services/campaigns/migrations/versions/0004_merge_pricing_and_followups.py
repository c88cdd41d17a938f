"""Joins the two branches written side by side: pricing and coupons (0002)
and follow-up plans (0003). No change of its own.

Revision ID: 0004
Revises: 0002, 0003
Create Date: 2026-12-04
"""

revision = "0004"
down_revision = ("0002", "0003")
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing: both branches are applied by now."""


def downgrade() -> None:
    """Nothing: each branch undoes its own tables."""
