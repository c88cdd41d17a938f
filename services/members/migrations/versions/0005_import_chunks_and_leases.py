"""Member imports on several replicas: the uploaded file kept in the database (sealed under a key of the job's own), and a lease per running job.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "import_chunks",
        sa.Column("import_job_id", sa.String(16), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    with op.batch_alter_table("import_jobs") as batch:
        batch.add_column(sa.Column("runner_id", sa.String(100), nullable=False, server_default=""))
        batch.add_column(sa.Column("lease_expires_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("file_key_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("file_key", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("import_jobs") as batch:
        batch.drop_column("file_key")
        batch.drop_column("file_key_id")
        batch.drop_column("lease_expires_at")
        batch.drop_column("runner_id")
    op.drop_table("import_chunks")
