"""Follow-up plans and their tasks, and what campaigns keeps of members'
and loyalty's facts to create them. The default plans (3+3+3, birthday,
win-back after 90 days) are active out of the box.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-10
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

from chassis.db import UTCDateTime

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT_PLANS = (
    ("three-three-three", "three_three_three", "3+3+3 新客回访", 0),
    ("birthday", "birthday", "生日关怀", 0),
    ("win-back", "win_back", "沉睡唤醒", 90),
)


def upgrade() -> None:
    plans = op.create_table(
        "followup_plans",
        sa.Column("plan_id", sa.String(40), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("display_name", sa.String(100), nullable=False, server_default=""),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("days", sa.Integer, nullable=False, server_default="0"),
        sa.Column("category", sa.String(64), nullable=False, server_default=""),
        sa.Column("call_windows", sa.String(200), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    now = dt.datetime.now(dt.UTC)
    op.bulk_insert(
        plans,
        [
            {
                "plan_id": plan_id,
                "kind": kind,
                "display_name": name,
                "enabled": True,
                "days": days,
                "category": "",
                "call_windows": "",
                "created_at": now,
                "updated_at": now,
            }
            for plan_id, kind, name, days in DEFAULT_PLANS
        ],
    )
    op.create_table(
        "followup_members",
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("home_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("birthday_month", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_purchase_day", sa.Date, nullable=True),
        sa.Column("last_visit_day", sa.Date, nullable=True),
        sa.Column("state", sa.String(10), nullable=False, server_default="active"),
    )
    op.create_index("ix_followup_members_last_visit", "followup_members", ["last_visit_day"])
    op.create_index("ix_followup_members_birthday_month", "followup_members", ["birthday_month"])
    op.create_table(
        "followup_stores",
        sa.Column("store_id", sa.String(32), primary_key=True),
        sa.Column("region_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("time_zone", sa.String(64), nullable=False),
    )
    op.create_table(
        "followup_tasks",
        sa.Column("task_id", sa.String(40), primary_key=True),
        sa.Column("plan_id", sa.String(40), nullable=False),
        sa.Column("plan_kind", sa.String(20), nullable=False),
        sa.Column("member_id", sa.String(16), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False),
        sa.Column("assignee_staff_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("reason", sa.String(100), nullable=False, server_default=""),
        sa.Column("occasion", sa.String(40), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("due_time", UTCDateTime, nullable=False),
        sa.Column("skip_reason", sa.String(40), nullable=False, server_default=""),
        sa.Column("outcome", sa.String(20), nullable=False, server_default=""),
        sa.Column("follow_up_id", sa.String(40), nullable=False, server_default=""),
        sa.Column("completed_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("completed_at", UTCDateTime, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("reschedule_count", sa.Integer, nullable=False, server_default="0"),
        sa.UniqueConstraint("plan_id", "member_id", "occasion", name="uq_followup_tasks_occasion"),
    )
    op.create_index(
        "ix_followup_tasks_store_due", "followup_tasks", ["store_id", "state", "due_time"]
    )
    op.create_index(
        "ix_followup_tasks_assignee_due",
        "followup_tasks",
        ["assignee_staff_id", "state", "due_time"],
    )
    op.create_index("ix_followup_tasks_state_due", "followup_tasks", ["state", "due_time"])
    op.create_index("ix_followup_tasks_member", "followup_tasks", ["member_id"])


def downgrade() -> None:
    op.drop_table("followup_tasks")
    op.drop_table("followup_stores")
    op.drop_table("followup_members")
    op.drop_table("followup_plans")
