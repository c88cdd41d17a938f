"""The chassis tables (outbox, inbox, idempotency keys).

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from chassis.migrations import create_chassis_tables, drop_chassis_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_chassis_tables()


def downgrade() -> None:
    drop_chassis_tables()
