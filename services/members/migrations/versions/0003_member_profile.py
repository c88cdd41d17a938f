"""The full member file: static profile, consent, custom attributes, follow-ups, history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import BigIntKey, UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NEW_MEMBER_COLUMNS = (
    "extra_enc",
    "birth_year",
    "profile",
    "consultant_id",
    "referrer_member_id",
    "enrolled_at",
    "state",
    "merged_into",
)


def upgrade() -> None:
    with op.batch_alter_table("members") as batch:
        batch.add_column(sa.Column("extra_enc", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("birth_year", sa.SmallInteger, nullable=True))
        batch.add_column(sa.Column("profile", sa.JSON, nullable=True))
        batch.add_column(
            sa.Column("consultant_id", sa.String(100), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("referrer_member_id", sa.String(16), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("enrolled_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("state", sa.String(10), nullable=False, server_default="active"))
        batch.add_column(sa.Column("merged_into", sa.String(16), nullable=False, server_default=""))
        batch.create_index("ix_members_consultant_id", ["consultant_id"])
        batch.create_index("ix_members_state", ["state"])
        batch.create_index("ix_members_enrolled", ["enrolled_at", "member_id"])
    # Files enrolled before 0003 enrolled when they were created.
    op.execute("UPDATE members SET enrolled_at = created_at WHERE enrolled_at IS NULL")
    op.create_table(
        "member_tags",
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("tag", sa.String(40), primary_key=True),
        sa.Index("ix_member_tags_tag", "tag", "member_id"),
    )
    op.create_table(
        "member_consents",
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("channel", sa.String(10), primary_key=True),
        sa.Column("granted", sa.Boolean, nullable=False),
        sa.Column("source", sa.String(60), nullable=False, server_default=""),
        sa.Column("changed_at", UTCDateTime, nullable=False),
        sa.Column("changed_by", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Index("ix_member_consents_granted", "channel", "granted", "member_id"),
    )
    op.create_table(
        "member_changes",
        sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("member_id", sa.String(16), nullable=False),
        sa.Column("operation", sa.String(20), nullable=False),
        sa.Column("fields", sa.JSON, nullable=False),
        sa.Column("values_enc", sa.LargeBinary, nullable=True),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("changed_at", UTCDateTime, nullable=False),
        sa.Index("ix_member_changes_member", "member_id", "seq"),
    )
    op.create_table(
        "member_follow_ups",
        sa.Column("follow_up_id", sa.String(32), primary_key=True),
        sa.Column("member_id", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(10), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("duration_seconds", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_step_enc", sa.LargeBinary, nullable=True),
        sa.Column("staff_id", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("occurred_at", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Index("ix_member_follow_ups_member", "member_id", "occurred_at"),
    )
    op.create_table(
        "member_feedback",
        sa.Column("feedback_id", sa.String(32), primary_key=True),
        sa.Column("member_id", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(10), nullable=False),
        sa.Column("subject_ref", sa.String(60), nullable=False, server_default=""),
        sa.Column("rating", sa.SmallInteger, nullable=False),
        sa.Column("text_enc", sa.LargeBinary, nullable=True),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Index("ix_member_feedback_member", "member_id", "created_at"),
    )
    op.create_table(
        "attribute_definitions",
        sa.Column("name", sa.String(40), primary_key=True),
        sa.Column("type", sa.String(10), nullable=False),
        sa.Column("allowed_values", sa.JSON, nullable=False),
        sa.Column("description", sa.String(2000), nullable=False, server_default=""),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "attribute_definitions",
        "member_feedback",
        "member_follow_ups",
        "member_changes",
        "member_consents",
        "member_tags",
    ):
        op.drop_table(table)
    with op.batch_alter_table("members") as batch:
        batch.drop_index("ix_members_enrolled")
        batch.drop_index("ix_members_state")
        batch.drop_index("ix_members_consultant_id")
        for column in NEW_MEMBER_COLUMNS:
            batch.drop_column(column)
