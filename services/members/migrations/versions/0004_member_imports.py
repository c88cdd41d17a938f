"""Member imports: import jobs (progress and resume point) and the problems of their rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import BigIntKey, UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "import_jobs",
        sa.Column("import_job_id", sa.String(16), primary_key=True),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("file_format", sa.String(8), nullable=False),
        sa.Column("dry_run", sa.Boolean, nullable=False),
        sa.Column("default_home_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("enrollment_channel", sa.String(20), nullable=False),
        sa.Column("file_sha256", sa.String(64), nullable=False),
        sa.Column("ignored_columns", sa.JSON, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_from_store", sa.String(32), nullable=False, server_default=""),
        sa.Column("scope", sa.String(100), nullable=False),
        sa.Column("roles", sa.String(200), nullable=False),
        sa.Column("records_done", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rows_read", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("enrolled", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("duplicates", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("refused", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failure_reason", sa.String(500), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_import_jobs_state", "import_jobs", ["state"])
    op.create_table(
        "import_row_problems",
        sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("import_job_id", sa.String(16), nullable=False),
        sa.Column("row_number", sa.BigInteger, nullable=False),
        sa.Column("field", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(300), nullable=False),
        sa.Column("kind", sa.String(12), nullable=False),
    )
    op.create_index("ix_import_row_problems_job", "import_row_problems", ["import_job_id", "seq"])


def downgrade() -> None:
    op.drop_table("import_row_problems")
    op.drop_table("import_jobs")
