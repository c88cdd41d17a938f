"""Invite jobs: a segment's members invited to a member event page by page
(the criteria taken at the call, the page of members reached, whether pages
remain, and the job's counters).

Revision ID: 0008
Revises: 0007
Create Date: 2027-01-20
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "member_event_invite_jobs",
        sa.Column("job_id", sa.String(16), primary_key=True),
        sa.Column("request_id", sa.String(220), nullable=False, unique=True),
        sa.Column("event_id", sa.String(16), nullable=False),
        sa.Column("segment_id", sa.String(40), nullable=False),
        sa.Column("segment_version", sa.BigInteger, nullable=False),
        sa.Column("criteria", sa.Text, nullable=False),
        sa.Column("cursor", sa.String(1024), nullable=False, server_default=""),
        sa.Column("selecting", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("total", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("invited", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("already_invited", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("stop_reason", sa.String(40), nullable=False, server_default=""),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_member_event_invite_jobs_state", "member_event_invite_jobs", ["state"])


def downgrade() -> None:
    op.drop_index("ix_member_event_invite_jobs_state", "member_event_invite_jobs")
    op.drop_table("member_event_invite_jobs")
