"""Stored value (accounts, the journal, holds, limits, policy, bonus rules,
enterprise batches) and co-brand partners.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import BigIntKey, UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _money(name: str, nullable: bool = False) -> sa.Column[int]:
    if nullable:
        return sa.Column(name, sa.BigInteger, nullable=True)
    return sa.Column(name, sa.BigInteger, nullable=False, server_default="0")


def upgrade() -> None:
    op.create_table(
        "sv_accounts",
        sa.Column("account_id", sa.String(16), primary_key=True),
        sa.Column("currency", sa.String(3), nullable=False),
        _money("paid"),
        _money("bonus"),
        _money("held_paid"),
        _money("held_bonus"),
        sa.Column("opened_at", UTCDateTime, nullable=False),
        sa.Column("closed_at", UTCDateTime, nullable=True),
        # The last line of defence: no code path can leave a balance below 0.
        sa.CheckConstraint("paid >= 0", name="ck_sv_accounts_paid"),
        sa.CheckConstraint("bonus >= 0", name="ck_sv_accounts_bonus"),
        sa.CheckConstraint("held_paid >= 0", name="ck_sv_accounts_held_paid"),
        sa.CheckConstraint("held_bonus >= 0", name="ck_sv_accounts_held_bonus"),
    )
    op.create_table(
        "sv_movements",
        sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("movement_id", sa.String(16), nullable=False, unique=True),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("request_id", sa.String(220), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False, server_default=""),
        sa.Column("account_id", sa.String(16), nullable=False),
        sa.Column("card_id", sa.String(16), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        _money("amount"),
        _money("paid"),
        _money("bonus"),
        _money("taken_paid"),
        _money("taken_bonus"),
        _money("refunded_paid"),
        _money("refunded_bonus"),
        _money("paid_after"),
        _money("bonus_after"),
        _money("held_paid_after"),
        _money("held_bonus_after"),
        sa.Column("channel", sa.String(24), nullable=False, server_default=""),
        sa.Column("reference", sa.String(100), nullable=False, server_default=""),
        sa.Column("note", sa.String(200), nullable=False, server_default=""),
        sa.Column("bonus_rule_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("hold_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("refunds_movement_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("at", UTCDateTime, nullable=False),
        # A request id is bound to its movement for good, not just while the
        # idempotency key is kept.
        sa.UniqueConstraint("kind", "request_id", name="uq_sv_movements_request"),
        sa.CheckConstraint("refunded_paid <= taken_paid", name="ck_sv_movements_refund_paid"),
        sa.CheckConstraint("refunded_bonus <= taken_bonus", name="ck_sv_movements_refund_bonus"),
    )
    op.create_index("ix_sv_movements_account", "sv_movements", ["account_id", "seq"])
    op.create_index("ix_sv_movements_card", "sv_movements", ["card_id", "seq"])
    op.create_table(
        "sv_entries",
        sa.Column("entry_id", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("movement_id", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String(16), nullable=False),
        sa.Column("book", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(24), nullable=False, server_default=""),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_sv_entries_movement", "sv_entries", ["movement_id"])
    op.create_index("ix_sv_entries_account_book", "sv_entries", ["account_id", "book"])
    op.create_table(
        "sv_holds",
        sa.Column("hold_id", sa.String(16), primary_key=True),
        sa.Column("account_id", sa.String(16), nullable=False),
        sa.Column("card_id", sa.String(16), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        _money("paid"),
        _money("bonus"),
        _money("captured_paid"),
        _money("captured_bonus"),
        sa.Column("reference", sa.String(100), nullable=False, server_default=""),
        sa.Column("local_day", sa.Date, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("hold_movement_id", sa.String(16), nullable=False),
        sa.Column("capture_movement_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("held_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_sv_holds_due", "sv_holds", ["state", "expires_at"])
    op.create_index("ix_sv_holds_account", "sv_holds", ["account_id", "state"])
    op.create_table(
        "sv_card_days",
        sa.Column("card_id", sa.String(16), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        _money("spent"),
        _money("recharged"),
    )
    op.create_table(
        "sv_policy",
        sa.Column("policy_id", sa.SmallInteger, primary_key=True),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.Column("updated_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "sv_bonus_rules",
        sa.Column("rule_id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("threshold", sa.BigInteger, nullable=False),
        _money("fixed_bonus", nullable=True),
        sa.Column("bonus_bps", sa.Integer, nullable=True),
        _money("max_bonus", nullable=True),
        sa.Column("channels", sa.Text, nullable=False, server_default=""),
        sa.Column("program_ids", sa.Text, nullable=False, server_default=""),
        sa.Column("starts_at", UTCDateTime, nullable=False),
        sa.Column("ends_at", UTCDateTime, nullable=True),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "sv_batches",
        sa.Column("batch_id", sa.String(16), primary_key=True),
        sa.Column("file_name", sa.String(200), nullable=False),
        sa.Column("dry_run", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("payment_reference", sa.String(100), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        _money("total"),
        sa.Column("rows", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rows_invalid", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rows_recharged", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rows_failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_by", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=False, server_default=""),
        sa.Column("lease_until", UTCDateTime, nullable=True),
    )
    op.create_index("ix_sv_batches_state", "sv_batches", ["state", "started_at"])
    op.create_table(
        "sv_batch_rows",
        sa.Column("batch_id", sa.String(16), primary_key=True),
        sa.Column("row_number", sa.Integer, primary_key=True),
        sa.Column("card_number", sa.String(32), nullable=False),
        _money("amount"),
        sa.Column("note", sa.String(200), nullable=False, server_default=""),
        sa.Column("outcome", sa.String(10), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False, server_default=""),
        sa.Column("message", sa.String(300), nullable=False, server_default=""),
        sa.Column("movement_id", sa.String(16), nullable=False, server_default=""),
    )
    op.create_table(
        "partners",
        sa.Column("partner_id", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.String(100), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("state_reason", sa.String(200), nullable=False, server_default=""),
        sa.Column("change_seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "partner_certificates",
        sa.Column("sha256_fingerprint", sa.String(64), primary_key=True),
        sa.Column("partner_id", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(300), nullable=False),
        sa.Column("not_after", UTCDateTime, nullable=False),
        sa.Column("added_at", UTCDateTime, nullable=False),
        sa.Column("revoked_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_partner_certificates_partner", "partner_certificates", ["partner_id"])
    op.create_table(
        "partner_card_changes",
        sa.Column("partner_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("card_id", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("related_card_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("at", UTCDateTime, nullable=False),
    )
    with op.batch_alter_table("card_programs") as batch:
        batch.add_column(
            sa.Column("cancel_settlement", sa.String(10), nullable=False, server_default="pay_out")
        )
    with op.batch_alter_table("cards") as batch:
        batch.add_column(sa.Column("partner_id", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("partner_reference", sa.String(64), nullable=True))
    op.create_index(
        "ix_cards_partner_reference", "cards", ["partner_id", "partner_reference"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ix_cards_partner_reference", "cards")
    with op.batch_alter_table("cards") as batch:
        batch.drop_column("partner_reference")
        batch.drop_column("partner_id")
    with op.batch_alter_table("card_programs") as batch:
        batch.drop_column("cancel_settlement")
    for table in (
        "partner_card_changes",
        "partner_certificates",
        "partners",
        "sv_batch_rows",
        "sv_batches",
        "sv_bonus_rules",
        "sv_policy",
        "sv_card_days",
        "sv_holds",
        "sv_entries",
        "sv_movements",
        "sv_accounts",
    ):
        op.drop_table(table)
