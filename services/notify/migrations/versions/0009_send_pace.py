"""The providers' send pace, shared by the replicas: one row per rate-limited
channel with its theoretical arrival time (GCRA).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "send_pace",
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("tat", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("send_pace")
