"""Joins the delivery (0005), templates and opt-outs (0006), and schedules
and sends (0007) branches, written side by side.

Revision ID: 0008
Revises: 0005, 0006, 0007
Create Date: 2026-11-30
"""

revision = "0008"
down_revision = ("0005", "0006", "0007")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
