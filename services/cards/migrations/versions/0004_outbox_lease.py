"""The outbox's relay claims the rows it publishes for a lease.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from chassis.migrations import add_outbox_lease, drop_outbox_lease

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_outbox_lease()


def downgrade() -> None:
    drop_outbox_lease()
