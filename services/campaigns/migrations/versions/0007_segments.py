"""Named member segments, and issue jobs to a segment (the criteria taken
at the call, the page of members reached, whether pages remain).

Revision ID: 0007
Revises: 0006
Create Date: 2027-01-10
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "segments",
        sa.Column("segment_id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("criteria", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.Column("updated_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    with op.batch_alter_table("coupon_issue_jobs") as batch:
        batch.add_column(sa.Column("segment_id", sa.String(40), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("segment_version", sa.BigInteger, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("criteria", sa.Text, nullable=True))
        batch.add_column(sa.Column("cursor", sa.String(1024), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("selecting", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("coupon_issue_jobs") as batch:
        batch.drop_column("selecting")
        batch.drop_column("cursor")
        batch.drop_column("criteria")
        batch.drop_column("segment_version")
        batch.drop_column("segment_id")
    op.drop_table("segments")
